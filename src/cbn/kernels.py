"""Optional C++ kernels for the per-layer work of a training step (``src/cbn/csrc``).

At batch sizes 1 to 4 a CBN layer's cost is mostly the dispatch of many small operations from
Python: each costs a few microseconds of interpreter and argument parsing, whatever its size.
The C++ kernels run the per-step work from C++:

- ``torch.ops.cbn.pooled_normalization``: the normalization with pooled statistics, forward and
  backward (a C++ autograd function; :class:`cbn.functional.normalization.CrossIterationNorm`
  is its Python twin), fused into two passes each way for contiguous float CPU inputs; given a
  differentiable summary's attachment, its backward also gives the producer its gradients
  (``attach_past``'s, in the same node);
- ``torch.ops.cbn.window_summary``: the per-channel chain of a window's summary (Taylor step,
  clamp, centre, spread, pooling weights, the coefficients of differentiable compensation) for
  all layers of a model in one loop (:func:`cbn.functional.window.pool_window` and
  :func:`cbn.functional.differentiable_compensation.compensation_coefficients`: the same float
  operations in the same order, bit for bit);
- ``torch.ops.cbn.convolution_statistic_gradients``: the statistic gradients of all plain
  convolution producers (:func:`cbn.functional.producer_statistic_gradients` looped over them),
  small 2-D float ones in direct loops instead of oneDNN's weight gradient (ResNet-20's layers:
  input channels in eights within measured bounds, or stride 1), the other 2-D ones with the mean
  patch from window sums beside a weight gradient of C rows (oneDNN blocks C + 1 rows a block
  wider);
- ``torch.ops.cbn.mean_patches`` and ``depthwise_variance_gradients``: the statistic gradients of
  grouped 2-D convolutions (depthwise producers): the mean patches as separable window sums
  instead of a convolution with an output-sized kernel, the variance rows centred inline;
- ``torch.ops.cbn.statistic_shifts_many``: the first-order terms of all layers' window entries
  (:func:`cbn.functional.statistic_shifts` looped over the layers), the variance terms as dot
  products summed in one pass, without the window-sized temporary of the Python form;
- ``torch.ops.cbn.window_weight_gradient`` and ``compensation_gradients``: the producer's
  gradients of differentiable compensation, one pass over a layer's window in the backward.
  These and ``statistic_shifts_many`` take a window as its gradient slots, one tensor per
  entry (``csrc/gradient_slots.h``, :mod:`cbn.layers.window_state`);
- ``torch.ops.cbn.convolution_producer``: pairing's common case, a norm fed by a convolution
  whose weight is a trainable leaf, read from autograd's record in C++ with the fingerprint
  (:func:`cbn.producer_call.find_producer_call`); ``weight_fingerprint``: the number by which a
  layer sees its producer's weights change (:func:`cbn.producer_call.producer_fingerprint`);
- ``torch.ops.cbn.write_entries``: the record of a converted model's forward (window entries,
  running statistics) on the CPU (:mod:`cbn.layers.window_record`).

The fused loops are compiled twice, for the build's baseline and with AVX2 and FMA, and run the
copy the CPU supports (as ATen's own kernels do; :func:`instruction_set` says which,
``CBN_KERNELS_SIMD=baseline`` keeps the baseline): at batch 1-2 their rows stay in cache, where
vector width bounds them. The two copies agree to float rounding (FMA rounds once).

Five are fused loops that sum in another order than the Python implementation, so they agree
with it to float rounding (tested): the normalization of contiguous float inputs (statistics
summed in double in two passes, as BatchNorm's training kernel, where Python takes BatchNorm's
Welford kernel), the variance terms, the producer gradients of differentiable compensation
(tested against the textbook bound ``gamma_n sum |a b|``; within one run every product comes
from the same kernel, so a Taylor step at unchanged weights still leaves an entry exactly as
stored), the statistic gradients of grouped convolutions (tested against float64 sums and the
dense Jacobian) and of 2-D float plain convolutions (tested against float64 sums).
The rest (channels-last or half precision normalization, the other statistic gradients, mean
terms, record) runs the same ATen operations, or the same float arithmetic per channel, in the
same order: the same values, bit for bit (tested).

Where they come from, in order: the extension ``cbn._kernels`` that ``pip install .`` (or the
wheel built from the source tree) compiled ahead of time with ``setup.py``; else a build at first
use with ``torch.utils.cpp_extension`` (about half a minute, with the C++ compiler and ``ninja``;
cached in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; ahead of time with
``python -m cbn build-kernels``), also when the installed extension was built against another
torch and does not load; else, with one warning, the Python implementation. ``CBN_KERNELS=0`` in
the environment, or :func:`use_kernels`, turns them off. :func:`origin` says which is in use.

Example::

    >>> import cbn.kernels
    >>> cbn.kernels.available()   # builds on first call
    True
    >>> with cbn.kernels.use_kernels(False):
    ...     pass  # the Python implementation inside
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
_LOCK = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_origin: str | None = None  # the library loaded: the installed extension's path, or "jit"
_enabled = os.environ.get("CBN_KERNELS", "1") != "0"


def available() -> bool:
    """Whether the C++ kernels are in use: enabled, and built (building them on the first call)."""
    if not _enabled:
        return False
    if _loaded is None:
        build()
    return bool(_loaded)


def build(verbose: bool = False) -> bool:
    """Compile (or load from the cache) the C++ kernels; ``False``, with one warning, if that fails."""
    global _loaded
    with _LOCK:
        if _loaded is None:
            try:
                _compile(verbose)
                _loaded = True
            except Exception as error:  # no compiler, no ninja, a failed build: all mean Python
                _loaded = False
                warnings.warn(
                    f"cbn: the C++ kernels could not be built ({type(error).__name__}: {_first_line(error)}); "
                    "using the Python implementation, which gives the same results more slowly at small "
                    "batch sizes. Set CBN_KERNELS=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded


def origin() -> str | None:
    """Where the loaded kernels come from: the path of the extension installed ahead of time,
    ``"jit"`` (built at first use), or ``None`` (not loaded)."""
    return _origin if _loaded else None


def _compile(verbose: bool) -> None:
    global _origin
    installed = _installed_extension()
    if installed is not None:
        try:
            torch.ops.load_library(installed)
            _origin = installed
            _register_fakes()
            return
        except OSError as error:  # built against another torch build: undefined symbols
            if verbose:
                print(f"cbn: the installed kernels do not load ({_first_line(error)}); building them")
    from torch.utils import cpp_extension

    with _ninja_on_path():
        cpp_extension.load(
            # One build per version of the sources: checkouts of other versions share the cache.
            name=f"cbn_kernels_{sources_digest()[:16]}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3"],
            is_python_module=False,
            verbose=verbose,
        )
    _origin = "jit"
    _register_fakes()


def _installed_extension() -> str | None:
    """The path of the extension ``setup.py`` built (``cbn/_kernels*.so``), if installed and built
    from the sources beside it.

    Found, not imported: it registers operators with ``torch.library`` when loaded and has no
    Python module inside. ``setup.py`` records the digest of its sources in ``_kernels.sha256``;
    an extension built from other sources (an in-place build the sources have moved past) is
    not used, and the first-use build compiles the current ones.
    """
    spec = importlib.util.find_spec("cbn._kernels")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    recorded = Path(spec.origin).parent / "_kernels.sha256"
    if not recorded.exists() or recorded.read_text().strip() != sources_digest():
        return None
    return spec.origin


def sources_digest() -> str:
    """sha256 over the C++ sources' and headers' names and contents, in name order (as
    ``setup.py`` records it)."""
    digest = hashlib.sha256()
    for source in sorted(SOURCES + HEADERS, key=lambda path: path.name):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


def _register_fakes() -> None:
    from . import kernel_fakes  # noqa: F401  (registers on import)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``: add the one the ``ninja``
    package installed beside this interpreter, which need not be on ``PATH`` (a virtual
    environment that was not activated)."""
    path = os.environ.get("PATH", "")
    extra = [str(Path(sys.executable).parent)]
    try:
        import ninja

        extra.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join([*extra, path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Use (or not) the C++ kernels inside the block; for comparisons and tests."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def instruction_set() -> str | None:
    """Which copy of the fused loops runs (``csrc/cpu_simd.h``): ``"avx2"`` (AVX2 and FMA, where
    the CPU has them), ``"baseline"`` (the build's target, or ``CBN_KERNELS_SIMD=baseline``), or
    ``"build"`` (a build that targets more than the baseline, or not x86-64); ``None`` where the
    kernels are not loaded. The copies agree to float rounding."""
    return str(torch.ops.cbn.instruction_set()) if available() else None


def active() -> bool:
    """Whether the C++ kernels run here: available, and not inside a graph that ``torch.compile``
    traces (which takes the traceable Python implementation)."""
    return available() and not torch.compiler.is_compiling()

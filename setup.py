"""Builds cbn's C++ kernels (src/cbn/csrc) ahead of time into the extension ``cbn._kernels``.

Everything else about the package is in pyproject.toml. The extension is compiled against the
torch found at build time, so build without isolation in the environment that will run it::

    pip install --no-build-isolation .        # or: pip wheel --no-build-isolation .

A build in an isolated environment compiles against the torch pip installs there; if that is not
the torch that runs it, the extension does not load and cbn.kernels builds the same sources at
first use instead (and, without a compiler, uses the Python implementation).

Beside the extension goes ``_kernels.sha256``, the digest of the sources it was built from:
cbn.kernels loads the extension only while the sources beside it still have that digest, so an
in-place build (``pip install -e``) that the sources have moved past is not used.
"""

import hashlib
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = sorted(Path("src/cbn/csrc").glob("*.cpp"))
HEADERS = sorted(Path("src/cbn/csrc").glob("*.h"))


def sources_digest(sources):
    """sha256 over the sources' and headers' names and contents, in name order (as
    cbn.kernels.sources_digest)."""
    digest = hashlib.sha256()
    for source in sorted(sources, key=lambda path: path.name):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


class BuildKernels(BuildExtension):
    def run(self):
        super().run()
        target = Path(self.get_ext_fullpath("cbn._kernels")).parent / "_kernels.sha256"
        target.write_text(sources_digest(SOURCES + HEADERS) + "\n")


setup(
    ext_modules=[CppExtension("cbn._kernels", [source.as_posix() for source in SOURCES], extra_compile_args=["-O3"],
                              depends=[header.as_posix() for header in HEADERS])],
    cmdclass={"build_ext": BuildKernels.with_options(use_ninja=True)},
)

"""Builds cbn's C++ kernels (src/cbn/csrc) ahead of time into the extension ``cbn._kernels``.

Everything else about the package is in pyproject.toml. The extension is compiled against the
torch found at build time, so build without isolation in the environment that will run it::

    pip install --no-build-isolation .        # or: pip wheel --no-build-isolation .

A build in an isolated environment compiles against the torch pip installs there; if that is not
the torch that runs it, the extension does not load and cbn.kernels builds the same sources at
first use instead (and, without a compiler, uses the Python implementation).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

SOURCES = sorted(str(path.as_posix()) for path in Path("src/cbn/csrc").glob("*.cpp"))

setup(
    ext_modules=[CppExtension("cbn._kernels", SOURCES, extra_compile_args=["-O3"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

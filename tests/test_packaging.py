"""Installable like a PyTorch extension: metadata, one version, a true torch bound, and operators
that compiled graphs can call (fake implementations, declared mutations: torch.library.opcheck)."""

import re
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import cbn
import cbn.kernels

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_number():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cbn.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", cbn.__version__)
    # Nowhere else: the citation and the changelog name no current version of their own.
    assert "version:" not in (ROOT / "CITATION.cff").read_text().replace("cff-version:", "")
    assert f"## {cbn.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_declared_torch_bound_is_the_tested_release():
    (requirement,) = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")]
    bound = tuple(int(part) for part in requirement.removeprefix("torch>=").split("."))
    running = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    # The suite runs on the bound's release (constraints.txt): a lower bound would be untested.
    assert bound == running == (2, 14)


def test_license_types_and_citation_ship():
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "cbn authors" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src/cbn/py.typed").exists() and "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["cbn"]
    citation = (ROOT / "CITATION.cff").read_text()
    assert "Cross-Iteration Batch Normalization" in citation and "arXiv:2002.05712" in citation
    assert "2021" in citation and all(name in citation for name in ("Yao", "Cao", "Zheng", "Huang", "Lin"))


def test_setup_builds_every_kernel_source_ahead_of_time():
    setup = (ROOT / "setup.py").read_text()
    assert 'CppExtension("cbn._kernels"' in setup and "BuildExtension" in setup
    assert "src/cbn/csrc" in setup and len(cbn.kernels.SOURCES) == len(list((ROOT / "src/cbn/csrc").glob("*.cpp")))


def test_setup_records_the_digest_kernels_checks():
    import ast
    import hashlib

    tree = ast.parse((ROOT / "setup.py").read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "sources_digest"]
    namespace = {"hashlib": hashlib}
    exec(compile(ast.Module([function], []), "setup.py", "exec"), namespace)
    assert namespace["sources_digest"](cbn.kernels.SOURCES + cbn.kernels.HEADERS) == cbn.kernels.sources_digest()


def test_an_extension_built_from_other_sources_is_not_loaded(tmp_path, monkeypatch):
    import importlib.machinery

    library = tmp_path / "_kernels.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("cbn._kernels", None, origin=str(library))
    monkeypatch.setattr(cbn.kernels.importlib.util, "find_spec", lambda name: spec)
    assert cbn.kernels._installed_extension() is None  # no record of its sources
    (tmp_path / "_kernels.sha256").write_text(cbn.kernels.sources_digest() + "\n")
    assert cbn.kernels._installed_extension() == str(library)
    (tmp_path / "_kernels.sha256").write_text("0" * 64 + "\n")  # built before the sources changed
    assert cbn.kernels._installed_extension() is None


def test_kernels_come_from_the_installed_extension_when_there_is_one():
    assert cbn.kernels.available()
    installed = cbn.kernels._installed_extension()
    assert cbn.kernels.origin() == (installed if installed is not None else "jit")


# Operators whose C++ writes state in place; opcheck runs them on the arguments of a real step.
IN_PLACE_OPERATORS = ["write_entries"]


@pytest.fixture(scope="module")
def recorded_calls():
    assert cbn.kernels.available()
    calls, originals = {}, {name: getattr(torch.ops.cbn, name) for name in IN_PLACE_OPERATORS}

    def recorder(name):
        def call(*args):
            calls.setdefault(name, torch.utils._pytree.tree_map(
                lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, args))
            return originals[name](*args)
        return call

    model = cbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                            nn.BatchNorm2d(4)), window=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.MonkeyPatch.context() as patch:
        for name in IN_PLACE_OPERATORS:
            patch.setattr(torch.ops.cbn, name, recorder(name))
        for _ in range(4):
            model(torch.randn(2, 3, 8, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    return calls


@pytest.mark.parametrize("name", IN_PLACE_OPERATORS)
def test_opcheck_passes_on_a_real_step(recorded_calls, name):
    assert name in recorded_calls, sorted(recorded_calls)
    # Raises on a schema that hides a mutation, a missing or wrong fake implementation, or an
    # operator that cannot be traced (aot_dispatch with dynamic shapes).
    result = torch.library.opcheck(getattr(torch.ops.cbn, name).default, recorded_calls[name])
    assert set(result.values()) == {"SUCCESS"}, result

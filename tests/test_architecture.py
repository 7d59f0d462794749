"""The architecture as tests. Python: imports run one way, cli -> modeling -> loading ->
(tokenizer, config, quant, generation) -> (formats, _dtypes, _files, _demo, _config_fields) -> _C, and no package's
modules import each other in a cycle: the import-linter contracts in pyproject.toml, checked
on the installed package (late imports inside functions count). C++: a source includes only
its own layer and the layers below, bindings -> engine -> (cuda | cpu) -> runtime -> core,
and only the binding sees pybind11."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
CSRC = os.path.join(ROOT, "csrc")

LINT = textwrap.dedent("""
    import sys
    from importlinter.cli import lint_imports
    sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))
""")


def lint(env=None):
    pytest.importorskip("importlinter")
    return subprocess.run([sys.executable, "-c", LINT, PYPROJECT], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_python_imports_run_one_way():
    out = lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout, out.stdout


@pytest.mark.parametrize("module, line, broken", [
    # the file-format layer reaching up into the loading layer
    ("formats/gguf.py", "from ..loading import layout", "Layers"),
    # a leaf importing the package root, which imports modeling
    ("config.py", "import gemma_cpp", "Layers"),
    # two modules of the loading layer importing each other
    ("loading/layout.py", "from . import hf", "No import cycles"),
])
def test_the_contracts_catch_a_wrong_import(tmp_path, module, line, broken):
    """The same contracts on a copy of the package with one import added: broken."""
    import gemma_cpp

    src = os.path.dirname(gemma_cpp.__file__)
    dst = tmp_path / "gemma_cpp"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(dst / module, "a", encoding="utf-8") as f:
        f.write(f"\n\ndef _added():\n    {line}\n")  # a late import counts as much as a top-level one
    out = lint(env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(rf"{broken}[^\n]* BROKEN", out.stdout), out.stdout


# C++ layers, from the top: a file may include headers of its own layer and of the layers below
# (cuda and cpu side by side: neither includes the other; core/formats.h's table and
# core/weight.h are what they share).
CPP_LAYERS = ["bindings", "engine", "cuda", "cpu", "runtime", "core"]
CPP_BELOW = {"bindings": CPP_LAYERS[1:], "engine": ["cuda", "cpu", "runtime", "core"], "cuda": ["runtime", "core"],
             "cpu": ["runtime", "core"], "runtime": ["core"], "core": []}
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def cpp_files():
    for layer in CPP_LAYERS:  # a layer's folder and the folders in it (engine/models/)
        for folder, _, names in sorted(os.walk(os.path.join(CSRC, layer))):
            for name in sorted(names):
                if name.endswith((".h", ".cpp", ".cu", ".cuh")):
                    yield layer, os.path.join(folder, name)


def test_cpp_includes_run_one_way():
    allowed = {layer: {layer, *CPP_BELOW[layer]} for layer in CPP_LAYERS}
    bad, seen = [], 0
    for layer, path in cpp_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for header in INCLUDE.findall(text):
            seen += 1
            top = header.split("/")[0]
            if top in CPP_LAYERS and top not in allowed[layer]:
                bad.append(f"{os.path.relpath(path, CSRC)} includes {header}")
            if top == "pybind11" and layer != "bindings":
                bad.append(f"{os.path.relpath(path, CSRC)} includes {header}: only the binding sees pybind11")
    assert seen > 50  # the scan reads the includes it is meant to
    assert not bad, bad
    # Every source directory is a layer (a new one must be placed in CPP_LAYERS).
    dirs = {d for d in os.listdir(CSRC) if os.path.isdir(os.path.join(CSRC, d))}
    assert dirs == set(CPP_LAYERS), dirs


@pytest.mark.parametrize("source, header", [
    ("cpu/ops.cpp", "engine/model.h"),   # up a layer
    ("cuda/gemv.cu", "cpu/kernels.h"),   # sideways: the CUDA kernels take nothing of the CPU's
    ("core/formats.h", "cpu/quant.h"),   # the shared table reaching into a device
    ("engine/models/gemma.cpp", "bindings/common.h"),  # a generation's file, one folder down
])
def test_cpp_layer_scan_catches_a_wrong_include(tmp_path, monkeypatch, source, header):
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    with open(copy / source, "a", encoding="utf-8") as f:
        f.write(f'\n#include "{header}"\n')
    monkeypatch.setattr(sys.modules[__name__], "CSRC", str(copy))
    with pytest.raises(AssertionError, match=f"{source} includes {header}"):
        test_cpp_includes_run_one_way()

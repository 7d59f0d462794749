"""The build's helpers that run at install time (cmake/): the progress a pip install shows."""
import importlib.util
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_progress():
    spec = importlib.util.spec_from_file_location("build_progress", ROOT / "cmake" / "build_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NINJA = """\
[0/4] Performing configure step
[1/3] Building CXX object CMakeFiles/gemma_engine.dir/csrc/engine/sampler.cpp.o
some compiler warning
[2/3] Building CUDA object CMakeFiles/gemma_cuda.dir/csrc/cuda/gemv.cu.o
[3/3] Linking CXX shared module module/_C.so
"""


class Terminal(io.StringIO):
    def close(self):  # keep the text readable after main() closes it
        pass


def run_progress(monkeypatch, capsys, script, terminal):
    progress = load_progress()
    monkeypatch.setattr(progress, "open_terminal", lambda: terminal)
    rc = progress.main([sys.executable, "-c", script])
    return rc, capsys.readouterr().out


def test_every_line_passes_through_and_the_terminal_gets_one_line_per_step(monkeypatch, capsys):
    terminal = Terminal()
    rc, out = run_progress(monkeypatch, capsys, f"import sys; sys.stdout.write({NINJA!r})", terminal)
    assert rc == 0
    assert out == NINJA  # pip -v and CI logs read exactly what the build printed
    lines = [line.strip("\r") for line in terminal.getvalue().splitlines() if line.strip()]
    assert lines[0].startswith("gemma_cpp: compiling the C++ engine")
    steps = [line.split("s  ", 1)[1] for line in lines[1:-1]]
    assert steps == ["[0/4] performing configure step", "[1/3] compiling csrc/engine/sampler.cpp",
                     "[2/3] compiling csrc/cuda/gemv.cu", "[3/3] linking CXX shared module module/_C.so"]
    assert lines[-1].startswith("gemma_cpp: C++ build done in ")


def test_a_failed_build_keeps_its_status_and_says_so(monkeypatch, capsys):
    terminal = Terminal()
    script = "import sys; print('[1/2] Building CXX object x.dir/a.cpp.o'); print('error: boom'); sys.exit(3)"
    rc, out = run_progress(monkeypatch, capsys, script, terminal)
    assert rc == 3 and "error: boom" in out
    assert "C++ build FAILED" in terminal.getvalue()


def test_nothing_reaches_the_terminal_without_work_or_without_one(monkeypatch, capsys):
    terminal = Terminal()
    rc, out = run_progress(monkeypatch, capsys, "print('ninja: no work to do.')", terminal)
    assert rc == 0 and out == "ninja: no work to do.\n" and terminal.getvalue() == ""
    rc, out = run_progress(monkeypatch, capsys, f"import sys; sys.stdout.write({NINJA!r})", None)
    assert rc == 0 and out == NINJA


def test_the_terminal_is_left_alone_when_asked_or_when_output_is_one(monkeypatch):
    progress = load_progress()
    monkeypatch.setenv("GEMMA_CPP_BUILD_PROGRESS", "0")
    assert progress.open_terminal() is None
    monkeypatch.delenv("GEMMA_CPP_BUILD_PROGRESS")
    monkeypatch.setattr(sys, "stdout", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert progress.open_terminal() is None

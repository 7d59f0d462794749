"""The documentation against the repository: README.md and docs/*.md link only to files that
exist, name only repository paths that exist, show only `gemma-cpp` subcommands and flags that
the command's own parser accepts, benchmark options that the scripts' own parsers list,
environment variables and pip extras that the code defines, and the README's test command is
the one .ci/run runs. The checks run on the real parsers (the CLI's, captured from
gemma_cpp.cli.main; each benchmark's `--help`), and a last test feeds them a page with a wrong
name of each kind, so that a check that stopped looking fails."""
import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A repository path: one of the tree's top-level folders and what follows, or a top-level file.
TOP_FOLDERS = (".ci", "benchmarks", "cmake", "csrc", "docs", "fuzz", "python", "tests", "third_party")
PATH = re.compile(r"(?<![\w./$~-])((?:%s)/[\w.*/-]*|pyproject\.toml|CMakeLists\.txt|README\.md)(?![\w-])"
                  % "|".join(re.escape(f) for f in TOP_FOLDERS))
# Options whose value is a file or folder a command writes: only its folder must exist.
OUTPUT_OPTIONS = ("--plot", "--plots", "--json")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SUBCOMMAND = re.compile(r"(?<![\w/-])gemma-cpp\s+([a-z][a-z-]*)")
ENV_VAR = re.compile(r"\bGEMMA_CPP_[A-Z0-9_]+\b")
EXTRAS = re.compile(r"(?:\.|gemma_cpp)\[([\w,-]+)\]")
SEPARATORS = ("&&", "||", ";", "|")


# --- reading a page ----------------------------------------------------------------------------

def split_page(text: str):
    """(prose, code lines): the prose with fenced blocks blanked (line numbers kept), and each
    fenced block's logical lines (a trailing backslash joins the next) as (line number, text)."""
    prose, code, fence, pending = [], [], None, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence else line
            prose.append("")
            continue
        if fence is None:
            prose.append(line)
            continue
        prose.append("")
        if pending:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (n, line)
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1])
        else:
            code.append(pending)
            pending = None
    return "\n".join(prose), code


def inline_spans(prose: str):
    """Each inline code span of the prose as (line number, text); a span may cross a line."""
    out = []
    for m in re.finditer(r"`([^`]+)`", prose):
        out.append((prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def units(text: str):
    """What a page shows as code: ("span" | "block", line, text) for every inline span and
    every logical line of a fenced block."""
    prose, code = split_page(text)
    return [("span", n, s) for n, s in inline_spans(prose)] + [("block", n, s) for n, s in code]


def commands(source: str):
    """The commands in a piece of code: lists of words, split at &&, ||, ; and |, comments
    dropped, leading VAR=value assignments dropped."""
    try:
        words = shlex.split(source, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: words are enough
        words = source.split()
    out, current = [], []
    for w in words + [";"]:
        if w in SEPARATORS:
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        else:
            current.append(w)
    return out


def flags(words):
    return [w.split("=", 1)[0] for w in words if re.fullmatch(r"--[A-Za-z0-9][\w-]*(=.*)?", w)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path):
    prose, _ = split_page(path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose, re.M)}


# --- the real parsers ----------------------------------------------------------------------------

class _Captured(Exception):
    pass


@lru_cache(maxsize=None)
def cli_parser() -> argparse.ArgumentParser:
    """The parser gemma_cpp.cli.main builds, taken at its parse_args call (nothing runs)."""
    from gemma_cpp import cli

    real = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        cli.main([])
    except _Captured as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError("gemma_cpp.cli.main did not call parse_args")


def cli_subcommands() -> dict:
    action = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def cli_parse_error(words):
    """None when `gemma-cpp WORDS...` parses, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli_parser().parse_args(words)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1]
    return None


@lru_cache(maxsize=None)
def benchmark_options(script: str) -> frozenset:
    """The options `python benchmarks/SCRIPT --help` lists."""
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", out.stdout))


@lru_cache(maxsize=None)
def fuzz_harnesses() -> frozenset:
    text = (ROOT / "fuzz" / "harnesses.py").read_text()
    table = re.search(r"^HARNESSES = \{(.*?)\}", text, re.S | re.M)
    return frozenset(re.findall(r"\"(\w+)\":", table.group(1)))


@lru_cache(maxsize=None)
def source_text() -> str:
    """Everything but the docs, where an environment variable can be read or set."""
    files = [ROOT / "CMakeLists.txt", ROOT / "pyproject.toml", *(ROOT / ".ci").iterdir()]
    for folder in ("python", "csrc", "cmake", "benchmarks", "tests", "fuzz"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in
                  (".py", ".cpp", ".h", ".cu", ".cuh", ".cmake", ".sh", ".txt", ".toml")]
    this = Path(__file__).resolve()
    return "\n".join(p.read_text(errors="replace") for p in files if p.is_file() and p.resolve() != this)


@lru_cache(maxsize=None)
def pip_extras() -> frozenset:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.S | re.M).group(1)
    return frozenset(re.findall(r"^([\w-]+)\s*=", section, re.M))


def ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "The README's test command" in line)
    return lines[i + 1].strip()


# --- the checks: each returns the page's problems, one line each ----------------------------------

def link_problems(text: str, page: Path):
    prose, _ = split_page(text)
    out = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        line = prose.count("\n", 0, m.start()) + 1
        if not dest.exists():
            out.append(f"line {line}: link to {target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            out.append(f"line {line}: link to {target}: {dest.name} has no heading #{fragment}")
    return out


def path_problems(text: str):
    out = []
    for _, line, code in units(text):
        outputs = {w for cmd in commands(code) for a, w in zip(cmd, cmd[1:]) if a in OUTPUT_OPTIONS}
        outputs |= {w.split("=", 1)[1] for cmd in commands(code) for w in cmd
                    if w.split("=", 1)[0] in OUTPUT_OPTIONS and "=" in w}
        for m in PATH.finditer(code):
            path = m.group(1).rstrip(".")
            if path in outputs:
                if not (ROOT / path).parent.is_dir():
                    out.append(f"line {line}: {path}: its folder does not exist")
            elif not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                out.append(f"line {line}: {path}: no such file or folder")
    return out


def cli_problems(text: str):
    subs, out = cli_subcommands(), []
    for m in SUBCOMMAND.finditer(text):
        if m.group(1) not in subs:
            out.append(f"line {text.count(chr(10), 0, m.start()) + 1}: gemma-cpp {m.group(1)}: no such "
                       f"subcommand (there are {', '.join(subs)})")
    for kind, line, code in units(text):
        for cmd in commands(code):
            if cmd[0] != "gemma-cpp" or len(cmd) < 2 or cmd[1] not in subs:
                continue
            known = subs[cmd[1]]._option_string_actions
            bad = [f for f in flags(cmd[2:]) if f not in known]
            if bad:
                out.append(f"line {line}: gemma-cpp {cmd[1]} has no {', '.join(bad)}")
            elif kind == "block":  # a whole command shown as code: the real parser takes it
                error = cli_parse_error(cmd[1:])
                if error:
                    out.append(f"line {line}: `{' '.join(cmd)}`: {error}")
    return out


def benchmark_problems(text: str):
    out = []
    for _, line, code in units(text):
        for cmd in commands(code):
            if cmd[0] not in ("python", "python3") or len(cmd) < 2:
                continue
            script = cmd[1]
            if re.fullmatch(r"benchmarks/\w+\.py", script) and (ROOT / script).is_file():
                bad = [f for f in flags(cmd[2:]) if f not in benchmark_options(script)]
                if bad:
                    out.append(f"line {line}: {script} has no {', '.join(bad)}")
            elif script == "fuzz/run.py" and len(cmd) > 2 and cmd[2] not in fuzz_harnesses():
                out.append(f"line {line}: fuzz/run.py has no harness {cmd[2]!r}")
    return out


def env_problems(text: str):
    source = source_text()
    return [f"{name}: not read or set anywhere in the code" for name in sorted(set(ENV_VAR.findall(text)))
            if name not in source]


def extra_problems(text: str):
    out = []
    for _, line, code in units(text):
        if "pip install" not in code:
            continue
        for m in EXTRAS.finditer(code):
            for extra in m.group(1).split(","):
                if extra not in pip_extras():
                    out.append(f"line {line}: no pip extra {extra!r} (pyproject.toml has {', '.join(sorted(pip_extras()))})")
    return out


# --- the tests ------------------------------------------------------------------------------------

def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    assert link_problems(page.read_text(), page) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_paths_exist(page):
    assert path_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_commands_parse(page):
    assert cli_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_benchmark_and_fuzz_commands_exist(page):
    assert benchmark_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_environment_variables_and_extras_exist(page):
    text = page.read_text()
    assert env_problems(text) + extra_problems(text) == []


def test_readme_test_command_is_ci_command():
    """The README shows the test command once, as .ci/run runs it; no page shows another."""
    want = ci_test_command()
    assert "pytest" in want
    readme = [code.strip() for _, code in split_page((ROOT / "README.md").read_text())[1] if "pytest" in code]
    assert readme == [want]
    for page in PAGES[1:]:
        for _, code in split_page(page.read_text())[1]:
            if "-m pytest" in code and "pip install" in code:
                assert code.strip() == want, f"{page_id(page)} shows another test command: {code.strip()}"


def test_the_checks_catch_wrong_names(tmp_path):
    """A page with one wrong name of each kind: every check reports its own."""
    page = tmp_path / "page.md"
    text = "\n".join([
        "# Title",
        "[a](missing.md) [b](#title) [c](#no-such-heading)",
        "See `benchmarks/bench_nothing.py` and `tests/test_cli.py`.",
        "`gemma-cpp frobnicate` and `gemma-cpp serve --no-such-flag`.",
        "```bash",
        "gemma-cpp generate \"Hi\" --max-new-tokens many",
        "gemma-cpp serve --ray --replicas 2 --port 8000",
        "python benchmarks/bench_scale.py --plots docs/ --no-such-option",
        "python benchmarks/bench_scale.py --json docs/nowhere/x.json",
        "python fuzz/run.py nosuchharness -runs=10",
        "GEMMA_CPP_NO_SUCH_VARIABLE=1 pip install \".[demo,nosuchextra]\"",
        "```",
    ])
    page.write_text(text)
    assert link_problems(text, page) == ["line 2: link to missing.md: no such file",
                                         "line 2: link to #no-such-heading: page.md has no heading #no-such-heading"]
    assert path_problems(text) == ["line 3: benchmarks/bench_nothing.py: no such file or folder",
                                   "line 9: docs/nowhere/x.json: its folder does not exist"]
    problems = cli_problems(text)
    assert len(problems) == 3, problems
    assert "gemma-cpp frobnicate: no such subcommand" in problems[0]
    assert problems[1] == "line 4: gemma-cpp serve has no --no-such-flag"
    assert problems[2].startswith("line 6: ") and "--max-new-tokens" in problems[2]
    assert benchmark_problems(text) == ["line 8: benchmarks/bench_scale.py has no --no-such-option",
                                        "line 10: fuzz/run.py has no harness 'nosuchharness'"]
    assert env_problems(text) == ["GEMMA_CPP_NO_SUCH_VARIABLE: not read or set anywhere in the code"]
    assert len(extra_problems(text)) == 1 and "'nosuchextra'" in extra_problems(text)[0]

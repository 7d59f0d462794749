"""Coverage-guided fuzzing of one harness with atheris (libFuzzer):

  python fuzz/run.py NAME [libFuzzer flags] [CORPUS_DIR ...]

NAME is one of fuzz/harnesses.py's HARNESSES. Without a corpus folder the harness starts from
a copy of its saved seeds (fuzz/corpus/NAME), so a run never writes into the repository.
Defaults: -timeout=10 (a hang over 10 s is a finding) and -rss_limit_mb=2048; pass -runs=N
to stop after N inputs. A finding stops the run and leaves crash-* / timeout-* / oom-* files
in the current folder: add the input to fuzz/corpus/NAME once fixed, so that the tests
replay it.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    import atheris

    if len(sys.argv) < 2 or sys.argv[1] not in ("gguf", "safetensors", "ourformat", "spmodel", "tokenizer", "chat",
                                                 "engine", "generate"):
        raise SystemExit(__doc__)
    name, args = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports(include=["gemma_cpp"]):
        import harnesses
    harness = harnesses.HARNESSES[name]
    # Build what the harness holds fixed before the clock starts.
    if name in ("generate",):
        harnesses.tiny_model()
    if name in ("tokenizer", "chat"):
        harnesses.demo_tokenizer()
    flags = [a for a in args if a.startswith("-")]
    dirs = [a for a in args if not a.startswith("-")]
    if not dirs:
        work = tempfile.mkdtemp(prefix=f"gemma-cpp-corpus-{name}-")
        for f, data in harnesses.seeds(name):
            with open(os.path.join(work, f), "wb") as fh:
                fh.write(data)
        dirs = [work]
    for flag, value in (("-timeout", "10"), ("-rss_limit_mb", "2048")):
        if not any(f.startswith(flag + "=") for f in flags):
            flags.append(f"{flag}={value}")
    try:
        atheris.Setup([sys.argv[0]] + flags + dirs, harness)
        atheris.Fuzz()
    finally:
        if not args or not [a for a in args if not a.startswith("-")]:
            shutil.rmtree(dirs[0], ignore_errors=True)


if __name__ == "__main__":
    main()

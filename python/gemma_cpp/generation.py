"""Generation settings (transformers' names and defaults), their validation, and streamers."""
from __future__ import annotations

import dataclasses
import numbers
import os
import sys
from typing import List, Optional, Union

from ._files import read_json_object


# The pieces that end a chat turn, stop tokens beside a model's eos ids wherever its vocabulary has
# them: Gemma 2 / 3's <end_of_turn>; Gemma 4's <turn|>, and <|tool_response>, where a model that
# called a tool waits for its result (transformers gives Gemma 4 the eos ids <eos>, <turn|> and
# <|tool_response>, as its generation_config.json does).
END_OF_TURN = ("<end_of_turn>", "<turn|>", "<|tool_response>")


def chat_stop_ids(model, tokenizer) -> List[int]:
    """Where a chat reply ends: the model's eos ids (its generation config's, else its
    config's) and the END_OF_TURN pieces the tokenizer has."""
    eos = model.generation_config.eos_ids()
    if not eos:
        e = model.config.eos_token_id
        eos = [e] if is_int(e) else [int(x) for x in (e or [])]
    for piece in END_OF_TURN:
        i = tokenizer.convert_tokens_to_ids(piece)
        if is_int(i) and i != tokenizer.unk_token_id and i not in eos:
            eos.append(i)
    return eos


# The sampling fields a checkpoint's generation config may state for servers to default to.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def is_int(v) -> bool:
    """An integer, not a bool (True is an int to Python, never a count to us)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass
class GenerationConfig:
    """What `generate` does, with transformers' argument names and defaults.

    Processors run in transformers' order: repetition_penalty, then (when do_sample)
    temperature, top_k, top_p, min_p, then the draw."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = 50
    top_p: Optional[float] = 1.0
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    eos_token_id: Union[int, List[int], None] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    seed: Optional[int] = None
    # What generate returns, as transformers: the ids, or (return_dict_in_generate) an output
    # with .sequences and, with output_logits, .logits: one [B, vocab] array per step, the raw
    # logits before the processors (NaN in the rows that had already finished).
    output_logits: bool = False
    return_dict_in_generate: bool = False
    # The sampling values the checkpoint itself states (SAMPLING_FIELDS of its
    # generation_config.json, or the known ones of a GGUF file's architecture): what a server
    # uses for the fields a request leaves out, as vLLM does. Not a generate() argument.
    sampling_defaults: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, folder: str) -> "GenerationConfig":
        """Read generation_config.json from a checkpoint folder (defaults when absent)."""
        path = os.path.join(folder, "generation_config.json")
        if not os.path.isfile(path):
            return cls()
        data = read_json_object(path, "generation config")
        names = cls.argument_names()
        # max_length (a total length) is not read: generate counts new tokens only.
        out = cls(**{k: v for k, v in data.items() if k in names})
        out.sampling_defaults = {k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None}
        return out

    @classmethod
    def argument_names(cls) -> set:
        """The fields generate() takes (and a generation_config.json may set): all but
        sampling_defaults."""
        return {f.name for f in dataclasses.fields(cls)} - {"sampling_defaults"}

    def to_file_dict(self) -> dict:
        """The generation_config.json keys of what a converted model carries: the special ids
        and the sampling values the checkpoint states."""
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, **self.sampling_defaults}

    def updated(self, **kwargs) -> "GenerationConfig":
        """A copy with the given arguments set; an explicit None sets None (top_k=None turns
        top-k off, as in transformers), and numeric None falls back to the default."""
        unknown = [k for k in kwargs if k not in self.argument_names()]
        if unknown:
            raise TypeError(f"generate() got unexpected argument(s): {', '.join(unknown)}")
        out = dataclasses.replace(self, **kwargs)
        for name in ("max_new_tokens", "do_sample", "temperature", "repetition_penalty"):
            if getattr(out, name) is None:
                setattr(out, name, getattr(GenerationConfig, name))
        return out

    def eos_ids(self) -> List[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(x) for x in (e if isinstance(e, (list, tuple)) else [e])]

    def validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "a non-negative int")
        if not is_num(self.temperature) or not self.temperature >= 0:
            bad("temperature", "a number >= 0 (0 with do_sample means greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            bad("top_k", "an int >= 0 (0 or None: no top-k)")
        if self.top_p is not None and (not is_num(self.top_p) or not 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")
        if self.min_p is not None and (not is_num(self.min_p) or not 0 <= self.min_p <= 1):
            bad("min_p", "in [0, 1]")
        if not is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "a number > 0 (1.0: no penalty)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 64):
            bad("seed", "an int in [0, 2**64)")
        for name in ("output_logits", "return_dict_in_generate"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        for e in self.eos_ids():
            if not is_int(e):
                raise ValueError(f"eos_token_id must be an int or a list of ints, got {self.eos_token_id!r}")


class TextStreamer:
    """Prints the text as tokens arrive, as transformers' TextStreamer: `put(ids)` with the
    prompt first, then each new token; `end()`. skip_prompt (default False, as transformers'):
    leave the prompt out; decode_kwargs go to tokenizer.decode (skip_special_tokens=True hides
    special tokens). One sequence: generate() with a streamer takes a batch of one."""

    def __init__(self, tokenizer, skip_prompt: bool = False, stream=None, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.stream = stream or sys.stdout
        self.decode_kwargs = decode_kwargs
        self._ids: List[int] = []
        self._printed = 0
        self._prompt_seen = False

    def put(self, value) -> None:
        import numpy as np

        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if arr.ndim == 2:
            if arr.shape[0] > 1:
                raise ValueError(f"TextStreamer streams one sequence, and generate() was given {arr.shape[0]}: "
                                 f"stream a batch of one, or leave the streamer out and decode the batch's output")
            arr = arr[0]
        ids = [int(x) for x in arr.reshape(-1)]
        if self.skip_prompt and not self._prompt_seen:
            self._prompt_seen = True
            return
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
        # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[self._printed:])
        self.stream.flush()
        self._printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
        self.stream.write(text[self._printed:] + "\n")
        self.stream.flush()
        self._ids, self._printed, self._prompt_seen = [], 0, False

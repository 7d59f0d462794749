"""The front end both Gemma tokenizers share: special and added tokens, configs, padding and
truncation, batches, decoding checks and chat; and BatchEncoding. The backends (slow.py on
sentencepiece, fast.py on tokenizers) give it three hooks: text to ids, an id's piece, ids to
text."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Iterable

import numpy as np

from .._files import read_json_object
from ..formats.gguf import is_gguf
from . import chat
from .gguf import read_gguf_model
from .spmodel import CONTROL, USER_DEFINED, SentencePieceModel

# transformers' VERY_LARGE_INTEGER / LARGE_INTEGER: a model_max_length above the
# latter means "no limit".
_VERY_LARGE_INTEGER = int(1e30)
_LARGE_INTEGER = int(1e20)


# --------------------------------------------------------------------------------------
# BatchEncoding
# --------------------------------------------------------------------------------------


class BatchEncoding(dict):
    """A dict of model inputs (``input_ids``, ``attention_mask``) with attribute access.

    Like transformers' ``BatchEncoding``: ``enc.input_ids`` is ``enc["input_ids"]``,
    ``enc.to(device)`` moves torch tensors, and ``model(**enc)`` works.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key {name!r}; keys: {list(self.keys())}") from None

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)

    def to(self, device: Any) -> "BatchEncoding":
        """Move every torch tensor to ``device`` (in place) and return self."""
        for key, value in self.items():
            if hasattr(value, "to") and not isinstance(value, (list, np.ndarray)):
                self[key] = value.to(device)
        return self

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchEncoding":
        """Convert every value to ``tensor_type`` ("np" or "pt") in place."""
        for key, value in list(self.items()):
            self[key] = _to_tensor(value, tensor_type, key)
        return self


def _to_tensor(value: Any, tensor_type: str | None, name: str) -> Any:
    if tensor_type is None:
        return value
    if isinstance(value, list) and value and isinstance(value[0], list):
        lengths = {len(row) for row in value}
        if len(lengths) > 1:
            raise ValueError(
                f"cannot make one tensor of {name!r}: the sequences have different lengths {sorted(lengths)}; "
                "pass padding=True (or padding='max_length' with max_length) to pad them"
            )
    if tensor_type == "np":
        return np.asarray(value, dtype=np.int64)
    if tensor_type == "pt":
        try:
            import torch
        except ImportError as e:
            raise ImportError("return_tensors='pt' needs torch; install it or use return_tensors='np'") from e
        return torch.tensor(value, dtype=torch.long)
    raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {tensor_type!r}")


def _check_return_tensors(return_tensors: Any) -> str | None:
    if return_tensors is None:
        return None
    value = getattr(return_tensors, "value", return_tensors)  # transformers' TensorType enum
    if value not in ("np", "pt"):
        raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
    return value


# --------------------------------------------------------------------------------------
# Added-token matching
# --------------------------------------------------------------------------------------


def trie_regex(tokens: Iterable[str]) -> re.Pattern | None:
    """One regex that finds the tokens leftmost-longest, as tokenizers' AddedVocabulary.

    Built from the trie of the tokens: every branch point is an alternation on
    distinct next characters, and a token that is a prefix of a longer one becomes
    a greedy optional group, so the regex engine tries the longer token first and
    backs off. Cost per text position is one trie walk, not one try per token
    (Gemma 3 has over 6000 control pieces).
    """
    trie: dict = {}
    for token in tokens:
        if not token:
            continue
        node = trie
        for ch in token:
            node = node.setdefault(ch, {})
        node[None] = True
    if not trie:
        return None

    def build(node: dict) -> str:
        terminal = None in node
        alts = [re.escape(ch) + build(child) for ch, child in node.items() if ch is not None]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return "(?:" + body + ")?" if terminal else body

    return re.compile(build(trie), re.DOTALL)


def token_content(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict with 'content'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    content = getattr(value, "content", None)  # a transformers / tokenizers AddedToken
    if isinstance(content, str):
        return content
    raise ValueError(f"a special token must be a string or a dict with 'content', got {value!r}")


def write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# The shared front end
# --------------------------------------------------------------------------------------


_CONFIG_KEYS = (
    "add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length",
    "bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "chat_template",
    "additional_special_tokens", "extra_special_tokens", "added_tokens_decoder",
)


class GemmaTokenizerBase:
    """Everything but the backend: special tokens, configs, padding, chat."""

    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    # ---- construction -------------------------------------------------------------

    def _init_front(
        self,
        *,
        pieces_vocab_size: int,
        piece_to_id: Mapping[str, int],
        default_special: Iterable[str],
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        bos_token: Any = "<bos>",
        eos_token: Any = "<eos>",
        pad_token: Any = "<pad>",
        unk_token: Any = "<unk>",
        mask_token: Any = None,
        additional_special_tokens: Iterable[Any] | None = None,
        extra_special_tokens: Iterable[Any] | Mapping | None = None,
        added_tokens_decoder: Mapping | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        chat_template: Any = None,
        name_or_path: str = "",
        **unused: Any,
    ) -> None:
        self.name_or_path = name_or_path
        self.init_kwargs = dict(unused)
        self._vocab_size = pieces_vocab_size
        self._piece_to_id = piece_to_id
        self.add_bos_token = True if add_bos_token is None else bool(add_bos_token)
        self.add_eos_token = False if add_eos_token is None else bool(add_eos_token)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = _VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)

        # Added tokens: id -> (content, special). Tokens already in the vocabulary keep
        # their id; new ones take the next ids, as in transformers.
        self._added: dict[int, tuple[str, bool]] = {}
        self._special_ids: frozenset[int] | None = None  # the special ones among them, once asked
        self._len = pieces_vocab_size
        self._added_ids: dict[str, int] = {}
        for key, entry in sorted((added_tokens_decoder or {}).items(), key=lambda kv: int(kv[0])):
            content = token_content(entry)
            special = bool(entry.get("special", False)) if isinstance(entry, Mapping) else bool(
                getattr(entry, "special", False)
            )
            index = int(key)
            if index < 0:
                raise ValueError(f"added_tokens_decoder: negative id {index} for {content!r}")
            self._register(content, special, index)

        self.bos_token = token_content(bos_token)
        self.eos_token = token_content(eos_token)
        self.pad_token = token_content(pad_token)
        self.unk_token = token_content(unk_token)
        if mask_token is None and "<mask>" in piece_to_id:  # transformers' Gemma default
            mask_token = "<mask>"
        self.mask_token = token_content(mask_token)
        extras: list[str] = []
        for group in (additional_special_tokens, extra_special_tokens):
            if isinstance(group, Mapping):  # transformers 5 may store {name: token}
                group = list(group.values())
            for token in group or ():
                content = token_content(token)
                if content and content not in extras:
                    extras.append(content)
        self.additional_special_tokens = extras
        for token in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token, *extras):
            if token:
                self._register(token, True, None)
        for token in default_special:
            if token in piece_to_id and token not in self._added_ids:
                self._register(token, True, None)
        self.chat_template = chat_template

    def _register(self, content: str | None, special: bool, index: int | None) -> None:
        if not content:
            return
        if index is None:
            index = self._added_ids.get(content)
            if index is None:
                index = self._piece_to_id.get(content)
            if index is None:
                index = max(len(self), self._vocab_size)
        elif content in self._added_ids and self._added_ids[content] != index:
            raise ValueError(
                f"added token {content!r} has two ids: {self._added_ids[content]} and {index}"
            )
        old = self._added.get(index)
        self._added[index] = (content, special or (old is not None and old[0] == content and old[1]))
        self._special_ids = None
        self._added_ids[content] = index
        self._len = max(self._len, index + 1)

    def _register_model_atoms(self, model: SentencePieceModel) -> None:
        """Every CONTROL / USER_DEFINED piece (and the unknown piece) is an atom, as
        transformers' conversion makes them added tokens."""
        for i, (piece, ptype) in enumerate(zip(model.pieces, model.types)):
            if ptype in (CONTROL, USER_DEFINED) and piece not in self._added_ids:
                self._register(piece, ptype == CONTROL, i)

    @staticmethod
    def _read_config(folder: str, kwargs: dict) -> dict:
        """tokenizer_config.json, then special_tokens_map.json, then chat_template.jinja;
        explicit kwargs win."""
        config: dict = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            raw = read_json_object(cfg_path, "tokenizer config")
            config.update({k: raw[k] for k in _CONFIG_KEYS if k in raw})
        stm_path = os.path.join(folder, "special_tokens_map.json")
        if os.path.isfile(stm_path):
            for key, value in read_json_object(stm_path, "special tokens map").items():
                if key in _CONFIG_KEYS and key not in config:
                    config[key] = value
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if "chat_template" not in config and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        added_path = os.path.join(folder, "added_tokens.json")
        if os.path.isfile(added_path):
            decoder = dict(config.get("added_tokens_decoder") or {})
            for content, index in read_json_object(added_path, "added tokens file").items():
                decoder.setdefault(str(int(index)), {"content": content, "special": False})
            config["added_tokens_decoder"] = decoder
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            config["chat_template"] = named.get("default") or next(iter(named.values()), None)
        config.update(kwargs)
        return config

    # ---- vocabulary -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as in transformers."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._len

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._id_to_piece(i): i for i in range(self._vocab_size)}
        vocab.update(self._added_ids)
        return vocab

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def mask_token_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        return [content for _, (content, special) in sorted(self._added.items()) if special]

    @property
    def all_special_ids(self) -> list[int]:
        return [index for index, (_, special) in sorted(self._added.items()) if special]

    @property
    def added_tokens_decoder(self) -> dict[int, dict[str, Any]]:
        return {i: {"content": c, "special": s} for i, (c, s) in sorted(self._added.items())}

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {value!r}")
        self._truncation_side = value

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) to id(s); an unknown token maps to ``unk_token_id``."""
        if isinstance(tokens, str):
            index = self._added_ids.get(tokens)
            if index is None:
                index = self._piece_to_id.get(tokens)
            if index is None:
                unk = self._added_ids.get(self.unk_token) if self.unk_token else None
                if unk is None and self.unk_token is not None:
                    unk = self._piece_to_id.get(self.unk_token)
                return unk
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        """Id(s) to token string(s); ``ValueError`` for an id outside the vocabulary."""
        if _is_int(ids):
            return self._token_of(int(ids))
        ids = self._as_id_list(ids, "convert_ids_to_tokens")
        special = self._special_id_set() if skip_special_tokens else ()
        return [self._token_of(i) for i in ids if i not in special]

    def _token_of(self, index: int) -> str:
        added = self._added.get(index)
        if added is not None:
            return added[0]
        if 0 <= index < self._vocab_size:
            return self._id_to_piece(index)
        raise ValueError(f"token id {index} is outside the vocabulary (0..{len(self) - 1})")

    def _special_id_set(self) -> frozenset[int]:
        # Kept, not rebuilt per call: decode(skip_special_tokens=True) runs once per streamed
        # token in the server, and Gemma 3's vocabulary has 6,249 special tokens.
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, (_, special) in self._added.items() if special)
        return self._special_ids

    def _as_id_list(self, ids: Any, what: str) -> list[int]:
        if _is_int(ids):
            return [int(ids)]
        if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch tensor
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise ValueError(f"{what} takes one sequence (1-D), got shape {ids.shape}; use batch_decode")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{what} takes integer ids, got dtype {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        out = []
        size = self._len
        for i in ids:
            if not _is_int(i):
                raise ValueError(f"{what} takes integer token ids, got {type(i).__name__} {i!r}")
            i = int(i)
            if i < 0 or i >= size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{size - 1})")
            out.append(i)
        return out

    # ---- encoding -------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Token strings of ``text`` (no BOS unless ``add_special_tokens``)."""
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return [self._token_of(i) for i in ids]

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ):
        """Token ids of one text: BOS (``add_bos_token``), the text, EOS (``add_eos_token``)."""
        _check_text(text)
        enc = self(
            text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
            return_tensors=return_tensors, return_attention_mask=False,
        )
        return enc["input_ids"]

    def _with_specials(self, ids: list[int], add_special_tokens: bool, limit: int | None, side: str) -> list[int]:
        prefix: list[int] = []
        suffix: list[int] = []
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                prefix = [self.bos_token_id]
            if self.add_eos_token and self.eos_token_id is not None:
                suffix = [self.eos_token_id]
        if limit is not None:
            room = max(0, limit - len(prefix) - len(suffix))
            if len(ids) > room:
                ids = ids[:room] if side == "right" else ids[len(ids) - room :]
        return prefix + ids + suffix

    def __call__(
        self,
        text: str | list[str] | tuple[str, ...],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize one text or a batch, as transformers' ``tokenizer(...)``.

        padding: False / "do_not_pad", True / "longest", or "max_length" (needs
        ``max_length``). truncation: True / "longest_first" / "only_first" cuts each
        sequence (special tokens included) to ``max_length`` on ``truncation_side``;
        ``max_length`` alone also truncates, as in transformers. return_tensors:
        None (lists), "np" or "pt" (a batch axis is added for a single text).
        """
        if kwargs:
            unsupported = sorted(kwargs)
            raise ValueError(f"unsupported argument(s) {unsupported} for a Gemma tokenizer call")
        tensor_type = _check_return_tensors(return_tensors)
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        for t in texts:
            _check_text(t)

        # Padding / truncation strategy, with transformers' rules.
        if max_length is not None:
            if not _is_int(max_length) or int(max_length) < 1:
                raise ValueError(f"max_length must be a positive int, got {max_length!r}")
            max_length = int(max_length)
            if padding is False and truncation is None:
                truncation = True
        if padding is True or padding == "longest":
            pad_mode = "longest"
        elif padding is False or padding is None or padding == "do_not_pad":
            pad_mode = None
        elif padding == "max_length":
            pad_mode = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is True or truncation in ("longest_first", "only_first"):
            truncate = True
        elif truncation is None or truncation is False or truncation == "do_not_truncate":
            truncate = False
        else:
            raise ValueError(
                f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', got {truncation!r}"
            )
        limit = max_length
        if limit is None and self.model_max_length <= _LARGE_INTEGER:
            limit = self.model_max_length
        if pad_mode == "max_length" and limit is None:
            raise ValueError("padding='max_length' needs max_length (or a finite model_max_length)")
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError("asked to pad but the tokenizer has no pad_token; set tokenizer.pad_token")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        seqs = [
            self._with_specials(self._encode_text(t), add_special_tokens, limit if truncate else None,
                                self.truncation_side)
            for t in texts
        ]
        masks = [[1] * len(s) for s in seqs]
        if pad_mode is not None:
            target = max((len(s) for s in seqs), default=0) if pad_mode == "longest" else limit
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            pad_id = self.pad_token_id
            for k, s in enumerate(seqs):
                n = target - len(s)
                if n > 0:
                    if side == "left":
                        seqs[k] = [pad_id] * n + s
                        masks[k] = [0] * n + masks[k]
                    else:
                        seqs[k] = s + [pad_id] * n
                        masks[k] = masks[k] + [0] * n

        out = BatchEncoding()
        want_mask = True if return_attention_mask is None else bool(return_attention_mask)
        if batched:
            out["input_ids"] = seqs
            if want_mask:
                out["attention_mask"] = masks
        else:
            out["input_ids"] = seqs[0] if tensor_type is None else seqs
            if want_mask:
                out["attention_mask"] = masks[0] if tensor_type is None else masks
        if tensor_type is not None:
            out.convert_to_tensors(tensor_type)
        return out

    # ---- decoding -------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Text of one sequence of ids (list, numpy array, 1-D torch tensor or an int)."""
        _ignore_decode_kwargs(kwargs)
        ids = self._as_id_list(token_ids, "decode")
        if skip_special_tokens:
            special = self._special_id_set()
            ids = [i for i in ids if i not in special]
        return self._decode_ids(ids)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """``decode`` of each row of a list of sequences or a 2-D array / tensor."""
        _ignore_decode_kwargs(kwargs)
        if hasattr(sequences, "detach") and hasattr(sequences, "cpu"):
            sequences = sequences.detach().cpu().numpy()
        if isinstance(sequences, np.ndarray) and sequences.ndim != 2:
            raise ValueError(f"batch_decode takes a 2-D array of ids, got shape {sequences.shape}")
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ---- chat -------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[Mapping[str, Any]] | list[list[Mapping[str, Any]]],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        **template_kwargs: Any,
    ):
        """Render a chat (or a batch of chats) with the tokenizer's chat template and tokenize it.

        The template is ``chat_template`` when given, else the tokenizer's own, else Gemma's
        (Gemma 3's when the vocabulary is Gemma 3's, else Gemma 1/2's); jinja2 renders it as
        transformers does (tokenizer/chat.py). Gemma's: ``<bos>``, then
        ``<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n`` per message with
        "assistant" written as "model", and ``<start_of_turn>model\\n`` when
        ``add_generation_prompt``. Roles must alternate user / model starting with user; a
        leading "system" message raises ``ValueError`` with Gemma 1/2's template and is folded
        into the first user turn with Gemma 3's.

        As transformers 5: returns the string when ``tokenize=False``, else a
        ``BatchEncoding`` (``input_ids``, ``attention_mask``), or only the ids when
        ``return_dict=False``. The rendered text is tokenized without adding another BOS.
        """
        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError("apply_chat_template needs a non-empty list of messages (dicts with 'role' and 'content')")
        batched = isinstance(conversation[0], (list, tuple))
        chats = list(conversation) if batched else [conversation]
        rendered = [self._render_chat(c, chat_template, add_generation_prompt, template_kwargs) for c in chats]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(
            rendered if batched else rendered[0],
            add_special_tokens=False,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        return out if return_dict else out["input_ids"]

    def _render_chat(self, conversation: Any, template: str | None, add_generation_prompt: bool, extra: dict) -> str:
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("each conversation must be a non-empty list of messages")
        messages = []
        for m in conversation:
            if not isinstance(m, Mapping):
                raise ValueError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
            messages.append({k: v for k, v in m.items() if v is not None})
        if template is None:
            template = self.chat_template if self.chat_template is not None else chat.default_template(self._piece_to_id)
        return chat.render(template, messages, add_generation_prompt, {**self.special_tokens_map, **extra})

    # ---- saving ---------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        decoder = {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": s}
            for i, (c, s) in sorted(self._added.items())
        }
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": list(self.additional_special_tokens),
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": self.unk_token,
        }
        if self.mask_token is not None:
            config["mask_token"] = self.mask_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def _save_configs(self, folder: str) -> list[str]:
        written = []
        config_path = os.path.join(folder, "tokenizer_config.json")
        write_atomic(config_path, (json.dumps(self._config_dict(), indent=2, ensure_ascii=False) + "\n").encode())
        written.append(config_path)
        stm_path = os.path.join(folder, "special_tokens_map.json")
        write_atomic(stm_path, (json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n").encode())
        written.append(stm_path)
        return written

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, padding_side={self.padding_side!r}, add_bos_token={self.add_bos_token}, "
            f"add_eos_token={self.add_eos_token})"
        )

    def max_chars_per_token(self) -> int | None:
        """The most characters of text that one token stands for, or None where no such bound
        holds. A token is a piece of the vocabulary (U+2581 standing for one space) or an added
        token matched whole, so the longest of them bounds it, provided that every character
        reaches the model as itself: byte fallback (an unknown character becomes its bytes;
        without it sentencepiece gives one ``<unk>`` for a whole run of them), no normalization
        that drops or merges characters, and no added token that swallows the whitespace beside
        it (``lstrip`` / ``rstrip``). Then a text of C characters is at least ceil(C / bound)
        tokens: what `gemma-cpp serve` refuses a text too long for a context by, unread."""
        if "_max_chars_per_token" not in self.__dict__:
            bound = None
            if self._characters_kept():
                longest = max(len(self._id_to_piece(i)) for i in range(self._vocab_size))
                bound = max([longest, 1] + [len(content) for content, _ in self._added.values()])
            self._max_chars_per_token = bound
        return self._max_chars_per_token

    # ---- backend hooks ----------------------------------------------------------------

    def _characters_kept(self) -> bool:  # pragma: no cover - abstract
        """Whether every character of a text reaches the model as itself (max_chars_per_token)."""
        raise NotImplementedError

    def _encode_text(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _id_to_piece(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_text(text: Any) -> None:
    if not isinstance(text, str):
        raise ValueError(
            f"text must be a str or a list of str, got {type(text).__name__}"
            + (" (token ids? pass them to decode)" if isinstance(text, (list, tuple)) else "")
        )


def _ignore_decode_kwargs(kwargs: dict) -> None:
    # Accepted for transformers compatibility; Gemma never cleans up spaces (transformers 5
    # ignores clean_up_tokenization_spaces for BPE models) nor spaces special tokens.
    unknown = set(kwargs) - {"clean_up_tokenization_spaces", "spaces_between_special_tokens"}
    if unknown:
        raise ValueError(f"unsupported decode argument(s) {sorted(unknown)}")


def read_model(vocab_file: str, kwargs: dict) -> SentencePieceModel:
    """The sentencepiece model in ``vocab_file``: a ``tokenizer.model``, or one rebuilt from a
    GGUF file's tokenizer metadata, whose settings (special tokens, add_bos_token,
    chat_template) then fill the ``kwargs`` the caller did not give."""
    if not is_gguf(vocab_file):
        with open(vocab_file, "rb") as f:
            return SentencePieceModel(f.read(), vocab_file)
    model, config = read_gguf_model(vocab_file)
    for key, value in config.items():
        kwargs.setdefault(key, value)
    return model


def resolve_path(path: str | os.PathLike, cls_name: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{cls_name}.from_pretrained: {path!r} does not exist. Pass a local folder holding tokenizer.model "
            "(and optionally tokenizer_config.json), or the path of a .model file; gemma_cpp never downloads "
            "from the Hugging Face Hub (use `huggingface-cli download` first)."
        )
    return path


"""GemmaTokenizer: Gemma's tokenizer on sentencepiece, with transformers' API and ids.

transformers treats every added token (the CONTROL and USER_DEFINED pieces of the model, the
named special tokens, and the ``added_tokens_decoder`` entries of ``tokenizer_config.json``) as
an atom matched on the raw text, leftmost and then longest first, and runs the BPE model only
on the text in between. We do the same: the text is split on those strings with one regex
compiled from their trie (base.py), and each remaining chunk goes to sentencepiece, which is
handed the model spmodel.py prepares. Decoding mirrors transformers' decoder chain (U+2581 ->
space, byte pieces joined and decoded as UTF-8 with one U+FFFD per byte of an invalid run).
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..formats.gguf import is_gguf
from .base import GemmaTokenizerBase, read_model, resolve_path, trie_regex, write_atomic
from .spmodel import SPIECE_UNDERLINE


def _processor():
    # sentencepiece is imported on first use: it keeps a sixth of `import gemma_cpp`'s memory
    # and time out of programs that never tokenize.
    import sentencepiece

    return sentencepiece.SentencePieceProcessor()


class GemmaTokenizer(GemmaTokenizerBase):
    """Gemma's tokenizer over ``sentencepiece``, with transformers' API and ids.

    >>> tok = GemmaTokenizer.from_pretrained("path/to/gemma")
    >>> enc = tok(["Hello", "Hi there"], padding=True, return_tensors="np")
    >>> tok.decode(enc.input_ids[1], skip_special_tokens=True)
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(self, vocab_file: str | os.PathLike, **kwargs: Any):
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"GemmaTokenizer: no sentencepiece model at {vocab_file!r}")
        self.vocab_file = vocab_file
        self._model = read_model(vocab_file, kwargs)
        self._sp = _processor()
        try:
            self._sp.LoadFromSerializedProto(self._model.sp_bytes)
        except RuntimeError as e:
            raise ValueError(f"{vocab_file}: sentencepiece cannot load this model ({e})") from None
        if self._sp.get_piece_size() != len(self._model.pieces):
            raise ValueError(
                f"{vocab_file}: sentencepiece reports {self._sp.get_piece_size()} pieces, the file lists "
                f"{len(self._model.pieces)}"
            )
        kwargs.setdefault("name_or_path", vocab_file)
        self._init_front(
            pieces_vocab_size=len(self._model.pieces),
            piece_to_id=self._model.id_of,
            default_special=("<start_of_turn>", "<end_of_turn>"),
            **kwargs,
        )
        self._register_model_atoms(self._model)
        self._rebuild_matcher()

    def _rebuild_matcher(self) -> None:
        self._matcher = trie_regex(self._added_ids)

    def __getstate__(self) -> dict:
        # The sentencepiece processor does not pickle; it is rebuilt from the model bytes.
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sp = _processor()
        self._sp.LoadFromSerializedProto(self._model.sp_bytes)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GemmaTokenizer":
        """Load from a folder with ``tokenizer.model`` (+ optional ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja``), from a
        ``.model`` file, or from a GGUF file (its ``tokenizer.ggml.*`` metadata rebuilt as a
        sentencepiece model; its settings are the config, files beside it are not read).
        Keyword arguments override the config (e.g. ``padding_side="right"``)."""
        path = resolve_path(pretrained_model_name_or_path, cls.__name__)
        if os.path.isdir(path):
            folder = path
            vocab_file = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(vocab_file):
                present = sorted(os.listdir(path))
                hint = (
                    " The folder has tokenizer.json: use GemmaTokenizerFast (needs `tokenizers`)."
                    if "tokenizer.json" in present else ""
                )
                ggufs = [name for name in present if name.endswith(".gguf")]
                if ggufs:
                    hint += f" To use a GGUF's tokenizer, pass the file: {os.path.join(path, ggufs[0])!r}."
                raise FileNotFoundError(
                    f"GemmaTokenizer.from_pretrained: no tokenizer.model in {path!r} (found: {present[:20]}).{hint}"
                )
        else:
            folder = os.path.dirname(path) or "."
            vocab_file = path
        if is_gguf(vocab_file):
            # A GGUF is self-contained: its metadata is the config (see base.read_model),
            # and the JSON files beside it may belong to another model.
            kwargs.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
            return cls(vocab_file, **kwargs)
        config = cls._read_config(folder, kwargs)
        config.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
        return cls(vocab_file, **config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``tokenizer.model``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained needs a folder, {folder!r} is a file")
        os.makedirs(folder, exist_ok=True)
        model_path = os.path.join(folder, "tokenizer.model")
        write_atomic(model_path, self._model.data)
        return (model_path, *self._save_configs(folder))

    # ---- backend ----------------------------------------------------------------------

    def _id_to_piece(self, index: int) -> str:
        return self._model.pieces[index]

    def _characters_kept(self) -> bool:
        # sentencepiece is always handed Gemma's identity normalizer (spmodel.py), and the
        # added tokens' lstrip / rstrip are not honoured here: byte fallback is what is left.
        return bool(self._model.byte_fallback)

    def _encode_text(self, text: str) -> list[int]:
        sp = self._sp
        if self._matcher is None:
            return sp.encode(text) if text else []
        ids: list[int] = []
        pos = 0
        added = self._added_ids
        for m in self._matcher.finditer(text):
            if m.start() > pos:
                ids.extend(sp.encode(text[pos : m.start()]))
            ids.append(added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(sp.encode(text[pos:]))
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        # transformers' decoder chain: Replace("▁", " "), ByteFallback, Fuse. A run of byte
        # pieces is decoded together; if it is not valid UTF-8, each byte becomes U+FFFD.
        out: list[str] = []
        pending = bytearray()
        pieces = self._model.pieces
        for i in ids:
            added = self._added.get(i)
            token = added[0] if added is not None else pieces[i]
            byte = _byte_value(token) if _is_byte_token(token) else None
            if byte is not None:
                pending.append(byte)
                continue
            if pending:
                out.append(_flush_bytes(pending))
                pending = bytearray()
            out.append(token.replace(SPIECE_UNDERLINE, " "))
        if pending:
            out.append(_flush_bytes(pending))
        return "".join(out)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _byte_value(token: str) -> int | None:
    m = _BYTE_TOKEN.fullmatch(token)
    return int(m.group(1), 16) if m else None


def _flush_bytes(pending: bytearray) -> str:
    try:
        return pending.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(pending)

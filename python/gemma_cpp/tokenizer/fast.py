"""GemmaTokenizerFast: Gemma's tokenizer on ``tokenizers`` (optional), same API as
GemmaTokenizer. It reads ``tokenizer.json``, or builds from ``tokenizer.model`` (or a GGUF's
vocabulary) the tokenizer transformers builds."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ..formats.gguf import is_gguf
from .base import GemmaTokenizerBase, read_model, resolve_path, token_content, write_atomic
from .spmodel import SPIECE_UNDERLINE, UNKNOWN, SentencePieceModel


def _generate_merges(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges from a vocabulary, ranked as transformers ranks them for Gemma:
    by the id of the merged piece, then by the lengths (and ids) of its two halves."""
    merges = []
    for merged, piece_id in vocab.items():
        local = []
        for k in range(1, len(merged)):
            left, right = merged[:k], merged[k:]
            if left in vocab and right in vocab:
                local.append((left, right, piece_id))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])))
    return [(left, right) for left, right, _ in merges]


def _tokenizers_from_spmodel(model: SentencePieceModel, added: Mapping[int, tuple[str, bool]]):
    """Build the ``tokenizers.Tokenizer`` transformers' GemmaTokenizer builds from a
    ``tokenizer.model``: BPE with byte fallback over the pieces, merges from the
    vocabulary, spaces as U+2581, and the added tokens matched on raw text. A Gemma 4 GGUF's
    model brings its merges (``model.merges``), used as they are, as transformers does."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    for i, piece in enumerate(model.pieces):
        vocab.setdefault(piece, i)
    unk_ids = [i for i, t in enumerate(model.types) if t == UNKNOWN]
    unk = model.pieces[unk_ids[0]] if unk_ids else "<unk>"
    tk = Tokenizer(
        BPE(vocab=vocab, merges=model.merges if model.merges is not None else _generate_merges(vocab),
            fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True)
    )
    tk.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    # transformers' choice; a no-op after the normalizer has replaced every space.
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokens = []
    for index, (content, special) in sorted(added.items()):
        if index >= len(model.pieces):
            continue  # added below, in id order
        tokens.append(AddedToken(content, special=special, normalized=False))
    tk.add_tokens(tokens)
    extra = [(i, c, s) for i, (c, s) in sorted(added.items()) if i >= len(model.pieces)]
    for expected, (index, content, special) in enumerate(extra, start=len(model.pieces)):
        if index != expected:
            raise ValueError(f"added token {content!r} has id {index}; added ids must follow the vocabulary")
        tk.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tk


def _keeps_characters(step: Any) -> bool:
    """Whether a tokenizer.json normalizer or pre-tokenizer leaves every character of a text in
    place (replacing one by one or more, or adding some, is fine; dropping or merging is not):
    what Gemma's use, and nothing else is assumed."""
    if step is None:
        return True
    kind = step.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(s) for s in step.get("normalizers", step.get("pretokenizers", [])))
    if kind == "Replace":
        pattern = step.get("pattern") or {}
        return len(pattern.get("String", "")) == 1 and len(step.get("content", "")) >= 1
    if kind == "Split":
        return str(step.get("behavior", "")).lower() != "removed"
    return kind in ("Prepend", "Metaspace")


class GemmaTokenizerFast(GemmaTokenizerBase):
    """Gemma's tokenizer over ``tokenizers`` (``tokenizer.json``), same API as GemmaTokenizer.

    Needs the optional ``tokenizers`` package. Without a ``tokenizer.json`` it builds
    the same tokenizer transformers builds from ``tokenizer.model``.
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json", "vocab_file": "tokenizer.model"}

    def __init__(
        self,
        tokenizer_file: str | os.PathLike | None = None,
        vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                "GemmaTokenizerFast needs the optional `tokenizers` package (pip install tokenizers); "
                "GemmaTokenizer works with sentencepiece alone"
            ) from e
        if tokenizer_file is None and vocab_file is None:
            raise ValueError("GemmaTokenizerFast needs tokenizer_file (tokenizer.json) or vocab_file (tokenizer.model)")
        self.vocab_file = os.fspath(vocab_file) if vocab_file is not None else None
        self.tokenizer_file = os.fspath(tokenizer_file) if tokenizer_file is not None else None
        self._model: SentencePieceModel | None = None
        if self.tokenizer_file is not None:
            if not os.path.isfile(self.tokenizer_file):
                raise FileNotFoundError(f"GemmaTokenizerFast: no tokenizer.json at {self.tokenizer_file!r}")
            try:
                self._tk = Tokenizer.from_file(self.tokenizer_file)
            except Exception as e:  # tokenizers raises a plain Exception on a bad file
                raise ValueError(f"{self.tokenizer_file}: tokenizers cannot load this file ({e})") from None
            self._tk.no_padding()
            self._tk.no_truncation()
            vocab = self._tk.get_vocab(with_added_tokens=False)
            base_size = self._tk.get_vocab_size(with_added_tokens=False)
            probe = self._tk.encode("", add_special_tokens=True).ids
            kwargs.setdefault("name_or_path", self.tokenizer_file)
        else:
            if not os.path.isfile(self.vocab_file):
                raise FileNotFoundError(f"GemmaTokenizerFast: no sentencepiece model at {self.vocab_file!r}")
            self._model = read_model(self.vocab_file, kwargs)
            vocab = self._model.id_of
            base_size = len(self._model.pieces)
            probe = None
            kwargs.setdefault("name_or_path", self.vocab_file)
        self._id_to_piece_table = [""] * base_size
        for piece, index in vocab.items():
            if 0 <= index < base_size:
                self._id_to_piece_table[index] = piece
        # A tokenizer.json's post-processor tells whether it adds BOS / EOS; the config wins.
        if probe is not None:
            inferred_bos = bool(probe) and self._id_of(vocab, kwargs.get("bos_token", "<bos>")) == probe[0]
            inferred_eos = bool(probe) and self._id_of(vocab, kwargs.get("eos_token", "<eos>")) == probe[-1]
            kwargs.setdefault("add_bos_token", inferred_bos)
            kwargs.setdefault("add_eos_token", inferred_eos)
        if self.tokenizer_file is not None:
            # tokenizer.json's added tokens, then the config's (whose flags win).
            decoder = {
                str(index): {"content": token.content, "special": token.special}
                for index, token in self._tk.get_added_tokens_decoder().items()
            }
            decoder.update({str(k): v for k, v in (kwargs.get("added_tokens_decoder") or {}).items()})
            kwargs["added_tokens_decoder"] = decoder
        self._init_front(
            pieces_vocab_size=base_size,
            piece_to_id=vocab,
            default_special=("<start_of_turn>", "<end_of_turn>"),
            **kwargs,
        )
        if self._model is not None:
            self._register_model_atoms(self._model)
            self._tk = _tokenizers_from_spmodel(self._model, self._added)
        else:
            # Tokens the config adds but tokenizer.json lacks.
            from tokenizers import AddedToken

            known = self._tk.get_vocab(with_added_tokens=True)
            for index, (content, special) in sorted(self._added.items()):
                if content not in known:
                    if index != self._tk.get_vocab_size(with_added_tokens=True):
                        raise ValueError(
                            f"added token {content!r} has id {index}, but tokenizer.json would give it "
                            f"{self._tk.get_vocab_size(with_added_tokens=True)}"
                        )
                    self._tk.add_tokens([AddedToken(content, special=special, normalized=False)])
        # Our front end pads and truncates; the backend must not.
        self._tk.no_padding()
        self._tk.no_truncation()

    @staticmethod
    def _id_of(vocab: Mapping[str, int], token: Any) -> int | None:
        content = token_content(token)
        return vocab.get(content) if content is not None else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "GemmaTokenizerFast":
        """Load from a folder with ``tokenizer.json`` (or only ``tokenizer.model``) and the
        optional configs, or from a ``.json`` / ``.model`` / GGUF file."""
        path = resolve_path(pretrained_model_name_or_path, cls.__name__)
        tokenizer_file = vocab_file = None
        if os.path.isdir(path):
            folder = path
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                tokenizer_file = os.path.join(path, "tokenizer.json")
            if os.path.isfile(os.path.join(path, "tokenizer.model")):
                vocab_file = os.path.join(path, "tokenizer.model")
            if tokenizer_file is None and vocab_file is None:
                raise FileNotFoundError(
                    f"GemmaTokenizerFast.from_pretrained: neither tokenizer.json nor tokenizer.model in {path!r} "
                    f"(found: {sorted(os.listdir(path))[:20]})"
                )
        else:
            folder = os.path.dirname(path) or "."
            if is_gguf(path):
                kwargs.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
                return cls(vocab_file=path, **kwargs)
            if path.endswith(".model"):
                vocab_file = path
            else:
                tokenizer_file = path
        config = cls._read_config(folder, kwargs)
        config.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
        return cls(tokenizer_file=tokenizer_file, vocab_file=vocab_file, **config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``tokenizer.json`` (+ ``tokenizer.model`` when known) and the configs."""
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained needs a folder, {folder!r} is a file")
        os.makedirs(folder, exist_ok=True)
        written = []
        json_path = os.path.join(folder, "tokenizer.json")
        write_atomic(json_path, self._tk.to_str(pretty=False).encode("utf-8"))
        written.append(json_path)
        if self.vocab_file is not None and os.path.isfile(self.vocab_file):
            model_path = os.path.join(folder, "tokenizer.model")
            if self._model is not None:  # the file's bytes, or the model rebuilt from a GGUF
                write_atomic(model_path, self._model.data)
            elif os.path.abspath(model_path) != os.path.abspath(self.vocab_file):
                with open(self.vocab_file, "rb") as f:
                    write_atomic(model_path, f.read())
            written.append(model_path)
        return (*written, *self._save_configs(folder))

    @property
    def backend_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def _id_to_piece(self, index: int) -> str:
        return self._id_to_piece_table[index]

    def _characters_kept(self) -> bool:
        spec = json.loads(self._tk.to_str())
        if not (spec.get("model") or {}).get("byte_fallback"):
            return False
        if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
            return False
        return _keeps_characters(spec.get("normalizer")) and _keeps_characters(spec.get("pre_tokenizer"))

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids if text else []

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=False)

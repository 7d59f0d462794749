"""Gemma 4's chat format: the default template of a tokenizer whose vocabulary is Gemma 4's renders
what google/gemma-4-E2B-it's own chat_template.jinja renders (its text, as docs/design/gemma4.md
sec. 4.3 records it, is the reference) for conversations without tools; the turn's end tokens
stop a chat reply."""
import os
import re
import types

import pytest

from gemma_cpp.generation import GenerationConfig, chat_stop_ids
from gemma_cpp.tokenizer import chat

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "design", "gemma4.md")
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}


def reference_template() -> str:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### 4.3"):]
    return re.search(r"```jinja\n(.*?)```", section, re.S).group(1)


CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], {}),
    ([{"role": "user", "content": "  padded question \n"}], {}),
    ([{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Why is the sky blue?"}], {}),
    ([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"}], {}),
    ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "and 3+3?"}], {}),
    ([{"role": "user", "content": "Q"},
      {"role": "assistant", "content": "<|channel>thought\nlet me think<channel|>The answer."},
      {"role": "user", "content": "Thanks"}], {}),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "first part"},
      {"role": "assistant", "content": "second part"}], {}),
    ([{"role": "user", "content": [{"type": "text", "text": "What is in this picture? "}, {"type": "image"},
                                   {"type": "text", "text": " and this sound"}, {"type": "audio"}]}], {}),
    ([{"role": "user", "content": "Think hard."}], {"enable_thinking": True}),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "u"}], {"enable_thinking": True}),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], {"enable_thinking": False}),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_the_default_renders_what_gemma4s_own_template_renders(case, add_generation_prompt):
    messages, extra = CONVERSATIONS[case]
    variables = {**SPECIALS, **extra}
    want = chat.render(reference_template(), messages, add_generation_prompt, variables)
    got = chat.render(chat.GEMMA4_CHAT_TEMPLATE, messages, add_generation_prompt, variables)
    assert got == want
    assert got.startswith("<bos>") and (got.endswith("<|turn>model\n") == add_generation_prompt)


def test_the_simplest_chat_by_hand_and_the_choice_of_template():
    """The simplest case, derived by hand from the format: one user turn and the model's opener."""
    assert chat.render(chat.GEMMA4_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], True, SPECIALS) == \
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    assert chat.default_template({"<|turn>": 105, "<turn|>": 106}) is chat.GEMMA4_CHAT_TEMPLATE
    assert chat.default_template({"<start_of_image>": 255999}) is chat.GEMMA3_CHAT_TEMPLATE
    assert chat.default_template({"<start_of_turn>": 106}) is chat.GEMMA_CHAT_TEMPLATE


@pytest.mark.parametrize("messages, tools", [
    ([{"role": "user", "content": "weather?"}], [{"type": "function", "function": {"name": "f"}}]),
    ([{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
      {"role": "tool", "content": "sunny"}], None),
])
def test_tools_need_the_checkpoints_own_template(messages, tools):
    variables = {**SPECIALS, "tools": tools}
    with pytest.raises(ValueError, match="Gemma 4's default one renders conversations without tools"):
        chat.render(chat.GEMMA4_CHAT_TEMPLATE, messages, True, variables)


class _Vocab:
    """What chat_stop_ids asks of a tokenizer: a piece's id (unk's for one it lacks)."""

    unk_token_id = 3

    def __init__(self, pieces):
        self.ids = {p: i for i, p in enumerate(pieces)}

    def convert_tokens_to_ids(self, piece):
        return self.ids.get(piece, self.unk_token_id)


@pytest.mark.parametrize("pieces, eos, want", [
    # Gemma 4: <turn|> and <|tool_response> beside <eos> (transformers' eos ids 1, 106, 50)
    ({50: "<|tool_response>", 105: "<|turn>", 106: "<turn|>"}, 1, [1, 106, 50]),
    # Gemma 3: <end_of_turn>
    ({105: "<start_of_turn>", 106: "<end_of_turn>"}, 1, [1, 106]),
    # already among the eos ids: not twice
    ({106: "<turn|>"}, [1, 106], [1, 106]),
    # none of them in the vocabulary
    ({}, 1, [1]),
])
def test_the_turns_end_stops_a_chat_reply(pieces, eos, want):
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"p{i}" for i in range(4, 120)]
    for i, p in pieces.items():
        vocab[i] = p
    model = types.SimpleNamespace(generation_config=GenerationConfig(eos_token_id=eos),
                                  config=types.SimpleNamespace(eos_token_id=1))
    assert chat_stop_ids(model, _Vocab(vocab)) == want

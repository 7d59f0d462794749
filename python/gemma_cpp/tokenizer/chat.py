"""Chat templates: Gemma's own (the default of a tokenizer that names none) and any other, all
rendered by jinja2 in the sandboxed environment transformers renders them in, so that a chat
gives transformers' text. Errors a template raises, and templates that fail, are ValueErrors."""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any

# Gemma 1 / Gemma 2 instruction-tuned models (google/gemma-2b-it, gemma-7b-it,
# gemma-2-*-it), verbatim from their tokenizer_config.json.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma 3 instruction-tuned models: a system turn is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


# Gemma 4: turns open with <|turn>{role} and close with <turn|>; a system (or developer) message,
# or enable_thinking (<|think|> first), makes a system turn; an earlier model turn is written
# without its thoughts (<|channel>...<channel|>); images, audio and video become their
# placeholders; an assistant message right after another continues its turn. Written for the
# tokenizers that name no template: it renders what
# google/gemma-4-E2B-it's chat_template.jinja renders for conversations without tools (the test
# compares the two on such conversations); a checkpoint's own template is used where it has one.
GEMMA4_CHAT_TEMPLATE = """{{ bos_token }}
{%- if tools or messages | selectattr('role', 'equalto', 'tool') | list
      or messages | selectattr('tool_calls', 'defined') | list -%}
    {{ raise_exception("this tokenizer has no chat template of its own, and Gemma 4's default one renders conversations without tools; pass the checkpoint's chat_template") }}
{%- endif -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set has_system = messages[0]['role'] in ['system', 'developer'] -%}
{%- if thinking or has_system -%}
    {{ '<|turn>system\n' }}
    {%- if thinking -%}{{ '<|think|>\n' }}{%- endif -%}
    {%- if has_system -%}{{ messages[0]['content'] | trim }}{%- endif -%}
    {{ '<turn|>\n' }}
{%- endif -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- for message in turns -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if not (role == 'model' and loop.index0 > 0 and turns[loop.index0 - 1]['role'] == 'assistant') -%}
        {{ '<|turn>' + role + '\n' }}
    {%- endif -%}
    {%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string
                    else (message['content'] or []) -%}
    {%- for part in parts -%}
        {%- if part['type'] == 'text' and role == 'model' -%}
            {%- set ns = namespace(text='') -%}
            {%- for piece in part['text'].split('<channel|>') -%}
                {%- set ns.text = ns.text + piece.split('<|channel>')[0] -%}
            {%- endfor -%}
            {{ ns.text | trim }}
        {%- elif part['type'] == 'text' -%}
            {{ part['text'] | trim }}
        {%- elif part['type'] in ['image', 'audio', 'video'] -%}
            {{ '<|' + part['type'] + '|>' }}
        {%- endif -%}
    {%- endfor -%}
    {{ '<turn|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|turn>model\n' }}
{%- endif -%}
"""


def default_template(vocab: Mapping[str, int]) -> str:
    """The template of a tokenizer that names none: Gemma 4's when the vocabulary is Gemma 4's
    (it has ``<|turn>``), Gemma 3's when it is Gemma 3's (``<start_of_image>``), else Gemma 1/2's."""
    if "<|turn>" in vocab:
        return GEMMA4_CHAT_TEMPLATE
    return GEMMA3_CHAT_TEMPLATE if "<start_of_image>" in vocab else GEMMA_CHAT_TEMPLATE


class TemplateRaised(Exception):
    """raise_exception() inside a template: its message becomes the ValueError's."""


def _raise_exception(message: str):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compiled(template: str):
    # jinja2 is imported on first use (a tenth of `import gemma_cpp`'s time otherwise).
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template does not compile: {e}") from None


def render(template: str, messages: list, add_generation_prompt: bool, variables: Mapping[str, Any]) -> str:
    """The text of a chat: ``messages`` (dicts with at least a string 'role'), the special
    tokens and any template variables in ``variables``."""
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"chat message {i} must be a dict with a string 'role' and a 'content', got {m!r}")
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **variables)
    except TemplateRaised as e:
        raise ValueError(str(e)) from None
    except jinja2.TemplateError as e:  # undefined names, the sandbox refusing an operation, ...
        raise ValueError(f"the chat template failed: {e}") from None

"""File helpers the leaf modules share (generation, tokenizer; config.py stays loadable on its
own): a JSON object read with errors that name the file."""
from __future__ import annotations

import json
from typing import Any, Dict


def read_json_object(path: str, what: str) -> Dict[str, Any]:
    """The JSON object in the file at path; ValueError naming the file (and `what` it should
    be, e.g. "config") when it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON {what}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} must hold a JSON object, got {type(data).__name__}")
    return data

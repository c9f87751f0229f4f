"""The one reader of JSON documents from a user's folders (classes.json, job.json, a run's or a
checkpoint's state, a pretrained model's config.json): a damaged file (truncated, not JSON,
not UTF-8, or JSON of the wrong shape) is refused in one line naming the file and what is
wrong, not a JSONDecodeError or AttributeError traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError, naming_file

_SHAPES = {dict: "a JSON object ({...})", list: "a JSON list ([...])"}


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in words: 'a list', 'a string', ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def read_json(path: str | Path, expect: type | None = dict, hint: str = "") -> Any:
    """The JSON document in `path`, of type `expect` (None: any). Damage is a UserError:
    '<path> is damaged: <what>' (plus `hint`, what to do). A missing or unreadable file is
    the OSError, naming it (the command line reports it in one line)."""
    path = Path(path)
    with naming_file(path):
        data = path.read_bytes()
    tail = f"; {hint}" if hint else ""
    if not data.strip():
        raise UserError(f"{path} is damaged: it is empty{tail}")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged: it is not UTF-8 text{tail}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is damaged: not valid JSON ({e.msg}: line {e.lineno} "
                        f"column {e.colno}){tail}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is damaged: not valid JSON ({type(e).__name__}){tail}") \
            from None
    if expect is not None and not isinstance(doc, expect):
        raise UserError(f"{path} is damaged: it holds {json_kind(doc)} where "
                        f"{_SHAPES.get(expect, expect.__name__)} belongs{tail}")
    return doc

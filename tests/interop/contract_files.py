"""The committed contract files (docs/contract/) as validators, for the interop tests."""

from __future__ import annotations

import copy
import json
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import ValidationError

import chatpipe_contract as contract

DOCS = contract.default_dir()
Json = dict[str, Any]


def committed(rel: str) -> Json:
    value: Json = json.loads((DOCS / rel).read_text(encoding="utf-8"))
    return value


def validator(name: str, strict: bool = False) -> Draft202012Validator:
    """The committed schema of message `name`; `strict`: no properties beyond the declared ones
    (catches a field chatpipe writes that the contract does not name)."""
    schema = committed(contract.BY_NAME[name].file)
    if strict:
        schema = copy.deepcopy(schema)
        for obj in [schema, *schema.get("$defs", {}).values()]:
            obj["additionalProperties"] = False
    return Draft202012Validator(schema)


def errors(name: str, value: object, strict: bool = False) -> list[str]:
    """Why `value` does not match the committed schema of `name` (empty: it does)."""
    return [e.message for e in validator(name, strict).iter_errors(value)]


def model_accepts(name: str, value: Json) -> bool:
    try:
        contract.BY_NAME[name].model.model_validate(value)
    except ValidationError:
        return False
    return True

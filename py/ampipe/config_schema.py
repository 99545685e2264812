"""The experiment config's schema, shared with TypeScript: defaults and per-field checks.

``config.schema.json`` is the zod schema of src/config/schema.ts exported as JSON Schema (by
scripts/export-schemas.ts; test/ts/config/config.test.ts fails when it is stale). Python's
config readers take their defaults and their per-field checks from it, every section
(`ModelConfig`, `TrainConfig`, `DataConfig`, and the ``run``, ``parallelism`` and ``pipeline``
sections through `resolve_section`), so there is one set of defaults. The checks that tie
fields together are code in both languages, with the same wording
(`ampipe.experiment_config.resolve_config` runs Python's), and test/ts/config/cross-language.test.ts checks that both languages resolve the
same configs identically and reject the same ones naming the same field.

Only the standard library is used here (no torch), so a config can be checked cheaply.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "SCHEMA", "SECTIONS", "defaults", "field_names", "check_fields",
           "resolve_section"]


class ConfigError(ValueError):
    """A config value that cannot work. `field` is the dotted name, e.g. ``model.hidden_size``."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


SCHEMA: dict[str, Any] = json.loads(Path(__file__).with_name("config.schema.json").read_text())
SECTIONS: tuple[str, ...] = tuple(SCHEMA["properties"])


def _props(section: str) -> dict[str, Any]:
    return SCHEMA["properties"][section]["properties"]


def field_names(section: str) -> list[str]:
    return list(_props(section))


def defaults(section: str) -> dict[str, Any]:
    """Every field of `section` at its default (a fresh copy: lists are the caller's to change)."""
    return {k: copy.deepcopy(v.get("default")) for k, v in _props(section).items()}


def _num(x: float) -> str:
    return f"{x:g}"


def _describe(s: Mapping[str, Any]) -> str:
    """What a JSON Schema (the subset zod writes) accepts, as an error message's 'must be ...'."""
    if "anyOf" in s:
        alts = [a for a in s["anyOf"] if a.get("type") != "null"]
        nullable = len(alts) < len(s["anyOf"])
        text = " or ".join(_describe(a) for a in alts)
        return text + (" or null" if nullable else "")
    if "const" in s:
        return json.dumps(s["const"])
    if "enum" in s:
        return "one of " + ", ".join(map(str, s["enum"]))
    t = s.get("type")
    lo, lo_x = s.get("minimum"), s.get("exclusiveMinimum")
    hi_x = s.get("exclusiveMaximum")
    if t == "integer":
        return "a positive integer" if lo == 1 else f"an integer >= {lo}" if lo is not None else "an integer"
    if t == "number":
        if lo is not None and hi_x is not None:
            return f"a number in [{_num(lo)}, {_num(hi_x)})"
        if lo_x is not None:
            return f"a number > {_num(lo_x)}"
        if lo is not None:
            return f"a number >= {_num(lo)}"
        return "a finite number"
    if t == "boolean":
        return "true or false"
    if t == "string":
        return f"a string matching {s['pattern']}" if "pattern" in s else "a non-empty string" if s.get("minLength") else "a string"
    if t == "array":
        return "a list" + (f" of {_describe(s['items'])}" if "items" in s else "")
    if t == "object":
        return "a mapping"
    return "valid"


def _fits(v: Any, s: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """Whether `v` fits `s`, and the value to keep (an integral float as an int, as JavaScript
    reads it). A nested object is checked field by field (its errors name the nested field)."""
    if "anyOf" in s:
        for alt in s["anyOf"]:
            ok, out = _fits(v, alt, path)
            if ok:
                return True, out
        return False, v
    if "const" in s:
        return v == s["const"] and type(v) is type(s["const"]), v
    t = s.get("type")
    if t == "null":
        return v is None, v
    if t == "boolean":
        return isinstance(v, bool), v
    if t in ("integer", "number"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False, v
        if t == "integer":
            if isinstance(v, float):
                if not v.is_integer():
                    return False, v
                v = int(v)
        ok = (("minimum" not in s or v >= s["minimum"]) and ("maximum" not in s or v <= s["maximum"])
              and ("exclusiveMinimum" not in s or v > s["exclusiveMinimum"])
              and ("exclusiveMaximum" not in s or v < s["exclusiveMaximum"]))
        return ok, v
    if t == "string":
        if not isinstance(v, str):
            return False, v
        ok = ("enum" not in s or v in s["enum"]) and len(v) >= s.get("minLength", 0) and (
            "pattern" not in s or re.search(s["pattern"], v) is not None)
        return ok, v
    if t == "array":
        if not isinstance(v, (list, tuple)) or len(v) < s.get("minItems", 0):
            return False, v
        out = []
        for i, item in enumerate(v):
            ok, item = _fits(item, s.get("items", {}), f"{path}[{i}]")
            if not ok:
                return False, v
            out.append(item)
        return True, out
    if t == "object":
        if not isinstance(v, Mapping):
            return False, v
        return True, _check_object(v, s, path, fill=False)
    return True, v


def _check_object(d: Mapping[str, Any], s: Mapping[str, Any], path: str, *, fill: bool) -> dict[str, Any]:
    props = s.get("properties", {})
    if s.get("additionalProperties") is False:
        unknown = sorted(k for k in d if k not in props)
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}", "unknown field (known: " + ", ".join(sorted(props)) + ")")
    for k in s.get("required", ()):
        if k not in d:
            raise ConfigError(f"{path}.{k}", "required field is missing")
    out = {k: copy.deepcopy(p.get("default")) for k, p in props.items() if fill and "default" in p}
    for k, v in d.items():
        out[k] = check_value(f"{path}.{k}", v, props.get(k, {}))
    return out


def check_value(path: str, value: Any, s: Mapping[str, Any]) -> Any:
    """`value` checked against its field's schema `s` (the value to keep), else a `ConfigError`
    naming `path`."""
    ok, out = _fits(value, s, path)
    if not ok:
        raise ConfigError(path, f"must be {_describe(s)}; got {value!r}")
    return out


def check_fields(section: str, values: Mapping[str, Any], prefix: str | None = None) -> dict[str, Any]:
    """Each field of `values` (a section's fields, all present) checked against the schema;
    returns them as kept (integral floats as ints). Errors name ``prefix.field``."""
    props = _props(section)
    prefix = section if prefix is None else prefix
    return {k: check_value(f"{prefix}.{k}", v, props[k]) for k, v in values.items()}


def resolve_section(config: Mapping[str, Any] | None, section: str, *, prefix: str | None = None,
                    strict: bool = True) -> dict[str, Any]:
    """Section `section` of an experiment config (a resolved one, as TypeScript hands it over,
    or a partial one): unknown fields refused (``strict``), every field checked, the missing
    ones at their defaults. Cross-field checks are not run here (`experiment_config.resolve_config`
    runs them)."""
    prefix = section if prefix is None else prefix
    raw = (config or {}).get(section) if isinstance(config, Mapping) or config is None else config
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"expected a mapping, got {type(raw).__name__}")
    s = SCHEMA["properties"][section]
    if not strict:
        raw = {k: v for k, v in raw.items() if k in s["properties"]}
    return _check_object(raw, s, prefix, fill=True)

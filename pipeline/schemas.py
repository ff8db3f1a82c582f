"""The JSON schemas in `schemas/` are the single source of truth for manifest and output columns."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@functools.cache
def load(name: str) -> dict:
    """The JSON schema `schemas/{name}.schema.json`."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


@functools.cache
def manifest_validator():
    import jsonschema

    schema = load("manifest")
    return jsonschema.Draft202012Validator(schema)


def _arrow_type(prop: dict) -> pa.DataType:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    kind = next(t for t in types if t != "null")
    if kind == "string":
        return pa.timestamp("us", tz="UTC") if prop.get("format") == "date-time" else pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "array":
        return pa.list_(_arrow_type(prop["items"]))
    raise ValueError(f"no Arrow type for JSON schema type {kind!r}")


@functools.cache
def output_arrow_schema() -> pa.Schema:
    schema = load("output")
    required = set(schema["required"])
    return pa.schema(
        [
            pa.field(name, _arrow_type(prop), nullable=name not in required)
            for name, prop in schema["properties"].items()
        ]
    )


OUTPUT_COLUMNS = tuple(load("output")["properties"])

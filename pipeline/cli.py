"""Command-line flags generated from a pydantic config: one flag per field, its description as help.

A field `num_frames` is the flag `--num-frames`. Nested models (RunConfig.generation, .storage) are
flattened: their fields are flags too, after the nested field's `prefix`. A field may set, in
`json_schema_extra={"cli": {...}}`:
    flag     its option string, where it is not the field's name (allowed_uri_prefixes: --allow-uri-prefix)
    help     text the command line adds after the description ("Repeat for several.")
    metavar  the value's name in --help
    prefix   (a nested model's field) what its fields' flags start with
Types: int, float, str: `type=`; Literal: `choices`; bool: `store_true` (default False) or
`--x/--no-x` (default True); list[T]: a repeated flag; dict[str, T]: a repeated NAME=VALUE flag.
Flags the user did not give are left out, so the config's own defaults and validators apply.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Flag:
    """One config field's flag: `path` is the field's place in the config, e.g. ("generation", "top_p")."""

    path: tuple[str, ...]
    option: str
    field: FieldInfo

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def cli(self) -> dict:
        return cli_options(self.field)

    @property
    def help(self) -> str:
        """The description, then what the command line adds; %-escaped (argparse %-formats help)."""
        return " ".join(filter(None, [self.field.description, self.cli.get("help")])).replace("%", "%%")


def cli_options(field: FieldInfo) -> dict:
    extra = field.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def flags(model: type[BaseModel], prefix: str = "", path: tuple[str, ...] = ()) -> list[Flag]:
    """Every field of `model` as a flag, nested models' fields included. In --help's order: required
    fields first, then a subclass's own fields before those it inherits (RunConfig's task and prompt
    before ModelSettings' model options), each in declaration order."""
    found = []
    for name, field in _by_declaring_class(model):
        nested = _nested_model(field.annotation)
        if nested is not None:
            found += flags(nested, prefix + cli_options(field).get("prefix", ""), (*path, name))
        else:
            found.append(Flag((*path, name), cli_options(field).get("flag") or f"--{prefix}{name.replace('_', '-')}", field))
    return sorted(found, key=lambda f: not f.field.is_required())


def _by_declaring_class(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    def depth(name: str) -> int:  # 0: declared by `model` itself, 1: by its parent, ...
        return next(i for i, cls in enumerate(model.__mro__) if name in cls.__dict__.get("__annotations__", {}))

    return sorted(model.model_fields.items(), key=lambda item: depth(item[0]))


def parser_for(model: type[BaseModel], **parser_kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `model` (see the module's docstring)."""
    p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, **parser_kwargs)
    for flag in flags(model):
        p.add_argument(flag.option, dest=flag.dest, help=flag.help, **_argument(flag))
    return p


def parse(parser: argparse.ArgumentParser, model: type[BaseModel], argv=None):
    """The config from the command line; an invalid value exits through parser.error (code 2)."""
    given = vars(parser.parse_args(argv))
    data: dict[str, Any] = {}
    for dest, value in given.items():
        *parents, leaf = dest.split(".")
        into = data
        for name in parents:
            into = into.setdefault(name, {})
        into[leaf] = dict(value) if _is_dict(_field_at(model, dest.split("."))) else value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        parser.error(_readable(e, flags(model)))


def _argument(flag: Flag) -> dict:
    field, cli = flag.field, flag.cli
    kind = _without_none(field.annotation)
    metavar = cli.get("metavar") or flag.option.lstrip("-").replace("-", "_").upper()
    extra = {"required": True} if field.is_required() else {}
    if kind is bool:
        return {**extra, "action": argparse.BooleanOptionalAction if field.default is True else "store_true"}
    if get_origin(kind) is Literal:
        return {**extra, "choices": list(get_args(kind))}
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        return {**extra, "action": "append", "type": item, "metavar": metavar}
    if get_origin(kind) is dict:
        _, value = get_args(kind)
        return {**extra, "action": "append", "type": _pair(value, metavar), "metavar": metavar}
    if kind not in (int, float, str):
        raise TypeError(f"{flag.dest}: no command-line form for {kind!r}; give the field a supported type")
    return {**extra, "type": kind, "metavar": metavar}


def _pair(value_type: type, metavar: str):
    """A NAME=VALUE argument as (name, value)."""

    def parse_pair(text: str) -> tuple[str, Any]:
        name, sep, value = text.partition("=")
        try:
            if name and sep:
                return name, value_type(value)
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {metavar} (a {value_type.__name__} value), got {text!r}")

    parse_pair.__name__ = metavar  # argparse names the type in its own messages
    return parse_pair


def _readable(error: ValidationError, known: list[Flag]) -> str:
    """pydantic's errors, each under the flag of the field it is about."""
    options = {f.path: f.option for f in known}
    lines = []
    for e in error.errors():
        loc = tuple(str(p) for p in e["loc"])
        option = next((options[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in options), None)
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{option}: {message}" if option else message)
    return "; ".join(lines)


def _without_none(annotation):
    """X for `X | None` (Optional[X]); the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _nested_model(annotation) -> type[BaseModel] | None:
    kind = _without_none(annotation)
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _field_at(model: type[BaseModel], path: list[str]) -> FieldInfo:
    field = model.model_fields[path[0]]
    return _field_at(_nested_model(field.annotation), path[1:]) if len(path) > 1 else field


def _is_dict(field: FieldInfo) -> bool:
    return get_origin(_without_none(field.annotation)) is dict

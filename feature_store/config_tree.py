"""Typed config trees and the command line generated from them.

A *tree* is a frozen dataclass whose fields are *sections*; a section is a frozen dataclass of *knobs* (plain
values: bool, int, float, str, their Optional, or a tuple of str), each declared once with :func:`knob` (default,
help, choices) and validated in the section's ``__post_init__``. One naming rule for every command:

    field ``align_epochs`` of any section  ->  flag ``--align-epochs``,  YAML ``align: {align_epochs: 6}``

so knob names are unique across a tree (tests/pipelines/test_config_tree.py checks it). Precedence when a job
resolves its config: the knobs' defaults < ``--config FILE.yaml`` < flags given on the command line.

Why a small generator and not jsonargparse / tyro: the same knobs must also be Beam ``PipelineOptions``, and Beam
builds its own ``argparse`` parser and calls ``_add_argparse_args(parser)`` on it; a library that owns the parser
cannot add flags to Beam's. This module only walks ``dataclasses.fields`` and adds standard argparse actions.

    parser = argparse.ArgumentParser()
    add_tree_arguments(parser, CascadeConfig, with_defaults=False)   # only flags actually given land in args
    add_config_file_arguments(parser)
    cfg = resolve_tree(CascadeConfig, parser.parse_args(argv))        # defaults < --config < flags
    print(to_yaml(cfg))
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

NONE_TYPE = type(None)


def knob(default: Any, help: str, *, choices: Optional[tuple] = None, aliases: tuple = (),
         metavar: Optional[str] = None, required: bool = False) -> Any:
    """A config field with its one default, help text and allowed values.

    Args:
        default: the value used when neither a config file nor a flag sets it.
        help: one line for --help (the default is appended).
        choices: allowed values (checked by the parser, and by :func:`section_from_values` for config files).
        aliases: old flag spellings still accepted; only ones a published document used (say which in the doc).
        metavar: argparse metavar.
        required: a command cannot run without a value (None): :func:`missing_required` names it (the dispatcher
            makes it a usage error; --print-config still prints the tree without it).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                                        "aliases": tuple(aliases), "metavar": metavar,
                                                        "required": required})


def flag_name(name: str) -> str:
    """The one naming rule: ``--`` + the field name with ``_`` -> ``-``."""
    return "--" + name.replace("_", "-")


def sections(tree_cls) -> list[tuple[str, type]]:
    """(section name, section class) of a tree class, in declaration order."""
    hints = typing.get_type_hints(tree_cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(tree_cls)]


def knob_fields(section_cls) -> list[tuple[dataclasses.Field, type]]:
    """(field, resolved type) of every knob of a section."""
    hints = typing.get_type_hints(section_cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(section_cls)]


def knob_names(tree_cls) -> list[str]:
    """Every knob name of a tree (flat; unique by the naming rule)."""
    return [f.name for _, sec in sections(tree_cls) for f, _ in knob_fields(sec)]


def _base_type(tp) -> tuple[type, bool]:
    """(scalar type, optional?) of a knob annotation; tuple[str, ...] gives (tuple, False)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not NONE_TYPE]
        if len(args) != 1:
            raise TypeError(f"knob type {tp}: only Optional[T] unions are supported")
        return _base_type(args[0])[0], True
    if origin is tuple:
        return tuple, False
    if tp not in (bool, int, float, str):
        raise TypeError(f"knob type {tp}: use bool, int, float, str, Optional[...] or tuple[str, ...]")
    return tp, False


def _help(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return f"{f.metadata.get('help', '')} (required)".replace("%", "%%")
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "none" if default is None or default == () else default
    return f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")


def add_section_arguments(parser: argparse.ArgumentParser, section_cls, *, title: Optional[str] = None,
                          with_defaults: bool = True, exclude: tuple = ()) -> None:
    """Add one flag per knob of ``section_cls`` (dest = the field name).

    Args:
        with_defaults: True: each flag defaults to the knob's default (Beam options, commands without config
            files). False: an absent flag leaves no attribute (argparse.SUPPRESS), so a config file's value is
            only overridden by flags actually given (:func:`resolve_tree`).
        exclude: knobs a command does not take (e.g. the on/off switch of a stage the command always runs).
    """
    group = parser.add_argument_group(title or section_cls.__name__)
    for f, tp in knob_fields(section_cls):
        if f.name in exclude:
            continue
        base, optional = _base_type(tp)
        names = [flag_name(f.name), *f.metadata.get("aliases", ())]
        kwargs: dict = {"dest": f.name, "help": _help(f)}
        if not with_defaults:
            kwargs["default"] = argparse.SUPPRESS
        elif base is tuple:
            kwargs["default"] = list(f.default)
        else:
            kwargs["default"] = f.default
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        elif base is tuple:
            kwargs.update(action="append", metavar=f.metadata.get("metavar"))
        else:
            kwargs.update(type=base, metavar=f.metadata.get("metavar"))
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(*names, **kwargs)


def add_tree_arguments(parser: argparse.ArgumentParser, tree_cls, *, with_defaults: bool = True,
                       only: Optional[tuple] = None) -> None:
    """Add the flags of every section of ``tree_cls`` (or of the sections named in ``only``)."""
    for name, sec in sections(tree_cls):
        if only is None or name in only:
            add_section_arguments(parser, sec, title=f"{name} ({tree_cls.__name__})", with_defaults=with_defaults)


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE.yaml and --print-config."""
    g = parser.add_argument_group("config file")
    g.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                   help="load the whole config (sections as in --print-config); flags given on the command line "
                        "override its values")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (a starting point for --config)")


def _coerce(value, tp, where: str):
    """A value as the knob's type: lists become tuples, paths strings, ints are accepted for floats; anything else
    of the wrong type raises."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed (expected {base.__name__})")
    if base is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(str(v) for v in value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, Path):
        return str(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {base.__name__}, got {value!r}")
    return value


def check_knob_types(section) -> None:
    """Raise ValueError naming the flag of any knob whose value is not of its declared type (for sections built in
    code; the parser and :func:`section_from_values` check the command line and config files)."""
    for f, tp in knob_fields(type(section)):
        try:
            _coerce(getattr(section, f.name), tp, flag_name(f.name))
        except ValueError as exc:
            raise ValueError(f"{type(section).__name__}: {exc}") from None


def section_from_values(section_cls, values: Mapping, *, where: str = "config", strict: bool = True):
    """A section from knob values (missing: the default). Unknown keys raise (``strict``) naming ``where``."""
    known = {f.name: (f, tp) for f, tp in knob_fields(section_cls)}
    if strict:
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
    kwargs = {}
    for name, (f, tp) in known.items():
        if name in values:
            value = _coerce(values[name], tp, f"{where}.{name}")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ValueError(f"{where}.{name}: {value!r} is not one of {list(choices)}")
            kwargs[name] = value
    return section_cls(**kwargs)


def tree_from_dict(tree_cls, nested: Mapping, *, where: str = "config"):
    """A tree from ``{section: {knob: value}}`` (missing: defaults; unknown section or knob: ValueError)."""
    if not isinstance(nested, Mapping):
        raise ValueError(f"{where}: expected a mapping of sections, got {type(nested).__name__}")
    secs = dict(sections(tree_cls))
    unknown = sorted(set(nested) - set(secs))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown} (known: {sorted(secs)})")
    return tree_cls(**{name: section_from_values(sec, nested.get(name) or {}, where=f"{where}: {name}")
                       for name, sec in secs.items()})


def to_dict(tree) -> dict:
    """``{section: {knob: value}}`` with plain JSON / YAML types (tuples as lists)."""
    out = {}
    for name, _ in sections(type(tree)):
        sec = getattr(tree, name)
        out[name] = {f.name: (list(v) if isinstance(v := getattr(sec, f.name), tuple) else v)
                     for f, _ in knob_fields(type(sec))}
    return out


def flat(tree) -> dict:
    """``{knob: value}`` over all sections (the attributes of a Beam options view)."""
    return {k: v for sec in to_dict(tree).values() for k, v in sec.items()}


def with_values(tree, values: Mapping, *, where: str = "override"):
    """The tree with some knobs (flat names) replaced; unknown names raise."""
    unknown = sorted(set(values) - set(knob_names(type(tree))))
    if unknown:
        raise ValueError(f"{where}: unknown knob(s) {unknown}")
    nested = to_dict(tree)
    for name, sec in nested.items():
        for key in sec:
            if key in values:
                sec[key] = values[key]
    return tree_from_dict(type(tree), nested, where=where)


def tree_from_flat(tree_cls, values: Mapping, *, where: str = "options"):
    """A tree from flat knob values (any other keys ignored: e.g. all of Beam's options)."""
    names = set(knob_names(tree_cls))
    return with_values(tree_cls(), {k: v for k, v in values.items() if k in names}, where=where)


def load_config_file(path) -> dict:
    """The mapping in a YAML (or JSON) config file; a clear error naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def resolve_tree(tree_cls, args: argparse.Namespace, defaults: Optional[Mapping] = None):
    """defaults (the knobs', then a command's own ``defaults`` by knob name) < ``--config`` file < flags present in
    ``args`` (parsed with ``with_defaults=False``)."""
    path = getattr(args, "config_file", None)
    base = with_values(tree_cls(), defaults or {}, where="command defaults")
    if path:
        nested = to_dict(base)
        for section, values in load_config_file(path).items():
            if not isinstance(values, Mapping):
                raise ValueError(f"--config {path}: section {section!r} must be a mapping, got {values!r}")
            nested.setdefault(section, {}).update(values)
        base = tree_from_dict(tree_cls, nested, where=f"--config {path}")
    given = {k: getattr(args, k) for k in knob_names(tree_cls) if hasattr(args, k)}  # _coerce normalises them
    return with_values(base, given, where="command line")


def missing_required(tree) -> list[str]:
    """The flags of required knobs that have no value in ``tree``."""
    return [flag_name(f.name) for name, _ in sections(type(tree)) for f, _ in knob_fields(type(getattr(tree, name)))
            if f.metadata.get("required") and getattr(getattr(tree, name), f.name) is None]


def to_yaml(tree) -> str:
    """The tree as YAML, sections in declaration order (what --print-config prints and --config reads)."""
    return yaml.safe_dump(to_dict(tree), sort_keys=False, default_flow_style=False)


def diff(a, b) -> dict:
    """``{knob: (a value, b value)}`` where two trees of one class differ."""
    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}

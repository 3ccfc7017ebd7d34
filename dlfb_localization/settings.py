"""Run settings as dataclass fields that describe their own command-line flag.

A run's configuration (`runs.RunConfig`, `nucleus.config.PredictConfig`) is a
frozen dataclass; each field made with `setting` carries its help text (and,
where the flag's name is not the field's, its flag). `add_flags` turns every
such field into one flag in one style, `--field-name`, so the command line
cannot drift from the configuration it fills.
"""

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["add_flags", "applies", "from_flags", "parse_channels", "setting"]


def parse_channels(text: str) -> tuple[int, ...]:
    """Distinct channel numbers from a flag's text, e.g. "0,1"."""
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated channel numbers like 0 or 0,1, got {text!r}"
        ) from None
    if len(set(channels)) < len(channels):
        raise argparse.ArgumentTypeError(
            f"channel(s) repeated in {text!r}: name each channel once, e.g. 0,1"
        )
    return channels


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    parse: Any = None,
    unset: str = "none",
    families: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with its command-line description.

    Args:
      default: the field's default.
      help: what the setting does (the flag's help; the default is appended).
      flag: the flag, when not `--` + the field's name with dashes. For a
        boolean that defaults to True, the flag that turns it off (e.g.
        "--no-standardize").
      choices: the allowed values.
      parse: the function that reads the flag's text (default: the type of the
        field's annotation, e.g. int or float).
      unset: how the help names a None default (e.g. "all").
      families: the model families the setting applies to (None: all); a
        configuration records it only for those (`applies`), so that a
        setting added for one family leaves the others' records unchanged.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "choices": choices,
            "parse": parse,
            "unset": unset,
            "families": families,
        },
    )


def applies(field: dataclasses.Field, family: str) -> bool:
    """Whether the setting `field` applies to the model family `family`."""
    families = field.metadata.get("families")
    return families is None or family in families


def _parser_of(field: dataclasses.Field) -> Any:
    """The type a flag's text is read as: the annotation, without None."""
    kind = field.type
    if isinstance(kind, str):  # postponed annotations are not used here
        raise TypeError(f"{field.name}: annotation {kind!r} is a string")
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        kind = kinds[0]
    return kind


def add_flags(
    parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()
) -> None:
    """One flag per field of `config_class` made with `setting` (except
    `skip`), defaulting to the field's default."""
    for field in dataclasses.fields(config_class):
        if field.name in skip or "help" not in field.metadata:
            continue
        meta, default = field.metadata, field.default
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        text = meta["help"]
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=field.name,
                action="store_false" if default else "store_true",
                help=text,
            )
            continue
        shown = meta["unset"] if default is None else default
        if isinstance(shown, tuple):
            shown = ",".join(str(v) for v in shown)
        parser.add_argument(
            flag,
            dest=field.name,
            type=meta["parse"] or _parser_of(field),
            choices=meta["choices"],
            default=default,
            help=f"{text} (default: {shown})",
        )


def from_flags(config_class: type, args: argparse.Namespace, **values: Any) -> Any:
    """`config_class` from the parsed flags named like its fields, and
    `values`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    return config_class(**{**flags, **values})

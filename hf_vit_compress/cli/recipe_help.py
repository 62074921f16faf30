"""`hf-vit-compress train --help`: every recipe field, by section, with its default and one line of help.

The help of `ModelArguments`, `DataArguments` and `TrainingArguments` is their fields' `metadata["help"]` (what
`HfArgumentParser` shows); `CompressionConfig`, `OFBConfig` and `UVCConfig` document their fields in the `Args:`
section of their docstrings, read here with `docstring_parser` (so the help cannot drift from the docs).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

MAX_HELP = 110  # characters of help per line


def _first_sentence(text: str) -> str:
    """The first sentence of `text` on one line (a '. ' outside parentheses that does not end 'e.g.' / 'i.e.'), cut
    at a word boundary past `MAX_HELP` characters."""
    text = " ".join(text.split())
    depth, end = 0, len(text)
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if (char == "." and depth <= 0 and text[index + 1: index + 2] in (" ", "")
                and not text[max(0, index - 3): index + 1].endswith(("e.g.", "i.e."))):
            end = index + 1
            break
    sentence = text[:end]
    if len(sentence) > MAX_HELP:
        sentence = sentence[:MAX_HELP].rsplit(" ", 1)[0] + " ..."
    return sentence


def _format_default(field: dataclasses.Field) -> str:
    """The default as it would be written on the command line (YAML scalars: null, true, 0.001)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return _yaml_scalar(value)


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml_scalar(item)}" for key, item in value.items()) + "}"
    return str(getattr(value, "value", value))  # enums (TrainingArguments) by their value


def docstring_arguments(cls) -> dict[str, str]:
    """Field name -> description from the `Args:` section of `cls`'s docstring (an entry naming several fields,
    `lambda_start, lambda_end: ...`, documents each)."""
    import docstring_parser

    described = {}
    for param in docstring_parser.parse(cls.__doc__ or "").params:
        for name in param.arg_name.split(","):
            described[name.strip()] = param.description or ""
    return described


def nested_sections(cls) -> dict[str, type]:
    """Fields of dataclass `cls` that are dataclasses themselves (CompressionConfig's `ofb`, `uvc`, ...)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints.get(field.name))}


def _lines(prefix: str, cls, describe) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or dataclasses.is_dataclass(hints.get(field.name)):  # nested sections: listed below
            continue
        help_text = _first_sentence(describe(field)) or "(no help)"
        lines.append(f"  --{prefix}.{field.name} (default: {_format_default(field)}): {help_text}")
    return lines


def recipe_help() -> str:
    """Every field a recipe (and `--section.key`) can set: the model, data, compression (with the nested
    `compression.ofb.*` / `compression.uvc.*`) and training sections, one line each with the class default."""
    from transformers import TrainingArguments

    from ..config import CompressionConfig
    from .recipes import DataArguments, ModelArguments

    def metadata_help(field):
        return field.metadata.get("help", "")

    sections = [
        ("model", ModelArguments, metadata_help, "which model to compress"),
        ("data", DataArguments, metadata_help, "which images to train and evaluate on"),
        ("compression", CompressionConfig, None, "budget and method"),
    ]
    compression_docs = docstring_arguments(CompressionConfig)
    for name, cls in nested_sections(CompressionConfig).items():  # ofb, uvc, ... with their own Args: docs
        what = re.sub(r"\s*\(`\w+`\)", "", _first_sentence(compression_docs.get(name, ""))).rstrip(".")
        sections.append((f"compression.{name}", cls, None, what))
    sections.append(("training", TrainingArguments, metadata_help,
                     "transformers.TrainingArguments; a bare --name works too, e.g. --max_steps 5"))
    lines = ["fields (the defaults below are the classes'; a recipe sets many of them):"]
    for prefix, cls, describe, what in sections:
        if describe is None:
            documented = docstring_arguments(cls)
            describe = lambda field, documented=documented: documented.get(field.name, "")  # noqa: E731
        lines.append(f"{prefix} ({cls.__name__}: {what}):")
        lines += _lines(prefix, cls, describe)
    return "\n".join(lines)


__all__ = ["docstring_arguments", "nested_sections", "recipe_help"]

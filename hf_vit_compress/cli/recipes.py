"""Recipes: one YAML file per published setting (shipped in hf_vit_compress/recipes/), validated, overridable from
the command line, and run end to end (`run_recipe`, what `hf-vit-compress train` calls).

A recipe has up to five top-level keys:

    description: free text
    model:        ModelArguments fields   (which checkpoint, teacher, attention implementation, ...)
    data:         DataArguments fields    (dataset id or local files, streaming, columns, example count, ...)
    compression:  CompressionConfig fields, nested (`ofb:` / `uvc:` hold OFBConfig / UVCConfig fields)
    training:     transformers.TrainingArguments fields, exactly as on a Trainer command line

Unknown keys are errors that name the key and list the allowed ones. Overrides (`--section.key VALUE`, see
`parse_overrides`) are applied on top; model/data/training values then go through
`transformers.HfArgumentParser` (the same parsing and checks as any HF training script) and the compression section
through `CompressionConfig` (validated, errors name the field and the allowed values).

In YAML, `1e-3` is a float here (YAML 1.1 would read it as a string); `null` means "the default" for
TrainingArguments fields and None for model/data/compression fields.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from ..config import CompressionConfig

SECTIONS = ("description", "model", "data", "compression", "training")
#: the recipes shipped as package data (`--recipe deit_small_ofb` finds hf_vit_compress/recipes/deit_small_ofb.yaml)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------------------------------------------------------
# Argument dataclasses (HfArgumentParser turns their fields into --flags)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which model to compress (and distil from)."""

    model_name_or_path: str = field(
        metadata={"help": "Hub id (e.g. facebook/deit-small-patch16-224) or local folder of a ViT/DeiT classifier"}
    )
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "optional teacher classifier (UVC distils from a frozen dense copy without it)"}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model and the teacher"})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa (default), eager, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom modeling code from the Hub"})
    cache_dir: str | None = field(default=None, metadata={"help": "where downloaded models are cached"})


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str = field(
        metadata={"help": "Hub dataset id (e.g. ILSVRC/imagenet-1k), local dataset folder, or a builder name "
                          "(parquet, arrow, imagefolder) together with train_files/eval_files"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "dataset configuration name"})
    train_files: list[str] | None = field(default=None, metadata={"help": "local or remote training files (globs ok)"})
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "evaluation files; with train_files and no eval_files there is no evaluation"}
    )
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str | None = field(default="validation", metadata={"help": "evaluation split; null: no evaluation"})
    streaming: bool = field(default=False, metadata={"help": "read the data lazily (datasets IterableDataset)"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    label_column: str = field(default="label", metadata={"help": "column holding integer class indices"})
    num_train_examples: int | None = field(
        default=None,
        metadata={"help": "training examples per epoch of a stream of unknown size (used to turn epochs into steps "
                          "and for per-epoch schedules: OFB eliminates candidates 3 times per epoch); when the size is "
                          "known (map-style data, local parquet files, Hub metadata) that is used, with a warning if "
                          "this disagrees"},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "examples in the stream's shuffle buffer"})
    shuffle_buffer_input_shards: int | None = field(
        default=None,
        metadata={"help": "parquet shards read at once into the stream's shuffle buffer (datasets' default: several, "
                          "in threads; 1 reads one at a time, without the few-second pause at the end of a pass)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "evaluate on the first N examples only (a quick smoke run: 64)"}
    )
    eval_metrics: list[str] | None = field(
        default=None,
        metadata={"help": "further `evaluate` metrics (a local module path, or a Hub name when online) computed on "
                          "the arg-max class, besides top-1 and top-5 accuracy"},
    )
    image_size: int | None = field(default=None, metadata={"help": "input size; default: the model's image_size"})
    random_crop_min_scale: float = field(default=0.08, metadata={"help": "smallest random-resized-crop area"})
    hflip_prob: float = field(default=0.5, metadata={"help": "probability of a horizontal flip in training"})
    skip_undecodable_images: bool = field(
        default=False,
        metadata={"help": "skip (and count in the report) images that cannot be decoded, instead of stopping with "
                          "an error naming the row and file"},
    )


#: the dataclass behind each section that HfArgumentParser parses
def _argument_classes():
    from transformers import TrainingArguments

    return {"model": ModelArguments, "data": DataArguments, "training": TrainingArguments}


# ---------------------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` / `5E4` as floats (YAML 1.2), not strings (YAML 1.1), and rejects a key given
    twice in one mapping (PyYAML silently keeps the last: `method: ofb` ... `method: uvc` ran UVC)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first given at line "
                    f"{first_line[key]}): give each key once", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A command-line value read like a YAML scalar: `0.4` -> float, `5` -> int, `true` -> bool, `null` -> None,
    `[0.25, 0.5]` -> list, anything else -> the string itself."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown(key: str, allowed, where: str) -> ValueError:
    allowed = sorted(allowed)
    return ValueError(f"unknown recipe key '{key}'{_suggest(key.rsplit('.', 1)[-1], allowed)}; allowed in {where}: "
                      f"{allowed}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str) -> Any:
    """`value` checked against (and, for numbers given as strings or ints, converted to) the type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError:
                pass
        raise ValueError(f"recipe key '{key}': expected {_type_name(hint)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [parse_value(part.strip()) for part in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"recipe key '{key}': expected a list ({_type_name(hint)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"recipe key '{key}': expected {len(args)} values ({_type_name(hint)}), got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        converted = [_coerce(v, item, key) for v in value]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"recipe key '{key}': expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"recipe key '{key}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"recipe key '{key}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"recipe key '{key}': expected a string, got {value!r}")
    return value


def _validate_dataclass_section(values: Any, cls, prefix: str, typed: bool) -> dict:
    """Keys of `values` must be init fields of `cls` (nested dataclasses recurse). With `typed`, values are checked
    and converted against the field types (the compression section; the others are typed by HfArgumentParser)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe section '{prefix}' must be a mapping of keys to values, got {values!r}")
    allowed = {f.name for f in fields(cls) if f.init}
    hints = typing.get_type_hints(cls) if typed else {}
    checked = {}
    for key, value in values.items():
        if key not in allowed:
            where = f"'{prefix}' ({cls.__module__}.{cls.__name__})"
            if len(allowed) > 40:  # TrainingArguments: too many to list on one line
                raise ValueError(f"unknown recipe key '{prefix}.{key}'{_suggest(key, allowed)}: not a field of "
                                 f"{cls.__module__}.{cls.__name__}")
            raise _unknown(f"{prefix}.{key}", allowed, where)
        hint = hints.get(key)
        if typed and is_dataclass(hint):
            checked[key] = _validate_dataclass_section(value, hint, f"{prefix}.{key}", typed)
        elif typed:
            checked[key] = _coerce(value, hint, f"{prefix}.{key}")
        else:
            checked[key] = value
    return checked


def validate_recipe(recipe: Any, source: str = "recipe") -> dict:
    """Check a recipe's structure (a dict as read from YAML); returns it with compression values typed.

    Raises:
        ValueError: naming the offending key and the allowed ones.
    """
    if not isinstance(recipe, dict):
        raise ValueError(
            f"{source}: a recipe is a YAML mapping with keys {list(SECTIONS)}, got {type(recipe).__name__}"
        )
    for key in recipe:
        if key not in SECTIONS:
            raise ValueError(f"{source}: unknown recipe key '{key}'{_suggest(str(key), SECTIONS)}; allowed top-level "
                             f"keys: {list(SECTIONS)}")
    classes = _argument_classes()
    checked: dict[str, Any] = {}
    if "description" in recipe:
        checked["description"] = str(recipe["description"])
    for section in ("model", "data", "training"):
        checked[section] = _validate_dataclass_section(recipe.get(section), classes[section], section, typed=False)
    checked["compression"] = _validate_dataclass_section(recipe.get("compression"), CompressionConfig, "compression",
                                                         typed=True)
    return checked


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of one shipped in hf_vit_compress/recipes/ (`deit_small_ofb`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ValueError(f"recipe {str(name_or_path)!r} not found: give a YAML file or one of {available}")


def load_recipe(name_or_path: str | Path) -> dict:
    """Read and validate a recipe YAML file (or the name of a shipped recipe)."""
    path = resolve_recipe_path(name_or_path)
    try:
        recipe = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return validate_recipe(recipe or {}, str(path))
    except ValueError as error:
        raise ValueError(f"recipe {path}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------------
def parse_overrides(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """`--key value`, `--key=value`, `--key v1 v2` (lists), `--flag` (true) -> [(key, [raw values])].

    Keys are `section.field` (`compression.ofb.arch_lr`: nested) or a bare field name of ModelArguments,
    DataArguments, TrainingArguments or CompressionConfig (`--max_steps 5`). Dashes in names read as underscores.
    """
    overrides: list[tuple[str, list[str]]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}: overrides look like --section.key VALUE "
                             "(e.g. --compression.target_flops 0.4 or --training.max_steps 5)")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        values: list[str] = [inline] if inline else []
        index += 1
        if not inline:
            while index < len(tokens) and not tokens[index].startswith("--"):
                values.append(tokens[index])
                index += 1
        overrides.append((key, values))
    return overrides


def _locate(key: str) -> tuple[str, str]:
    """(section, dotted field path inside it) for an override key."""
    classes = _argument_classes()
    head, _, rest = key.partition(".")
    if rest:
        if head not in ("model", "data", "training", "compression"):
            raise ValueError(f"unknown option --{key}: the part before the first dot must be one of "
                             "['model', 'data', 'training', 'compression']")
        return head, rest
    owners = [section for section, cls in classes.items() if key in {f.name for f in fields(cls) if f.init}]
    if key in {f.name for f in fields(CompressionConfig)}:
        owners.append("compression")
    if not owners:
        everything = {f.name for cls in classes.values() for f in fields(cls)} | {f.name for f in
                                                                                 fields(CompressionConfig)}
        raise ValueError(f"unknown option --{key}{_suggest(key, everything)}: use --section.field with section in "
                         "[model, data, training, compression] (e.g. --compression.target_flops 0.4), or a field "
                         "name of ModelArguments, DataArguments, TrainingArguments or CompressionConfig")
    return owners[0], key


def apply_overrides(recipe: dict, overrides: list[tuple[str, list[str]]]) -> dict:
    """A copy of a validated recipe with command-line overrides applied (and validated again).

    model/data/training values stay raw strings (HfArgumentParser types them, like any HF command line); compression
    values are read as YAML scalars and checked against CompressionConfig's field types.
    """
    result = copy.deepcopy(recipe)
    for key, values in overrides:
        section, path = _locate(key)
        if section == "compression":
            value = parse_value(values[0]) if len(values) == 1 else [parse_value(v) for v in values]
            if not values:
                value = True
            node = result.setdefault("compression", {})
            parts = path.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--{key}: compression.{part} is not a section")
            node[parts[-1]] = value
        else:
            if "." in path:
                raise ValueError(f"unknown option --{key}: only the compression section is nested")
            result.setdefault(section, {})[path] = _RawValue(values)
    return validate_recipe(result, "overrides")  # unknown keys, compression types


class _RawValue(list):
    """Tokens from the command line, passed to HfArgumentParser untouched."""


# ---------------------------------------------------------------------------------------------------------------
# Recipe -> argument objects
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainSetup:
    """Everything `run_recipe` needs: parsed and validated."""

    model: ModelArguments
    data: DataArguments
    training: Any  # transformers.TrainingArguments
    compression: CompressionConfig
    recipe: dict  # the merged recipe (for the report)


def _raise_instead_of_exit(message: str):
    raise ValueError(message)


def _argv(section_values: dict, actions: dict, section: str) -> tuple[list[str], list[str]]:
    """argv tokens for HfArgumentParser from one section, and the fields explicitly set to null."""
    argv, nulls = [], []
    for key, value in section_values.items():
        flag = f"--{key}"
        if key not in actions:
            raise ValueError(f"unknown recipe key '{section}.{key}'")
        action = actions[key]
        if isinstance(value, _RawValue):
            if len(value) == 1 and value[0].lower() in ("null", "none") and section != "training":
                nulls.append(key)
                continue
            argv += [flag, *value]
        elif value is None:
            nulls.append(key)
        elif isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            if action.nargs not in ("+", "*"):
                raise ValueError(f"recipe key '{section}.{key}' takes one value, got the list {value}")
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv, nulls


def build_setup(recipe: dict) -> TrainSetup:
    """Parse a validated (and overridden) recipe into ModelArguments, DataArguments, TrainingArguments (through
    `transformers.HfArgumentParser`) and a `CompressionConfig`."""
    from transformers import HfArgumentParser

    classes = _argument_classes()
    parser = HfArgumentParser((classes["model"], classes["data"], classes["training"]))
    parser.error = _raise_instead_of_exit  # one clear line instead of argparse's usage dump + exit(2)
    actions = {action.dest: action for action in parser._actions}
    argv, nulls = [], {}
    for section in ("model", "data", "training"):
        section_argv, section_nulls = _argv(recipe.get(section, {}), actions, section)
        argv += section_argv
        nulls[section] = section_nulls
    for section, what in (("model", "model.model_name_or_path"), ("data", "data.dataset_name")):
        required = what.split(".")[1]
        if required not in recipe.get(section, {}):
            raise ValueError(f"the recipe must set {what}")
    compression = CompressionConfig.from_dict(recipe.get("compression", {}))  # first: its errors are the clearest
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    for section, obj in (("model", model_args), ("data", data_args)):
        for key in nulls[section]:
            setattr(obj, key, None)  # an explicit null: None (argparse would have kept the default)
    _check_data_args(data_args)
    return TrainSetup(model_args, data_args, training_args, compression, recipe)


def _check_data_args(data: DataArguments) -> None:
    def check(condition, name, allowed):
        if not condition:
            raise ValueError(f"DataArguments.{name}={getattr(data, name)!r} is invalid: allowed {allowed}")

    check(data.num_train_examples is None or data.num_train_examples >= 1, "num_train_examples", "null or >= 1")
    check(data.shuffle_buffer_size >= 1, "shuffle_buffer_size", ">= 1")
    check(data.shuffle_buffer_input_shards is None or data.shuffle_buffer_input_shards >= 1,
          "shuffle_buffer_input_shards", "null or >= 1")
    check(data.max_train_samples is None or data.max_train_samples >= 1, "max_train_samples", "null or >= 1")
    check(data.max_eval_samples is None or data.max_eval_samples >= 1, "max_eval_samples", "null or >= 1")
    check(data.image_size is None or data.image_size >= 1, "image_size", "null or >= 1")
    check(0 < data.random_crop_min_scale <= 1, "random_crop_min_scale", "(0, 1]")
    check(0 <= data.hflip_prob <= 1, "hflip_prob", "[0, 1]")


def setup_from_args(recipe: str | Path, extra: list[str] | None = None) -> TrainSetup:
    """`--recipe FILE` + override tokens -> `TrainSetup` (what `hf-vit-compress train` does before training)."""
    merged = apply_overrides(load_recipe(recipe), parse_overrides(list(extra or [])))
    return build_setup(merged)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "TrainSetup",
    "apply_overrides",
    "build_setup",
    "load_recipe",
    "parse_overrides",
    "setup_from_args",
    "validate_recipe",
]

"""Check a compressed-model folder before it is uploaded or loaded: only known files, only the package's code.

A model folder is something people download from strangers and upload from shared machines. Loading one with
`trust_remote_code=True` runs its `configuration_compressed_vit.py` and `modeling_compressed_vit.py`, and whatever
`config.json`'s `auto_map` names; uploading one sends every file in it. `verify_compressed_folder(folder)` allows:

- **names**: an allow-list of regular files (the model, its config and processor, the sidecars, the card, ONNX
  under `onnx/`); the save's own `.hf_vit_compress/` folder is never uploaded. Symbolic links, other folders,
  hidden files and unknown names are refused, or with `skip_unknown=True` left out with a warning naming them;
- **content**: no pickle-capable file anywhere (judged by bytes, not only by suffix: pickle opcodes, zip archives
  holding `.pkl` members as torch saves, NumPy `.npy`), safetensors weights whose header parses, JSON that parses;
- **code**: the two modeling files byte-identical to this package's own, `auto_map` naming exactly their classes,
  no `auto_map` in the image processor's config;
- **shapes**: `config.json` builds a `CompressedViTConfig` (which validates every width), the weights hold
  exactly the tensors that config's model has, shape for shape, and `architecture.json` agrees with the config.

Every problem found is reported at once, in one line naming each file and the rule it breaks.

Written by hand: `huggingface_hub` uploads whatever a folder holds, and transformers checks neither the code nor
the weights' names against an allow-list before it runs or loads them.
"""

from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

CONTROL_DIR = ".hf_vit_compress"  # the save's bookkeeping (saving.CONTROL_DIR): kept local, never uploaded
MODELING_FILES = ("configuration_compressed_vit.py", "modeling_compressed_vit.py")
EXPECTED_AUTO_MAP = {
    "AutoConfig": "configuration_compressed_vit.CompressedViTConfig",
    "AutoModelForImageClassification": "modeling_compressed_vit.CompressedViTForImageClassification",
}
JSON_FILES = ("config.json", "preprocessor_config.json", "architecture.json", "compression_config.json",
              "compression_report.json", "model.safetensors.index.json")
_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
#: files under `onnx/` (what `export_onnx` writes: the graph and, for large models, its external weights)
ONNX_FILES = ("model.onnx", "model.onnx.data")
KNOWN_FOLDERS = ("onnx",)
#: suffixes of formats that unpickle when loaded (refused whatever their bytes look like)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill", ".npy", ".npz")
_HEAD_BYTES = 16
_OLD_PICKLE_STARTS = (b"(dp", b"(lp", b"(i", b"(c", b"}q", b"]q", b"ccopy_reg", b"c__builtin__", b"cbuiltins")


class UnsafeFolderError(ValueError):
    """A folder that must not be uploaded or loaded; the message (one line) names every file and the rule it breaks.

    Args:
        folder: the folder checked.
        problems: one entry per problem, each naming its file.
        verdict: how the message begins after the folder's name.
    """

    def __init__(self, folder: Path, problems: list[str], verdict: str = "failed verification"):
        self.folder, self.problems = folder, list(problems)
        super().__init__(f"{folder} {verdict}: " + "; ".join(self.problems))


@dataclass
class FolderCheck:
    """What `verify_compressed_folder` found.

    Args:
        folder: the folder checked.
        files: the allow-listed regular files (paths relative to `folder`, `/`-separated): what may be uploaded.
        left_out: what `skip_unknown=True` left out, each with the reason.
    """

    folder: Path
    files: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def is_allowed_name(relative: str) -> bool:
    """True for the file names a compressed-model folder may hold (`onnx/model.onnx` style for ONNX)."""
    parts = relative.split("/")
    if len(parts) == 2:
        return parts[0] == "onnx" and parts[1] in ONNX_FILES
    name = parts[0]
    return (name in JSON_FILES or name in MODELING_FILES or name == "README.md" or bool(_WEIGHTS.match(name)))


# ---------------------------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------------------------
def pickle_capable(path: Path) -> bool:
    """True when loading `path` with its usual reader may unpickle: by suffix, or by content (pickle protocol 2+
    header, a zip archive with `.pkl` members as `torch.save` writes, NumPy's format, protocol 0/1 opcodes)."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head.startswith(b"\x93NUMPY"):
        return True
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") or "/data/" in name for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return True  # a zip no reader can list is not worth the risk
    # protocols 0/1 have no header: these are how their pickles of dicts, lists, instances and globals begin
    return head.startswith(_OLD_PICKLE_STARTS)


def _read_json(path: Path, name: str, problems: list[str]):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{name}: not UTF-8 text (allowed: JSON)")
        return None
    except json.JSONDecodeError as error:
        problems.append(f"{name}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{name}: a JSON {type(value).__name__}, allowed: a JSON object")
        return None
    return value


def _safetensors_shapes(path: Path, name: str, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:  # reads and checks the header only
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: either way not a weights file
        problems.append(f"{name}: not a readable safetensors file ({type(error).__name__}: {error})")
        return None


def package_modeling_file(name: str) -> bytes:
    """The bytes of this package's own modeling file `name` (what `save_pretrained` copies into a folder)."""
    from .. import modeling

    return (Path(modeling.__file__).resolve().parent / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# The walk: which entries exist, and which are regular, allow-listed files
# ---------------------------------------------------------------------------------------------------------------
def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files as relative names, refusals of links / folders / hidden / special entries). Never follows a
    link: entries are examined with lstat."""
    files, refused = [], []
    for entry in sorted(os.scandir(folder), key=lambda item: item.name):
        if entry.name == CONTROL_DIR and entry.is_dir(follow_symlinks=False):
            continue
        refused_or_files = _classify(entry, entry.name, folder)
        if isinstance(refused_or_files, str):
            refused.append(refused_or_files)
        else:
            files.extend(refused_or_files)
    return files, refused


def _classify(entry: os.DirEntry, relative: str, folder: Path) -> str | list[str]:
    mode = entry.stat(follow_symlinks=False).st_mode
    if stat.S_ISLNK(mode):
        return f"{relative}: a symbolic link (allowed: regular files; links are never followed)"
    if entry.name.startswith("."):
        return f"{relative}: a hidden entry (allowed: the files a compressed model folder holds)"
    if stat.S_ISDIR(mode):
        if "/" in relative or entry.name not in KNOWN_FOLDERS:
            return f"{relative}/: a folder (allowed: {', '.join(f'{name}/' for name in KNOWN_FOLDERS)} only)"
        nested = []
        for child in sorted(os.scandir(entry.path), key=lambda item: item.name):
            result = _classify(child, f"{relative}/{child.name}", folder)
            if isinstance(result, str):
                return result
            nested.extend(result)
        return nested
    if not stat.S_ISREG(mode):
        return f"{relative}: not a regular file (allowed: regular files)"
    return [relative]


# ---------------------------------------------------------------------------------------------------------------
# The model: config, weights, architecture
# ---------------------------------------------------------------------------------------------------------------
def _check_config(config: dict, problems: list[str]):
    """The `CompressedViTConfig` that config.json builds, or None (problems recorded)."""
    from ..modeling import CompressedViTConfig

    if config.get("model_type") != "compressed_vit":
        problems.append(f"config.json: model_type {config.get('model_type')!r}, allowed 'compressed_vit' (this is "
                        "not a compressed model)")
        return None
    if config.get("auto_map") != EXPECTED_AUTO_MAP:
        problems.append(f"config.json: auto_map {config.get('auto_map')!r}, allowed exactly {EXPECTED_AUTO_MAP} (the "
                        "package's own classes)")
    layers = config.get("layers")
    if "num_hidden_layers" in config and isinstance(layers, list) and config["num_hidden_layers"] != len(layers):
        problems.append(f"config.json: num_hidden_layers {config['num_hidden_layers']!r} but {len(layers)} layers")
    for key in ("image_size", "patch_size", "num_channels"):
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(item, int) and item > 0 for item in values):
            problems.append(f"config.json: {key} {value!r}, allowed positive integers")
    try:
        built = CompressedViTConfig.from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except Exception as error:  # noqa: BLE001 - the config's own validation: its message names the field
        problems.append(f"config.json: does not build a CompressedViTConfig ({error})")
        return None
    if len(built.id2label) != built.num_labels:
        problems.append(f"config.json: {len(built.id2label)} id2label entries for num_labels {built.num_labels}")
    return built


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model of `config` saves, without allocating it (meta device)."""
    import torch

    from ..modeling import CompressedViTForImageClassification

    with torch.device("meta"):
        model = CompressedViTForImageClassification(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _weight_shapes(folder: Path, files: list[str], problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    shards = [name for name in files if _WEIGHTS.match(name)]
    if not shards:
        problems.append("no model.safetensors (allowed: safetensors weights only)")
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in shards:
        found = _safetensors_shapes(folder / name, name, problems)
        if found is None:
            return None
        shapes.update(found)
    if "model.safetensors.index.json" in files:
        index = _read_json(folder / "model.safetensors.index.json", "model.safetensors.index.json", problems) or {}
        named = set((index.get("weight_map") or {}).values())
        if not named <= set(shards):
            problems.append(f"model.safetensors.index.json: names shards {sorted(named - set(shards))} that are not "
                            "in the folder")
    return shapes


def _compare_shapes(expected: dict, found: dict, problems: list[str]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    for label, names in (("missing tensors", missing), ("tensors the config's model does not have", extra)):
        if names:
            problems.append(f"model.safetensors: {label} {names[:5]}{' ...' if len(names) > 5 else ''}")
    if wrong:
        details = ", ".join(f"{name} {found[name]} (config: {expected[name]})" for name in wrong[:5])
        problems.append(f"model.safetensors: shapes that do not match config.json: {details}")


def _check_architecture(architecture: dict, config, problems: list[str]) -> None:
    """architecture.json's kept units must be distinct indices whose counts are the config's widths."""
    def fail(message: str) -> None:
        problems.append(f"architecture.json: {message}")

    hidden, layers = architecture.get("hidden_channels"), architecture.get("layers")
    if not _distinct_indices(hidden) or not isinstance(layers, list):
        return fail("allowed an object with hidden_channels (distinct indices >= 0) and layers (a list)")
    if len(hidden) != config.hidden_size:
        return fail(f"{len(hidden)} hidden_channels, config.json hidden_size {config.hidden_size}")
    kept = [layer for layer in layers if isinstance(layer, dict) and layer.get("keep_block", True)]
    # every entry an object; the kept ones (removed blocks are entries with keep_block false) are the config's
    if len(kept) != len(config.layers) or len(layers) != sum(isinstance(layer, dict) for layer in layers):
        return fail(f"{len(kept)} kept blocks (of {len(layers)} entries), config.json has {len(config.layers)} layers")
    for index, (layer, shape) in enumerate(zip(kept, config.layers)):
        widths = _layer_widths(layer)
        if widths is None:
            fail(f"kept block {index}: heads, qk_channels, v_channels and mlp_neurons must be distinct indices >= 0, "
                 "one channel list per head, equal lengths; pad_head_dims, if present, true or false")
        elif widths != tuple(shape[key] for key in ("num_heads", "qk_head_dim", "v_head_dim", "intermediate_size")):
            fail(f"kept block {index}: widths {widths} (heads, qk, v, mlp), config.json layer {index} {shape}")


def _distinct_indices(values) -> bool:
    return (isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                             for v in values) and len(set(values)) == len(values))


def _layer_widths(layer: dict) -> tuple[int, int, int, int] | None:
    heads, mlp = layer.get("heads"), layer.get("mlp_neurons")
    qk, v = layer.get("qk_channels"), layer.get("v_channels")
    if not (_distinct_indices(heads) and _distinct_indices(mlp) and isinstance(qk, list) and isinstance(v, list)):
        return None
    if len(qk) != len(heads) or len(v) != len(heads) or not all(map(_distinct_indices, qk + v)):
        return None
    qk_dims, v_dims = {len(c) for c in qk}, {len(c) for c in v}
    if len(qk_dims) > 1 or len(v_dims) > 1:
        return None
    if not heads:
        return (0, 0, 0, len(mlp))
    pad = layer.get("pad_head_dims", False)
    if not isinstance(pad, bool):
        return None
    qk_dim, v_dim = qk_dims.pop(), v_dims.pop()
    if pad:  # exported zero-padded to the wider head dim (`LayerArchitecture.pad_head_dims`)
        qk_dim = v_dim = max(qk_dim, v_dim)
    return (len(heads), qk_dim, v_dim, len(mlp))


# ---------------------------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------------------------
def verify_compressed_folder(folder: str | os.PathLike, *, skip_unknown: bool = False,
                             required: tuple[str, ...] = ("config.json", *MODELING_FILES)) -> FolderCheck:
    """Check that `folder` holds a compressed model and nothing that could run code or leak a file (see the module
    docstring for the rules).

    Args:
        folder: a folder written by `CompressionTrainer.save_model` / `hf-vit-compress train`, or downloaded.
        skip_unknown: leave out links, hidden entries, other folders and unknown names (a warning names them)
            instead of refusing the folder. Pickle-capable files and bad content are refused either way.
        required: names that must be present (publishing asks for the processor, sidecars and card too).

    Returns:
        A `FolderCheck` whose `files` are the allow-listed files (what may be uploaded).

    Raises:
        UnsafeFolderError: one line naming every offending file and the rule.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UnsafeFolderError(folder, ["not a folder (allowed: a saved compressed model folder)"])
    present, refused = _walk(folder)
    pickles = [name for name in present if pickle_capable(folder / name)]
    unknown = [f"{name}: not a file a compressed model holds (allowed: {_allowed_summary()})"
               for name in present if not is_allowed_name(name) and name not in pickles]
    problems = [f"{', '.join(pickles)}: pickle-capable (loading may run code; allowed: safetensors)"] if pickles else []
    check = FolderCheck(folder, files=[name for name in present if is_allowed_name(name) and name not in pickles])
    if skip_unknown:
        check.left_out = refused + unknown
        for line in check.left_out:
            logger.warning(f"{folder}: left out {line}")
    else:
        problems += refused + unknown
    missing = [name for name in required if name not in check.files]
    if missing:
        problems.append(f"missing {missing} (CompressionTrainer.save_model and hf-vit-compress train write them; an "
                        "image processor comes from processing_class=...)")
    problems += _content_problems(folder, check.files)
    if problems:
        raise UnsafeFolderError(folder, problems)
    return check


def _content_problems(folder: Path, files: list[str]) -> list[str]:
    problems: list[str] = []
    for name in MODELING_FILES:
        if name in files and (folder / name).read_bytes() != package_modeling_file(name):
            problems.append(f"{name}: differs from hf_vit_compress's own (allowed: byte-identical; re-save the "
                            "model with this package)")
    parsed = {name: _read_json(folder / name, name, problems) for name in JSON_FILES if name in files}
    processor = parsed.get("preprocessor_config.json")
    if processor is not None and "auto_map" in processor:
        problems.append("preprocessor_config.json: auto_map (allowed: none: the processor is transformers' own)")
    if "README.md" in files:
        text = (folder / "README.md").read_bytes()
        if b"\x00" in text or not _is_utf8(text):
            problems.append("README.md: not UTF-8 text")
    config = _check_config(parsed["config.json"], problems) if parsed.get("config.json") is not None else None
    shapes = _weight_shapes(folder, files, problems)
    if shapes is not None and any(name.startswith("compression.") for name in shapes):
        problems.append("model.safetensors: holds the gated dense model's compression.* tensors (allowed: the "
                        "exported compressed model)")
    if config is not None and shapes is not None:
        _compare_shapes(_expected_shapes(config), shapes, problems)
    if config is not None and parsed.get("architecture.json") is not None:
        _check_architecture(parsed["architecture.json"], config, problems)
    return problems


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _allowed_summary() -> str:
    return ", ".join([*JSON_FILES, *MODELING_FILES, "model[-NNNNN-of-NNNNN].safetensors", "README.md",
                      *(f"onnx/{name}" for name in ONNX_FILES)])


def load_compressed_model(name_or_path: str | os.PathLike, *, revision: str | None = None,
                          token: str | bool | None = None, **kwargs):
    """Load a compressed model with this package's own classes after `verify_compressed_folder` (no code from the
    folder runs: `trust_remote_code` is not needed).

    Args:
        name_or_path: a local folder, or a Hub repo id (downloaded with `huggingface_hub.snapshot_download`).
        revision, token: for the download.
        **kwargs: passed to `CompressedViTForImageClassification.from_pretrained` (e.g. `dtype`).
    """
    from ..modeling import CompressedViTForImageClassification

    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(name_or_path), revision=revision, token=token))
    verify_compressed_folder(folder)
    return CompressedViTForImageClassification.from_pretrained(folder, **kwargs)


__all__ = ["FolderCheck", "UnsafeFolderError", "is_allowed_name", "load_compressed_model", "pickle_capable",
           "verify_compressed_folder"]

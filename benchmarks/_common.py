"""Helpers shared by the benchmark scripts (speed.py, quality.py, overhead.py).

Nothing here is part of the library: it builds the dense models the benchmarks use, derives architectures
reproducibly, prunes with Torch-Pruning for comparison, and writes results (JSON + Markdown) with the command, the
date and the machine inside.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from hf_vit_compress import Architecture, LayerArchitecture  # noqa: E402
from hf_vit_compress.surgery.flops import geometry, macs_from_widths  # noqa: E402
from hf_vit_compress.surgery.targets import model_parts  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Machine / provenance
# ---------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU model, cores, threads, library versions, GPU (if any) and the load average when the run started."""
    import transformers

    import hf_vit_compress

    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_vit_compress": hf_vit_compress.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch_pruning

        info["torch_pruning"] = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        info["torch_pruning"] = None
    return info


def provenance(argv: list[str] | None = None) -> dict:
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), REPO) if argv else "?"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": " ".join(["python", shlex.quote(script), *map(shlex.quote, argv[1:])]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # a copy of the tree without .git (the GPU machine) gets the commit from the environment (gpu.sh)
        "git_commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("BENCH_GIT_COMMIT"),
        "git_dirty": bool(status) if status else None,
        "machine": machine_info(),
    }


def markdown_header(title: str, prov: dict, extra: list[str] | None = None) -> str:
    m = prov["machine"]
    lines = [
        f"# {title}",
        "",
        f"- command: `{prov['command']}`",
        f"- date: {prov['date']} (git {prov['git_commit']}{' + local changes' if prov['git_dirty'] else ''})",
        f"- machine: {m['cpu']}, {m['cores_available']} cores available ({m['torch_threads']} torch threads), "
        f"load average at start {m['load_average_at_start']}; GPU: {m['gpu'] or 'none'}",
        f"- versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"torch-pruning {m['torch_pruning']}, hf_vit_compress {m['hf_vit_compress']}",
    ]
    lines += [f"- {line}" for line in (extra or [])]
    return "\n".join(lines) + "\n"


#: an indented JSON list holding only scalars (a newline cannot occur inside a JSON string, and the list may hold
#: no bracket or brace, so the match never spans more than one flat list)
_FLAT_LIST = re.compile(r"\[\n\s+([^\[\]{}\n]*(?:\n\s+[^\[\]{}\n]*)*)\n\s*\]")


def write_json(path: Path, data: dict, flat_lists: bool = False) -> None:
    """Indented JSON, written atomically. `flat_lists` puts every list of scalars on one line (long series such
    as search traces stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    if flat_lists:
        text = _FLAT_LIST.sub(lambda m: "[" + " ".join(line.strip() for line in m.group(1).split("\n")) + "]", text)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


#: CIFAR-10's per-channel mean and std (the training images), for quality.py and train_dense.py
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_parquet(data_dir: str | Path):
    """The CIFAR-10 parquet shards in `data_dir` (train-*.parquet, test-*.parquet) as a `datasets.DatasetDict`."""
    from datasets import load_dataset

    data_dir = Path(data_dir)
    files = {"train": sorted(map(str, data_dir.glob("train-*.parquet"))),
             "test": sorted(map(str, data_dir.glob("test-*.parquet")))}
    if not files["train"] or not files["test"]:
        raise SystemExit(f"--data-dir {data_dir}: no train-*.parquet / test-*.parquet shards found")
    return load_dataset("parquet", data_files=files)


def median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_figure(figure, path: Path) -> None:
    """Lay out, write (110 dpi, like the library's report plots) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------
# CPU memory: the kernel's counters (tracemalloc does not see torch's allocations)
# ---------------------------------------------------------------------------------------------------------------


def rss_bytes() -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident since start or the last `reset_peak_rss`), in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0]) * 1024
    return values


def reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0); raises OSError where /proc/self/clear_refs is missing."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

#: DeiT-T/S/B shapes at 224 px, patch 16, 1000 labels (what speed.py measures)
DEIT_SHAPES = {
    "deit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "deit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "deit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def dense_vit(shape: dict, seed: int = 0, image_size: int = 224, patch_size: int = 16, num_labels: int = 1000,
              attn: str = "sdpa", **overrides):
    """A randomly initialised (seeded) `ViTForImageClassification` in eval mode."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **shape, image_size=image_size, patch_size=patch_size, num_labels=num_labels,
        id2label={i: str(i) for i in range(num_labels)}, label2id={str(i): i for i in range(num_labels)},
        attn_implementation=attn, **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    return model.eval()


def set_attention(model, attn: str):
    model.set_attn_implementation(attn)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------


def ofb_architecture(model, target_flops: float, seed: int = 0, channel_multiple: int | None = None) -> Architecture:
    """The architecture OFB's own budget projection picks from a deterministic random search state.

    `build_method(model, CompressionConfig(method="ofb", target_flops=x))` builds OFB's search space on the dense
    model (importance logits drawn from `torch.manual_seed(seed)`); every module's architecture logits alpha are then
    drawn from N(0, 1) with a `torch.Generator` seeded with `seed`, and `decide()` takes each module's most probable
    candidate and projects the whole onto the budget (greedy shrink, then grow to just under it). The result is a
    heterogeneous per-layer architecture of the kind a search ends with, built from OFB's candidate widths (multiples
    of 8 for dimensions >= 64), reproducibly and without training. `channel_multiple` overrides the library's
    `OFBConfig.channel_multiple` (1: unrounded candidate widths).
    """
    method = _seeded_method(model, "ofb", target_flops, seed, channel_multiple)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in method.searchable_modules().values():
            module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))
    return _without_scales(method.decide())


def uvc_architecture(model, target_flops: float, seed: int = 0, channel_multiple: int | None = None,
                     search_state: str = "random") -> Architecture:
    """The architecture UVC's final projection picks from a deterministic search state, the UVC counterpart of
    `ofb_architecture`.

    `search_state="random"` (default): a generator seeded with `seed` draws, per block, the removal counts of heads,
    value dims and MLP units uniformly in [0, (1 - target_flops) * their range] and adds N(0, 1) noise to the skip-gate
    logits theta (initial (-1, 1): a block is skipped when the noise flips it, about 8% of blocks); `decide()` then
    takes the hard architecture of those counts (units ranked by weight magnitude) and projects it onto the budget
    (remove the least damage per MAC saved, then round widths to `channel_multiple`). `"initial"`: the counts at 0
    and every block running, so the projection alone picks the units from the random weights' norms (what earlier
    results files used). `channel_multiple` overrides `UVCConfig.channel_multiple` (library default 8)."""
    method = _seeded_method(model, "uvc", target_flops, seed, channel_multiple)
    if search_state == "random":
        randomize_uvc_state(method, target_flops, seed)
    elif search_state != "initial":
        raise ValueError(f"search_state must be 'random' or 'initial', got {search_state!r}")
    return _without_scales(method.decide())


def randomize_uvc_state(method, target_flops: float, seed: int) -> None:
    """Draw UVC's search variables (removal counts, skip-gate logits) from a generator seeded with `seed` (see
    `uvc_architecture`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind in ("head", "vdim", "mlp"):
            counts, upper = getattr(method, f"{kind}_counts"), getattr(method, f"{kind}_count_max")
            fractions = torch.rand(counts.shape, generator=generator) * (1.0 - target_flops)
            counts.copy_((fractions.to(upper.device) * upper).to(counts.dtype))
        method.theta.add_(torch.randn(method.theta.shape, generator=generator).to(method.theta.device))


def _seeded_method(model, name: str, target_flops: float, seed: int, channel_multiple: int | None):
    """`build_method` for `name` with its random initial state drawn from `torch.manual_seed(seed)` (the caller's
    RNG state is left as it was); `channel_multiple` overrides the method config's."""
    from hf_vit_compress import CompressionConfig
    from hf_vit_compress.methods import build_method

    config = CompressionConfig(method=name, target_flops=target_flops)
    if channel_multiple is not None:
        getattr(config, name).channel_multiple = channel_multiple
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_method(model, config)


def _without_scales(architecture: Architecture) -> Architecture:
    # Scales only change weight values (folded into the producing layer); shapes and speed are unaffected. Dropping
    # them keeps the exported weights the plain random ones.
    for layer in architecture.layers:
        layer.qk_scale = layer.v_scale = layer.mlp_scale = None
    architecture.hidden_scale = None
    return architecture


def _linear_norms(linear, dim: int) -> torch.Tensor:
    return linear.weight.detach().abs().sum(dim=dim)


def uniform_architecture(model, target_flops: float, multiple: int = 8) -> Architecture:
    """Uniform width scaling: every block keeps the same number of heads and the same MLP width, the residual width
    and all blocks are kept; the fraction of heads is `round(target * H)` (at least 1) and the MLP width is then the
    largest multiple of `multiple` (or any width when the MLP is narrower than 8 * multiple) that keeps the model
    within `target_flops` of the dense MACs. Within a block, heads are ranked by the L1 norm of their q/k/v/o
    weights and MLP neurons by the L1 norm of their fc1 row + fc2 column (magnitude), so the kept units are the
    same ones Torch-Pruning's magnitude criterion would rank first."""
    parts = model_parts(model)
    geo = geometry(model)
    heads = max(1, min(geo.num_heads, round(target_flops * geo.num_heads)))
    step = multiple if geo.intermediate_size >= 8 * multiple else 1
    target = target_flops * macs_from_widths(
        geo, geo.hidden_size, [geo.num_heads * geo.head_dim] * geo.num_layers,
        [geo.num_heads * geo.head_dim] * geo.num_layers, [geo.intermediate_size] * geo.num_layers)
    def total(heads, mlp):
        width = heads * geo.head_dim
        return macs_from_widths(geo, geo.hidden_size, [width] * geo.num_layers, [width] * geo.num_layers,
                                [mlp] * geo.num_layers)

    mlp = None
    while heads >= 1:  # the MLP width that fills the budget; fewer heads only if even the narrowest MLP cannot
        mlp = geo.intermediate_size - (geo.intermediate_size % step)
        while mlp > step and total(heads, mlp) > target:
            mlp -= step
        if total(heads, mlp) <= target:
            break
        heads -= 1
    if heads < 1:
        raise ValueError(f"uniform width scaling cannot reach {target_flops} of the dense MACs")
    layers = []
    for block in parts.blocks:
        head_norm = sum(
            _linear_norms(lin, 1).view(geo.num_heads, geo.head_dim).sum(1) for lin in (block.q_proj, block.k_proj,
                                                                                      block.v_proj)
        ) + _linear_norms(block.o_proj, 0).view(geo.num_heads, geo.head_dim).sum(1)
        kept_heads = sorted(torch.argsort(head_norm, descending=True, stable=True)[:heads].tolist())
        neuron_norm = _linear_norms(block.fc1, 1) + _linear_norms(block.fc2, 0)
        kept = sorted(torch.argsort(neuron_norm, descending=True, stable=True)[:mlp].tolist())
        channels = list(range(geo.head_dim))
        layers.append(LayerArchitecture(heads=kept_heads, qk_channels=[channels] * heads,
                                        v_channels=[channels] * heads, mlp_neurons=kept))
    return Architecture(layers=layers, hidden_channels=list(range(geo.hidden_size)),
                        metadata={"method": "uniform", "heads": heads, "intermediate_size": mlp})


def shapes_of(model) -> dict:
    """Per-block shapes of a dense/TP-pruned HF ViT or of a compressed model: hidden, heads, qk/v widths, MLP."""
    if getattr(model.config, "model_type", None) == "compressed_vit":
        return {
            "hidden_size": model.config.hidden_size,
            "layers": [
                {"heads": layer["num_heads"], "qk": layer["num_heads"] * layer["qk_head_dim"],
                 "v": layer["num_heads"] * layer["v_head_dim"], "mlp": layer["intermediate_size"]}
                for layer in model.config.layers
            ],
        }
    parts = model_parts(model)
    return {
        "hidden_size": parts.patch_projection.out_channels,
        "layers": [
            {"heads": int(getattr(b.attention, "num_attention_heads", 0)), "qk": b.q_proj.out_features,
             "v": b.v_proj.out_features, "mlp": b.fc1.out_features}
            for b in parts.blocks
        ],
    }


def shape_macs(dense_model, shapes: dict) -> int:
    """Exact MACs (same counting as `hf_vit_compress.count_macs`) of the model with these per-block shapes."""
    geo = geometry(dense_model)
    layers = shapes["layers"]
    return int(macs_from_widths(geo, shapes["hidden_size"], [layer["qk"] for layer in layers],
                                [layer["v"] for layer in layers], [layer["mlp"] for layer in layers]))


def shapes_summary(shapes: dict) -> str:
    """Compact one-line description: D=<hidden>; per block heads x qk/v width, MLP."""
    layers = shapes["layers"]

    def one(layer):
        return f"{layer['heads']}h/{layer['qk']}/{layer['v']}/{layer['mlp']}"

    return f"D={shapes['hidden_size']}; " + " ".join(one(layer) for layer in layers)


# ---------------------------------------------------------------------------------------------------------------
# Torch-Pruning
# ---------------------------------------------------------------------------------------------------------------


def _tp_kept(initial: int, ratio: float) -> int:
    # MetaPruner (local, uniform): keeps int(initial * (1 - ratio)) channels of every group.
    return int(initial * (1 - ratio))


def tp_predicted_shapes(dense_model, ratio: float) -> dict:
    geo = geometry(dense_model)
    hidden = _tp_kept(geo.hidden_size, ratio)
    head_dim = _tp_kept(geo.head_dim, ratio)
    mlp = _tp_kept(geo.intermediate_size, ratio)
    width = geo.num_heads * head_dim
    return {"hidden_size": hidden,
            "layers": [{"heads": geo.num_heads, "qk": width, "v": width, "mlp": mlp}] * geo.num_layers}


def example_image(model) -> torch.Tensor:
    """One random image on the model's device and in its dtype (what Torch-Pruning traces the model with)."""
    weight = model_parts(model).patch_projection.weight
    config = model.config
    return torch.randn(1, config.num_channels, config.image_size, config.image_size, device=weight.device,
                       dtype=weight.dtype)


def tp_prune(model, ratio: float, importance: str = "magnitude", example_inputs: torch.Tensor | None = None,
             gradient_batches=None):
    """Prune a HF `ViTForImageClassification` IN PLACE with Torch-Pruning's MetaPruner, the way its HF ViT example
    does: uniform (local) ratio in every layer, heads kept and head dims pruned (num_heads mapping on q/k/v),
    residual width pruned too, classifier outputs ignored. `importance`: "magnitude" (L1) or "taylor" (needs
    `gradient_batches`: an iterable of (pixel_values, labels) whose loss gradients are accumulated first)."""
    import warnings

    import torch_pruning as tp

    parts = model_parts(model)
    device = parts.patch_projection.weight.device
    example_inputs = example_image(model) if example_inputs is None else example_inputs.to(device)
    num_heads = {}
    for block in parts.blocks:
        for linear in (block.q_proj, block.k_proj, block.v_proj):
            num_heads[linear] = block.attention.num_attention_heads
    if importance == "magnitude":
        criterion = tp.importance.MagnitudeImportance(p=1)
    elif importance == "taylor":
        criterion = tp.importance.TaylorImportance()
    else:
        raise ValueError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters detected" (cls token, positions): pruned on dim -1
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=criterion, pruning_ratio=ratio,
            ignored_layers=list(parts.heads.values()), output_transform=lambda out: out.logits.sum(),
            num_heads=num_heads, prune_head_dims=True, prune_num_heads=False,
        )
        if importance == "taylor":
            model.zero_grad()
            was_training = model.training
            model.eval()
            for pixel_values, labels in gradient_batches:  # batches come from a CPU DataLoader
                logits = model(pixel_values=pixel_values.to(device)).logits
                torch.nn.functional.cross_entropy(logits, labels.to(device)).backward()
            model.train(was_training)
        pruner.step()
        model.zero_grad(set_to_none=True)
    for block in parts.blocks:  # transformers' ViT views q/k/v as (..., -1, head_dim): tell it the new head dim
        attention = block.attention
        attention.num_attention_heads = pruner.num_heads[block.q_proj]
        attention.head_dim = block.q_proj.out_features // attention.num_attention_heads
        # attention.scaling stays the dense head_dim ** -0.5, as in the compressed format
    return model


def tp_ratio_for(dense_model, target_flops: float) -> tuple[float, dict]:
    """The smallest uniform pruning ratio whose (predicted) MACs are within the budget, by bisection on the ratio."""
    from hf_vit_compress.surgery.flops import dense_macs

    target = target_flops * dense_macs(dense_model)
    low, high = 0.0, 0.99
    for _ in range(60):
        mid = (low + high) / 2
        if shape_macs(dense_model, tp_predicted_shapes(dense_model, mid)) <= target:
            high = mid
        else:
            low = mid
    return high, tp_predicted_shapes(dense_model, high)


def tp_pruned_to_budget(dense_model, target_flops: float, importance: str = "magnitude", make_copy=None,
                        gradient_batches=None, max_tries: int = 5):
    """Torch-Pruning at the same MACs as ours: pick the ratio whose MACs are just within `target_flops` (predicted
    from TP's rounding, then checked on the really pruned model); if the pruned model is over budget, raise the ratio
    by a small step and prune a fresh copy again (up to `max_tries`). Returns (model, ratio, tries)."""
    import copy

    from hf_vit_compress.surgery.flops import dense_macs

    target = target_flops * dense_macs(dense_model)
    ratio, _ = tp_ratio_for(dense_model, target_flops)
    for attempt in range(1, max_tries + 1):
        model = make_copy() if make_copy is not None else copy.deepcopy(dense_model)
        batches = gradient_batches() if callable(gradient_batches) else gradient_batches
        tp_prune(model, ratio, importance=importance, gradient_batches=batches)
        if shape_macs(dense_model, shapes_of(model)) <= target:
            return model, ratio, attempt
        ratio = min(0.99, ratio + 0.005)
    raise RuntimeError(f"Torch-Pruning could not reach {target_flops} of the dense MACs in {max_tries} tries")


# ---------------------------------------------------------------------------------------------------------------
# Experimental export variant (benchmark-side only; see benchmarks/results/archive/speed_fusion.md)
# ---------------------------------------------------------------------------------------------------------------


from hf_vit_compress.modeling import modeling_compressed_vit as _modeling  # noqa: E402


class FusedQKVAttention(_modeling.CompressedViTAttention):
    """`CompressedViTAttention` with q, k and v in ONE Linear (`qkv_proj`, rows [q; k; v]): one GEMM per block
    instead of three. Same function; the separate projections are deleted, so no weight is held twice."""

    def forward(self, hidden_states, **kwargs):
        if self.num_heads == 0:
            return torch.zeros_like(hidden_states) + self.o_proj.bias
        batch_size, seq_length, _ = hidden_states.shape
        qk_width = self.num_heads * self.qk_head_dim
        query, key, value = self.qkv_proj(hidden_states).split(
            [qk_width, qk_width, self.num_heads * self.v_head_dim], dim=-1)
        query = query.view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)
        key = key.view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)
        value = value.view(batch_size, seq_length, self.num_heads, -1).transpose(1, 2)
        attention_interface = _modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation or "eager", _modeling.eager_attention_forward)
        attn_output, _ = attention_interface(self, query, key, value, None, dropout=0.0, scaling=self.scaling,
                                             **kwargs)
        return self.o_proj(attn_output.reshape(batch_size, seq_length, -1))


@torch.no_grad()
def fuse_qkv(compressed):
    """Turn every attention of a `CompressedViTForImageClassification` into a `FusedQKVAttention` (in place)."""
    from torch import nn

    for layer in compressed.vit.layers:
        attention = layer.attention
        if attention.num_heads == 0:
            continue
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        qkv = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections),
                        bias=projections[0].bias is not None)
        qkv.weight.copy_(torch.cat([p.weight for p in projections]))
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([p.bias for p in projections]))
        del attention.q_proj, attention.k_proj, attention.v_proj
        attention.qkv_proj = qkv
        attention.__class__ = FusedQKVAttention
    return compressed

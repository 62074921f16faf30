"""How well a latency table (hf_vit_compress.surgery.latency) predicts blocks and models it never measured.

    python benchmarks/latency_table.py                        # DeiT-T and DeiT-S shapes, 224 px, batch 1 and 64
    python benchmarks/latency_table.py --batches 1 --quick    # smoke run (DeiT-T only, few repeats)

For every (shape, batch): build the table (`build_latency_table`, 3 widths per axis, median of --repeats calls) and
report how long it took; then draw --heldout random block shapes that are not grid points (random residual width,
heads, q/k and v head dims, MLP width within the dense ones) and --models random whole compressed models (every
block its own random shape), time each the way the table does (this package's own modeling code, median of
--repeats calls after a warm-up) and compare with the table's prediction. The relative error |predicted - measured|
/ measured is summarised as median and max per kind. CPU, float32, sdpa, --threads torch threads (default 1).
Timings are noisy on a shared machine: run it on an idle one and read the medians.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from transformers import DeiTConfig  # noqa: E402

from hf_vit_compress.modeling import CompressedViTForImageClassification  # noqa: E402
from hf_vit_compress.surgery.latency import (  # noqa: E402
    LatencyGrid,
    _AttentionPart,
    _layer,
    _MLPPart,
    _part_config,
    build_latency_table,
    time_call,
)

SHAPES = {
    "deit-tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "deit-small": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
}


def dense_config(shape: str) -> DeiTConfig:
    return DeiTConfig(**SHAPES[shape], num_hidden_layers=12, image_size=224, patch_size=16, num_labels=1000)


def random_layer(config, rng: random.Random, scaling: float) -> dict:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    return _layer(rng.randint(1, heads), rng.randint(max(1, head_dim // 8), head_dim),
                  rng.randint(max(1, head_dim // 8), head_dim),
                  rng.randint(max(1, config.intermediate_size // 16), config.intermediate_size), scaling)


def relative_errors(pairs: list[tuple[float, float]]) -> list[float]:
    return [abs(predicted - measured) / measured for predicted, measured in pairs]


def measure_cell(shape: str, batch: int, args, rng: random.Random) -> dict:
    config = dense_config(shape)
    scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
    began = time.perf_counter()
    table = build_latency_table(config, batch, grid=LatencyGrid.for_model(config, args.points),
                                warmup=args.warmup, repeats=args.repeats, progress=False)
    build_seconds = time.perf_counter() - began
    C.log(f"{shape} batch {batch}: table of {len(table.grid.hidden)} widths built in {build_seconds:.1f} s")
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    blocks, mlps, models = [], [], []
    for _ in range(args.heldout):
        hidden = rng.randint(config.hidden_size // 4, config.hidden_size)
        layer = random_layer(config, rng, scaling)
        part = _part_config(config, hidden, [], "sdpa")
        tokens = torch.randn(batch, table.key.tokens, hidden, generator=generator)
        attention = _AttentionPart(part, layer).eval()
        mlp = _MLPPart(part, layer).eval()
        blocks.append((table.predict_attention(hidden, layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"]),
                       time_call(lambda: attention(tokens), cpu, args.warmup, args.repeats)))
        mlps.append((table.predict_mlp(hidden, layer["intermediate_size"]),
                     time_call(lambda: mlp(tokens), cpu, args.warmup, args.repeats)))
    for _ in range(args.models):
        hidden = rng.randint(config.hidden_size // 2, config.hidden_size)
        layers = [random_layer(config, rng, scaling) for _ in range(config.num_hidden_layers)]
        compressed_config = _part_config(config, hidden, layers, "sdpa")
        model = CompressedViTForImageClassification(compressed_config).eval()
        pixels = torch.randn(batch, 3, 224, 224, generator=generator)
        models.append((table.predict_config(compressed_config),
                       time_call(lambda: model(pixels), cpu, args.warmup, args.repeats)))
    summary = {}
    for kind, pairs in (("attention", blocks), ("mlp", mlps), ("model", models)):
        errors = relative_errors(pairs)
        summary[kind] = {"median_error": C.median(errors) if errors else None,
                         "max_error": max(errors) if errors else None,
                         "pairs_ms": [[round(p, 4), round(m, 4)] for p, m in pairs]}
    return {"shape": shape, "batch": batch, "build_seconds": round(build_seconds, 1), "cells": _cells(table),
            "grid": table.grid.__dict__, **summary}


def _cells(table) -> int:
    g = table.grid
    return len(g.hidden) * (1 + len(g.heads) * len(g.qk_head_dims) * len(g.v_head_dims) + len(g.mlp))


def markdown(results: dict) -> str:
    header = C.markdown_header("Latency tables: prediction error on shapes they never measured", results["provenance"],
                               [f"settings: {results['settings']}"])
    rows = []
    for cell in results["cells"]:
        def pct(kind: str, key: str) -> str:
            value = cell[kind][key]
            return "-" if value is None else f"{100 * value:.1f}%"

        rows.append([cell["shape"], cell["batch"], cell["cells"], cell["build_seconds"],
                     pct("attention", "median_error"), pct("attention", "max_error"), pct("mlp", "median_error"),
                     pct("mlp", "max_error"), pct("model", "median_error"), pct("model", "max_error")])
    table = C.md_table(["shape", "batch", "cells", "build s", "attention median err", "attention max err",
                        "MLP median err", "MLP max err", "model median err", "model max err"], rows)
    return header + "\n" + table + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="deit-tiny,deit-small")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--heldout", type=int, default=12, help="random held-out block shapes per cell")
    parser.add_argument("--models", type=int, default=4, help="random whole compressed models per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="DeiT-T only, 2 repeats, 3 held-out shapes, 1 model")
    parser.add_argument("--name", default=None, help="results stem (default latency_table, latency_table_quick)")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.warmup, args.heldout, args.models = "deit-tiny", 2, 1, 3, 1
    torch.set_num_threads(args.threads)
    name = args.name or ("latency_table_quick" if args.quick else "latency_table")
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    rng = random.Random(args.seed)
    cells = [measure_cell(shape, int(batch), args, rng) for shape in args.shapes.split(",")
             for batch in args.batches.split(",")]
    settings = {key: getattr(args, key) for key in ("points", "repeats", "warmup", "heldout", "models", "threads",
                                                    "seed")}
    results = {"provenance": prov, "settings": settings, "cells": cells}
    output = Path(args.output_dir)
    C.write_json(output / f"{name}.json", results, flat_lists=True)
    (output / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

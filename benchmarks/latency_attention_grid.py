"""Where a latency table's attention error comes from: the head-dim axes or the residual width.

    python benchmarks/latency_attention_grid.py                       # DeiT-T shape, 224 px, CPU fp32, batch 1 and 64
    python benchmarks/latency_attention_grid.py --shape deit-small --batches 64

For each batch, the attention parts of two grids and of `--heldout` random shapes (every width a multiple of 8, as
exports are; heads, q/k and v head dims and the residual width drawn independently inside the grid's span) are
timed together, pass by pass (`time_in_passes`, the table's own timing). Each grid then predicts the held-out
shapes by multilinear interpolation, as `LatencyTable.predict_attention` does:

* default: `LatencyGrid.for_model` (3 points per axis: head dims a quarter, the middle and all of head_dim);
* head dims every 8: the same residual widths and heads, head dims at every multiple of 8 from a quarter of
  head_dim up (aligned held-out head dims are then grid points; only the residual width is interpolated).

If the second grid's error is much smaller, the time is not linear in the head dims between the default points.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hf_vit_compress.surgery.latency import (  # noqa: E402
    LatencyGrid,
    _AttentionPart,
    _interpolate,
    _layer,
    _part_config,
    latency_key,
)
from hf_vit_compress.surgery.timing import time_in_passes  # noqa: E402


def grids(config) -> dict[str, LatencyGrid]:
    base = LatencyGrid.for_model(config)
    head_dim = config.hidden_size // config.num_attention_heads
    every8 = list(range(max(8, 8 * round(head_dim / 4 / 8)), head_dim + 1, 8))
    return {"default": base, "head dims every 8": LatencyGrid(hidden=base.hidden, heads=base.heads,
                                                              qk_head_dims=every8, v_head_dims=every8, mlp=base.mlp)}


def heldout_shapes(config, grid: LatencyGrid, count: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    def aligned(low: int, high: int) -> int:
        return min(high, max(low, 8 * round(rng.randint(low, high) / 8)))

    shapes = []
    while len(shapes) < count:
        shape = (aligned(grid.hidden[0], grid.hidden[-1]), rng.randint(grid.heads[0], grid.heads[-1]),
                 aligned(grid.qk_head_dims[0], grid.qk_head_dims[-1]),
                 aligned(grid.v_head_dims[0], grid.v_head_dims[-1]))
        if shape[0] not in grid.hidden:  # off the default grid
            shapes.append(shape)
    return shapes


def measure(config, batch: int, args, rng: random.Random) -> dict:
    scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
    tokens = latency_key(config, batch).tokens
    generator = torch.Generator().manual_seed(args.seed)
    named = grids(config)
    shapes = heldout_shapes(config, named["default"], args.heldout, rng)
    inputs, cells = {}, {}
    for grid in named.values():
        for point in [(d, h, q, v) for d in grid.hidden for h in grid.heads for q in grid.qk_head_dims
                      for v in grid.v_head_dims] + shapes:
            if point not in cells:
                hidden = point[0]
                inputs.setdefault(hidden, torch.randn(batch, tokens, hidden, generator=generator))
                part = _AttentionPart(_part_config(config, hidden, [], "sdpa"), _layer(*point[1:], 1, scaling))
                cells[point] = (part.eval(), inputs[hidden])
    C.log(f"batch {batch}: timing {len(cells)} attention parts")
    times = time_in_passes(cells, torch.device("cpu"), args.warmup, args.repeats)
    result = {"batch": batch, "heldout": [list(s) for s in shapes], "grids": {}}
    for name, grid in named.items():
        axes = [grid.hidden, grid.heads, grid.qk_head_dims, grid.v_head_dims]
        values = [[[[times[(d, h, q, v)] for v in axes[3]] for q in axes[2]] for h in axes[1]] for d in axes[0]]
        signed = [(_interpolate(axes, values, list(s)) - times[s]) / times[s] for s in shapes]
        result["grids"][name] = {"axes": axes, "cells": len(axes[0]) * len(axes[1]) * len(axes[2]) * len(axes[3]),
                                 "median_error": statistics.median(map(abs, signed)),
                                 "median_signed_error": statistics.median(signed), "errors": signed}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="deit-tiny", choices=sorted(C.DEIT_SHAPES))
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default="latency_attention_grid")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    config = C.dense_vit(C.DEIT_SHAPES[args.shape], seed=0).config
    rng = random.Random(args.seed)
    cells = [measure(config, int(batch), args, rng) for batch in args.batches.split(",")]
    results = {"provenance": prov, "settings": vars(args), "cells": cells}
    rows = [[args.shape, cell["batch"], name, f"{grid['axes'][2]}", grid["cells"],
             f"{100 * grid['median_error']:.1f}%", f"{100 * grid['median_signed_error']:+.1f}%"]
            for cell in cells for name, grid in cell["grids"].items()]
    text = (C.markdown_header("Latency table: attention error by grid", prov, [f"settings: {vars(args)}"]) + "\n"
            + C.md_table(["shape", "batch", "grid", "head-dim axis", "attention cells", "median |error|",
                          "median signed error (predicted - measured)"], rows) + "\n")
    output = Path(args.output_dir)
    C.write_json(output / f"{args.name}.json", results, flat_lists=True)
    (output / f"{args.name}.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()

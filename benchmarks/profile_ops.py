"""Where the time goes: per-operator CPU time of dense vs compressed (ours) vs Torch-Pruning at one budget.

    python benchmarks/profile_ops.py                        # DeiT-T and DeiT-S shapes, 50% MACs, batch 64, sdpa
    python benchmarks/profile_ops.py --shapes deit-small --batch 1 --attn eager

Explains `speedup / ideal` from speed.py: MACs only count matrix products, so operators whose cost follows a width
(LayerNorm, GELU, residual adds, the bias copy inside addmm) or the number of heads (the attention kernel) shrink
less than the MACs do. Each model's forward is profiled with `torch.profiler` `--repeats` times, round-robin; the
self CPU time of every operator is grouped into categories and the median over repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CATEGORIES = [
    ("matrix products (GEMM)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")),
    ("bias copy into GEMM output", ("aten::copy_",)),
    ("attention kernel / softmax", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
                                    "aten::softmax")),
    ("GELU", ("aten::gelu",)),
    ("LayerNorm", ("aten::native_layer_norm",)),
    ("residual / elementwise add, mul", ("aten::add", "aten::add_", "aten::mul")),
    ("patch projection (conv)", ("aten::mkldnn_convolution", "aten::convolution")),
]


def category(name: str) -> str:
    for label, names in CATEGORIES:
        if name in names:
            return label
    return "other (views, reshapes, cat, ...)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="deit-tiny,deit-small")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="profile_ops")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_vit_compress import count_macs, export_compressed_model

    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    results = {"provenance": prov, "settings": vars(args), "shapes": {}}
    lines = []
    for shape in args.shapes.split(","):
        C.log(f"{shape}: building models")
        dense = C.dense_vit(C.DEIT_SHAPES[shape])
        ours = export_compressed_model(dense, C.ofb_architecture(dense, args.budget)).eval()
        pruned, _, _ = C.tp_pruned_to_budget(dense, args.budget)
        models = {"dense": dense, "ours": ours, "tp": pruned.eval()}
        macs = {"dense": count_macs(dense), "ours": count_macs(ours),
                "tp": C.shape_macs(dense, C.shapes_of(pruned))}
        pixel_values = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        per_model = {name: [] for name in models}
        with torch.inference_mode():
            for name, model in models.items():
                C.set_attention(model, args.attn)
                model(pixel_values=pixel_values)
            for _ in range(args.repeats):
                for name, model in models.items():
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        model(pixel_values=pixel_values)
                    totals = {}
                    for event in prof.key_averages():
                        label = category(event.key)
                        totals[label] = totals.get(label, 0.0) + event.self_cpu_time_total / 1e3
                    per_model[name].append(totals)
        labels = [label for label, _ in CATEGORIES] + ["other (views, reshapes, cat, ...)"]
        table = {}
        for name in models:
            table[name] = {label: statistics.median(t.get(label, 0.0) for t in per_model[name]) for label in labels}
            table[name]["total"] = sum(table[name][label] for label in labels)
        results["shapes"][shape] = {"milliseconds": table,
                                    "macs_ratio": {k: v / macs["dense"] for k, v in macs.items()}}
        rows = []
        for label in labels + ["total"]:
            d = table["dense"][label]
            rows.append([label, f"{d:.0f}", f"{100 * d / table['dense']['total']:.0f}%",
                         f"{table['ours'][label]:.0f}", f"{table['ours'][label] / d:.2f}" if d else None,
                         f"{table['tp'][label]:.0f}", f"{table['tp'][label] / d:.2f}" if d else None])
        lines.append(f"\n## {shape}, {args.budget:g} of the dense MACs (ours {macs['ours'] / macs['dense']:.3f}, "
                     f"TP {macs['tp'] / macs['dense']:.3f}), batch {args.batch}, {args.attn}\n")
        lines.append(f"ours: `{C.shapes_summary(C.shapes_of(ours))}`  \n"
                     f"TP: `{C.shapes_summary(C.shapes_of(pruned))}`\n")
        lines.append(C.md_table(["operator category", "dense ms", "dense share", "ours ms", "ours / dense",
                                 "TP ms", "TP / dense"], rows))
    header = C.markdown_header(
        "Per-operator CPU time: dense vs ours vs Torch-Pruning", prov,
        [f"settings: {vars(args)}", f"wall time: {(time.perf_counter() - started) / 60:.1f} min",
         "self CPU time per operator from torch.profiler, grouped; median over repeats (round-robin); the MACs "
         "ratio is what a category would show if its time followed the MACs"])
    C.write_json(Path(args.output_dir) / f"{args.name}.json", results)
    (Path(args.output_dir) / f"{args.name}.md").write_text(header + "\n".join(lines) + "\n")
    C.log(f"wrote {Path(args.output_dir) / args.name}.json/.md")


if __name__ == "__main__":
    main()

"""Seeded tiny MACs-budget searches whose architectures are pinned in `data/macs_architectures.json`: a speed budget
(issue 23) re-priced both methods' budgets through `surgery.cost`, and a MACs run must come out exactly as before.

    python tests/methods/macs_runs.py tests/methods/data/macs_architectures.json   # regenerate (on purpose only)
"""

from __future__ import annotations

import json
import tempfile

import torch
from transformers import TrainingArguments

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.training.trainer import CompressionTrainer

#: (name, method, target, method settings): the default spaces and the ones that search heads, residual width, skips.
#: OFB runs pin `score_init="random"`, the default when these were recorded (the default is now "weights"): what they
#: check is the pricing, which the importance init does not touch.
RUNS = [
    ("ofb_default_0.5", "ofb", 0.5, {"arch_travel": 10.0, "score_init": "random"}),
    ("ofb_heads_0.3", "ofb", 0.3, {"arch_travel": 10.0, "prune_heads": True, "score_init": "random"}),
    ("uvc_default_0.4", "uvc", 0.4, {"skip_warmup_fraction": 0.25}),
    ("uvc_projection_0.3", "uvc", 0.3, {"budget_control": "projection", "skip_warmup_fraction": 0.25}),
]


def run(method: str, target: float, settings: dict) -> dict:
    """Search 40 steps on random images (seeded) and return the decided architecture (indices included)."""
    from conftest import NUM_LABELS, make_vit_classifier

    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": int(i % NUM_LABELS)}
            for i in range(32)]
    with tempfile.TemporaryDirectory() as output:
        args = TrainingArguments(
            output_dir=output, max_steps=40, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=10,
            save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
            disable_tqdm=True, seed=0, data_seed=0,
        )
        config = CompressionConfig(method=method, target_flops=target, search_fraction=1.0, **{method: settings})
        trainer = CompressionTrainer(model=make_vit_classifier(seed=0, num_hidden_layers=3), args=args,
                                     compression_config=config, train_dataset=data)
        torch.set_num_threads(1)
        trainer.train()
        architecture = trainer.method.finalize()
    return architecture.to_dict()


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    results = {name: run(method, target, settings) for name, method, target, settings in RUNS}
    Path(sys.argv[1]).write_text(json.dumps(results) + "\n")

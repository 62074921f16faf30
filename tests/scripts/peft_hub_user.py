"""What a Hub user does with a compressed model and peft, in a process where hf_vit_compress cannot be imported
(the model classes come from the folder's modeling files: `trust_remote_code=True`). Run by tests/training/test_peft.py:

    python tests/scripts/peft_hub_user.py adapt WORK_DIR MODEL_DIR [MODEL_DIR ...]
    python tests/scripts/peft_hub_user.py load WORK_DIR MODEL_DIR [MODEL_DIR ...]

adapt: for each compressed model folder, load it with a new 3-label head, add LoRA adapters to every block's
       q/k/v/o projections and fc1/fc2 (peft's `get_peft_model`, the new head(s) in `modules_to_save`), train on one
       fixed batch, save the adapter, load it back onto the base model read from the same folder, merge
       (`merge_and_unload`) and save the merged model. Writes WORK_DIR/<i>/adapt.json and the adapted logits.
load:  with peft blocked too, load each merged model (plain `from_pretrained`) and write its logits.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path


class BlockPackage(importlib.abc.MetaPathFinder):
    # The package is pip-installed (editable): only a finder in front of all others keeps it out.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_vit_compress":
            raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
        return None


sys.meta_path.insert(0, BlockPackage())
if sys.argv[1] == "load":
    sys.modules["peft"] = None  # `import peft` fails and transformers' find_spec check sees no peft
for name in ("hf_vit_compress", "peft") if sys.argv[1] == "load" else ("hf_vit_compress",):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the child")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
NUM_LABELS = 3


def load(model_dir: str):
    torch.manual_seed(0)  # the new head's initialisation
    return AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True, num_labels=NUM_LABELS,
                                                           ignore_mismatched_sizes=True)


def logits_of(model, pixel_values) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def adapt(model_dir: str, work: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(8, 3, 16, 16, generator=generator)
    labels = torch.arange(8) % NUM_LABELS
    base = load(model_dir)
    heads = ["cls_classifier", "distillation_classifier"] if base.config.distillation_head else ["classifier"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=heads))
    adapted_layers = sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    head_copies = sorted(name for name, _ in model.named_parameters() if "modules_to_save" in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    adapted = logits_of(model, pixel_values)

    model.save_pretrained(work / "adapter")
    reloaded = PeftModel.from_pretrained(load(model_dir), work / "adapter")
    round_trip = logits_of(reloaded, pixel_values)

    merged = model.merge_and_unload()
    merged_logits = logits_of(merged, pixel_values)
    merged.save_pretrained(work / "merged")
    np.save(work / "pixel_values.npy", pixel_values.numpy())
    np.save(work / "adapted_logits.npy", adapted.numpy())
    record = {
        "model_class_module": type(base).__module__,
        "adapted_layers": adapted_layers,
        "trainable_head_copies": head_copies,
        "losses": losses,
        "round_trip_max_abs": float((round_trip - adapted).abs().max()),
        "merged_max_abs": float((merged_logits - adapted).abs().max()),
        "merged_class": type(merged).__name__,
        "merged_peft_modules": [name for name, module in merged.named_modules()
                                if type(module).__module__.startswith("peft")],
    }
    (work / "adapt.json").write_text(json.dumps(record))


def load_merged(work: Path) -> None:
    model = AutoModelForImageClassification.from_pretrained(work / "merged", trust_remote_code=True)
    pixel_values = torch.from_numpy(np.load(work / "pixel_values.npy"))
    np.save(work / "merged_logits.npy", logits_of(model, pixel_values).numpy())
    (work / "load.json").write_text(json.dumps({"model_class_module": type(model).__module__,
                                                "peft_loaded": sys.modules.get("peft") is not None}))


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    for index, model_dir in enumerate(sys.argv[3:]):
        folder = work / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        if mode == "adapt":
            adapt(model_dir, folder)
        else:
            load_merged(folder)


if __name__ == "__main__":
    main()

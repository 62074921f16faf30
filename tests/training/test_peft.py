"""peft with compressed models and with `CompressionTrainer`.

* LoRA on a compressed model loaded from a folder with `trust_remote_code=True`, as a Hub user without this package
  does it (tests/scripts/peft_hub_user.py, in a child process): training, adapter round trip, merge, and the merged
  model saved as a plain compressed model that loads without peft.
* Compressing a `PeftModel`: LoRA and IA3 adapters are merged into the weights first; other adapter types, and
  adapter layers outside a PeftModel, are refused with errors that name them.
* peft stays optional: without it the package works and `finetune="lora"` says what to install.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_deit_with_teacher, make_pixel_values, make_vit_classifier, randomize_parameters
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from safetensors import safe_open

from hf_vit_compress import Architecture, CompressionConfig, LayerArchitecture, export_compressed_model
from hf_vit_compress.surgery.flops import count_macs, dense_macs
from hf_vit_compress.training.peft_support import unwrap_peft_model
from hf_vit_compress.training.trainer import CompressionTrainer

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]
HUB_USER = REPO / "tests" / "scripts" / "peft_hub_user.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning"),
    # peft 0.21 calls a transformers attribute deprecated in 5.x
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


# ---------------------------------------------------------------------------------------------------------------
# LoRA on a compressed model, as a Hub user does it
# ---------------------------------------------------------------------------------------------------------------
def _heterogeneous_architecture() -> Architecture:
    """3 dense blocks (4 heads of 8, MLP 64, hidden 32): block 0 keeps 3 heads with q/k dim 3 != v dim 5 and no
    MLP, block 1 is removed, block 2 keeps no head and every third MLP unit; 10 of the 32 residual channels."""
    return Architecture(
        layers=[
            LayerArchitecture(heads=[0, 2, 3], qk_channels=[[0, 1, 5], [2, 3, 7], [1, 4, 6]],
                              v_channels=[[7, 0, 3, 5, 6], [1, 2, 3, 4, 5], [0, 2, 4, 6, 7]], mlp_neurons=[]),
            LayerArchitecture(heads=[1], qk_channels=[[0]], v_channels=[[3]], mlp_neurons=[5], keep_block=False),
            LayerArchitecture(heads=[], qk_channels=[], v_channels=[], mlp_neurons=list(range(0, 64, 3))),
        ],
        hidden_channels=[0, 3, 4, 8, 9, 15, 16, 22, 30, 31],
    )


def _deit_architecture() -> Architecture:
    """DeiT with its distillation token and two heads: block 0 removed, blocks 1 and 2 narrowed differently."""
    full = list(range(8))
    return Architecture(
        layers=[
            LayerArchitecture(heads=[0], qk_channels=[full], v_channels=[full], mlp_neurons=[1], keep_block=False),
            LayerArchitecture(heads=[1, 2], qk_channels=[full[:4], full[4:]], v_channels=[full, full],
                              mlp_neurons=list(range(40))),
            LayerArchitecture(heads=[0, 1, 2, 3], qk_channels=[full] * 4, v_channels=[full[:2]] * 4,
                              mlp_neurons=list(range(0, 64, 2))),
        ],
        hidden_channels=list(range(24)),
    )


@pytest.fixture(scope="module")
def hub_user(tmp_path_factory):
    """Export two compressed models, then run the Hub user's peft workflow on them in child processes."""
    root = tmp_path_factory.mktemp("peft-hub")
    models = [
        export_compressed_model(randomize_parameters(make_vit_classifier(num_hidden_layers=3), seed=1),
                                _heterogeneous_architecture()),
        export_compressed_model(randomize_parameters(make_deit_with_teacher(num_hidden_layers=3), seed=2),
                                _deit_architecture()),
    ]
    folders = []
    for index, model in enumerate(models):
        folder = root / f"model{index}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME") and not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf_home"),
               HF_MODULES_CACHE=str(root / "hf_modules"), OMP_NUM_THREADS="1")
    work = root / "work"
    for mode in ("adapt", "load"):
        result = subprocess.run([sys.executable, str(HUB_USER), mode, str(work), *folders], cwd=root, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{mode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return models, work


@pytest.mark.parametrize("index", [0, 1], ids=["vit-heterogeneous", "deit-distilled"])
def test_lora_on_a_reloaded_compressed_model(hub_user, index):
    models, work = hub_user
    record = json.loads((work / str(index) / "adapt.json").read_text())
    # the classes came from the folder's modeling files, not from this package
    assert record["model_class_module"].startswith("transformers_modules.")
    # every Linear of every kept block is adapted (removed blocks are absent; widths differ per block)
    kept = models[index].config.layers
    expected = {f"base_model.model.vit.layers.{i}.{part}" for i in range(len(kept))
                for part in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                             "mlp.fc1", "mlp.fc2")}
    assert set(record["adapted_layers"]) == expected
    heads = ["cls_classifier", "distillation_classifier"] if index == 1 else ["classifier"]
    assert {name.split(".")[2] for name in record["trainable_head_copies"]} == set(heads)
    losses = record["losses"]
    assert losses[-1] < 0.5 * losses[0], losses  # trains on the fixed batch
    assert record["round_trip_max_abs"] <= ATOL  # adapter saved, loaded onto the base from the same folder
    assert record["merged_max_abs"] <= ATOL  # merge_and_unload computes what the adapted model computes
    assert record["merged_class"] == "CompressedViTForImageClassification" and record["merged_peft_modules"] == []


@pytest.mark.parametrize("index", [0, 1], ids=["vit-heterogeneous", "deit-distilled"])
def test_merged_model_is_a_plain_compressed_model_loading_without_peft(hub_user, index):
    _, work = hub_user
    folder = work / str(index)
    loaded = json.loads((folder / "load.json").read_text())
    assert loaded["model_class_module"].startswith("transformers_modules.") and not loaded["peft_loaded"]
    np.testing.assert_allclose(np.load(folder / "merged_logits.npy"), np.load(folder / "adapted_logits.npy"),
                               atol=ATOL, rtol=0)
    with safe_open(str(folder / "merged" / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert not [key for key in keys if "lora" in key or "base_layer" in key or "modules_to_save" in key]
    assert (folder / "merged" / "modeling_compressed_vit.py").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Compressing a PeftModel
# ---------------------------------------------------------------------------------------------------------------
def _with_nonzero_adapters(peft_model):
    """peft initialises LoRA's B (and IA3's vectors) so that the adapter starts as the identity; give every adapter
    parameter seeded values so that merging changes the weights."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator) if "ia3_" in name
                                else 0.3 * torch.randn(parameter.shape, generator=generator))
    return peft_model


def _logits(model, pixel_values):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_peft_model_is_merged_before_compression(kind, caplog):
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc2"],
                            modules_to_save=["classifier"])
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])
    peft_model = _with_nonzero_adapters(get_peft_model(make_vit_classifier(seed=3), config))
    pixel_values = make_pixel_values(4, seed=4)
    expected = _logits(peft_model, pixel_values)
    assert not torch.allclose(expected, _logits(make_vit_classifier(seed=3), pixel_values), atol=1e-3)
    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.training.peft_support"):
        plain = unwrap_peft_model(peft_model)
    assert type(plain).__name__ == "ViTForImageClassification"
    assert not [name for name, module in plain.named_modules() if type(module).__module__.startswith("peft")]
    assert all(parameter.requires_grad for parameter in plain.parameters())  # get_peft_model had frozen them
    torch.testing.assert_close(_logits(plain, pixel_values), expected, atol=ATOL, rtol=0)
    message = caplog.text
    assert "merge_and_unload" in message and "'default'" in message and kind.upper() in message


def test_compression_trainer_compresses_a_peft_model(tmp_path):
    from conftest import tiny_dataset, training_args

    peft_model = _with_nonzero_adapters(get_peft_model(make_vit_classifier(seed=0), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"])))
    merged_reference = unwrap_peft_model(_with_nonzero_adapters(get_peft_model(make_vit_classifier(seed=0),
                                         LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    modules_to_save=["classifier"]))))
    trainer = CompressionTrainer(model=peft_model, args=training_args(tmp_path, max_steps=10),
                                 compression_config=CompressionConfig(method="ofb", target_flops=0.5,
                                                                      search_fraction=0.5),
                                 train_dataset=tiny_dataset())
    model = trainer.model
    assert type(model).__name__ == "ViTForImageClassification" and not isinstance(model, PeftModel)
    # the weights being compressed are the merged ones
    merged_state = merged_reference.state_dict()
    for name, value in model.state_dict().items():
        if name in merged_state:
            torch.testing.assert_close(value, merged_state[name], atol=0, rtol=0, msg=name)
    trainer.train()
    compressed = trainer.export_compressed_model()
    assert count_macs(compressed) <= 0.5 * dense_macs(model)
    pixel_values = make_pixel_values(3, seed=9)
    torch.testing.assert_close(_logits(compressed, pixel_values), _logits(model, pixel_values), atol=ATOL, rtol=0)


def test_other_adapter_types_are_refused_by_name(tmp_path):
    peft_model = get_peft_model(make_vit_classifier(), LoHaConfig(target_modules=["q_proj"]), adapter_name="mine")
    with pytest.raises(ValueError, match=r"\{'mine': 'LOHA'\}.*allowed: \['LORA', 'IA3'\]"):
        CompressionTrainer(model=peft_model, compression_config=CompressionConfig())


def test_adapter_layers_outside_a_peft_model_are_refused():
    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), make_vit_classifier())
    with pytest.raises(ValueError, match=r"outside a PeftModel \(vit\.layers\.0\.attention\.q_proj "
                                         r"\(peft\.tuners\.lora\.layer\.Linear\)"):
        CompressionTrainer(model=model, compression_config=CompressionConfig())


# ---------------------------------------------------------------------------------------------------------------
# peft is optional
# ---------------------------------------------------------------------------------------------------------------
_WITHOUT_PEFT = textwrap.dedent(
    """
    import sys
    sys.modules["peft"] = None  # `import peft` fails, and transformers sees no peft
    import torch
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification
    from hf_vit_compress import CompressionConfig, CompressionTrainer

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=5)
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 5} for i in range(8)]
    args = TrainingArguments(sys.argv[1], max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    trainer = CompressionTrainer(model=ViTForImageClassification(config), args=args,
                                 compression_config=CompressionConfig(), train_dataset=data)
    trainer.train()
    print("EXPORTED", type(trainer.export_compressed_model()).__name__)
    try:
        CompressionTrainer(model=ViTForImageClassification(config), args=args,
                           compression_config=CompressionConfig(finetune="lora"), train_dataset=data)
    except ImportError as error:
        print("LORA_ERROR", error)
    """
)


def test_peft_is_optional(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _WITHOUT_PEFT, str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("EXPORTED", "LORA_")))
    assert lines["EXPORTED"] == "CompressedViTForImageClassification"
    assert 'pip install "hf_vit_compress[peft]"' in lines["LORA_ERROR"]

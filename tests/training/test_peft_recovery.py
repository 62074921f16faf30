"""LoRA recovery after the search (`CompressionConfig.finetune="lora"`): settings, the search left as it is, a frozen
base, adapters gated like the weights they adapt, export merged into a plain compressed model, resume, and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, make_deit_with_teacher, make_pixel_values, ofb_trainer, tiny_dataset, training_args
from safetensors import safe_open
from transformers import AutoModelForImageClassification, TrainerCallback

from hf_vit_compress.cli.recipes import apply_overrides, parse_overrides
from hf_vit_compress.config import CompressionConfig, LoRARecoveryConfig
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.publishing.publish import architecture_facts
from hf_vit_compress.training.trainer import CompressionTrainer

ATOL = 1e-5
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


def lora_config(method: str = "ofb", **lora) -> CompressionConfig:
    """30 steps (5 per epoch), the first 15 searching, then LoRA."""
    return CompressionConfig(method=method, target_flops=0.5, search_fraction=0.5, finetune="lora",
                             lora={"rank": 4, "learning_rate": 1e-2, **lora})


def _clone(parameters) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in parameters]


class PhaseRecorder(TrainerCallback):
    """Adapters and frozen weights when the search ends (after its last optimizer step)."""

    def __init__(self):
        self.trainer = self.at_search_end = None

    def on_step_end(self, args, state, control, **kwargs):
        method, recovery = self.trainer.method, self.trainer.lora_recovery
        if state.global_step == method.total_search_steps:
            self.at_search_end = {"lora": _clone(recovery.parameters), "frozen": _clone(recovery.frozen_parameters)}


def logits_of(model, pixel_values) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"finetune": "qlora"}, r"CompressionConfig\.finetune='qlora' is invalid: allowed one of \['full', 'lora'\]"),
        ({"lora": {"rank": 0}}, r"CompressionConfig\.lora\.rank=0 is invalid: allowed an integer >= 1"),
        ({"lora": {"alpha": -1}}, r"CompressionConfig\.lora\.alpha=-1(\.0)? is invalid"),
        ({"lora": {"dropout": 1.0}}, r"CompressionConfig\.lora\.dropout=1\.0 is invalid: allowed \[0, 1\)"),
        ({"lora": {"target_modules": ["query"]}}, r"CompressionConfig\.lora\.target_modules=\['query'\] is invalid: "
                                                  r"allowed a non-empty list without repeats from \['q_proj'"),
        ({"lora": {"target_modules": []}}, r"CompressionConfig\.lora\.target_modules=\[\] is invalid"),
        ({"lora": {"learning_rate": 0}},
         r"CompressionConfig\.lora\.learning_rate=0(\.0)? is invalid: allowed None or > 0"),
        ({"lora": {"rnk": 4}}, r"CompressionConfig\.lora: unknown field\(s\) \['rnk'\]; allowed: \['alpha'"),
    ],
)
def test_bad_lora_settings_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig.from_dict(values)


def test_lora_settings_round_trip_and_come_from_the_command_line(tmp_path):
    config = lora_config(target_modules=["q_proj", "fc1"], dropout=0.1)
    config.save(tmp_path / "config.json")
    loaded = CompressionConfig.load(tmp_path / "config.json")
    assert loaded == config and isinstance(loaded.lora, LoRARecoveryConfig)
    recipe = apply_overrides({"compression": {}}, parse_overrides(
        ["--compression.finetune", "lora", "--compression.lora.rank", "16", "--compression.lora.target_modules",
         "q_proj", "v_proj"]))
    assert recipe["compression"] == {"finetune": "lora", "lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"]}}
    assert CompressionConfig.from_dict(recipe["compression"]).lora.rank == 16


# ---------------------------------------------------------------------------------------------------------------
# An OFB run with LoRA recovery
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    recorder = PhaseRecorder()
    trainer = ofb_trainer(tmp_path_factory.mktemp("lora-run"), lora_config(), logging_steps=1)
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    initial_lora = _clone(trainer.lora_recovery.parameters)
    trainer.train()
    return trainer, recorder.at_search_end, initial_lora


def test_adapters_cover_every_target_and_train_only_after_the_search(lora_run):
    trainer, at_search_end, initial = lora_run
    recovery = trainer.lora_recovery
    assert len(recovery.layers) == 2 * 6  # 2 blocks x q/k/v/o, fc1, fc2
    for before, after in zip(initial, at_search_end["lora"]):  # bypassed while searching: untouched
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert all(float(b.abs().sum()) == 0 for b in initial[1::2])  # (A, B) per layer; B starts at 0
    changed = [not torch.equal(a, b) for a, b in zip(at_search_end["lora"], recovery.parameters)]
    assert all(changed)  # every adapter matrix (A and B) has trained


def test_the_base_is_frozen_after_the_search(lora_run):
    trainer, at_search_end, _ = lora_run
    recovery = trainer.lora_recovery
    for before, after in zip(at_search_end["frozen"], recovery.frozen_parameters):
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert not any(parameter.requires_grad for parameter in recovery.frozen_parameters)
    optimizer_state = trainer.optimizer.state
    assert not any(parameter in optimizer_state for parameter in recovery.frozen_parameters)  # AdamW moments freed
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.classifier.weight.requires_grad  # train_heads (default)
    method = {id(p) for p in trainer.method.parameters()}
    assert method <= {id(p) for p in recovery.frozen_parameters}  # OFB's scales stay as the search left them
    backbone = {id(p) for p in model.vit.parameters()} - {id(p) for p in recovery.parameters}
    assert backbone <= {id(p) for p in recovery.frozen_parameters}


def test_the_search_is_the_same_as_with_full_finetuning(lora_run, tmp_path):
    trainer, _, _ = lora_run
    full = ofb_trainer(tmp_path, CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5),
                       logging_steps=1)
    full.train()
    search_steps = trainer.method.total_search_steps
    lora_losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    full_losses = {entry["step"]: entry["loss"] for entry in full.state.log_history if "loss" in entry}
    assert [lora_losses[step] for step in range(1, search_steps + 1)] == [
        full_losses[step] for step in range(1, search_steps + 1)]
    assert trainer.method.final_architecture.same_units(full.method.final_architecture)
    # the dense model's parameter count leaves out the adapters (attached before the search)
    assert architecture_facts(trainer)["dense_params"] == architecture_facts(full)["dense_params"]


def test_export_is_a_plain_model_computing_the_merged_trained_model(lora_run, tmp_path):
    trainer, _, _ = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    pixel_values = make_pixel_values(4, seed=7)
    trained = logits_of(model, pixel_values)
    with trainer.lora_recovery.merged_into_weights():  # peft's merge: W + s B A in every adapted Linear
        merged = logits_of(model, pixel_values)
    torch.testing.assert_close(merged, trained, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits_of(model, pixel_values), trained, atol=0, rtol=0)  # weights restored exactly

    compressed = trainer.export_compressed_model()
    assert type(compressed) is CompressedViTForImageClassification
    assert not [name for name, module in compressed.named_modules() if type(module).__module__.startswith("peft")]
    torch.testing.assert_close(logits_of(compressed, pixel_values), merged, atol=ATOL, rtol=0)

    trainer.save_model(str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key or "base_layer" in key]
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(logits_of(loaded, pixel_values), merged, atol=ATOL, rtol=0)


def test_without_the_gate_on_the_update_the_dense_model_would_differ(lora_run):
    """The adapters write into pruned q/k/v/fc1 units unless their update is gated like the Linear it adapts: with
    the update ungated the dense model computes something else (which the export, keeping only kept units, could
    not match), so the equality above depends on the gate."""
    trainer, _, _ = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    pixel_values = make_pixel_values(4, seed=7)
    gated = logits_of(model, pixel_values)
    updates = [layer.lora_B["recovery"] for layer in trainer.lora_recovery.layers]
    gated_updates = [b for b in updates if trainer.gate_handle.gates_output_of(b)]
    assert len(gated_updates) == 2 * 4  # q, k, v, fc1 of both blocks
    assert sum(trainer.gate_handle.writes_residual(b) for b in updates) == 2 * 2  # o_proj, fc2: mean-filled rows
    forwards = [b.__dict__.pop("forward") for b in gated_updates]  # back to nn.Linear.forward: ungated
    try:
        ungated = logits_of(model, pixel_values)
    finally:
        for b, forward in zip(gated_updates, forwards):
            b.forward = forward
    assert (ungated - gated).abs().max() > 1e-3
    torch.testing.assert_close(logits_of(model, pixel_values), gated, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Resume, UVC / DeiT, and what is trained
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint_step", [15, 20], ids=["at-search-end", "inside-lora-phase"])
def test_resume_reproduces_the_uninterrupted_lora_run(lora_run, tmp_path, checkpoint_step):
    trainer, _, _ = lora_run
    overrides = dict(save_strategy="steps", save_steps=checkpoint_step, logging_steps=1)
    first = ofb_trainer(tmp_path / "a", lora_config(), **overrides)
    first.train()
    resumed = ofb_trainer(tmp_path / "b", lora_config(), **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{checkpoint_step}"))
    losses = {entry["step"]: entry["loss"] for entry in first.state.log_history if "loss" in entry}
    for entry in resumed.state.log_history:
        if "loss" in entry:
            assert entry["loss"] == pytest.approx(losses[entry["step"]], rel=1e-6), entry["step"]
    state_a = first.accelerator.unwrap_model(first.model).state_dict()
    state_b = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], atol=1e-6, rtol=1e-6, msg=name)
    # and the first run is the fixture's run (checkpointing changes nothing)
    reference = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name in state_a:
        torch.testing.assert_close(state_a[name], reference[name], atol=0, rtol=0, msg=name)


def test_uvc_on_deit_with_frozen_heads_and_some_targets(tmp_path):
    """UVC (teacher distillation, skip gates) on DeiT with its two heads frozen and adapters on q_proj and fc1 only."""
    trainer = CompressionTrainer(
        model=make_deit_with_teacher(seed=0, num_hidden_layers=3), args=training_args(tmp_path),
        compression_config=lora_config("uvc", target_modules=["q_proj", "fc1"], train_heads=False),
        train_dataset=tiny_dataset())
    model = trainer.model
    heads = [model.cls_classifier.weight, model.distillation_classifier.weight]
    recovery = trainer.lora_recovery
    assert len(recovery.layers) == 3 * 2
    assert all(any(head is parameter for parameter in recovery.frozen_parameters) for head in heads)
    trainer.train()
    assert not any(parameter.requires_grad for parameter in heads)
    pixel_values = make_pixel_values(4, seed=8)
    compressed = trainer.export_compressed_model()
    assert compressed.config.distillation_head
    torch.testing.assert_close(logits_of(compressed, pixel_values),
                               logits_of(trainer.accelerator.unwrap_model(trainer.model), pixel_values),
                               atol=ATOL, rtol=0)
    assert logits_of(compressed, pixel_values).shape == (4, NUM_LABELS)


# ---------------------------------------------------------------------------------------------------------------
# 2 processes
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-lora")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "scripts" / "ddp_lora.py"), str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"2-process run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return {(phase, rank): json.loads((out / f"{phase}_rank{rank}.json").read_text())
            for phase in ("full", "stop", "resume") for rank in (0, 1)}


def test_ddp_lora_recovery(ddp_lora):
    full0, full1 = ddp_lora["full", 0], ddp_lora["full", 1]
    assert full0["wrapped"] == "DistributedDataParallel" and full0["world_size"] == 2
    assert full0["lora_digests"] == full1["lora_digests"] and full0["frozen_digests"] == full1["frozen_digests"]
    assert full0["logits"] == full1["logits"]
    search_steps, lora, frozen = full0["search_steps"], full0["lora_digests"], full0["frozen_digests"]
    assert search_steps == 6 and full0["global_step"] == 8
    assert len({lora[str(step)] for step in range(1, search_steps + 1)}) == 1  # untouched while searching
    assert len({lora[str(step)] for step in range(search_steps, 9)}) == 3  # trained at steps 7 and 8
    assert len({frozen[str(step)] for step in range(search_steps, 9)}) == 1  # frozen from step 7 on
    assert full0["lora_b_nonzero"] and full0["peft_modules_in_export"] == []
    np.testing.assert_allclose(full0["logits"], full0["gated_logits"], atol=ATOL, rtol=0)
    resumed = ddp_lora["resume", 0]
    assert resumed["lora_digests"]["8"] == lora["8"] and resumed["frozen_digests"]["8"] == frozen["8"]
    assert resumed["logits"] == full0["logits"]

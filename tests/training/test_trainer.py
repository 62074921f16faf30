"""`CompressionTrainer` with OFB end to end on a tiny ViT: budget, export, save, logs, resume, gradient
accumulation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LABELS, make_pixel_values, make_vit_classifier, ofb_trainer, tiny_dataset, training_args
from transformers import AutoModelForImageClassification, BertConfig, BertForSequenceClassification, TrainingArguments

import hf_vit_compress  # noqa: F401  (registers the compressed model with the Auto classes)
from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.methods.ofb.method import OFBMethod, linear_schedule
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.surgery.flops import count_macs, dense_macs
from hf_vit_compress.training.trainer import CompressionTrainer

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """OFB at 50% of the MACs: 30 steps (5 per epoch), the first 21 searching."""
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.7)
    trainer = ofb_trainer(tmp_path_factory.mktemp("ofb-run"), config)
    assert isinstance(trainer.method, OFBMethod)
    trainer.train()
    return trainer


def test_search_ends_and_export_meets_the_budget(trained):
    method = trained.method
    assert method.search_finished and method.total_search_steps == 21 and method.steps_per_epoch == 5
    model = trained.accelerator.unwrap_model(trained.model)
    compressed = trained.export_compressed_model()
    assert isinstance(compressed, CompressedViTForImageClassification)
    ratio = count_macs(compressed) / dense_macs(model)
    assert count_macs(compressed) <= method.target_macs
    assert 0.47 <= ratio <= 0.5, ratio
    # pruned head dims keep the dense attention scale (8 ** -0.5), stored per layer
    layers = compressed.config.layers
    assert all(layer["scaling"] == pytest.approx(8**-0.5) for layer in layers)
    assert any(0 < layer["qk_head_dim"] < 8 for layer in layers)  # so the logits test below depends on it


def test_exported_logits_equal_the_gated_model(trained):
    model = trained.accelerator.unwrap_model(trained.model).eval()
    compressed = trained.export_compressed_model()
    pixels = make_pixel_values(4, seed=7)
    with torch.no_grad():
        gated = model(pixel_values=pixels).logits
        small = compressed(pixel_values=pixels).logits
    assert gated.shape == small.shape == (4, NUM_LABELS)
    torch.testing.assert_close(small, gated, atol=ATOL, rtol=0)


def test_save_model_writes_a_loadable_compressed_model(trained, tmp_path):
    out = tmp_path / "compressed"
    trained.save_model(str(out))
    assert (out / "architecture.json").is_file() and (out / "compression_config.json").is_file()
    architecture = json.loads((out / "architecture.json").read_text())
    assert architecture == trained.method.export_architecture().to_dict()
    assert CompressionConfig.load(out / "compression_config.json").to_dict() == trained.compression_config.to_dict()
    loaded = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    assert isinstance(loaded, CompressedViTForImageClassification)
    compressed = trained.export_compressed_model()
    assert count_macs(loaded) == count_macs(compressed)
    pixels = make_pixel_values(3, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, compressed(pixel_values=pixels).logits,
                                   atol=ATOL, rtol=0)


def test_training_logs_carry_the_search_state(trained):
    logs = [entry for entry in trained.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [5, 10, 15, 20, 25, 30]
    search_keys = ("lambda", "pmim_mask_ratio", "expected_macs_ratio", "active_candidates/embed",
                   "active_candidates/attn.0", "active_candidates/mlp.1")
    for entry in logs[:4]:  # the search ends after step 21
        for key in search_keys:
            assert key in entry, (entry["step"], key)
    first = logs[0]
    # the step-5 log is written after optimizer step 5, whose schedules were set for step index 4 of 21
    assert first["lambda"] == pytest.approx(linear_schedule(4 / 21, 0.2, 0.99, 0.1))
    assert first["pmim_mask_ratio"] == pytest.approx(1 - linear_schedule(4 / 21, 0.2, 0.95, 0.75))
    assert logs[1]["lambda"] == pytest.approx(0.1) and logs[1]["pmim_mask_ratio"] == pytest.approx(0.25)
    # after the search its state stops changing: not logged again (tests/training/test_logs.py checks the rest)
    assert not any(key in entry for entry in logs[4:] for key in search_keys if key != "expected_macs_ratio")
    assert "expected_macs_ratio" not in logs[-1]  # a per-step term too: in the window that ended the search only
    assert trained.compression_history and trained.compression_history[-1]["step"] == 21


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def _active(entry: dict) -> float:
    return sum(value for key, value in entry.items() if key.startswith("active_candidates/"))


def test_resume_mid_search_reproduces_the_uninterrupted_run(tmp_path):
    # 5 steps per epoch, elimination every 2 steps, search over the first 24 of 30 steps; checkpoint at step 12
    # (mid-epoch, mid-search) with eliminations both before and after it.
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.8,
                               ofb={"arch_lr": 0.5, "eliminations_per_epoch": 2.5})
    overrides = dict(save_strategy="steps", save_steps=12, logging_steps=1)
    first = ofb_trainer(tmp_path / "a", config, **overrides)
    first.train()
    logs = {entry["step"]: entry for entry in first.state.log_history if "loss" in entry}
    total = _active(logs[1])
    assert _active(logs[12]) < total  # eliminated before the checkpoint
    assert _active(logs[23]) < _active(logs[12])  # ... and after it
    assert logs[12]["search_progress"] < 1
    checkpoint = tmp_path / "a" / "checkpoint-12"
    assert checkpoint.is_dir()

    second = ofb_trainer(tmp_path / "b", config, **overrides)
    second.train(resume_from_checkpoint=str(checkpoint))
    resumed = {entry["step"]: entry for entry in second.state.log_history if "loss" in entry}
    for step in range(13, 31):
        assert resumed[step]["loss"] == pytest.approx(logs[step]["loss"], rel=1e-5), step
        assert _active(resumed[step]) == _active(logs[step]), step

    assert first.method.export_architecture().same_units(second.method.export_architecture())
    state_a = first.accelerator.unwrap_model(first.model).state_dict()
    state_b = second.accelerator.unwrap_model(second.model).state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:  # weights (blocks included) and the whole search state
        torch.testing.assert_close(state_b[name], state_a[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------------------------
def test_gradient_accumulation_schedules_count_optimizer_steps(tmp_path):
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.8)
    trainer = ofb_trainer(tmp_path, config, max_steps=10, per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, logging_steps=1)
    method = trainer.method
    progress_calls, step_end_calls, loss_calls = [], [], []
    set_progress, on_step_end, loss = method.set_progress, method.on_step_end, method.loss

    def record(calls, function):
        def wrapper(*args):
            calls.append(args[0] if isinstance(args[0], int) else None)
            return function(*args)

        return wrapper

    method.__dict__["set_progress"] = record(progress_calls, set_progress)
    method.__dict__["on_step_end"] = record(step_end_calls, on_step_end)
    method.__dict__["loss"] = record(loss_calls, loss)
    trainer.train()
    # 40 examples / batch 4 = 10 micro-batches = 5 optimizer steps per epoch; search = ceil(0.8 * 10) = 8 steps
    assert method.steps_per_epoch == 5 and method.total_search_steps == 8
    assert progress_calls == [0] + list(range(10))  # train begin, then once per optimizer step
    assert step_end_calls == list(range(8))  # elimination hook once per optimizer step of the search
    assert len(loss_calls) == 20  # every micro-batch adds the method's terms
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for step in range(1, 8):
        assert logs[step]["lambda"] == pytest.approx(linear_schedule((step - 1) / 8, 0.2, 0.99, 0.1)), step
    assert method.search_finished and "lambda" not in logs[8]  # logged after step 8 ended the search


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_unsupported_model_is_refused_naming_its_model_type(tmp_path):
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="model_type"):
        CompressionTrainer(model=bert, args=training_args(tmp_path),
                           compression_config=CompressionConfig(method="ofb", target_flops=0.5))
    assert not hasattr(bert, "compression")


def test_missing_compression_config_is_refused(tmp_path):
    model = make_vit_classifier()
    with pytest.raises(ValueError, match="compression_config"):
        CompressionTrainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(8))
    with pytest.raises(ValueError, match="compression_config"):
        CompressionTrainer(model=model, args=training_args(tmp_path), compression_config={"method": "ofb"})
    assert not hasattr(model, "compression")  # nothing was attached


def test_save_model_without_a_path_keeps_the_checkpoints(tmp_path):
    """A bare `trainer.save_model()` after the search must not replace output_dir (and the checkpoints in it)."""
    import torch
    from conftest import make_vit_classifier

    from hf_vit_compress import CompressionConfig, CompressionTrainer

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": index % 5}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = CompressionTrainer(model=make_vit_classifier(), args=args, train_dataset=Tiny(),
                                 compression_config=CompressionConfig(method="ofb", target_flops=0.5))
    trainer.train()
    trainer.save_model()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = tmp_path / "compressed_model"
    assert {"model.safetensors", "architecture.json", "compression_config.json"} <= {p.name for p in saved.iterdir()}

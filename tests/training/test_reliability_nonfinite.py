"""Non-finite training stops loudly (issue 10: F2, F6): a NaN/Inf loss or search state is an error naming the step
and the term; a model with NaN/Inf weights is neither trained from, exported nor saved.

`NonFiniteError` is a `FloatingPointError`; the tests catch the built-in so that they also run on version 0.1.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_vit_classifier, tiny_dataset, tiny_overrides, training_args, write_parquet_shards

from hf_vit_compress.cli import main
from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.surgery.architecture import Architecture
from hf_vit_compress.surgery.export import export_compressed_model
from hf_vit_compress.training.trainer import CompressionTrainer


def trainer_for(tmp_path, method: str = "ofb", model=None, dataset=None, **overrides) -> CompressionTrainer:
    config = CompressionConfig(method=method, target_flops=0.5, search_fraction=0.5)
    values = dict(max_steps=12, logging_steps=4, save_strategy="steps", save_steps=4)
    values.update(overrides)
    return CompressionTrainer(
        model=model if model is not None else make_vit_classifier(seed=0), compression_config=config,
        train_dataset=dataset if dataset is not None else tiny_dataset(40), args=training_args(tmp_path, **values),
    )


def saved_checkpoints(folder) -> list[str]:
    return sorted(path.name for path in folder.glob("checkpoint-*"))


@pytest.mark.parametrize("method", ["ofb", "uvc"])
def test_a_diverging_run_stops_with_the_step_and_the_terms(tmp_path, method):
    """F2 (OFB at lr 1e4, no clipping: "completed", logged loss 0.0, saved a NaN model) and F6 (UVC: `ValueError:
    cannot convert float NaN to integer`)."""
    # lr 1e6, not F2's 1e4: at 1e4 whether the weights overflow within 12 steps depends on the CPU's float reduction
    # order (a fresh machine kept them finite, the grad norm alone overflowing); 1e6 overflows everywhere
    trainer = trainer_for(tmp_path, method, learning_rate=1e6, max_grad_norm=0.0)
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN/Inf\).*step (\d+)") as caught:
        trainer.train()
    message = str(caught.value)
    assert "learning rate" in message  # says what to do
    # it names what went non-finite: a loss term or the search state, or (UVC, which steps its counts from the
    # weights right after the optimizer step) the weights themselves
    assert any(term in message for term in ("task loss", "search state", "weights now non-finite")), message
    assert trainer.state.global_step < 12
    # nothing was saved from the non-finite state: every checkpoint that exists was written before the first bad step
    first_bad = int(re.search(r"step (\d+)", message).group(1))
    assert all(int(name.split("-")[1]) < first_bad for name in saved_checkpoints(tmp_path)), message


def test_all_ignored_labels_stop_at_step_one_naming_the_task_loss(tmp_path):
    """F2: every label -100 (cross-entropy of no target is NaN)."""
    dataset = [{**example, "labels": -100} for example in tiny_dataset(40)]
    trainer = trainer_for(tmp_path, dataset=dataset)
    with pytest.raises(FloatingPointError, match=r"first at optimizer step 1 .*task loss \(cross-entropy\)"):
        trainer.train()
    assert saved_checkpoints(tmp_path) == []


def test_a_nan_weight_in_the_starting_model_is_an_error_at_train_begin(tmp_path):
    """F2: a NaN weight in the starting checkpoint."""
    model = make_vit_classifier(seed=0)
    with torch.no_grad():
        model.vit.layers[1].mlp.fc2.weight[3, 5] = float("nan")
    trainer = trainer_for(tmp_path, model=model)
    with pytest.raises(FloatingPointError, match=r"starting model.*vit\.layers\.1\.mlp\.fc2\.weight"):
        trainer.train()
    assert trainer.state.global_step == 0 and saved_checkpoints(tmp_path) == []


def test_no_log_hides_a_nan_loss(tmp_path):
    """F2: transformers' logging_nan_inf_filter replaced NaN losses in the logged average ("loss 0.0")."""
    trainer = trainer_for(tmp_path)
    assert trainer.args.logging_nan_inf_filter is False


def test_export_refuses_non_finite_kept_weights_and_ignores_removed_ones():
    model = make_vit_classifier(seed=0)
    config = model.config
    architecture = Architecture.full(config.num_hidden_layers, config.num_attention_heads,
                                     config.hidden_size // config.num_attention_heads, config.intermediate_size,
                                     config.hidden_size)
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight[7] = float("inf")
    with pytest.raises(FloatingPointError, match=r"vit\.layers\.0\.mlp\.fc1\.weight"):
        export_compressed_model(model, architecture)
    architecture.layers[0].mlp_neurons = [n for n in architecture.layers[0].mlp_neurons if n != 7]
    small = export_compressed_model(model, architecture)  # the bad unit is pruned: nothing non-finite is exported
    assert all(torch.isfinite(tensor).all() for tensor in small.state_dict().values())


@pytest.fixture(scope="module", name="assets")
def _assets(tmp_path_factory):
    """test_cli's tiny local model and parquet shards."""
    folder = tmp_path_factory.mktemp("cli_assets")
    make_vit_classifier().save_pretrained(folder / "tiny_vit")
    return {"model": str(folder / "tiny_vit"), **write_parquet_shards(folder)}


def test_the_cli_exits_non_zero_with_one_line_when_training_diverges(assets, tmp_path, capsys):
    """F2: the CLI ran the diverged run to the end and exited 0 with `eval_loss: nan`."""
    output_dir = tmp_path / "out"
    code = main(["train", "--recipe", "deit_tiny_ofb", *tiny_overrides(assets, output_dir),
                 "--training.max_steps", "6", "--training.learning_rate", "1e4", "--training.max_grad_norm", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1
    assert len(errors) == 1 and "non-finite (NaN/Inf)" in errors[0] and "step" in errors[0]
    assert not (output_dir / "compressed_model").exists()


def test_the_per_step_record_never_reads_a_tensor_on_the_host(monkeypatch):
    """The per-step path must not synchronise with the device (issue 12 removes every per-step sync): no `.item()`,
    `float()`, `bool()`, `.tolist()` of a tensor, and no tensor built from host data once the record is set up.
    Checked on CPU by making those calls fail; the check itself (one synchronisation) may read."""
    from hf_vit_compress.training.health import TrainingHealth

    health = TrainingHealth()
    state = {"attention.0.alpha": torch.zeros(4), "mlp.0.score_logits": torch.zeros(8), "head_counts": torch.zeros(2)}
    finite = {"loss": torch.tensor(1.0), "task_loss": torch.tensor(0.5), "flops_loss": torch.tensor(0.1)}
    diverged = {**finite, "flops_loss": torch.tensor(float("inf"))}
    health.record_losses(1, finite)  # the first step sets the record up
    health.record_state(1, state)

    def host_read(*args, **kwargs):
        raise AssertionError("the per-step record read a tensor on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, host_read)
        patch.setattr(torch, "tensor", host_read)
        patch.setattr(torch, "as_tensor", host_read)
        health.record_losses(2, finite)
        health.record_state(2, state)
        state["attention.0.alpha"].fill_(float("nan"))
        health.record_losses(3, diverged)
        health.record_state(3, state)
        health.record_losses(4, diverged)
    with pytest.raises(FloatingPointError, match=r"first at optimizer step 3 .*FLOPs loss \[flops_loss\] from step "
                                                 r"3.*OFB architecture logits after step 3 \(compression\.attention"):
        health.check("at the test's check point")

"""A search step costs about a training step: no host-device synchronisation outside logging steps, and the
batched / hand-written pieces that make it cheap compute exactly what the straightforward formulas compute.

(The op counts themselves are a benchmark, `benchmarks/dispatch.py`, not a test: they are measured, not asserted.)
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NUM_LABELS, make_deit_classifier, make_pixel_values, make_vit_classifier
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback, TrainingArguments

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.surgery.gating import Masks, _BlockMix, install_gates
from hf_vit_compress.surgery.residual_width import (
    KeptChannelStatistics,
    _KeptChannelLayerNorm,
    _MeanFill,
    _MeanFilledRows,
)
from hf_vit_compress.training.device_logs import DeviceHistory, DeviceLogAccumulator
from hf_vit_compress.training.trainer import CompressionTrainer

aten = torch.ops.aten
# operations that make the host wait for a CUDA device (a value or an output size read back)
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
           aten.is_nonzero.default, aten._unique2.default, aten.unique_consecutive.default}


class SyncCounter(TorchDispatchMode):
    """Counts, per optimizer step, the dispatched operations that synchronise on CUDA, boolean-mask indexing and
    `Tensor.tolist()` (a CPU run has no real sync, so the operations that would are counted)."""

    def __init__(self):
        super().__init__()
        self.step = -1
        self.per_step: dict[int, list[str]] = {}

    def note(self, what: str) -> None:
        self.per_step.setdefault(self.step, []).append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.note(str(func))
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.note(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _train_counting(tmp_path, method: str, logging_steps: int):
    counter = SyncCounter()
    logged_steps = set()

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counter.step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged_steps.add(state.global_step - 1)

    data = [{"pixel_values": make_pixel_values(1, seed=i)[0], "labels": i % NUM_LABELS} for i in range(64)]
    # one OFB elimination round, after the last steady step (an elimination step may read the device)
    config = CompressionConfig(method=method, target_flops=0.5, search_fraction=1.0, ofb={"elimination_rounds": 1})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                             logging_steps=logging_steps, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = CompressionTrainer(model=make_vit_classifier().train(), args=args, compression_config=config,
                                 train_dataset=data, steps_per_epoch=300, callbacks=[Steps()])
    original_tolist = torch.Tensor.tolist

    def tolist(tensor):
        counter.note("Tensor.tolist")
        return original_tolist(tensor)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            trainer.train()
    finally:
        torch.Tensor.tolist = original_tolist
    return trainer, counter, logged_steps


@pytest.mark.parametrize("method", ["ofb", "uvc"])
def test_search_steps_read_nothing_from_the_device_outside_logging_steps(tmp_path, method):
    trainer, counter, logged = _train_counting(tmp_path, method, logging_steps=5)
    search_steps = trainer.method.total_search_steps  # 12: the last step ends the search (decisions on the host)
    steady = [step for step in range(1, search_steps - 1) if step not in logged]
    assert len(steady) >= 6
    for step in steady:
        assert counter.per_step.get(step, []) == [], (step, counter.per_step.get(step))
    # logging steps do read (one transfer for the method's terms, one for its metrics, the Trainer's own)
    assert any(counter.per_step.get(step) for step in logged)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(math.isfinite(entry["task_loss"]) for entry in logs)


# ---------------------------------------------------------------------------------------------------------------
# The trainer's logging on the device
# ---------------------------------------------------------------------------------------------------------------
def test_device_log_accumulator_means_equal_the_host_means():
    accumulator = DeviceLogAccumulator()
    steps = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 5.0}, {"a": 4.0}, {"a": 6.0, "c": 7.5}]
    for values in steps:
        accumulator.add({name: torch.tensor(value) for name, value in values.items()})
    assert accumulator.last["a"].item() == 6.0 and set(accumulator.last) == {"a", "c"}
    totals = accumulator.totals()  # on the device: per name, its sum and number of steps
    assert totals["a"][0].item() == 14.0 and totals["a"][1] == 4 and totals["c"][1] == 1
    assert accumulator.pop_means() == pytest.approx({"a": 14.0 / 4, "b": 7.0 / 2, "c": 7.5})
    assert accumulator.pop_means() == {}
    accumulator.add({"a": torch.tensor(2.0), "n": 3})  # plain numbers are averaged on the host
    assert accumulator.pop_means() == pytest.approx({"a": 2.0, "n": 3.0})


def test_log_window_keeps_the_runs_for_terms_absent_on_some_steps():
    accumulator = DeviceLogAccumulator()
    steps = [{"task": 1.0, "pmim": 0.5}, {"task": 3.0, "pmim": 0.25}, {"task": 8.0}]  # PMIM off on the last step
    for values in steps:
        accumulator.add({name: torch.tensor(value) for name, value in values.items()})
    window = accumulator.pop_window()
    assert window.steps == 3 and window.names() == {"task", "pmim"}
    assert window.means() == pytest.approx({"task": 4.0, "pmim": 0.375})
    # shares of a per-step average over all 3 steps (0 where absent), optionally over the steps with another name
    assert window.mean_over_window("pmim") == pytest.approx(0.75 / 3)
    assert window.mean_over_window("task", where="pmim") == pytest.approx(4.0 / 3)
    assert accumulator.pop_window().runs == []


def test_device_history_converts_in_bulk_keeping_the_key_order():
    history = DeviceHistory()
    history.append(0, {"lambda": 0.9, "ratio": torch.tensor(0.75), "k": torch.tensor(3)})
    history.append(5, {"lambda": 0.5, "ratio": torch.tensor(0.5), "k": torch.tensor(2)})
    records = history.records()
    assert records == [{"step": 0, "lambda": 0.9, "ratio": 0.75, "k": 3.0},
                       {"step": 5, "lambda": 0.5, "ratio": 0.5, "k": 2.0}]
    assert list(records[0]) == ["step", "lambda", "ratio", "k"]
    assert all(isinstance(value, float) for record in records for key, value in record.items() if key != "step")


# ---------------------------------------------------------------------------------------------------------------
# Hand-written autograd pieces = the plain formulas, values and gradients
# ---------------------------------------------------------------------------------------------------------------
def test_kept_channel_layernorm_equals_the_masked_formula_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, generator=generator, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.float64)
    grad_out = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64)

    # the LayerNorm of the kept channels, written out (the formula MaskedLayerNorm used to compute step by step)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    centered = (x - mean) * keep
    variance = centered.pow(2).sum(-1, keepdim=True) / count
    expected = (centered * torch.rsqrt(variance + 1e-6) * weight + bias) * keep
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), grad_out)

    stats = KeptChannelStatistics(keep, [])
    scale = (keep.shape[-1] / count).sqrt()
    got = _KeptChannelLayerNorm.apply(x, stats.keep_over_count.double(), stats.scaled_keep.double(),
                                      weight * (keep / scale), bias * keep, 1e-6)
    got_grads = torch.autograd.grad(got, (x, weight, bias), grad_out)
    torch.testing.assert_close(got, expected)
    assert not got[..., keep == 0].any()  # dropped channels are exactly 0
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad)


def test_block_mix_equals_run_times_block_plus_one_minus_run_times_input():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    run = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    expected = run * y + (1 - run) * x
    got = _BlockMix.apply(x, y, run)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (x, y, run), grad_out), torch.autograd.grad(expected, (x, y, run),
                                                                                      grad_out)):
        torch.testing.assert_close(a, b)


class _Provider:
    def __init__(self, masks):
        self.masks = masks

    def compute_masks(self):
        return self.masks


def _forward_and_grads(model, masks_of_run, mean_fill: bool = True):
    """Logits and gradients (model weights and the mask leaves) of one forward/backward under the given masks;
    `mean_fill=False` makes every LayerNorm compute the kept channels' statistics itself (as under dropout)."""
    leaves, masks = masks_of_run()
    handle = install_gates(model, _Provider(masks))
    if not mean_fill:
        handle._writer_dropout = 0.5  # what an active dropout after o_proj / fc2 switches (the model has none)
    try:
        model.zero_grad()
        logits = model(pixel_values=make_pixel_values(3, seed=4).to(next(model.parameters()).dtype)).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    finally:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, [leaf.grad.clone() for leaf in leaves]


def test_stacked_masks_with_gradients_are_folded_into_the_weights_exactly_as_per_block_masks():
    """One `(blocks, units)` mask tensor (folded into all q/k/v or fc1 weights at once) gives the logits and the
    gradients of weights and masks that per-block masks folded linear by linear give."""
    model = make_vit_classifier(seed=2).train()
    generator = torch.Generator().manual_seed(3)
    attention_values = torch.rand(2, 32, generator=generator) + 0.5
    mlp_values = torch.rand(2, 64, generator=generator) + 0.5

    def stacked():
        attention, mlp = attention_values.clone().requires_grad_(), mlp_values.clone().requires_grad_()
        return [attention, mlp], Masks(qk=attention * 1.0, v=attention * 1.0, mlp=mlp * 1.0)

    def per_block():
        attention, mlp = attention_values.clone().requires_grad_(), mlp_values.clone().requires_grad_()
        return [attention, mlp], Masks(qk=list(attention * 1.0), v=list(attention * 1.0), mlp=list(mlp * 1.0))

    logits, grads, mask_grads = _forward_and_grads(model, stacked)
    ref_logits, ref_grads, ref_mask_grads = _forward_and_grads(model, per_block)
    torch.testing.assert_close(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    for got, expected in zip(mask_grads, ref_mask_grads):
        torch.testing.assert_close(got, expected)


def test_constant_masks_scale_outputs_as_weight_folding_would():
    model = make_vit_classifier(seed=5).train()
    values = (torch.rand(2, 64, generator=torch.Generator().manual_seed(6)) > 0.3).float()

    def constant():
        return [], Masks(mlp=values)

    def folded():
        leaf = values.clone().requires_grad_()
        return [leaf], Masks(mlp=leaf * 1.0)

    logits, grads, _ = _forward_and_grads(model, constant)
    ref_logits, ref_grads, _ = _forward_and_grads(model, folded)
    torch.testing.assert_close(logits, ref_logits)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert F.mse_loss(logits, ref_logits).item() < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# Pruned residual width: the mean fill = the kept-channel LayerNorms
# ---------------------------------------------------------------------------------------------------------------
KEEP_12 = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.float64)


def _fill_vectors(keep: torch.Tensor, scale: float):
    return scale * keep, scale * keep / keep.sum(), 1.0 - keep


def test_mean_filled_rows_equal_the_formula_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(12, 7, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grad_out = [torch.randn(12, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    keep, scale = KEEP_12, 1.7
    mean_rows = [(w * keep[:, None]).sum(0) / keep.sum() for w in weights]
    expected = [scale * torch.where(keep[:, None].bool(), w, mean) for w, mean in zip(weights, mean_rows)]
    expected_grads = torch.autograd.grad(expected, weights, grad_out)
    got = _MeanFilledRows.apply(*_fill_vectors(keep, scale), *weights)
    got_grads = torch.autograd.grad(got, weights, grad_out)
    for a, b in zip((*got, *got_grads), (*expected, *expected_grads)):
        torch.testing.assert_close(a, b)


def test_mean_fill_equals_the_formula_and_its_gradients():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64)
    keep, scale = KEEP_12, 1.7
    expected = scale * torch.where(keep.bool(), x, (x * keep).sum(-1, keepdim=True) / keep.sum())
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    got = _MeanFill.apply(x, *_fill_vectors(keep, scale))
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize("builder", [make_vit_classifier, make_deit_classifier], ids=["vit", "deit"])
def test_mean_filled_residual_gives_the_kept_channel_layernorms_logits_and_gradients(builder):
    """With residual channels dropped, the mean fill (plain LayerNorms) and the kept-channel LayerNorms compute the
    same logits and the same gradients of every weight, the dropped rows' included (up to float32 rounding,
    relative to each gradient's scale: the tiny DeiT's all-zero class tokens have no variance, so their gradients
    are ~1e4)."""
    model = builder(seed=7).train()
    keep = (torch.rand(32, generator=torch.Generator().manual_seed(8)) > 0.4).float()
    mlp = (torch.rand(2, 64, generator=torch.Generator().manual_seed(9)) > 0.3).float()

    def masks():
        return [], Masks(mlp=mlp, hidden_keep=keep, hidden_min_kept=int(keep.sum()))

    logits, grads, _ = _forward_and_grads(model, masks)
    ref_logits, ref_grads, _ = _forward_and_grads(model, masks, mean_fill=False)
    torch.testing.assert_close(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = max(ref_grads[name].abs().max().item(), 1.0)  # (k_proj.bias: exactly 0 up to rounding)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert 0 < keep.sum() < 32


def test_mean_fill_is_off_while_a_dropout_after_o_proj_or_fc2_trains():
    model = make_vit_classifier(seed=10, hidden_dropout_prob=0.1)
    keep = torch.ones(32)
    keep[::3] = 0
    handle = install_gates(model, _Provider(Masks(hidden_keep=keep, hidden_min_kept=int(keep.sum()))))
    try:
        modes = {}
        for training in (True, False):
            model.train(training)
            model(pixel_values=make_pixel_values(2))
            modes[training] = handle.kept_channel_statistics().fill
    finally:
        handle.remove()
    assert modes == {True: False, False: True}


@pytest.mark.parametrize("kept", [1, 7, 8])
def test_mean_fill_needs_enough_kept_channels_and_both_paths_match_the_export(kept):
    """Under `MIN_FILL_CHANNELS` kept residual channels the LayerNorms compute the kept channels' statistics (one
    kept channel has no variance: the fill's rounding would be all they see); either way the gated model computes
    what the exported model computes."""
    from hf_vit_compress.surgery.architecture import Architecture, LayerArchitecture
    from hf_vit_compress.surgery.export import export_compressed_model
    from hf_vit_compress.surgery.gating import apply_architecture
    from hf_vit_compress.surgery.residual_width import MIN_FILL_CHANNELS

    model = make_vit_classifier(seed=11).eval()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    layer = LayerArchitecture(list(range(config.num_attention_heads)),
                              [list(range(head_dim))] * config.num_attention_heads,
                              [list(range(head_dim))] * config.num_attention_heads,
                              list(range(config.intermediate_size)))
    architecture = Architecture(layers=[layer] * config.num_hidden_layers,
                                hidden_channels=list(range(3, 3 + kept)))
    pixels = make_pixel_values(2)
    with torch.no_grad(), apply_architecture(model, architecture) as handle:
        gated = model(pixel_values=pixels).logits
        fill = handle.kept_channel_statistics().fill
        exported = export_compressed_model(model, architecture)(pixel_values=pixels).logits
    assert fill == (kept >= MIN_FILL_CHANNELS)
    torch.testing.assert_close(exported, gated, rtol=0, atol=1e-5)

"""The latency model (`hf_vit_compress.surgery.latency`): a table builds on a tiny ViT, saves, reloads and predicts
its own grid points exactly, interpolates linearly between them, and refuses a run with another key."""

from __future__ import annotations

import json

import pytest
from conftest import make_compressed_config, tiny_deit_config, tiny_vit_config

from hf_vit_compress.cli import main
from hf_vit_compress.surgery.latency import LatencyGrid, LatencyTable, build_latency_table, latency_key


@pytest.fixture(scope="module")
def table():
    return build_latency_table(tiny_vit_config(), batch_size=2, warmup=1, repeats=2, progress=False)


def test_a_table_builds_saves_reloads_and_predicts_its_grid_points_exactly(table, tmp_path):
    path = table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(path, expected_key=latency_key(tiny_vit_config(), batch_size=2))
    assert loaded.to_dict() == table.to_dict()
    g = loaded.grid
    for i, hidden in enumerate(g.hidden):
        assert loaded.predict_stem(hidden) == pytest.approx(table.stem_ms[i], rel=1e-12)
        for j, heads in enumerate(g.heads):
            for k, qk in enumerate(g.qk_head_dims):
                for m, v in enumerate(g.v_head_dims):
                    assert loaded.predict_unfused_attention(hidden, heads, qk, v) == pytest.approx(
                        table.attention_ms[i][j][k][m], rel=1e-12)
                # equal head dims run (and are priced by) the fused cells; unequal ones by the unfused cells
                assert loaded.predict_attention(hidden, heads, qk, qk) == pytest.approx(
                    table.fused_attention_ms[i][j][k], rel=1e-12)
                other = g.v_head_dims[-1] if qk != g.v_head_dims[-1] else g.v_head_dims[0]
                assert loaded.predict_attention(hidden, heads, qk, other) == pytest.approx(
                    table.attention_ms[i][j][k][g.v_head_dims.index(other)], rel=1e-12)
        for j, width in enumerate(g.mlp):
            assert loaded.predict_mlp(hidden, width) == pytest.approx(table.mlp_ms[i][j], rel=1e-12)
    assert all(value > 0 for value in table.stem_ms)


def test_predictions_are_piecewise_linear_between_grid_points(table):
    g = table.grid
    middle = (g.mlp[0] + g.mlp[1]) / 2
    expected = (table.mlp_ms[0][0] + table.mlp_ms[0][1]) / 2
    assert table.predict_mlp(g.hidden[0], middle) == pytest.approx(expected)
    assert table.predict_attention(g.hidden[0], 0, 4, 4) == 0.0  # a block without heads adds only a bias


def test_a_model_is_predicted_as_stem_plus_its_blocks(table):
    config = make_compressed_config()
    expected = table.predict_stem(config.hidden_size) + sum(
        table.predict_attention(config.hidden_size, layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"])
        + table.predict_mlp(config.hidden_size, layer["intermediate_size"]) for layer in config.layers)
    assert table.predict_config(config) == pytest.approx(expected)
    assert table.predict_config(tiny_vit_config()) > table.predict_stem(tiny_vit_config().hidden_size)


@pytest.mark.parametrize("field, change", [("batch_size", dict(batch_size=8)), ("dtype", dict(dtype="bfloat16")),
                                           ("attn_implementation", dict(attn_implementation="eager"))])
def test_a_table_for_another_setting_is_refused_naming_the_field(table, tmp_path, field, change):
    path = table.save(tmp_path / "table.json")
    key = latency_key(tiny_vit_config(), **{"batch_size": 2, **change})
    with pytest.raises(ValueError, match=rf"measured under another setting \({field}: "):
        LatencyTable.load(path, expected_key=key)


def test_a_deit_key_counts_the_distillation_token():
    assert latency_key(tiny_deit_config(), 1).tokens == latency_key(tiny_vit_config(), 1).tokens + 1


def test_bad_grids_and_files_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"LatencyGrid.heads=\[2, 1\] is invalid"):
        LatencyGrid(hidden=[8], heads=[2, 1], qk_head_dims=[2], v_head_dims=[2], mlp=[8]).validate()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read"):
        LatencyTable.load(tmp_path / "bad.json")


def test_the_cli_builds_a_table(tmp_path, capsys):
    from conftest import make_vit_classifier

    make_vit_classifier().save_pretrained(tmp_path / "dense")
    output = tmp_path / "table.json"
    code = main(["profile-latency", str(tmp_path / "dense"), "--output", str(output), "--batch-size", "2",
                 "--points", "2", "--repeats", "1", "--warmup", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads(output.read_text())
    assert saved["key"]["batch_size"] == 2 and len(saved["grid"]["hidden"]) == 2
    assert "wrote" in capsys.readouterr().out
    assert main(["profile-latency", str(tmp_path / "missing"), "--output", str(output)]) == 2


def test_the_latency_benchmark_reports_its_prediction_errors(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import latency_table

    results = latency_table.main(["--quick", "--batches", "1", "--heldout", "2", "--models", "1",
                                  "--output-dir", str(tmp_path)])
    (cell,) = results["cells"]
    assert cell["shape"] == "deit-tiny" and cell["cells"] > 0
    for kind in ("attention", "mlp", "model"):
        assert all(predicted > 0 and measured > 0 for predicted, measured in cell[kind]["pairs_ms"])
        assert cell[kind]["median_error"] >= 0
    assert (tmp_path / "latency_table_quick.md").read_text().count("deit-tiny") == 1


def test_the_differentiable_cost_matches_the_table_and_its_gradient_is_the_slope(table):
    import torch

    from hf_vit_compress.surgery.latency import LatencyCost

    cost = LatencyCost(table)
    g = table.grid
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        point = [float(torch.empty(()).uniform_(axis[0], axis[-1], generator=generator))
                 for axis in (g.hidden, g.heads, g.qk_head_dims, g.v_head_dims)]
        width = float(torch.empty(()).uniform_(g.mlp[0], g.mlp[-1], generator=generator))
        assert cost.attention(*map(torch.tensor, point)).item() == pytest.approx(table.predict_attention(*point))
        equal = [point[0], point[1], point[2], point[2]]  # equal head dims: the fused cells
        assert cost.attention(*map(torch.tensor, equal)).item() == pytest.approx(table.predict_attention(*equal))
        assert cost.mlp(torch.tensor(point[0]), torch.tensor(width)).item() == pytest.approx(
            table.predict_mlp(point[0], width))
    # batched, with gradients: d(latency)/d(width) is the slope of the interval the width lies in
    widths = torch.tensor([float(g.mlp[0] + g.mlp[1]) / 2, float(g.mlp[1] + g.mlp[2]) / 2], requires_grad=True)
    hidden = torch.full((2,), float(g.hidden[0]))
    cost.mlp(hidden, widths).sum().backward()
    slopes = [(table.mlp_ms[0][i + 1] - table.mlp_ms[0][i]) / (g.mlp[i + 1] - g.mlp[i]) for i in (0, 1)]
    assert widths.grad.tolist() == pytest.approx(slopes, rel=1e-4)
    assert cost.attention(hidden, torch.zeros(2), hidden, hidden).tolist() == [0.0, 0.0]


def test_the_block_calibration_fits_the_two_whole_models_timed_with_the_table(table):
    models = table.meta["whole_models"]
    assert models["num_layers"] == tiny_vit_config().num_hidden_layers
    assert all(models[corner]["measured_ms"] > 0 for corner in ("narrow", "dense"))
    scale, offset = table.block_calibration()
    assert 0.5 <= scale <= 2.0 and offset >= 0.0
    # a whole model 1.2x its parts plus 0.1 ms per block is recovered exactly
    count = models["num_layers"]
    stems = [table.predict_stem(table.grid.hidden[0]), table.predict_stem(table.grid.hidden[-1])]
    for corner, stem, block in zip(("narrow", "dense"), stems, (0.2, 0.5)):
        models[corner]["parts_ms"] = stem + block * count
        models[corner]["measured_ms"] = stem + (1.2 * block + 0.1) * count
    assert table.block_calibration() == pytest.approx((1.2, 0.1))
    table.meta.pop("whole_models")
    assert table.block_calibration() == (1.0, 0.0)  # a table without them (an older file) is priced as its parts


def test_equal_head_dims_get_fused_cells_and_the_unfused_diagonal_runs_without_flash():
    import torch

    from hf_vit_compress.surgery.latency import _table_cells, _WithoutFlash

    config = tiny_vit_config()
    grid = LatencyGrid.for_model(config, 2)
    cells = _table_cells(config, grid, latency_key(config, 1).tokens, 1, "sdpa", torch.device("cpu"), torch.float32)
    for (kind, *index), (module, states) in cells.items():
        if kind == "fused":
            attention = module.attention
            assert attention.qk_head_dim == attention.v_head_dim == grid.qk_head_dims[index[2]]
        if kind == "attention":
            qk, v = grid.qk_head_dims[index[2]], grid.v_head_dims[index[3]]
            assert isinstance(module, _WithoutFlash) == (qk == v)
            if qk == v:  # the same computation, only another kernel
                torch.testing.assert_close(module(states), module.part(states))
    assert sum(kind == "fused" for kind, *_ in cells) == len(grid.hidden) * len(grid.heads) * len(grid.qk_head_dims)

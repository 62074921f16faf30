"""Scale-out: data-parallel correctness (2 CPU processes, gloo), resume, and streaming training.

`tests/scripts/ddp_search.py` runs in 2 processes launched once (torchrun): an OFB search + fine-tune, the same run
stopped after a checkpoint and resumed from it, a run where rank 1's search state is perturbed right before the
search ends, and a UVC search. Every rank writes what it decided; the tests compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import make_vit_classifier
from transformers import TrainingArguments

from hf_vit_compress import CompressionConfig, count_macs
from hf_vit_compress.data import (
    collate_images,
    load_image_dataset,
    prepare_dataset,
    shuffle_stream,
    transforms_from_image_processor,
)
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.training.trainer import CompressionTrainer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "ddp_search.py"
PHASES = ("full", "stop", "resume", "diverge", "uvc")



# ---------------------------------------------------------------------------------------------------------------
# 2 processes
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")]), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"2-process run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    records = {}
    for phase in PHASES:
        for rank in (0, 1):
            records[phase, rank] = json.loads((out / f"{phase}_rank{rank}.json").read_text())
    return out, records


def test_ddp_setup(ddp_run):
    _, records = ddp_run
    for (phase, rank), record in records.items():
        assert record["world_size"] == 2 and record["rank"] == rank
        assert record["wrapped"] == "DistributedDataParallel"
        assert record["find_unused_parameters"] is False  # set by CompressionTrainer when the user did not


@pytest.mark.parametrize("phase", PHASES)
def test_every_rank_decides_the_same(ddp_run, phase):
    _, records = ddp_run
    rank0, rank1 = records[phase, 0], records[phase, 1]
    assert rank0["finalized"] and rank1["finalized"]
    assert rank0["architecture"] == rank1["architecture"]
    assert rank0["digest"] == rank1["digest"]  # alpha, S, active candidates, keep sets / theta, counts, duals
    assert rank0["step_digests"] == rank1["step_digests"]  # ... after every optimizer step
    assert rank0["logits"] == rank1["logits"]
    assert rank0["compressed_macs"] <= rank0["target_macs"]


def test_ranks_were_checked_at_train_begin_and_end_of_search(ddp_run):
    _, records = ddp_run
    for phase in ("full", "resume", "uvc"):
        for rank in (0, 1):
            checks = [(when, agreed) for when, agreed, _ in records[phase, rank]["sync_results"]]
            assert checks == [("train begin", True), ("end of search", True)]
    stop_checks = [(when, agreed) for when, agreed, _ in records["stop", 0]["sync_results"]]
    assert stop_checks == [("train begin", True), ("train end", True)]  # stopped mid-search: finalised at the end


def test_a_rank_that_diverged_is_detected_and_overruled(ddp_run):
    _, records = ddp_run
    (when0, agreed0, before0), (when1, agreed1, before1) = (records["diverge", r]["sync_results"][-1] for r in (0, 1))
    assert when0 == when1 == "end of search" and agreed0 is False and agreed1 is False
    assert before0 != before1  # rank 1 had fixed another architecture ...
    assert records["diverge", 1]["architecture"] == before0  # ... and now holds rank 0's


def test_saved_model_is_rank0_export(ddp_run):
    out, records = ddp_run
    folder = out / "full" / "model"
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []  # no staging leftovers
    saved = CompressedViTForImageClassification.from_pretrained(folder).eval()
    pixel_values = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # as in the script
    with torch.no_grad():
        logits = saved(pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, torch.tensor(records["full", 0]["logits"]), atol=1e-5, rtol=1e-5)
    assert json.loads((folder / "architecture.json").read_text()) == records["full", 0]["architecture"]
    assert count_macs(saved) == records["full", 0]["compressed_macs"]


def test_resumed_run_matches_the_uninterrupted_one(ddp_run):
    out, records = ddp_run
    assert records["stop", 0]["global_step"] == 3 and (out / "stop" / "checkpoint-3").is_dir()
    full, resumed = records["full", 0], records["resume", 0]
    assert resumed["global_step"] == full["global_step"] == 8
    assert resumed["architecture"] == full["architecture"]
    assert resumed["digest"] == full["digest"]  # bit-identical search state, not just the same shapes
    assert all(full["step_digests"][step] == digest for step, digest in resumed["step_digests"].items())
    assert resumed["logits"] == full["logits"]


# ---------------------------------------------------------------------------------------------------------------
# One process: settings
# ---------------------------------------------------------------------------------------------------------------
def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                  per_device_train_batch_size=4, dataloader_num_workers=0, remove_unused_columns=False)
    return TrainingArguments(**{**values, **overrides})


def test_ddp_find_unused_parameters_defaults_to_false_and_true_is_rejected(tmp_path):
    args = _args(tmp_path)
    assert args.ddp_find_unused_parameters is None
    CompressionTrainer(model=make_vit_classifier(), args=args, compression_config=CompressionConfig())
    assert args.ddp_find_unused_parameters is False
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True is not supported.*allowed False or None"):
        CompressionTrainer(model=make_vit_classifier(), args=_args(tmp_path, ddp_find_unused_parameters=True),
                           compression_config=CompressionConfig())
    with pytest.raises(ValueError, match="steps_per_epoch=0 is invalid"):
        CompressionTrainer(model=make_vit_classifier(), args=_args(tmp_path), compression_config=CompressionConfig(),
                           steps_per_epoch=0)


def test_search_state_digest_and_broadcast_outside_a_process_group():
    from hf_vit_compress.methods import build_method

    first = build_method(make_vit_classifier(), CompressionConfig())
    second = build_method(make_vit_classifier(), CompressionConfig())
    second.load_state_dict(first.state_dict())
    assert first.state_digest() == second.state_digest()
    with torch.no_grad():
        second.embed.alpha[0] += 1e-7
    assert first.state_digest() != second.state_digest()
    second.broadcast_state()  # no process group: nothing to do, nothing raised


# ---------------------------------------------------------------------------------------------------------------
# Streaming (ImageNet-style): an IterableDataset read from local parquet shards
# ---------------------------------------------------------------------------------------------------------------
def _write_shards(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    paths = []
    for shard in range(2):
        images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(16)]
        table = datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(16)]}, features=features)
        paths.append(str(folder / f"train-{shard:05d}-of-00002.parquet"))
        table.to_parquet(paths[-1])
    return paths


class EliminationLog:
    """Global steps at which the method ran candidate elimination (wraps the embedding module's `eliminate`)."""

    def __init__(self, trainer):
        self.steps: list[int] = []
        self.trainer = trainer
        method = trainer.method
        original = method.embed.eliminate

        def eliminate(threshold):
            self.steps.append(self.trainer.state.global_step)
            return original(threshold)

        method.embed.eliminate = eliminate


@pytest.mark.parametrize("steps_per_epoch", [4, None])
def test_streaming_search(tmp_path, steps_per_epoch):
    files = _write_shards(tmp_path)
    stream = load_image_dataset("parquet", "train", streaming=True, data_files={"train": files})
    assert isinstance(stream, datasets.IterableDataset)
    train_transform, _ = transforms_from_image_processor(None, 16, mean=0.5, std=0.5, scale=(0.5, 1.0), seed=0)
    stream = prepare_dataset(shuffle_stream(stream, seed=0, buffer_size=8, max_buffer_input_shards=1),
                             train_transform)
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5)
    config.ofb.budget_control = "paper"  # per-epoch elimination: what a stream's epoch length matters to
    config.ofb.eliminations_per_epoch = 2.0
    trainer = CompressionTrainer(model=make_vit_classifier().train(), args=_args(tmp_path, max_steps=8),
                                 compression_config=config, train_dataset=stream, data_collator=collate_images,
                                 steps_per_epoch=steps_per_epoch)
    log = EliminationLog(trainer)
    trainer.train()
    method = trainer.method
    assert trainer.state.global_step == 8 and method.search_finished
    assert method.total_search_steps == 4
    if steps_per_epoch is None:  # no length, no hint: the whole run is one epoch (interval 8 / 2 = 4)
        assert method.steps_per_epoch == 8 and log.steps == [4]
    else:  # 4 steps per epoch, 2 eliminations per epoch: every 2 steps of the search
        assert method.steps_per_epoch == 4 and log.steps == [2, 4]
    compressed = trainer.export_compressed_model()
    assert count_macs(compressed) <= method.target_macs

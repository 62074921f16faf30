"""Resume is exact through every entry point (issue 10: F4, F5, F11, F12, F16).

The headline test kills a real `hf-vit-compress train` process mid-search (SIGKILL), resumes it with
`--training.resume_from_checkpoint last`, and compares the final compressed model (architecture and every weight)
bit for bit with an uninterrupted run, on parquet images with random-resized-crop + flip augmentation on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import make_vit_classifier
from safetensors.torch import load_file

from hf_vit_compress.cli import main

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32


def write_images(path: Path, count: int, seed: int) -> str:
    """`count` random 40x40 RGB images (5 classes) as one parquet shard: crops of 32 px leave room to augment."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(count)]
    datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(count)]},
                               features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume_assets")
    model = make_vit_classifier(seed=0, image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64)
    model.save_pretrained(folder / "tiny_vit")
    return {"model": str(folder / "tiny_vit"), "train": write_images(folder / "train.parquet", 48, 0),
            "validation": write_images(folder / "validation.parquet", 8, 1)}


def train_arguments(assets, output_dir: Path, *extra: str) -> list[str]:
    """A real recipe on map-style parquet data with its augmentation (random resized crop, flips) on."""
    return [
        "train", "--recipe", "deit_tiny_ofb",
        "--model.model_name_or_path", assets["model"],
        "--data.dataset_name", "parquet", "--data.streaming", "false",
        "--data.train_files", assets["train"], "--data.eval_files", assets["validation"],
        "--data.random_crop_min_scale", "0.3", "--data.hflip_prob", "0.5",
        "--compression.search_fraction", "0.75", "--compression.ofb.arch_lr", "0.05",
        "--training.output_dir", str(output_dir),
        "--training.max_steps", "40", "--training.save_strategy", "steps", "--training.save_steps", "4",
        "--training.per_device_train_batch_size", "8", "--training.per_device_eval_batch_size", "8",
        "--training.dataloader_num_workers", "0", "--training.logging_steps", "4",
        "--training.use_cpu", "true", "--training.disable_tqdm", "true",
        *extra,
    ]


def start(arguments: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "hf_vit_compress", *arguments], cwd=REPO, env=env,
                            stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def final_model(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = output_dir / "compressed_model"
    return json.loads((folder / "architecture.json").read_text()), load_file(str(folder / "model.safetensors"))


def assert_bit_identical(first: Path, second: Path) -> None:
    (architecture_a, weights_a), (architecture_b, weights_b) = final_model(first), final_model(second)
    assert architecture_a == architecture_b
    assert weights_a.keys() == weights_b.keys()
    different = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in output_dir.glob("checkpoint-*"))


def test_a_killed_cli_run_resumes_to_the_bit_identical_model(assets, tmp_path):
    """F4: SIGKILL mid-search, then `--training.resume_from_checkpoint last`, through the CLI, augmentation on."""
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = start(train_arguments(assets, uninterrupted), tmp_path / "uninterrupted.log")
    victim = start(train_arguments(assets, killed), tmp_path / "killed.log")
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():
        assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never wrote checkpoint-8"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "compressed_model").exists()  # it did not finish
    assert 8 <= max(checkpoint_steps(killed)) < 30  # killed mid-search (the search ends at step 30 of 40)

    resumed = start(train_arguments(assets, killed, "--training.resume_from_checkpoint", "last"),
                    tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")
    finish(reference, tmp_path / "uninterrupted.log")
    assert_bit_identical(uninterrupted, killed)


# ---------------------------------------------------------------------------------------------------------------
# In-process resume: F5, F11, F12, F16 (Python API; F11 also through the CLI)
# ---------------------------------------------------------------------------------------------------------------
def ofb_trainer(output_dir: Path, **overrides):
    from conftest import tiny_dataset, training_args

    from hf_vit_compress.config import CompressionConfig
    from hf_vit_compress.training.trainer import CompressionTrainer

    values = dict(max_steps=12, save_strategy="steps", save_steps=4, logging_steps=4)
    values.update(overrides)
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.75)
    return CompressionTrainer(model=make_vit_classifier(seed=0), args=training_args(output_dir, **values),
                              compression_config=config, train_dataset=tiny_dataset(40))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 12-step OFB run (5 steps per epoch) with checkpoints at steps 4, 8 and 12."""
    output_dir = tmp_path_factory.mktemp("finished_run")
    trainer = ofb_trainer(output_dir)
    trainer.train()
    assert checkpoint_steps(output_dir) == [4, 8, 12]
    return output_dir, {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}


def copy_checkpoint(finished_run, step: int, destination: Path) -> Path:
    import shutil

    target = destination / f"checkpoint-{step}"
    shutil.copytree(finished_run[0] / f"checkpoint-{step}", target)
    return target


def test_resuming_the_last_checkpoint_of_a_run_ending_mid_epoch_trains_no_extra_step(tmp_path):
    """F16: the plain Trainer ran one more step (global_step 8 of max_steps 7) when the run's last step was not at
    an epoch's end. Decided: the run is complete; `train` loads the checkpoint and returns."""
    first = ofb_trainer(tmp_path / "a", max_steps=7, save_steps=7)
    first.train()
    assert checkpoint_steps(tmp_path / "a") == [7]
    weights = {name: tensor.clone() for name, tensor in first.model.state_dict().items()}

    second = ofb_trainer(tmp_path / "b", max_steps=7, save_steps=7)
    second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-7"))
    assert second.state.global_step == 7
    resumed = second.model.state_dict()
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)
    assert second.method.search_finished


@pytest.mark.parametrize("dropped", ["compression.", "vit.layers.1."])
def test_a_checkpoint_without_the_search_state_or_a_block_is_an_error(finished_run, tmp_path, dropped):
    """F5: the Trainer's non-strict load only warned "missing keys" and restarted the search mid-schedule."""
    from safetensors.torch import save_file

    checkpoint = copy_checkpoint(finished_run, 4, tmp_path)
    weights = load_file(str(checkpoint / "model.safetensors"))
    save_file({name: tensor for name, tensor in weights.items() if not name.startswith(dropped)},
              str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    trainer = ofb_trainer(tmp_path / "out")
    expected = "compression search state" if dropped == "compression." else r"model tensors, e\.g\. \['vit\.layers\.1"
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint} lacks .*{expected}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("name", ["model.safetensors", "rng_state.pth", "trainer_state.json", "optimizer.pt"])
def test_a_truncated_checkpoint_file_is_named(finished_run, tmp_path, name):
    """F12: safetensors' "incomplete metadata", torch's `OSError: [Errno 22]`, json's JSONDecodeError named no file."""
    checkpoint = copy_checkpoint(finished_run, 8, tmp_path)
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = ofb_trainer(tmp_path / "out")
    with pytest.raises(ValueError, match=f"{path}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


def test_resume_last_skips_a_checkpoint_cut_short_by_a_kill(finished_run, tmp_path, caplog):
    """F11 (Python API): `train(resume_from_checkpoint=True)` picked checkpoint-12 although its save had been
    interrupted (no trainer_state.json) and failed; it now resumes from checkpoint-8, with a warning."""
    output_dir = tmp_path / "run"
    copy_checkpoint(finished_run, 4, output_dir)
    copy_checkpoint(finished_run, 8, output_dir)
    (copy_checkpoint(finished_run, 12, output_dir) / "trainer_state.json").unlink()
    trainer = ofb_trainer(output_dir)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=True)
    assert "skipping checkpoint-12" in caplog.text and "trainer_state.json" in caplog.text
    assert trainer.state.global_step == 12
    final = trainer.model.state_dict()
    assert all(torch.equal(final[name], finished_run[1][name]) for name in finished_run[1])  # as uninterrupted


def test_cli_resume_last_skips_a_checkpoint_cut_short_by_a_kill(assets, tmp_path, capsys, caplog):
    """F11 through the CLI: the newest checkpoint's save was interrupted (trainer_state.json half written)."""
    output_dir = tmp_path / "run"
    steps = ["--training.max_steps", "8", "--training.save_total_limit", "5"]
    assert main(train_arguments(assets, output_dir, *steps)) == 0
    assert checkpoint_steps(output_dir) == [4, 8]
    state = output_dir / "checkpoint-8" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    import shutil

    shutil.rmtree(output_dir / "compressed_model")
    with caplog.at_level("WARNING"):
        code = main(train_arguments(assets, output_dir, *steps, "--training.resume_from_checkpoint", "last"))
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "skipping checkpoint-8" in caplog.text and "trainer_state.json cannot be read" in caplog.text
    report = json.loads((output_dir / "compression_report.json").read_text())
    assert report["steps"] == 8 and (output_dir / "compressed_model" / "model.safetensors").is_file()


def test_a_streamed_run_resumes_bit_identically_within_its_first_pass(assets, tmp_path):
    """F4, streaming data: the augmentation of a streamed example is keyed by its position in the epoch's stream,
    which a resumed run re-reads (the Trainer skips a stream's done batches by reading them). Exact within the
    first pass over the stream: for a stream the Trainer counts the whole run as one epoch, so it cannot skip into
    a later pass (a transformers limitation, documented in the README)."""
    import shutil

    streamed = ["--data.streaming", "true", "--data.shuffle_buffer_size", "16", "--data.shuffle_buffer_input_shards",
                "1", "--training.max_steps", "6", "--training.save_total_limit", "5",  # 48 examples = 6 batches
                "--training.dataloader_num_workers", "2", "--data.eval_split", "null"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert main(train_arguments(assets, uninterrupted, *streamed)) == 0
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-4", resumed / "checkpoint-4")
    assert main(train_arguments(assets, resumed, *streamed, "--training.resume_from_checkpoint", "last")) == 0
    assert_bit_identical(uninterrupted, resumed)


def test_map_style_resume_in_a_later_epoch_with_persistent_workers_is_bit_identical(assets, tmp_path):
    """F4 with DataLoader workers that outlive an epoch: the epoch that keys the augmentation reaches them through
    shared memory. 48 examples = 6 steps per epoch; resumed at step 8, in the second epoch."""
    import shutil

    workers = ["--training.max_steps", "12", "--training.save_total_limit", "5", "--training.dataloader_num_workers",
               "2", "--training.dataloader_persistent_workers", "true", "--data.eval_split", "null"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert main(train_arguments(assets, uninterrupted, *workers)) == 0
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-8", resumed / "checkpoint-8")
    assert main(train_arguments(assets, resumed, *workers, "--training.resume_from_checkpoint", "last")) == 0
    assert_bit_identical(uninterrupted, resumed)

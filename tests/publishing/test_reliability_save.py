"""Saving never deletes what it did not write, and no interruption loses the model (issue 10: F1, F3, F13, and the
save fault-injection test).

`save_atomically` is interrupted at each of its file-system steps (the writer, every write, rename, folder swap and
removal), once as an exception (its handlers run) and once as a simulated kill (from that step on nothing of the
save runs any more, handlers included), in a new folder, a folder of its own and a folder shared with checkpoints
and user files, with and without the atomic folder swap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_compressed_model, make_vit_classifier, tiny_dataset, training_args

from hf_vit_compress import save_atomically
from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.training.trainer import CompressionTrainer

CONTROL_DIR = ".hf_vit_compress"  # saving.CONTROL_DIR (spelled out so the F-tests also run on version 0.1)


def saving_module():
    import hf_vit_compress.publishing.saving as saving

    return saving


def digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest), except top-level entries in `skip`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in skip
    }


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def loaded_weights(folder: Path) -> dict[str, torch.Tensor]:
    return weights_of(CompressedViTForImageClassification.from_pretrained(folder))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def add_user_files(folder: Path) -> None:
    """What a training output folder holds besides a model: checkpoints and the user's own notes."""
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (folder / "notes.txt").write_text("my notes")


# ---------------------------------------------------------------------------------------------------------------
# F1: saving into a folder with other content keeps it
# ---------------------------------------------------------------------------------------------------------------
def test_trainer_save_model_into_output_dir_keeps_checkpoints_and_user_files(tmp_path):
    """F1: the usual `trainer.save_model(trainer.args.output_dir)` after a run with checkpoints."""
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5)
    trainer = CompressionTrainer(
        model=make_vit_classifier(seed=0), compression_config=config, train_dataset=tiny_dataset(40),
        args=training_args(tmp_path / "run", max_steps=10, save_strategy="steps", save_steps=5),
    )
    trainer.train()
    output_dir = Path(trainer.args.output_dir)
    (output_dir / "notes.txt").write_text("my notes")
    before = digest(output_dir)
    assert {"checkpoint-5/trainer_state.json", "checkpoint-10/trainer_state.json", "notes.txt"} <= set(before)

    trainer.save_model(trainer.args.output_dir)

    after = digest(output_dir)
    assert {name: after.get(name) for name in before} == before  # every checkpoint file and the notes, unchanged
    loaded = CompressedViTForImageClassification.from_pretrained(output_dir)
    assert same(weights_of(loaded), weights_of(trainer.export_compressed_model()))
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["run"]


def test_saving_into_a_shared_folder_replaces_only_our_own_files(tmp_path):
    output_dir = tmp_path / "out"
    add_user_files(output_dir)
    user_files = digest(output_dir)
    first, second = make_compressed_model(seed=0), make_compressed_model(seed=1)

    save_atomically(first, output_dir, max_shard_size="20KB")  # sharded: model-0000k-of-0000n + index
    assert len(list(output_dir.glob("model-*-of-*.safetensors"))) > 1
    assert same(loaded_weights(output_dir), weights_of(first))

    save_atomically(second, output_dir, extra_files={"architecture.json": "{}\n"})  # one file now
    assert same(loaded_weights(output_dir), weights_of(second))
    assert not list(output_dir.glob("model-*-of-*.safetensors"))  # our stale shards are gone ...
    assert not (output_dir / "model.safetensors.index.json").exists()
    assert {name: digest(output_dir)[name] for name in user_files} == user_files  # ... the user's files are not
    manifest = json.loads((output_dir / CONTROL_DIR / "manifest.json").read_text())
    assert "architecture.json" in manifest["files"] and "notes.txt" not in manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (output_dir / CONTROL_DIR).iterdir()) == ["manifest.json"]


def test_a_user_file_under_a_name_the_save_writes_is_not_overwritten(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "README.md").write_text("my own readme")
    with pytest.raises(ValueError, match="README.md"):
        save_atomically(make_compressed_model(), output_dir, extra_files={"README.md": "# model card\n"})
    assert (output_dir / "README.md").read_text() == "my own readme"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_readme_written_by_the_previous_save_is_replaced(tmp_path):
    output_dir = tmp_path / "out"
    save_atomically(make_compressed_model(seed=0), output_dir, extra_files={"README.md": "card 1\n"})
    save_atomically(make_compressed_model(seed=1), output_dir, extra_files={"README.md": "card 2\n"})
    assert (output_dir / "README.md").read_text() == "card 2\n"


# ---------------------------------------------------------------------------------------------------------------
# F3: a path that is a file
# ---------------------------------------------------------------------------------------------------------------
def test_saving_to_a_path_that_is_a_file_is_an_error(tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("results")
    with pytest.raises(ValueError, match="is a file"):
        save_atomically(make_compressed_model(), report)
    assert report.read_text() == "results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


def test_a_model_with_non_finite_weights_is_not_saved(tmp_path):
    model = make_compressed_model()
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"vit\.layers\.0\.mlp\.fc1\.weight"):
        save_atomically(model, tmp_path / "out")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# F13: what an interrupted save leaves is recovered or cleaned up by the next one
# ---------------------------------------------------------------------------------------------------------------
def test_leftovers_of_an_interrupted_two_rename_save_are_recovered(tmp_path):
    """F13 as version 0.1 left it: killed between its two renames, the good folder survived only as
    `.out.old-PID-TOKEN`, and staging folders `.out.partial-PID-TOKEN` piled up. The next save puts the good folder
    back first (so even a failing save leaves it at the path) and removes the staging folders."""
    good = make_compressed_model(seed=0)
    good.save_pretrained(tmp_path / ".out.old-999999-0123abcd")
    (tmp_path / ".out.partial-999998-89abcdef").mkdir()
    (tmp_path / ".out.partial-999998-89abcdef" / "config.json").write_text("{half")
    failing = make_compressed_model(seed=1)

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    failing.save_pretrained = broken_writer
    with pytest.raises(OSError, match="disk full"):
        save_atomically(failing, tmp_path / "out")

    assert same(loaded_weights(tmp_path / "out"), weights_of(good))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_running_process_staging_folder_is_left_alone(tmp_path):
    """Leftovers are only removed when the process that made them is gone (pid 1 is always running)."""
    busy = tmp_path / ".out.hf_vit_compress-staging-1-0123abcd"
    busy.mkdir()
    save_atomically(make_compressed_model(), tmp_path / "out")
    assert busy.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Fault injection: every step of a save, interrupted (saving.py's own steps)
# ---------------------------------------------------------------------------------------------------------------
class InjectedFault(OSError):
    """An exception at one step of the save (disk full, permission denied, ...)."""


class SimulatedKill(BaseException):
    """The process died at this step: this and every later file-system step of the save fail."""


STEPS = ("_replace", "_remove_tree", "_remove_file", "_write_text", "_exchange")


class Injector:
    """Counts the save's file-system steps (and the model writer) and interrupts the `fail_at`-th one."""

    def __init__(self, monkeypatch, fail_at: int | None, kill: bool, exchange: bool):
        self.count, self.fail_at, self.kill, self.dead = 0, fail_at, kill, False
        saving = saving_module()
        for name in STEPS:
            original = getattr(saving, name)
            if name == "_exchange" and not exchange:
                original = lambda first, second: False  # noqa: E731  (no renameat2 here: the two-rename fallback)
            monkeypatch.setattr(saving, name, self.wrap(original))
        if kill:  # a killed process runs no clean-up
            monkeypatch.setattr(saving, "_abandon", lambda output_dir, staging: None)

    def step(self) -> None:
        self.count += 1
        if self.dead:
            raise SimulatedKill()
        if self.count == self.fail_at:
            self.dead = self.kill
            raise SimulatedKill() if self.kill else InjectedFault(f"injected fault at step {self.count}")

    def wrap(self, function):
        def wrapped(*args, **kwargs):
            self.step()
            return function(*args, **kwargs)
        return wrapped

    def writer(self, model):
        original = model.save_pretrained

        def save_pretrained(*args, **kwargs):
            self.step()
            return original(*args, **kwargs)
        model.save_pretrained = save_pretrained
        return model


CASES = [  # (folder, swap): the folder swap only happens in a folder of the model's own
    ("new", True), ("own", True), ("own", False), ("shared", True),
]


@pytest.mark.parametrize("kill", [False, True], ids=["exception", "kill"])
@pytest.mark.parametrize(("folder", "exchange"), CASES, ids=["new", "own-renameat2", "own-two-renames", "shared"])
def test_every_interrupted_save_leaves_a_complete_model_and_every_other_file(tmp_path, monkeypatch, folder, kill,
                                                                             exchange):
    old_model, new_model, next_model = (make_compressed_model(seed=seed) for seed in (0, 1, 2))
    old, new, nxt = weights_of(old_model), weights_of(new_model), weights_of(next_model)
    fail_at, steps_seen = 1, []
    while True:
        root = tmp_path / f"step{fail_at}"
        output_dir = root / "out"
        if folder == "shared":
            add_user_files(output_dir)
        if folder != "new":
            save_atomically(old_model, output_dir, extra_files={"architecture.json": "{}\n"})
        user_files = digest(output_dir, skip=(CONTROL_DIR,)) if folder == "shared" else {}
        user_files = {name: value for name, value in user_files.items()
                      if name.startswith("checkpoint-") or name == "notes.txt"}

        with monkeypatch.context() as patch:
            injector = Injector(patch, fail_at, kill, exchange)
            try:
                save_atomically(injector.writer(make_compressed_model(seed=1)), output_dir,
                                extra_files={"architecture.json": "{}\n"})
                interrupted = False
            except (InjectedFault, SimulatedKill):
                interrupted = True
        steps_seen.append(injector.count)

        # right after the interruption: the old or the new complete model is at the path
        if interrupted and kill and folder == "shared" and (output_dir / CONTROL_DIR / "journal.json").exists():
            # killed between the journalled moves of a shared folder: a mix that the next save (or this call)
            # completes; the new model is then at the path
            saving_module().recover_interrupted_save(output_dir)
            assert same(loaded_weights(output_dir), new)
        elif interrupted and kill and not exchange and folder != "new" and not output_dir.exists():
            # killed between the two renames of the fallback swap: the old folder waits beside it and is put back
            saving_module().recover_interrupted_save(output_dir)
            assert same(loaded_weights(output_dir), old)
        elif folder == "new" and interrupted:
            assert not output_dir.exists() or same(loaded_weights(output_dir), new)
        else:
            now = loaded_weights(output_dir)
            assert same(now, new) or same(now, old), f"step {fail_at}: neither the old nor the new model"
            if not interrupted:
                assert same(now, new)
        assert {name: digest(output_dir).get(name) for name in user_files} == user_files

        # the next save completes or cleans up whatever was left, and leaves nothing behind
        save_atomically(next_model, output_dir, extra_files={"architecture.json": "{}\n"})
        assert same(loaded_weights(output_dir), nxt)
        assert sorted(p.name for p in root.iterdir()) == ["out"], f"step {fail_at}: leftovers"
        assert sorted(p.name for p in (output_dir / CONTROL_DIR).iterdir()) == ["manifest.json"]
        assert {name: digest(output_dir).get(name) for name in user_files} == user_files
        if not interrupted:
            break
        fail_at += 1
    # every step of the save was interrupted once (the writer, the writes, the swap or the moves, the removal)
    assert fail_at == steps_seen[-1] + 1 >= 5, steps_seen

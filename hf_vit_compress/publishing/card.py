"""The model card of a compressed model, built with `huggingface_hub.ModelCard` from a run's report.

The report is the dict `publish.compression_report` returns (and the CLI writes to `compression_report.json`); the
card shows exactly its figures and nothing else: a figure the run did not measure (accuracy without an evaluation
set, speed without a benchmark) is left out, never filled in.
"""

from __future__ import annotations

import json

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..methods.registry import MethodEntry, method_entry, registered_methods

#: tags on every card (the method's name and the card's own extra tags are added)
BASE_TAGS = ("vision-transformer", "pruning", "hf-vit-compress", "custom_code")

#: report keys copied into the card's YAML under `compression:`
_YAML_NUMBERS = ("method", "target_flops", "dense_macs", "compressed_macs", "compressed_macs_ratio", "dense_params",
                 "compressed_params", "image_size")
#: a speed budget's keys copied into the YAML under `compression: speed_budget:`
_YAML_SPEED = ("target_speedup", "predicted_speedup", "measured_speedup", "device", "dtype", "batch_size")


def metric_label(key: str) -> str:
    """`accuracy` -> "top-1 accuracy", `top5_accuracy` -> "top-5 accuracy", others unchanged."""
    if key == "accuracy":
        return "top-1 accuracy"
    if key.startswith("top") and key.endswith("_accuracy") and key[3:-9].isdigit():
        return f"top-{key[3:-9]} accuracy"
    return key


def _quantity(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:g}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def card_metadata(report: dict, model_name: str) -> ModelCardData:
    """The YAML header: library, task, base model (a Hub id only), tags, datasets, license, metrics, model-index."""
    method = report["method"]
    tags = list(BASE_TAGS) + [method] + [tag for tag in report.get("tags") or [] if tag not in BASE_TAGS]
    compressed_metrics = report.get("compressed_metrics") or {}
    dataset = report.get("eval_dataset") or {}
    eval_results = None
    if compressed_metrics and dataset.get("type"):
        eval_results = [
            EvalResult(task_type="image-classification", dataset_type=dataset["type"],
                       dataset_name=dataset.get("name") or dataset["type"], dataset_split=dataset.get("split"),
                       metric_type=key, metric_name=metric_label(key), metric_value=value)
            for key, value in compressed_metrics.items()
        ]
    numbers = {key: report[key] for key in _YAML_NUMBERS if report.get(key) is not None}
    speed = report.get("speed_budget")
    if speed:  # the speed budget's headline figures and what they hold for
        numbers["speed_budget"] = {key: speed[key] for key in _YAML_SPEED if speed.get(key) is not None}
    for which in ("dense", "compressed"):
        if report.get(f"{which}_metrics"):
            numbers[f"{which}_metrics"] = dict(report[f"{which}_metrics"])
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        base_model=report.get("base_model") or None,
        license=report.get("license") or None,
        datasets=list(report.get("datasets") or []) or None,
        tags=list(dict.fromkeys(tags)),
        metrics=list(compressed_metrics) or None,
        model_name=model_name,
        eval_results=eval_results,
        compression=numbers,
    )


def _summary(report: dict) -> list[str]:
    method = report["method"]
    entry = _registered(method)
    title, venue, url = (entry.title or method, entry.venue, entry.url) if entry else (method, "", "")
    source = (f"[{report['base_model']}](https://huggingface.co/{report['base_model']})" if report.get("base_model")
              else f"a `{report.get('source_model_type', 'vit')}` image classifier")
    searched = (entry.prunes if entry else "") or "the model's units"
    speed = report.get("speed_budget")
    if speed:
        budget = (f"{speed['target_speedup']:.3g}x faster than the dense model on {speed.get('device')} "
                  f"({speed.get('dtype')}, batch {speed.get('batch_size')}), priced by a latency table measured there")
    else:
        budget = f"{100 * report['target_flops']:.3g}% of the dense model's MACs"
    return [
        f"Structurally pruned from {source} with `hf_vit_compress` using **{method.upper()}** "
        f"(*{title}*, {venue}, {url}).",
        "",
        f"Budget: {budget}. {searched} were searched; the weights are sliced, so the model really is smaller, and "
        "every block has its own shape (see Architecture).",
    ]


def _speed_budget_lines(speed: dict) -> list[str]:
    """The speed budget's section: target, predicted and measured speed-up, and what they were measured on."""
    lines = ["### Speed budget", "",
             f"On {speed.get('device')} ({speed.get('dtype')}, batch {speed.get('batch_size')}, "
             f"{speed.get('attn_implementation')} attention, {speed.get('num_threads')} threads, torch "
             f"{speed.get('torch_version')}):", "",
             "| | ms per forward | speed-up |", "| --- | --- | --- |",
             f"| dense (predicted) | {speed['dense_predicted_ms']:.4g} | 1.00x |",
             f"| target | {speed['target_ms']:.4g} | {speed['target_speedup']:.2f}x |",
             f"| compressed (predicted by the latency table) | {speed['predicted_ms']:.4g} | "
             f"{speed['predicted_speedup']:.2f}x |"]
    if speed.get("measured_speedup") is not None:
        lines.append(f"| compressed (measured against the dense model, {speed['dense_measured_ms']:.4g} ms, "
                     f"interleaved) | {speed['measured_ms']:.4g} | {speed['measured_speedup']:.2f}x |")
    return lines


def _registered(method: str) -> MethodEntry | None:
    return method_entry(method) if method in registered_methods() else None


def _results_table(report: dict) -> list[str]:
    size = report.get("image_size")
    rows = [
        "| | dense | compressed | compressed / dense |",
        "| --- | --- | --- | --- |",
        f"| MACs per image{f' ({size} px)' if size else ''} | {_quantity(report['dense_macs'])} | "
        f"{_quantity(report['compressed_macs'])} | {report['compressed_macs'] / report['dense_macs']:.3f} |",
        f"| parameters | {_quantity(report['dense_params'])} | {_quantity(report['compressed_params'])} | "
        f"{report['compressed_params'] / report['dense_params']:.3f} |",
    ]
    dense, compressed = report.get("dense_metrics") or {}, report.get("compressed_metrics") or {}
    lines = ["## Results", "", *rows]
    if dense or compressed:
        dataset = report.get("eval_dataset") or {}
        where = dataset.get("name") or "the evaluation set"
        if dataset.get("split"):
            where += f", split `{dataset['split']}`"
        if dataset.get("num_examples"):
            where += f", {dataset['num_examples']:,} images"
        columns = [name for name, values in (("dense", dense), ("compressed", compressed)) if values]
        keys = [key for key in (compressed or dense) if all(key in values for values in (dense, compressed) if values)]
        lines += ["", f"Measured in this run on {where} (dense: the source model before compression; compressed: "
                  "the final model):", "", "| metric | " + " | ".join(columns) + " |",
                  "| --- |" + " --- |" * len(columns)]
        for key in keys:
            cells = [_percent(values[key]) if "accuracy" in key else f"{values[key]:.4g}"
                     for values in (dense, compressed) if values]
            lines.append(f"| {metric_label(key)} | " + " | ".join(cells) + " |")
    if report.get("speed_budget"):
        lines += ["", *_speed_budget_lines(report["speed_budget"])]
    speed = report.get("speed")
    if speed:
        lines += ["", "### Measured speed", "", "| | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in speed.items()]
    return lines


def _architecture_table(report: dict) -> list[str]:
    dense = report.get("dense_architecture") or {}
    architecture = report["architecture"]
    header = ("| block | heads | q/k head dim | v head dim | MLP width |" if not dense else
              f"| block | heads (of {dense['num_attention_heads']}) | q/k head dim (of {dense['head_dim']}) | "
              f"v head dim (of {dense['head_dim']}) | MLP width (of {dense['intermediate_size']}) |")
    lines = ["## Architecture", "", header, "| --- | --- | --- | --- | --- |"]
    removed = []
    for index, layer in enumerate(architecture["layers"]):
        if not layer["keep_block"]:
            removed.append(index)
            lines.append(f"| {index} | removed | | | |")
            continue
        lines.append(f"| {index} | {layer['num_heads']} | {layer['qk_head_dim']} | {layer['v_head_dim']} | "
                     f"{layer['intermediate_size']} |")
    width = f"Residual width: {architecture['hidden_size']}"
    if dense:
        width += f" of {dense['hidden_size']} channels"
    lines += ["", width + ". " + (f"Removed blocks: {', '.join(map(str, removed))}." if removed
                                  else "No block removed.")]
    return lines


def _usage(repo_id: str, known: bool) -> list[str]:
    where = "" if known else (f" (`{repo_id}` stands for this folder's path, or the Hub repo id once pushed: "
                              "`hf-vit-compress push` writes it in)")
    return [
        "## How to use",
        "",
        "The model has its own per-block shapes, so it loads with `trust_remote_code=True`: the two modeling files "
        "in this repository (`configuration_compressed_vit.py`, `modeling_compressed_vit.py`, which import only torch "
        f"and transformers) define it; hf_vit_compress itself is not needed{where}.",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline",
        "",
        f'classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)',
        'print(classifier("image.jpg"))  # a path, URL or PIL image',
        "",
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        f'model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True)',
        "```",
    ]


def _recipe(report: dict) -> list[str]:
    lines = ["## Recipe", "", "`compression_config.json` (the method's settings, exactly as run):", "", "```json",
             json.dumps(report["compression_config"], indent=2, sort_keys=True), "```"]
    training = report.get("training")
    if training:
        lines += ["", "Training:", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in training.items()]
    if report.get("recipe"):
        lines += ["", "The `hf-vit-compress train` recipe, with the command line's overrides merged in:", "",
                  "```yaml", yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(), "```"]
    return lines


def build_model_card(report: dict, repo_id: str | None = None, model_name: str | None = None) -> ModelCard:
    """The model card for a compressed model.

    Args:
        report: the run's report (`publish.compression_report`): needs `method`, `target_flops`, `dense_macs`,
            `compressed_macs`, `dense_params`, `compressed_params`, `architecture`, `compression_config`; optional
            `base_model` (a Hub id), `license`, `datasets`, `tags`, `eval_dataset`, `dense_metrics`,
            `compressed_metrics`, `dense_architecture`, `training`, `recipe`, `speed`.
        repo_id: the Hub repo the card is for (shown in the loading code); defaults to `model_name`.
        model_name: the card's title; defaults to the repo's name.

    Returns:
        A `huggingface_hub.ModelCard` (`str(card)` is the README.md text).
    """
    missing = [key for key in ("method", "target_flops", "dense_macs", "compressed_macs", "dense_params",
                               "compressed_params", "architecture", "compression_config") if key not in report]
    if missing:
        raise ValueError(f"build_model_card: the report lacks {missing}; it needs the keys of "
                         "publish.compression_report (method, budget, MACs, parameters, architecture, config)")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "compressed-vit")
    data = card_metadata(report, model_name)
    body = [f"# {model_name}", "", *_summary(report), "", *_results_table(report), "", *_architecture_table(report),
            "", *_usage(repo_id or model_name, known=repo_id is not None), "", *_recipe(report)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")

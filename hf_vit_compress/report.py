"""Plots of a search's history (`CompressionTrainer.compression_history`) for reports."""

from __future__ import annotations

from pathlib import Path


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_bimask_evolution(history: list[dict], path: str | Path, title: str = "OFB bi-mask evolution") -> Path:
    """One panel per searchable module: mean importance S and mean sparsity V of its units over the search, with
    lambda (the weight of S in the mask) on every panel, as in the OFB paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = sorted({key.split("/", 1)[1] for entry in history for key in entry if key.startswith("importance/")},
                     key=_module_order)
    columns = min(4, max(1, len(modules)))
    rows = (len(modules) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False, sharex=True)
    lam_steps, lam = _series(history, "lambda")
    for axis, module in zip(axes.flat, modules):
        steps, importance = _series(history, f"importance/{module}")
        axis.plot(steps, importance, label="importance S (mean)")
        steps, sparsity = _series(history, f"sparsity/{module}")
        axis.plot(steps, sparsity, label="sparsity V (mean)")
        axis.plot(lam_steps, lam, ":", color="grey", label="lambda")
        axis.set_title(module, fontsize=9)
        axis.set_ylim(-0.02, 1.02)
    for axis in list(axes.flat)[len(modules):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    figure.suptitle(title)
    figure.supxlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_scalars(history: list[dict], path: str | Path, keys: list[str], title: str) -> Path:
    """Small multiples of the given scalar series (e.g. UVC's budget ratio R, dual z, kept widths)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in keys if any(key in entry for entry in history)]
    columns = min(4, max(1, len(keys)))
    rows = (len(keys) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False, sharex=True)
    for axis, key in zip(axes.flat, keys):
        axis.plot(*_series(history, key))
        axis.set_title(key, fontsize=9)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.suptitle(title)
    figure.supxlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def _module_order(name: str):
    kind, _, index = name.partition(".")
    return (int(index) if index.isdigit() else -1, kind)

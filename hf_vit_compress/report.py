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
    return _save(figure, title, path)


def plot_uvc_search(history: list[dict], path: str | Path, title: str = "UVC search") -> Path:
    """UVC's search: budget ratio R against the budget B, the budget dual z, and per block the kept heads, value
    head dim, MLP width and run probability (a block whose run probability ends under 0.5 is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    axes[0, 0].plot(*_series(history, "uvc/ratio"), label="R (expected)")
    axes[0, 0].plot(*_series(history, "uvc/hard_ratio"), label="R (hard)")
    axes[0, 0].plot(*_series(history, "uvc/budget"), ":", color="grey", label="budget B")
    axes[0, 0].set_title("MACs ratio", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[0, 1].plot(*_series(history, "uvc/budget_dual"))
    axes[0, 1].set_title("budget dual z", fontsize=9)
    panels = [("heads", axes[0, 2]), ("v_head_dim", axes[1, 0]), ("mlp_width", axes[1, 1]),
              ("run_probability", axes[1, 2])]
    blocks = sorted({int(key.split("/")[1]) for entry in history for key in entry if key.startswith("heads/")})
    for prefix, axis in panels:
        for block in blocks:
            axis.plot(*_series(history, f"{prefix}/{block}"), label=f"block {block}")
        axis.set_title(f"{prefix.replace('_', ' ')} per block", fontsize=9)
    axes[1, 2].axhline(0.5, color="grey", linestyle=":")
    if blocks:
        axes[0, 2].legend(fontsize=6, ncol=2)
    return _save(figure, title, path)


def _module_order(name: str):
    kind, _, index = name.partition(".")
    return (int(index) if index.isdigit() else -1, kind)


def _save(figure, title: str, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    figure.suptitle(title)
    figure.supxlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


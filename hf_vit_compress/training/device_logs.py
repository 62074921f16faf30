"""Logged values that stay on the device until someone reads them.

Reading a CUDA tensor on the host (`float()`, `.item()`, `.tolist()`) waits for every queued kernel: once per
step, it keeps the GPU from running ahead of Python. The search's per-step terms (task loss, PMIM, one-hot and FLOPs
losses, UVC's ratio and duals) are therefore summed on the device and read at logging steps, and the search
history is kept as device tensors and read in bulk. Written by hand: transformers' Trainer does this for its own
loss only (`_tr_loss`), not for a dict of extra terms.
"""

from __future__ import annotations

import torch


def _scalar(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim tensor (no operation when it already is one)."""
    tensor = tensor if tensor.dim() == 0 else tensor.reshape(())
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _split(values: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    tensors = {name: value for name, value in values.items() if torch.is_tensor(value)}
    return tensors, {name: float(value) for name, value in values.items() if name not in tensors}


class DeviceLogAccumulator:
    """Running sums of named 0-dim tensors, one stacked tensor per run of steps that logged the same names: a step
    costs one stack and one in-place add, whatever the number of terms."""

    def __init__(self):
        self.last: dict[str, torch.Tensor] = {}  # the last step's terms, by name, on the device
        self._blocks: list[tuple[tuple[str, ...], torch.Tensor, int]] = []  # (names, sums, steps), closed runs
        self._names: tuple[str, ...] | None = None
        self._sums: torch.Tensor | None = None
        self._steps = 0
        self._host: dict[str, list[float]] = {}  # values given as Python numbers (no device involved)

    def add(self, values: dict) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """Add one step's values (0-dim tensors, or numbers). Returns the names of the tensor values and their
        stacked float32 values on the device (None without any), for other per-step checks to share."""
        tensors, numbers = _split(values)
        for name, number in numbers.items():
            self._host.setdefault(name, []).append(number)
        self.last = tensors
        if not tensors:
            return (), None
        names = tuple(tensors)
        with torch.no_grad():
            stacked = torch.stack([_scalar(tensor) for tensor in tensors.values()])
        if names == self._names:
            self._sums.add_(stacked)
            self._steps += 1
        else:
            self._close_run()
            self._names, self._sums, self._steps = names, stacked.clone(), 1
        return names, stacked

    def _close_run(self) -> None:
        if self._names is not None:
            self._blocks.append((self._names, self._sums, self._steps))
        self._names, self._sums, self._steps = None, None, 0

    def totals(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Per name, its sum on the device since the last `pop_means()` and the number of steps it was logged in
        (nothing is read from the device)."""
        self._close_run()
        totals: dict[str, tuple[torch.Tensor, int]] = {}
        for names, sums, steps in self._blocks:
            for name, value in zip(names, sums.unbind(0)):
                total, count = totals.get(name, (0.0, 0))
                totals[name] = (value + total, count + steps)
        return totals

    def pop_means(self) -> dict[str, float]:
        """Each name's mean over the steps that logged it since the last call; reads the device once."""
        return self.pop_window().means()

    def pop_window(self) -> LogWindow:
        """Everything added since the last pop, as host numbers (one read of the device), per run of steps."""
        self._close_run()
        blocks, self._blocks = self._blocks, []
        runs: list[tuple[dict[str, float], int]] = []
        if blocks:
            flat = torch.cat([block_sums for _, block_sums, _ in blocks]).tolist()  # one transfer
            position = 0
            for names, _, steps in blocks:
                runs.append((dict(zip(names, flat[position:position + len(names)])), steps))
                position += len(names)
        host, self._host = self._host, {}
        return LogWindow(runs, host)


class LogWindow:
    """The values logged between two logging steps, read back to the host.

    Args:
        runs: per run of consecutive steps that logged the same tensor names: each name's sum over the run, and
            the run's number of steps.
        host: the values given as Python numbers, by name, one per step that gave it.
    """

    def __init__(self, runs: list[tuple[dict[str, float], int]], host: dict[str, list[float]] | None = None):
        self.runs = runs
        self.host = host or {}

    @property
    def steps(self) -> int:
        """Steps (micro-batches) that logged device values in this window."""
        return sum(steps for _, steps in self.runs)

    def names(self) -> set[str]:
        return {name for sums, _ in self.runs for name in sums} | set(self.host)

    def means(self) -> dict[str, float]:
        """Each name's mean over the steps that logged it."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for run_sums, steps in self.runs:
            for name, value in run_sums.items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + steps
        for name, numbers in self.host.items():
            sums[name] = sums.get(name, 0.0) + sum(numbers)
            counts[name] = counts.get(name, 0) + len(numbers)
        return {name: sums[name] / counts[name] for name in sums}

    def mean_over_window(self, name: str, where: str | None = None) -> float:
        """The sum of `name` (over the steps that also logged `where`, if given) divided by ALL the window's steps:
        the term's share of a per-step average such as the Trainer's `loss`, counting 0 where it was absent."""
        total = sum(sums[name] for sums, _ in self.runs if name in sums and (where is None or where in sums))
        return total / max(1, self.steps)


class DeviceHistory:
    """Records `{"step": step, **values}` whose tensor values stay on the device until the records are read."""

    def __init__(self):
        self._records: list[dict] = []
        self._pending: list[tuple[int, tuple[str, ...], dict[str, float], tuple[str, ...], torch.Tensor | None]] = []

    def append(self, step: int, values: dict) -> None:
        tensors, numbers = _split(values)
        stacked = None
        if tensors:
            with torch.no_grad():
                stacked = torch.stack([_scalar(tensor) for tensor in tensors.values()])
        self._pending.append((step, tuple(values), numbers, tuple(tensors), stacked))

    def records(self) -> list[dict]:
        """Every record with plain Python numbers (pending device values are read now, in one transfer)."""
        if self._pending:
            pending, self._pending = self._pending, []
            stacked = [values for *_, values in pending if values is not None]
            flat = torch.cat(stacked).tolist() if stacked else []
            position = 0
            for step, order, numbers, names, _ in pending:
                values = {**numbers, **dict(zip(names, flat[position:position + len(names)]))}
                position += len(names)
                self._records.append({"step": step, **{name: values[name] for name in order}})
        return self._records

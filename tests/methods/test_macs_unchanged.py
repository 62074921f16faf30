"""A MACs budget comes out exactly as before the speed budget re-priced both methods through `surgery.cost`: seeded
tiny searches (`macs_runs.py`) decide the architectures pinned in `data/macs_architectures.json` (made by the code
before that change, one torch thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from macs_runs import RUNS, run

PINNED = json.loads((Path(__file__).parent / "data" / "macs_architectures.json").read_text())


@pytest.mark.parametrize("name, method, target, settings", RUNS, ids=[entry[0] for entry in RUNS])
def test_a_seeded_macs_search_decides_the_same_architecture_as_before(name, method, target, settings):
    threads = torch.get_num_threads()
    try:
        assert run(method, target, settings) == PINNED[name]
    finally:
        torch.set_num_threads(threads)

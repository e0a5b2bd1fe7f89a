"""Shared test fixtures: the development data beside the checkout (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = Path(os.environ.get("REGNET_ZOO_SHARED_DATA", _DEFAULT_SHARED))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed every test; restore torch's thread count afterwards so that one test's setting cannot leak."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real public images); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not found at {SHARED_DATA}")
    return SHARED_DATA

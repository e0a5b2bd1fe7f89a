"""Shared test fixtures: the development data beside the checkout (skipped cleanly when absent); the fast
(numba) or plain-torch path of a core operation."""

from __future__ import annotations

import contextlib
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


@pytest.fixture
def kernel_path(monkeypatch):
    """``kernel_path(path, kernel)``: a context for one code path. ``"torch"``: the plain-torch code (the
    fast kernels off); ``"fast"``: the numba kernel ``core._fast.<kernel>``, checked to be called on leaving
    the context (the test is skipped without numba)."""
    from regnet_zoo.core import _fast

    def use(path: str, kernel: str) -> contextlib.AbstractContextManager:
        if path == "torch":
            return _fast.disabled()
        if _fast.numba is None:
            pytest.skip("numba not installed")
        calls, real = [], getattr(_fast, kernel)
        monkeypatch.setattr(_fast, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))

        @contextlib.contextmanager
        def taken():
            yield
            assert calls, f"_fast.{kernel} was not used"

        return taken()

    return use

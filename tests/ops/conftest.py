"""Fixtures of the per-op kernel tests (helpers: ``kernel_testing``)."""

from __future__ import annotations

import pytest
import torch

from .kernel_testing import BACKENDS, MARKS, poison_native, poison_python_empty, require


@pytest.fixture(params=[pytest.param(b, marks=MARKS[b], id=b) for b in BACKENDS])
def backend(request) -> str:
    """Every backend, each test once per backend (a test may parametrize ``backend`` itself)."""
    return request.param


@pytest.fixture
def dev(backend) -> torch.device:
    """The device of ``backend``'s tests; skips or fails when the backend is not live (see
    ``kernel_testing.require``)."""
    return require(backend)


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as garbage: ``torch.empty``/``empty_like`` return poisoned memory for the
    Python-level kernels; the fixture's value, ``poison(device, nbytes)``, leaves poisoned freed
    memory for the next allocation of a C++ kernel (call it just before the kernel)."""
    poison_python_empty(monkeypatch)
    return poison_native

"""Fixtures only (helpers live in modules of their own: bundle_helpers, training_helpers, guard_stub); the repository
root on sys.path for `scripts`, and two CPU threads."""

from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

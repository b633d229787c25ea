"""Shared test set-up: offline, deterministic, small thread counts (CI has 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real files committed under tests/data (see tests/data/README.md): real_ct/, ct_rate/."""
    return TEST_DATA

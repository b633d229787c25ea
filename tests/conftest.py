"""Shared test set-up: offline, deterministic, small thread counts (CI has 2 cores)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (with its sibling module ``machine`` importable)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return mod


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real files committed under tests/data (see tests/data/README.md): real_ct/, ct_rate/."""
    return TEST_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic CT-RATE (6 train + 3 valid patients) preprocessed with the tiny preset.

    Returns the processed directory; its source data set is ``<dir>/../data``. Shared by the training,
    evaluation and embedding tests (read-only: tests that modify data copy it first).
    """
    from fvlm.cli import main
    from fvlm.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "data", n_train=6, n_valid=3, seed=1, size="demo", max_reconstructions=2)
    for split in ("train", "valid"):
        assert main(["preprocess", "--data", str(root / "data"), "--split", split, "--out", str(root / "processed"),
                     "--config", "tiny"]) == 0
    return root / "processed"

"""Shared fixtures: seeded, tiny models from config, a cache that survives between local runs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Corpus, LDA fit and tokenizer are cached here (git-ignored); CI starts it empty.
os.environ.setdefault("FEDGEN_EDGE_HOME", str(ROOT / ".cache" / "tests"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg(tmp_path):
    """tiny-gpt2 on Shakespeare with big documents (a small corpus: fast LDA)."""
    from task.config import RunConfig

    return RunConfig.from_run_config({
        "model.name": "tiny-gpt2", "train.seq-len": 32, "train.batch-size": 4,
        "data.chunk-words": 400, "lora.dropout": 0.0, "output-dir": str(tmp_path / "out"),
        "cache-dir": os.environ["FEDGEN_EDGE_HOME"] + "/cache"})

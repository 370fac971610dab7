"""Data a node builds once from its own files and reads back: a fresh ClientApp process per
message in deployment would otherwise re-read, re-partition and re-tokenize every time."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def cached_blocks(folder: Path, key: list, build) -> tuple[torch.Tensor, torch.Tensor]:
    """``build()`` once, then read back from ``folder`` (a fresh ClientApp process per message
    in deployment would otherwise re-partition and re-tokenize every time)."""
    path = folder / f"{hashlib.sha1(json.dumps(key, default=str).encode()).hexdigest()[:16]}.pt"
    if path.exists():
        return tuple(torch.load(path))
    blocks = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(blocks, tmp)
    tmp.replace(path)
    return blocks

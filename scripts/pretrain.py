"""The image task's pre-training step, on its own: train the generator backbone on the public
split and cache it (a federated run does the same on first use, then reuses the cache).

    python scripts/pretrain.py conf/image.toml ["k=v" ...]

Prints the cost record (seconds, steps, public images, parameter counts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

from simulate import merge_run_config  # noqa: E402
from task.config import RunConfig  # noqa: E402
from task.image.train import backbone_dir, ensure_pretrained  # noqa: E402


def run_config(args: list[str]) -> RunConfig:
    """The defaults, then the conf files and k=v pairs in order (as `flwr run` merges)."""
    return RunConfig.from_run_config(
        merge_run_config([f"cache-dir='{ROOT / '.cache' / 'fedgen'}'", *args]))


if __name__ == "__main__":
    cfg = run_config(sys.argv[1:])
    record = ensure_pretrained(cfg)  # pre-trains and caches unless cached
    print(json.dumps({"cache": str(backbone_dir(cfg)), **record}, indent=2))

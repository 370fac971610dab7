"""The image task's pre-training step, on its own: train the generator backbone on the public
split and cache it (a federated run does the same on first use, then reuses the cache).

    python scripts/pretrain.py conf/image.toml ["k=v" ...]

Prints the cost record (seconds, steps, public images, parameter counts).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from task.config import RunConfig  # noqa: E402
from task.image_train import backbone_dir, load_generator_backbone  # noqa: E402


def run_config(args: list[str]) -> RunConfig:
    """pyproject defaults, then the conf files and k=v pairs in order (as `flwr run` merges)."""
    values = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values["cache-dir"] = str(ROOT / ".cache" / "fedgen")
    for arg in args:
        values.update(tomllib.loads(Path(arg).read_text() if arg.endswith(".toml") else arg))
    return RunConfig.from_run_config(values)


if __name__ == "__main__":
    cfg = run_config(sys.argv[1:])
    record = (json.loads((backbone_dir(cfg) / "pretrain.json").read_text())
              if (backbone_dir(cfg) / "pretrain.json").exists() else None)
    if record is None:
        load_generator_backbone(cfg)  # sets the thread count, pre-trains, caches
        record = json.loads((backbone_dir(cfg) / "pretrain.json").read_text())
    print(json.dumps({"cache": str(backbone_dir(cfg)), **record}, indent=2))

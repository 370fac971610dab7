"""Images from the backbone plus an adapter (global or a client's personal one): a grid with one
row per class, from fixed noise (scripts/generate.py's image command).

A personal generator renders its own classes: given an adapter inside a run's
``clients/client-<id>/`` folder, ``own_classes`` reads the run's results.json (its config and
number of clients) and returns the labels of that client's training data, most frequent first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from peft import PeftModel

from task.config import RunConfig
from task.image import data, model, train
from task.results import run_config, run_of


def own_classes(cfg: RunConfig, partition_id: int, num_clients: int) -> list[int]:
    """The classes of a client's training data, most frequent first."""
    rows, _ = data.client_image_rows(cfg, partition_id, num_clients)
    counts = np.bincount(rows[:, 0].numpy(), minlength=data.load_images(cfg).num_classes)
    return [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]


def render_grid(cfg: RunConfig, adapter: Path | None, path: Path, classes: list[int] | None = None,
                per_class: int = 10, seed: int = 0) -> Path:
    """A PNG grid: one row of ``per_class`` samples per class (all classes by default)."""
    import torch

    generator = train.load_generator_backbone(cfg)
    net = generator if adapter is None else PeftModel.from_pretrained(
        generator, str(adapter), config=model.image_lora_config(cfg))
    num_classes = data.load_images(cfg).num_classes
    classes = list(range(num_classes)) if classes is None else classes
    if bad := [c for c in classes if not 0 <= c < num_classes]:
        raise ValueError(f"classes {bad} outside [0, {num_classes})")
    with torch.no_grad():
        train.save_grid(net, classes, path, per_class=per_class, seed=seed)
    return path


def generate_images(cfg: RunConfig | None, adapter: Path | None, *, out: Path, classes: str = "all",
                    per_class: int = 10, seed: int = 0) -> str:
    """scripts/generate.py for images. ``classes``: "all", "own" (the adapter's client's
    classes, from its run folder) or comma-separated labels. ``cfg`` None: the run's own config
    (an adapter inside a run folder)."""
    located = run_of(adapter) if adapter is not None else None
    if cfg is None:
        if located is None:
            raise ValueError("no run config: pass --run-config, or an adapter inside a run's clients/ folder")
        cfg = run_config(located[0])
    if classes == "own":
        if located is None:
            raise ValueError("--classes own needs an adapter under <run>/clients/client-<id>/")
        run_dir, partition_id = located
        num_clients = json.loads((run_dir / "results.json").read_text())["num_clients"]
        chosen = own_classes(cfg, partition_id, num_clients)
    elif classes == "all":
        chosen = None
    else:
        chosen = [int(c) for c in classes.split(",")]
    render_grid(cfg, adapter, out, chosen, per_class=per_class, seed=seed)
    names = data.load_images(cfg).class_names
    rows = chosen if chosen is not None else list(range(len(names)))
    return (f"{out}: one row per class, {per_class} samples each: "
            + ", ".join(f"{c} ({names[c]})" for c in rows))

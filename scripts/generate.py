"""Generate with the backbone plus a chosen adapter (global checkpoint or a personal adapter), offline.

    python scripts/generate.py --adapter outputs/default/latest/global-adapter --prompt "The stock market"
    python scripts/generate.py --adapter ~/.fedgen-edge/node/run-<id>/personal-adapter \\
        --prompt "The stock market" --run-config conf/smoke.toml
    # images: a grid, one row per class; a client's personal generator renders its own classes
    python scripts/generate.py --adapter outputs/image/latest/clients/client-0003/personalized-adapter \\
        --classes own --out client-3.png

The backbone and task come from the run config: ``--run-config`` files or "k=v" pairs over the
pyproject defaults, as for a run (use the same ones the adapter was trained with); without
``--run-config``, an adapter inside a run's output folder uses that run's own config (its
results.json). ``--adapter none`` generates with the backbone alone, for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simulate import ROOT, merge_run_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True,
                        help="a peft adapter folder (global-adapter, checkpoints/round-N, a "
                             "device's personal-adapter), or 'none' for the backbone alone")
    parser.add_argument("--run-config", action="append", default=[],
                        help="conf/*.toml or \"k=v\" (backbone, cache-dir, ...), as for the run")
    parser.add_argument("--prompt", default="The stock market")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-prompt", action="store_true",
                        help="do not preprocess the prompt like the training text")
    image = parser.add_argument_group("image task")
    image.add_argument("--out", type=Path, default=Path("samples.png"), help="the grid's PNG")
    image.add_argument("--classes", default="all",
                       help="'all', 'own' (the classes of the client whose personal adapter this "
                            "is) or comma-separated labels: one grid row each")
    image.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args(argv)

    # deferred: --help and argument errors answer without loading torch and transformers
    from task.config import RunConfig
    from task.results import run_config, run_of

    adapter = None if args.adapter == "none" else Path(args.adapter).expanduser()
    located = run_of(adapter) if adapter is not None and not args.run_config else None
    if located is None and adapter is not None and not args.run_config \
            and (adapter.parent / "results.json").exists():  # <run>/global-adapter
        located = (adapter.parent, -1)
    if located is not None:
        cfg = run_config(located[0])
    else:  # the checkout's cache by default, as scripts/run.sh and deploy_local.py use it
        cfg = RunConfig.from_run_config(
            merge_run_config([f"cache-dir='{ROOT / '.cache' / 'fedgen'}'", *args.run_config]))
    generators = {"image": _images, "lm": _text}  # task -> its inference command
    generate = generators.get(cfg.task)
    if generate is None:
        parser.error(f"no generator for task {cfg.task!r} (have {sorted(generators)})")
    print(generate(cfg, adapter, args))
    return 0


def _images(cfg, adapter: Path | None, args) -> str:
    from task.image.generate import generate_images  # deferred: torch, peft

    return generate_images(cfg, adapter, out=args.out, classes=args.classes,
                           per_class=args.per_class, seed=args.seed)


def _text(cfg, adapter: Path | None, args) -> str:
    from task.lm.generate import generate_text  # deferred: torch, transformers

    return generate_text(cfg, adapter, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         normalize=not args.raw_prompt)


if __name__ == "__main__":
    sys.exit(main())

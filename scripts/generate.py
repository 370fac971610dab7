"""Generate with the backbone plus a chosen adapter (global checkpoint or a personal adapter), offline.

    python scripts/generate.py --adapter outputs/default/latest/global-adapter --prompt "The stock market"
    python scripts/generate.py --adapter ~/.fedgen-edge/node/run-<id>/personal-adapter \\
        --prompt "The stock market" --run-config conf/smoke.toml

The backbone and task come from the run config (the pyproject defaults, then ``--run-config``
files or "k=v" pairs, as for a run: use the same ones the adapter was trained with).
``--adapter none`` generates with the backbone alone, for comparison.
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
    args = parser.parse_args(argv)

    # deferred: --help and argument errors answer without loading torch and transformers
    from task.config import RunConfig
    from task.lm.generate import generate_text

    generators = {"lm": generate_text}  # task -> its inference command (text only so far)

    # The checkout's cache by default, as scripts/run.sh and deploy_local.py use it.
    overrides = merge_run_config([f"cache-dir='{ROOT / '.cache' / 'fedgen'}'", *args.run_config])
    cfg = RunConfig.from_run_config(overrides)
    generate = generators.get(cfg.task)
    if generate is None:
        parser.error(f"no generator for task {cfg.task!r} (have {sorted(generators)})")
    adapter = None if args.adapter == "none" else Path(args.adapter).expanduser()
    print(generate(cfg, adapter, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   normalize=not args.raw_prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())

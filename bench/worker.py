"""Run one measurement of bench.measure in this (fresh) process and print its result as JSON:
``python -m bench.worker local_step '{"backbone": "tiny-gpt2", ...}'``."""

from __future__ import annotations

import json
import sys

from bench import measure

MARK = "BENCH-RESULT "

if __name__ == "__main__":
    job, kwargs = sys.argv[1], json.loads(sys.argv[2])
    print(MARK + json.dumps(getattr(measure, job)(**kwargs)), flush=True)

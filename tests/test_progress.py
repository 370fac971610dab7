"""Progress lines for long phases: counts, elapsed time and the estimate of the time left; and
that each log line is printed once."""

import logging
import subprocess
import sys
import time
from pathlib import Path

from task.progress import Progress, ticker

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_estimates_the_time_left_from_the_rate_so_far(caplog):
    clock = FakeClock()
    progress = Progress("pre-training", 400, "steps", every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="flwr.fedgen_edge"):
        clock.now = 9.0
        progress.update(199)  # 199 steps in 9 s: too soon for a line
        assert caplog.messages == []
        clock.now = 10.0
        progress.update(g_loss="0.812")  # 200 steps in 10 s: 200 left at the same rate
        assert caplog.messages == ["pre-training: 200/400 steps, 10s, about 10s left, g loss 0.812"]
        assert progress.eta_s() == 10.0
        clock.now = 15.0
        progress.update(100)  # 5 s since the last line: none
        assert len(caplog.messages) == 1
        clock.now = 200.0
        progress.update(100)
    assert caplog.messages[-1] == "pre-training: 400/400 steps done in 3.3 min"


def test_a_short_phase_prints_nothing(caplog):
    clock = FakeClock()
    progress = Progress("features", 4, "batches", every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="flwr.fedgen_edge"):
        for _ in range(4):
            clock.now += 1
            progress.update()
    assert caplog.messages == []


def test_ticker_counts_down_against_its_estimate_then_reports_the_real_time(caplog):
    with caplog.at_level(logging.INFO, logger="flwr.fedgen_edge"), \
            ticker("dequantizing", expected_s=0.5, every_s=0.1):
        time.sleep(0.75)
    lines = caplog.messages
    assert lines[0] == "dequantizing: about 0s"
    assert any("left" in line for line in lines[1:-1])
    assert any("longer than the 0s estimated" in line for line in lines[1:-1])
    assert lines[-1].startswith("dequantizing: done in")


def test_importing_the_apps_adds_no_second_log_handler():
    """opacus calls logging.basicConfig at import; a root handler would print every Flower log
    line a second time (run.sh showed each line twice)."""
    code = ("import logging, server_app.app, client_app.app; "
            "print(len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"

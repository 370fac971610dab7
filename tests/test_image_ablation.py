"""scripts/image_ablation.py: the post-hoc averages of the global adapter over rounds."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_ema_over_rounds_starts_from_round_0_and_weighs_recent_rounds_by_the_decay():
    from image_ablation import ema_states

    states = [{"a": torch.tensor([0.0, 2.0])}, {"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([1.0, 4.0])}]
    ema = ema_states(states, 0.5)
    # round 1: 0.5 * 0 + 0.5 * 1 = 0.5; round 2: 0.5 * 0.5 + 0.5 * 1 = 0.75 (second entry: 2 -> 2 -> 3)
    assert torch.equal(ema["a"], torch.tensor([0.75, 3.0]))
    assert torch.equal(states[0]["a"], torch.tensor([0.0, 2.0]))  # the rounds' states untouched
    assert torch.equal(ema_states(states, 0.0)["a"], states[-1]["a"])  # decay 0: the last round


@pytest.mark.parametrize("argv, named", [(["--ema", "1.5"], "--ema"), (["--ema", "x"], "--ema"),
                                         (["--rounds", "4", "--score-rounds", "8"], "--score-rounds")])
def test_bad_options_stop_before_any_work_naming_the_option(argv, named, capsys):
    from image_ablation import main

    with pytest.raises(SystemExit):
        main(["conf/image.toml", *argv])
    assert named in capsys.readouterr().err

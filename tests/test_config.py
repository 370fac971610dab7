import tomllib
from pathlib import Path

import pytest

from task.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_parse_and_match_the_dataclass():
    cfg = RunConfig.from_run_config(DEFAULTS)
    assert cfg == RunConfig()  # one source of truth: no drift between pyproject and code
    assert set(DEFAULTS) == {RunConfig.key_of(k) for k in RunConfig.__dataclass_fields__}


@pytest.mark.parametrize("conf", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_conf_parses(conf):
    overrides = tomllib.loads(conf.read_text())
    assert set(overrides) <= set(DEFAULTS), "override keys must exist in pyproject"
    RunConfig.from_run_config({**DEFAULTS, **overrides})


@pytest.mark.parametrize("key,value,needle", [
    ("lora-rank", 0, "'lora-rank'"),
    ("lora-rank", 2.5, "'lora-rank'"),
    ("fraction-train", 1.5, "'fraction-train'"),
    ("dataset", "mnist", "'dataset'"),
    ("learning-rate", "fast", "'learning-rate'"),
    ("partitioner", "role", "'partitioner'"),  # needs shakespeare: combined with dataset=ptb below
    ("lorarank", 8, "lorarank"),
])
def test_bad_key_or_value_names_the_key(key, value, needle):
    config = {**DEFAULTS, key: value}
    if key == "partitioner":
        config["dataset"] = "ptb"
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config(config)


def test_relative_output_dir_resolves_under_fedgen_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDGEN_EDGE_HOME", str(tmp_path))
    assert RunConfig(output_dir="runs/a").output_path == tmp_path / "runs/a"
    assert RunConfig(output_dir="/abs/x").output_path == Path("/abs/x")

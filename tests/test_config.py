import re
import tomllib
from pathlib import Path

import pytest

from strategies.registry import check_run
from task.config import RENAMED, ConfigError, RunConfig, flatten_tables

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


DEFAULTS = flatten_tables(tomllib.loads(PYPROJECT)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_parse_and_match_the_dataclasses():
    cfg = RunConfig.from_run_config(DEFAULTS)
    assert cfg == RunConfig()  # one source of truth: no drift between pyproject and code
    assert set(DEFAULTS) == set(RunConfig.key_types())
    assert cfg.flat() == DEFAULTS
    assert len(DEFAULTS) == 102 and len(RENAMED) == 73  # 6 top-level keys kept their names, run-name is new; 5 protocol keys (issue 15); the eval keys count tokens; 8 image score keys, client-fid-images renamed, 2 LoRA placement keys, the discriminator warm-up (issue 16); 5 attacker keys, 2 multikrum keys, secagg.client-clip-norm (issue 18)


def test_every_pyproject_key_has_a_comment():
    section = PYPROJECT.split("[tool.flwr.app.config]")[1]
    keys = [line for line in section.splitlines() if re.match(r"^[\w-]+ = ", line)]
    assert len(keys) == len(DEFAULTS)
    assert all("  # " in line for line in keys), [k for k in keys if "  # " not in k]


@pytest.mark.parametrize("conf", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_conf_passes_the_start_up_checks_of_a_run(conf):
    overrides = flatten_tables(tomllib.loads(conf.read_text()))
    assert set(overrides) <= set(DEFAULTS), "override keys must exist in pyproject"
    task, entry = check_run(RunConfig.from_run_config({**DEFAULTS, **overrides}))
    assert task.name == overrides.get("task", "lm") and entry.server is not None


@pytest.mark.parametrize("key,value,needle", [
    ("lora.rank", 0, "'lora.rank'"),
    ("lora.rank", 2.5, "'lora.rank'"),
    ("strategy.fraction-train", 1.5, "'strategy.fraction-train'"),
    ("train.learning-rate", "fast", "'train.learning-rate'"),
    ("data.partitioner", "role", "'data.partitioner'"),  # needs shakespeare: with data.dataset=ptb
    ("lora.rnk", 8, "lora.rnk"),
])
def test_bad_key_or_value_names_the_key(key, value, needle):
    config = {**DEFAULTS, key: value}
    if key == "data.partitioner":
        config["data.dataset"] = "ptb"
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_run_config(config)


@pytest.mark.parametrize("key,value,needle", [
    ("data.dataset", "mnist", "'data.dataset'"),
    ("strategy.name", "fedsgd", "'strategy.name'"),
    ("task", "audio", "'task'"),
])
def test_start_up_check_names_what_no_task_or_strategy_has(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        check_run(RunConfig.from_run_config({key: value}))


def test_an_old_flat_key_is_refused_with_its_new_name():
    with pytest.raises(ConfigError, match=r"'lora-rank' is now 'lora.rank'"):
        RunConfig.from_run_config({"lora-rank": 4})


def test_replace_and_get_by_run_config_key():
    cfg = RunConfig().replace(**{"lora.rank": 4, "seed": 7})
    assert (cfg.lora.rank, cfg.seed, cfg.get("lora.rank")) == (4, 7, 4)
    assert not cfg.is_default("lora.rank") and cfg.is_default("lora.alpha")
    with pytest.raises(ConfigError, match="'lora.rank'"):
        RunConfig().replace(**{"lora.rank": -1})


def test_relative_output_dir_resolves_under_fedgen_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDGEN_EDGE_HOME", str(tmp_path))
    assert RunConfig(output_dir="runs/a").output_path == tmp_path / "runs/a"
    assert RunConfig(output_dir="/abs/x").output_path == Path("/abs/x")


def test_each_run_gets_its_own_folder_named_by_run_name_and_run_id(monkeypatch, tmp_path):
    from task.config import point_latest_at

    monkeypatch.setenv("FEDGEN_EDGE_HOME", str(tmp_path))
    default, smoke = RunConfig(), RunConfig.from_run_config({"run-name": "smoke"})
    assert default.names_each_run()
    first, second = default.for_run(11).output_path, default.for_run(12).output_path
    assert first == tmp_path / "outputs/default/11" and second == tmp_path / "outputs/default/12"
    assert smoke.for_run(11).output_path == tmp_path / "outputs/smoke/11", "never the default's"
    with pytest.raises(RuntimeError, match="for_run"):
        _ = default.output_path  # a template is never used as a path by mistake
    # A fixed output-dir stays what it says, whatever the run.
    assert RunConfig(output_dir="runs/a").for_run(11).output_path == tmp_path / "runs/a"

    # resume = true continues in the folder `latest` links (the ServerApp points it at its run).
    first.mkdir(parents=True)
    point_latest_at(first)
    assert (tmp_path / "outputs/default/latest").resolve() == first
    resumed = RunConfig.from_run_config({"resume": True}).for_run(99)
    assert resumed.output_path == first
    # with nothing to resume (no earlier run of that name) it starts its own folder
    assert RunConfig.from_run_config({"resume": True, "run-name": "new"}).for_run(99).output_path \
        == tmp_path / "outputs/new/99"


@pytest.mark.parametrize("key, value, needle", [
    ("output-dir", "outputs/{conf}/{run-id}", "unknown field"),
    ("run-name", "a/b", "folder name"),
    ("run-name", "", "folder name"),
])
def test_bad_output_folder_names_the_key(key, value, needle):
    with pytest.raises(ConfigError, match=f"'{key}'.*{needle}"):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("conf", sorted((ROOT / "conf").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_conf_names_its_runs_after_its_file(conf):
    assert tomllib.loads(conf.read_text())["run-name"] == conf.stem

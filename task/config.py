"""The run configuration, parsed once into a typed, frozen object made of sub-configs.

Every knob lives in ``[tool.flwr.app.config]`` of pyproject.toml, grouped in nested tables as
flowertune-llm groups them (``[tool.flwr.app.config.lora]`` ``rank = 8`` is the run-config key
``lora.rank``), with a comment each; ``conf/*.toml`` files override only what they change.
Each group is one frozen dataclass of task/config_groups.py (``cfg.lora.rank``); their defaults equal pyproject's
(a test holds them together). Both apps call :func:`RunConfig.from_run_config` first, so a
wrong key or value stops the run at start with a message naming the key; the checks of what a
task or strategy can honour come right after it (strategies.registry.check_run).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from task.config_groups import (  # noqa: F401  (the groups and their errors, named from here too)
    AGGREGATIONS,
    ATTACKS,
    BACKBONES_BUILTIN,
    DEVICES,
    PRECISIONS,
    UPLOAD_CODECS,
    AdapterConfig,
    ConfigError,
    DataConfig,
    DPConfig,
    EvalConfig,
    ImageConfig,
    ModelConfig,
    Need,
    RobustConfig,
    SecAggConfig,
    ServerConfig,
    StrategyConfig,
    ThreatsConfig,
    TrainConfig,
    UploadConfig,
    parse_rank_mix,
)
from task.renamed_keys import RENAMED


@dataclass(frozen=True)
class RunConfig:
    # What is trained (the groups below say on what and how).
    task: str = "lm"
    num_server_rounds: int = 6
    seed: int = 42
    run_name: str = "default"
    output_dir: str = "outputs/{run-name}/{run-id}"
    cache_dir: str = ""
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    threats: ThreatsConfig = field(default_factory=ThreatsConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    # ---------------------------------------------------------------- keys
    @classmethod
    def key_types(cls) -> dict[str, str]:
        """Every run-config key (``lora.rank``) -> its type name."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:  # a group
                for sub in dataclasses.fields(f.default_factory):
                    out[f"{f.name}.{_kebab(sub.name)}"] = _type_name(sub.type)
            else:
                out[_kebab(f.name)] = _type_name(f.type)
        return out

    def flat(self) -> dict[str, Any]:
        """The config as Flower's flat run config (dotted keys), e.g. for results.json."""
        out = {}
        for key in self.key_types():
            out[key] = self.get(key)
        return out

    def get(self, key: str) -> Any:
        """The value of a run-config key (``"lora.rank"``)."""
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part.replace("-", "_"))
        return obj

    def is_default(self, key: str) -> bool:
        """True when ``key`` has its default value (an option that is off)."""
        return self.get(key) == RunConfig().get(key)

    def replace(self, **values: Any) -> "RunConfig":
        """A copy with some keys changed, by run-config key: ``cfg.replace(**{"lora.rank": 4})``."""
        return RunConfig.from_run_config({**self.flat(), **values})

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (dotted, kebab-case keys); keys left out
        take their defaults."""
        types = cls.key_types()
        unknown = sorted(set(run_config) - set(types))
        if unknown:
            hints = [f"'{k}' is now '{RENAMED[k]}'" for k in unknown if k in RENAMED]
            raise ConfigError(f"unknown run-config key(s) {unknown}"
                              + (f" ({'; '.join(hints)})" if hints else "")
                              + f"; valid keys: {sorted(types)}")
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            value = _coerce(key, value, types[key])
            group, _, name = key.rpartition(".")
            if group:
                groups.setdefault(group, {})[name.replace("-", "_")] = value
            else:
                top[name.replace("-", "_")] = value
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING}
        cfg = cls(**top, **{g: factories[g](**v) for g, v in groups.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need_top(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run-config key '{_kebab(name)}' = {getattr(self, name)!r}: {why}")

        need_top(self.num_server_rounds >= 1, "num_server_rounds", "must be >= 1")
        need_top(bool(self.output_dir), "output_dir", "must not be empty")
        need_top(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
                 "run_name", "must be a folder name (no '/')")
        unknown = set(re.findall(r"\{[^}]*\}", self.output_dir)) - set(OUTPUT_DIR_FIELDS)
        need_top(not unknown, "output_dir",
                 f"unknown field(s) {sorted(unknown)}; it may use {', '.join(OUTPUT_DIR_FIELDS)}")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate(_need_in(f.name, sub))

    # Paths: relative ones resolve under FEDGEN_EDGE_HOME (default ~/.fedgen-edge), because the
    # apps run from a bundle copy whose working directory is not the user's checkout.
    @property
    def output_path(self) -> Path:
        if "{" in self.output_dir:
            raise RuntimeError(f"output-dir {self.output_dir!r} names a run: use cfg.for_run(run_id)")
        return _resolve(self.output_dir)

    def for_run(self, run_id: int) -> "RunConfig":
        """This config with ``output-dir`` resolved for Flower run ``run_id``.

        ``{run-name}`` becomes ``run-name``; ``{run-id}`` gives each run its own folder (so a
        smoke run never overwrites the default run's results), except that ``resume = true``
        continues in the folder ``latest`` points to. The ServerApp points ``latest`` at its
        folder (:func:`point_latest_at`); both apps resolve to the same folder.
        """
        path = self.output_dir.replace("{run-name}", self.run_name)
        if "{run-id}" in path:
            latest = _resolve(path.replace("{run-id}", LATEST))
            if self.resume and latest.exists():
                path = str(latest.resolve())
            else:
                path = path.replace("{run-id}", str(run_id))
        return dataclasses.replace(self, output_dir=str(_resolve(path)))

    def names_each_run(self) -> bool:
        """True when ``output-dir`` gives each run its own folder (it uses ``{run-id}``)."""
        return "{run-id}" in self.output_dir

    @property
    def cache_path(self) -> Path:
        return _resolve(self.cache_dir or "cache")


def flatten_tables(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted run-config keys, as Flower flattens pyproject and conf files."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten_tables(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


OUTPUT_DIR_FIELDS = ("{run-name}", "{run-id}")
LATEST = "latest"  # beside the run folders: a link to the newest one


def point_latest_at(out: Path) -> None:
    """``<out>/../latest`` -> ``out`` (a relative link, so the tree can move)."""
    link = out.parent / LATEST
    tmp = out.parent / f".{LATEST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name, target_is_directory=True)
    tmp.replace(link)  # atomic: a reader sees the old link or the new one


def fedgen_home() -> Path:
    return Path(os.environ.get("FEDGEN_EDGE_HOME", Path.home() / ".fedgen-edge")).expanduser()


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else fedgen_home() / p


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else t.__name__


def _need_in(group: str, sub: Any) -> Need:
    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"run-config key '{group}.{_kebab(name)}' = {getattr(sub, name)!r}: {why}")

    return need


def _coerce(key: str, value: Any, type_name: str) -> Any:
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be true or false")
        return value
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be an integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be finite")
        return value
    if type_name == "str":
        if not isinstance(value, str):
            raise ConfigError(f"run-config key '{key}' = {value!r}: must be a string")
        return value
    raise AssertionError(f"unhandled config type {type_name}")

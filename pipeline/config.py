"""Job configuration: one typed dataclass per job, fields documented with `opt(...)`, invariants in
__post_init__. YAML in (`--config FILE.yaml`), CLI flags on top (jobs/cli.py builds them from the
fields)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices=None):
    """A documented config field (help shown by `vaepipe JOB --help`)."""
    md = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class RuntimeConfig:
    """Fields every job shares: where it keeps its state and where MLflow is."""

    workdir: str = opt(os.environ.get("VAEPIPE_WORKDIR", "vaepipe-work"),
                       "work folder: local MLflow store, Ray checkpoints, demo data")
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a "
                                         "SQLite store in the work folder)")
    ray_address: str | None = opt(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{os.path.abspath(os.path.join(self.workdir, 'mlflow.db'))}"

    def require(self, *names: str) -> None:
        for n in names:
            if getattr(self, n) in (None, "", []):
                raise ConfigError(f"{type(self).__name__}: '{n}' is required (--{n.replace('_', '-')})")

    def choice(self, name: str, allowed: tuple) -> None:
        if getattr(self, name) not in allowed:
            raise ConfigError(f"{type(self).__name__}: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class WriterConfig(RuntimeConfig):
    """Fields of every job that commits an output folder (one writer per output: pipeline.lease)."""

    wait: float = opt(0.0, "seconds to wait for another run writing the same output (0: exit with status 2 at once)")
    lease_ttl: float = opt(60.0, "seconds a killed run's lease on the output blocks the next run (renewed every ttl/3)")

    def check_writer(self) -> None:
        if self.wait < 0 or self.lease_ttl < 3:
            raise ConfigError(f"{type(self).__name__}: wait must be ≥ 0 and lease_ttl ≥ 3 seconds")


def from_mapping(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} must be a mapping of field: value")
    return data

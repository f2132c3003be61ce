"""Job configuration: one typed dataclass per job, fields documented with `opt(...)`, invariants in
__post_init__. YAML in (`--config FILE.yaml`), CLI flags on top (jobs/cli.py builds them from the
fields); every value is converted to its field's declared type (`convert`) before the dataclass
sees it, so `lr: 2e-3` (a string to YAML 1.1) is a float and `epochs: ten` is one clear error."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.runtime.errors import ConfigError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, choices=None, group: str = ""):
    """A documented config field (help shown by `vaepipe JOB --help`, under `group` when given)."""
    md = {"help": help, "choices": choices, "group": group}
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
    """Fields of every job that commits an output folder (one writer per output: pipeline.table.lease)."""

    wait: float = opt(0.0, "seconds to wait for another run writing the same output (0: exit with status 2 at once)")
    lease_ttl: float = opt(60.0, "seconds a killed run's lease on the output blocks the next run (renewed every ttl/3)")

    def check_writer(self) -> None:
        if self.wait < 0 or self.lease_ttl < 3:
            raise ConfigError(f"{type(self).__name__}: wait must be ≥ 0 and lease_ttl ≥ 3 seconds")


def from_mapping(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from YAML/flag values, each converted to its field's declared type first."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: convert(v, hints[k], k, source) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_yaml(path: str) -> dict[str, Any]:
    import yaml   # here, not at the top: a short `vaepipe query` process never reads YAML

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


# --- typed conversion ------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def type_name(tp: Any) -> str:
    """`int`, `list[int]`, `float | None`: how an annotation reads in an error message."""
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, key: str, source: str = "config") -> Any:
    """`value` (from YAML or a flag) as the declared type `tp`: bool, int, float, str, `list[T]`
    (a list, or a comma-separated string), `dict` and unions with None. A value that does not fit
    raises one line naming the key, the value and the expected type."""
    try:
        return _convert(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {type_name(tp)}") from None


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:                      # a value already of one arm's type stays as it is
            if _is_instance(value, arm):
                return value
        for arm in arms:
            try:
                return _convert(value, arm)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(value)
        return [_convert(v.strip() if isinstance(v, str) else v, inner) for v in items
                if not (isinstance(v, str) and v.strip() == "")]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise TypeError(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            f = float(value.strip().replace("_", ""))      # "10", "1e6", "10_000"
            if f.is_integer():
                return int(f)
        raise ValueError(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):   # `run_name: 2026`
            return str(value)
        raise TypeError(value)
    return value


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type) and not typing.get_args(tp):
        return isinstance(value, tp)
    return False


def write_json(path: str, figures: dict[str, Any]) -> None:
    """A job's `--json FILE`: its figures, indented, the file's folder created if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)


def parse_storage_options(value: str | dict | None) -> dict[str, Any]:
    """`--storage-options` as given (JSON text, a YAML mapping or empty) → a dict for fsspec."""
    if not value:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"storage_options: expected a JSON object ({e.msg} at character {e.pos}; "
                          f"the value is not shown: it may hold credentials)") from None
    if not isinstance(opts, dict):
        raise ConfigError(f"storage_options: expected a JSON object, got a JSON {type(opts).__name__}")
    return opts

"""Every YAML config in the repo loads into its job's config dataclass; flags override YAML."""
from __future__ import annotations

import importlib
import pathlib

import pytest

from jobs.cli import parse_config
from pipeline.runtime.errors import ConfigError
from pipeline.training.train import TrainConfig

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_repo_has_configs():
    assert CONFIGS, "configs/*.yaml missing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_config_builds_its_job_config(path):
    job = path.stem.split("-")[0]                        # train-mnist.yaml → jobs.train
    module = importlib.import_module(f"jobs.{job}")
    # required URIs are supplied on the command line, as a scheduler would
    extra = ["--input", "in/"] + (["--output", "out/"] if "output" in module.Config.__dataclass_fields__ else [])
    cfg = parse_config(module.Config, ["--config", str(path), *extra], prog=job)
    assert isinstance(cfg, module.Config)


def test_flags_override_yaml_and_lists_split_on_commas(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("input: a/\nfeatures: [x]\nepochs: 3\n")
    cfg = parse_config(TrainConfig, ["--config", str(y), "--epochs", "5", "--features", "a,b"], prog="train")
    assert (cfg.epochs, cfg.features, cfg.input) == (5, ["a", "b"], "a/")


def test_unknown_yaml_key_and_missing_input_are_config_errors(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("input: a/\nfeatures: [x]\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epoch'\]"):
        parse_config(TrainConfig, ["--config", str(y)], prog="train")
    with pytest.raises(ConfigError, match="'input' is required"):
        TrainConfig(features=["x"])

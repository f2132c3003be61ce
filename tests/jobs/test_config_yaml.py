"""Every shipped YAML builds its job's Config through the CLI parser; flags win over YAML; bad configs
are ConfigErrors."""
from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re

import pytest
import yaml

from jobs.cli import parse_config
from pipeline.runtime.errors import ConfigError
from pipeline.training.train import TrainConfig

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
YAMLS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))
PREFIX_TO_JOB = {"train": "jobs.train", "encode": "jobs.encode", "nightly": "jobs.nightly",
                 "decode": "jobs.decode", "evaluate": "jobs.evaluate"}


def job_for(path: pathlib.Path) -> str:
    prefixes = [p for p in PREFIX_TO_JOB if path.name.startswith(p)]
    assert prefixes, f"{path.name}: name must start with one of {sorted(PREFIX_TO_JOB)}"
    return PREFIX_TO_JOB[prefixes[0]]


def required_flags(cls: type, given: dict) -> list[str]:
    """URIs a scheduler passes on the command line: every required string field the YAML leaves out."""
    flags = []
    for f in dataclasses.fields(cls):
        if f.name not in given and f.default == "" and f.name in ("input", "output", "model"):
            flags += [f"--{f.name}", {"model": "models:/m@production"}.get(f.name, f"{f.name}/")]
    return flags


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_builds_its_job_config(path):
    module_name = job_for(path)
    module = importlib.import_module(module_name)                  # the job module must exist
    assert dataclasses.is_dataclass(module.Config) and callable(module.run)
    values = yaml.safe_load(path.read_text()) or {}
    # when the header comment names the job (`# vaepipe encode: …`), it agrees with the file name
    m = re.match(r"#\s*vaepipe (\w+)", path.read_text())
    if m:
        assert f"jobs.{m.group(1)}" == module_name

    cfg = parse_config(module.Config, ["--config", str(path), *required_flags(module.Config, values)],
                       prog=path.stem)
    assert isinstance(cfg, module.Config)
    for key, value in values.items():                               # every YAML value reached the config
        assert getattr(cfg, key) == value, key


def test_the_config_folder_is_not_empty():
    # guards the parametrised test above against silently running zero cases
    assert YAMLS, f"no YAML configs under {CONFIG_DIR}"


def write(tmp_path, text: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return str(p)


def test_cli_flags_override_yaml_values(tmp_path):
    y = write(tmp_path, "input: data/\nfeatures: [image]\nepochs: 3\nlatent_dim: 8\n")
    assert parse_config(TrainConfig, ["--config", y], prog="train").epochs == 3
    cfg = parse_config(TrainConfig, ["--config", y, "--epochs", "5"], prog="train")
    assert (cfg.epochs, cfg.latent_dim, cfg.input, cfg.features) == (5, 8, "data/", ["image"])


def test_list_flags_split_on_commas_and_repeat(tmp_path):
    y = write(tmp_path, "input: data/\nfeatures: [image]\n")
    assert parse_config(TrainConfig, ["--config", y, "--features", "a,b"], prog="train").features == ["a", "b"]
    cfg = parse_config(TrainConfig, ["--config", y, "--features", "a", "--features", "b,c", "--hidden", "32,16"],
                       prog="train")
    assert cfg.features == ["a", "b", "c"] and cfg.hidden == [32, 16]   # typed by the field's annotation


def test_flags_alone_build_a_config_with_bool_and_no_bool_flags():
    cfg = parse_config(TrainConfig, ["--input", "in/", "--features", "x", "--resume", "--no-compile",
                                     "--val-fraction", "0.2"], prog="train")
    assert (cfg.input, cfg.features, cfg.resume, cfg.compile, cfg.val_fraction) == ("in/", ["x"], True, False, 0.2)
    assert cfg.epochs == TrainConfig.__dataclass_fields__["epochs"].default   # untouched fields keep defaults


def test_unknown_yaml_key_is_a_config_error(tmp_path):
    y = write(tmp_path, "input: data/\nfeatures: [x]\nepoch: 3\n")    # typo for `epochs`
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epoch'\] for TrainConfig"):
        parse_config(TrainConfig, ["--config", y], prog="train")


def test_train_config_without_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'input' is required"):
        TrainConfig(features=["x"])
    with pytest.raises(ConfigError, match="'input' is required"):
        parse_config(TrainConfig, ["--config", write(tmp_path, "features: [x]\n")], prog="train")


@pytest.mark.parametrize("text,match", [("- a\n- b\n", "must be a mapping"), ("a: [1\n", "not valid YAML"),
                                        ("input: in/\nfeatures: [x]\nepochs: -1\n", "epochs must be ≥ 0"),
                                        ("input: in/\nfeatures: [x]\nval_fraction: 1.0\n", "val_fraction")],
                         ids=["not-a-mapping", "bad-yaml", "negative-epochs", "val-fraction-1"])
def test_bad_yaml_files_are_config_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(TrainConfig, ["--config", write(tmp_path, text)], prog="train")


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")], prog="train")


def test_yaml_values_take_their_fields_declared_types(tmp_path):
    # YAML 1.1 reads `2e-3` (no dot) as a string; every value is converted to the field's type
    y = write(tmp_path, "input: data/\nfeatures: image\nlr: 2e-3\nepochs: '4'\nhidden: 32,16\n"
                        "use_gpu: 'false'\nrun_name: 2026\nval_fraction: 0\n")
    cfg = parse_config(TrainConfig, ["--config", y], prog="train")
    assert (cfg.lr, cfg.epochs, cfg.hidden, cfg.features) == (0.002, 4, [32, 16], ["image"])
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.val_fraction) is float
    assert (cfg.use_gpu, cfg.run_name) == (False, "2026")


@pytest.mark.parametrize("text,flags,match", [
    ("epochs: ten\n", [], r"^train: epochs: 'ten' is not a valid int$"),
    ("lr: fast\n", [], r"^train: lr: 'fast' is not a valid float$"),
    ("epochs: 2.5\n", [], r"^train: epochs: 2\.5 is not a valid int$"),
    ("compile: maybe\n", [], r"^train: compile: 'maybe' is not a valid bool$"),
    ("hidden: [32, wide]\n", [], r"^train: hidden: \[32, 'wide'\] is not a valid list\[int\]$"),
    ("", ["--batch-size", "big"], r"^train: batch_size: 'big' is not a valid int$"),
], ids=["int", "float", "fractional-int", "bool", "list-item", "flag"])
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, text, flags, match):
    y = write(tmp_path, "input: data/\nfeatures: [x]\n" + text)
    with pytest.raises(ConfigError, match=match):
        parse_config(TrainConfig, ["--config", y, *flags], prog="train")


def test_help_groups_the_train_flags_and_keeps_their_spellings(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"], prog="train")
    out = capsys.readouterr().out
    for group in ("model:", "optimisation:", "data:", "checkpointing:", "registry:", "compute:"):
        assert group in out
    for flag in ("--lr", "--no-compile", "--keep-checkpoints", "--features", "--model-name"):
        assert flag in out


def test_train_fields_fall_into_frozen_typed_groups_exactly_once():
    from pipeline.runtime.config import RuntimeConfig
    from pipeline.training.train_config import (CheckpointOptions, ComputeOptions, DataOptions, ModelOptions, OptimConfig,
                                       RegistryOptions)

    groups = (ModelOptions, OptimConfig, DataOptions, CheckpointOptions, RegistryOptions, ComputeOptions)
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in dataclasses.fields(RuntimeConfig)}
    grouped = [f.name for g in groups for f in dataclasses.fields(g)]
    assert sorted(grouped) == sorted(own)                                  # each field in exactly one group
    cfg = TrainConfig(input="in/", features=["x"], hidden=[8, 4], lr=0.5)
    assert cfg.optim.lr == 0.5 and cfg.model.hidden == (8, 4) and cfg.data.features == ("x",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    # the help lists each field under the group its typed view belongs to
    for g, title in zip(groups, ("model", "optimisation", "data", "checkpointing", "registry", "compute")):
        assert {TrainConfig.__dataclass_fields__[f.name].metadata["group"] for f in dataclasses.fields(g)} == {title}


def test_keep_checkpoints_needs_one_and_not_more_than_patience():
    # Ray keeps the best epochs by -ELBO and the newest, so early stopping's best epoch survives any N
    with pytest.raises(ConfigError, match=r"keep_checkpoints must be ≥ 1, got 0"):
        TrainConfig(input="in/", features=["x"], keep_checkpoints=0)
    assert TrainConfig(input="in/", features=["x"], patience=10, keep_checkpoints=1).keep_checkpoints == 1


def test_pseudo_labels_is_a_fraction_below_one():
    # at 1 no record would stay unlabelled, and the head's class term (weighted by unlabelled/labelled) vanishes
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"pseudo_labels must be in \[0, 1\)"):
            TrainConfig(input="in/", features=["x"], labels="y", pseudo_labels=bad)
    assert TrainConfig(input="in/", features=["x"], labels="y", pseudo_labels=0.0).data.pseudo_labels == 0.0

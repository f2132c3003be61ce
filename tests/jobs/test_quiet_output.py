"""A successful run says what it did and nothing else: `vaepipe demo` (2 epochs) as a subprocess, its
stdout and stderr (not a terminal) free of Ray's and MLflow's internal chatter, each epoch line once,
and encode's progress as one line per finished unit plus a summary. And the progress reporter's two
formats (lines off a terminal, one redrawn line on one)."""
from __future__ import annotations

import io
import os
import pathlib
import re
import subprocess
import sys

import pytest

from pipeline.runtime.progress import Progress

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent

NOISE = [
    "Failed to kill actor",                                            # gcs_actor_scheduler.cc at shutdown
    "``concurrency`` is deprecated",                                   # map_batches(concurrency=…)
    "Add type hints to the `predict` method",                          # MLflow UserWarning
    "An input example was not provided",                               # MLflow UserWarning
    "Token authentication is enabled",                                 # Ray's notice for a new local Ray
    "Progress bars disabled",                                          # Ray Data, bars off on purpose
    "execution finished in",                                           # Ray Data INFO per dataset
    "Downloading artifacts",                                           # MLflow's download bars
    "Started training worker group",                                   # Ray Train's controller at INFO
    "Creating initial MLflow database tables",                         # MLflow, a new SQLite store
    # core_worker.cc's ERROR for actors started with arguments by reference (ray-project/ray#57733):
    # Ray Data's pool actors, from the driver's own C++ (pipeline.runtime.ray_runtime.driver_stderr_filtered)
    "constructor arguments in the object store and max_restarts > 0",
]
UNIT_LINE = re.compile(r"^encode: (\d+)/(\d+) units, [\d,]+/1,797 records \(\d+%\), [\d,]+ records/s(, ETA .+)?$", re.M)
SUMMARY = re.compile(r"^encode: 1,797 records in (\d+) units in [\d.]+ (s|min)", re.M)


@pytest.mark.slow
def test_demo_output_is_what_it_did(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("VAEPIPE_PROGRESS", None)
    p = subprocess.run([str(BIN / "vaepipe"), "demo", "--epochs", "2", "--workers", "2", "--latent-dim", "2",
                        "--workdir", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "demo finished" in out
    for s in NOISE:
        assert s not in out, f"{s!r} in the output:\n{out[-5000:]}"
    for e in (1, 2):   # printed once by rank 0, reaching the driver once
        assert len(re.findall(rf"epoch {e}/2: train -ELBO", out)) == 1, out[-5000:]
    # each worker's node and threads, once, all printed by rank 0 (one process): Ray forwarded rank 1's
    # own line on its own schedule, at times after "demo finished"
    workers = re.findall(r"\(RayTrainWorker pid=(\d+)\)\S*\s+worker (\d)/2 on node \S+ .*torch thread", out)
    assert sorted(r for _, r in workers) == ["0", "1"] and len({pid for pid, _ in workers}) == 1, out[-5000:]
    assert p.stdout.rstrip().splitlines()[-1].startswith("demo finished"), p.stdout[-2000:]
    units = UNIT_LINE.findall(out)
    summary = SUMMARY.findall(out)
    assert units and len(summary) == 1, out[-5000:]
    n = int(units[0][1])
    assert [int(u[0]) for u in units] == list(range(1, n + 1)) and int(summary[0][0]) == n


def test_progress_lines_off_a_terminal():
    code = ("from pipeline.runtime.progress import Progress\n"
            "with Progress('encode', total=1000, units=4) as p:\n"
            "    for _ in range(4): p.update(250)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 5 and "\r" not in r.stderr
    for i, ln in enumerate(lines[:4], 1):
        assert re.fullmatch(rf"encode: {i}/4 units, {250 * i:,}/1,000 records \({25 * i}%\), [\d,]+ records/s(, ETA .+)?", ln), ln
    assert re.fullmatch(r"encode: 1,000 records in 4 units in [\d.]+ s \([\d,]+ records/s\)", lines[4]), lines[4]


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    monkeypatch.delenv("VAEPIPE_PROGRESS", raising=False)
    buf = io.StringIO()
    with Progress("decode", total=10, units=2, stream=buf, tty=True, min_interval=0) as p:
        p.update(5)
        p.update(5)
    text = buf.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")            # one line, then the summary
    assert "\r\033[Kdecode: 1/2 units, 5/10 records (50%)" in text
    assert re.search(r"\r\033\[Kdecode: 10 records in 2 units in [\d.]+ s", text)


def test_progress_can_be_silenced(monkeypatch):
    monkeypatch.setenv("VAEPIPE_PROGRESS", "0")
    buf = io.StringIO()
    with Progress("x", total=3, stream=buf) as p:
        p.update(3)
    assert buf.getvalue() == "" and p.summary().startswith("x: 3 records")


def test_ray_data_console_drops_only_the_warnings_about_what_vaepipe_does_on_purpose():
    import logging

    from pipeline.runtime.ray_runtime import RayDataConsoleFilter

    def passes(msg: str, level: int = logging.WARNING) -> bool:
        return RayDataConsoleFilter().filter(logging.LogRecord("ray.data", level, "x.py", 1, msg, None, None))

    # Ray 2.60's map_operator.py, for the GPU encode actors (num_gpus=1, num_cpus=0.5)
    assert not passes("Specifying both num_cpus and num_gpus for map tasks is experimental, and may result in "
                      "scheduling or stability issues. Please report any issues to the Ray team: https://…")
    assert not passes("Progress bars disabled. To enable, set `DataContext.enable_progress_bars = True`.")
    assert passes("Specifying both num_cpus and num_gpus …", logging.ERROR)     # an error always shows
    assert passes("Operator MapBatches(UnitEncoder) is using 95% of its memory budget")   # other warnings show

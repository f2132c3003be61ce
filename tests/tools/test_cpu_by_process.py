"""The CPU-by-process sampler counts a child's CPU under its own title."""
from __future__ import annotations

import json
import sys

from tests.tools.cpu_by_process import main, title


def test_a_busy_child_is_counted_under_its_title(tmp_path):
    out = tmp_path / "cpu.json"
    # about a second of pure-Python work in a process of its own
    rc = main(["--json", str(out), "--", sys.executable, "-c",
               "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["rc"] == 0
    child = [r for r in report["rows"] if r["title"] == title(f"{sys.executable} -c")]
    assert child and 0.8 <= child[0]["cpu_s"] <= 5.0, report["rows"][:5]
    assert report["total_cpu_s"] >= child[0]["cpu_s"]


def test_ray_titles_name_the_actor_class():
    assert title("ray::TrainController.run") == "ray::TrainController"
    assert title("/usr/bin/python3 -m pytest -q") == "python3 -m"

"""CPU seconds by process title while a command runs: where a test suite's or a job's CPU goes.

    python tests/tools/cpu_by_process.py [--json OUT] -- COMMAND ...

Samples /proc every 0.5 s (Linux) while COMMAND runs and prints, per process title (Ray's actors are
titled `ray::ClassName`), the CPU seconds used and the number of processes, then the total. It counts
every process on the machine, not only COMMAND's descendants (`ray start` daemons are re-parented to
init): run it on an otherwise quiet machine. A process living under 0.5 s can be missed; processes
running before the start count only what they used after it."""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def _read(pid: str) -> tuple[int, float, str] | None:
    """(start time in ticks, CPU seconds so far, title) of a process, None if it is gone. The title is
    its command line, or its short name in parentheses while it has none (a zombie, a kernel thread)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rest = st[st.rindex(")") + 2:].split()
    return int(rest[19]), (int(rest[11]) + int(rest[12])) / TICK, cmd or st[st.index("("):st.rindex(")") + 1]


def title(cmd: str) -> str:
    """A short name: `ray::Class` for Ray's processes, else the program and its first argument."""
    m = re.match(r"ray::(\w+)", cmd)
    if m:
        return f"ray::{m.group(1)}"
    return " ".join(os.path.basename(a) for a in cmd.split()[:2])[:60]


def sample(cmd: list[str], interval: float = 0.5) -> tuple[int, dict]:
    """Run `cmd`, sampling every process: (its exit status, {(pid, start): {"cpu0", "cpu", "title"}})."""
    seen: dict = {}
    me = str(os.getpid())

    def scan(first: bool) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            r = _read(pid)
            if r is None:
                continue
            start, cpu, t = r
            p = seen.setdefault((pid, start), {"cpu0": cpu if first else 0.0, "cpu": cpu, "title": t})
            p["cpu"] = cpu
            # a Ray worker takes its actor's title after it starts; an exited one keeps its last
            if not t.startswith("(") and (not p["title"].startswith("ray::") or p["title"].startswith("ray::IDLE")):
                p["title"] = t

    scan(first=True)
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        time.sleep(interval)
        scan(first=False)
    scan(first=False)
    return proc.returncode, seen


def summary(seen: dict) -> list[tuple[str, float, int]]:
    """(title, CPU seconds, processes), the largest first."""
    cpu, n = collections.Counter(), collections.Counter()
    for p in seen.values():
        used = p["cpu"] - p["cpu0"]
        if used > 0:
            k = title(p["title"])
            cpu[k] += used
            n[k] += 1
    return [(k, v, n[k]) for k, v in cpu.most_common()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the table here")
    ap.add_argument("--top", type=int, default=30, help="rows to print")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    t0 = time.time()
    rc, seen = sample(cmd)
    rows = summary(seen)
    total = sum(v for _, v, _ in rows)
    print(f"\ncpu_by_process: {' '.join(cmd)} exited {rc} after {time.time() - t0:.1f} s; "
          f"{total:.1f} CPU-seconds in all", file=sys.stderr)
    for k, v, n in rows[:a.top]:
        print(f"{v:9.1f} s  {n:4d}  {k}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cmd": cmd, "rc": rc, "wall_s": time.time() - t0, "total_cpu_s": total,
                       "rows": [{"title": k, "cpu_s": v, "processes": n} for k, v, n in rows]}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""One writer per output: the lease on local disk, in memory:// and on the loopback S3 server."""
from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.table.commit import control_of
from pipeline.runtime.errors import LeaseHeldError, LeaseLostError
from pipeline.table.lease import Lease, hold_lease
from pipeline.table.uris import resolve


@pytest.fixture(params=["local", "memory", "s3"])
def control(request, tmp_path):
    """The control folder of an output on each kind of store."""
    if request.param == "local":
        return control_of(resolve(str(tmp_path / "out")))
    if request.param == "memory":
        return control_of(resolve(f"memory://lease-tests/{uuid.uuid4().hex}/out"))
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return control_of(resolve(f"s3://{bucket}/out", **s3["storage_options"]))


def test_a_second_writer_is_refused_naming_the_holder(control):
    with hold_lease(control, "OUT", "encode", ttl_s=30) as first:
        with pytest.raises(LeaseHeldError) as e:
            hold_lease(control, "OUT", "nightly", ttl_s=30)
        msg = str(e.value)
        assert f"encode run {first.run_id}" in msg and f"pid {os.getpid()}" in msg and "expires in" in msg
    with hold_lease(control, "OUT", "nightly", ttl_s=30) as second:   # released: the next run takes it at once
        assert second.gen == first.gen + 1


def test_racing_writers_get_exactly_one_lease(control):
    """Every contender creates the same next generation exclusively: one create succeeds."""
    for _ in range(3):
        won, lost, go = [], [], threading.Event()

        def contend():
            go.wait()
            try:
                won.append(hold_lease(control, "OUT", "encode", ttl_s=30))
            except LeaseHeldError:
                lost.append(1)

        threads = [threading.Thread(target=contend) for _ in range(4)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join()
        assert (len(won), len(lost)) == (1, 3)
        won[0].release()


def test_an_expired_lease_is_taken_over_and_its_holder_cannot_commit(control):
    a = hold_lease(control, "OUT", "encode", ttl_s=1.0)
    a._stop.set()                      # a paused driver: it stops renewing…
    a._thread.join()
    with pytest.raises(LeaseHeldError):
        hold_lease(control, "OUT", "encode", ttl_s=1.0)
    time.sleep(1.2)                    # …past its expiry
    b = hold_lease(control, "OUT", "encode", ttl_s=30)
    with pytest.raises(LeaseLostError, match="nothing committed"):
        a.check()                      # the woken-up run finds out before its commit point
    b.check()
    a.release()                        # must not release b's lease
    b.check()
    b.release()


def test_the_holder_renews_its_lease_while_it_works(control):
    with hold_lease(control, "OUT", "encode", ttl_s=0.9) as a:
        first = a.expires_at
        time.sleep(1.5)                # longer than the ttl: only renewals keep it
        a.check()
        assert a.expires_at > first
        with pytest.raises(LeaseHeldError):
            hold_lease(control, "OUT", "encode", ttl_s=0.9)


def test_wait_queues_behind_the_holder(control):
    a = hold_lease(control, "OUT", "encode", ttl_s=30)
    threading.Timer(0.8, a.release).start()
    t0 = time.monotonic()
    with hold_lease(control, "OUT", "encode", ttl_s=30, wait_s=20) as b:
        assert 0.5 < time.monotonic() - t0 < 10 and b.gen == a.gen + 1


def test_a_killed_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    """A killed driver never releases; on the same machine its process is gone, so the next run need
    not wait for the ttl (elsewhere it waits; see test_an_expired_lease…)."""
    ctl = control_of(resolve(str(tmp_path / "out")))
    code = ("import sys, time; from pipeline.table.lease import hold_lease; from pipeline.table.uris import resolve; "
            f"hold_lease(resolve({ctl.path!r}), 'OUT', 'encode', ttl_s=600); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeldError, match=f"pid {p.pid}"):
        hold_lease(ctl, "OUT", "encode", ttl_s=600)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with hold_lease(ctl, "OUT", "encode", ttl_s=600) as b:
        assert b.gen == 2


def test_lease_files_are_small_json_records_and_old_generations_are_removed(tmp_path):
    ctl = control_of(resolve(str(tmp_path / "out")))
    for _ in range(3):
        hold_lease(ctl, "OUT", "encode", ttl_s=30).release()
    files = os.listdir(os.path.join(ctl.path, "lease"))
    assert files == ["000000000003.json"]
    rec = json.load(open(os.path.join(ctl.path, "lease", files[0])))
    assert rec["released"] is True and rec["holder"]["command"] == "encode" and rec["output"] == "OUT"


def test_garbage_in_the_lease_folder_is_ignored_and_never_deleted(tmp_path):
    ctl = control_of(resolve(str(tmp_path / "out")))
    os.makedirs(posixpath.join(ctl.path, "lease"))
    stray = posixpath.join(ctl.path, "lease", "../../canary.json")
    open(posixpath.join(ctl.path, "lease", "notes.txt"), "w").write("x")
    with hold_lease(ctl, "OUT", "encode", ttl_s=30) as a:
        assert a.gen == 1
    assert sorted(os.listdir(posixpath.join(ctl.path, "lease"))) == ["000000000001.json", "notes.txt"]
    assert not os.path.exists(stray)


def test_an_unreadable_newest_generation_counts_as_held_until_it_is_a_ttl_old(tmp_path):
    """A writer may be between creating its file and writing it: wait, but not forever."""
    ctl = control_of(resolve(str(tmp_path / "out")))
    os.makedirs(posixpath.join(ctl.path, "lease"))
    path = posixpath.join(ctl.path, "lease", "000000000007.json")
    open(path, "w").write("{trunc")
    with pytest.raises(LeaseHeldError, match="unreadable lease file"):
        Lease(ctl, "OUT", "encode", ttl_s=30).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    with hold_lease(ctl, "OUT", "encode", ttl_s=30) as a:
        assert a.gen == 8

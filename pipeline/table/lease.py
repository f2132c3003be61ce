"""One writer per output: a lease in the output's control folder, created only if absent.

The lease is a sequence of generation files `lease/000000000001.json`, `…2.json`, …; the holder is
the newest generation that is not released and not expired. Taking the lease = creating the next
generation's file with an exclusive create (`open(…, "xb")`: O_EXCL on a local disk, a conditional
PUT with `If-None-Match: *` on S3), so of two writers that race for the same generation exactly one
wins. The holder renews its own file every ttl/3 from a background thread; a holder that finds a newer
generation (it was paused past its expiry and someone took over) knows it lost the lease, and
`check()` fails before anything is committed. A killed driver stops renewing: its lease expires
after `ttl_s` and the next run takes it over (at once when the holder ran on this machine and its
process is gone). Generations only grow, so a stale holder can never mistake a new lease for its own.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from pipeline.runtime.errors import LeaseHeldError, LeaseLostError
from pipeline.table.uris import Location

log = logging.getLogger(__name__)

_GEN = re.compile(r"^(\d{12})\.json$")


def _machine() -> str:
    """This host and PID namespace: a PID means the same process only within both."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}/{ns}"


def _process_gone(holder: dict) -> bool:
    if holder.get("machine") != _machine() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        return False
    return False


def create_new(loc: Location, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist; False when it does (another writer won)."""
    try:
        with loc.fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


@dataclass
class Lease:
    """Held while a job writes one output; use as a context manager (`hold_lease`)."""

    control: Location            # the output's control folder
    output_uri: str
    command: str
    ttl_s: float = 60.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    gen: int = 0
    expires_at: float = 0.0
    lost: str = ""
    released: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def dir(self) -> str:
        return posixpath.join(self.control.path, "lease")

    def _path(self, gen: int) -> str:
        return posixpath.join(self.dir, f"{gen:012d}.json")

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({
            "holder": {"machine": _machine(), "host": socket.gethostname(), "pid": os.getpid(),
                       "user": _user(), "command": self.command, "run_id": self.run_id},
            "output": self.output_uri, "acquired_at": self.acquired_at, "renewed_at": now,
            "expires_at": 0 if released else now + self.ttl_s, "ttl_s": self.ttl_s, "released": released,
        }, indent=1).encode()

    def _generations(self) -> list[int]:
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in self.control.fs.ls(self.dir, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_GEN.match, names) if m)

    def _read(self, gen: int) -> dict | None:
        """A generation's record; None when unreadable (being written, or garbage)."""
        try:
            with self.control.fs.open(self._path(gen), "rb") as f:
                rec = json.loads(f.read())
            return rec if isinstance(rec, dict) and isinstance(rec.get("holder"), dict) else None
        except (FileNotFoundError, ValueError):
            return None

    def _free(self, gen: int) -> tuple[bool, str]:
        """(can be taken over, who holds it and why it is free) for the newest generation."""
        rec = self._read(gen)
        if rec is None:   # unreadable: give a writer that is creating it one ttl to finish
            try:
                mtime = self.control.fs.modified(self._path(gen)).timestamp()
            except (FileNotFoundError, NotImplementedError, AttributeError):
                mtime = 0.0
            return time.time() - mtime > self.ttl_s, f"an unreadable lease file {self._path(gen)!r}"
        h = rec["holder"]
        who = (f"{h.get('command', '?')} run {h.get('run_id', '?')} (pid {h.get('pid', '?')} on "
               f"{h.get('host', '?')}, user {h.get('user', '?')}) since {_iso(rec.get('acquired_at'))}")
        if rec.get("released"):
            return True, who + " (released)"
        expires = rec.get("expires_at")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return True, who + " (expired)"
        if _process_gone(h):
            return True, who + " (process gone)"
        return False, who + f", lease expires in {expires - time.time():.0f} s"

    def acquire(self, wait_s: float = 0.0) -> "Lease":
        deadline = time.monotonic() + max(0.0, wait_s)
        self.acquired_at = time.time()
        self.control.fs.makedirs(self.dir, exist_ok=True)
        announced = False
        while True:
            gens = self._generations()
            top = gens[-1] if gens else 0
            if top:
                free, who = self._free(top)
                if not free:
                    if time.monotonic() >= deadline:
                        raise LeaseHeldError(f"output {self.output_uri!r} is being written by {who}; "
                                             f"not starting a second writer (--wait SECONDS queues instead)")
                    if not announced:
                        log.warning("waiting for the lease of %s, held by %s", self.output_uri, who)
                        announced = True
                    time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                    continue
                if not who.endswith("(released)"):
                    log.warning("taking over the lease of %s from %s", self.output_uri, who)
            self.acquired_at = time.time()
            if create_new(self.control, self._path(top + 1), self._record()):
                self.gen, self.expires_at = top + 1, time.time() + self.ttl_s
                for g in gens:   # older generations are history now
                    try:
                        self.control.fs.rm(self._path(g))
                    except FileNotFoundError:
                        pass
                self._thread = threading.Thread(target=self._renew_loop, name="vaepipe-lease", daemon=True)
                self._thread.start()
                return self
            # another writer created that generation first: look again

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as e:   # storage hiccup: keep trying until the lease runs out
                log.warning("lease renewal of %s failed: %s", self.output_uri, e)

    def renew(self) -> None:
        if self.lost:
            return
        gens = self._generations()
        if not gens or gens[-1] != self.gen:
            self.lost = f"generation {gens[-1] if gens else 'none'} replaced ours ({self.gen})"
            return
        t = time.time()
        with self.control.fs.open(self._path(self.gen), "wb") as f:
            f.write(self._record())
        self.expires_at = t + self.ttl_s

    def check(self) -> None:
        """Raise unless this run still holds the lease (called right before every commit point)."""
        if not self.lost and time.time() >= self.expires_at:
            self.lost = "it expired without renewal"
        if not self.lost:
            gens = self._generations()
            if not gens or gens[-1] != self.gen:
                self.lost = f"generation {gens[-1] if gens else 'none'} replaced ours ({self.gen})"
        if self.lost:
            raise LeaseLostError(f"lost the lease of {self.output_uri!r} ({self.lost}); nothing committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.gen and not self.lost and not self.released:
            try:
                gens = self._generations()
                if gens and gens[-1] == self.gen:
                    with self.control.fs.open(self._path(self.gen), "wb") as f:
                        f.write(self._record(released=True))
            except Exception as e:   # it will expire on its own
                log.warning("could not release the lease of %s: %s", self.output_uri, e)
        self.released = True

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_lease(control: Location, output_uri: str, command: str, ttl_s: float = 60.0,
               wait_s: float = 0.0) -> Lease:
    """Take the output's lease (or raise LeaseHeldError naming the holder); `with` releases it."""
    return Lease(control, output_uri, command, ttl_s).acquire(wait_s)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:   # no passwd entry in some containers
        return str(os.getuid())


def _iso(t) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if isinstance(t, (int, float)) else "?"

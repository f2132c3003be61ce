"""The neighbour service's work, without Ray: hold a latents table's index, answer requests, pick up
new builds. `pipeline.serving.ray_app` puts it behind Ray Serve's HTTP proxy; tests call it directly
too.

Requests (JSON bodies; every answer is JSON):

    GET  /healthz      200 {"build", "rows", "runs", "fresh", "recall", "nprobe"}
    POST /neighbours   {"id": 123} | {"vector": [..L floats..]} | {"record": {"column": value, …}}
                       [, "k": 10] [, "nprobe": N]
                       200 {"neighbours": [{"id", "distance"}, …], "index": {"build", "runs", "fresh"}}

`id` needs an index that kept the table's integer ids (`vaepipe index` does for an integer id
column); the record itself is left out of its neighbours. `record` needs `--model`: the registered
model's pyfunc encodes it (columns by name, as MLflow's own server takes them) and its μ is the query.
Errors are 4xx with {"error": "..."} naming what was wrong: 400 for a malformed body or a value of the
wrong shape or type, 404 for an unknown id or path, 405 for a wrong method, 422 for a record the
model refuses.

A new build is loaded whole (its arrays opened and checked against its pointer) before one
assignment swaps it in; a request holds the build it started with to its end, so no answer mixes two
builds or reads a half-loaded one. Between a commit and the index built for it (nightly --index
rebuilds it under the same lease), answers come from the previous build and say `"fresh": false`."""
from __future__ import annotations

import contextlib

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.runtime.errors import InputError, VaepipeError
from pipeline.search import ann, ivf
from pipeline.table.uris import Location, resolve

K_MAX = 1_000


@dataclass(frozen=True)
class Loaded:
    pointer: dict[str, Any]
    index: ivf.IVFFlat
    fresh: bool


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NeighbourService:
    def __init__(self, latents: str, model: str | None = None, tracking_uri: str | None = None,
                 storage_options: dict | None = None):
        self.out: Location = resolve(latents, **(storage_options or {}))
        self.latents = latents
        self.current: Loaded | None = None
        self.model = None
        self.inputs: list[str] | None = None   # the model's input columns, from its signature
        self._reload_lock = threading.Lock()
        if model:
            import mlflow

            from pipeline.models.registry import using_tracking

            # the store for this load only: a global URI would redirect every later job in the process
            with using_tracking(tracking_uri) if tracking_uri else contextlib.nullcontext():
                self.model = mlflow.pyfunc.load_model(model)
            schema = self.model.metadata.get_input_schema()
            self.inputs = list(schema.input_names()) if schema is not None else None
        if not self.poll():
            raise InputError(f"latents {latents!r} have no index: build one with `vaepipe index --latents {latents}` "
                             f"(or encode/nightly --index ivf-flat)")

    # --- keeping up with the table ----------------------------------------------------------------

    def poll(self) -> bool:
        """Load the build the pointer names now when it is not the one held, and check whether the
        held one still covers the table as committed. Returns whether an index is held."""
        with self._reload_lock:
            pointer = ann.read_pointer(self.out)
            held = self.current
            if pointer is not None and (held is None or pointer["build"] != held.pointer["build"]):
                index = ann.open_index(self.out, pointer)
                if len(index.vectors) != pointer["rows"] or int(index.offsets[-1]) != pointer["rows"]:
                    raise InputError(f"index build {pointer['build']} of {self.latents!r} does not hold the "
                                     f"{pointer['rows']:,} rows its pointer names")
                np.asarray(index.centroids).sum()   # touch what every request reads first
                held = Loaded(pointer, index, True)
            if held is not None:
                held = Loaded(held.pointer, held.index, self._covers(held.pointer))
            self.current = held   # one assignment: a request sees the old build or the new, whole
            return held is not None

    def _covers(self, pointer: dict[str, Any]) -> bool:
        from pipeline.search.latents import Latents
        from pipeline.table.parquet_io import list_parquet_files

        try:
            return ann.freshness(pointer, Latents(self.out, list_parquet_files(self.out)), pointer["column"]) is None
        except (VaepipeError, OSError):   # mid-commit (a file listed, then moved): judged again next poll
            return self.current.fresh if self.current is not None else False

    # --- requests ----------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            return 200, self._route(method, path.rstrip("/") or "/", body)
        except RequestError as e:
            return e.status, {"error": str(e)}

    def _route(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        if path == "/healthz":
            if method != "GET":
                raise RequestError(405, f"{path} takes GET, not {method}")
            held = self.current
            p = held.pointer
            return {"build": p["build"], "rows": p["rows"], "runs": p["runs"], "fresh": held.fresh,
                    "recall": p["recall"], "nprobe": p["nprobe"], "model": self.model is not None}
        if path != "/neighbours":
            raise RequestError(404, f"no such path {path!r}; paths: /neighbours (POST), /healthz (GET)")
        if method != "POST":
            raise RequestError(405, f"{path} takes POST with a JSON body, not {method}")
        try:
            req = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(req, dict):
            raise RequestError(400, "body must be a JSON object such as {\"id\": 123, \"k\": 10}")
        return self.neighbours(req)

    def neighbours(self, req: dict[str, Any]) -> dict[str, Any]:
        held = self.current   # this request's build, whatever a reload does meanwhile
        index, p = held.index, held.pointer
        unknown = sorted(set(req) - {"id", "vector", "record", "k", "nprobe"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; fields: id | vector | record, k, nprobe")
        given = [f for f in ("id", "vector", "record") if f in req]
        if len(given) != 1:
            raise RequestError(400, f"give exactly one of id, vector, record (got {given or 'none'})")
        k = _int(req.get("k", 10), "k", 1, K_MAX)
        nprobe = _int(req.get("nprobe", p["nprobe"]), "nprobe", 1, p["lists"])
        own = None
        if "id" in req:
            if index.id_sorted is None:
                raise RequestError(400, f"this index keeps no record ids (its table's id column is not an integer "
                                        f"column); ask by vector")
            rid = req["id"]
            if isinstance(rid, bool) or not isinstance(rid, int):
                raise RequestError(400, f"id must be an integer, got {rid!r}")
            pos = int(index.positions_of(np.array([rid]))[0])
            if pos < 0:
                raise RequestError(404, f"id {rid} is not in the index (build {p['build']}, {p['rows']:,} rows)")
            q, own = np.asarray(index.vectors[pos], np.float32), rid
        elif "vector" in req:
            q = _vector(req["vector"], p["dim"])
        else:
            q = self._encode(req["record"], p["dim"], p["column"])
        d, pos = ivf.search_positions(index, q[None], k + (1 if own is not None else 0), nprobe)
        out = []
        for dist, at in zip(d[0].tolist(), pos[0].tolist()):
            if at < 0 or len(out) == k:
                break
            rid = int(index.ids[at]) if index.ids is not None else None
            if own is not None and rid == own:
                continue
            entry = {"id": rid, "distance": math.sqrt(dist)}
            if rid is None:
                entry["row"] = int(index.rows[at])
            out.append(entry)
        return {"neighbours": out, "index": {"build": p["build"], "runs": p["runs"], "fresh": held.fresh}}

    def _encode(self, record: Any, dim: int, column: str = "mu") -> np.ndarray:
        """The record's μ, or for an index of `encode --embedding`'s column its embedding (μ in the
        model's latent metric), as encode writes them."""
        if self.model is None:
            raise RequestError(400, "a record needs a model: start the service with --model models:/NAME@ALIAS")
        if not isinstance(record, dict) or not record:
            raise RequestError(400, "record must be a JSON object of column: value")
        missing = [c for c in self.inputs or [] if c not in record]
        if missing:
            raise RequestError(422, f"record lacks column(s) {missing}; the model takes {self.inputs}")
        import pandas as pd

        try:
            frame = pd.DataFrame([{k: (np.asarray(v) if isinstance(v, list) else v) for k, v in record.items()}])
            out = self.model.predict(frame)
        except Exception as e:   # the pyfunc names the missing / mistyped column
            raise RequestError(422, f"the model refused the record: {' '.join(str(e).split())[:400]}") from None
        mu = out["mu"] if isinstance(out, dict) or hasattr(out, "columns") and "mu" in getattr(out, "columns", []) \
            else out
        mu = np.asarray(mu.iloc[0] if hasattr(mu, "iloc") else mu, np.float32).reshape(-1)
        if len(mu) != dim:
            raise RequestError(422, f"the model gives {len(mu)} latents, the index holds {dim}")
        if column == "embedding":
            import torch

            vae = self.model.unwrap_python_model().model
            mu = vae.embedding(torch.from_numpy(mu[None]))[0].numpy()
        return mu


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _vector(v: Any, dim: int) -> np.ndarray:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise RequestError(400, f"vector must be a list of {dim} numbers")
    if len(v) != dim:
        raise RequestError(400, f"vector has {len(v)} values, the index holds {dim}-dimensional latents")
    a = np.asarray(v, np.float32)
    if not np.isfinite(a).all():
        raise RequestError(400, "vector holds a value that is not a finite float32")
    return a


class Poller:
    """Calls service.poll() every `interval` seconds on a daemon thread (errors kept, not raised:
    the held build keeps answering)."""

    def __init__(self, service: NeighbourService, interval: float):
        self.service, self.interval, self.last_error = service, interval, None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vaepipe-index-poll", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.service.poll()
                self.last_error = None
            except Exception as e:   # a pointer mid-replacement, storage hiccups: try again next time
                self.last_error = f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}"

    def stop(self) -> None:
        self._stop.set()

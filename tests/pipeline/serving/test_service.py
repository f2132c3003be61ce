"""The neighbour service's work without Ray (pipeline.serving.service): answers against the exact
scan, the record's own id left out, every bad request a 4xx naming what was wrong, a new build
swapped in whole, a stale build flagged."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.runtime.errors import InputError
from pipeline.search.query import QueryConfig, run_query
from pipeline.serving.service import NeighbourService
from tests.pipeline.search.test_ann import _build, _clumps, _table
from tests.pipeline.search.test_query import write_latents


def _post(svc, body) -> tuple[int, dict]:
    return svc.handle("POST", "/neighbours", body if isinstance(body, bytes) else json.dumps(body).encode())


def test_neighbours_of_an_id_and_of_a_vector_are_the_exact_ones_with_every_cell_probed(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat", n=6_000)
    p = _build(folder, lists=40)
    svc = NeighbourService(folder)
    status, got = _post(svc, {"id": int(ids[10]), "k": 5, "nprobe": 40})
    want = run_query(QueryConfig(latents=folder, id=[str(int(ids[10]))], k=5, exact=True))
    assert status == 200 and [n["id"] for n in got["neighbours"]] == want.column("id").to_pylist()
    np.testing.assert_allclose([n["distance"] for n in got["neighbours"]], want.column("distance").to_pylist(), rtol=1e-6)
    assert got["index"] == {"build": p["build"], "runs": p["runs"], "fresh": True}
    status, got = _post(svc, {"vector": x[3].tolist(), "k": 2})
    assert status == 200 and got["neighbours"][0] == {"id": int(ids[3]), "distance": 0.0}
    status, health = svc.handle("GET", "/healthz", b"")
    assert status == 200 and health["rows"] == 6_000 and health["nprobe"] == p["nprobe"]


@pytest.mark.parametrize("method, path, body, status, says", [
    ("POST", "/neighbours", b"{not json", 400, "not valid JSON"),
    ("POST", "/neighbours", b"[1, 2]", 400, "JSON object"),
    ("POST", "/neighbours", {"k": 3}, 400, "exactly one of id, vector, record"),
    ("POST", "/neighbours", {"id": 1, "vector": [0.0] * 16}, 400, "exactly one"),
    ("POST", "/neighbours", {"id": "eleven"}, 400, "id must be an integer"),
    ("POST", "/neighbours", {"id": 12}, 404, "id 12 is not in the index"),
    ("POST", "/neighbours", {"vector": [0.0] * 15}, 400, "15 values, the index holds 16"),
    ("POST", "/neighbours", {"vector": [0.0] * 15 + ["a"]}, 400, "list of 16 numbers"),
    ("POST", "/neighbours", {"vector": [0.0] * 15 + [1e39]}, 400, "not a finite float32"),
    ("POST", "/neighbours", {"vector": [0.0] * 16, "k": 0}, 400, "k must be an integer in [1, 1000]"),
    ("POST", "/neighbours", {"vector": [0.0] * 16, "nprobe": 10**6}, 400, "nprobe must be"),
    ("POST", "/neighbours", {"vector": [0.0] * 16, "colour": 1}, 400, "unknown field(s) ['colour']"),
    ("POST", "/neighbours", {"record": {"image": [0] * 64}}, 400, "needs a model"),
    ("GET", "/neighbours", b"", 405, "takes POST"),
    ("POST", "/healthz", b"", 405, "takes GET"),
    ("GET", "/elsewhere", b"", 404, "no such path"),
])
def test_a_bad_request_is_a_4xx_that_says_what_was_wrong(tmp_path_factory, method, path, body, status, says):
    folder = str(tmp_path_factory.getbasetemp() / "svc-bad" / "lat")
    if not __import__("os").path.exists(folder):
        _table(folder, n=2_000)
        _build(folder, lists=10)
    svc = NeighbourService(folder)
    got = svc.handle(method, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got[0] == status and says in got[1]["error"], got


def test_a_table_without_an_index_is_refused_at_start(tmp_path, seed):
    folder, _, _ = _table(tmp_path / "lat", n=500)
    with pytest.raises(InputError, match="no index: build one with `vaepipe index"):
        NeighbourService(folder)


def test_a_commit_flags_the_held_build_stale_and_a_new_build_is_swapped_in_whole(tmp_path, seed):
    folder, x, ids = _table(tmp_path / "lat", n=4_000)
    first = _build(folder, lists=20)
    svc = NeighbourService(folder)
    held = svc.current
    write_latents(folder, _clumps(1_000, seed + 3), np.arange(1_000) + 10**6, files=1)   # a new commit
    svc.poll()
    assert svc.current.pointer == first and svc.current.fresh is False             # old build, said so
    assert _post(svc, {"id": 10**6})[0] == 404 and _post(svc, {"vector": [0.0] * 16})[1]["index"]["fresh"] is False
    second = _build(folder, lists=20)
    svc.poll()
    assert svc.current.pointer == second and svc.current.fresh and svc.current is not held
    status, got = _post(svc, {"id": 10**6, "k": 3})
    assert status == 200 and got["index"]["build"] == second["build"] and len(got["neighbours"]) == 3


def test_a_record_is_searched_in_the_column_the_index_was_built_on(trained_digits, digits_parquet, workdir, tmp_path):
    """An index of `encode --embedding`'s column answers a record by its embedding, as encode wrote
    it: the record finds itself at distance ~0 (its μ would land elsewhere)."""
    import pyarrow.parquet as pq

    from pipeline.batch.encode import EncodeConfig, run_encode
    from pipeline.search.ann import IndexConfig, build_index

    out = str(tmp_path / "lat")
    cfg = EncodeConfig(model="models:/digits@production", input=digits_parquet, output=out, embedding=True,
                       executor="local", workdir=workdir)
    run_encode(cfg)
    build_index(IndexConfig(latents=out, column="embedding", workdir=workdir), log=lambda *_: None)
    svc = NeighbourService(out, model="models:/digits@production", tracking_uri=cfg.resolved_tracking_uri())
    first = sorted(f for f in os.listdir(digits_parquet) if f.endswith(".parquet"))[0]
    raw = pq.read_table(f"{digits_parquet}/{first}", columns=["id", "image"]).slice(5, 1).to_pylist()[0]
    status, got = _post(svc, {"record": {"image": raw["image"]}, "k": 1})
    assert status == 200 and got["neighbours"][0]["id"] == raw["id"] and got["neighbours"][0]["distance"] < 1e-4

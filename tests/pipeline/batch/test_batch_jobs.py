"""Decode, nightly, compact latents and bad records, on the real stack (local Ray, MLflow store)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.batch.decode import DecodeConfig, run_decode
from pipeline.batch.encode import EncodeConfig, run_encode
from pipeline.runtime.errors import BadRecordError
from pipeline.batch.nightly import NightlyConfig, read_state, run_nightly
from pipeline.table.uris import resolve
from vae.checkpoint import load_checkpoint, model_from_checkpoint

from committed_io import committed, manifest, quarantine

MODEL = "models:/digits@production"


def _images(path) -> np.ndarray:
    t = pq.read_table(path)
    return t.column("image").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).astype(np.float32), t


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_encode_decode_round_trip_at_each_latent_precision(trained_digits, digits_parquet, workdir, tmp_path, dtype):
    lat, rec = str(tmp_path / "lat"), str(tmp_path / "rec")
    run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=lat, keep=["id"], dtype=dtype, workdir=workdir))
    first = manifest(lat)["files"][0]["path"]
    assert pq.read_schema(f"{lat}/{first}").field("mu").type == pa.list_(getattr(pa, dtype)(), 4)
    m = run_decode(DecodeConfig(model=MODEL, input=lat, output=rec, workdir=workdir))
    x, src = _images(digits_parquet)
    y, out = _images(rec)
    assert m["rows"] == 1797 and out.column("id").to_pylist() == src.column("id").to_pylist()
    # decode = the model's E[x|z] at the exact-precision μ, in raw pixel units (0..255)
    model = model_from_checkpoint(load_checkpoint(trained_digits.checkpoint))
    exact = model.reconstruct(model.embed(torch.from_numpy(x)).mean).numpy()
    rms = float(np.sqrt(((y - exact) ** 2).mean()))
    assert rms < {"float32": 1e-3, "float16": 0.5, "int8": 3.0}[dtype], rms   # pixel units, out of 255


def test_nightly_encodes_only_new_partitions_and_reruns_safely(trained_digits, digits_parquet, workdir, tmp_path):
    src, out = tmp_path / "in", str(tmp_path / "out")
    files = sorted(p for p in os.listdir(digits_parquet) if p.endswith(".parquet"))
    for i, f in enumerate(files[:2]):
        (src / f"date=2026-11-0{i + 1}").mkdir(parents=True)
        shutil.copy(os.path.join(digits_parquet, f), src / f"date=2026-11-0{i + 1}" / f)
    cfg = NightlyConfig(model=MODEL, input=str(src), output=out, workdir=workdir)
    first = run_nightly(cfg)
    assert [p for p, _ in first["encoded"]] == ["date=2026-11-01", "date=2026-11-02"] and first["current"] == []
    again = run_nightly(cfg)                                  # idempotent: nothing to do
    assert again["encoded"] == [] and again["current"] == ["date=2026-11-01", "date=2026-11-02"]
    (src / "date=2026-11-03").mkdir()
    shutil.copy(os.path.join(digits_parquet, files[2]), src / "date=2026-11-03" / files[2])
    third = run_nightly(cfg)
    assert [p for p, _ in third["encoded"]] == ["date=2026-11-03"]
    state = read_state(resolve(out))
    assert sum(v["rows"] for v in state["partitions"].values()) == 1797
    assert pq.read_table(os.path.join(out, "date=2026-11-03")).num_rows == state["partitions"]["date=2026-11-03"]["rows"]


def daily_partitions(digits_parquet, src, days: int, first: int = 1) -> list[str]:
    """The digits' Parquet files first..days copied into hive partitions src/date=2026-11-0D/ (as a
    nightly's input grows a day at a time); returns the digits' file names."""
    files = sorted(p for p in os.listdir(digits_parquet) if p.endswith(".parquet"))
    for d in range(first, days + 1):
        (src / f"date=2026-11-0{d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(digits_parquet, files[d - 1]), src / f"date=2026-11-0{d}" / files[d - 1])
    return files


def test_nightly_with_an_index_keeps_it_fresh_and_extends_it_for_the_partitions_it_encoded(
        trained_digits, digits_parquet, workdir, tmp_path):
    """--index ivf-flat: after each run's commits the index covers the output as committed (a query
    uses it, silently); the unchanged partitions keep their cells, only the new one is assigned."""
    from pipeline.search import ann
    from pipeline.search.query import QueryConfig, run_query

    src, out = tmp_path / "in", str(tmp_path / "out")
    files = daily_partitions(digits_parquet, src, 2)
    cfg = NightlyConfig(model=MODEL, input=str(src), output=out, workdir=workdir, index="ivf-flat")
    run_nightly(cfg)
    first = ann.read_pointer(resolve(out))
    assert first["extended"] is None and first["rows"] == sum(pq.read_metadata(os.path.join(
        digits_parquet, f)).num_rows for f in files[:2])
    daily_partitions(digits_parquet, src, 3, first=3)
    run_nightly(cfg)
    second = ann.read_pointer(resolve(out))
    new_rows = pq.read_metadata(os.path.join(digits_parquet, files[2])).num_rows
    assert second["rows"] == first["rows"] + new_rows
    assert second["extended"] == {"from_build": first["build"], "kept_rows": first["rows"], "assigned_rows": new_rows}
    said = []
    q = str(pq.read_table(os.path.join(out, "date=2026-11-03")).column("id")[0].as_py())
    got = run_query(QueryConfig(latents=out, id=[q], k=5, nprobe=second["lists"]), say=said.append)
    assert said == [] and got.equals(run_query(QueryConfig(latents=out, id=[q], k=5, exact=True)))
    assert run_nightly(cfg)["encoded"] == [] and ann.read_pointer(resolve(out)) == second   # nothing new: kept


def test_encode_with_an_index_builds_it_under_its_lease_and_the_next_encode_replaces_it(
        trained_digits, digits_parquet, workdir, tmp_path):
    from pipeline.search import ann

    out = str(tmp_path / "out")
    cfg = EncodeConfig(model=MODEL, input=digits_parquet, output=out, workdir=workdir, index="ivf-flat")
    run_encode(cfg)
    p1 = ann.read_pointer(resolve(out))
    assert p1["rows"] == 1797 and p1["recall"]["at_nprobe"] >= 0.95
    run_encode(cfg)
    p2 = ann.read_pointer(resolve(out))
    assert p2["build"] != p1["build"] and p2["extended"] is None          # all files new: a full build
    assert sorted(os.listdir(os.path.join(tmp_path, "_out.vaepipe", "index"))) == sorted([p2["build"], "current.json"])


def _with_nan(digits_parquet, folder):
    os.makedirs(folder)
    t = pq.read_table(digits_parquet).slice(0, 100)
    x = t.column("image").combine_chunks().flatten().to_numpy().reshape(100, 64).astype(np.float32)
    x[[3, 50]] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", col), os.path.join(folder, "a.parquet"))


def test_nan_records_fail_the_job_naming_ids_and_nothing_is_committed(trained_digits, digits_parquet, workdir, tmp_path):
    _with_nan(digits_parquet, str(tmp_path / "in"))
    out = tmp_path / "out"
    with pytest.raises(BadRecordError, match=r"NaN or inf features in 2 record\(s\), e.g. id=3, id=50"):
        run_encode(EncodeConfig(model=MODEL, input=str(tmp_path / "in"), output=str(out), workdir=workdir))
    assert not (out / "_SUCCESS").exists() and not list(out.glob("*.parquet"))


def test_nan_records_skipped_are_quarantined_with_ids(trained_digits, digits_parquet, workdir, tmp_path):
    _with_nan(digits_parquet, str(tmp_path / "in"))
    out = str(tmp_path / "out")
    r = run_encode(EncodeConfig(model=MODEL, input=str(tmp_path / "in"), output=out, on_bad_record="skip", workdir=workdir))
    assert (r.rows_out, r.skipped) == (98, 2)
    assert sorted(quarantine(out).column("id").to_pylist()) == [3, 50]
    mu = pq.read_table(out).column("mu").combine_chunks().flatten().to_numpy()
    assert np.isfinite(mu).all()


def test_rerun_gives_identical_rows_and_replaces_the_previous_commit(trained_digits, digits_parquet, workdir, tmp_path):
    out = str(tmp_path / "out")
    cfg = EncodeConfig(model=MODEL, input=digits_parquet, output=out, keep=["id"], score=True, workdir=workdir)
    run_encode(cfg)
    first = pq.read_table(out)
    old = {manifest(out)["files"][0]["path"]}
    run_encode(cfg)
    second = pq.read_table(out)
    assert first.equals(second)                                  # same rows, same μ and scores
    files = {f for f in os.listdir(out) if f.endswith(".parquet")}
    assert not (old & files)                                     # the old commit's files are gone


def test_anomaly_scores_do_not_depend_on_batch_size_or_executor(trained_digits, digits_parquet, workdir, tmp_path):
    """The score's noise is drawn per record (from its content), as validation's is: the same record
    gets the same -ELBO in any batch, unit or process."""
    runs = {}
    for name, kw in {"small-local": dict(batch_size=7, executor="local"),
                     "big-local": dict(batch_size=4096, executor="local"),
                     "ray": dict(batch_size=500, executor="ray", concurrency=1)}.items():
        out = str(tmp_path / name)
        run_encode(EncodeConfig(model=MODEL, input=digits_parquet, output=out, score=True, workdir=workdir, **kw))
        t = committed(out).sort_by("id")
        runs[name] = t.column("score").to_numpy()
    np.testing.assert_allclose(runs["small-local"], runs["big-local"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(runs["small-local"], runs["ray"], rtol=0, atol=1e-4)


def test_a_nightly_state_from_before_embedding_was_recorded_is_current_until_embedding_is_asked_for():
    from pipeline.batch.nightly import output_columns, why_encode

    files = {"date=2026-11-01/a.parquet": {"size": 10, "fingerprint": "x"}}
    cols = output_columns(NightlyConfig(model=MODEL, input="in", output="out"), [])
    old = {"status": "ok", "files": files, "model_uri": "m", "columns": {k: v for k, v in cols.items() if k != "embedding"}}
    assert why_encode(old, files, "m", cols) is None                   # written without the column: current
    wanted = output_columns(NightlyConfig(model=MODEL, input="in", output="out", embedding=True), [])
    assert why_encode(old, files, "m", wanted) == "embedding False → True"


def test_asking_a_nightly_for_the_embedding_re_encodes_every_partition_and_readers_see_one_schema(
        trained_digits, digits_parquet, workdir, tmp_path):
    """A table first encoded without `--embedding`: the next nightly with it encodes every partition
    again (saying why), so pyarrow's hive dataset and Polars read one schema with the column in every
    partition, equal to the model's embedding of the μ beside it."""
    import polars as pl
    import pyarrow.dataset as ds

    src, out = tmp_path / "in", str(tmp_path / "out")
    files = daily_partitions(digits_parquet, src, 2)
    rows = sum(pq.read_metadata(os.path.join(digits_parquet, f)).num_rows for f in files[:2])
    lines: list[str] = []
    plain = NightlyConfig(model=MODEL, input=str(src), output=out, executor="local", workdir=workdir)
    assert len(run_nightly(plain, log=lines.append)["encoded"]) == 2
    wanted = NightlyConfig(model=MODEL, input=str(src), output=out, executor="local", embedding=True, workdir=workdir)
    again = run_nightly(wanted, log=lines.append)
    assert [p for p, _ in again["encoded"]] == ["date=2026-11-01", "date=2026-11-02"]
    assert any("embedding False → True" in line for line in lines), lines
    assert run_nightly(wanted, log=lines.append)["encoded"] == []            # then current
    t = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 4) and t.num_rows == rows
    model = model_from_checkpoint(load_checkpoint(trained_digits.checkpoint))
    mu_ = t.column("mu").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_allclose(emb, model.embedding(torch.from_numpy(mu_)).numpy(), rtol=1e-5, atol=1e-6)
    frame = pl.scan_parquet(f"{out}/**/*.parquet", hive_partitioning=True).select("id", "embedding").collect()
    assert frame.height == t.num_rows and frame.schema["embedding"] == pl.Array(pl.Float32, 4)

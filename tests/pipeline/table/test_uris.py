"""User URIs: an allowlist of schemes, no `..` segments, and resolution to a filesystem."""
from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs
import pytest

from pipeline.runtime.errors import InputError
from pipeline.table.uris import check_uri, resolve


@pytest.mark.parametrize("uri", ["../data", "data/../../etc/passwd", "/srv/data/..", "s3://bucket/a/../b",
                                 "memory://x/../y", "file:///tmp/../etc", "data\\..\\secret"])
def test_dot_dot_segments_are_refused(uri):
    # a job must not escape the prefix it was given
    with pytest.raises(InputError, match=r"'\.\.' path segments are not allowed"):
        check_uri(uri)


@pytest.mark.parametrize("uri,scheme", [("http://example.com/x.parquet", "http"),
                                        ("https://example.com/x.parquet", "https"),
                                        ("ftp://host/data", "ftp"), ("ssh://host/data", "ssh"),
                                        ("HTTP://example.com/x", "http")])
def test_disallowed_schemes_are_refused(uri, scheme):
    with pytest.raises(InputError, match=f"scheme '{scheme}' is not allowed"):
        check_uri(uri)


@pytest.mark.parametrize("uri", ["", None])
def test_empty_uri_is_refused(uri):
    with pytest.raises(InputError, match="expected a URI or path"):
        check_uri(uri)


@pytest.mark.parametrize("uri", ["data/train.parquet", "/tmp/x", "./rel/dir/", "memory://bucket/x",
                                 "s3://bucket/prefix/part.parquet", "s3a://bucket/p", "gs://b/p", "file:///tmp/x",
                                 "data/v1..v2/file.parquet", "data/..hidden", "s3://b/date=2026-01-01/"])
def test_allowed_uris_pass(uri):
    check_uri(uri)                                                  # raises on refusal
    # dots inside a name are not a '..' segment
    assert ".." not in uri.split("://")[-1].split("/")


def test_resolve_local_path_is_absolute_and_uses_arrows_local_fs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("sub/data")
    assert loc.is_local and loc.path == os.path.join(str(tmp_path), "sub", "data")
    assert isinstance(loc.arrow_fs(), pafs.LocalFileSystem)
    assert loc.full(loc.path) == loc.path


def test_resolve_memory_uri():
    name = f"vaepipe-tests/{uuid.uuid4().hex}"
    loc = resolve(f"memory://{name}/")
    assert loc.scheme == "memory" and not loc.is_local
    assert loc.path.rstrip("/").endswith(name)
    assert isinstance(loc.arrow_fs(), pafs.PyFileSystem)
    sub = loc.join("a", "b.parquet")
    assert sub.path.endswith(f"{name}/a/b.parquet") and sub.uri == f"memory://{name}/a/b.parquet"
    assert loc.full(sub.path).startswith("memory://")


def test_resolve_checks_the_uri_first():
    with pytest.raises(InputError, match="not allowed"):
        resolve("http://example.com/data.parquet")
    with pytest.raises(InputError, match=r"'\.\.'"):
        resolve("memory://a/../b")

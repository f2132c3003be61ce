"""User URIs → filesystems. fsspec resolves any scheme; pyarrow and Ray get it wrapped as
PyFileSystem(FSSpecHandler(fs)) (local paths use pyarrow's native LocalFileSystem)."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs

from pipeline.runtime.errors import InputError
from pipeline.runtime.redact import redact_uri

ALLOWED_SCHEMES = ("file", "local", "memory", "s3", "s3a", "gs", "gcs", "abfs", "az", "hdfs")
"""Schemes a user URI may use; anything else (http, ftp, ssh…) is refused."""


LOCAL_PROTOCOLS = ("file", "local")


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """An fsspec filesystem's main protocol ("s3", "file", "memory"…)."""
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is this machine's own filesystem (paths are plain local paths)."""
    return protocol(fs) in LOCAL_PROTOCOLS


@dataclass(frozen=True)
class Location:
    uri: str                      # as the user gave it (normalised)
    fs: fsspec.AbstractFileSystem
    path: str                     # path inside fs, without scheme

    @property
    def scheme(self) -> str:
        return protocol(self.fs)

    @property
    def is_local(self) -> bool:
        return is_local_fs(self.fs)

    def arrow_fs(self) -> pafs.FileSystem:
        return arrow_filesystem(self.fs)

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        return Location(self.uri.rstrip("/") + "/" + "/".join(parts), self.fs, path)

    def full(self, path: str) -> str:
        """A path inside this filesystem back to a URI."""
        return path if self.is_local else self.fs.unstrip_protocol(path)


def check_uri(uri: str) -> None:
    """Refuse schemes outside the allowlist and `..` path segments (no escaping a prefix)."""
    if not uri or not isinstance(uri, str):
        raise InputError(f"expected a URI or path, got {redact_uri(uri)!r}")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme not in ALLOWED_SCHEMES:
        raise InputError(f"URI {redact_uri(uri)!r}: scheme {scheme!r} is not allowed (allowed: {', '.join(ALLOWED_SCHEMES)})")
    path = uri.split("://", 1)[-1]
    if ".." in path.replace("\\", "/").split("/"):
        raise InputError(f"URI {redact_uri(uri)!r}: '..' path segments are not allowed")


def resolve(uri: str, **storage_options) -> Location:
    check_uri(uri)
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return Location(uri, fs, path.rstrip("/") or path)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if is_local_fs(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))

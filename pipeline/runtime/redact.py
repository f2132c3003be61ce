"""Credentials out of everything vaepipe prints, logs or records.

Two kinds of secret reach vaepipe on purpose: fsspec `--storage-options` (`{"key": …, "secret": …}`)
and URIs with a password (`http://user:PASSWORD@host`, `?sig=…`). Neither may appear in an error
message, a log line, or an MLflow param or tag. The tools here:

- `redact_uri(uri)`: `scheme://user:***@host/…`, sensitive query values masked;
- `redact_options(options)`: storage options with every value masked except known harmless settings
  (`endpoint_url`, `region_name`, `anon`…), which are kept (URIs among them still redacted);
- `secrets_in_*`: the literal secret strings found in argv, a config mapping or the environment;
- `redact_text(text, secrets)`: those strings, plus anything that looks like `user:pw@` or
  `"secret": "…"`, masked in free text (error messages, tracebacks, log lines);
- `RedactFilter` (logging) and `RedactingStream` (sys.stdout/sys.stderr), which jobs/cli.py installs
  for the length of a job, so Ray's forwarded worker output is covered as well.

Pass credentials through the environment (AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD…) rather than
on a command line: a Ray job's entrypoint is shown by the Ray dashboard. See docs/cluster.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# Storage-option keys whose values are settings, not credentials: kept as given (URIs redacted).
SAFE_OPTION_KEYS = frozenset({
    "endpoint_url", "region_name", "region", "anon", "use_ssl", "verify", "addressing_style",
    "signature_version", "project", "account_name", "default_block_size", "default_fill_cache",
    "default_cache_type", "version_aware", "requester_pays", "cache_regions", "skip_instance_cache",
    "use_listings_cache", "listings_expiry_time", "max_concurrency", "max_pool_connections",
    "connect_timeout", "read_timeout", "retries", "client_kwargs", "config_kwargs", "s3_additional_kwargs",
    "auto_mkdir", "fixed_upload_size",
})
# Environment variables that hold credentials vaepipe's libraries read (boto/s3fs, MLflow, Ray, Azure).
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY",
              "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET")
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL")
OPTION_FLAGS = ("--storage-options",)
OPTION_FIELDS = ("storage_options",)
MIN_SECRET_LEN = 4        # shorter strings are not scrubbed from free text (they would mangle it)

# userinfo ends at the first / ? # (RFC 3986): a password with those in it must be percent-encoded
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"?#]*):(?P<pw>[^\s@/?#'\"]*)@")
_SENSITIVE_NAME = r"[\w.\-]*(?:key|secret|token|passw(?:or)?d|pwd|credentials?|signature|sig|sas|auth)"
_QUERY = re.compile(rf"(?i)(?P<head>[?&;](?:{_SENSITIVE_NAME}|x-amz-[\w\-]+)=)(?P<value>[^&;#\s'\"]*)")
# "secret": "…", 'key': '…', password=…, token: … (in JSON, dict reprs, YAML, key=value text)
_KEY_VALUE = re.compile(
    rf"(?i)(?P<head>(?P<q>[\"']?)\b{_SENSITIVE_NAME}(?P=q)\s*[:=]\s*)"
    r"(?:(?P<vq>[\"'])(?P<quoted>(?:\\.|(?!(?P=vq)).)*)(?P=vq)|(?P<bare>[^\s,;'\"}\])]+))")


def redact_uri(uri: Any) -> Any:
    """`scheme://user:pw@host/p?sig=x` → `scheme://user:***@host/p?sig=***`; non-strings unchanged."""
    if not isinstance(uri, str):
        return uri
    uri = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", uri)
    return _QUERY.sub(lambda m: m["head"] + MASK, uri)


def redact_options(options: Any) -> Any:
    """Storage options with credentials masked: every string value is replaced by `***` except those
    of SAFE_OPTION_KEYS (URIs in them redacted); numbers, booleans and None are kept."""
    if isinstance(options, Mapping):
        return {k: (_keep(v) if str(k) in SAFE_OPTION_KEYS else redact_options(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact_options(v) for v in options]
    if isinstance(options, str):
        return MASK
    return options


def _keep(value: Any) -> Any:
    if isinstance(value, Mapping):     # client_kwargs={"endpoint_url": …, "aws_secret_access_key": …}
        return redact_options(value)
    return redact_uri(value)


def _secret_leaves(options: Any, safe: bool = False) -> set[str]:
    if isinstance(options, Mapping):
        return {s for k, v in options.items() for s in _secret_leaves(v, str(k) in SAFE_OPTION_KEYS and
                                                                       not isinstance(v, Mapping))}
    if isinstance(options, (list, tuple)):
        return {s for v in options for s in _secret_leaves(v, safe)}
    if isinstance(options, str):
        return secrets_in_uri(options) if safe else {options}
    return set()


def parse_options(value: Any) -> Any:
    """A storage-options value as given (JSON text or a mapping) → the mapping, or None if unparsable."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return json.loads(value)
        except ValueError:
            return None
    return {}


def secrets_in_options(value: Any) -> set[str]:
    """The secret strings of a storage-options value; all of it when it does not parse (a malformed
    JSON object still holds whatever credentials were typed into it)."""
    parsed = parse_options(value)
    if parsed is None:   # the whole text, and every quoted value in it ("key": "VALUE")
        return {value.strip()} | {m[2] for m in re.finditer(r"""[:=]\s*(["'])(.*?)\1""", value) if m[2]}
    return _secret_leaves(parsed)


def secrets_in_uri(uri: Any) -> set[str]:
    """The password of `scheme://user:pw@…` and the values of sensitive query parameters."""
    if not isinstance(uri, str):
        return set()
    found = {m["pw"] for m in _USERINFO.finditer(uri)}
    found |= {m["value"] for m in _QUERY.finditer(uri)}
    return {s for s in found if s}


def secrets_in_args(argv: Iterable[str]) -> set[str]:
    """Secrets on a job's command line: --storage-options values, URI passwords, and both inside the
    YAML that --config names."""
    from pipeline.runtime.config import load_yaml   # (no import cycle: config imports errors only)

    words, found = list(argv), set()
    for i, word in enumerate(words):
        flag, eq, inline = word.partition("=")
        value = inline if eq else (words[i + 1] if i + 1 < len(words) else None)
        found |= secrets_in_uri(word)
        if flag in OPTION_FLAGS and value is not None:
            found |= secrets_in_options(value)
        elif flag == "--config" and value is not None:
            try:
                found |= secrets_in_config(load_yaml(value))
            except Exception:   # an unreadable config is reported by the job itself
                pass
    return found


def secrets_in_config(values: Mapping[str, Any]) -> set[str]:
    """Secrets in a job's config mapping (a YAML --config): storage options and URI passwords."""
    found = set()
    for k, v in values.items():
        if k in OPTION_FIELDS:
            found |= secrets_in_options(v)
        elif isinstance(v, str):
            found |= secrets_in_uri(v)
        elif isinstance(v, (list, tuple)):
            found |= {s for x in v for s in secrets_in_uri(x)}
    return found


def secrets_in_env(environ: Mapping[str, str] | None = None) -> set[str]:
    env = os.environ if environ is None else environ
    found = {env[n] for n in SECRET_ENV if env.get(n)}
    for n in URI_ENV:
        found |= secrets_in_uri(env.get(n))
    return found


def _variants(secret: str) -> set[str]:
    """How a secret string shows in text: as is, JSON-escaped, repr-escaped."""
    return {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text with the given secret strings and anything credential-shaped masked."""
    if not isinstance(text, str) or not text:
        return text
    for s in sorted({v for s in secrets if s and len(s) >= MIN_SECRET_LEN for v in _variants(s)}, key=len, reverse=True):
        text = text.replace(s, MASK)
    text = redact_uri(text)
    return _KEY_VALUE.sub(lambda m: m["head"] + (f"{m['vq']}{MASK}{m['vq']}" if m["vq"] else MASK), text)


class RedactFilter(logging.Filter):
    """Masks secrets in a log record's message and traceback before any handler formats it."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = set(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:       # a bad format string: leave it to logging's own error report
            return True
        clean = redact_text(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


class RedactingStream:
    """A text stream (sys.stdout / sys.stderr) that masks secrets in everything written to it; the
    rest (fileno, isatty, encoding, flush…) is the wrapped stream's."""

    def __init__(self, stream, secrets: Iterable[str] = ()):
        self._stream = stream
        self.secrets = set(secrets)

    def write(self, s: str) -> int:
        self._stream.write(redact_text(s, self.secrets))
        return len(s)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

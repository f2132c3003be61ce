"""The `vaepipe` command. Every subcommand is a job module with a config dataclass `Config` and a
`run(cfg)`; its flags are built from the dataclass fields, applied over `--config FILE.yaml`."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import traceback
import types
import typing
from typing import Any

from pipeline.runtime.config import from_mapping, load_yaml
from pipeline.runtime.errors import VaepipeError
from pipeline.runtime.redact import RedactFilter, RedactingStream, redact_text, secrets_in_args, secrets_in_env

JOBS = ("train", "encode", "decode", "nightly", "query", "index", "serve", "neighbours", "evaluate", "demo", "bench", "protocol")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) for annotations like `int | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return (typing.get_args(tp) or (str,))[0], True
    return tp, False


def _parser_for(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """Flags from the dataclass fields, shown under their `group`. Values stay strings here:
    `from_mapping` converts flags and YAML alike to the declared types (one error format)."""
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file of field: value; flags override it")
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        group_name = f.metadata.get("group") or ""
        target = groups.setdefault(group_name, p.add_argument_group(group_name) if group_name else p)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} [default: {default!r}]", "dest": f.name}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if tp is bool and not is_list:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif is_list:   # comma-separated, and repeatable: --features a,b  or  --id 3 --id 7
            target.add_argument(flag, action="append", **kw)
        else:
            target.add_argument(flag, **kw)
    return p


def parse_config(cls: type, argv: list[str], prog: str, description: str = ""):
    args = vars(_parser_for(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in args:
        values.update(load_yaml(args.pop("config")))
    for k, v in args.items():
        if isinstance(v, list):   # appended comma lists → one list (converted by from_mapping)
            v = [x for part in v for x in part.split(",") if x != ""]
        values[k] = v
    return from_mapping(cls, values, source=prog)


def run_job(name: str, argv: list[str]) -> int:
    """Run one job. Credentials never reach the terminal or the logs: for the length of the job,
    stdout, stderr (Ray's forwarded worker output included) and every log record go through
    pipeline.runtime.redact, which masks the storage options and URI passwords found in argv, --config and
    the environment, and anything else credential-shaped; so does the one-line error (status 2) and,
    for an unexpected exception, the traceback (status 1)."""
    module = importlib.import_module(f"jobs.{name}")
    secrets = secrets_in_args(argv) | secrets_in_env()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(out, secrets), RedactingStream(err, secrets)
    logging.basicConfig(level=os.environ.get("VAEPIPE_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level >= logging.WARNING:   # MLflow's own INFO handler: "Creating initial
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)   # MLflow database tables…"
    log_filter = RedactFilter(secrets)
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(log_filter)
    try:
        cfg = parse_config(module.Config, argv, prog=f"vaepipe {name}", description=module.__doc__ or "")
        module.run(cfg)
    except VaepipeError as e:
        print(redact_text(f"vaepipe {name}: error: {e}", secrets), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:   # the reader went away (`vaepipe query … | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())   # so the interpreter's last flush of stdout finds nowhere to fail
        return 128 + 13                  # what a shell reports for a process ended by SIGPIPE
    except Exception:
        print(redact_text(traceback.format_exc(), secrets), end="", file=sys.stderr)
        return 1
    finally:
        for h in handlers:
            h.removeFilter(log_filter)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        sys.stdout, sys.stderr = out, err
    return 0


def bench_argv(argv: list[str]) -> list[str]:
    """`bench encode|train|query|index …`: the positional becomes `--what …`."""
    if argv and argv[0] in ("encode", "train", "query", "index"):
        return ["--what", argv[0], *argv[1:]]
    return list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        print("usage: vaepipe {" + ",".join(JOBS) + "} [--help] [flags]\n\n"
              "  train     train a VAE on Parquet with Ray Train, log to MLflow, register a version\n"
              "  encode    write μ (and optional logvar/score) for every record, with Ray Data\n"
              "  decode    reconstruct records from latents (the decompression half)\n"
              "  nightly   incremental, idempotent encode of partitions not yet encoded\n"
              "  query     nearest neighbours over latent Parquet (through its index when fresh)\n"
              "  index     build the approximate-neighbour index of a latents table (kept with its commit)\n"
              "  serve     neighbours over HTTP from that index (Ray Serve): of an id, a vector or a new record\n"
              "  neighbours  every record's k nearest neighbours (Ray Data batch job; exact or --index usearch)\n"
              "  evaluate  quality report: ELBO, compression vs PCA, few-label probes\n"
              "  demo      the whole pipeline on bundled data, end to end\n"
              "  bench     encode/train throughput against a plain PyTorch loop; query against DuckDB"
              "\n  protocol  semi-mnist, one-class-mnist, breast-cancer: vaepipe against the baselines in one run", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "bench":
        return run_job("bench", bench_argv(argv[1:]))
    return run_job(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Standard quality protocols, each one command that prints every figure of the same run:
`vaepipe protocol --what semi-mnist|one-class-mnist|breast-cancer|breast-cancer-jobs|any-data|any-data-one-class [--json FILE]` (docs/quality.md)."""
import sys

from pipeline.measure.protocol_run import ProtocolConfig as Config, run_protocol, summary


def run(cfg: Config):
    r = run_protocol(cfg)
    print(summary(r))
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("protocol", sys.argv[1:]))

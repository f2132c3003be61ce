"""Quality report for a registered VAE: ELBO/IW log-likelihood, compression vs PCA, few-label probes."""
import sys

from pipeline.evaluation.eval_report import table
from pipeline.evaluation.evaluate import EvaluateConfig as Config, run_evaluate


def run(cfg: Config):
    r = run_evaluate(cfg)
    print(table(r))
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("evaluate", sys.argv[1:]))

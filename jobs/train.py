"""Train a VAE on Parquet records with Ray Train, log it to MLflow and register a version."""
import sys

from pipeline.training.train import TrainConfig as Config, run_train


def run(cfg: Config):
    r = run_train(cfg)
    m = r.metrics
    print(f"trained {r.epochs_run} epoch(s) in {r.wall_s:.1f} s; "
          f"train ELBO {m.get('train_elbo', float('nan')):.3f}, val ELBO {m.get('val_elbo', float('nan')):.3f} nats/record")
    print(f"MLflow run {r.run_id}; registered {r.model_uri} (promoted: {r.promoted})")
    return r


if __name__ == "__main__":
    from jobs.cli import run_job

    sys.exit(run_job("train", sys.argv[1:]))

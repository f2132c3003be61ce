"""MLflow pyfunc for a vaepipe model, logged as code (models-from-code): loading it builds the module
from vaepipe's code and a weights-only checkpoint, so nothing pickled can break when code moves.

`mlflow.pyfunc.load_model(uri).predict(records)` returns μ (N, L) for raw records. A model trained
with `--labels` (a class list) returns a DataFrame instead, one row per record: `mu` (the same μ, a
list of L floats), `pred` (the class, in the label column's type) and `pred_prob_<class>`, one
probability column per class in class order: served as JSON, each record is
{"mu": [...], "pred": 7, "pred_prob_0": 0.01, ...}, self-describing without the class list. Features are
matched by name, never by position: scalar features come as columns of a DataFrame (any order,
extra columns ignored, a missing one is an error naming it); a list feature (e.g. `image`) as a
column of vectors, {name: (N, D) array}, or a bare (N, D) array, in the value type training read
(uint8 images stay uint8: the model scales them itself). The signature logged with the model
(pipeline.models.registry.model_signature) says the same, so MLflow's own checks and `mlflow models serve`
apply it before `predict` runs."""
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _bad_input(msg: str) -> MlflowException:
    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)   # a 400 when served


def records_matrix(pre, model_input, dim: int) -> np.ndarray:
    """The (N, D) raw feature matrix in training order, looked up by column name (`pre`: the model's
    Preprocessing). Scalar features become float32 (what encode hands the model); a list feature
    keeps its training value type."""
    import pandas as pd

    names = list(pre.features)
    if pre.layout == "scalars" or not names:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"expected records with named columns {names}, got {type(model_input).__name__} "
                             "(features are matched by name, not position)")
        missing = [c for c in names if c not in model_input.columns]
        if missing:
            raise _bad_input(f"missing feature column(s) {missing}; the model needs {names}")
        return model_input[names].to_numpy(dtype=np.float32)
    col, dtype = names[0], pre.input_dtype()
    if isinstance(model_input, dict):
        if col not in model_input:
            raise _bad_input(f"missing feature column {col!r}; got {sorted(model_input)}")
        model_input = model_input[col]
    elif isinstance(model_input, pd.DataFrame):
        if col not in model_input.columns:
            raise _bad_input(f"missing feature column {col!r}; got {list(model_input.columns)}")
        model_input = np.stack([np.asarray(v) for v in model_input[col]]) if len(model_input) else \
            np.zeros((0, dim), dtype)
    x = np.asarray(model_input)
    if x.ndim != 2 or x.shape[1] != dim:
        raise _bad_input(f"column {col!r}: expected vectors of length {dim}, got an array of shape {x.shape}")
    return x if x.dtype == dtype else x.astype(np.float32)   # the model's scaler casts to float32 anyway


class VAEPyfunc(PythonModel):
    # The signature logged with the model says what it accepts, and MLflow checks inputs against it;
    # MLflow's other check, from type hints on `predict`, is switched off (it would otherwise warn at
    # every load that there are none: the input is a DataFrame, a dict or an array, see above).
    _skip_type_hint_validation = True

    def load_context(self, context):
        from vae.checkpoint import load_checkpoint, model_from_checkpoint

        self.model = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        cfg = self.model.config
        x = records_matrix(cfg.preprocessing, model_input, cfg.input_dim)
        with torch.no_grad():
            mu = self.model.embed(torch.from_numpy(np.require(x, requirements=["C", "W"]))).mean
        if cfg.semi is None:
            return mu.numpy()
        return prediction_frame(mu.numpy(), self.model.class_probs(mu).numpy(), cfg.semi.classes)


def prediction_frame(mu: np.ndarray, prob: np.ndarray, classes: tuple):
    """A semi-supervised model's output (see the module's docstring): mu (N, L), prob (N, C)."""
    import pandas as pd

    from pipeline.table.labels import prob_columns

    frame = pd.DataFrame({"mu": list(mu), "pred": np.asarray(classes)[prob.argmax(1)]})
    return frame.assign(**dict(zip(prob_columns(classes), prob.T)))


mlflow.models.set_model(VAEPyfunc())

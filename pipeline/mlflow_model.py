"""MLflow pyfunc for a vaepipe model, logged as code (models-from-code): loading it builds the module
from vaepipe's code and a weights-only checkpoint, so nothing pickled can break when code moves.
`mlflow.pyfunc.load_model(uri).predict(x)` takes raw records (N, D) and returns μ (N, L)."""
import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class VAEPyfunc(PythonModel):
    def load_context(self, context):
        from vae.checkpoint import load_checkpoint, model_from_checkpoint

        self.model = model_from_checkpoint(load_checkpoint(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.model.embed(x).mean.numpy()


mlflow.models.set_model(VAEPyfunc())

"""The models-from-code file of every platform pyfunc model (``release`` versions and ``head.<name>`` versions).

MLflow copies this file into each model folder and runs it at load; it ends with
``mlflow.models.set_model``, so no Python object is ever pickled or unpickled. The model's
weights are safetensors (a release's heads in one pack, :mod:`registry.serving.pack`) and
its manifest ``serving.json`` (the artifact ``bundle``) holds the sha256 of every file, and
of every head's two files as registered; :mod:`registry.serving.runtime` checks them before parsing
anything and runs bulk classification's own per-batch code.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from registry.serving.runtime import MANIFEST_FILE, ServingError, classifier_from_manifest


class PlatformModel(PythonModel):
    """A release (or one head on its trunk) as an MLflow pyfunc model.

    Input: a pandas DataFrame with a ``path`` column (local paths or fsspec URIs) and/or
    an ``image`` column (encoded image bytes; base64 in serving JSON). Output: one row per
    input with bulk classification's columns: ``path``, ``sha256``, ``error``, and per head
    ``<head>_label`` and ``<head>_score``.
    """

    def load_context(self, context) -> None:
        bundle = context.artifacts.get("bundle")
        if bundle is None:
            raise ServingError("this model has no artifact 'bundle' (its serving.json); it was not written by "
                               "registry.serving")
        self.classifier = classifier_from_manifest(f"{bundle}/{MANIFEST_FILE}", context.model_config)

    # A DataFrame hint: MLflow infers no schema from it (the signature is explicit) and adds no validation.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.classifier.predict(model_input)


mlflow.models.set_model(PlatformModel())

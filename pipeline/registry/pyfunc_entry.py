"""Models-from-code entry for the logged pyfunc: MLflow runs this file when it loads the model.

It is never imported by the pipeline itself (set_model registers a model as a side effect).
"""

import mlflow

from pipeline.registry.pyfunc import FaceModel

mlflow.models.set_model(FaceModel())

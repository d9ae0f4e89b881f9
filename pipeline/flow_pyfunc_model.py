"""The models-from-code file of a registered flow (MLflow copies it into the model and runs it on load).

It only imports the pyfunc class from the ``pipeline`` package shipped in the model's ``code/`` folder
(MLflow ``code_paths``, pipeline/registry.py); the model's own files are weights and a JSON config
(pipeline/flow_pyfunc.py).
"""

import mlflow

from pipeline.flow_pyfunc import FlowPyfunc

mlflow.models.set_model(FlowPyfunc())

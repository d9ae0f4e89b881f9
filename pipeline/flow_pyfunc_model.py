"""The models-from-code file of a registered flow (MLflow copies it into the model and runs it on load).

It only imports the pyfunc class from the installed ``pipeline`` package; the model's own files are
weights and a JSON config (pipeline/flow_pyfunc.py).
"""

import mlflow

from pipeline.flow_pyfunc import FlowPyfunc

mlflow.models.set_model(FlowPyfunc())

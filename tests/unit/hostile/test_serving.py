"""Hostile inputs, class 7 (issue 21): the served model refuses pixels it would have to cast, and a
request's work is bounded up front.

Requests go through MLflow's own scoring path (``scoring_server.invocations``, what ``mlflow models
serve`` runs for POST /invocations: JSON parsing against the signature, then predict), on a real
saved model, without a socket.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations

from tests.tiny_models import SHAPE


def post(served, pixels, **params) -> tuple[int, str]:
    """(HTTP status, body) as the server answers: an MlflowException becomes its own status code."""
    model, schema = served
    body = json.dumps({"inputs": pixels, "params": params} if params else {"inputs": pixels})
    try:
        response = invocations(body, "application/json", model, schema)
    except MlflowException as e:
        return e.get_http_status_code(), e.message
    return response.status, response.response


def batch(n=2, value=7):
    return np.full((n, *SHAPE), value).tolist()



@pytest.mark.parametrize(
    "pixels, what",
    [
        (np.full((2, *SHAPE), 7.6).tolist(), "float"),
        (np.full((2, *SHAPE), True).tolist(), "bool"),
        (np.full((2, *SHAPE), 300).tolist(), "0..255"),
        (np.full((2, *SHAPE), -1).tolist(), "0..255"),
    ],
)
def test_float_bool_and_out_of_range_pixels_are_refused_not_cast(served, pixels, what):
    status, text = post(served, pixels)
    assert status == 400, (status, text[-300:])
    assert what in text


def test_iwbo_work_is_bounded_up_front(served):
    status, text = post(served, batch(n=2), num_samples=600)  # 1200 passes > 1024
    assert status == 400, (status, text[-300:])
    assert "budget" in text

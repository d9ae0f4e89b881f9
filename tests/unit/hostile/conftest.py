"""Fixtures shared by the hostile-input tests and by test_security_guards.py (the valid inputs that
must still pass the same checks): a served tiny model and the sample shards, each built once per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(pyfunc model, input schema) of a saved tiny flow, as ``mlflow models serve`` would load it."""
    from mlflow.pyfunc import load_model

    from pipeline.registry import save_flow_model
    from tests.tiny_models import tiny_flow

    path = save_flow_model(tiny_flow(), tmp_path_factory.mktemp("served") / "model", test_bpd=5.0)
    model = load_model(str(path))
    return model, model.metadata.get_input_schema()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The sample set's shards at 32x32: 96 train and 48 test images in shards of 32."""
    from data_prep.sources.sample import ensure_sample_shards

    return ensure_sample_shards(
        tmp_path_factory.mktemp("shards") / "data", resolution=32, n_train=96, n_test=48, shard_size=32
    )

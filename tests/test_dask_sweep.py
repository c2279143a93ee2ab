"""An ``l1`` sweep on a real ``dask.distributed.LocalCluster`` (2 worker processes) through joblib's
Dask backend gives the serial sweep's ``cv_results_``.

The workers run one thread each (Dask sets ``OMP_NUM_THREADS=1`` in the processes it starts), and
so does the serial sweep here: with the same thread count, a fit on a worker is the same
computation as in this process, so the scores must agree exactly, not just closely.  What
travels: the unfitted estimator with its MLP and its ``memory`` cache (workers fill the cache
folder), and, with ``cross_validate(return_estimator=True)``, fitted estimators coming back
(plain numpy state and CPU tensors only).
"""

import io
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from installed import require
from sklearn.model_selection import GridSearchCV, cross_validate

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import make_synthetic_mlp
from sklearn_jsae.model_selection import make_scoring, sparsest_within_tolerance

GRID = {"l1": [0.0, 0.5, 5.0]}
SETTINGS = dict(n_components=32, k=4, max_iter=4, batch_size=32, random_state=0, device="cpu")


@pytest.fixture(scope="module")
def client(one_thread):
    distributed = require("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def data():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        X, mlp = make_synthetic_mlp(400, 12, 48, random_state=0)
    return X, mlp


def _search(mlp, **params):
    return GridSearchCV(JacobianSparseAutoencoder(mlp, **SETTINGS, **params), GRID, cv=2,
                        scoring=make_scoring(threshold=0.01), refit=sparsest_within_tolerance(tolerance=0.05))


def _scores(search):
    return {key: value for key, value in search.cv_results_.items()
            if key.startswith(("split", "mean_test_", "std_test_", "rank_test_"))}


def test_dask_sweep_gives_the_serial_cv_results(client, data):
    from distributed import get_task_stream

    X, mlp = data
    serial = _search(mlp).fit(X)
    with get_task_stream(client) as tasks, joblib.parallel_backend("dask"):
        on_dask = _search(mlp).fit(X)
    assert len(tasks.data) >= 1  # the fits ran on the cluster's workers
    assert {task["worker"] for task in tasks.data} <= set(client.scheduler_info()["workers"])
    expected, got = _scores(serial), _scores(on_dask)
    assert len(expected) > 20 and expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert on_dask.best_params_ == serial.best_params_
    np.testing.assert_array_equal(on_dask.best_estimator_.input_sae_.components_,
                                  serial.best_estimator_.input_sae_.components_)


def test_workers_fill_the_memory_cache(client, data, tmp_path):
    X, mlp = data
    serial = _search(mlp, memory=str(tmp_path / "serial")).fit(X)
    with joblib.parallel_backend("dask"):
        on_dask = _search(mlp, memory=str(tmp_path / "dask")).set_params(refit=False).fit(X)
    # One MLP pass per fold, written by the workers (the refit, in this process, is off).
    cached = [root for root, _, files in os.walk(tmp_path / "dask") if "output.pkl" in files]
    assert len(cached) == 2
    expected, got = _scores(serial), _scores(on_dask)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


class _TensorDevices(pickle.Pickler):
    """A pickler that records the device of every torch tensor it writes."""

    def __init__(self, file):
        super().__init__(file)
        self.devices = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            self.devices.append(obj.device.type)
        return NotImplemented


def test_fitted_estimators_come_back_from_workers(client, data):
    X, mlp = data
    estimator = JacobianSparseAutoencoder(mlp, l1=0.5, **SETTINGS)
    serial = cross_validate(estimator, X, cv=2, return_estimator=True)
    with joblib.parallel_backend("dask"):
        on_dask = cross_validate(estimator, X, cv=2, return_estimator=True)
    for ours, theirs in zip(on_dask["estimator"], serial["estimator"]):
        np.testing.assert_array_equal(ours.output_sae_.encoder_, theirs.output_sae_.encoder_)
        np.testing.assert_array_equal(ours.transform(X[:20]).toarray(), theirs.transform(X[:20]).toarray())
        pickler = _TensorDevices(io.BytesIO())
        pickler.dump(ours)
        assert pickler.devices and set(pickler.devices) == {"cpu"}  # the MLP's weights, on the CPU
    np.testing.assert_array_equal(on_dask["test_score"], serial["test_score"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_estimator_fitted_on_cuda_pickles_without_cuda_tensors(data):
    """What a GPU worker sends back: a model fitted on CUDA holds no CUDA tensor."""
    X, mlp = data
    fitted = JacobianSparseAutoencoder(mlp, l1=0.5, **dict(SETTINGS, device="cuda")).fit(X)
    pickler = _TensorDevices(io.BytesIO())
    pickler.dump(fitted)
    assert set(pickler.devices) == {"cpu"}

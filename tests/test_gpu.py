"""The estimator on CUDA: same call, results close to the CPU's, pickles load on CPU-only machines.

Skipped cleanly where CUDA is not available (CI has no GPU).
"""

import pickle

import numpy as np
import pytest
import torch

from sklearn_jsae import JacobianSparseAutoencoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    X = np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32)
    return mlp, X


def test_cuda_fit_matches_cpu_fit(problem):
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=3, batch_size=256, random_state=0)
    cpu = JacobianSparseAutoencoder(device="cpu", **settings).fit(X)
    gpu = JacobianSparseAutoencoder(device="cuda", **settings).fit(X)
    assert abs(cpu.score(X) - gpu.score(X)) < 0.02
    assert isinstance(gpu.input_sae_.components_, np.ndarray)
    assert next(gpu.mlp_.parameters()).device.type == "cpu"


def test_cuda_model_pickles_to_a_cpu_model(problem):
    mlp, X = problem
    gpu = JacobianSparseAutoencoder(mlp=mlp, n_components=64, k=4, max_iter=2, device="cuda",
                                    random_state=0).fit(X)
    restored = pickle.loads(pickle.dumps(gpu)).set_params(device="cpu")
    np.testing.assert_allclose(restored.transform(X[:100]).toarray(), gpu.transform(X[:100]).toarray(),
                               rtol=1e-3, atol=1e-4)
    J_cpu, J_gpu = restored.jacobian(X[:20]), gpu.jacobian(X[:20])
    np.testing.assert_allclose(J_cpu.toarray(), J_gpu.toarray(), rtol=1e-3, atol=1e-4)


def test_auto_device_uses_cuda(problem):
    mlp, X = problem
    jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=32, k=4, max_iter=1, device="auto").fit(X)
    assert jsae.transform(X).shape == (2048, 32)


def test_cuda_fit_with_memory_caches_per_device(problem, tmp_path, mlp_pass_calls):
    """A cached CUDA fit scores like an uncached one; the cache key separates CPU and CUDA passes."""
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=3, batch_size=256, random_state=0)
    plain = JacobianSparseAutoencoder(device="cuda", **settings).fit(X)
    cached = JacobianSparseAutoencoder(device="cuda", memory=str(tmp_path), **settings).fit(X)
    JacobianSparseAutoencoder(device="cuda", memory=str(tmp_path), **settings).fit(X)
    assert mlp_pass_calls == ["cuda"]
    assert abs(plain.score(X) - cached.score(X)) < 0.01
    JacobianSparseAutoencoder(device="cpu", memory=str(tmp_path), **settings).fit(X)
    assert mlp_pass_calls == ["cuda", "cpu"]

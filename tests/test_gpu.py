"""The estimator on CUDA: same call, results close to the CPU's, pickles load on CPU-only machines.

Skipped cleanly where CUDA is not available (CI has no GPU).
"""

import copy
import pickle

import numpy as np
import pytest
import torch

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder

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


@pytest.mark.parametrize("mixed_precision", [False, "auto"])
def test_cuda_fit_matches_cpu_fit(problem, mixed_precision):
    """float32 on CUDA, and the default bf16 autocast + TF32, score within 0.02 of the CPU."""
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=3, batch_size=256, random_state=0)
    cpu = JacobianSparseAutoencoder(device="cpu", **settings).fit(X)
    gpu = JacobianSparseAutoencoder(device="cuda", mixed_precision=mixed_precision, **settings).fit(X)
    assert abs(cpu.score(X) - gpu.score(X)) < 0.02
    assert isinstance(gpu.input_sae_.components_, np.ndarray)
    assert gpu.input_sae_.components_.dtype == np.float32
    assert next(gpu.mlp_.parameters()).device.type == "cpu"
    assert gpu.device_ == "cuda:0" and cpu.device_ == "cpu"
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the fit's TF32 setting was restored


def test_a_cuda_bf16_tensor_is_read_as_its_values(problem):
    """Activations harvested on the GPU in bf16 go straight into fit and score."""
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=2, batch_size=256, random_state=0, device="cuda",
                    mixed_precision=False)
    tensor = torch.from_numpy(X).to("cuda", torch.bfloat16)
    values = tensor.float().cpu().numpy()
    from_tensor = JacobianSparseAutoencoder(**settings).fit(tensor)
    from_array = JacobianSparseAutoencoder(**settings).fit(values)
    # (CUDA's scatter-adds may sum in another order from run to run: equal up to rounding)
    np.testing.assert_allclose(from_tensor.input_sae_.components_, from_array.input_sae_.components_,
                               atol=1e-5)
    assert from_tensor.score(tensor) == pytest.approx(from_array.score(values), abs=1e-4)


def test_same_seed_gives_the_same_initial_model_on_cpu_and_cuda(problem):
    """Every draw is made on the CPU: a fit of one tiny step starts from the same weights."""
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=1, batch_size=4096, learning_rate=1e-12,
                    random_state=3, mixed_precision=False)
    cpu = JacobianSparseAutoencoder(device="cpu", **settings).fit(X)
    gpu = JacobianSparseAutoencoder(device="cuda:0", **settings).fit(X)
    for side in ("input_sae_", "output_sae_"):
        np.testing.assert_allclose(getattr(gpu, side).components_, getattr(cpu, side).components_, atol=1e-5)


def test_identity_map_and_gated_mlp_on_cuda(problem):
    from sklearn_jsae.mlp import GatedMLP

    _, X = problem
    g = torch.Generator().manual_seed(0)
    gated = GatedMLP(torch.randn(16, 32, generator=g) / 4, torch.randn(16, 32, generator=g) / 4,
                     torch.randn(32, 16, generator=g) / 6)
    for mlp in (None, gated):
        jsae = JacobianSparseAutoencoder(mlp, n_components=64, k=4, max_iter=2, batch_size=256, device="cuda",
                                         random_state=0).fit(X)
        assert np.isfinite(jsae.score(X)) and jsae.jacobian(X[:10]).nnz > 0


def test_non_finite_guard_on_cuda(problem):
    from sklearn_jsae.exceptions import NonFiniteTrainingError

    mlp, X = problem
    with pytest.raises(NonFiniteTrainingError, match="diverged|NaN or inf"):
        JacobianSparseAutoencoder(mlp, n_components=64, k=4, max_iter=2, batch_size=256, device="cuda",
                                  learning_rate=1e6, random_state=0).fit(X)


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


def test_checkpointed_fit_partial_fit_and_stream_on_cuda(problem, tmp_path):
    """The long-run paths on CUDA: an interrupted checkpointed fit resumes to the same model as an
    uninterrupted CUDA fit (float32, mixed precision off), partial_fit and fit_stream run."""
    from sklearn_jsae._backend import trainer as trainer_module

    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, max_iter=2, batch_size=256, random_state=0, device="cuda",
                    mixed_precision=False)
    expected = JacobianSparseAutoencoder(**settings).fit(X)
    real = trainer_module.Trainer.step
    fired = []

    def step(self, *a, **kw):
        if self.step_count == 5 and not fired:
            fired.append(True)
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    trainer_module.Trainer.step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            JacobianSparseAutoencoder(checkpoint_dir=str(tmp_path), checkpoint_every=1, **settings).fit(X)
    finally:
        trainer_module.Trainer.step = real
    resumed = JacobianSparseAutoencoder(checkpoint_dir=str(tmp_path), checkpoint_every=1, **settings).fit(X)
    np.testing.assert_allclose(resumed.output_sae_.encoder_, expected.output_sae_.encoder_, atol=1e-5)
    partial = JacobianSparseAutoencoder(**settings).partial_fit(X[:1024]).partial_fit(X[1024:])
    streamed = JacobianSparseAutoencoder(**settings).fit_stream(iter(np.array_split(X, 8)), n_statistics=512)
    assert np.isfinite(partial.score(X)) and np.isfinite(streamed.score(X))
    single = {name: value for name, value in settings.items() if name != "mlp"}
    sae = TopKSparseAutoencoder(**single).fit_stream(iter(np.array_split(X, 8)), n_statistics=512)
    sae.set_params(warm_start=True).fit_stream(iter(np.array_split(X, 8)), n_statistics=512)
    assert sae.device_ == "cuda:0" and np.isfinite(sae.score(X))


def test_an_interrupted_partial_fit_on_cuda_continues_as_if_uninterrupted(problem):
    """The optimiser snapshot a partial_fit call takes (on the GPU) is put back on an interrupt: the
    retried call ends where the uninterrupted run does, and inference refuses an MLP's NaN there."""
    mlp, X = problem
    settings = dict(mlp=mlp, n_components=64, k=4, batch_size=256, random_state=0, device="cuda",
                    mixed_precision=False, n_tokens=len(X))
    calls = (X[:1024], X[1024:])
    expected = JacobianSparseAutoencoder(**settings).partial_fit(calls[0]).partial_fit(calls[1])
    jsae = JacobianSparseAutoencoder(**settings).partial_fit(calls[0])
    real, stepped = jsae._trainer.step, []

    def interrupted(*args, **kwargs):
        stepped.append(1)
        if len(stepped) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    jsae._trainer.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        jsae.partial_fit(calls[1])
    jsae._trainer.step = real
    jsae.partial_fit(calls[1])
    np.testing.assert_array_equal(jsae.output_sae_.encoder_, expected.output_sae_.encoder_)
    far = X[:8].copy()
    far[3] = 3e38  # finite in float32, the MLP overflows on it
    with pytest.raises(ValueError, match="row 3"):
        jsae.transform_output(far)


def test_a_pair_from_saes_on_cuda_matches_the_cpu(problem):
    """from_saes with device="cuda": the same codes as the CPU pair, the Jacobian within float32
    rounding, and a warm fit on from them runs on the GPU."""
    mlp, X = problem
    fitted = JacobianSparseAutoencoder(mlp, n_components=64, k=4, max_iter=2, batch_size=256, random_state=0,
                                       device="cpu").fit(X)
    cpu, gpu = (JacobianSparseAutoencoder.from_saes(mlp, fitted.input_sae_, fitted.output_sae_, X, device=device,
                                                    batch_size=256, random_state=0) for device in ("cpu", "cuda"))
    assert gpu.device_ == "cuda:0" and gpu.input_sae_.scale_ == cpu.input_sae_.scale_
    assert (gpu.transform(X[:256]) != cpu.transform(X[:256])).nnz == 0
    np.testing.assert_allclose(gpu.jacobian(X[:64]).toarray(), cpu.jacobian(X[:64]).toarray(), rtol=1e-4, atol=1e-5)
    gpu.set_params(warm_start=True, max_iter=1).fit(X)
    assert np.isfinite(gpu.score(X))


def test_a_cuda_model_streams_trains_and_scores_as_the_train_command_runs_it():
    """The train command's GPU path: the model on CUDA feeds harvest and ActivationStream (its rows
    those of the CPU model), a JSAE trains on the stream on CUDA, and spliced_ce_score runs the
    CUDA model with it (the CPU model's losses with the same JSAE)."""
    import copy

    transformers = pytest.importorskip("transformers")
    from sklearn_jsae.hf import ActivationStream, harvest, mlp_of
    from sklearn_jsae.metrics import spliced_ce_score

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    on_gpu = copy.deepcopy(model).to("cuda")
    ids = torch.randint(0, 64, (64, 24), generator=torch.Generator().manual_seed(1))
    X_cpu, _ = harvest(model, 1, input_ids=ids, progress=False)
    X_gpu, _ = harvest(on_gpu, 1, input_ids=ids, progress=False)
    np.testing.assert_allclose(X_gpu, X_cpu, rtol=1e-4, atol=1e-4)
    stream = ActivationStream(on_gpu, 1, input_ids=ids, batch_size=128, buffer_size=512,
                              exclude_special_tokens=False)
    jsae = JacobianSparseAutoencoder(mlp_of(on_gpu, 1), n_components=64, k=4, batch_size=128, n_tokens=1536,
                                     device="cuda", random_state=0).fit_stream(stream, n_statistics=512)
    assert jsae.device_ == "cuda:0" and sum(row["tokens"] for row in jsae.history_) == 1536
    gpu_scores = spliced_ce_score(on_gpu, 1, jsae, ids[:8])
    cpu_scores = spliced_ce_score(model, 1, jsae, ids[:8])
    for name in ("ce_clean", "ce_input", "ce_output", "ce_zero_output"):
        assert abs(gpu_scores[name] - cpu_scores[name]) < 1e-3, name


def test_a_callable_runs_where_its_module_is(problem):
    """``mlp=lambda x: module(x)`` is not a module, so the fit cannot move what it reads: over a
    module on the GPU it trains there, over one on the CPU it trains on the GPU and computes the
    MLP on the CPU (with a warning); both give the CPU fit's score (float32, TF32 off)."""
    mlp, X = problem
    settings = dict(n_components=64, k=4, max_iter=3, batch_size=256, random_state=0, mixed_precision=False)
    cpu = JacobianSparseAutoencoder(mlp=lambda x: mlp(x), device="cpu", **settings).fit(X)
    on_gpu = copy.deepcopy(mlp).to("cuda")
    there = JacobianSparseAutoencoder(mlp=lambda x: on_gpu(x), device="cuda", **settings).fit(X)
    assert there._mlp_map.home == "cuda:0"
    with pytest.warns(UserWarning, match="is a callable that runs on the CPU but not on cuda:0"):
        moved = JacobianSparseAutoencoder(mlp=lambda x: mlp(x), device="cuda", **settings).fit(X)
    assert moved._mlp_map.home == "cpu"
    for fitted in (there, moved):
        assert abs(cpu.score(X) - fitted.score(X)) < 0.02
        J = fitted.jacobian(X[:64])
        assert J.shape == (64, 64, 64) and np.isfinite(J.data).all()

"""The accelerator code path, run on a CPU-only machine: every tensor on another device.

``tests/virtual_device.py`` gives a device (``"meta"``) whose tensors hold real CPU values but
report another device, and fails on any op that mixes them with CPU tensors or draws on them with
a CPU generator: what CUDA rejects.  Here the estimators resolve every ``device`` to it, so fit,
transform, jacobian, score and the metrics run the code a CUDA fit runs, branch for branch
(accelerator chunk sizes, ``index_put_`` accumulation, no CPU worker threads), and their results
must equal a CPU run's bit for bit: the same seed gives the same initial model and the same
batches on every device.

What this cannot catch (see tests/virtual_device.py): anything inside CUDA kernels, bf16 autocast
on CUDA (a no-op on this device), TF32, numerical differences, speed and memory.  That is what
``benchmarks/gpu.sh`` on a real GPU is for.
"""

import numpy as np
import pytest
import torch
from virtual_device import VIRTUAL, DevicePlacementError, VirtualTensor, virtual_device

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, _validation, metrics
from sklearn_jsae._backend.mlp import AffineMap, ElementwiseMLP, as_map
from sklearn_jsae._backend.sae import SAEParams
from sklearn_jsae._backend.train import TrainConfig, train
from sklearn_jsae.mlp import GatedMLP

SETTINGS = dict(n_components=24, k=3, max_iter=2, batch_size=64, random_state=0, aux_coef=1 / 32)


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.exponential(size=(160, 20)) * (rng.random((160, 20)) < 0.2) @ rng.normal(size=(20, 8))
            ).astype(np.float32)


def _mlps():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return {
        "identity": None,
        "gelu": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)),
        "gated": GatedMLP(torch.randn(8, 16, generator=g) / 3, torch.randn(8, 16, generator=g) / 3,
                          torch.randn(16, 6, generator=g) / 4),
        "linear": torch.nn.Linear(8, 5),
        "callable": lambda x: torch.tanh(x) * 1.5,
        # |x| through forward-mode AD: a ZeroTensor in sgn's double backward crashed the harness
        "callable with abs": lambda x: torch.tanh(x) * 1.5 + 0.1 * x.abs(),
    }


@pytest.fixture
def on_virtual_device(monkeypatch):
    """Every estimator's device resolves to the virtual device, inside the checking mode."""
    monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
    with virtual_device():
        yield


def _surface(jsae, X, with_metrics):
    """What a user calls after fitting, as numpy (the comparison is bit for bit)."""
    out = dict(
        components_x=jsae.input_sae_.components_, encoder_y=jsae.output_sae_.encoder_,
        bias_y=jsae.output_sae_.decoder_bias_, losses=[row["loss"] for row in jsae.history_],
        mean_jacobian=jsae.jacobian_.toarray(), codes=jsae.transform(X).toarray(),
        codes_y=jsae.transform_output(X).toarray(), jacobian=jsae.jacobian(X[:20]).toarray(),
        outputs=jsae.mlp_outputs(X), score=jsae.score(X),
    )
    if with_metrics:
        out["sparsity"] = metrics.jacobian_sparsity(jsae, X[:40])
        out["global"] = metrics.global_jacobian_sparsity(jsae, X[:40])
        out["fvu"] = metrics.fraction_variance_unexplained(jsae, X)
        out["reconstruction"] = metrics.reconstruction_metrics(jsae, X)
        out["interventions"] = metrics.intervention_agreement(jsae, X[:16])
        out["linearity"] = metrics.linearity(jsae, X[:16], n_samples=8, n_pairs=4, n_points=11,
                                             random_state=0)
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        left, right = a[name], b[name]
        if isinstance(left, dict):
            assert left.keys() == right.keys(), name
            for key in left:
                np.testing.assert_array_equal(np.asarray(left[key]), np.asarray(right[key]), err_msg=name)
        elif isinstance(left, tuple):
            for x, y in zip(left, right):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(left), np.asarray(right), err_msg=name)


# Every MLP kind, and the unit-gain penalty (its row normalisation in the step) on the gated one.
@pytest.mark.parametrize("kind, extra", [(kind, {}) for kind in _mlps()] + [("gated", {"penalty": "unit_gain"})],
                         ids=list(_mlps()) + ["gated-unit_gain"])
def test_fit_transform_jacobian_and_metrics_run_on_another_device(X, kind, extra, monkeypatch):
    """The whole estimator surface on the virtual device equals the CPU run, bit for bit."""
    mlp = _mlps()[kind]
    settings = dict(SETTINGS, **extra)
    with_metrics = kind in ("gelu", "gated") and not extra
    expected = _surface(JacobianSparseAutoencoder(mlp, device="cpu", **settings).fit(X), X, with_metrics)
    monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
    with virtual_device():
        jsae = JacobianSparseAutoencoder(mlp, device="cuda", **settings).fit(X)
        got = _surface(jsae, X, with_metrics)
    assert jsae.device_ == "meta"
    _assert_same(got, expected)


def test_cached_mlp_pass_and_warm_start_on_another_device(X, tmp_path, on_virtual_device):
    mlp = _mlps()["gelu"]
    cached = JacobianSparseAutoencoder(mlp, memory=str(tmp_path), warm_start=True, **SETTINGS).fit(X)
    cached.fit(X)  # warm start: the fitted numpy state goes back to the device
    assert len(cached.history_) == 2 * SETTINGS["max_iter"]
    assert np.isfinite(cached.score(X))


def test_a_pair_from_saes_on_another_device(X, monkeypatch):
    """from_saes measures on the CPU and serves on the device: its whole surface equals the CPU
    pair's, bit for bit, and a warm fit on from it runs there."""
    mlp = _mlps()["gelu"]
    fitted = JacobianSparseAutoencoder(mlp, device="cpu", **SETTINGS).fit(X)
    settings = {k: v for k, v in SETTINGS.items() if k != "k" and k != "n_components"}
    expected = _surface(JacobianSparseAutoencoder.from_saes(mlp, fitted.input_sae_, fitted.output_sae_, X,
                                                            device="cpu", **settings), X, with_metrics=True)
    monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
    with virtual_device():
        pair = JacobianSparseAutoencoder.from_saes(mlp, fitted.input_sae_, fitted.output_sae_, X, device="cuda",
                                                   **settings)
        got = _surface(pair, X, with_metrics=True)
        pair.set_params(warm_start=True).fit(X)
        assert np.isfinite(pair.score(X))
    assert pair.device_ == "meta"
    _assert_same(got, expected)


def _gelu_mlp(device="cpu"):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    return module.to(device)


def test_a_callable_over_a_cpu_module_trains_on_another_device_with_a_warning(X, monkeypatch):
    """``mlp=lambda x: module(x)`` with the module on the CPU, in a fit on the accelerator: moving
    the map moved nothing the lambda reads, and the first MLP pass mixed devices ('Expected all
    tensors to be on the same device').  It now runs on the CPU, rows moved there and back (with a
    warning that this is slow), and gives the CPU fit's model, bit for bit."""
    module = _gelu_mlp()
    expected = _surface(JacobianSparseAutoencoder(lambda x: module(x), device="cpu", **SETTINGS).fit(X), X,
                        with_metrics=True)
    monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
    with virtual_device():
        with pytest.warns(UserWarning, match=r"mlp \(.*<lambda>\) is a callable that runs on the CPU but not on "
                                             r"meta, where this fit runs .*Move the tensors it uses to meta"):
            jsae = JacobianSparseAutoencoder(lambda x: module(x), device="cuda", **SETTINGS).fit(X)
        got = _surface(jsae, X, with_metrics=True)
    assert jsae.device_ == "meta" and jsae._mlp_map.home == "cpu"
    _assert_same(got, expected)


def test_a_callable_over_a_module_on_the_device_trains_there(X, monkeypatch):
    """``mlp=lambda x: model.mlp(x)`` with the model on the GPU the fit trains on: the MLP was
    probed on CPU rows first, and the fit was refused ("mlp failed on a float32 torch tensor ...
    numpy functions are not supported").  It now runs where its tensors are, and gives the model of
    the CPU fit of the same lambda over the same weights on the CPU, bit for bit."""
    expected_module = _gelu_mlp()
    expected = _surface(JacobianSparseAutoencoder(lambda x: expected_module(x), device="cpu", **SETTINGS).fit(X),
                        X, with_metrics=True)
    monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
    with virtual_device():
        module = _gelu_mlp(VIRTUAL)
        jsae = JacobianSparseAutoencoder(lambda x: module(x), device="cuda", **SETTINGS).fit(X)
        got = _surface(jsae, X, with_metrics=True)
        assert jsae._mlp_map.home == "meta"
        # Where it runs on both (a function of its input alone), it runs wherever its input is.
        anywhere = JacobianSparseAutoencoder(lambda x: torch.tanh(x) * 1.5, device="cuda", **SETTINGS).fit(X)
        assert anywhere._mlp_map.home is None
        # On the CPU, a callable over the device's tensors is refused, saying why.
        monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "cpu")
        with pytest.raises(ValueError, match=r"It reads tensors on another device than its input's: a callable that "
                                             r"is not an nn.Module runs where its own tensors are.*here cpu"):
            JacobianSparseAutoencoder(lambda x: module(x), device="cpu", **SETTINGS).fit(X)
    _assert_same(got, expected)


def test_single_sae_on_another_device(X, on_virtual_device):
    sae = TopKSparseAutoencoder(**SETTINGS).fit(X)
    assert sae.transform(X).shape == (160, 24) and np.isfinite(sae.score(X))
    # the stream fit, fresh and warm (the fitted numpy state goes back to the device), and partial_fit
    streamed = TopKSparseAutoencoder(**SETTINGS).fit_stream(iter([X[:50], X[50:]]), n_statistics=60)
    sae.set_params(warm_start=True).fit_stream(iter([X[:50], X[50:]]), n_statistics=60)
    partial = TopKSparseAutoencoder(**SETTINGS).partial_fit(X[:80]).partial_fit(X[80:])
    assert len(sae.history_) > SETTINGS["max_iter"]
    assert all(np.isfinite(est.score(X)) for est in (sae, streamed, partial))


def test_randomized_control_of_a_module_on_another_device():
    mlp = _mlps()["gelu"]
    expected = metrics.randomize_mlp(mlp, random_state=3)
    with virtual_device():
        placed = _to_virtual(mlp)
        redrawn = metrics.randomize_mlp(placed, random_state=3)
        weight = redrawn[0].weight
        assert isinstance(weight, VirtualTensor)
        np.testing.assert_array_equal(weight.cpu().numpy(), expected[0].weight.detach().numpy())


def _to_virtual(module):
    import copy

    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(param.detach().to(VIRTUAL), requires_grad=False))
    return clone


@pytest.mark.parametrize("kind", ["identity", "gelu", "gated"])
def test_float64_training_creates_no_float32_tensor(X, kind):
    """Training in float64 with every float32 tensor created by default flagged (``strict_dtype``):
    catches factories that forget the training dtype (``torch.eye(d)`` did)."""
    mlp = _mlps()[kind]
    backend_map = AffineMap(8) if mlp is None else (mlp if isinstance(mlp, GatedMLP) else as_map(mlp, 8, 8))
    config = TrainConfig(n_components=24, n_output_components=20, k=3, l1=0.5, max_iter=2, batch_size=64,
                         aux_coef=1 / 32, seed=0, dtype=torch.float64)
    expected = train(X, backend_map, config)
    with virtual_device(strict_dtype=torch.float64):
        got = train(X, backend_map, TrainConfig(**{**config.__dict__, "device": "meta"}))
    for a, b in zip(got.output_params.tensors(), expected.output_params.tensors()):
        assert a.dtype == torch.float64
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_initialisation_is_drawn_on_the_cpu_and_moved():
    """#9 §1: ``torch.randn(..., generator=<CPU generator>, device=<cuda>)`` crashed every CUDA fit."""
    mean = torch.zeros(6, dtype=torch.float64)
    expected = SAEParams.initialise(10, 6, mean, torch.Generator().manual_seed(4))
    with virtual_device():
        got = SAEParams.initialise(10, 6, mean.to(VIRTUAL), torch.Generator().manual_seed(4))
        assert all(isinstance(t, VirtualTensor) and t.dtype == torch.float64 for t in got.tensors())
        np.testing.assert_array_equal(got.W_dec.cpu().numpy(), expected.W_dec.numpy())


def test_identity_map_rescales_on_its_own_device_and_dtype():
    """#9 §1: ``AffineMap.rescaled`` built ``torch.eye`` on the CPU in float32."""
    with virtual_device():
        rescaled = AffineMap(5).to(device=VIRTUAL, dtype=torch.float64).rescaled(2.0, 4.0)
        assert isinstance(rescaled.W, VirtualTensor) and rescaled.W.dtype == torch.float64
        np.testing.assert_array_equal(rescaled.W.cpu().numpy(), np.eye(5) * 0.5)
    float64 = ElementwiseMLP(torch.ones(3, 4), None, torch.ones(4, 3), None, "relu").double().rescaled(2, 1)
    assert float64.W_in.dtype == torch.float64


def test_the_harness_would_have_caught_the_old_initialisation():
    """The check is live: the draw the old code did raises on the virtual device."""
    with virtual_device(), pytest.raises(DevicePlacementError, match="generator"):
        torch.randn(3, 4, generator=torch.Generator().manual_seed(0), device=VIRTUAL)
    with virtual_device(), pytest.raises(DevicePlacementError, match="cpu"):
        torch.eye(4) * torch.ones(4, 4).to(VIRTUAL)


def test_checkpoint_resume_partial_fit_and_streams_on_another_device(X, tmp_path, monkeypatch):
    """The long-run paths: a checkpointed fit interrupted and resumed, partial_fit and fit_stream,
    all on the virtual device, equal to the same calls on the CPU."""
    from sklearn_jsae._backend import trainer as trainer_module

    mlp = _mlps()["gelu"]
    settings = dict(SETTINGS, max_iter=3)

    def run(device_patch):
        if device_patch:
            monkeypatch.setattr(_validation, "resolve_device", lambda device, for_inference=False: "meta")
        folder = tmp_path / ("virtual" if device_patch else "cpu")
        real = trainer_module.Trainer.step
        fired = []

        def step(self, *a, **kw):
            if self.step_count == 4 and not fired:
                fired.append(True)
                raise KeyboardInterrupt
            return real(self, *a, **kw)

        monkeypatch.setattr(trainer_module.Trainer, "step", step)
        with pytest.raises(KeyboardInterrupt):
            JacobianSparseAutoencoder(mlp, checkpoint_dir=str(folder), checkpoint_every=1, **settings).fit(X)
        resumed = JacobianSparseAutoencoder(mlp, checkpoint_dir=str(folder), checkpoint_every=1, **settings).fit(X)
        partial = JacobianSparseAutoencoder(mlp, **settings).partial_fit(X[:80]).partial_fit(X[80:])
        streamed = JacobianSparseAutoencoder(mlp, **settings).fit_stream(iter([X[:50], X[50:]]), n_statistics=60)
        monkeypatch.undo()
        return [est.output_sae_.encoder_ for est in (resumed, partial, streamed)] + [resumed.device_]

    expected = run(False)
    with virtual_device():
        got = run(True)
    assert got[-1] == "meta" and expected[-1] == "cpu"
    for a, b in zip(got[:-1], expected[:-1]):
        np.testing.assert_array_equal(a, b)

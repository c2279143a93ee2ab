"""What a new user hits first: bad numbers stop a fit with a clear error, wrong calls get a way out.

Each test here failed on the code before the hardening issue (#9); the issue's items are named in
the test docstrings.
"""

import os
import re
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.exceptions import NonFiniteTrainingError

FAST = dict(n_components=16, k=2, max_iter=4, batch_size=32, device="cpu", random_state=0)


@pytest.fixture(scope="module")
def X():
    X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    X[:8, 0] = 0.0  # the probe rows stay finite in the NaN tests below
    return X


@pytest.fixture(scope="module")
def gelu_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))


def _fitted(X, mlp=None, **kw):
    return JacobianSparseAutoencoder(mlp, **{**FAST, **kw}).fit(X)


def _same_state(a, b):
    np.testing.assert_array_equal(a.input_sae_.components_, b.input_sae_.components_)
    np.testing.assert_array_equal(a.output_sae_.encoder_, b.output_sae_.encoder_)
    assert a.history_ == b.history_


# --------------------------------------------------------------------------- no silent garbage


def nan_beyond_probe(x):
    """Doubles x, but NaN on rows whose first feature is large (never the first 8 rows above)."""
    y = x * 2
    return torch.where(x[:, :1] > 1.5, torch.full_like(y, float("nan")), y)


def test_mlp_returning_nan_on_later_rows_stops_the_fit_and_keeps_the_model(X, gelu_mlp):
    """#9 §2: NaN outputs beyond the probe rows used to end 'successfully' with NaN weights."""
    jsae = _fitted(X, gelu_mlp)
    before = {name: np.copy(value) for name, value in vars(jsae.input_sae_).items()
              if isinstance(value, np.ndarray)}
    bad_rows = np.flatnonzero(X[:, 0] > 1.5)
    assert bad_rows.size > 0 and bad_rows.min() >= 8
    jsae.set_params(mlp=nan_beyond_probe)
    with pytest.raises(NonFiniteTrainingError, match="mlp's outputs contain NaN or inf") as info:
        jsae.fit(X)
    assert str(bad_rows[0]) in str(info.value)
    assert info.value.what == "mlp output"
    assert jsae.mlp is nan_beyond_probe  # the parameter stays; the fitted state is the old one
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(jsae.input_sae_, name), value)
    assert np.isfinite(jsae.score(X))


def test_float64_X_beyond_float32_range_is_rejected_naming_X(X):
    """#9 §2: 1e39 passed validation and became inf in float32."""
    bad = np.vstack([X.astype(np.float64), np.full((1, 8), 1e39)])
    with pytest.raises(ValueError, match=r"X holds a value of magnitude 1e\+39, beyond float32's range"):
        _fitted(bad)
    fitted = _fitted(X)
    with pytest.raises(ValueError, match="beyond float32's range"):
        fitted.transform(bad)


def test_huge_learning_rate_is_caught_as_divergence(X):
    """#9 §2: learning_rate=1e6 ran to a score of -3e27."""
    with pytest.raises(NonFiniteTrainingError, match="diverged.*lower it") as info:
        _fitted(X, learning_rate=1e6)
    assert info.value.step is not None and info.value.step < 20
    with pytest.raises(NonFiniteTrainingError, match="diverged|NaN or inf"):
        TopKSparseAutoencoder(8, k=2, max_iter=4, batch_size=32, learning_rate=1e6, device="cpu").fit(X)


@pytest.mark.parametrize("learning_rate", [1e38, 1e300])  # (inf is refused by the validation)
def test_a_learning_rate_beyond_float32_is_a_named_error_not_an_overflow(X, learning_rate):
    """A step size beyond float32's range used to surface as torch's "value cannot be converted to
    type float without overflow"; now the update leaves non-finite parameters, which the trainer
    reports naming learning_rate and its value, and a warm-started model is kept."""
    for make in (lambda **kw: JacobianSparseAutoencoder(**FAST, **kw),
                 lambda **kw: TopKSparseAutoencoder(**FAST, **kw)):
        model = make(warm_start=True).fit(X)
        before = model.components_.copy() if hasattr(model, "components_") else model.input_sae_.components_.copy()
        with pytest.raises(NonFiniteTrainingError, match=re.escape(f"learning_rate={learning_rate:g} is too large")):
            model.set_params(learning_rate=learning_rate).fit(X)
        after = model.components_ if hasattr(model, "components_") else model.input_sae_.components_
        np.testing.assert_array_equal(after, before)


def test_an_overflowing_penalty_gradient_names_l1_not_the_learning_rate(X, gelu_mlp):
    with pytest.raises(NonFiniteTrainingError, match=r"a gradient is NaN or inf.*l1=1e\+30 weighs the Jacobian "
                                                     r"penalty so heavily that its gradient overflows; lower l1"):
        _fitted(X, gelu_mlp, l1=1e30)


def test_sane_learning_rates_never_trip_the_guard(X, gelu_mlp):
    for lr in (1e-4, 5e-3, 5e-2):
        assert np.isfinite(_fitted(X, gelu_mlp, learning_rate=lr).score(X))


def test_too_few_steps_warns_with_the_fix():
    """#9 §2: the card's call on 300 rows ran 30 steps to a useless model without a word."""
    X = np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32)
    with pytest.warns(ConvergenceWarning, match=r"only 30 optimiser steps.*batch_size<=90 or max_iter>=100"):
        JacobianSparseAutoencoder(k=32, l1=1e-2, max_iter=30, n_components=64, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        # Following the advice gives a usable model and no warning.
        good = JacobianSparseAutoencoder(k=32, l1=1e-2, batch_size=90, n_components=64, random_state=0).fit(X)
    assert good.score(X) > 0.8
    with pytest.warns(ConvergenceWarning, match="only 2 optimiser steps"):
        TopKSparseAutoencoder(16, k=2, max_iter=2, batch_size=1024).fit(X)


def test_warm_start_with_a_different_mlp_remeasures_the_output_scale(X, gelu_mlp):
    """#9 §2: a same-shape MLP kept the old c_y and the loss jumped by orders of magnitude."""
    jsae = _fitted(X, gelu_mlp, warm_start=True, max_iter=6)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    with torch.no_grad():
        bigger[0].weight.copy_(gelu_mlp[0].weight)
        bigger[0].bias.copy_(gelu_mlp[0].bias)
        bigger[2].weight.copy_(gelu_mlp[2].weight * 300.0)
        bigger[2].bias.copy_(gelu_mlp[2].bias * 300.0)
    before_loss = jsae.history_[-1]["mse_output"]
    with pytest.warns(UserWarning, match="c_y is re-measured"):
        jsae.set_params(mlp=bigger).fit(X)
    expected_scale = JacobianSparseAutoencoder(bigger, **FAST).fit(X).output_sae_.scale_
    assert jsae.output_sae_.scale_ == pytest.approx(expected_scale, rel=1e-6)
    assert jsae.history_[6]["mse_output"] < 10 * before_loss + 1.0
    # The same MLP again: no warning, the scale is kept.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="warm_start=True with an mlp")
        jsae.fit(X)
    assert jsae.output_sae_.scale_ == pytest.approx(expected_scale, rel=1e-6)


def batch_mean_mlp(x):
    return x - x.mean(dim=0, keepdim=True)


def half_detached_mlp(x):
    return torch.tanh(x) + torch.sin(x).detach()


@pytest.mark.parametrize("mlp, message", [(batch_mean_mlp, "mlp mixes rows"),
                                          (half_detached_mlp, "detached from its input")])
def test_mlp_that_breaks_the_jacobian_rules_is_rejected(X, mlp, message):
    """#9 §2: a batch mean or a detached branch used to give a silently wrong Jacobian."""
    with pytest.raises(ValueError, match=message):
        _fitted(X, mlp)


def test_honest_callables_pass_the_row_and_derivative_checks(X):
    relu_callable = _fitted(X, lambda x: torch.relu(x) * 2 - x)
    assert relu_callable.jacobian(X[:4]).nnz > 0
    _fitted(X, lambda x: torch.nn.functional.gelu(x) @ torch.ones(8, 5) / 3)


# ------------------------------------------------------------------------------ smaller defects


class Float64Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8).double()

    def forward(self, x):
        return torch.tanh(self.inner(x))


def test_float64_custom_module_is_accepted(X):
    """#9 §3: a float64 nn.Module was rejected as 'not differentiable' (uncast check)."""
    jsae = _fitted(X, Float64Block())
    assert np.isfinite(jsae.score(X))


def test_deprecation_warnings_as_errors_do_not_blame_the_mlp(X):
    """#9 §3: under -W error::DeprecationWarning torch's own warning was reported as the MLP's fault."""
    import subprocess
    import sys

    # A fresh process: torch warns once per process, when forward-mode AD is first set up.
    script = (
        "import numpy as np, torch\n"
        "from sklearn_jsae import JacobianSparseAutoencoder\n"
        "X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)\n"
        "m = JacobianSparseAutoencoder(lambda x: torch.tanh(x) * 2, n_components=16, k=2, max_iter=13,\n"
        "                              batch_size=32, device='cpu', random_state=0).fit(X)\n"
        "print(m.jacobian(X[:2]).nnz)\n"
    )
    run = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip()) > 0


def test_not_differentiable_still_reported(X):
    def through_numpy(x):
        return torch.from_numpy(np.tanh(x.detach().numpy()))

    with pytest.raises(ValueError, match="not differentiable|does not depend differentiably"):
        _fitted(X, through_numpy)


def test_score_on_a_dataframe_warns_nothing(X):
    """#9 §3: score(df) emitted three 'X does not have valid feature names' warnings."""
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])
    jsae = _fitted(df)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)
        jsae.score(df)
        jsae.transform(df)
        jsae.transform_output(df)
        TopKSparseAutoencoder(16, k=2, max_iter=1, batch_size=8).fit(df).score(df)


def test_set_output_pandas_with_dense_codes(X):
    """#9 §3: set_output(transform="pandas") failed with no way out."""
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])
    jsae = JacobianSparseAutoencoder(**FAST, sparse_output=False).set_output(transform="pandas").fit(df)
    codes = jsae.transform(df)
    assert isinstance(codes, pd.DataFrame) and codes.shape == (256, 16)
    assert list(codes.columns[:2]) == ["jacobiansparseautoencoder0", "jacobiansparseautoencoder1"]
    np.testing.assert_array_equal(codes.to_numpy(), jsae.set_output(transform="default").transform(df))
    out = jsae.set_output(transform="pandas").transform_output(df)
    assert isinstance(out, pd.DataFrame) and out.columns[0] == "jacobiansparseautoencoder_output0"
    assert ((codes.to_numpy() != 0).sum(axis=1) <= 2).all()
    sparse = JacobianSparseAutoencoder(**FAST).set_output(transform="pandas").fit(df)
    with pytest.raises(ValueError, match="set sparse_output=False"):
        sparse.transform(df)
    sae = TopKSparseAutoencoder(16, k=2, max_iter=2, sparse_output=False).set_output(transform="pandas")
    assert isinstance(sae.fit_transform(df), pd.DataFrame)


def test_dense_and_sparse_codes_agree(X, gelu_mlp):
    sparse = _fitted(X, gelu_mlp)
    dense = _fitted(X, gelu_mlp, sparse_output=False)
    np.testing.assert_array_equal(dense.transform(X), sparse.transform(X).toarray())
    np.testing.assert_array_equal(dense.transform_output(X), sparse.transform_output(X).toarray())
    assert dense.transform(X).dtype == np.float32


def _unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a folder the kernel refuses
        return "/sys"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


@pytest.mark.parametrize("kind", ["file", "under a file", "read-only"])
def test_unusable_memory_folder_is_an_error_naming_memory(X, gelu_mlp, tmp_path, kind):
    """#9 §3: raw PermissionError / NotADirectoryError that did not name memory."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    location = {"file": str(a_file), "under a file": str(a_file / "cache"),
                "read-only": _unwritable_folder(tmp_path)}[kind]
    with pytest.raises(ValueError, match=r"memory=.*(file, not a folder|cannot hold the cache)"):
        _fitted(X, gelu_mlp, memory=location)



def test_joblib_memory_whose_folder_became_unusable_is_an_error_naming_memory(X, gelu_mlp, tmp_path):
    memory = joblib.Memory(tmp_path / "cache", verbose=0)
    import shutil

    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("a file where the cache was")
    with pytest.raises(ValueError, match=r"memory=.*(file, not a folder|cannot hold the cache)"):
        _fitted(X, gelu_mlp, memory=memory)


def test_output_codes_decode_with_their_own_dictionary(X, gelu_mlp):
    """#9 §3: inverse_transform(transform_output(X)) decoded output codes with the input dictionary."""
    jsae = _fitted(X, gelu_mlp)
    codes = jsae.transform_output(X)
    with pytest.raises(ValueError, match="use inverse_transform_output"):
        jsae.inverse_transform(codes)
    Y_hat = jsae.inverse_transform_output(codes)
    np.testing.assert_allclose(Y_hat, jsae.output_sae_.inverse_transform(codes), rtol=1e-6)
    Y = jsae.mlp_outputs(X)
    assert 1 - ((Y - Y_hat) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum() > 0.3
    names = jsae.get_output_feature_names_out()
    assert names.shape == (16,) and names[3] == "jacobiansparseautoencoder_output3"
    # Input codes still decode with the input dictionary.
    assert jsae.inverse_transform(jsae.transform(X)).shape == X.shape


def test_input_codes_are_refused_by_the_output_dictionary(X, gelu_mlp):
    """transform's CSR codes were decoded by inverse_transform_output with the output dictionary
    (both sides are n_components wide by default): a plausible array from the wrong decoder."""
    import scipy.sparse as sp

    jsae = _fitted(X, gelu_mlp)
    codes = jsae.transform(X)
    assert isinstance(codes, sp.csr_array) and codes.shape == jsae.transform_output(X).shape
    with pytest.raises(ValueError, match="X holds input-side codes .* use inverse_transform for input codes"):
        jsae.inverse_transform_output(codes)
    with pytest.raises(ValueError, match="X holds input-side codes"):
        jsae.inverse_transform_output(jsae.fit_transform(X))
    np.testing.assert_array_equal(jsae.inverse_transform(codes), jsae.inverse_transform(sp.csr_array(codes)))


def test_output_feature_names_check_their_input_features(X, gelu_mlp):
    jsae = _fitted(X, gelu_mlp)
    names = [f"x{i}" for i in range(X.shape[1])]
    np.testing.assert_array_equal(jsae.get_output_feature_names_out(names), jsae.get_output_feature_names_out())
    with pytest.raises(ValueError, match="input_features should have length equal to number of features"):
        jsae.get_output_feature_names_out(["x", "x", "x"])


def test_paper_lambda_describes_the_fit_not_a_later_set_params(X, gelu_mlp, tmp_path):
    from sklearn_jsae import load

    jsae = _fitted(X, gelu_mlp, k=3)
    fitted = jsae.paper_lambda_
    jsae.set_params(l1=10 * jsae.l1 + 1, k=2)
    assert jsae.paper_lambda_ == fitted
    jsae.save(tmp_path / "model.safetensors")  # the file holds the changed l1 parameter, and the fitted one
    loaded = load(tmp_path / "model.safetensors")
    assert loaded.l1 == jsae.l1 and loaded.paper_lambda_ == fitted


def test_dataframes_of_codes_decode_only_with_their_own_dictionary(X, gelu_mlp):
    """Under ``set_output(transform="pandas")`` the codes' columns name their side: a DataFrame of
    output codes was decoded with the input dictionary (the widths match by default), and input
    codes with the output one.  (A dense ndarray carries no mark: outputs.rst says so.)"""
    pytest.importorskip("pandas")
    jsae = _fitted(X, gelu_mlp, sparse_output=False).set_output(transform="pandas")
    inputs, outputs = jsae.transform(X), jsae.transform_output(X)
    assert inputs.shape == outputs.shape
    with pytest.raises(ValueError, match="X holds output-side codes .* use inverse_transform_output"):
        jsae.inverse_transform(outputs)
    with pytest.raises(ValueError, match="X holds input-side codes .* use inverse_transform for input codes"):
        jsae.inverse_transform_output(inputs)
    np.testing.assert_array_equal(jsae.inverse_transform(inputs), jsae.inverse_transform(inputs.to_numpy()))
    np.testing.assert_array_equal(jsae.inverse_transform_output(outputs),
                                  jsae.inverse_transform_output(outputs.to_numpy()))


def test_a_fitted_jsae_infers_with_the_k_it_was_fitted_with(X, gelu_mlp):
    """``set_params(k=...)`` after fit changes the next fit, not the fitted model: ``transform``
    kept the fitted k while ``transform_output`` and ``jacobian`` took the new one (two values of
    k in one model's outputs)."""
    jsae = _fitted(X, gelu_mlp, k=3)
    before = (jsae.transform(X), jsae.transform_output(X), jsae.jacobian(X[:20]))
    jsae.set_params(k=6)
    after = (jsae.transform(X), jsae.transform_output(X), jsae.jacobian(X[:20]))
    for old, new in zip(before, after):  # (dense comparison: SciPy 1.15 has no 3-D sparse arithmetic)
        assert new.nnz == old.nnz and np.array_equal(old.toarray(), new.toarray())
    assert np.diff(after[1].indptr).max() == 3 and after[2].nnz <= 20 * 3 * 3
    # The side SAEs count the epochs this fit trained, as the pair does.
    assert jsae.input_sae_.n_iter_ == jsae.output_sae_.n_iter_ == jsae.n_iter_ == len(jsae.history_)
    # One TopK SAE encodes with its current k (its dictionary read at another sparsity; outputs.rst).
    sae = TopKSparseAutoencoder(**{**FAST, "k": 3}).fit(X).set_params(k=6)
    assert np.diff(sae.transform(X).indptr).max() == 6


# --------------------------------------------------------------------------- mixed precision


def test_mixed_precision_tracks_float32(X, gelu_mlp):
    """bf16 autocast of the forward pass (CPU autocast rounds like CUDA's) stays close to float32;
    benchmarks/mixed_precision.py measures the same on real data (FVU within 0.002, |J| > 0.01
    within 0.003)."""
    full = _fitted(X, gelu_mlp, mixed_precision=False, max_iter=12)
    mixed = _fitted(X, gelu_mlp, mixed_precision=True, max_iter=12)
    assert not np.array_equal(full.input_sae_.components_, mixed.input_sae_.components_)  # it is on
    assert mixed.input_sae_.components_.dtype == np.float32
    assert abs(full.score(X) - mixed.score(X)) < 0.02
    assert mixed.history_[-1]["loss"] == pytest.approx(full.history_[-1]["loss"], rel=0.1)


def test_mixed_precision_auto_is_cuda_only_and_tf32_is_restored():
    from types import SimpleNamespace

    from sklearn_jsae._topk import _training_precision
    from sklearn_jsae._validation import resolve_autocast

    assert resolve_autocast("auto", "cuda:0") is torch.bfloat16
    assert resolve_autocast("auto", "cpu") is None
    assert resolve_autocast(True, "cpu") is torch.bfloat16 and resolve_autocast(False, "cuda:1") is None
    before = torch.backends.cuda.matmul.allow_tf32
    with _training_precision(SimpleNamespace(autocast_dtype=torch.bfloat16, device="cuda:0")):
        assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 is before
    with _training_precision(SimpleNamespace(autocast_dtype=None, device="cuda:0")):
        assert torch.backends.cuda.matmul.allow_tf32 is before


# ------------------------------------------------------------------------------------ devices


def test_device_strings_auto_default_and_the_fitted_device(X, monkeypatch):
    from sklearn_jsae import _validation
    from sklearn_jsae._backend import mlp as backend_mlp

    assert JacobianSparseAutoencoder().device == "auto" and TopKSparseAutoencoder().device == "auto"
    fitted = JacobianSparseAutoencoder(**{**FAST, "device": "auto"}).fit(X)
    assert fitted.device_ == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert fitted.input_sae_.device_ == fitted.device_
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValueError, match=f"'device' parameter must be .*got '{bad}'"):
            JacobianSparseAutoencoder(**{**FAST, "device": bad}).fit(X)
    monkeypatch.setattr(backend_mlp, "cuda_device_count", lambda: 2)
    assert _validation.resolve_device("cuda") == "cuda:0"
    assert _validation.resolve_device("cuda:1") == "cuda:1" and _validation.resolve_device("auto") == "cuda:0"
    with pytest.raises(ValueError, match=r"device='cuda:2' but this machine has 2 CUDA device\(s\)"):
        _validation.resolve_device("cuda:2")
    monkeypatch.setattr(backend_mlp, "cuda_device_count", lambda: 0)
    with pytest.raises(ValueError, match="device='cuda' but torch.cuda.is_available"):
        JacobianSparseAutoencoder(**{**FAST, "device": "cuda"}).fit(X)


def test_a_cuda_model_transforms_on_a_machine_without_cuda(X, monkeypatch):
    """Fitted state is numpy: device='cuda' falls back to the CPU for inference, with a warning."""
    from sklearn_jsae._backend import mlp as backend_mlp

    jsae = _fitted(X)
    expected = jsae.transform(X).toarray()
    jsae.set_params(device="cuda")  # as if unpickled from a CUDA machine
    monkeypatch.setattr(backend_mlp, "cuda_device_count", lambda: 0)
    with pytest.warns(UserWarning, match="running on the CPU instead"):
        got = jsae.transform(X).toarray()
    np.testing.assert_array_equal(got, expected)


def test_non_finite_mlp_output_during_training_names_the_step_and_rows(X):
    """The per-step guard: an MLP that turns NaN after the statistics pass (a stateful callable)
    stops training at that step, naming the rows of X."""
    from sklearn_jsae._backend.mlp import CallableMap
    from sklearn_jsae._backend.train import TrainConfig, train

    calls = []

    def flaky(x):
        calls.append(len(x))
        y = torch.tanh(x)
        return torch.where(x[:, :1] > 1.0, torch.full_like(y, float("inf")), y) if len(calls) > 3 else y

    config = TrainConfig(n_components=16, n_output_components=16, k=2, l1=0.5, max_iter=2, batch_size=64)
    with pytest.raises(NonFiniteTrainingError, match=r"step (\d+): the mlp returned NaN or inf on rows") as info:
        train(X, CallableMap(flaky, 8, 8), config)
    assert info.value.step >= 1  # the first step's calls (MLP pass, JVPs) were still finite
    assert f"step {info.value.step}:" in str(info.value)
    rows = [int(r) for r in str(info.value).split("rows [")[1].split("]")[0].split(", ")]
    assert all(X[r, 0] > 1.0 for r in rows)


# --------------------------------------------------------------------------- threads and grad mode


def _generic_mlp():
    """No closed form (a LayerNorm inside): Jacobians go through torch.func.jvp."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def test_threads_sharing_a_model_with_a_jvp_mlp_get_the_serial_answers(X):
    """torch keeps one forward-AD level stack per process: two threads in jvp at once raised "no
    level exists" / "invalid index" (and a fit blamed the user's MLP as "not differentiable")."""
    from concurrent.futures import ThreadPoolExecutor

    mlp = _generic_mlp()
    jsae = _fitted(X, mlp, max_iter=1)
    blocks = [X[i * 16:(i + 1) * 16] for i in range(8)]
    serial = [jsae.jacobian(b) for b in blocks]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(jsae.jacobian, blocks * 2))
        fits = list(pool.map(lambda seed: _fitted(X, mlp, max_iter=1, random_state=seed), [0, 1, 0, 1]))
    for got, expected in zip(threaded, serial * 2):
        np.testing.assert_array_equal(got.todense(), expected.todense())
    for a, b in ((fits[0], fits[2]), (fits[1], fits[3]), (fits[0], jsae)):  # each fit as if alone
        np.testing.assert_array_equal(a.input_sae_.components_, b.input_sae_.components_)
        np.testing.assert_array_equal(a.output_sae_.encoder_, b.output_sae_.encoder_)
    assert not np.array_equal(fits[0].input_sae_.components_, fits[1].input_sae_.components_)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("method", ["fit", "partial_fit", "fit_stream"])
@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_a_fit_inside_no_grad_trains_as_outside(X, gelu_mlp, context, method, Estimator):
    """A caller's no_grad() (around the code that produced X) stopped every fit at backward()."""
    def fitted():
        est = Estimator(gelu_mlp, **FAST) if Estimator is JacobianSparseAutoencoder else Estimator(**FAST)
        return getattr(est, method)([X] if method == "fit_stream" else X)

    with context():
        inside = fitted()
        assert not torch.is_grad_enabled()  # the caller's mode is back
    outside = fitted()
    sae_in, sae_out = (inside.input_sae_, outside.input_sae_) if Estimator is JacobianSparseAutoencoder \
        else (inside, outside)
    np.testing.assert_array_equal(sae_in.components_, sae_out.components_)


@pytest.mark.parametrize("Estimator, params, cause", [
    (JacobianSparseAutoencoder, {"l1": 1e39}, r"the loss is NaN or inf while each of its terms is finite\. Likely "
                                              r"cause: l1=1e\+39 weighs the Jacobian penalty"),
    (TopKSparseAutoencoder, {"aux_coef": 1e39}, r"Likely cause: aux_coef=1e\+39 weighs the AuxK loss so heavily "
                                                r"that the weighted sum overflows"),
    (TopKSparseAutoencoder, {"aux_coef": 1e36}, r"a gradient is NaN or inf .*Likely cause: aux_coef=1e\+36 weighs "
                                                r"the AuxK loss so heavily that its gradient overflows"),
    (JacobianSparseAutoencoder, {"aux_coef": 1e36}, r"Likely cause: aux_coef=1e\+36 weighs the AuxK loss"),
])
def test_a_loss_weight_that_overflows_float32_is_named(X, gelu_mlp, Estimator, params, cause):
    """A legal but huge l1 or aux_coef overflowed the loss or a gradient; the error blamed the
    learning rate (before any update), X's values or l1."""
    # 64 latents, k = 1: latents go dead within the fit, so AuxK acts
    settings_ = {**FAST, "n_components": 64, "k": 1, "batch_size": 64, **params}
    est = Estimator(gelu_mlp, **settings_) if Estimator is JacobianSparseAutoencoder else Estimator(**settings_)
    with pytest.raises(NonFiniteTrainingError, match=cause) as info:
        est.fit(X)
    assert "learning_rate" not in str(info.value)
    assert not hasattr(est, "n_iter_")

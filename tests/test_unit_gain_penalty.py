"""The unit-gain Jacobian penalty (``penalty="unit_gain"``): what it is invariant to, and the estimator's switch.

The step's value and gradients are pinned to a plain twin in ``tests/test_fast_paths.py``
(``test_step_losses_equal_the_plain_step_value_and_gradients``); here are the properties that
make it a different penalty from the paper's: it does not change when an output latent's encoder
row is rescaled, so its gradient has no component along the rows.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae._backend.jacobian import jacobian_penalty
from sklearn_jsae._backend.mlp import ElementwiseMLP, GatedMLP
from sklearn_jsae._backend.step import unit_gain_encoder

F64 = torch.float64


def _case(seed, gated, d_in=5, d_out=4, d_mlp=7, n_in=9, n_out=8, k=3, batch=6):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    if gated:
        mlp = GatedMLP(r(d_in, d_mlp), r(d_in, d_mlp), r(d_mlp, d_out), r(d_mlp), None, r(d_out), activation="silu")
    else:
        mlp = ElementwiseMLP(r(d_in, d_mlp), r(d_mlp), r(d_mlp, d_out), r(d_out), "gelu")
    x = r(batch, d_in)
    W_dec = r(n_in, d_in)
    W_enc = r(n_out, d_out).requires_grad_()
    idx_x = torch.stack([torch.randperm(n_in, generator=g)[:k] for _ in range(batch)])
    idx_y = torch.stack([torch.randperm(n_out, generator=g)[:k] for _ in range(batch)])
    return mlp, x, W_dec, idx_x, W_enc, idx_y


def _penalty(case, W_enc, unit_gain):
    mlp, x, W_dec, idx_x, _, idx_y = case
    rows = unit_gain_encoder(W_enc) if unit_gain else W_enc
    return jacobian_penalty(mlp, x, W_dec, idx_x, rows, idx_y)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gated=st.booleans(),
       log_gains=st.lists(st.floats(-3, 3), min_size=8, max_size=8))
def test_unit_gain_penalty_ignores_each_encoder_rows_norm_and_the_papers_does_not(seed, gated, log_gains):
    case = _case(seed, gated)
    W_enc = case[4]
    gains = torch.tensor(log_gains, dtype=F64).exp().unsqueeze(1)
    torch.testing.assert_close(_penalty(case, W_enc * gains, True), _penalty(case, W_enc, True),
                               rtol=1e-10, atol=1e-12)
    # The paper's penalty is linear in each row's gain: halving every row halves it.
    torch.testing.assert_close(_penalty(case, W_enc / 2, False), _penalty(case, W_enc, False) / 2,
                               rtol=1e-10, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gated=st.booleans())
def test_unit_gain_penalty_gradient_is_orthogonal_to_every_encoder_row(seed, gated):
    case = _case(seed, gated)
    W_enc = case[4]
    (grad,) = torch.autograd.grad(_penalty(case, W_enc, True), W_enc)
    assert grad.abs().sum() > 0
    radial = (grad * W_enc).sum(1) / W_enc.norm(dim=1)
    torch.testing.assert_close(radial, torch.zeros_like(radial), rtol=0, atol=1e-12)
    # The paper's gradient does have a radial part: shrinking the rows lowers it.
    (paper_grad,) = torch.autograd.grad(_penalty(case, W_enc, False), W_enc)
    assert (paper_grad * W_enc).sum() > 0


def test_unit_gain_encoder_rows_have_unit_norm_and_keep_their_direction():
    W = torch.tensor([[3.0, 4.0], [0.0, -2.0], [0.0, 0.0]], dtype=F64)
    unit = unit_gain_encoder(W)
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [0.0, -1.0], [0.0, 0.0]], dtype=F64))
    assert torch.isfinite(unit).all()  # a zero row stays zero instead of NaN


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 10)).astype(np.float32)
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.GELU(), torch.nn.Linear(24, 10))
    return X, mlp


SETTINGS = dict(n_components=24, k=3, max_iter=2, batch_size=64, random_state=0, device="cpu")


def test_penalty_is_validated_with_its_name_value_and_choices(data):
    X, mlp = data
    with pytest.raises(InvalidParameterError, match=r"'penalty' parameter .*Got 'gain'") as error:
        JacobianSparseAutoencoder(mlp, penalty="gain", **SETTINGS).fit(X)
    assert "'paper'" in str(error.value) and "'unit_gain'" in str(error.value)


def test_penalty_does_not_change_the_traditional_pair_and_changes_a_jsae(data):
    X, mlp = data
    fits = {(penalty, l1): JacobianSparseAutoencoder(mlp, l1=l1, penalty=penalty, **SETTINGS).fit(X)
            for penalty in ("paper", "unit_gain") for l1 in (0.0, 5.0)}
    for attribute in ("components_", "encoder_"):
        np.testing.assert_array_equal(getattr(fits["paper", 0.0].output_sae_, attribute),
                                      getattr(fits["unit_gain", 0.0].output_sae_, attribute))
        assert not np.allclose(getattr(fits["paper", 5.0].output_sae_, attribute),
                               getattr(fits["unit_gain", 5.0].output_sae_, attribute))
    assert fits["unit_gain", 5.0].get_params()["penalty"] == "unit_gain"


def test_penalty_survives_a_model_file_round_trip(data, tmp_path):
    from sklearn_jsae import load

    X, mlp = data
    fitted = JacobianSparseAutoencoder(mlp, l1=1.0, penalty="unit_gain", **SETTINGS).fit(X)
    fitted.save(tmp_path / "model.safetensors")
    loaded = load(tmp_path / "model.safetensors")
    assert loaded.get_params()["penalty"] == "unit_gain"
    np.testing.assert_array_equal(loaded.output_sae_.encoder_, fitted.output_sae_.encoder_)

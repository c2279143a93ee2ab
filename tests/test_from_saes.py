"""JacobianSparseAutoencoder.from_saes: a fitted pair made of two fitted TopK SAEs, no training.

Pinned by a round trip (a fitted JSAE rebuilt from its own two SAEs and training rows is the same
model, and trains on the same with warm_start), by two separately trained SAEs (the traditional
pair: codes are each SAE's own), by SAELens folders, and by the errors a user can hit.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder

SETTINGS = dict(k=4, batch_size=64, max_iter=8, l1=1.0, random_state=0)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.GELU(), torch.nn.Linear(24, 5))


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(700, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(mlp, X):
    return JacobianSparseAutoencoder(mlp, n_components=32, n_output_components=24, **SETTINGS).fit(X)


def test_a_fitted_pair_rebuilt_from_its_saes_is_the_same_model(fitted, mlp, X):
    rebuilt = JacobianSparseAutoencoder.from_saes(mlp, fitted.input_sae_, fitted.output_sae_, X,
                                                  **{k: v for k, v in SETTINGS.items() if k != "k"})
    assert rebuilt.get_params()["n_components"] == 32 and rebuilt.n_output_components == 24 and rebuilt.k == 4
    assert rebuilt.input_sae_.scale_ == fitted.input_sae_.scale_  # measured as fit measures them
    assert rebuilt.output_sae_.scale_ == fitted.output_sae_.scale_
    assert rebuilt.paper_lambda_ == fitted.paper_lambda_
    rows = X[:80]
    assert (rebuilt.transform(rows) != fitted.transform(rows)).nnz == 0
    assert (rebuilt.transform_output(rows) != fitted.transform_output(rows)).nnz == 0
    np.testing.assert_array_equal(rebuilt.jacobian(rows).toarray(), fitted.jacobian(rows).toarray())
    np.testing.assert_allclose(rebuilt.jacobian_.toarray(), fitted.jacobian_.toarray(), rtol=1e-6, atol=1e-9)
    assert rebuilt.score(rows) == fitted.score(rows)
    assert rebuilt.n_iter_ == 0 and rebuilt.history_ == []
    assert rebuilt.input_sae_.history_ == fitted.input_sae_.history_ and rebuilt.input_sae_.history_
    # warm_start trains on from the SAEs' weights and the measured scales, exactly as the pair
    # they came from does (an identical fit, so that the shared fixture stays as it is)
    before = fitted.input_sae_.components_.copy()
    rebuilt.set_params(warm_start=True, max_iter=3).fit(X)
    np.testing.assert_array_equal(fitted.input_sae_.components_, before)  # copies: the sources are left alone
    own = JacobianSparseAutoencoder(mlp, n_components=32, n_output_components=24, **SETTINGS).fit(X)
    own.set_params(warm_start=True, max_iter=3).fit(X)
    np.testing.assert_array_equal(own.input_sae_.components_, rebuilt.input_sae_.components_)
    np.testing.assert_array_equal(own.output_sae_.encoder_, rebuilt.output_sae_.encoder_)
    assert not np.array_equal(own.input_sae_.components_, before)


@settings(max_examples=8, deadline=None)
@given(n_input=st.integers(4, 40), n_output=st.integers(4, 40), k=st.integers(1, 4),
       l1=st.sampled_from([0.0, 0.5, 3.0]), gated=st.booleans(), seed=st.integers(0, 3))
def test_rebuilding_any_fitted_pair_from_its_saes_gives_the_same_model(n_input, n_output, k, l1, gated, seed):
    """Property: for any widths, k, l1 and MLP kind, from_saes(its SAEs, its training rows) is the
    fitted pair (codes, Jacobians and scales bit for bit)."""
    from sklearn_jsae.mlp import GatedMLP

    g = torch.Generator().manual_seed(seed)
    mlp = (GatedMLP(torch.randn(6, 12, generator=g) / 2, torch.randn(6, 12, generator=g) / 2,
                    torch.randn(12, 5, generator=g) / 3) if gated
           else torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)))
    X = np.random.default_rng(seed).normal(size=(200, 6)).astype(np.float32)
    common = dict(l1=l1, batch_size=50, max_iter=2, random_state=seed)
    fitted = JacobianSparseAutoencoder(mlp, n_components=n_input, n_output_components=n_output, k=k,
                                       **common).fit(X)
    rebuilt = JacobianSparseAutoencoder.from_saes(mlp, fitted.input_sae_, fitted.output_sae_, X, **common)
    assert (rebuilt.input_sae_.scale_, rebuilt.output_sae_.scale_) == (fitted.input_sae_.scale_,
                                                                      fitted.output_sae_.scale_)
    rows = X[:30]
    assert (rebuilt.transform_output(rows) != fitted.transform_output(rows)).nnz == 0
    np.testing.assert_array_equal(rebuilt.jacobian(rows).toarray(), fitted.jacobian(rows).toarray())


def test_two_separately_trained_saes_are_the_traditional_pair(mlp, X):
    """Each SAE codes as it does on its own; the pair's Jacobian is defined on their active latents."""
    with torch.no_grad():
        Y = mlp(torch.from_numpy(X)).numpy()
    sae_x = TopKSparseAutoencoder(32, k=4, batch_size=64, max_iter=5, random_state=1).fit(X)
    sae_y = TopKSparseAutoencoder(16, k=4, batch_size=64, max_iter=5, random_state=2).fit(Y)
    pair = JacobianSparseAutoencoder.from_saes(mlp, sae_x, sae_y, X)
    rows = X[:50]
    assert (pair.transform(rows) != sae_x.transform(rows)).nnz == 0
    assert (pair.transform_output(rows) != sae_y.transform(pair.mlp_outputs(rows))).nnz == 0
    J = pair.jacobian(rows).toarray()  # (n, n_out, n_in): nonzero only on both TopK sets
    topk_x = np.zeros((50, 32), dtype=bool)
    np.put_along_axis(topk_x, sae_x._codes(rows)[1], True, axis=1)
    topk_y = np.zeros((50, 16), dtype=bool)
    np.put_along_axis(topk_y, sae_y._codes(pair.mlp_outputs(rows))[1], True, axis=1)
    assert not J[~(topk_y[:, :, None] & topk_x[:, None, :])].any() and J.any()
    assert pair.output_sae_.dead_fraction_ == sae_y.dead_fraction_


def test_saelens_saes_make_a_pair(fitted, mlp, X, tmp_path):
    """Two SAEs exported to SAELens and read back (no scale_, NaN dead fractions) make the same pair."""
    from installed import require

    require("sae_lens")
    from sklearn_jsae.interop import from_saelens, to_saelens

    saes = [from_saelens(to_saelens(fitted, tmp_path / side, side=side)) for side in ("input", "output")]
    pair = JacobianSparseAutoencoder.from_saes(mlp, *saes, X)
    rows = X[:60]
    np.testing.assert_array_equal(pair.jacobian(rows).toarray(), fitted.jacobian(rows).toarray())
    assert pair.input_sae_.scale_ == fitted.input_sae_.scale_ and np.isnan(pair.input_sae_.dead_fraction_)


def test_errors_name_what_does_not_fit(fitted, mlp, X):
    sae_x, sae_y = fitted.input_sae_, fitted.output_sae_
    with pytest.raises(ValueError, match="input_sae has k=4 and output_sae k=3; .* one k"):
        JacobianSparseAutoencoder.from_saes(mlp, sae_x, TopKSparseAutoencoder(8, k=3, max_iter=1).fit(
            np.random.default_rng(1).normal(size=(64, 5))), X)
    with pytest.raises(ValueError, match="input_sae was fitted on 6 features, but X has 5"):
        JacobianSparseAutoencoder.from_saes(None, sae_x, sae_y, X[:, :5])
    with pytest.raises(ValueError, match="output_sae was fitted on 5 features, but mlp returns 6"):
        JacobianSparseAutoencoder.from_saes(None, sae_x, sae_y, X)  # the identity returns its 6 inputs
    with pytest.raises(TypeError, match="k, n_components come\\(s\\) from the SAEs"):
        JacobianSparseAutoencoder.from_saes(mlp, sae_x, sae_y, X, k=4, n_components=32)
    with pytest.raises(TypeError, match="output_sae must be a fitted TopKSparseAutoencoder .* got JacobianSparseAutoencoder"):
        JacobianSparseAutoencoder.from_saes(mlp, sae_x, fitted, X)
    with pytest.raises(NotFittedError):
        JacobianSparseAutoencoder.from_saes(mlp, sae_x, TopKSparseAutoencoder(24, k=4), X)
    with pytest.raises(ValueError, match="'l1' parameter"):
        JacobianSparseAutoencoder.from_saes(mlp, sae_x, sae_y, X, l1=-1.0)

"""Tests of sklearn_jsae.metrics: invariants (hypothesis), dense references, behaviour."""

from __future__ import annotations

import copy
import itertools
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend.mlp import AffineMap, ElementwiseMLP, GatedMLP
from sklearn_jsae.metrics import (
    classify_curves,
    fraction_variance_unexplained,
    global_jacobian_sparsity,
    intervention_agreement,
    jacobian_sparsity,
    linearity,
    randomize_mlp,
    reconstruction_metrics,
)

FAST = settings(max_examples=12, deadline=None)
ACTS = [torch.nn.GELU, torch.nn.ReLU, torch.nn.SiLU, torch.nn.Tanh]


# ------------------------------------------------------------------------------------- helpers


def make_mlp(d_in, d_hidden, d_out, act=torch.nn.GELU, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), act(), torch.nn.Linear(d_hidden, d_out))


def set_sae(sae, W_enc, b_enc, W_dec, b_dec):
    sae.encoder_ = np.asarray(W_enc, dtype=np.float32)
    sae.encoder_bias_ = np.asarray(b_enc, dtype=np.float32)
    sae.components_ = np.asarray(W_dec, dtype=np.float32)
    sae.decoder_bias_ = np.asarray(b_dec, dtype=np.float32)


def randomise_saes(jsae, seed):
    """Give both SAEs random (untrained) parameters, so Jacobians are diverse."""
    rng = np.random.default_rng(seed)
    for sae in (jsae.input_sae_, jsae.output_sae_):
        n, d = sae.components_.shape
        W = rng.normal(size=(n, d))
        W /= np.linalg.norm(W, axis=1, keepdims=True)
        set_sae(sae, rng.normal(size=(n, d)), rng.normal(scale=0.3, size=n), W, rng.normal(scale=0.3, size=d))
    return jsae


def fitted(mlp, X, n_components, k, seed=0, randomise=True, **kwargs):
    jsae = JacobianSparseAutoencoder(mlp, n_components=n_components, k=k, max_iter=1, random_state=seed,
                                     **kwargs).fit(X)
    return randomise_saes(jsae, seed) if randomise else jsae


def reference_blocks(jsae, X):
    """Dense reference: full n_out x n_in latent Jacobian per sample by autograd (float64),
    restricted to the active sets found with a numpy TopK."""
    def codes(sae, Z):
        pre = (Z - sae.decoder_bias_.astype(np.float64)) @ sae.encoder_.T.astype(np.float64) + sae.encoder_bias_
        return np.argsort(-pre, axis=1)[:, : sae.k]

    mlp = copy.deepcopy(jsae.mlp_).double()
    Xt = torch.as_tensor(X, dtype=torch.float64)
    with torch.no_grad():
        Y = mlp(Xt).numpy()
    idx_x, idx_y = codes(jsae.input_sae_, X.astype(np.float64)), codes(jsae.output_sae_, Y)
    W_dec_x = jsae.input_sae_.components_.astype(np.float64)
    W_enc_y = jsae.output_sae_.encoder_.astype(np.float64)
    full = []
    for t in range(X.shape[0]):
        J_f = torch.func.jacrev(lambda row: mlp(row[None])[0])(Xt[t]).numpy()  # (d_out, d_in)
        full.append(W_enc_y @ J_f @ W_dec_x.T)
    return np.stack(full), idx_y, idx_x


def ambiguous_fraction(values, tau, eps=1e-4):
    return np.mean(np.abs(np.abs(values) - tau) < eps)


# ---------------------------------------------------------------------- per-sample Jacobian sparsity


@FAST
@given(
    d_in=st.integers(2, 5), d_hidden=st.integers(3, 8), d_out=st.integers(2, 5),
    n_components=st.integers(4, 10), k=st.integers(1, 3), act=st.sampled_from(ACTS),
    seed=st.integers(0, 1000), taus=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=4, unique=True),
)
def test_jacobian_sparsity_matches_dense_reference(d_in, d_hidden, d_out, n_components, k, act, seed, taus):
    X = np.random.default_rng(seed).normal(size=(12, d_in)).astype(np.float32)
    jsae = fitted(make_mlp(d_in, d_hidden, d_out, act, seed), X, n_components, k, seed)
    full, idx_y, idx_x = reference_blocks(jsae, X)
    blocks = np.stack([full[t][np.ix_(idx_y[t], idx_x[t])] for t in range(len(X))])
    result = jacobian_sparsity(jsae, X, thresholds=taus)
    assert list(result) == [float(t) for t in taus]
    for tau, value in result.items():
        expected = np.mean([(np.abs(b) > tau).mean() for b in blocks])
        assert abs(value - expected) <= ambiguous_fraction(blocks, tau) + 1e-9
        counts = jacobian_sparsity(jsae, X, thresholds=[tau], normalize=False)[tau]
        assert counts == pytest.approx(value * k * k)


@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), n_out=st.integers(1, 7), n_in=st.integers(1, 7),
       taus=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6))
def test_sparsities_are_bounded_and_monotone_in_tau(seed, n, n_out, n_in, taus):
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, n_out, n_in)) * (rng.random((n, n_out, n_in)) < 0.5)
    t, i, j = np.nonzero(dense)
    if t.size == 0:
        return
    J = sp.coo_array((dense[t, i, j], (t, i, j)), shape=dense.shape)
    taus = sorted(taus)
    for fn in (jacobian_sparsity, global_jacobian_sparsity):
        values = list(fn(J, thresholds=taus).values())
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(a >= b for a, b in itertools.pairwise(values))


def test_jacobian_sparsity_of_array_equals_estimator_path():
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    jsae = fitted(make_mlp(4, 8, 3), X, 10, 3)
    from_estimator = jacobian_sparsity(jsae, X)
    from_array = jacobian_sparsity(jsae.jacobian(X))
    assert from_array == pytest.approx(from_estimator)
    assert global_jacobian_sparsity(jsae.jacobian(X)) == pytest.approx(global_jacobian_sparsity(jsae, X))


def test_jacobian_sparsity_is_zero_above_the_largest_entry_and_one_below_the_smallest():
    X = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    jsae = fitted(make_mlp(4, 8, 4), X, 8, 2)
    values = np.abs(jsae.jacobian(X).data)
    result = jacobian_sparsity(jsae, X, thresholds=[values.max(), values.min() / 2])
    assert result[float(values.max())] == 0.0
    assert result[float(values.min() / 2)] == 1.0


def test_jacobian_sparsity_rejects_bad_thresholds_and_missing_X():
    X = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    jsae = fitted(None, X, 6, 2)
    with pytest.raises(ValueError, match="thresholds"):
        jacobian_sparsity(jsae, X, thresholds=[-0.1])
    with pytest.raises(ValueError, match="X is required"):
        jacobian_sparsity(jsae)
    with pytest.raises(TypeError, match="JacobianSparseAutoencoder"):
        jacobian_sparsity(TopKSparseAutoencoder(n_components=6, k=2, max_iter=1).fit(X), X)
    with pytest.raises(ValueError, match="features"):
        jacobian_sparsity(jsae, X[:, :2])
    with pytest.raises(ValueError, match="X must be None when a Jacobian array is passed instead of an"):
        jacobian_sparsity(jsae.jacobian(X), X)
    no_rows = sp.coo_array((np.zeros(0), (np.zeros(0, int),) * 3), shape=(0, 6, 6))
    with pytest.raises(ValueError, match="the Jacobian has no samples; pass at least one row of X"):
        jacobian_sparsity(no_rows)


# ------------------------------------------------------------------------------ global sparsity


@FAST
@given(d=st.integers(2, 5), n_components=st.integers(4, 10), k=st.integers(1, 3), seed=st.integers(0, 1000),
       taus=st.lists(st.floats(0.0, 1.5), min_size=1, max_size=4, unique=True))
def test_global_sparsity_matches_dense_reference(d, n_components, k, seed, taus):
    X = np.random.default_rng(seed).normal(size=(15, d)).astype(np.float32)
    jsae = fitted(make_mlp(d, 6, d, torch.nn.Tanh, seed), X, n_components, k, seed)
    full, idx_y, idx_x = reference_blocks(jsae, X)
    total = np.zeros(full.shape[1:])
    count = np.zeros(full.shape[1])
    for t in range(len(X)):
        mask = np.zeros(full.shape[1:], dtype=bool)
        mask[np.ix_(idx_y[t], idx_x[t])] = True
        total += np.abs(full[t]) * mask
        count[idx_y[t]] += 1
    G_ref = total / np.maximum(count, 1)[:, None]
    fractions, G = global_jacobian_sparsity(jsae, X, thresholds=taus, return_matrix=True)
    assert sp.issparse(G) and G.shape == G_ref.shape
    np.testing.assert_allclose(G.toarray(), G_ref, atol=1e-4, rtol=1e-3)
    for tau, value in fractions.items():
        expected = np.mean(G_ref > tau)
        assert abs(value - expected) <= ambiguous_fraction(G_ref, tau) + 1e-9


def test_global_sparsity_summed_in_parts_equals_one_sum(monkeypatch):
    """Large evaluations add their entries to the running total in parts (every
    GLOBAL_FLUSH_ENTRIES); flushing in parts the batches of 4 rows gives the same matrix as one
    flush at the end of the same batches.  (The batches are the same in both: float32 Jacobians of
    batches of other sizes may round differently, by about 1e-7, as BLAS picks its kernels.)"""
    from sklearn_jsae._backend import inference
    from sklearn_jsae.metrics import _sparsity

    X = np.random.default_rng(3).normal(size=(30, 4)).astype(np.float32)
    jsae = fitted(make_mlp(4, 8, 4), X, 12, 3)
    taus = [0.0, 0.05, 0.2]
    whole, G_whole = global_jacobian_sparsity(jsae, X, thresholds=taus, return_matrix=True)
    batches, flushes = [], []
    monkeypatch.setattr(inference, "jacobian_batch_size", lambda *a: batches.append(a) or 4)
    coo_sum = _sparsity._coo_sum  # a flush of the pending entries into the running total
    monkeypatch.setattr(_sparsity, "_coo_sum", lambda *a: flushes.append(1) or coo_sum(*a))
    once, G_once = global_jacobian_sparsity(jsae, X, thresholds=taus, return_matrix=True)
    assert batches and len(flushes) == 1 and len(X) * 3 * 3 < _sparsity.GLOBAL_FLUSH_ENTRIES
    monkeypatch.setattr(_sparsity, "GLOBAL_FLUSH_ENTRIES", 1)
    parts, G_parts = global_jacobian_sparsity(jsae, X, thresholds=taus, return_matrix=True)
    assert len(flushes) - 1 > 1  # flushed in parts
    np.testing.assert_allclose(G_parts.toarray(), G_once.toarray(), rtol=1e-12, atol=0)
    assert parts == pytest.approx(once, abs=1e-12) and G_once.nnz > 0
    np.testing.assert_allclose(G_once.toarray(), G_whole.toarray(), rtol=1e-5, atol=1e-7)  # one batch of 30


def test_global_sparsity_flushes_grow_with_the_running_total(monkeypatch):
    """A flush rebuilds the running total, so a flush every fixed number of entries is quadratic in
    the rows while the total grows (up to n_out · n_in entries); flushing when the pending entries
    outnumber the total takes a logarithmic number of flushes, and the same matrix."""
    from sklearn_jsae._backend import inference
    from sklearn_jsae.metrics import _sparsity

    X = np.random.default_rng(4).normal(size=(2000, 16)).astype(np.float32)
    jsae = fitted(make_mlp(16, 32, 16), X, 4096, 3)  # 4096² latent pairs
    monkeypatch.setattr(inference, "jacobian_batch_size", lambda *a: 4)  # 500 batches
    monkeypatch.setattr(_sparsity, "GLOBAL_FLUSH_ENTRIES", 10**9)  # one sum at the end
    once, G_once = global_jacobian_sparsity(jsae, X, thresholds=[0.0, 0.01], return_matrix=True)
    monkeypatch.setattr(_sparsity, "GLOBAL_FLUSH_ENTRIES", 1)
    flushes = []
    real_sum = _sparsity._coo_sum
    monkeypatch.setattr(_sparsity, "_coo_sum", lambda *a: flushes.append(1) or real_sum(*a))
    parts, G_parts = global_jacobian_sparsity(jsae, X, thresholds=[0.0, 0.01], return_matrix=True)
    # doubling until the total holds its S distinct pairs, then one flush per S entries: about
    # log2(S / 36) + 18,000 / S flushes (was one per batch: 500)
    S = G_once.nnz
    assert S > 1000 and len(flushes) <= np.log2(S) + 18_000 / S + 2
    np.testing.assert_allclose(G_parts.toarray(), G_once.toarray(), rtol=1e-12, atol=0)
    assert parts == pytest.approx(once, abs=1e-12)


def test_global_sparsity_never_forms_a_dense_pair_array():
    # 60,000 x 60,000 latent pairs: a dense float64 array would need 28.8 GB.
    X = np.random.default_rng(0).normal(size=(24, 3)).astype(np.float32)
    jsae = JacobianSparseAutoencoder(n_components=60_000, k=2, max_iter=1, random_state=0).fit(X)
    fractions, G = global_jacobian_sparsity(jsae, X, thresholds=[0.0], return_matrix=True)
    assert G.shape == (60_000, 60_000)
    assert G.nnz <= 24 * 2 * 2
    assert 0.0 < fractions[0.0] <= 24 * 4 / 60_000**2


# -------------------------------------------------------------------------------- reconstruction


@FAST
@given(seed=st.integers(0, 1000), d=st.integers(2, 6), n_components=st.integers(3, 12), k=st.integers(1, 3))
def test_fvu_matches_numpy_reference(seed, d, n_components, k):
    k = min(k, n_components)
    X = np.random.default_rng(seed).normal(size=(30, d)).astype(np.float32) * 3 + 1
    jsae = fitted(make_mlp(d, 7, d, seed=seed), X, n_components, k, seed)
    Y = jsae.mlp_outputs(X).astype(np.float64)
    X_hat = jsae.input_sae_.inverse_transform(jsae.transform(X))
    Y_hat = jsae.output_sae_.inverse_transform(jsae.transform_output(X))

    def fvu(Z, Z_hat):
        return ((Z - Z_hat) ** 2).sum() / ((Z - Z.mean(0)) ** 2).sum()

    result = fraction_variance_unexplained(jsae, X, batch_size=7)
    assert result["input"] == pytest.approx(fvu(X.astype(np.float64), X_hat), rel=1e-4)
    assert result["output"] == pytest.approx(fvu(Y, Y_hat), rel=1e-4)
    assert result["input"] >= 0 and result["output"] >= 0


def test_reconstruction_metrics_l0_and_dead_fraction_match_codes():
    X = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    jsae = fitted(make_mlp(4, 8, 4), X, 16, 3, randomise=False)
    metrics = reconstruction_metrics(jsae, X, batch_size=16)
    for side, codes in (("input", jsae.transform(X)), ("output", jsae.transform_output(X))):
        per_row = np.diff(codes.indptr)
        per_latent = np.bincount(codes.indices[codes.data > 0], minlength=codes.shape[1])
        assert metrics[side]["l0"] == pytest.approx(per_row.mean())
        assert metrics[side]["l0"] <= 3
        assert metrics[side]["dead_fraction"] == pytest.approx(np.mean(per_latent == 0))
        assert metrics[side]["explained_variance"] == pytest.approx(1 - metrics[side]["fvu"])


def test_fvu_is_zero_for_an_exact_autoencoder():
    d = 4
    X = np.random.default_rng(0).normal(size=(40, d)).astype(np.float32)
    jsae = fitted(None, X, 2 * d, d, randomise=False)
    basis = np.vstack([np.eye(d), -np.eye(d)])  # TopK_d of (x, -x) keeps |x_i|: exact
    for sae in (jsae.input_sae_, jsae.output_sae_):
        set_sae(sae, basis, np.zeros(2 * d), basis, np.zeros(d))
    result = fraction_variance_unexplained(jsae, X)
    assert result["input"] == pytest.approx(0.0, abs=1e-10)
    assert result["output"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("rows", ["one row", "identical rows"])
def test_rows_without_variance_follow_score_s_convention(rows):
    """FVU is undefined without variance: 0 for an exact reconstruction and 1 otherwise (explained
    variance 1 or 0), as score() gives, never inf."""
    d = 4
    X = np.random.default_rng(0).normal(size=(40, d)).astype(np.float32)
    Z = X[:1] if rows == "one row" else np.repeat(X[:1], 5, axis=0)
    jsae = fitted(make_mlp(d, 8, d), X, 8, 2, randomise=False)
    metrics = reconstruction_metrics(jsae, Z)
    assert metrics["input"]["fvu"] == 1.0 and metrics["output"]["fvu"] == 1.0
    assert jsae.score(Z) == pytest.approx(np.mean([m["explained_variance"] for m in metrics.values()])) == 0.0
    exact = fitted(None, X, 2 * d, d, randomise=False)
    basis = np.vstack([np.eye(d), -np.eye(d)])
    for sae in (exact.input_sae_, exact.output_sae_):
        set_sae(sae, basis, np.zeros(2 * d), basis, np.zeros(d))
    assert fraction_variance_unexplained(exact, Z) == {"input": 0.0, "output": 0.0}
    assert exact.score(Z) == 1.0


# ------------------------------------------------------------------------------------- linearity


def test_classify_curves_rules():
    v = np.tile(np.linspace(0, 5, 100), (7, 1))
    curves = np.stack([
        3 - 0.5 * v[0],                           # linear
        np.zeros(100),                            # constant zero: linear
        np.maximum(2 * v[2] - 3, 0),              # zeros touching the start: JumpReLU
        np.maximum(3 - v[3], 0),                  # zeros touching the end: JumpReLU
        np.where((v[4] > 2) & (v[4] < 3), 0.0, v[4] + 1),   # zeros in the middle: other
        np.where((v[5] < 1) | (v[5] > 4), 0.0, v[5]),      # zeros at both ends: other
        0.01 * v[6] ** 2,                        # curved: other
    ])
    single = np.where(v[0] > 0, 0.0, 0.3)[None]   # kink between the first two points: JumpReLU
    assert classify_curves(v[:1], single).tolist() == ["jumprelu"]
    assert classify_curves(v, curves).tolist() == [
        "linear", "linear", "jumprelu", "jumprelu", "other", "other", "other"]
    wobble = v[:1] + 0.004 * np.sin(20 * v[:1])
    assert classify_curves(v[:1], wobble, tol=0.01).tolist() == ["linear"]
    assert classify_curves(v[:1], wobble, tol=0.001).tolist() == ["other"]


def test_classify_curves_takes_a_shared_grid_and_refuses_bad_sweeps():
    v = np.linspace(0, 5, 50)
    curves = np.stack([2 * v + 1, np.maximum(v - 2, 0)])
    assert classify_curves(v, curves).tolist() == classify_curves(np.tile(v, (2, 1)), curves).tolist() \
        == ["linear", "jumprelu"]
    with pytest.raises(ValueError, match=r"got grid \(49,\) and curves \(2, 50\)"):
        classify_curves(v[:-1], curves)
    with pytest.raises(ValueError, match="at least 2 points"):
        classify_curves(v[:1], curves[:, :1])
    broken = curves.copy()
    broken[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"curves holds NaN or inf \(first at row 1\)"):
        classify_curves(v, broken)
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        classify_curves(v, curves, tol=0)


def test_linearity_of_an_affine_mlp_without_topk_is_never_other():
    # k = n_components: nothing leaves the top k, so s_y[i](v) = ReLU(affine in v).
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    torch.manual_seed(3)
    jsae = fitted(torch.nn.Linear(4, 4), X, 6, 6, seed=3)
    fractions = linearity(jsae, X, n_samples=20, random_state=0)
    assert fractions["other"] == 0.0
    assert fractions["linear"] + fractions["jumprelu"] == pytest.approx(1.0)


def test_linearity_detects_a_curved_function():
    def square(x):
        return 3.0 * x**2

    X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    jsae = fitted(square, X, 5, 5, seed=1)
    fractions = linearity(jsae, X, n_samples=20, random_state=0)
    assert fractions["other"] > 0.5


def test_linearity_sweep_follows_its_documented_definition():
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    jsae = fitted(make_mlp(4, 8, 4), X, 8, 3, seed=2)
    fractions, details = linearity(jsae, X, n_samples=5, n_pairs=2, n_points=7, random_state=1,
                                   return_curves=True)
    assert details["curves"].shape == (10, 7) and details["grid"].shape == (10, 7)
    assert sum(fractions.values()) == pytest.approx(1.0)
    for p in (0, 9):
        row, i, j = details["rows"][p], details["output_latent"][p], details["input_latent"][p]
        s = jsae.transform(X[row : row + 1]).toarray()[0, j]
        assert j in jsae.jacobian(X[row : row + 1]).coords[2]  # j is an active input latent
        assert details["grid"][p, -1] == pytest.approx(max(5.0, s + 1.0))
        d_j = jsae.input_sae_.components_[j]
        points = X[row] + (details["grid"][p][:, None] - s) * d_j
        expected = jsae.transform_output(points.astype(np.float32)).toarray()[:, i]
        np.testing.assert_allclose(details["curves"][p], expected, atol=1e-4)
    again = linearity(jsae, X, n_samples=5, n_pairs=2, n_points=7, random_state=1)
    assert again == fractions


def test_linearity_rejects_bad_parameters():
    X = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    jsae = fitted(None, X, 6, 2)
    with pytest.raises(ValueError, match="n_points"):
        linearity(jsae, X, n_points=1)
    with pytest.raises(ValueError, match="tol"):
        linearity(jsae, X, tol=-1)


# ------------------------------------------------------------------------------- interventions


def test_intervention_agreement_is_exact_for_a_linear_latent_map():
    # Identity MLP; the output SAE keeps every latent (k = n) with a large encoder bias, so
    # s_y is affine in y and a unit removal changes it by exactly J.
    d = 3
    X = np.random.default_rng(0).normal(size=(25, d)).astype(np.float32)
    jsae = fitted(None, X, 6, 6, seed=0)
    sae = jsae.output_sae_
    set_sae(sae, sae.encoder_, np.full(6, 100.0), sae.components_, sae.decoder_bias_)
    agreement, details = intervention_agreement(jsae, X, tol=1e-3, return_details=True)
    assert agreement == 1.0
    np.testing.assert_allclose(details["observed"], details["jacobian"], atol=1e-3)


@FAST
@given(seed=st.integers(0, 1000), k=st.integers(1, 3), delta=st.sampled_from([0.5, 1.0, 2.0]))
def test_intervention_details_match_a_public_api_reference(seed, k, delta):
    X = np.random.default_rng(seed).normal(size=(6, 3)).astype(np.float32)
    jsae = fitted(make_mlp(3, 6, 3, torch.nn.SiLU, seed), X, 7, k, seed)
    agreement, details = intervention_agreement(jsae, X, delta=delta, return_details=True)
    J = jsae.jacobian(X).todense()
    for t in range(len(X)):
        idx_y, idx_x = details["output_latent"][t], details["input_latent"][t]
        np.testing.assert_allclose(details["jacobian"][t], J[t][np.ix_(idx_y, idx_x)], atol=1e-5)
        moved = (X[t] - delta * jsae.input_sae_.components_[idx_x]).astype(np.float32)
        base = jsae.transform_output(X[t : t + 1]).toarray()[0, idx_y]
        after = jsae.transform_output(moved).toarray()[:, idx_y]  # (k_in, k_out)
        np.testing.assert_allclose(details["observed"][t], base[:, None] - after.T, atol=1e-4)
    expected = np.mean(np.abs(details["observed"] - delta * details["jacobian"]) <= 0.1)
    assert agreement == pytest.approx(expected)
    assert 0.0 <= agreement <= 1.0


# --------------------------------------------------------------------------- randomised control


@FAST
@given(d_in=st.integers(1, 6), d_hidden=st.integers(1, 9), d_out=st.integers(1, 6), act=st.sampled_from(ACTS),
       seed=st.integers(0, 10_000))
def test_randomize_mlp_keeps_biases_and_matches_scale(d_in, d_hidden, d_out, act, seed):
    mlp = make_mlp(d_in, d_hidden, d_out, act, seed)
    before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
    rand = randomize_mlp(mlp, random_state=seed)
    assert type(rand) is type(mlp) and type(rand[1]) is type(mlp[1])
    for name, p in rand.named_parameters():
        original = dict(mlp.named_parameters())[name]
        assert torch.equal(original, before[name])  # the input is untouched
        assert p.shape == original.shape and p.dtype == original.dtype
        if p.ndim == 1:
            assert torch.equal(p, original)
        else:
            assert torch.allclose(p.norm(), original.norm(), rtol=1e-5)
            assert p.numel() == 1 or not torch.equal(p, original)
    again = randomize_mlp(mlp, random_state=seed)
    assert all(torch.equal(a, b) for a, b in zip(rand.parameters(), again.parameters()))


def test_randomize_mlp_on_library_modules():
    g = torch.Generator().manual_seed(0)
    elementwise = ElementwiseMLP(torch.randn(4, 8, generator=g), torch.randn(8, generator=g),
                                 torch.randn(8, 4, generator=g), torch.randn(4, generator=g), "gelu_tanh")
    gated = GatedMLP(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g))
    x = torch.randn(5, 4, generator=g)
    for mlp, matrices in ((elementwise, ("W_in", "W_out")), (gated, ("W_gate", "W_up", "W_down"))):
        rand = randomize_mlp(mlp, random_state=1)
        assert type(rand) is type(mlp) and rand.activation == mlp.activation
        for name in matrices:
            assert torch.allclose(getattr(rand, name).norm(), getattr(mlp, name).norm(), rtol=1e-5)
            assert not torch.equal(getattr(rand, name), getattr(mlp, name))
        for name in ("b_in", "b_out", "b_gate", "b_up", "b_down"):
            if getattr(mlp, name, None) is not None:
                assert torch.equal(getattr(rand, name), getattr(mlp, name))
        assert not torch.allclose(rand(x), mlp(x))
    X = x.numpy()
    jsae = JacobianSparseAutoencoder(randomize_mlp(gated, 0), n_components=8, k=2, max_iter=1, random_state=0).fit(X)
    assert jsae.jacobian(X).shape == (5, 8, 8)


def test_randomize_mlp_uses_its_own_generator():
    mlp = make_mlp(3, 4, 3)
    state = torch.get_rng_state()
    randomize_mlp(mlp, random_state=0)
    assert torch.equal(torch.get_rng_state(), state)
    a = randomize_mlp(make_mlp(3, 4, 3), random_state=0)
    b = randomize_mlp(make_mlp(3, 4, 3), random_state=1)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_randomize_mlp_errors_are_clear():
    with pytest.raises(TypeError, match="nn.Module"):
        randomize_mlp(lambda x: x**2)
    with pytest.raises(ValueError, match="no weight matrix"):
        randomize_mlp(torch.nn.ReLU())
    with pytest.raises(ValueError, match="no weight matrix"):
        randomize_mlp(AffineMap(4))


# ------------------------------------------------------------------------------ spliced CE score


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.4,
    )
    return transformers.LlamaForCausalLM(config).eval()


def mlp_inputs(model, layer, ids):
    captured = []
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids))
    handle.remove()
    return torch.cat(captured).numpy()


def gated_of(model, layer):
    mlp = model.model.layers[layer].mlp
    return GatedMLP(mlp.gate_proj.weight.T, mlp.up_proj.weight.T, mlp.down_proj.weight.T)


@pytest.fixture(scope="module")
def llama_setup():
    model = tiny_llama()
    ids = np.random.default_rng(0).integers(0, 48, size=(6, 20))
    X = mlp_inputs(model, 1, ids)
    jsae = JacobianSparseAutoencoder(gated_of(model, 1), n_components=16, k=8, max_iter=1, random_state=0).fit(X)
    return model, ids, jsae


def test_spliced_ce_score_is_one_for_exact_saes_and_zero_for_a_zero_output(llama_setup):
    from sklearn_jsae.metrics import spliced_ce_score

    model, ids, jsae = llama_setup
    d = 8
    basis = np.vstack([np.eye(d), -np.eye(d)])  # with k = d this SAE reconstructs exactly
    for sae in (jsae.input_sae_, jsae.output_sae_):
        set_sae(sae, basis, np.zeros(2 * d), basis, np.zeros(d))
        sae.k = d
    scores = spliced_ce_score(model, 1, jsae, ids, batch_size=4)
    assert abs(scores["ce_zero"] - scores["ce_clean"]) > 1e-3  # the MLP matters in this model
    assert scores["ce_input"] == pytest.approx(scores["ce_clean"], abs=1e-5)
    assert scores["score_input"] == pytest.approx(1.0, abs=1e-3)
    assert scores["score_output"] == pytest.approx(1.0, abs=1e-3)
    assert scores["n_tokens"] == 6 * 19
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids)).loss.item()
    assert scores["ce_clean"] == pytest.approx(reference, rel=1e-5)

    # an output SAE whose codes are all zero and whose decoder bias is zero reconstructs 0
    set_sae(jsae.output_sae_, basis, np.full(2 * d, -1e4), basis, np.zeros(d))
    scores = spliced_ce_score(model, 1, jsae, ids)
    assert scores["ce_output"] == pytest.approx(scores["ce_zero"], abs=1e-5)
    assert scores["score_output"] == pytest.approx(0.0, abs=1e-3)
    mlp = model.model.layers[1].mlp
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks  # hooks removed
    assert not model.training


def test_spliced_ce_score_hooks_the_module_it_is_given(llama_setup):
    """``module=`` as one module or an (input, output) pair: the same scores as the model's own
    hook points when it names that MLP, other scores when it names another layer's."""
    from sklearn_jsae.metrics import spliced_ce_score

    model, ids, _ = llama_setup  # (its SAEs are edited by the tests above: fit fresh ones)
    jsae = JacobianSparseAutoencoder(gated_of(model, 1), n_components=16, k=4, max_iter=1, random_state=0)
    jsae.fit(mlp_inputs(model, 1, ids))
    default = spliced_ce_score(model, 1, jsae, ids)
    mlp = model.model.layers[1].mlp
    assert spliced_ce_score(model, 1, jsae, ids, module=mlp) == pytest.approx(default, rel=1e-6)
    assert spliced_ce_score(model, 1, jsae, ids, module=(mlp, mlp)) == pytest.approx(default, rel=1e-6)
    other = spliced_ce_score(model, 1, jsae, ids, module=model.model.layers[0].mlp)
    assert other["ce_clean"] == pytest.approx(default["ce_clean"], rel=1e-6)
    assert other["ce_input"] != pytest.approx(default["ce_input"], rel=1e-4)


def test_spliced_ce_score_ignores_masked_targets(llama_setup):
    from sklearn_jsae.metrics import spliced_ce_score

    model, ids, jsae = llama_setup
    short = spliced_ce_score(model, 1, jsae, ids[:, :14])
    padded_ids = ids.copy()
    padded_ids[:, 14:] = 0
    mask = np.ones_like(ids)
    mask[:, 14:] = 0
    padded = spliced_ce_score(model, 1, jsae, padded_ids, attention_mask=mask)
    assert padded["n_tokens"] == short["n_tokens"] == 6 * 13
    for key in ("ce_clean", "ce_zero", "ce_input", "ce_output"):
        assert padded[key] == pytest.approx(short[key], rel=1e-4)


# (a model of the wrong width, fitted on four equal rows, which says so: not what this test is about)
@pytest.mark.filterwarnings(r"ignore:.*\(almost\) (no variance|constant):UserWarning")
def test_spliced_ce_score_rejects_mismatched_inputs(llama_setup):
    from sklearn_jsae.metrics import spliced_ce_score

    model, ids, jsae = llama_setup
    other = JacobianSparseAutoencoder(n_components=8, k=2, max_iter=1).fit(np.zeros((4, 5), dtype=np.float32) + np.arange(5))
    with pytest.raises(ValueError, match="hidden size"):
        spliced_ce_score(model, 1, other, ids)
    with pytest.raises(ValueError, match="2-D"):
        spliced_ce_score(model, 1, jsae, ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        spliced_ce_score(model, 1, jsae, ids, attention_mask=np.ones((2, 2)))


@pytest.fixture(scope="module")
def biased_llama_setup():
    """A tiny LLaMA whose layer-1 MLP has non-zero biases, so f(0) != 0 there, and a JSAE on it."""
    from sklearn_jsae.hf import mlp_of

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.4, mlp_bias=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    mlp = model.model.layers[1].mlp
    if mlp.up_proj.bias is None:  # the config keeps the flag, the MLP ignores it
        pytest.skip(f"LlamaConfig(mlp_bias=True) builds biases from transformers 4.41 "
                    f"(installed: {transformers.__version__})")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # transformers initialises biases to 0, which would make f(0) = 0
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.bias.copy_(torch.randn(proj.bias.shape, generator=g))
    ids = np.random.default_rng(1).integers(0, 48, size=(6, 20))
    X = mlp_inputs(model, 1, ids)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=16, k=4, max_iter=2, random_state=0).fit(X)
    return model, ids, jsae


def mean_next_token_ce(model, ids, **hooks):
    """Mean next-token cross-entropy of ``model`` on ``ids`` (no mask), written out here, with
    ``pre=`` / ``post=`` forward hooks on layer 1's MLP."""
    mlp = model.model.layers[1].mlp
    handles = []
    if "pre" in hooks:
        handles.append(mlp.register_forward_pre_hook(hooks["pre"]))
    if "post" in hooks:
        handles.append(mlp.register_forward_hook(hooks["post"]))
    ids = torch.as_tensor(ids)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
    finally:
        for handle in handles:
            handle.remove()
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    return float(-log_p.gather(-1, ids[:, 1:, None]).mean())


def test_spliced_ce_score_input_baseline_zeroes_the_mlp_input(biased_llama_setup):
    from sklearn_jsae.metrics import spliced_ce_score

    model, ids, jsae = biased_llama_setup
    scores = spliced_ce_score(model, 1, jsae, ids, batch_size=4)
    # the paper's baselines: the input SAE against a zeroed MLP *input* (the MLP computes
    # f(0), not 0 here), the output SAE against a zeroed MLP *output*
    assert abs(scores["ce_zero_input"] - scores["ce_zero"]) > 1e-2
    assert scores["ce_zero_output"] == scores["ce_zero"]
    assert scores["score_input"] == pytest.approx(
        (scores["ce_zero_input"] - scores["ce_input"]) / (scores["ce_zero_input"] - scores["ce_clean"]), rel=1e-12)
    assert scores["score_output"] == pytest.approx(
        (scores["ce_zero"] - scores["ce_output"]) / (scores["ce_zero"] - scores["ce_clean"]), rel=1e-12)
    assert scores["score_mean"] == pytest.approx((scores["score_input"] + scores["score_output"]) / 2, rel=1e-12)
    # the same baselines from hooks written here
    zero_input = mean_next_token_ce(model, ids, pre=lambda module, args: (torch.zeros_like(args[0]),) + args[1:])
    zero_output = mean_next_token_ce(model, ids, post=lambda module, args, output: torch.zeros_like(output))
    assert scores["ce_zero_input"] == pytest.approx(zero_input, rel=1e-5)
    assert scores["ce_zero_output"] == pytest.approx(zero_output, rel=1e-5)
    assert scores["ce_clean"] == pytest.approx(mean_next_token_ce(model, ids), rel=1e-5)
    mlp = model.model.layers[1].mlp
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks


def _smollm2_folder():
    import glob
    import os

    root = os.environ.get("SKLEARN_JSAE_MODELS", os.path.join(os.path.dirname(__file__), "..", ".models"))
    converted = os.path.join(root, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(converted, "model.safetensors")):
        return converted, None
    ggufs = glob.glob(os.path.join(root, "**", "SmolLM2-135M*.gguf"), recursive=True)
    if ggufs:
        return os.path.dirname(ggufs[0]), os.path.basename(ggufs[0])
    pytest.skip("SmolLM2-135M is not installed; run scripts/install_test_models.sh")


@pytest.mark.realmodel
@pytest.mark.slow
def test_spliced_ce_score_on_smollm2(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sklearn_jsae.metrics import spliced_ce_score

    folder, gguf = _smollm2_folder()
    kwargs = {"gguf_file": gguf} if gguf else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    text = ("Python is a high-level, general-purpose programming language. Its design philosophy emphasizes "
            "code readability with the use of significant indentation. Python is dynamically typed and "
            "garbage-collected. It supports multiple programming paradigms, including structured, "
            "object-oriented and functional programming. It is often described as a batteries included "
            "language due to its comprehensive standard library. Guido van Rossum began working on Python "
            "in the late 1980s as a successor to the ABC programming language and first released it in 1991.")
    ids = tokenizer(text, return_tensors="np")["input_ids"][:, :96].reshape(2, 48)
    layer = 0  # deleting this MLP raises SmolLM2's CE from about 2.7 to 12 nats
    X = mlp_inputs(model, layer, ids)
    jsae = JacobianSparseAutoencoder(gated_of(model, layer), n_components=128, k=8, max_iter=10,
                                     batch_size=32, random_state=0).fit(X)
    scores = spliced_ce_score(model, layer, jsae, ids)
    assert scores["ce_zero"] > scores["ce_clean"] + 1.0
    assert 0.0 < scores["score_input"] <= 1.0 + 1e-3
    assert 0.0 < scores["score_output"] <= 1.0 + 1e-3
    d = model.config.hidden_size
    basis = np.vstack([np.eye(d), -np.eye(d)])
    exact = JacobianSparseAutoencoder(gated_of(model, layer), n_components=2 * d, k=2, max_iter=1,
                                      random_state=0).fit(X[:8])
    for sae in (exact.input_sae_, exact.output_sae_):
        set_sae(sae, basis, np.zeros(2 * d), basis, np.zeros(d))
        sae.k = d
    exact_scores = spliced_ce_score(model, layer, exact, ids)
    assert exact_scores["score_input"] == pytest.approx(1.0, abs=1e-2)
    assert exact_scores["score_output"] == pytest.approx(1.0, abs=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda_match_cpu():
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    jsae = fitted(make_mlp(5, 10, 5), X, 12, 3, randomise=False)
    on_cpu = (jacobian_sparsity(jsae, X), fraction_variance_unexplained(jsae, X),
              intervention_agreement(jsae, X, tol=0.05), linearity(jsae, X, n_samples=8, random_state=0))
    jsae.set_params(device="cuda")
    on_gpu = (jacobian_sparsity(jsae, X), fraction_variance_unexplained(jsae, X),
              intervention_agreement(jsae, X, tol=0.05), linearity(jsae, X, n_samples=8, random_state=0))
    for a, b in zip(on_cpu, on_gpu):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            assert np.allclose(list(a.values()), list(b.values()), atol=0.02)
        else:
            assert a == pytest.approx(b, abs=0.02)


# ------------------------------------------------------------------------- argument checking


@pytest.fixture(scope="module")
def small_fit():
    X = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    return fitted(make_mlp(3, 6, 3), X, 6, 2), X


FLAG_CALLS = {
    "normalize": lambda jsae, X, v: jacobian_sparsity(jsae, X, normalize=v),
    "return_matrix": lambda jsae, X, v: global_jacobian_sparsity(jsae, X, return_matrix=v),
    "return_curves": lambda jsae, X, v: linearity(jsae, X, n_samples=2, n_points=3, return_curves=v),
    "return_details": lambda jsae, X, v: intervention_agreement(jsae, X[:2], return_details=v),
}


@pytest.mark.parametrize("name", sorted(FLAG_CALLS))
@pytest.mark.parametrize("value", ["no", "False", None, 0, 1.0])
def test_boolean_flags_refuse_what_is_not_a_bool(small_fit, name, value):
    """A flag was read by truthiness: normalize="no" counted as True."""
    jsae, X = small_fit
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {re.escape(repr(value))}"):
        FLAG_CALLS[name](jsae, X, value)


def test_boolean_flags_take_numpy_bools(small_fit):
    jsae, X = small_fit
    assert jacobian_sparsity(jsae, X, normalize=np.bool_(False)) == jacobian_sparsity(jsae, X, normalize=False)
    assert isinstance(global_jacobian_sparsity(jsae, X, return_matrix=np.bool_(True)), tuple)


@pytest.mark.parametrize("random_state", [-1, 2**32, "a", 1.5])
def test_random_state_errors_name_the_parameter(small_fit, random_state):
    """numpy's "Seed must be between 0 and 2**32 - 1" named neither random_state nor the value."""
    jsae, X = small_fit
    message = rf"random_state must be None, an int in \[0, 2\*\*32 - 1\].*got {re.escape(repr(random_state))}"
    with pytest.raises(ValueError, match=message):
        randomize_mlp(make_mlp(3, 4, 3), random_state=random_state)
    with pytest.raises(ValueError, match=message):
        linearity(jsae, X, n_samples=2, n_points=3, random_state=random_state)


def test_linearity_uses_the_fitted_k_not_a_later_set_params(small_fit):
    """n_pairs=None means k pairs per row: the fitted k, not the constructor parameter that
    set_params changes without a refit."""
    jsae, X = small_fit
    jsae = copy.deepcopy(jsae)
    kwargs = dict(n_samples=4, n_points=5, random_state=0, return_curves=True)
    before, details = linearity(jsae, X, **kwargs)
    assert details["curves"].shape == (4 * 2, 5)
    jsae.set_params(k=3)
    after, details_after = linearity(jsae, X, **kwargs)
    assert after == before
    np.testing.assert_array_equal(details_after["curves"], details["curves"])


@FAST
@given(value=st.one_of(st.integers(-5, 12), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2),
                       st.none()),
       size=st.integers(0, 8))
def test_index_check_accepts_exactly_the_ints_in_range(value, size):
    """The check behind plot_l1_pareto(chosen=) and plot_top_edges(output_latent=): an int in
    [0, size) comes back unchanged; a float or str is refused rather than cast with int()."""
    from sklearn_jsae.metrics._validation import _check_index

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and 0 <= value < size:
        assert _check_index(value, "idx", size, "items") == value
    elif is_int:
        with pytest.raises(ValueError, match=rf"idx={value} is out of range: there are {size} items"):
            _check_index(value, "idx", size, "items")
    else:
        with pytest.raises(TypeError, match=r"idx must be an int \(an index into the"):
            _check_index(value, "idx", size, "items")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), k=st.integers(1, 12), rows=st.integers(1, 6),
       m=st.integers(1, 4), ties=st.booleans())
def test_latent_values_equal_their_dense_mask_twin(seed, n, k, rows, m, ties):
    """latent_values tests membership in the top k on (rows, k, m), not on an (rows, n) mask (which
    doubled a sweep batch's memory at 65,536 latents); the same values, ties included."""
    from sklearn_jsae._backend.metrics import latent_values
    from sklearn_jsae._backend.sae import SAEParams, pre_activations

    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    params = SAEParams.initialise(n, 3, torch.zeros(3, dtype=torch.float64), g)
    if ties:
        params.W_enc[1::2] = params.W_enc[0]  # equal pre-activations at the top-k boundary
    z = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    latents = torch.randint(0, n, (rows, m), generator=g)
    pre = pre_activations(params, z)
    top = pre.topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, top, True)
    expected = torch.where(mask.gather(1, latents), torch.relu(pre.gather(1, latents)), torch.zeros(()))
    torch.testing.assert_close(latent_values(params, z, k, latents), expected, rtol=0, atol=0)


def test_sweep_curves_do_not_depend_on_the_rows_per_batch():
    from sklearn_jsae._backend.metrics import sweep_curves
    from sklearn_jsae._backend.sae import SAEParams

    g = torch.Generator().manual_seed(0)
    d, n, P, M = 5, 30, 7, 9
    mlp = ElementwiseMLP(torch.randn(d, 11, generator=g), torch.randn(11, generator=g),
                         torch.randn(11, d, generator=g), None, "gelu")
    px, py = (SAEParams.initialise(n, d, torch.zeros(d), g) for _ in range(2))
    x = torch.randn(P, d, generator=g).numpy()
    args = (mlp, px, py, 4, x, np.ones(P, dtype=np.float32), np.arange(P) % n, (np.arange(P) * 3) % n,
            np.tile(np.linspace(0, 5, M, dtype=np.float32), (P, 1)))
    reference = sweep_curves(*args, max_rows=M * P)
    assert reference.shape == (P, M) and (reference > 0).any()
    for rows in (1, M, 2 * M + 1, None):  # the same curves, up to the rounding of products of other sizes
        np.testing.assert_allclose(sweep_curves(*args, max_rows=rows), reference, rtol=1e-6, atol=1e-6)

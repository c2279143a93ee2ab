"""(values, indices) -> SciPy conversions and the SAE's sparse fast paths against plain twins."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sklearn_jsae._backend.sae import SAEParams, active_values, decode, decode_dense, encode, pre_activations
from sklearn_jsae._sparse import AbsJacobianSum, blocks_to_coo, topk_to_csr


@st.composite
def topk_codes(draw):
    n, n_columns = draw(st.integers(1, 8)), draw(st.integers(1, 12))
    k = draw(st.integers(1, n_columns))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(n_columns)[:k] for _ in range(n)])
    values = np.maximum(rng.normal(size=(n, k)), 0).astype(np.float32)  # ReLU: some exact zeros
    return values, indices, n_columns


@settings(max_examples=50, deadline=None)
@given(codes=topk_codes())
def test_topk_to_csr_is_canonical_and_matches_dense_scatter(codes):
    values, indices, n_columns = codes
    csr = topk_to_csr(values, indices, n_columns)
    dense = np.zeros((values.shape[0], n_columns), dtype=np.float32)
    np.put_along_axis(dense, indices, values, axis=1)
    np.testing.assert_array_equal(csr.toarray(), dense)
    assert csr.has_canonical_format
    for row in range(csr.shape[0]):
        cols = csr.indices[csr.indptr[row]:csr.indptr[row + 1]]
        assert np.all(np.diff(cols) > 0)
    assert np.diff(csr.indptr).max() <= indices.shape[1]
    assert np.all(csr.data != 0)


@settings(max_examples=30, deadline=None)
@given(
    J=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3)),
             elements=st.floats(-3, 3, width=32)),
    seed=st.integers(0, 1000),
)
def test_jacobian_blocks_to_coo_and_running_mean(J, seed):
    rng = np.random.default_rng(seed)
    B, k_out, k_in = J.shape
    n_out, n_in = 6, 7
    idx_out = np.stack([rng.permutation(n_out)[:k_out] for _ in range(B)])
    idx_in = np.stack([rng.permutation(n_in)[:k_in] for _ in range(B)])
    dense = np.zeros((B, n_out, n_in), dtype=np.float32)
    for t in range(B):
        dense[t][np.ix_(idx_out[t], idx_in[t])] = J[t]
    coo = blocks_to_coo([(J[:2], idx_out[:2], idx_in[:2]), (J[2:], idx_out[2:], idx_in[2:])], (B, n_out, n_in))
    np.testing.assert_array_equal(coo.toarray(), dense)
    # the dense accumulator, and the sparse one flushing at every add, at some, or only at the end
    for limit, flush in ((1 << 20, 1), (0, 1), (0, 3), (0, 1 << 22)):
        total = AbsJacobianSum(n_out, n_in, dense_limit=limit, flush_entries=flush)
        for t in range(B):
            total.add(J[t:t + 1], idx_out[t:t + 1], idx_in[t:t + 1])
        np.testing.assert_allclose(total.mean().toarray(), np.abs(dense).mean(0), rtol=1e-6, atol=1e-7)
        assert total.mean().nnz == np.count_nonzero(np.abs(dense).mean(0))


def _params(seed, n=10, d=5):
    g = torch.Generator().manual_seed(seed)
    params = SAEParams.initialise(n, d, torch.randn(d, generator=g, dtype=torch.float64), g)
    params.b_enc = torch.randn(n, generator=g, dtype=torch.float64)
    return params


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 10), batch=st.integers(1, 6))
def test_sparse_decode_and_active_values_equal_plain_twins(seed, k, batch):
    params = _params(seed)
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    values, indices = encode(params, x, k)
    assert values.shape == indices.shape == (batch, k) and bool((values >= 0).all())
    torch.testing.assert_close(decode(params, values, indices), decode_dense(params, values, indices))
    dense_pre = pre_activations(params, x)
    torch.testing.assert_close(active_values(params, x, indices), torch.relu(dense_pre.gather(1, indices)))
    # the kept latents are the k largest pre-activations
    assert bool((dense_pre.gather(1, indices).min(1).values >= dense_pre.topk(k).values.min(1).values).all())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-4, 1e-1))
def test_adam_matches_torch_optim_adam(seed, lr):
    from sklearn_jsae._backend.optim import Adam

    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    opt_ours, opt_theirs = Adam(ours, lr=lr), torch.optim.Adam(theirs, lr=lr, betas=(0.9, 0.999))
    for step in range(4):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            (params[0].sin().sum() * (step + 1) + params[1].pow(2).sum()).backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

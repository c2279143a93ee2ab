"""Every fast path of the training step equals its plain twin.

Each test draws random float64 problems with hypothesis and compares the fast path
with the plain implementation next to it, values and gradients, within
``rtol=1e-9, atol=1e-10`` (float64 rounding of differently ordered sums).  The fast
paths are chunked; the tests force many small chunks and one big one.

===============================================  ==================================================
fast path                                        plain twin
===============================================  ==================================================
``jacobian.jacobian_penalty`` (fused, chunked,    ``jacobian.jacobian_penalty_reference``
gradient formed in the forward pass)              (``jacobian_blocks(...).abs().sum((1, 2)).mean()``)
``jacobian.jacobian_blocks`` without autograd     ``jacobian_blocks`` with autograd (one batched
(chunked, reused buffers)                         product) and ``jacobian_blocks_reference``
``sae.encode_with_grad`` (hand-written backward)  ``select_topk`` + ``sae.active_values``
``sae.active_values_from_pre``                    ``sae.active_values``
``sae.decode`` (``embedding_bag``, sort-free     ``sae.decode_dense`` (scatter + dense matmul)
backward)
``jacobian.unique_inverse`` (presence mask)       ``torch.unique(return_inverse=True)``
``chunks.run_chunks`` on 1, 2 and 3 threads       the same loop on the calling thread
``jacobian.map_and_local_weights``                ``mlp(x)``, ``mlp.local_weights(x)``
``step.jsae_step_losses`` (all of the above)      the same loss assembled from the plain twins
===============================================  ==================================================

GPU variants (``@pytest.mark.gpu``) rerun the pins on CUDA and skip without it.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import sklearn_jsae._backend.sae as sae_module
from sklearn_jsae._backend.chunks import add_rows_, run_chunks
from sklearn_jsae._backend.jacobian import (
    jacobian_blocks,
    jacobian_blocks_reference,
    jacobian_penalty,
    jacobian_penalty_reference,
    map_and_local_weights,
    unique_inverse,
)
from sklearn_jsae._backend.mlp import ACTIVATIONS, AffineMap, CallableMap, ElementwiseMLP, GatedMLP
from sklearn_jsae._backend.sae import (
    SAEParams,
    active_values,
    active_values_from_pre,
    decode,
    decode_dense,
    encode_with_grad,
    pre_activations,
    select_topk,
)
from sklearn_jsae._backend.step import jsae_step_losses

TOL = dict(rtol=1e-9, atol=1e-10)
F64 = torch.float64
KINDS = ("elementwise", "gated", "affine", "identity", "callable")

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _map(kind, d_in, d_out, d_mlp, activation, g, device="cpu"):
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    if kind == "elementwise":
        mlp = ElementwiseMLP(r(d_in, d_mlp) / math.sqrt(d_in), r(d_mlp), r(d_mlp, d_out) / math.sqrt(d_mlp),
                             r(d_out), activation)
    elif kind == "gated":
        mlp = GatedMLP(r(d_in, d_mlp), r(d_in, d_mlp), r(d_mlp, d_out), r(d_mlp), None, r(d_out),
                       activation=activation)
    elif kind == "affine":
        mlp = AffineMap(d_in, r(d_in, d_out), r(d_out))
    elif kind == "identity":
        mlp = AffineMap(d_in)
    else:
        W = r(d_in, d_out)
        mlp = CallableMap(lambda v: torch.tanh(v @ W.to(v.device)), d_in, d_out)
    return mlp.to(device=device, dtype=F64)


def _indices(n, k, batch, g):
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])


def _sae(n, d, g, device="cpu"):
    params = SAEParams.initialise(n, d, torch.randn(d, generator=g, dtype=F64), g)
    params.W_enc += 0.5 * torch.randn(n, d, generator=g, dtype=F64)  # encoder no longer the decoder
    params.b_enc += torch.randn(n, generator=g, dtype=F64)
    return params.to(device).requires_grad_()


problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    d_mlp=st.integers(1, 8),
    n_in=st.integers(4, 12),
    n_out=st.integers(4, 12),
    k=st.integers(1, 4),
    batch=st.integers(1, 9),
    kind=st.sampled_from(KINDS),
    activation=st.sampled_from(ACTIVATIONS),
    chunk_elements=st.sampled_from([1, 7, 64, 1 << 20]),
))


def _penalty_case(p, device="cpu"):
    g = torch.Generator().manual_seed(p["seed"])
    if p["kind"] == "identity":
        p = dict(p, d_out=p["d_in"])
    mlp = _map(p["kind"], p["d_in"], p["d_out"], p["d_mlp"], p["activation"], g, device)
    x = (torch.randn(p["batch"], p["d_in"], generator=g, dtype=F64) * 2).to(device)
    W_dec = torch.randn(p["n_in"], p["d_in"], generator=g, dtype=F64).to(device).requires_grad_()
    W_enc = torch.randn(p["n_out"], p["d_out"], generator=g, dtype=F64).to(device).requires_grad_()
    k = min(p["k"], p["n_in"], p["n_out"])
    idx_x = _indices(p["n_in"], k, p["batch"], g).to(device)
    idx_y = _indices(p["n_out"], k, p["batch"], g).to(device)
    return mlp, x, W_dec, idx_x, W_enc, idx_y


def _check_penalty_matches_reference(p, device="cpu"):
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p, device)
    _, weights = map_and_local_weights(mlp, x)
    fast = jacobian_penalty(mlp, x, W_dec, idx_x, W_enc, idx_y, weights=weights,
                            chunk_elements=p["chunk_elements"])
    plain = jacobian_penalty_reference(mlp, x, W_dec, idx_x, W_enc, idx_y)
    torch.testing.assert_close(fast, plain, **TOL)
    fast_grads = torch.autograd.grad(2.5 * fast, (W_dec, W_enc))
    plain_grads = torch.autograd.grad(2.5 * plain, (W_dec, W_enc))
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, **TOL)
    return fast_grads


@settings(max_examples=60, deadline=None)
@given(p=problems)
def test_fused_penalty_equals_plain_autograd_value_and_gradients(p):
    _check_penalty_matches_reference(p)


def test_fused_penalty_gradient_reaches_only_active_rows():
    p = dict(seed=3, d_in=5, d_out=4, d_mlp=7, n_in=12, n_out=10, k=2, batch=3, kind="elementwise",
             activation="gelu", chunk_elements=16)
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p)
    grad_dec, grad_enc = torch.autograd.grad(jacobian_penalty(mlp, x, W_dec, idx_x, W_enc, idx_y), (W_dec, W_enc))
    for grad, idx in ((grad_dec, idx_x), (grad_enc, idx_y)):
        active = torch.zeros(grad.shape[0], dtype=torch.bool)
        active[idx.unique()] = True
        assert grad[~active].abs().sum() == 0
        assert (grad[active].abs().sum(1) > 0).all()


def test_fused_penalty_is_the_mean_over_samples_of_the_block_l1_norm():
    p = dict(seed=5, d_in=4, d_out=4, d_mlp=6, n_in=9, n_out=9, k=3, batch=5, kind="gated",
             activation="silu", chunk_elements=10)
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p)
    blocks = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc, idx_y).detach()
    expected = sum(blocks[t].abs().sum() for t in range(5)) / 5
    torch.testing.assert_close(jacobian_penalty(mlp, x, W_dec, idx_x, W_enc, idx_y).detach(), expected, **TOL)


@settings(max_examples=40, deadline=None)
@given(p=problems)
def test_chunked_inference_blocks_equal_batched_autograd_blocks_and_reference(p):
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p)
    with torch.no_grad():
        chunked = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc, idx_y, chunk_elements=p["chunk_elements"])
    batched = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc, idx_y)  # W_dec requires grad: batched path
    assert batched.requires_grad and not chunked.requires_grad
    torch.testing.assert_close(chunked, batched.detach(), **TOL)
    torch.testing.assert_close(chunked, jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc, idx_y).detach(),
                               **TOL)


sae_problems = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 16),
    d=st.integers(1, 7),
    k=st.integers(1, 6),
    batch=st.integers(1, 11),
    chunk_elements=st.sampled_from([1, 9, 1 << 20]),
    zero_some=st.booleans(),
))


def _check_encode_matches_reference(p, device="cpu", monkeypatch=None):
    g = torch.Generator().manual_seed(p["seed"])
    k = min(p["k"], p["n"])
    params = _sae(p["n"], p["d"], g, device)
    x = torch.randn(p["batch"], p["d"], generator=g, dtype=F64).to(device).requires_grad_()
    if p["zero_some"]:  # pre-activations at exactly 0 are kept but give ReLU gradient 0 on both paths
        with torch.no_grad():
            params.b_enc[: p["n"] // 2] = 0.0
            params.W_enc[: p["n"] // 2] = 0.0
    upstream = torch.randn(p["batch"], k, generator=g, dtype=F64).to(device)
    values, indices, pre = encode_with_grad(params, x, k)
    plain_indices = select_topk(pre_activations(params, x).detach(), k)
    assert torch.equal(indices, plain_indices)
    plain_values = active_values(params, x, plain_indices)
    torch.testing.assert_close(values, plain_values, **TOL)
    torch.testing.assert_close(pre, pre_activations(params, x).detach(), **TOL)
    wrt = (params.W_enc, params.b_enc, params.b_dec, x)
    fast = torch.autograd.grad((values * upstream).sum(), wrt)
    plain = torch.autograd.grad((plain_values * upstream).sum(), wrt)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, **TOL)
    # the aux path: other index sets read from the same pre-activations
    other = select_topk(-pre, k)
    fast_other = active_values_from_pre(params, x, other, pre)
    plain_other = active_values(params, x, other)
    torch.testing.assert_close(fast_other, plain_other, **TOL)
    for a, b in zip(torch.autograd.grad(fast_other.sum(), wrt), torch.autograd.grad(plain_other.sum(), wrt)):
        torch.testing.assert_close(a, b, **TOL)


@settings(max_examples=60, deadline=None)
@given(p=sae_problems)
def test_encode_with_grad_equals_topk_then_active_values_under_autograd(p):
    saved = sae_module._CPU_CHUNK_ELEMENTS
    sae_module._CPU_CHUNK_ELEMENTS = p["chunk_elements"]
    try:
        _check_encode_matches_reference(p)
    finally:
        sae_module._CPU_CHUNK_ELEMENTS = saved


@settings(max_examples=40, deadline=None)
@given(p=sae_problems)
def test_sparse_decode_equals_dense_decode_value_and_gradients(p):
    g = torch.Generator().manual_seed(p["seed"])
    k = min(p["k"], p["n"])
    params = _sae(p["n"], p["d"], g)
    values = torch.randn(p["batch"], k, generator=g, dtype=F64).relu().requires_grad_()
    indices = _indices(p["n"], k, p["batch"], g)
    upstream = torch.randn(p["batch"], p["d"], generator=g, dtype=F64)
    sparse = decode(params, values, indices)
    dense = decode_dense(params, values, indices)
    torch.testing.assert_close(sparse, dense, **TOL)
    wrt = (params.W_dec, params.b_dec, values)
    for a, b in zip(torch.autograd.grad((sparse * upstream).sum(), wrt),
                    torch.autograd.grad((dense * upstream).sum(), wrt)):
        torch.testing.assert_close(a, b, **TOL)


@settings(max_examples=30, deadline=None)
@given(p=problems)
def test_map_and_local_weights_equal_forward_and_local_weights(p):
    mlp, x, *_ = _penalty_case(p)
    y, weights = map_and_local_weights(mlp, x)
    torch.testing.assert_close(y, mlp(x), **TOL)
    if isinstance(mlp, (ElementwiseMLP, GatedMLP)):
        torch.testing.assert_close(weights, mlp.local_weights(x), **TOL)
    else:
        assert weights is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), batch=st.integers(0, 8), k=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_unique_inverse_equals_torch_unique(n, batch, k, seed):
    indices = torch.randint(0, n, (batch, k), generator=torch.Generator().manual_seed(seed))
    unique, inverse = unique_inverse(indices, n)
    expected_unique, expected_inverse = torch.unique(indices, return_inverse=True)
    assert torch.equal(unique, expected_unique)
    assert torch.equal(inverse, expected_inverse)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_chunks_on_threads_equals_serial_loop_and_restores_thread_count(threads):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 4, generator=g, dtype=F64)
    rows = torch.randint(0, 7, (50,), generator=g)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        states = run_chunks(50, 6, lambda: torch.zeros(7, 4, dtype=F64),
                            lambda acc, a, b: add_rows_(acc, rows[a:b], src[a:b]), "cpu")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert len(states) == min(threads, 9)
    expected = torch.zeros(7, 4, dtype=F64)
    for i in range(50):
        expected[rows[i]] += src[i]
    torch.testing.assert_close(sum(states[1:], states[0]), expected, **TOL)


def test_run_chunks_reraises_a_workers_error():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)

    def work(state, start, stop):
        if start == 3:
            raise ValueError("chunk 3 failed")

    try:
        with pytest.raises(ValueError, match="chunk 3 failed"):
            run_chunks(10, 3, dict, work, "cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def _plain_step_losses(side_x, side_y, mlp, x, k, l1, penalty_norm, dead, aux_coef, aux_k, penalty="paper"):
    """The step's loss from the plain twins only (dense decode, autograd everywhere; the unit-gain
    penalty divides each block's rows by the encoder-row norms after forming it)."""
    def side(params, v, dead_mask, aux_k_side):
        pre = pre_activations(params, v).detach()
        indices = select_topk(pre, k)
        values = active_values(params, v, indices)
        v_hat = decode_dense(params, values, indices)
        mse = F.mse_loss(v_hat, v)
        aux = v.new_zeros(())
        if aux_coef > 0 and dead_mask is not None and dead_mask.any():
            aux_idx = select_topk(pre.masked_fill(~dead_mask, -math.inf), min(aux_k_side, int(dead_mask.sum())))
            residual = (v - v_hat).detach()
            recon = decode_dense(params, active_values(params, v, aux_idx), aux_idx) - params.b_dec
            aux = F.mse_loss(recon, residual) / residual.pow(2).mean().clamp_min(1e-12)
        return mse, aux, indices

    mse_x, aux_x, idx_x = side(side_x, x, dead[0], aux_k[0])
    with torch.no_grad():
        y = mlp(x)
    mse_y, aux_y, idx_y = side(side_y, y, dead[1], aux_k[1])
    loss = mse_x + mse_y + aux_coef * (aux_x + aux_y)
    if l1 is not None:
        J = jacobian_blocks_reference(mlp, x, side_x.W_dec, idx_x, side_y.W_enc, idx_y)
        if penalty == "unit_gain":
            J = J / side_y.W_enc.norm(dim=1)[idx_y].unsqueeze(2)
        loss = loss + l1 * penalty_norm * J.abs().sum((1, 2)).mean()
    return loss


@settings(max_examples=30, deadline=None)
@given(p=problems, l1=st.sampled_from([None, 0.0, 0.7]), aux=st.booleans(),
       penalty=st.sampled_from(["paper", "unit_gain"]))
def test_step_losses_equal_the_plain_step_value_and_gradients(p, l1, aux, penalty):
    if p["kind"] == "identity":
        p = dict(p, d_out=p["d_in"])
    g = torch.Generator().manual_seed(p["seed"] + 1)
    mlp = _map(p["kind"], p["d_in"], p["d_out"], p["d_mlp"], p["activation"], g)
    side_x, side_y = _sae(p["n_in"], p["d_in"], g), _sae(p["n_out"], p["d_out"], g)
    x = torch.randn(p["batch"], p["d_in"], generator=g, dtype=F64)
    k = min(p["k"], p["n_in"], p["n_out"])
    dead = (torch.rand(p["n_in"], generator=g) < 0.5, torch.rand(p["n_out"], generator=g) < 0.5)
    aux_coef, aux_k = (0.25, (3, 2)) if aux else (0.0, (0, 0))
    fast, terms, fired = jsae_step_losses(side_x, side_y, mlp, x, k, l1=l1, penalty_norm=0.3, dead=dead,
                                          aux_coef=aux_coef, aux_k=aux_k, penalty=penalty)
    plain = _plain_step_losses(side_x, side_y, mlp, x, k, l1, 0.3, dead, aux_coef, aux_k, penalty)
    torch.testing.assert_close(fast, plain, **TOL)
    assert ("jacobian_l1" in terms) == (l1 is not None)
    assert [i.shape for i, _ in fired] == [(p["batch"], k)] * 2
    wrt = side_x.tensors() + side_y.tensors()
    fast_grads = torch.autograd.grad(fast, wrt, allow_unused=True)
    plain_grads = torch.autograd.grad(plain, wrt, allow_unused=True)
    for a, b in zip(fast_grads, plain_grads):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


def test_single_sae_step_has_no_output_terms():
    g = torch.Generator().manual_seed(0)
    side_x = _sae(8, 3, g)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    loss, terms, fired = jsae_step_losses(side_x, None, None, x, 2)
    assert set(terms) == {"mse_input", "aux_input"} and len(fired) == 1
    torch.testing.assert_close(loss, terms["mse_input"], **TOL)


def _autocast_case(device):
    p = dict(seed=0, d_in=64, d_out=64, d_mlp=256, n_in=512, n_out=512, k=16, batch=300, kind="elementwise",
             activation="gelu", chunk_elements=1 << 14)
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p)
    cast = lambda t: t.detach().float().to(device)
    mlp32 = mlp.to(device=device, dtype=torch.float32)
    W_dec32, W_enc32 = cast(W_dec).requires_grad_(), cast(W_enc).requires_grad_()
    args = (mlp32, cast(x), W_dec32, idx_x.to(device), W_enc32, idx_y.to(device))
    expected = jacobian_penalty_reference(*args)
    expected_grads = torch.autograd.grad(expected, (W_dec32, W_enc32))
    with torch.autocast(device, dtype=torch.bfloat16):
        got = jacobian_penalty(*args, chunk_elements=p["chunk_elements"])
    grads = torch.autograd.grad(got, (W_dec32, W_enc32))
    return got, grads, expected, expected_grads


def test_fused_penalty_under_bfloat16_autocast_stays_close_to_float32():
    """bf16 operands: the value within 1%, the gradients within 10% in norm (sign flips of tiny
    entries and bf16 rounding), gradients returned in the parameters' float32."""
    got, grads, expected, expected_grads = _autocast_case("cpu")
    assert abs(got.item() - expected.item()) < 1e-2 * abs(expected.item())
    assert got.dtype == torch.float32  # summed in float64, not rounded to bf16 on the way out
    for a, b in zip(grads, expected_grads):
        assert a.dtype == torch.float32
        assert (a - b).norm() < 0.1 * b.norm()


def test_step_losses_run_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(0)
    mlp = _map("elementwise", 16, 16, 32, "gelu", g).float()
    side_x, side_y = _sae(64, 16, g).to(dtype=torch.float32), _sae(64, 16, g).to(dtype=torch.float32)
    for side in (side_x, side_y):
        side.requires_grad_()
    x = torch.randn(40, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms, _ = jsae_step_losses(side_x, side_y, mlp, x, 4, l1=0.5, penalty_norm=0.1,
                                          dead=(torch.ones(64, dtype=torch.bool),) * 2, aux_coef=0.1, aux_k=(8, 8))
    grads = torch.autograd.grad(loss, side_x.tensors() + side_y.tensors())
    assert torch.isfinite(loss) and terms["jacobian_l1"] > 0
    assert all(gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)


# ---- the same pins on CUDA ------------------------------------------------------------
@gpu
@needs_cuda
@settings(max_examples=15, deadline=None)
@given(p=problems)
def test_gpu_fused_penalty_equals_plain_autograd(p):
    _check_penalty_matches_reference(p, device="cuda")


@gpu
@needs_cuda
@settings(max_examples=15, deadline=None)
@given(p=sae_problems)
def test_gpu_encode_with_grad_equals_plain_autograd(p):
    saved = sae_module._ACCELERATOR_CHUNK_ELEMENTS
    sae_module._ACCELERATOR_CHUNK_ELEMENTS = p["chunk_elements"]
    try:
        _check_encode_matches_reference(p, device="cuda")
    finally:
        sae_module._ACCELERATOR_CHUNK_ELEMENTS = saved


@gpu
@needs_cuda
def test_gpu_fused_penalty_under_bfloat16_autocast_stays_close_to_float32():
    got, grads, expected, expected_grads = _autocast_case("cuda")
    assert abs(got.item() - expected.item()) < 1e-2 * abs(expected.item())
    for a, b in zip(grads, expected_grads):
        assert a.dtype == torch.float32
        assert (a - b).norm() < 0.1 * b.norm()


@gpu
@needs_cuda
def test_gpu_float32_penalty_matches_cpu_float64_reference():
    p = dict(seed=11, d_in=64, d_out=48, d_mlp=256, n_in=512, n_out=384, k=16, batch=300, kind="elementwise",
             activation="gelu", chunk_elements=1 << 20)
    mlp, x, W_dec, idx_x, W_enc, idx_y = _penalty_case(p)
    expected = jacobian_penalty_reference(mlp, x, W_dec, idx_x, W_enc, idx_y)
    expected_grads = torch.autograd.grad(expected, (W_dec, W_enc))
    on_gpu = [t.detach().float().cuda() for t in (x, W_dec, W_enc)]
    W_dec32, W_enc32 = on_gpu[1].requires_grad_(), on_gpu[2].requires_grad_()
    mlp32 = mlp.to(device="cuda", dtype=torch.float32)
    got = jacobian_penalty(mlp32, on_gpu[0], W_dec32, idx_x.cuda(), W_enc32, idx_y.cuda())
    grads = torch.autograd.grad(got, (W_dec32, W_enc32))
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-3, atol=1e-4)

"""Gated (LLaMA-style) MLPs: the closed-form Jacobian equals autograd, values and gradients.

``y = (act(x W_g + b_g) ⊙ (x W_u + b_u)) W_d + b_d`` has, in the column convention of
PAPER.md, ``J_f = W_d^T [diag(act'(g) ⊙ u) W_g^T + diag(act(g)) W_u^T]``.  These tests pin
that formula, the library's fast block contraction built on it, and its gradients (the
quantities training uses) to torch autograd in float64 over random shapes.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae._backend.jacobian import jacobian_blocks, jacobian_blocks_reference
from sklearn_jsae._backend.mlp import activation_derivative
from sklearn_jsae.mlp import ACTIVATIONS, GatedMLP

F64 = torch.float64

cases = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**31 - 1),
        d_in=st.integers(1, 7),
        d_mlp=st.integers(1, 9),
        d_out=st.integers(1, 7),
        n_in=st.integers(1, 10),
        n_out=st.integers(1, 10),
        batch=st.integers(1, 5),
        k=st.integers(1, 4),
        biases=st.booleans(),
        activation=st.sampled_from(ACTIVATIONS),
    )
)


def _gated(case, g):
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    d_in, d_mlp, d_out = case["d_in"], case["d_mlp"], case["d_out"]
    biases = (rand(d_mlp), rand(d_mlp), rand(d_out)) if case["biases"] else (None, None, None)
    return GatedMLP(
        rand(d_in, d_mlp) / d_in**0.5,
        rand(d_in, d_mlp) / d_in**0.5,
        rand(d_mlp, d_out) / d_mlp**0.5,
        *biases,
        activation=case["activation"],
    )


def _sae_case(case, g):
    """Inputs, an input-SAE decoder and an output-SAE encoder, and active index sets.

    Indices are drawn with replacement, so a latent can repeat within a sample and across
    samples: the fast path's per-distinct-latent sharing must still give every block.
    """
    batch, k = case["batch"], case["k"]
    x = 2 * torch.randn(batch, case["d_in"], generator=g, dtype=F64)
    W_dec_x = torch.randn(case["n_in"], case["d_in"], generator=g, dtype=F64)
    W_enc_y = torch.randn(case["n_out"], case["d_out"], generator=g, dtype=F64)
    idx_x = torch.randint(0, case["n_in"], (batch, k), generator=g)
    idx_y = torch.randint(0, case["n_out"], (batch, k), generator=g)
    return x, W_dec_x, idx_x, W_enc_y, idx_y


def _paper_jacobian(mlp, x_row):
    """J_f (d_out, d_in) = W_d^T [diag(act'(g) ⊙ u) W_g^T + diag(act(g)) W_u^T], written out."""
    g = x_row @ mlp.W_gate + (0 if mlp.b_gate is None else mlp.b_gate)
    u = x_row @ mlp.W_up + (0 if mlp.b_up is None else mlp.b_up)
    from sklearn_jsae._backend.mlp import activation

    inner = torch.diag(activation_derivative(mlp.activation, g) * u) @ mlp.W_gate.T
    inner = inner + torch.diag(activation(mlp.activation, g)) @ mlp.W_up.T
    return mlp.W_down.T @ inner


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_paper_closed_form_equals_jacrev_of_gated_forward(case):
    g = torch.Generator().manual_seed(case["seed"])
    mlp = _gated(case, g)
    x = 2 * torch.randn(case["batch"], case["d_in"], generator=g, dtype=F64)
    for row in x:
        autograd = jacrev(lambda r: mlp(r.unsqueeze(0)).squeeze(0))(row)
        assert autograd.shape == (case["d_out"], case["d_in"])
        torch.testing.assert_close(_paper_jacobian(mlp, row), autograd, rtol=1e-10, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_gated_jacobian_blocks_equal_autograd_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    mlp = _gated(case, g)
    args = _sae_case(case, g)
    fast = jacobian_blocks(mlp, *args)
    reference = jacobian_blocks_reference(mlp, *args)
    assert fast.shape == (case["batch"], case["k"], case["k"])
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_gated_jacobian_blocks_equal_jacrev_through_plain_function(case):
    """The same blocks from jacrev of a hand-written gated function (not the GatedMLP module)."""
    g = torch.Generator().manual_seed(case["seed"])
    mlp = _gated(case, g)
    x, W_dec_x, idx_x, W_enc_y, idx_y = _sae_case(case, g)
    act = {
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    }[case["activation"]]

    def plain(row):
        gate, up = row @ mlp.W_gate, row @ mlp.W_up
        if mlp.b_gate is not None:
            gate, up = gate + mlp.b_gate, up + mlp.b_up
        y = (act(gate) * up) @ mlp.W_down
        return y if mlp.b_down is None else y + mlp.b_down

    fast = jacobian_blocks(mlp, x, W_dec_x, idx_x, W_enc_y, idx_y)
    for t in range(x.shape[0]):
        J_f = jacrev(plain)(x[t])
        expected = W_enc_y[idx_y[t]] @ J_f @ W_dec_x[idx_x[t]].T
        torch.testing.assert_close(fast[t], expected, rtol=1e-9, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(case=cases)
def test_gated_penalty_gradients_equal_autograd_reference(case):
    """Training differentiates mean |J| w.r.t. W_dec_x and W_enc_y: those gradients must match too."""
    g = torch.Generator().manual_seed(case["seed"])
    mlp = _gated(case, g)
    x, W_dec_x, idx_x, W_enc_y, idx_y = _sae_case(case, g)
    grads = []
    for fn in (jacobian_blocks, jacobian_blocks_reference):
        dec, enc = W_dec_x.clone().requires_grad_(), W_enc_y.clone().requires_grad_()
        fn(mlp, x, dec, idx_x, enc, idx_y).abs().mean().backward()
        grads.append((dec.grad, enc.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-8, atol=1e-10)


def test_gated_forward_matches_llama_formula_and_rescaling():
    g = torch.Generator().manual_seed(0)
    W_gate, W_up, W_down = (
        torch.randn(6, 10, generator=g),
        torch.randn(6, 10, generator=g),
        torch.randn(10, 5, generator=g),
    )
    mlp = GatedMLP(W_gate, W_up, W_down)
    x = torch.randn(7, 6, generator=g)
    expected = (torch.nn.functional.silu(x @ W_gate) * (x @ W_up)) @ W_down
    torch.testing.assert_close(mlp(x), expected)
    assert (mlp.d_in, mlp.d_mlp, mlp.d_out) == (6, 10, 5)
    # the backend trains on rescaled data: f'(x') = f(a x') / c must hold exactly
    scaled = mlp.rescaled(2.5, 4.0)
    torch.testing.assert_close(scaled(x), mlp(2.5 * x) / 4.0)
    assert list(mlp.buffers()) and not list(mlp.parameters())  # frozen: nothing for an optimiser


def test_jsae_with_gated_mlp_matches_the_autograd_path():
    """Same seed, same data: the closed form and the generic autograd path train the same model."""
    g = torch.Generator().manual_seed(1)
    mlp = GatedMLP(
        torch.randn(8, 16, generator=g) / 8**0.5,
        torch.randn(8, 16, generator=g) / 8**0.5,
        torch.randn(16, 8, generator=g) / 4,
    )
    X = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
    settings_ = dict(n_components=24, k=3, l1=1.0, max_iter=2, batch_size=32, random_state=0)
    closed = JacobianSparseAutoencoder(mlp=mlp, **settings_).fit(X)
    generic = JacobianSparseAutoencoder(mlp=lambda x: mlp(x), **settings_).fit(X)
    J_closed = closed.jacobian(X[:10]).todense()
    J_generic = generic.jacobian(X[:10]).todense()
    assert np.abs(J_closed).sum() > 0
    np.testing.assert_allclose(J_closed, J_generic, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(closed.mlp_outputs(X), mlp(torch.from_numpy(X)).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["quick_gelu", "swish"])
def test_gated_rejects_unknown_activation(activation):
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=f"activation='{activation}' is not supported"):
        GatedMLP(w, w, torch.zeros(3, 2), activation=activation)

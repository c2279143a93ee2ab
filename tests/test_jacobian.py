"""The fast Jacobian equals torch autograd, for every activation and for the JVP path."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae._backend.jacobian import jacobian_blocks, jacobian_blocks_reference
from sklearn_jsae._backend.mlp import ACTIVATIONS, AffineMap, CallableMap, ElementwiseMLP, GatedMLP

torch.set_default_dtype(torch.float32)


def _random_case(seed, d_in, d_out, d_mlp, n_in, n_out, k, batch):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(batch, d_in, **f64) * 2
    W_dec = torch.randn(n_in, d_in, **f64)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc_y = torch.randn(n_out, d_out, **f64)
    idx_x = torch.stack([torch.randperm(n_in, generator=g)[:k] for _ in range(batch)])
    idx_y = torch.stack([torch.randperm(n_out, generator=g)[:k] for _ in range(batch)])
    weights = dict(
        W_in=torch.randn(d_in, d_mlp, **f64) / d_in**0.5,
        b_in=torch.randn(d_mlp, **f64),
        W_out=torch.randn(d_mlp, d_out, **f64) / d_mlp**0.5,
        b_out=torch.randn(d_out, **f64),
    )
    return x, W_dec, idx_x, W_enc_y, idx_y, weights


shapes = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**31 - 1),
        d_in=st.integers(1, 7),
        d_out=st.integers(1, 7),
        d_mlp=st.integers(1, 9),
        n_in=st.integers(3, 12),
        n_out=st.integers(3, 12),
        batch=st.integers(1, 5),
    )
)


@settings(max_examples=25, deadline=None)
@given(case=shapes, activation=st.sampled_from(ACTIVATIONS), k=st.integers(1, 3))
def test_elementwise_closed_form_equals_autograd(case, activation, k):
    x, W_dec, idx_x, W_enc_y, idx_y, w = _random_case(k=k, **case)
    mlp = ElementwiseMLP(w["W_in"], w["b_in"], w["W_out"], w["b_out"], activation)
    fast = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(case=shapes, activation=st.sampled_from(ACTIVATIONS), k=st.integers(1, 3), biases=st.booleans())
def test_gated_closed_form_equals_autograd(case, activation, k, biases):
    x, W_dec, idx_x, W_enc_y, idx_y, w = _random_case(k=k, **case)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    W_up = torch.randn(w["W_in"].shape, generator=g, dtype=torch.float64)
    mlp = GatedMLP(w["W_in"], W_up, w["W_out"], *(
        (w["b_in"], -w["b_in"], w["b_out"]) if biases else (None, None, None)), activation=activation)
    fast = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(case=shapes, k=st.integers(1, 3), identity=st.booleans())
def test_affine_closed_form_equals_autograd(case, k, identity):
    if identity:
        case["d_out"] = case["d_in"]
    x, W_dec, idx_x, W_enc_y, idx_y, w = _random_case(k=k, **case)
    W = torch.randn(case["d_in"], case["d_out"], dtype=torch.float64)
    mlp = AffineMap(case["d_in"]) if identity else AffineMap(case["d_in"], W, w["b_out"])
    mlp = mlp.to(torch.float64)
    fast = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


class _TwoHiddenLayers(torch.nn.Module):
    """Not of the closed-form shape: exercises the forward-mode JVP path."""

    def __init__(self, d_in, d_mlp, d_out, generator):
        super().__init__()
        self.a = torch.randn(d_in, d_mlp, generator=generator, dtype=torch.float64)
        self.b = torch.randn(d_mlp, d_mlp, generator=generator, dtype=torch.float64) / d_mlp**0.5
        self.c = torch.randn(d_mlp, d_out, generator=generator, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(torch.nn.functional.gelu(x @ self.a) @ self.b) @ self.c + x.sum(1, keepdim=True) ** 2


@settings(max_examples=15, deadline=None)
@given(case=shapes, k=st.integers(1, 3))
def test_jvp_path_equals_autograd(case, k):
    x, W_dec, idx_x, W_enc_y, idx_y, _ = _random_case(k=k, **case)
    module = _TwoHiddenLayers(case["d_in"], case["d_mlp"], case["d_out"], torch.Generator().manual_seed(1))
    mlp = CallableMap(module, case["d_in"], case["d_out"])
    fast = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


def test_gradient_reaches_only_input_decoder_and_output_encoder():
    x, W_dec, idx_x, W_enc_y, idx_y, w = _random_case(0, 4, 5, 6, 8, 9, 3, 4)
    mlp = ElementwiseMLP(w["W_in"], w["b_in"], w["W_out"], w["b_out"], "gelu")
    W_dec.requires_grad_(True)
    W_enc_y.requires_grad_(True)
    fast = jacobian_blocks(mlp, x, W_dec, idx_x, W_enc_y, idx_y).abs().sum()
    ref = jacobian_blocks_reference(mlp, x, W_dec, idx_x, W_enc_y, idx_y).abs().sum()
    fast_grads = torch.autograd.grad(fast, (W_dec, W_enc_y))
    ref_grads = torch.autograd.grad(ref, (W_dec, W_enc_y))
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    inactive = torch.ones(W_dec.shape[0], dtype=torch.bool)
    inactive[idx_x.unique()] = False
    assert fast_grads[0][inactive].abs().sum() == 0
    assert fast_grads[0][~inactive].abs().sum() > 0


def _end_to_end_reference(jsae, x_row):
    """∂ pre_y[I_y] / ∂ s_x[I_x] by autograd through decode -> mlp -> encode, float64."""
    sx, sy = jsae.input_sae_, jsae.output_sae_
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))
    x = t(x_row)
    pre_x = (x - t(sx.decoder_bias_)) @ t(sx.encoder_).T + t(sx.encoder_bias_)
    idx_x = torch.topk(pre_x, jsae.k).indices
    mlp = jsae.mlp_.double() if jsae.mlp_ is not None else (lambda v: v)
    y = mlp(x.unsqueeze(0)).squeeze(0)
    pre_y = (y - t(sy.decoder_bias_)) @ t(sy.encoder_).T + t(sy.encoder_bias_)
    idx_y = torch.topk(pre_y, jsae.k).indices

    def latent_out(delta):  # s_x moved by delta along its active decoder rows, error term held fixed
        x_moved = x + delta @ t(sx.components_)[idx_x]
        y_moved = mlp(x_moved.unsqueeze(0)).squeeze(0)
        return ((y_moved - t(sy.decoder_bias_)) @ t(sy.encoder_).T + t(sy.encoder_bias_))[idx_y]

    J = torch.func.jacrev(latent_out)(torch.zeros(jsae.k, dtype=torch.float64))
    return J.numpy(), idx_y.numpy(), idx_x.numpy()


# LeakyReLU and Softplus have no closed form here: such a Sequential takes the JVP route.
@pytest.mark.parametrize("activation", [torch.nn.GELU(), torch.nn.GELU("tanh"), torch.nn.ReLU(), torch.nn.SiLU(),
                                        torch.nn.LeakyReLU(0.1), torch.nn.Softplus()])
def test_estimator_jacobian_equals_end_to_end_autograd(activation):
    from sklearn_jsae._backend.mlp import as_map

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 20), activation, torch.nn.Linear(20, 5))
    closed_form = not isinstance(activation, (torch.nn.LeakyReLU, torch.nn.Softplus))
    assert isinstance(as_map(mlp, 6, 5), ElementwiseMLP if closed_form else CallableMap)
    X = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=24, n_output_components=20, k=3, max_iter=2,
                                     random_state=0).fit(X)
    J = jsae.jacobian(X[:6]).toarray()
    assert J.shape == (6, 20, 24)
    for t in range(6):
        block, idx_y, idx_x = _end_to_end_reference(jsae, X[t])
        np.testing.assert_allclose(J[t][np.ix_(idx_y, idx_x)], block, rtol=2e-3, atol=2e-5)
        mask = np.zeros_like(J[t], dtype=bool)
        mask[np.ix_(idx_y, idx_x)] = True
        assert not J[t][~mask].any()


class _SquaredReLU(torch.nn.ReLU):
    def forward(self, x):
        return super().forward(x) ** 2


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _ShiftedElementwiseMLP(ElementwiseMLP):
    def forward(self, x):
        return super().forward(x + 0.5)


def _shifted_map():
    g = torch.Generator().manual_seed(0)
    return _ShiftedElementwiseMLP(torch.randn(6, 20, generator=g), None, torch.randn(20, 5, generator=g) / 4,
                                  None, "gelu")


def _forward_on_the_instance():
    """As accelerate's add_hook_to_module does: a new forward set on the module itself."""
    torch.manual_seed(0)
    import types

    linear = torch.nn.Linear(6, 5)
    linear.forward = types.MethodType(lambda self, x: 2 * torch.nn.functional.linear(x, self.weight, self.bias),
                                      linear)
    return linear


def _hooked(where):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    if where == "output":
        mlp.register_forward_hook(lambda module, inputs, output: 3 * output)
    else:
        mlp[0].register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))
    return mlp


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Sequential(torch.nn.Linear(6, 20), _SquaredReLU(), torch.nn.Linear(20, 5)),
    lambda: torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.GELU(), _ScaledLinear(20, 5)),
    lambda: _ScaledLinear(6, 5),
    lambda: _hooked("output"),
    lambda: _hooked("inner input"),
    _shifted_map,
    _forward_on_the_instance,
], ids=["subclassed activation", "subclassed Linear in a Sequential", "subclassed Linear", "hooked Sequential",
        "hooked inner Linear", "subclassed sklearn_jsae.mlp class", "forward set on the instance"])
def test_a_module_whose_forward_is_not_its_class_s_is_run_as_it_computes(make):
    """The closed form was chosen by isinstance, so a subclass's forward or a hook was ignored: the
    outputs and Jacobians were those of the plain class (off by up to 0.5 relative)."""
    torch.manual_seed(0)
    mlp = make()
    X = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=24, n_output_components=20, k=3, max_iter=2,
                                     random_state=0).fit(X)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(X[:6])).numpy()
    np.testing.assert_allclose(jsae.mlp_outputs(X[:6]), expected, rtol=1e-5, atol=1e-6)
    J = jsae.jacobian(X[:6]).toarray()
    for t in range(6):
        block, idx_y, idx_x = _end_to_end_reference(jsae, X[t])
        np.testing.assert_allclose(J[t][np.ix_(idx_y, idx_x)], block, rtol=2e-3, atol=2e-5)

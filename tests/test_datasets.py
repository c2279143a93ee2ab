"""sklearn_jsae.datasets: the bundled MiniLM MLP data and the synthetic generator."""

import re

import numpy as np
import pytest
import torch
from scipy.special import erf

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import DATA_DIR, load_minilm_mlp, load_python_doc_texts, make_synthetic_mlp
from sklearn_jsae.mlp import ElementwiseMLP, GatedMLP


@pytest.fixture(scope="module")
def minilm():
    return load_minilm_mlp()


def test_bundled_files_are_small_and_carry_their_licences():
    sizes = {p.name: p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file()}
    assert sum(sizes.values()) < 10e6, sizes
    for name in (
        "minilm_l6_layer3.npz",
        "minilm_l6_layer3.json",
        "PROVENANCE.md",
        "LICENSE-all-MiniLM-L6-v2",
        "LICENSE-python-docs",
    ):
        assert sizes.get(name, 0) > 0, name
    assert "Apache License" in (DATA_DIR / "LICENSE-all-MiniLM-L6-v2").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (DATA_DIR / "LICENSE-python-docs").read_text()


def test_minilm_shapes_dtypes_and_metadata(minilm):
    d = minilm
    assert d.X.shape == d.Y.shape == (6144, 384)
    assert d.X.dtype == d.Y.dtype == np.float32 and np.isfinite(d.X).all()
    assert d.W_in.shape == (384, 1536) and d.W_out.shape == (1536, 384)
    assert d.b_in.shape == (1536,) and d.b_out.shape == (384,)
    assert d.token_ids.shape == d.tokens.shape == d.positions.shape == d.sequence_ids.shape == (6144,)
    assert d.metadata["layer"] == 3 and "Apache-2.0" in d.metadata["model_license"]
    assert "PSF" in d.metadata["text_license"] and "Apache-2.0" in d.DESCR
    # the float32 capture reproduced by the shipped MLP, and float16 storage costs < 1e-3 relative
    assert d.metadata["verify_mlp_vs_captured_Y_float32"]["max_abs"] < 1e-4
    assert d.metadata["verify_Y_from_float16_X_vs_captured_Y"]["rel_fro"] < 1e-3


def test_minilm_Y_is_the_exact_gelu_mlp_of_X(minilm):
    d = minilm
    X = d.X[:1024].astype(np.float64)
    Z = X @ d.W_in + d.b_in
    exact = (0.5 * Z * (1 + erf(Z / np.sqrt(2)))) @ d.W_out + d.b_out
    tanh = (0.5 * Z * (1 + np.tanh(np.sqrt(2 / np.pi) * (Z + 0.044715 * Z**3)))) @ d.W_out + d.b_out
    err_exact = np.linalg.norm(d.Y[:1024] - exact) / np.linalg.norm(exact)
    err_tanh = np.linalg.norm(d.Y[:1024] - tanh) / np.linalg.norm(exact)
    assert err_exact < 1e-6 < err_tanh
    assert isinstance(d.mlp, ElementwiseMLP) and d.mlp.activation == "gelu"
    np.testing.assert_array_equal(d.mlp.W_in.numpy(), d.W_in)
    np.testing.assert_array_equal(d.mlp.b_out.numpy(), d.b_out)


def test_minilm_rows_are_128_token_sequences_with_cls_and_sep(minilm):
    d = minilm
    np.testing.assert_array_equal(d.positions, np.tile(np.arange(128), 48))
    assert (d.tokens[d.positions == 0] == "[CLS]").all() and (d.token_ids[d.positions == 0] == 101).all()
    assert (d.tokens[d.positions == 127] == "[SEP]").all()
    assert len(np.unique(d.sequence_ids)) == 48 and np.all(np.diff(d.sequence_ids) >= 0)
    assert "##" in "".join(d.tokens) and d.tokens[1].islower()
    norms = np.linalg.norm(d.X, axis=1)
    assert norms[d.positions == 0].mean() > 1.5 * norms[(d.positions > 0) & (d.positions < 127)].mean()


def test_minilm_without_special_tokens_and_in_float64(minilm):
    d = load_minilm_mlp(include_special_tokens=False, dtype=np.float64)
    assert d.X.shape == (6048, 384) and d.X.dtype == d.Y.dtype == np.float64
    assert not np.isin(d.token_ids, [101, 102]).any()
    keep = ~np.isin(minilm.token_ids, [101, 102])
    np.testing.assert_allclose(d.Y, minilm.Y[keep], rtol=1e-4, atol=1e-4)
    assert d.mlp.W_in.dtype == torch.float32  # computing Y in float64 leaves the module alone


def test_minilm_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be numpy.float32 or numpy.float64, got"):
        load_minilm_mlp(dtype=np.float16)


def test_jsae_trains_on_the_bundled_mlp(minilm):
    X = minilm.X[:384]
    jsae = JacobianSparseAutoencoder(
        mlp=minilm.mlp, n_components=64, k=4, max_iter=1, batch_size=128, random_state=0
    ).fit(X)
    S = jsae.transform(X[:10])
    assert S.shape == (10, 64) and (np.diff(S.indptr) <= 4).all()
    np.testing.assert_allclose(jsae.mlp_outputs(X[:10]), minilm.Y[:10], rtol=1e-4, atol=1e-4)


def test_make_synthetic_mlp_shapes_scale_and_determinism():
    X, mlp = make_synthetic_mlp(n_samples=300, n_features=12, n_hidden=40, n_outputs=7, random_state=3)
    assert X.shape == (300, 12) and X.dtype == np.float32
    assert isinstance(mlp, ElementwiseMLP) and (mlp.d_in, mlp.d_mlp, mlp.d_out) == (12, 40, 7)
    assert np.isclose(np.mean(np.sum(X.astype(np.float64) ** 2, axis=1)), 12, rtol=1e-4)
    X2, mlp2 = make_synthetic_mlp(n_samples=300, n_features=12, n_hidden=40, n_outputs=7, random_state=3)
    np.testing.assert_array_equal(X, X2)
    assert torch.equal(mlp.W_in, mlp2.W_in)
    X3, _ = make_synthetic_mlp(n_samples=300, n_features=12, n_hidden=40, random_state=4)
    assert not np.array_equal(X, X3)


def test_make_synthetic_mlp_inputs_are_sparse_in_a_dictionary():
    """Noise-free inputs with one active atom lie on 4·d directions only."""
    X, _ = make_synthetic_mlp(n_samples=500, n_features=6, n_hidden=8, n_active=1, noise=0.0, random_state=0)
    directions = np.unique(np.round(X / np.linalg.norm(X, axis=1, keepdims=True), 5), axis=0)
    assert len(directions) <= 24


def test_make_synthetic_gated_mlp():
    X, mlp = make_synthetic_mlp(
        n_samples=50, n_features=5, n_hidden=9, gated=True, activation="silu", random_state=0
    )
    assert isinstance(mlp, GatedMLP) and mlp.b_gate is None
    x = torch.from_numpy(X)
    expected = (torch.nn.functional.silu(x @ mlp.W_gate) * (x @ mlp.W_up)) @ mlp.W_down
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_samples=0), "n_samples must be an int >= 1, got 0"),
        (dict(n_features=2.5), "n_features must be an int >= 1, got 2.5"),
        (dict(n_active=9, n_atoms=8), "n_active=9 must be <= n_atoms=8"),
        (dict(activation="swish"), "activation='swish' is not supported"),
        (dict(noise=-1), "noise must be a finite number >= 0, got -1"),
        (dict(noise=float("inf")), "noise must be a finite number >= 0, got inf"),
        (dict(noise=float("nan")), "noise must be a finite number >= 0, got nan"),
        (dict(noise=True), "noise must be a finite number >= 0, got True"),
        (dict(random_state=-1), r"random_state must be None, an int in \[0, 2\*\*32 - 1\].*got -1"),
    ],
)
def test_make_synthetic_mlp_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_mlp(**kwargs)


def test_make_synthetic_mlp_infinite_noise_is_refused_not_returned_as_nan():
    """noise=inf returned an all-NaN X (inf rows, then rescaled by inf)."""
    with pytest.raises(ValueError, match="noise must be a finite number >= 0, got inf"):
        make_synthetic_mlp(n_samples=10, n_features=3, n_hidden=4, noise=np.inf)


@pytest.mark.parametrize("call, name", [
    (lambda v: make_synthetic_mlp(n_samples=10, n_features=3, n_hidden=4, gated=v), "gated"),
    (lambda v: load_minilm_mlp(include_special_tokens=v), "include_special_tokens"),
])
@pytest.mark.parametrize("value", ["no", None, 0])
def test_dataset_flags_must_be_bools(call, name, value):
    """gated="no" built a GatedMLP and include_special_tokens="no" kept the special tokens."""
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {re.escape(repr(value))}"):
        call(value)


@pytest.mark.parametrize("min_length", ["a", -1, 2.5, None])
def test_python_doc_texts_min_length_must_be_a_count(min_length):
    with pytest.raises(ValueError, match=rf"min_length must be an int >= 0, got {re.escape(repr(min_length))}"):
        load_python_doc_texts(min_length)


def test_python_doc_texts_min_length_filters():
    texts = load_python_doc_texts(min_length=np.int64(300))
    assert texts and all(len(t) > 300 for t in texts)
    assert len(texts) < len(load_python_doc_texts(0))


def test_minilm_dtype_that_numpy_does_not_know_is_named():
    with pytest.raises(ValueError, match="dtype must be numpy.float32 or numpy.float64, got 'x'"):
        load_minilm_mlp(dtype="x")

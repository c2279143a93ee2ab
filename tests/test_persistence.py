"""save/load without pickle, and version-stamped pickles.

- a hypothesis round trip over random small models (both estimators, every MLP kind): the
  loaded model's parameters, fitted attributes and every method's output equal the original's
  bit for bit;
- the file's JSON holds the fields the format promises;
- truncated, damaged, foreign, newer-version and inconsistent files raise PersistenceError
  naming what is wrong, and a failed save leaves the previous file intact;
- a JSAE with an arbitrary callable MLP reloads with working SAE-only methods and a clear
  MissingMLPError elsewhere, and fully with ``load(path, mlp=...)``;
- pickles carry the version, and a pickle from another format version is refused.
"""

import json
import numbers
import os
import pickle
import re
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.base import clone

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, _model_file, _persistence, load
from sklearn_jsae._backend.mlp import AffineMap
from sklearn_jsae.exceptions import MissingMLPError, PersistenceError
from sklearn_jsae.mlp import ElementwiseMLP, GatedMLP

ACTIVATION_MODULES = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU,
                      "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}


class TwoLayer(torch.nn.Module):
    """A module without a closed form: fit uses JVPs, save cannot keep it."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d_in, 6), torch.nn.Linear(6, d_out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) ** 2)


def scaled_tanh(x):
    return 2 * torch.tanh(x)


class RenamedMLP(ElementwiseMLP):
    """A subclass of a closed form: it may compute something else, so it is not saved."""


def make_mlp(kind, d_in, d_out, seed):
    """(mlp, d_out actually produced) for one MLP kind."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, d_in
    if kind == "identity":
        return torch.nn.Identity(), d_in
    if kind in ("linear", "linear_no_bias"):
        return torch.nn.Linear(d_in, d_out, bias=kind == "linear"), d_out
    if kind.startswith("sequential_"):
        act = kind.split("_", 1)[1]
        module = torch.nn.GELU(approximate="tanh") if act == "gelu_tanh" else ACTIVATION_MODULES[act]()
        return torch.nn.Sequential(torch.nn.Linear(d_in, 7), module, torch.nn.Linear(7, d_out)), d_out
    if kind == "elementwise_float64":  # a hand-built map in float64, row-major weights
        return ElementwiseMLP(torch.randn(d_in, 5, generator=g, dtype=torch.float64), None,
                              torch.randn(5, d_out, generator=g, dtype=torch.float64),
                              torch.randn(d_out, generator=g, dtype=torch.float64), "gelu_tanh"), d_out
    if kind in ("gated", "gated_bias"):
        b = kind == "gated_bias"
        return GatedMLP(torch.randn(d_in, 6, generator=g), torch.randn(d_in, 6, generator=g),
                        torch.randn(6, d_out, generator=g),
                        *(torch.randn(size, generator=g) if b else None for size in (6, 6, d_out))), d_out
    if kind == "affine_map":  # the backend class itself, column-major weight
        W = torch.randn(d_out, d_in, generator=g).T
        return AffineMap(d_in, W, torch.randn(d_out, generator=g)), d_out
    if kind == "callable":
        return scaled_tanh, d_in
    if kind == "module":
        return TwoLayer(d_in, d_out), d_out
    if kind == "subclass":
        return RenamedMLP(torch.randn(d_in, 5, generator=g), None, torch.randn(5, d_out, generator=g), None,
                          "relu"), d_out
    raise KeyError(kind)


CLOSED_FORM_KINDS = ["none", "identity", "linear", "linear_no_bias", "sequential_gelu",
                     "sequential_gelu_tanh", "sequential_relu", "sequential_silu", "sequential_tanh",
                     "sequential_sigmoid", "elementwise_float64", "gated", "gated_bias", "affine_map"]
CALLABLE_KINDS = ["callable", "module", "subclass"]


def fit_model(kind, d_in=5, d_out=4, n=9, n_out=7, k=3, seed=0, n_rows=64, frame=False):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n_rows, d_in)) * rng.uniform(0.5, 3)).astype(np.float32)
    if frame:
        import pandas as pd

        X = pd.DataFrame(X, columns=[f"f{i}" for i in range(d_in)])
    common = dict(k=k, max_iter=2, batch_size=32, random_state=seed)
    if kind == "topk":
        return TopKSparseAutoencoder(n_components=n, **common).fit(X), X
    mlp, _ = make_mlp(kind, d_in, d_out, seed)
    return JacobianSparseAutoencoder(mlp=mlp, n_components=n, n_output_components=n_out, **common).fit(X), X


def _strides(t):
    """Strides of the dimensions longer than 1 (those of length-1 dimensions are arbitrary)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape, strict=True) if size > 1)


def assert_same_value(a, b, where):
    """Bit-exact equality of two fitted attribute values, recursively."""
    if isinstance(a, TopKSparseAutoencoder):
        assert isinstance(b, TopKSparseAutoencoder), where
        assert_same_estimator(a, b, where)
    elif sp.issparse(a):
        assert type(a) is type(b) and a.shape == b.shape, where
        for part in ("data", "indices", "indptr"):
            x, y = getattr(a, part), getattr(b, part)
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{where}.{part}"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b), where
    elif isinstance(a, torch.nn.Module):
        assert type(a) is type(b), where
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), where
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{where}.{key}"
            assert _strides(sa[key]) == _strides(sb[key]), f"{where}.{key} layout"
        assert getattr(a, "activation", None) == getattr(b, "activation", None), where
    elif isinstance(a, numbers.Real) and not isinstance(a, (bool, np.bool_)):
        assert isinstance(b, numbers.Real) and not isinstance(b, (bool, np.bool_)), where
        assert a == b or (np.isnan(a) and np.isnan(b)), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def assert_same_estimator(a, b, where="estimator"):
    assert type(a) is type(b)
    pa, pb = a.get_params(deep=False), b.get_params(deep=False)
    assert pa.keys() == pb.keys()
    for name in pa:
        if name in ("mlp", "memory"):
            continue
        if isinstance(pa[name], np.random.RandomState):
            state_a, state_b = pa[name].get_state(), pb[name].get_state()
            assert np.array_equal(state_a[1], state_b[1]) and state_a[2:] == state_b[2:]
        else:
            assert pa[name] == pb[name] and type(pa[name]) is type(pb[name]), (where, name)
    fitted = sorted(name for name in vars(a) if name.endswith("_") and not name.startswith("__"))
    assert fitted == sorted(n for n in vars(b) if n.endswith("_") and not n.startswith("__")), where
    for name in fitted:
        assert_same_value(getattr(a, name), getattr(b, name), f"{where}.{name}")


def assert_same_outputs(a, b, X, mlp_methods=True):
    def same(x, y, what):
        assert type(x) is type(y), what
        if sp.issparse(x):
            assert_same_value(x, y, what)
        else:
            assert np.array_equal(x, y), what

    S = a.transform(X)
    same(S, b.transform(X), "transform")
    same(a.inverse_transform(S), b.inverse_transform(S), "inverse_transform")
    if mlp_methods or isinstance(a, TopKSparseAutoencoder):
        assert a.score(X) == b.score(X)
    if isinstance(a, JacobianSparseAutoencoder):
        assert_same_value(a.jacobian_, b.jacobian_, "jacobian_")
        if mlp_methods:
            T = a.transform_output(X)
            same(T, b.transform_output(X), "transform_output")
            same(a.inverse_transform_output(T), b.inverse_transform_output(T), "inverse_transform_output")
            same(a.mlp_outputs(X), b.mlp_outputs(X), "mlp_outputs")
            Ja, Jb = a.jacobian(X[:20]), b.jacobian(X[:20])
            assert Ja.shape == Jb.shape and np.array_equal(Ja.toarray(), Jb.toarray())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["topk"] + CLOSED_FORM_KINDS),
    d_in=st.integers(2, 6),
    d_out=st.integers(1, 5),
    n=st.integers(3, 10),
    n_out=st.integers(3, 10),
    k=st.integers(1, 3),
    seed=st.integers(0, 1000),
    frame=st.booleans(),
)
def test_round_trip_is_bit_exact(tmp_path_factory, kind, d_in, d_out, n, n_out, k, seed, frame):
    _check_round_trip(tmp_path_factory.mktemp("rt"), kind, d_in, d_out, n, n_out, k, seed, frame)


@pytest.mark.parametrize("kind", ["topk"] + CLOSED_FORM_KINDS)
def test_every_kind_round_trips(tmp_path, kind):
    """The property above draws its kinds at random; every kind is also checked on every run."""
    _check_round_trip(tmp_path, kind, d_in=4, d_out=3, n=6, n_out=5, k=2, seed=0, frame=False)


def _check_round_trip(folder, kind, d_in, d_out, n, n_out, k, seed, frame):
    model, X = fit_model(kind, d_in, d_out, n, n_out, k, seed, frame=frame)
    path = model.save(folder / "model.safetensors")
    loaded = load(path)
    assert_same_estimator(model, loaded)
    assert_same_outputs(model, loaded, X)
    if kind != "topk":
        assert type(loaded.mlp_) is type(model.mlp_)
        assert_same_value(model._mlp_map, loaded._mlp_map, "_mlp_map")
        assert_same_value(model._probe_rows, loaded._probe_rows, "_probe_rows")
        # The reloaded model saves to an identical file: nothing drifts on a second trip.
        again = loaded.save(os.path.join(os.path.dirname(path), "again.safetensors"))
        assert _header(again)["sha256"] == _header(path)["sha256"]


def _header(path):
    with safe_open(os.fspath(path), framework="np") as f:
        return json.loads(f.metadata()["sklearn_jsae"])


def _rewrite(path, target, edit_doc=None, edit_arrays=None, rehash=True, writer=save_file):
    """Copy a model file with its JSON and/or tensors edited (the digest recomputed if asked)."""
    with safe_open(os.fspath(path), framework="np") as f:
        doc = json.loads(f.metadata()["sklearn_jsae"])
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    if edit_doc:
        edit_doc(doc)
    if edit_arrays:
        edit_arrays(arrays)
    if rehash:
        doc["sha256"] = _model_file._digest(arrays)
        doc[_model_file.DOCUMENT_DIGEST] = _model_file._document_digest(doc)
    writer(arrays, os.fspath(target), metadata={"sklearn_jsae": json.dumps(doc)})
    return target


@pytest.fixture(scope="module")
def gelu_jsae():
    model, X = fit_model("sequential_gelu", d_in=6, d_out=5, n=12, n_out=10, k=3, n_rows=128)
    return model, X


@pytest.fixture
def saved(gelu_jsae, tmp_path):
    return gelu_jsae[0].save(tmp_path / "jsae.safetensors")


def test_file_holds_the_promised_fields(gelu_jsae, saved):
    from sklearn_jsae import __version__

    doc = _header(saved)
    assert doc["format"] == "sklearn-jsae" and doc["format_version"] == _persistence.FORMAT_VERSION
    assert doc["library_version"] == __version__ and doc["estimator"] == "JacobianSparseAutoencoder"
    assert doc["fitted"]["device_"] == "cpu" and doc["fitted"]["n_output_features_"] == 5
    assert doc["params"]["l1"] == gelu_jsae[0].l1 and "mlp" not in doc["params"] and "memory" not in doc["params"]
    assert doc["input_sae_"]["fitted"]["scale_"] == gelu_jsae[0].input_sae_.scale_
    assert len(doc["fitted"]["history_"]) == 2 and "jacobian_l1" in doc["fitted"]["history_"][0]
    assert doc["mlp"]["module"] == "sequential" and doc["mlp"]["map"] == "ElementwiseMLP"
    assert doc["mlp"]["activation"] == "gelu" and doc["mlp"]["buffers"]["W_in"]["layout"] == "columns"
    with safe_open(os.fspath(saved), framework="np") as f:
        names = set(f.keys())
    assert {"input_sae_.components_", "output_sae_.encoder_", "mlp.W_in", "mlp.b_out", "_probe_rows",
            "jacobian_.data", "jacobian_.indices", "jacobian_.indptr"} <= names


def test_save_needs_a_fitted_model_and_a_file_path(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        TopKSparseAutoencoder().save(tmp_path / "x.safetensors")
    model, _ = fit_model("topk")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        model.save(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the folder '.*missing' does not exist; create it first"):
        model.save(tmp_path / "missing" / "m.safetensors")
    assert not (tmp_path / "missing").exists()


def test_memory_and_unsavable_params_are_dropped_and_reported(tmp_path):
    import joblib as jl

    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    model = JacobianSparseAutoencoder(n_components=6, k=2, max_iter=1, batch_size=32,
                                      memory=jl.Memory(tmp_path / "cache", verbose=0)).fit(X)
    path = model.save(tmp_path / "m.safetensors")
    assert "memory" in _header(path)["dropped_params"]
    assert load(path).memory is None
    # A parameter value that JSON cannot hold warns at save time and gets its default on load.
    model.set_params(verbose=np.int64(1))  # a numpy integer: written as an int
    assert isinstance(_header(model.save(tmp_path / "v.safetensors"))["params"]["verbose"], int)
    object.__setattr__(model, "device", ["cpu"])  # not a JSON scalar (bypasses validation)
    with pytest.warns(UserWarning, match="device=.*cannot be written"):
        path = model.save(tmp_path / "d.safetensors")
    assert load(path).device == "auto"


def test_output_config_and_imported_style_attributes_survive(tmp_path):
    pytest.importorskip("pandas")
    model, X = fit_model("topk")
    model.set_params(sparse_output=False).set_output(transform="pandas")
    model.scale_, model.dead_fraction_ = None, float("nan")  # as after an import from SAELens
    loaded = load(model.save(tmp_path / "m.safetensors"))
    assert loaded.scale_ is None and np.isnan(loaded.dead_fraction_)
    assert list(loaded.transform(X).columns) == list(model.transform(X).columns)


def test_a_random_state_object_round_trips_mid_stream(tmp_path):
    """``random_state=np.random.RandomState(...)`` is saved as its full state, a cached Gaussian
    included, so the loaded estimator's generator continues the same stream."""
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    rs = np.random.RandomState(3)
    rs.standard_normal(3)  # an odd count leaves one Gaussian cached
    model = TopKSparseAutoencoder(n_components=6, k=2, max_iter=1, batch_size=32, random_state=rs).fit(X)
    assert model.random_state.get_state()[3] == 1
    loaded = load(model.save(tmp_path / "m.safetensors"))
    assert isinstance(loaded.random_state, np.random.RandomState) and loaded.random_state is not rs
    expected = pickle.loads(pickle.dumps(model.random_state))
    np.testing.assert_array_equal(loaded.random_state.standard_normal(5), expected.standard_normal(5))
    np.testing.assert_array_equal(loaded.random_state.randint(0, 2**31, size=4), expected.randint(0, 2**31, size=4))


# --------------------------------------------------------------------------- bad files
def test_truncated_files_are_refused(saved, tmp_path):
    data = Path(saved).read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PersistenceError, match="truncated or damaged"):
            load(bad)


def test_a_flipped_byte_is_caught_by_the_digest(saved, tmp_path):
    data = bytearray(Path(saved).read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PersistenceError, match="do not match the digest"):
        load(bad)


def test_a_changed_byte_in_the_description_is_caught_by_its_digest(saved, tmp_path, gelu_jsae):
    """The parameters and fitted values live in the JSON header, outside the tensors' digest: a
    one-byte edit that keeps it valid JSON (k 3 -> 9) loaded, and the model encoded 9 latents.
    A file written before the description had its digest still loads."""
    data = Path(saved).read_bytes()
    assert data.count(b'\\"k\\": 3') >= 1
    bad = tmp_path / "k9.safetensors"
    bad.write_bytes(data.replace(b'\\"k\\": 3', b'\\"k\\": 9', 1))
    with pytest.raises(PersistenceError, match="its description .* does not match the digest"):
        load(bad)
    older = _rewrite(saved, tmp_path / "older.safetensors", edit_doc=lambda doc: doc.pop(_model_file.DOCUMENT_DIGEST),
                     rehash=False)
    assert_same_outputs(gelu_jsae[0], load(older), gelu_jsae[1])


def test_foreign_files_are_refused_with_a_pointer(tmp_path):
    random_st = tmp_path / "random.safetensors"
    save_file({"weight": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}, random_st)
    with pytest.raises(PersistenceError, match="not an sklearn-jsae model.*interop"):
        load(random_st)
    other_meta = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, other_meta,
              metadata={"sklearn_jsae": json.dumps({"format": "x"})})
    with pytest.raises(PersistenceError, match="not an sklearn-jsae model description"):
        load(other_meta)
    damaged = tmp_path / "damaged.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, damaged, metadata={"sklearn_jsae": '{"format": "sklearn-jsae"'})
    with pytest.raises(PersistenceError, match="damaged sklearn-jsae header \\(invalid JSON"):
        load(damaged)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8}))
    with pytest.raises(PersistenceError, match="cannot be read as a model file"):
        load(cfg)
    with pytest.raises(PersistenceError, match="is a folder.*from_saelens"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("version", ["1.1", "2.0", "0.9", "one"])
def test_other_format_versions_are_refused_naming_the_version(saved, tmp_path, version):
    def newer(doc):
        doc["format_version"], doc["library_version"] = version, "9.9.9"

    bad = _rewrite(saved, tmp_path / "v.safetensors", edit_doc=newer)
    newer = version in ("1.1", "2.0")
    advice = "upgrade to sklearn-jsae '9.9.9' or newer" if newer else "the version that wrote it"
    with pytest.raises(PersistenceError, match=rf"'9.9.9' in format version '{version}'.*{advice}"):
        load(bad)


def test_an_older_minor_version_loads(saved, tmp_path, gelu_jsae):
    ours = _persistence.FORMAT_VERSION
    major = ours.split(".")[0]
    ok = _rewrite(saved, tmp_path / "v.safetensors",
                  edit_doc=lambda doc: doc.update(format_version=f"{major}.0"))
    assert_same_outputs(gelu_jsae[0], load(ok), gelu_jsae[1])


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update({"input_sae_.components_": a["input_sae_.components_"][:-1]}),
     r"tensor 'input_sae_.components_' has shape|tensor 'input_sae_.encoder_' has shape"),
    (lambda a: a.update({"output_sae_.decoder_bias_": np.zeros(3, np.float32)}),
     r"tensor 'output_sae_.decoder_bias_' has shape \(3,\), expected \(5,\)"),
    (lambda a: a.update({"input_sae_.encoder_": a["input_sae_.encoder_"].astype(np.float64)}),
     "has dtype float64, expected float32"),
    (lambda a: a.pop("_probe_rows"), "tensor '_probe_rows' is missing"),
    (lambda a: a.update({"surplus": np.zeros(1, np.float32)}), r"unexpected tensors \['surplus'\]"),
    (lambda a: a.update({"mlp.W_in": np.zeros((6, 3), np.float32)}), "MLP description is inconsistent"),
    (lambda a: a.pop("mlp.b_in"), r"MLP tensors missing: \['b_in'\]"),
    (lambda a: a.update({"mlp.b_out": a["mlp.b_out"] + 1}), "do not reproduce the MLP outputs"),
    (lambda a: a.update({"jacobian_.indices": a["jacobian_.indices"] + 100}), "not a valid CSR matrix"),
])
def test_inconsistent_tensors_are_named(saved, tmp_path, edit, message):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_arrays=edit)
    with pytest.raises(PersistenceError, match=message):
        load(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["params"].update(k=50), r"params k=50 exceeds the latents of the saved SAEs \(12, 10\)"),
    (lambda d: d["input_sae_"]["params"].update(k=20), "input_sae_.params k=20 exceeds the 12 latents"),
    (lambda d: d["params"].update(l1=-1.0), "params are invalid"),
    (lambda d: d["params"].update(new_knob=1), r"does not know: \['new_knob'\]"),
    (lambda d: d.update(estimator="PCA"), "estimator='PCA'"),
    (lambda d: d["fitted"].update(n_output_features_=7), "differ from n_features_in_"),
    (lambda d: d["fitted"].pop("history_"), "history_ is missing"),
    (lambda d: d["mlp"].update(activation="swish"), "unknown activation 'swish'"),
    (lambda d: d["mlp"].update(module="pickle"), "unknown MLP kind 'pickle'"),
    (lambda d: d["mlp"].update(map="Sequential"), "unknown MLP map 'Sequential'"),
    (lambda d: d["mlp"].update(d_in=0), r"MLP widths d_in=0, d_out=5 are not positive integers"),
    (lambda d: d["mlp"]["buffers"].pop("b_out"), r"the map ElementwiseMLP needs exactly the buffers"),
    (lambda d: d["mlp"]["buffers"]["W_in"].update(dtype="int8"), "unknown dtype or layout"),
    (lambda d: d["mlp"]["buffers"]["W_in"].update(layout="diagonal"), "unknown dtype or layout"),
    (lambda d: d["mlp"].update(module="linear"), "MLP kind 'linear' must be an AffineMap with a weight"),
    (lambda d: d["mlp"].update(module="none"), "MLP kind 'none' .* must be an AffineMap without weights"),
    (lambda d: d["jacobian_"].update(shape=[3, 3]), "differs from the SAEs' sizes"),
    # non-finite fitted scalars: they loaded, and transform failed later or scaled X by NaN
    (lambda d: d["input_sae_"]["fitted"].update(scale_=float("nan")), r"input_sae_.fitted.scale_=nan is not finite"),
    (lambda d: d["output_sae_"]["fitted"].update(scale_=float("inf")), r"output_sae_.fitted.scale_=inf is not finite"),
    (lambda d: d["fitted"].update(fit_l1=float("nan")), r"fitted.fit_l1=nan is not finite"),
    # fitted scalars out of their range: they loaded and scaled X by 0 or a negative, or reported
    # more dead latents than there are
    (lambda d: d["input_sae_"]["fitted"].update(scale_=0.0), r"input_sae_.fitted.scale_=0.0 is not positive"),
    (lambda d: d["output_sae_"]["fitted"].update(scale_=-1.5), r"output_sae_.fitted.scale_=-1.5 is not positive"),
    (lambda d: d["input_sae_"]["fitted"].update(dead_fraction_=1.5), r"dead_fraction_=1.5 is not a fraction"),
    (lambda d: d["input_sae_"]["fitted"].update(dead_fraction_=float("inf")), r"dead_fraction_=inf is not a fraction"),
    (lambda d: d["fitted"].update(n_iter_=-3), r"fitted.n_iter_=-3 is negative"),
    # a memory cache holds pickles that a fit loads: a file naming one ran their code at the first fit
    (lambda d: d["params"].update(memory="/tmp/somebody-elses-cache"),
     r"params has \['memory'\], which save never writes \(a memory cache holds pickles"),
    # JSON of the wrong shape, which raised bare IndexError, TypeError or AttributeError
    (lambda d: d["params"].update(random_state={"numpy.random.RandomState": {
        "kind": "MT19937", "keys": [1, 2], "pos": 0, "has_gauss": 0, "cached_gaussian": 0.0}}),
     r"params random_state=.* is not a RandomState's state \(IndexError"),
    (lambda d: d["params"].update(random_state={"numpy.random.RandomState": [1]}),
     r"params random_state=.* is not a RandomState's state \(TypeError"),
    (lambda d: d["mlp"]["buffers"].update(W_in="float32"), r"unknown dtype or layout 'float32': expected"),
    (lambda d: d["mlp"]["buffers"]["W_in"].update(dtype=["float32"]), r"unknown dtype or layout .*\['float32'\]"),
    (lambda d: d["mlp"].update(map=["ElementwiseMLP"]), r"unknown MLP map \['ElementwiseMLP'\]"),
    (lambda d: d["mlp"].update(d_in=True), r"MLP widths d_in=True, d_out=5 are not positive integers"),
    (lambda d: d["mlp"].update(module="identity"), "MLP kind 'identity' must be an AffineMap without weights"),
    (lambda d: d["mlp"].update(module="callable", description=["x"]), r"description \['x'\] is not a string"),
    (lambda d: d.update(output_config=["pandas"]), r"output_config=\['pandas'\] is not a JSON object"),
    (lambda d: d.update(output_config="pandas"), r"output_config='pandas' is not a JSON object"),
    (lambda d: d.update(output_config={"transform": "bogus"}),
     r"output_config transform='bogus' is not one of \[.*'pandas'"),
])
def test_inconsistent_descriptions_are_named(saved, tmp_path, edit, message):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_doc=edit)
    with pytest.raises(PersistenceError, match=message) as refused:
        load(bad)
    assert str(refused.value).startswith(repr(str(bad)))  # the file is named


def _spoiled(name, value=np.nan, where=0):
    """An ``edit_arrays`` setting one entry of tensor ``name`` to ``value``."""
    def edit(arrays):
        a = np.array(arrays[name], copy=True)
        a.flat[where] = value
        arrays[name] = a
    return edit


@pytest.mark.parametrize("name, value", [
    ("input_sae_.encoder_", np.nan), ("input_sae_.components_", np.inf), ("output_sae_.encoder_bias_", -np.inf),
    ("output_sae_.decoder_bias_", np.nan), ("jacobian_.data", np.inf), ("mlp.W_in", np.nan),
    ("mlp.b_out", np.inf), ("_probe_rows", np.nan), ("_mlp_probe_outputs", np.nan),
])
def test_non_finite_tensors_are_refused_naming_the_file_and_tensor(saved, tmp_path, name, value):
    """A consistent file (digests recomputed) with NaN or inf in a tensor loaded, and the error came
    later, from transform, blaming X ("is X on the scale..."), or never (jacobian_)."""
    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_arrays=_spoiled(name, value))
    with pytest.raises(PersistenceError, match=rf"tensor '{re.escape(name)}' holds 1 NaN or inf value\(s\)") as refused:
        load(bad)
    assert str(refused.value).startswith(repr(str(bad)))


def test_a_topk_file_with_nan_weights_is_refused(tmp_path):
    model, _ = fit_model("topk")
    path = model.save(tmp_path / "m.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_arrays=_spoiled("encoder_", np.nan, 3))
    with pytest.raises(PersistenceError, match=r"'.*bad.safetensors' .* tensor 'encoder_' holds 1 NaN or inf"):
        load(bad)
    bad = _rewrite(path, tmp_path / "scale.safetensors",
                   edit_doc=lambda d: d["fitted"].update(scale_=float("nan")))
    with pytest.raises(PersistenceError, match=r"fitted.scale_=nan is not finite"):
        load(bad)


def test_saved_rows_the_mlp_cannot_run_are_the_files_fault(gelu_jsae, saved, tmp_path):
    """Finite probe rows on which the saved MLP overflows: the check's ValueError (about "X") was
    raised bare, not naming the file."""
    W = gelu_jsae[0]._mlp_map.W_in.detach().numpy()
    column = np.abs(W).sum(axis=0).argmax()
    assert np.abs(W[:, column]).sum() > 1  # rows of float32's largest value, signed as that column: inf

    def huge(arrays):
        row = np.sign(W[:, column]) * np.finfo(np.float32).max
        arrays["_probe_rows"] = np.tile(row, (len(arrays["_probe_rows"]), 1)).astype(np.float32)

    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_arrays=huge)
    with pytest.raises(PersistenceError, match=r"'.*bad.safetensors' .* the MLP fails on the recorded training rows"):
        load(bad)


@pytest.mark.parametrize("spoil, shown", [
    (lambda m: m.encoder_.__setitem__((0, 0), np.nan), r"encoder_ holds 1 NaN or inf value\(s\) of 45"),
    (lambda m: setattr(m, "scale_", float("inf")), r"scale_=inf is not finite"),
])
def test_save_refuses_a_topk_model_with_non_finite_values_and_keeps_the_file(tmp_path, spoil, shown):
    """save wrote such a model (a fit resumed from a damaged checkpoint), and load read it back."""
    model, _ = fit_model("topk")
    path = model.save(tmp_path / "m.safetensors")
    before = Path(path).read_bytes()
    spoil(model)
    with pytest.raises(PersistenceError, match=rf"TopKSparseAutoencoder.save\('.*m.safetensors'\): {shown}.*"
                                               rf"fit the model again .*Nothing was written"):
        model.save(path)
    assert Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left either


@pytest.mark.parametrize("spoil, shown", [
    (lambda m: m.jacobian_.data.__setitem__(0, np.inf), r"jacobian_ \(its data\) holds 1 NaN or inf"),
    (lambda m: m.output_sae_.components_.__setitem__((1, 2), np.nan), r"output_sae_.components_ holds 1 NaN"),
    (lambda m: m.input_sae_.__setattr__("scale_", float("nan")), r"input_sae_.scale_=nan is not finite"),
    (lambda m: m.__setattr__("_fit_l1", float("inf")), r"fit_l1 \(the l1 the fit trained with\)=inf is not finite"),
])
def test_save_refuses_a_jsae_with_non_finite_values(gelu_jsae, tmp_path, spoil, shown):
    import copy

    model = copy.deepcopy(gelu_jsae[0])
    spoil(model)
    with pytest.raises(PersistenceError, match=rf"JacobianSparseAutoencoder.save\('.*j.safetensors'\): {shown}"):
        model.save(tmp_path / "j.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(saved, monkeypatch, gelu_jsae):
    before = Path(saved).read_bytes()
    import safetensors.numpy

    def half_write(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        gelu_jsae[0].save(saved)
    assert Path(saved).read_bytes() == before
    assert os.listdir(os.path.dirname(saved)) == [os.path.basename(saved)]


# --------------------------------------------------------------------------- callables
@pytest.mark.parametrize("kind", CALLABLE_KINDS)
def test_a_callable_mlp_reloads_without_it_and_with_it(kind, tmp_path):
    model, X = fit_model(kind, d_in=5, d_out=4)
    path = model.save(tmp_path / "m.safetensors")
    with safe_open(os.fspath(path), framework="np") as f:
        assert not any(name.startswith("mlp.") for name in f.keys())
    loaded = load(path)
    assert_same_outputs(model, loaded, X, mlp_methods=False)
    assert_same_value(model.output_sae_, loaded.output_sae_, "output_sae_")
    names = {"callable": "scaled_tanh", "module": "TwoLayer", "subclass": "RenamedMLP"}
    assert names[kind] in repr(loaded.mlp)
    for method in ("transform_output", "mlp_outputs", "jacobian", "score"):
        with pytest.raises(MissingMLPError, match=r"load\(path, mlp=the_mlp\)"):
            getattr(loaded, method)(X)
    with pytest.raises(ValueError, match="loaded without its MLP"):
        clone(loaded).fit(X)
    full = load(path, mlp=model.mlp)
    assert full.mlp is model.mlp
    assert_same_outputs(model, full, X)


def _tensors(path):
    with safe_open(os.fspath(path), framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _other_mlp(kind):
    """An MLP of the same kind and widths as ``fit_model(kind)``'s that computes something else."""
    return torch.sin if kind == "callable" else make_mlp(kind, 5, 4, seed=1)[0]


@pytest.mark.parametrize("kind", CALLABLE_KINDS)
def test_a_callable_given_at_load_must_be_the_one_fitted(kind, tmp_path):
    """The file cannot hold a callable, but it records its outputs on the probe rows: load
    refuses another callable of the same widths, also after the model is loaded without its
    MLP and saved again, or loaded with it and saved again."""
    model, X = fit_model(kind, d_in=5, d_out=4)
    path = model.save(tmp_path / "m.safetensors")
    outputs = _tensors(path)["_mlp_probe_outputs"]
    wrong = r"mlp is not the MLP this model was fitted with: .* differ from the fitted MLP's by up to \d"
    without = load(path)
    with_mlp = load(path, mlp=model.mlp)
    assert with_mlp.score(X) == model.score(X)
    for again in (without.save(tmp_path / "without.st"), with_mlp.save(tmp_path / "with.st")):
        np.testing.assert_array_equal(_tensors(again)["_mlp_probe_outputs"], outputs)
        for source in (path, again):
            with pytest.raises(ValueError, match=wrong):
                load(source, mlp=_other_mlp(kind))
            assert load(source, mlp=model.mlp).score(X) == model.score(X)


def test_a_callable_passed_back_may_round_as_bfloat16_does(tmp_path):
    """A callable may compute in bfloat16 inside, which another machine's float32 BLAS can tip by an
    ulp: its check tolerates that rounding (a closed form's stays at float32's), not another MLP."""
    model, X = fit_model("callable", d_in=5, d_out=4)
    path = model.save(tmp_path / "m.safetensors")

    def rounded_elsewhere(x):  # the same MLP, off by 0.3% (about a bfloat16 ulp)
        return model.mlp(x) * 1.003

    assert load(path, mlp=rounded_elsewhere).score(X) == pytest.approx(model.score(X), abs=0.05)
    with pytest.raises(ValueError, match="mlp is not the MLP this model was fitted with"):
        load(path, mlp=lambda x: model.mlp(x) * 1.05)


def test_a_file_without_the_callables_outputs_still_loads(tmp_path):
    """Files written before the outputs of callables were recorded load as before (a given mlp
    then cannot be checked beyond its width), and saving them again invents no outputs."""
    model, X = fit_model("callable", d_in=5, d_out=4)
    older = _rewrite(model.save(tmp_path / "m.safetensors"), tmp_path / "older.safetensors",
                     edit_arrays=lambda a: a.pop("_mlp_probe_outputs"))
    assert_same_outputs(model, load(older), X, mlp_methods=False)
    assert load(older, mlp=model.mlp).score(X) == model.score(X)
    load(older, mlp=torch.sin)  # unverifiable: accepted as before
    with pytest.raises(ValueError, match="mlp returns 3 features"):
        load(older, mlp=lambda x: x[:, :3])
    assert "_mlp_probe_outputs" not in _tensors(load(older).save(tmp_path / "again.safetensors"))
    topk, _ = fit_model("topk")
    assert "_mlp_probe_outputs" not in _tensors(topk.save(tmp_path / "topk.safetensors"))


def test_load_checks_a_given_mlp_against_the_saved_one(gelu_jsae, saved):
    model, X = gelu_jsae
    same = load(saved, mlp=model.mlp)
    assert_same_outputs(model, same, X)
    other = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.GELU(), torch.nn.Linear(9, 5))
    with pytest.raises(ValueError, match=r"mlp is not the MLP this model was fitted with: .* by up to "
                                         r"\d.*load without mlp=, which uses the saved weights"):
        load(saved, mlp=other)
    with pytest.raises(ValueError, match="returns 3 features"):
        load(saved, mlp=torch.nn.Linear(6, 3))
    # An mlp going NaN is the caller's wrong mlp here (no training): a ValueError, not a training error.
    with pytest.raises(ValueError, match="mlp returned NaN or inf on row 0") as raised:
        load(saved, mlp=lambda x: torch.log(-x.abs() - 1)[:, :5])
    assert not isinstance(raised.value, FloatingPointError)
    topk, _ = fit_model("topk")
    with pytest.raises(ValueError, match="only for a JacobianSparseAutoencoder"):
        load(topk.save(os.path.join(os.path.dirname(saved), "t.safetensors")), mlp=model.mlp)


def test_hf_mlp_of_maps_reload_fully(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sklearn_jsae.hf import mlp_of

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                          vocab_size=50))
    llama = transformers.LlamaModel(transformers.LlamaConfig(hidden_size=16, intermediate_size=24,
                                                             num_hidden_layers=2, num_attention_heads=2,
                                                             num_key_value_heads=1, vocab_size=50))
    X = np.random.default_rng(0).normal(size=(96, 16)).astype(np.float32)
    for model in (gpt2, llama):
        jsae = JacobianSparseAutoencoder(mlp=mlp_of(model, 1), n_components=20, k=3, max_iter=2,
                                         batch_size=48, random_state=0).fit(X)
        loaded = load(jsae.save(tmp_path / "hf.safetensors"))
        assert type(loaded.mlp_) is type(jsae.mlp_) and loaded.mlp_ is loaded._mlp_map
        assert_same_estimator(jsae, loaded)
        assert_same_outputs(jsae, loaded, X)


def test_a_loaded_model_keeps_training_like_the_original(gelu_jsae, saved):
    model, X = gelu_jsae
    a = clone(model).set_params(warm_start=True, max_iter=1)
    a.__dict__.update({k: v for k, v in vars(model).items() if k not in model.get_params()})
    b = load(saved).set_params(warm_start=True, max_iter=1)
    a.fit(X), b.fit(X)
    assert np.array_equal(a.input_sae_.components_, b.input_sae_.components_)
    assert np.array_equal(a.output_sae_.encoder_, b.output_sae_.encoder_)


# --------------------------------------------------------------------------- pickles
def test_pickles_carry_the_version_and_round_trip(gelu_jsae, tmp_path):
    model, X = gelu_jsae
    state = model.__getstate__()
    assert state["_sklearn_jsae_pickle"]["format_version"] == _persistence.FORMAT_VERSION
    assert "_sklearn_jsae_pickle" not in vars(model)  # the stamp goes in the pickle, not the model
    for restored in (pickle.loads(pickle.dumps(model)), _joblib_round_trip(model, tmp_path)):
        assert "_sklearn_jsae_pickle" not in vars(restored)
        assert_same_outputs(model, restored, X)


def _joblib_round_trip(model, tmp_path):
    joblib.dump(model, tmp_path / "m.joblib")
    return joblib.load(tmp_path / "m.joblib")


@pytest.mark.parametrize("estimator", ["topk", "jsae"])
def test_a_pickle_from_another_format_version_is_refused(gelu_jsae, monkeypatch, estimator):
    model = gelu_jsae[0] if estimator == "jsae" else gelu_jsae[0].input_sae_
    monkeypatch.setattr(_persistence, "FORMAT_VERSION", "1.7")
    blob = pickle.dumps(model)
    monkeypatch.undo()
    with pytest.raises(PersistenceError, match=r"persistence format '1.7'.*estimator.save\(path\)"):
        pickle.loads(blob)


def test_a_pickle_without_the_stamp_is_refused(gelu_jsae):
    model = gelu_jsae[0].input_sae_
    state = model.__getstate__()
    del state["_sklearn_jsae_pickle"]
    fresh = TopKSparseAutoencoder.__new__(TopKSparseAutoencoder)
    with pytest.raises(PersistenceError, match="records no sklearn-jsae version"):
        fresh.__setstate__(state)
    assert not hasattr(fresh, "components_")  # nothing half-loaded


def test_deepcopy_and_clone_still_work(gelu_jsae):
    import copy

    model, X = gelu_jsae
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = copy.deepcopy(model)
    assert_same_outputs(model, twin, X)
    assert not hasattr(clone(model), "input_sae_")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_open_would_give_them(tmp_path, mask):
    """safetensors' writer (and mkstemp, used before) creates 0600 files and the rename kept it: a model, an export or a checkpoint written on
    a shared cluster was unreadable to the owner's group whatever the umask."""
    import stat

    from sklearn_jsae import TopKSparseAutoencoder
    from sklearn_jsae._backend.checkpoint import checkpoint_paths
    from sklearn_jsae.interop import to_saelens

    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    previous = os.umask(mask)
    try:
        sae = TopKSparseAutoencoder(n_components=8, k=2, max_iter=1, batch_size=32, random_state=0,
                                    checkpoint_dir=tmp_path / "ckpt").fit(X)
        written = [sae.save(tmp_path / "sae.safetensors"), *checkpoint_paths(tmp_path / "ckpt"),
                   *(str(p) for p in Path(to_saelens(sae, tmp_path / "export")).iterdir())]
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path
    os.chmod(written[0], 0o600)  # made private by its owner: a save over it keeps it so, as open() would
    sae.save(written[0])
    assert stat.S_IMODE(os.stat(written[0]).st_mode) == 0o600


def test_a_full_disk_during_save_names_the_file_and_keeps_the_previous_model(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError on a full disk (not an OSError, naming no path)."""
    import safetensors.numpy
    from safetensors import SafetensorError

    from sklearn_jsae import TopKSparseAutoencoder, load

    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    sae = TopKSparseAutoencoder(n_components=8, k=2, max_iter=1, batch_size=32, random_state=0).fit(X)
    path = Path(sae.save(tmp_path / "sae.safetensors"))
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match=r"cannot write '.*sae\.safetensors' \(No space left on device\): the previous "
                                      r"file there, if any, is intact; free space on its disk") as info:
        sae.save(path)
    assert info.value.errno == 28 and path.read_bytes() == before and os.listdir(tmp_path) == ["sae.safetensors"]
    monkeypatch.undo()
    load(path)


def test_a_file_name_of_the_longest_legal_length_saves(tmp_path):
    """The temporary's name added 14 characters: a legal name of 242-255 characters failed."""
    from sklearn_jsae import TopKSparseAutoencoder, load

    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    sae = TopKSparseAutoencoder(n_components=8, k=2, max_iter=1, batch_size=32, random_state=0).fit(X)
    path = tmp_path / ("m" * 239 + ".safetensors")  # 251 characters
    load(sae.save(path))
    assert os.listdir(tmp_path) == [path.name]


def _dead_and_live_temporaries(folder, final_name):
    """Temporaries of ``final_name`` as a killed writer (a finished process) and a live one (this
    process's parent) of this machine leave them."""
    import subprocess
    import sys

    from sklearn_jsae._backend.files import HOST, temporary_prefix

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    prefix = temporary_prefix(os.path.join(folder, final_name))
    dead = Path(folder) / f"{prefix}{HOST}-{int(finished.stdout)}.abcd1234.tmp"
    live = Path(folder) / f"{prefix}{HOST}-{os.getppid()}.efgh5678.tmp"
    for path in (dead, live):
        path.write_bytes(b"half a file")
    return dead, live


def test_a_save_removes_the_temporary_a_killed_save_left_and_names_its_own(tmp_path, monkeypatch):
    """A save killed part-way (SIGKILL runs no cleanup) left a full-size hidden temporary that no
    later save removed.  Temporaries are now named after their writer, as checkpoints' are: the
    next save of the path removes a dead writer's and leaves a live one's (a save in progress)."""
    from sklearn_jsae._backend.files import HOST

    model, _ = fit_model("topk")
    path = tmp_path / "model.safetensors"
    dead, live = _dead_and_live_temporaries(tmp_path, path.name)
    from sklearn_jsae._backend import files

    prefixes, real_new_temporary = [], files.new_temporary
    monkeypatch.setattr(files, "new_temporary",
                        lambda folder, prefix, *a: prefixes.append(prefix) or real_new_temporary(folder, prefix, *a))
    load(model.save(path))
    assert not dead.exists() and live.read_bytes() == b"half a file"
    assert prefixes and all(p.endswith(f".{HOST}-{os.getpid()}.") for p in prefixes)


def test_a_dead_writers_temporary_that_cannot_be_removed_does_not_fail_the_save(tmp_path, monkeypatch):
    """The clean-up of a killed save's temporary runs after the new file is in place; a
    PermissionError there (another user's file in a shared folder) raised from a save that had
    succeeded.  The file is left, and the model is saved."""
    from sklearn_jsae._backend import files

    model, _ = fit_model("topk")
    path = tmp_path / "model.safetensors"
    dead, live = _dead_and_live_temporaries(tmp_path, path.name)
    real_remove = os.remove

    def refuse(target, *args, **kwargs):
        if os.fspath(target) == os.fspath(dead):
            raise PermissionError(13, "Permission denied", os.fspath(target))
        return real_remove(target, *args, **kwargs)

    monkeypatch.setattr(files.os, "remove", refuse)
    loaded = load(model.save(path))
    np.testing.assert_array_equal(loaded.components_, model.components_)
    assert dead.exists() and live.exists()


def test_a_save_leaves_the_temporaries_of_a_path_that_only_starts_like_its_own(tmp_path):
    """``.model.`` (the temporaries of ``model``) is also the start of ``.model.safetensors.``'s: a
    save of ``model`` deleted another save's temporary of ``model.safetensors`` mid-write."""
    from sklearn_jsae._backend.files import HOST

    model, _ = fit_model("topk")
    dead, live = _dead_and_live_temporaries(tmp_path, "model.safetensors")
    mine = tmp_path / f".model.safetensors.{HOST}-{os.getpid()}.ijkl9012.tmp"  # this process, another path
    mine.write_bytes(b"half a file")
    load(model.save(tmp_path / "model"))
    assert dead.exists() and live.exists() and mine.exists()  # none of them is a temporary of 'model'


def test_an_mlp_weight_stored_in_another_dtype_than_described_is_refused(saved, tmp_path):
    """A complex MLP weight (digests recomputed, as a forged file would) loaded with its imaginary
    part dropped by the cast to the described dtype."""
    def complex_weight(arrays):
        name = next(n for n in arrays if n.startswith("mlp."))
        arrays[name] = arrays[name].astype(np.complex64) + 1j

    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_arrays=complex_weight, writer=_save_by_hand)
    # (safetensors 0.4 and 0.5 cannot read complex64 at all: there the file is refused as unreadable)
    with pytest.raises(PersistenceError, match=r"the weight is stored as complex64, but its description says float32"
                                               r"|cannot be read as a model file \(SafetensorError"):
        load(bad)


def _save_by_hand(arrays, path, metadata):
    """A safetensors file written from its format (the header's length as 8 little-endian bytes, the
    JSON header, the tensors' bytes): the writer of safetensors 0.4 and 0.5 refuses complex64."""
    codes = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "bool": "BOOL", "uint8": "U8",
             "float16": "F16", "complex64": "C64"}
    header, data, offset = {"__metadata__": metadata}, [], 0
    for name, array in arrays.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": codes[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + b"".join(data))


def test_a_negative_mean_jacobian_entry_is_refused(saved, tmp_path):
    """``jacobian_`` is the mean |J| over the training tokens: a file with a negative entry loaded."""
    def negative(arrays):
        arrays["jacobian_.data"] = arrays["jacobian_.data"].copy()
        arrays["jacobian_.data"][0] = -0.5

    bad = _rewrite(saved, tmp_path / "bad.safetensors", edit_arrays=negative)
    with pytest.raises(PersistenceError, match=r"jacobian_ holds -0.5, but it is a mean of \|J\|"):
        load(bad)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc (Linux)")
def test_a_temporary_is_created_exclusively_beside_a_planted_link_and_holds_no_descriptor(tmp_path, monkeypatch):
    """new_temporary replaced mkstemp, whose bare descriptor a Ctrl-C arriving just after it leaked
    with its file: it must keep mkstemp's guarantee (a name taken by a planted link is passed over,
    never followed) and leave no descriptor open, and gives the mode ``open`` gives."""
    import secrets

    from sklearn_jsae._backend.files import new_temporary

    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (tmp_path / ".m.first.tmp").symlink_to(target)  # the first name this test makes it draw
    names = iter(["first", "second"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    before = _open_descriptors()
    made = new_temporary(str(tmp_path), ".m.")
    assert made == str(tmp_path / ".m.second.tmp")
    assert target.read_bytes() == b"keep me" and os.path.getsize(made) == 0
    assert _open_descriptors() == before
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(made).st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc (Linux)")
def test_an_interrupted_save_leaves_no_temporary_and_no_descriptor(tmp_path, monkeypatch):
    """A Ctrl-C during a save's write: the previous file stays, and neither the temporary nor a
    descriptor is left behind (mkstemp's was, 14 times in 400 random interrupts)."""
    model, _ = fit_model("topk")
    path = tmp_path / "model.safetensors"
    model.save(path)
    saved = path.read_bytes()
    before = _open_descriptors()

    def interrupted(temporary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _persistence.write_atomically(path, interrupted)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"] and path.read_bytes() == saved
    assert _open_descriptors() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc (Linux)")
def test_a_folder_lock_interrupted_as_it_is_taken_is_let_go(tmp_path, monkeypatch):
    """lock_folder: a Ctrl-C arriving with the flock taken kept the descriptor (and so the lock)
    open for the rest of the process: a later run in the same folder from the same session was
    refused as if another were running."""
    import fcntl

    from sklearn_jsae._backend.files import lock_folder

    real_flock = fcntl.flock

    def taken_then_interrupted(descriptor, operation):
        real_flock(descriptor, operation)
        raise KeyboardInterrupt

    before = _open_descriptors()
    monkeypatch.setattr(fcntl, "flock", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock_folder(tmp_path)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert _open_descriptors() == before
    held = lock_folder(tmp_path)  # free again
    assert held is not None
    os.close(held)


def test_a_folder_whose_temporary_names_are_all_taken_raises_naming_it(tmp_path, monkeypatch):
    """new_temporary tries 100 random names; a folder where every one is taken (a random source
    gone wrong) raises FileExistsError naming the folder, not an endless loop."""
    import secrets

    from sklearn_jsae._backend.files import new_temporary

    (tmp_path / ".m.same.tmp").write_bytes(b"someone else's")
    drawn = []
    monkeypatch.setattr(secrets, "token_hex", lambda n: drawn.append(n) or "same")
    with pytest.raises(FileExistsError, match=rf"no unused temporary name \.m\.\*\.tmp in {re.escape(repr(str(tmp_path)))}"):
        new_temporary(str(tmp_path), ".m.")
    assert len(drawn) == 100 and (tmp_path / ".m.same.tmp").read_bytes() == b"someone else's"

"""Export to and import from SAELens and sparsify, checked with the packages themselves.

- every exported SAE (both sides of a JSAE, and a TopKSparseAutoencoder), loaded by the package's
  own loader, encodes and decodes held-out rows as our ``transform`` / ``inverse_transform`` do;
- SAEs created, trained and saved by each package import as TopKSparseAutoencoders whose
  ``transform`` / ``inverse_transform`` match the package's ``encode`` / ``decode``, including
  SAELens' ``rescale_acts_by_decoder_norm`` and ``apply_b_dec_to_input=False``;
- hook names filled from a Hugging Face model and layer are the modules whose outputs are exactly
  the activations :func:`sklearn_jsae.hf.harvest` captured (checked with SAELens' own
  ``HookedProxyLM`` and with forward hooks where sparsify puts them);
- what cannot be represented is refused with a message naming it.

Tolerance: the packages compute the same float32 operations in another order (``x @ W_enc``
with a (d, n) matrix, ``embedding_bag`` decoding), so codes and reconstructions agree within
``1e-5 * max|value|`` (measured: codes bit-identical, reconstructions within 2e-6 of values of
order 10), and the set of active latents is identical.  ``sae-lens`` and ``eai-sparsify`` are
installed by ``scripts/install_test_models.sh``; without them these tests skip, except under
``CI`` where a missing package is an error.
"""

import copy
import json
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from installed import require
from safetensors import safe_open
from safetensors.numpy import save_file

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, interop
from sklearn_jsae.exceptions import PersistenceError
from sklearn_jsae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify

RTOL = 1e-5


@pytest.fixture(scope="module")
def sae_lens():
    return require("sae_lens")


@pytest.fixture(scope="module")
def sparsify():
    return require("sparsify")


@pytest.fixture(scope="module")
def problem():
    """A JSAE with d_in != d_out and non-zero biases, and held-out rows it never saw."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(700, 12)) * 3 + 1).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.GELU(), torch.nn.Linear(48, 10))
    jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=40, n_output_components=30, k=5, max_iter=15,
                                     batch_size=64, random_state=0).fit(X[:500])
    topk = TopKSparseAutoencoder(n_components=24, k=4, max_iter=15, batch_size=64, random_state=1)
    topk.fit(X[:500])
    return jsae, topk, X[500:]


def _cfg(folder):
    return json.loads(Path(folder, "cfg.json").read_text())


def _sides(problem):
    """(label, estimator, side, the SAE, its held-out input rows)."""
    jsae, topk, held_out = problem
    return [
        ("input", jsae, "input", jsae.input_sae_, held_out),
        ("output", jsae, "output", jsae.output_sae_, jsae.mlp_outputs(held_out)),
        ("topk", topk, None, topk, held_out),
    ]


def assert_agree(ours, theirs, what):
    """Within RTOL of the larger magnitude, on the same support; returns the max difference."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, what
    difference = float(np.abs(ours - theirs).max())
    assert difference <= RTOL * max(1.0, float(np.abs(ours).max())), (what, difference)
    return difference


@pytest.mark.parametrize("which", ["input", "output", "topk"])
def test_saelens_loads_our_export_and_encodes_like_transform(sae_lens, problem, tmp_path, which):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE

    _, estimator, side, sae, Z = next(s for s in _sides(problem) if s[0] == which)
    folder = to_saelens(estimator, tmp_path / "sae", side=side, model_name="my-model", hook_name="blocks.0.x",
                        metadata={"context_size": 128})
    loaded = SAE.load_from_disk(folder)
    assert isinstance(loaded, TopKSAE)
    assert (loaded.cfg.d_in, loaded.cfg.d_sae, loaded.cfg.k) == (sae.n_features_in_, sae.n_components, sae.k)
    assert loaded.cfg.metadata.model_name == "my-model" and loaded.cfg.metadata.hook_name == "blocks.0.x"
    assert loaded.cfg.metadata.context_size == 128
    codes = sae.transform(Z).toarray()
    with torch.no_grad():
        encoded = loaded.encode(torch.from_numpy(Z)).numpy()
        decoded = loaded.decode(torch.from_numpy(encoded)).numpy()
        forward = loaded(torch.from_numpy(Z)).numpy()
    assert np.array_equal(encoded != 0, codes != 0)
    assert_agree(codes, encoded, "encode")
    reconstruction = sae.inverse_transform(sae.transform(Z))
    assert_agree(reconstruction, decoded, "decode")
    assert_agree(reconstruction, forward, "forward")
    # Our cfg.json carries every field SAELens itself writes for a TopK SAE.
    own = loaded.cfg.to_dict()
    written = _cfg(folder)
    assert set(own) - {"metadata"} <= set(written)


@pytest.mark.parametrize("which", ["input", "output", "topk"])
def test_sparsify_loads_our_export_and_encodes_like_transform(sparsify, problem, tmp_path, which):
    from sparsify import SparseCoder

    _, estimator, side, sae, Z = next(s for s in _sides(problem) if s[0] == which)
    folder = to_sparsify(estimator, tmp_path / "layers.0.mlp", side=side, model_name="my-model",
                         hookpoint="layers.0.mlp")
    loaded = SparseCoder.load_from_disk(folder)
    assert (loaded.d_in, loaded.num_latents, loaded.cfg.k) == (sae.n_features_in_, sae.n_components, sae.k)
    with safe_open(os.path.join(folder, "sae.safetensors"), framework="np") as f:
        header = f.metadata()
    assert header["model"] == "my-model" and header["hookpoint"] == "layers.0.mlp"
    codes = sae.transform(Z).toarray()
    with torch.no_grad():
        out = loaded.encode(torch.from_numpy(Z))
        dense = torch.zeros(len(Z), loaded.num_latents).scatter(1, out.top_indices, out.top_acts).numpy()
        decoded = loaded.decode(out.top_acts, out.top_indices).numpy()
        forward = loaded(torch.from_numpy(Z)).sae_out.numpy()
    assert np.array_equal(dense != 0, codes != 0)
    assert_agree(codes, dense, "encode")
    reconstruction = sae.inverse_transform(sae.transform(Z))
    assert_agree(reconstruction, decoded, "decode")
    assert_agree(reconstruction, forward, "forward")
    # sparsify's own FVU (its training loss) is ours: 1 - score, Σ||z - ẑ||² / Σ||z - mean(z)||²
    with torch.no_grad():
        their_fvu = float(loaded(torch.from_numpy(Z)).fvu)
    assert their_fvu == pytest.approx(1 - sae.score(Z), rel=1e-5)
    if side is not None:
        from sklearn_jsae.metrics import fraction_variance_unexplained

        assert their_fvu == pytest.approx(fraction_variance_unexplained(estimator, problem[2])[side], rel=1e-5)


def test_sparsify_reads_a_jsae_exported_as_a_run_of_hookpoints(sparsify, problem, tmp_path):
    from sparsify import SparseCoder

    jsae = problem[0]
    to_sparsify(jsae, tmp_path / "run" / "layers.3.post_attention_layernorm", side="input")
    to_sparsify(jsae, tmp_path / "run" / "layers.3.mlp", side="output")
    both = SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert list(both) == ["layers.3.mlp", "layers.3.post_attention_layernorm"]
    assert both["layers.3.mlp"].num_latents == 30 and both["layers.3.post_attention_layernorm"].d_in == 12


@pytest.mark.parametrize("write", [to_saelens, to_sparsify])
def test_our_export_imports_back_bit_for_bit(problem, tmp_path, write):
    jsae, _, held_out = problem
    read = from_saelens if write is to_saelens else from_sparsify
    back = read(write(jsae, tmp_path / "sae", side="input"))
    for name in ("encoder_", "encoder_bias_", "components_", "decoder_bias_"):
        assert np.array_equal(getattr(back, name), getattr(jsae.input_sae_, name)), name
    assert back.k == jsae.k and back.n_components == 40
    assert (back.transform(held_out) != jsae.transform(held_out)).nnz == 0
    assert back.scale_ is None and back.history_ == [] and np.isnan(back.dead_fraction_)


@pytest.mark.parametrize("how", ["fit", "partial_fit", "fit_stream"])
def test_an_imported_sae_trains_on_as_fit_does(problem, tmp_path, how):
    """An imported SAE has no data scale (``scale_`` None): a warm start measures it.  ``fit`` did;
    ``partial_fit`` and ``fit_stream(warm_start=True)`` failed with ``float(None)``."""
    jsae, _, held_out = problem
    sae = from_saelens(to_saelens(jsae, tmp_path / "sae", side="input")).set_params(batch_size=32, warm_start=True)
    before = sae.score(held_out)
    rows = np.concatenate([held_out] * 4)
    if how == "fit":
        sae.fit(rows)
    elif how == "partial_fit":
        sae.partial_fit(rows)
    else:
        sae.fit_stream(np.array_split(rows, 4), n_statistics=200)
    assert sae.scale_ == pytest.approx(np.sqrt(((rows - rows.mean(0)) ** 2).mean()), rel=0.05)
    assert sae.score(held_out) >= before - 0.05  # went on from the imported weights


# --------------------------------------------------------------------------- imports
def _train(module, X, loss_of, steps=30):
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = torch.from_numpy(X)
    for _ in range(steps):
        optimiser.zero_grad()
        loss_of(module, x).backward()
        optimiser.step()


def _activations(seed=0, n=300, d=16):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(40, d))
    codes = rng.exponential(size=(n, 40)) * (rng.random((n, 40)) < 0.15)
    return (codes @ basis + rng.normal(size=d) * 2).astype(np.float32)


@pytest.mark.parametrize("rescale, apply_b_dec", [(False, True), (True, True), (True, False), (False, False)])
def test_import_a_saelens_sae(sae_lens, tmp_path, rescale, apply_b_dec):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    X = _activations()
    torch.manual_seed(0)
    trainer = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=16, d_sae=48, k=6, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec))
    _train(trainer, X[:200], lambda m, x: ((m.decode(m.encode(x)) - x) ** 2).mean())
    with torch.no_grad():  # decoder norms far from 1, so that any mishandled norm shows
        trainer.W_dec.mul_(torch.linspace(0.5, 2.0, 48)[:, None])
    trainer.save_model(tmp_path / "trained")  # the training SAE's own folder: weights as they are
    from sae_lens import SAE

    theirs = SAE.load_from_disk(tmp_path / "trained")
    assert theirs.cfg.rescale_acts_by_decoder_norm is rescale
    assert theirs.cfg.apply_b_dec_to_input is apply_b_dec
    ours = from_saelens(tmp_path / "trained")
    assert isinstance(ours, TopKSparseAutoencoder)
    assert (ours.n_components, ours.k, ours.n_features_in_) == (48, 6, 16)
    held_out = X[200:]
    with torch.no_grad():
        encoded = theirs.encode(torch.from_numpy(held_out)).numpy()
        decoded = theirs.decode(torch.from_numpy(encoded)).numpy()
    codes = ours.transform(held_out).toarray()
    assert np.array_equal(codes != 0, encoded != 0)
    assert_agree(codes, encoded, "encode")
    assert_agree(ours.inverse_transform(encoded), decoded, "decode")
    if rescale:  # folded: our decoder rows have unit norm
        np.testing.assert_allclose(np.linalg.norm(ours.components_, axis=1), 1, rtol=1e-6)


def test_import_a_saelens_inference_save(sae_lens, tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    X = _activations(seed=1)
    torch.manual_seed(1)
    trainer = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    _train(trainer, X[:200], lambda m, x: ((m.decode(m.encode(x)) - x) ** 2).mean())
    trainer.save_inference_model(tmp_path / "inference")
    theirs, ours = SAE.load_from_disk(tmp_path / "inference"), from_saelens(tmp_path / "inference")
    with torch.no_grad():
        encoded = theirs.encode(torch.from_numpy(X[200:])).numpy()
    assert_agree(ours.transform(X[200:]).toarray(), encoded, "encode")
    # SAELens before 6 wrote no architecture and k among the activation's keyword arguments.
    cfg_path = tmp_path / "inference" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("activation_fn", "activation_fn_str"):
        legacy = {name: value for name, value in cfg.items() if name not in ("architecture", "k")}
        legacy.update({key: "topk", "activation_fn_kwargs": {"k": cfg["k"]}})
        cfg_path.write_text(json.dumps(legacy))
        old = from_saelens(tmp_path / "inference")
        assert old.k == 4
        np.testing.assert_array_equal(old.transform(X[200:]).toarray(), ours.transform(X[200:]).toarray())


@pytest.mark.parametrize("version", [None, "5.2.1"])
def test_import_a_topk_sae_in_saelens_pre_6_layout(sae_lens, tmp_path, version):
    """SAELens 3-5 wrote a TopK SAE as architecture "standard" with ``activation_fn_str="topk"``,
    k in ``activation_fn_kwargs`` and, for a while, a ``scaling_factor`` of ones; SAELens reads it
    as a TopK SAE, and so does the import now (it was refused as a "standard" SAE)."""
    from safetensors.numpy import save_file
    from sae_lens import SAE

    rng = np.random.default_rng(3)
    d, n, k = 16, 40, 5
    weights = {"W_enc": rng.normal(size=(d, n)).astype(np.float32), "b_enc": rng.normal(size=n).astype(np.float32),
               "W_dec": rng.normal(size=(n, d)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32),
               "scaling_factor": np.ones(n, np.float32)}
    cfg = {"architecture": "standard", "d_in": d, "d_sae": n, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": k}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "finetuning_scaling_factor": False, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
           "hook_name": "blocks.0.hook_mlp_out", "hook_layer": 0, "context_size": 128, "prepend_bos": True}
    if version:
        cfg["sae_lens_version"] = version
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    theirs, ours = SAE.load_from_disk(str(folder)), from_saelens(folder)
    assert ours.k == k
    X = _activations(seed=4, d=d)
    with torch.no_grad():
        encoded = theirs.encode(torch.from_numpy(X)).numpy()
    assert_agree(ours.transform(X).toarray(), encoded, "encode")
    # A scaling factor that is not all ones is a fine-tuning factor: refused, as before.
    save_file({**weights, "scaling_factor": np.full(n, 2.0, np.float32)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(PersistenceError, match="has a finetuning scaling factor"):
        from_saelens(folder)
    # The flag alone, with an all-ones factor or none, is reset by SAELens: a plain TopK SAE (it was refused).
    for arrays in (weights, {name: a for name, a in weights.items() if name != "scaling_factor"}):
        save_file(arrays, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
        assert_agree(from_saelens(folder).transform(X).toarray(), encoded, "encode, finetuning flag alone")
    # A stale top-level k beside the keyword arguments' one: SAELens reads the latter before 6.0 (ours took k=8).
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 8}))
    assert from_saelens(folder).k == SAE.load_from_disk(str(folder)).cfg.k == k
    # SAELens 5 wrote architecture "topk" with k still among the activation's keyword arguments.
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk", "sae_lens_version": "5.9.1"}))
    assert from_saelens(folder).k == k and SAE.load_from_disk(str(folder)).cfg.k == k
    # After 6.0 "standard" means a ReLU SAE, whatever its activation field says.
    (folder / "cfg.json").write_text(json.dumps({**cfg, "sae_lens_version": "6.1.0"}))
    with pytest.raises(PersistenceError, match="is a SAELens 'standard' SAE"):
        from_saelens(folder)


@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_import_a_sparsify_sae(sparsify, tmp_path, normalize_decoder):
    from sparsify import SparseCoder, SparseCoderConfig

    X = _activations(seed=2)
    torch.manual_seed(0)
    coder = SparseCoder(16, SparseCoderConfig(num_latents=48, k=6, normalize_decoder=normalize_decoder))
    _train(coder, X[:200], lambda m, x: m(x).fvu)
    if normalize_decoder:
        coder.set_decoder_norm_to_unit_norm()
    coder.save_to_disk(tmp_path / "layers.2.mlp")
    theirs = SparseCoder.load_from_disk(tmp_path / "layers.2.mlp")
    ours = from_sparsify(tmp_path / "layers.2.mlp")
    assert (ours.n_components, ours.k, ours.n_features_in_) == (48, 6, 16)
    held_out = X[200:]
    with torch.no_grad():
        out = theirs.encode(torch.from_numpy(held_out))
        dense = torch.zeros(len(held_out), 48).scatter(1, out.top_indices, out.top_acts).numpy()
        decoded = theirs.decode(out.top_acts, out.top_indices).numpy()
    codes = ours.transform(held_out).toarray()
    assert np.array_equal(codes != 0, dense != 0)
    assert_agree(codes, dense, "encode")
    assert_agree(ours.inverse_transform(codes), decoded, "decode")


def test_refused_saelens_settings_are_named(sae_lens, tmp_path):
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)).save_model(tmp_path / "standard")
    with pytest.raises(PersistenceError, match="'standard' SAE; only 'topk'"):
        from_saelens(tmp_path / "standard")
    layer_norm = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2, normalize_activations="layer_norm"))
    layer_norm.save_model(tmp_path / "ln")
    with pytest.raises(PersistenceError, match="normalize_activations='layer_norm'"):
        from_saelens(tmp_path / "ln")


def test_refused_sparsify_settings_are_named(sparsify, tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2, transcode=True)).save_to_disk(tmp_path / "tc")
    with pytest.raises(PersistenceError, match="is a transcoder"):
        from_sparsify(tmp_path / "tc")
    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2, skip_connection=True)).save_to_disk(tmp_path / "sk")
    with pytest.raises(PersistenceError, match="skip connection"):
        from_sparsify(tmp_path / "sk")
    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2, activation="groupmax")).save_to_disk(tmp_path / "g")
    with pytest.raises(PersistenceError, match="activation='groupmax'"):
        from_sparsify(tmp_path / "g")


# --------------------------------------------------------------------------- no package needed
def test_damaged_or_foreign_folders_are_refused(problem, tmp_path):
    jsae = problem[0]
    with pytest.raises(PersistenceError, match="is not a folder"):
        from_saelens(tmp_path / "nothing")
    folder = to_saelens(jsae, tmp_path / "sl", side="output")
    with pytest.raises(PersistenceError, match="has no sae.safetensors"):
        from_sparsify(folder)
    weights = os.path.join(folder, "sae_weights.safetensors")
    data = Path(weights).read_bytes()
    Path(weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(PersistenceError, match="cannot be read.*truncated"):
        from_saelens(folder)
    folder = to_saelens(jsae, tmp_path / "sl2", side="output")
    _as_foreign(folder, "sae_weights.safetensors")
    Path(folder, "cfg.json").write_text(json.dumps({**_cfg(folder), "d_sae": 31}))
    with pytest.raises(PersistenceError, match=r"'W_enc' has shape \(10, 30\), but cfg.json implies"):
        from_saelens(folder)
    Path(folder, "cfg.json").write_text("{not json")
    with pytest.raises(PersistenceError, match="not valid JSON"):
        from_saelens(folder)
    folder = to_sparsify(jsae, tmp_path / "sp", side="input")
    save_file({"encoder.weight": np.zeros((40, 12), np.float32)}, os.path.join(folder, "sae.safetensors"))
    with pytest.raises(PersistenceError, match="no tensor 'encoder.bias'"):
        from_sparsify(folder)


def _edit_weights(folder, weights_name, edit):
    path = os.path.join(folder, weights_name)
    with safe_open(path, framework="np") as f:
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    save_file(edit(arrays), path)


def _as_foreign(folder, weights_name):
    """Drop our safetensors header (with the cfg digest), as in a folder SAELens or sparsify
    wrote themselves, so that an edited cfg.json is read as such and not refused as torn."""
    _edit_weights(folder, weights_name, lambda arrays: arrays)


def _with(arrays, name, value):
    return {**arrays, name: value}


def _nan_at_0(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


# (library, what is changed, the change, the error that names it).  The output side of the
# problem's JSAE: d = 10 features, 30 latents, k = 5.
MALFORMED = [
    ("saelens", "cfg", lambda cfg: [cfg], "cfg.json is not a JSON object"),
    ("saelens", "cfg", lambda cfg: {**cfg, "k": 0}, r"SAELens cfg.json has k=0; expected a positive integer"),
    ("saelens", "cfg", lambda cfg: {**cfg, "d_sae": "30"}, r"has d_sae='30'; expected a positive integer"),
    ("saelens", "cfg", lambda cfg: {**cfg, "k": 31}, "k=31 exceeds the 30 latents"),
    # (a list or a dict raised a bare TypeError: unhashable)
    ("saelens", "cfg", lambda cfg: {**cfg, "normalize_activations": ["none"]},
     r"normalize_activations=\['none'\]; expected a string such as \"none\""),
    ("saelens", "cfg", lambda cfg: {**cfg, "normalize_activations": {"a": 1}},
     r"normalize_activations=\{'a': 1\}; expected a string"),
    ("saelens", "weights", lambda a: _with(a, "W_dec", _nan_at_0(a["W_dec"])), "weights contain NaN or inf"),
    ("saelens", "weights", lambda a: _with(a, "b_enc", np.full(30, 1e39)), "contain NaN or inf .or overflow"),
    ("saelens", "weights", lambda a: _with(a, "b_enc", np.zeros(30, np.int32)),
     r"tensor 'b_enc' has dtype torch.int32, not a float type"),
    ("saelens", "weights", lambda a: _with(a, "threshold", np.zeros(30, np.float32)),
     r"has tensors a TopK SAE does not use: \['threshold'\]"),
    ("sparsify", "cfg", lambda cfg: {**cfg, "signed": True}, "signed=true"),
    ("sparsify", "cfg", lambda cfg: {**cfg, "num_latents": 0, "expansion_factor": None},
     "sparsify cfg.json has expansion_factor=None"),
    ("sparsify", "weights", lambda a: _with(a, "extra.scale", np.ones(1, np.float32)),
     r"has tensors a TopK SAE does not use: \['extra.scale'\]"),
]


@pytest.mark.parametrize("library, part, change, message", MALFORMED,
                         ids=[f"{lib}-{message[:24]}" for lib, _, _, message in MALFORMED])
def test_a_malformed_export_is_refused_naming_what_is_wrong(problem, tmp_path, library, part, change,
                                                            message):
    """Every check of an imported folder: an export of ours with one thing changed is refused
    with a PersistenceError naming it, and the folder is left as it is."""
    jsae = problem[0]
    if library == "saelens":
        export, load, weights_name = to_saelens, from_saelens, "sae_weights.safetensors"
    else:
        export, load, weights_name = to_sparsify, from_sparsify, "sae.safetensors"
    folder = export(jsae, tmp_path / library, side="output")
    load(folder)  # as written, it loads
    if part == "cfg":
        _as_foreign(folder, weights_name)
        Path(folder, "cfg.json").write_text(json.dumps(change(_cfg(folder))))
    else:
        _edit_weights(folder, weights_name, change)
    before = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    with pytest.raises(PersistenceError, match=message):
        load(folder)
    assert {p.name: p.read_bytes() for p in Path(folder).iterdir()} == before


def test_export_arguments_are_checked(problem, tmp_path):
    jsae, topk, _ = problem
    with pytest.raises(ValueError, match="pass side='input'.*or side='output'"):
        to_saelens(jsae, tmp_path / "a")
    with pytest.raises(ValueError, match="side='middle' must be"):
        to_sparsify(jsae, tmp_path / "a", side="middle")
    with pytest.raises(ValueError, match="pass both model= and layer="):
        to_saelens(topk, tmp_path / "a", side="input", layer=3)
    with pytest.raises(ValueError, match="name the MLP the SAE was trained on, but not which side"):
        to_saelens(topk, tmp_path / "a", model=torch.nn.Linear(2, 2), layer=3)
    with pytest.raises(TypeError, match="metadata must be a dict, got list"):
        to_saelens(topk, tmp_path / "a", metadata=["trained on pydoc"])
    assert not (tmp_path / "a").exists()  # nothing written by a refused export
    with pytest.raises(TypeError, match="fitted TopKSparseAutoencoder or JacobianSparseAutoencoder"):
        to_saelens(object(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        to_sparsify(topk, tmp_path / "file")


def _re_export_case(problem, tmp_path, library):
    """A fitted TopK SAE exported to ``library``'s format, its export functions and weights' file
    name, and another model (k = 2, other weights) to export over it."""
    topk = problem[1]
    export, read, weights = ((to_saelens, from_saelens, "sae_weights.safetensors") if library == "saelens"
                             else (to_sparsify, from_sparsify, "sae.safetensors"))
    new = copy.deepcopy(topk)
    new.k, new.components_ = 2, topk.components_ * 2
    return topk, export, read, weights, new, export(topk, tmp_path / "sae")


@pytest.mark.parametrize("library", ["saelens", "sparsify"])
def test_an_interrupted_re_export_is_refused_and_a_complete_one_loads(problem, tmp_path, monkeypatch,
                                                                      library):
    """A re-export renames the weights into place, then cfg.json: interrupted between the two, the
    folder holds the new weights beside the old cfg.json (here: the old k), which must not import."""
    topk, export, read, weights, new, folder = _re_export_case(problem, tmp_path, library)
    real = os.replace

    def interrupted(source, destination):
        if os.path.basename(destination) == "cfg.json":
            raise KeyboardInterrupt  # Ctrl-C, or a kill, between the two renames
        return real(source, destination)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(new, folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == sorted(["cfg.json", weights])  # no temporaries left
    assert _cfg(folder)["k"] == 4  # torn: the old cfg.json beside the new weights
    with pytest.raises(PersistenceError, match=f"cfg.json is not the one exported with {weights}.*the "
                                               f"export was interrupted.*export the SAE again"):
        read(folder)
    back = read(export(new, folder))
    assert back.k == 2 and np.array_equal(back.components_, new.components_)
    # The digest is of the cfg's content: another layout of the same JSON still loads.
    Path(folder, "cfg.json").write_text(json.dumps(_cfg(folder), indent=None, sort_keys=True))
    assert read(folder).k == 2
    Path(folder, "cfg.json").write_text(json.dumps({**_cfg(folder), "k": 3}))  # an edit is refused too
    with pytest.raises(PersistenceError, match="or cfg.json was edited afterwards"):
        read(folder)


@pytest.mark.parametrize("library", ["saelens", "sparsify"])
def test_a_re_export_that_fills_the_disk_at_cfg_json_leaves_the_previous_export(problem, tmp_path,
                                                                                monkeypatch, library):
    """The weights were renamed into place before cfg.json was written: a full disk at cfg.json
    left the new weights beside the old cfg.json, which the import refuses, so the previous
    export was lost.  Both files are written before either is renamed."""
    import builtins
    import errno

    topk, export, read, weights, new, folder = _re_export_case(problem, tmp_path, library)
    before = {name: Path(folder, name).read_bytes() for name in os.listdir(folder)}

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, text):
            self.f.write(text[:10])  # part-way, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_at_cfg(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode and "cfg.json" in os.path.basename(os.fspath(file)) else f

    monkeypatch.setattr(interop, "open", full_at_cfg, raising=False)
    with pytest.raises(OSError, match=f"cannot write .*{re.escape(str(folder))}.*No space left on device.*: "
                                      f"the folder's previous .* unchanged .*free space on its disk") as info:
        export(new, folder)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert {name: Path(folder, name).read_bytes() for name in os.listdir(folder)} == before  # no temporaries
    back = read(folder)
    assert back.k == 4 and np.array_equal(back.components_, topk.components_)


def _case_variants(word):
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(word, upper, strict=True)))


NOT_A_BOOL = st.one_of(st.none(), st.integers(-2, 2), st.floats(allow_nan=False),
                       st.lists(st.booleans(), max_size=2),
                       st.text(max_size=6).filter(lambda t: t.lower() not in ("true", "false")))


@pytest.fixture(scope="module")
def foreign_folders(problem, tmp_path_factory):
    """The problem's TopK SAE exported to each format, then without our header (as if written by
    the package itself, so that cfg.json can be edited), and its import as written."""
    topk, root = problem[1], tmp_path_factory.mktemp("flags")
    saelens, sparsify = to_saelens(topk, root / "saelens"), to_sparsify(topk, root / "sparsify")
    _as_foreign(saelens, "sae_weights.safetensors")
    _as_foreign(sparsify, "sae.safetensors")
    return {"saelens": (saelens, _cfg(saelens), from_saelens),
            "sparsify": (sparsify, _cfg(sparsify), from_sparsify)}


FLAGS = [("saelens", "rescale_acts_by_decoder_norm"), ("saelens", "apply_b_dec_to_input"),
         ("saelens", "finetuning_scaling_factor"), ("sparsify", "transcode"), ("sparsify", "skip_connection"),
         ("sparsify", "signed")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(FLAGS), truth=st.booleans(), data=st.data())
def test_boolean_cfg_flags_are_read_strictly(foreign_folders, flag, truth, data):
    """A flag written as a string "true"/"false" (any case) imports as the bool it names; any
    other non-bool value is refused naming the key (a truthy "false" once rescaled the weights)."""
    library, key = flag
    folder, cfg, read = foreign_folders[library]
    path = Path(folder, "cfg.json")

    def outcome(value):
        path.write_text(json.dumps({**cfg, key: value}))
        try:
            sae = read(folder)
        except PersistenceError as exc:  # refused (a transcoder, ...): for the same reason
            return str(exc)
        return [getattr(sae, name).tolist() for name in ("encoder_", "encoder_bias_", "components_")]

    try:
        spelled = data.draw(_case_variants("true" if truth else "false"))
        assert outcome(spelled) == outcome(truth)
        value = data.draw(NOT_A_BOOL)
        with pytest.raises(PersistenceError, match=re.escape(f"has {key}={value!r}; expected true or false")):
            path.write_text(json.dumps({**cfg, key: value}))
            read(folder)
    finally:
        path.write_text(json.dumps(cfg))


def test_a_string_false_does_not_rescale_the_weights(problem, foreign_folders):
    folder, cfg, _ = foreign_folders["saelens"]
    try:
        Path(folder, "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": "false"}))
        assert np.array_equal(from_saelens(folder).components_, problem[1].components_)
        Path(folder, "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": "no"}))
        with pytest.raises(PersistenceError, match="decoder_norm='no'; expected true or false"):
            from_saelens(folder)
    finally:
        Path(folder, "cfg.json").write_text(json.dumps(cfg))


def test_unserialisable_metadata_is_named_before_anything_is_written(problem, tmp_path):
    topk = problem[1]
    with pytest.raises(TypeError, match=r"metadata\['a'\]=<object object .* cannot be written to cfg.json .*"
                                        r"values JSON-serialisable"):
        to_saelens(topk, tmp_path / "new", metadata={"context_size": 128, "a": object()})
    assert not (tmp_path / "new").exists()
    folder = to_saelens(topk, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    with pytest.raises(TypeError, match=r"metadata\[\(1, 2\)\]=1 .*keys must be strings"):
        to_saelens(topk, folder, metadata={(1, 2): 1})
    assert {p.name: p.read_bytes() for p in Path(folder).iterdir()} == before


# --------------------------------------------------------------------------- hook names from a model
@pytest.fixture(scope="module")
def tiny_models():
    transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=3, n_head=2, n_positions=32, vocab_size=60)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=60)).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        vocab_size=60)).eval()
    return {"gpt2": gpt2, "llama": llama, "bert": bert}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_hook_names_from_a_model_are_where_harvest_reads(tiny_models, problem, tmp_path, name):
    from sklearn_jsae.hf import harvest

    model, layer = tiny_models[name], 1
    ids = torch.randint(1, 59, (2, 7), generator=torch.Generator().manual_seed(0))
    X, Y = harvest(model, layer, input_ids=ids, progress=False)
    topk = problem[1]
    for side, expected in (("input", X), ("output", Y)):
        folder = to_saelens(topk, tmp_path / f"sl_{side}", side=side, model=model, layer=layer)
        meta = _cfg(folder)["metadata"]
        folder = to_sparsify(topk, tmp_path / f"sp_{side}", side=side, model=model, layer=layer)
        with safe_open(os.path.join(folder, "sae.safetensors"), framework="np") as f:
            hookpoint = f.metadata()["hookpoint"]
        assert meta["model_class_name"] == "AutoModelForCausalLM" and meta["sklearn_jsae_side"] == side
        prefix = type(model.base_model).base_model_prefix
        assert meta["hook_name"] == f"{prefix}.{hookpoint}"
        # sparsify's trainer reads the output of model.base_model.get_submodule(hookpoint).
        seen = []

        def grab(module, args, output, seen=seen):
            seen.append(output[0] if isinstance(output, tuple) else output)

        handle = model.base_model.get_submodule(hookpoint).register_forward_hook(grab)
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        assert np.array_equal(seen[0].reshape(-1, seen[0].shape[-1]).numpy(), expected)


def test_explicit_names_win_over_derived_ones(tiny_models, problem, tmp_path):
    gpt2, topk = tiny_models["gpt2"], problem[1]
    meta = _cfg(to_saelens(topk, tmp_path / "sl", side="input", model=gpt2, layer=1, model_name="gpt2",
                           hook_name="blocks.1.ln2.hook_normalized"))["metadata"]
    assert meta["model_name"] == "gpt2" and meta["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert "model_class_name" not in meta  # a TransformerLens name: SAELens' default model class
    folder = to_sparsify(topk, tmp_path / "sp", side="output", model=gpt2, layer=1,
                         hookpoint="h.1.mlp.c_proj")
    with safe_open(os.path.join(folder, "sae.safetensors"), framework="np") as f:
        assert f.metadata()["hookpoint"] == "h.1.mlp.c_proj" and "model" not in f.metadata()


def test_saelens_hooks_our_hook_name_on_the_causal_lm(sae_lens, tiny_models, problem, tmp_path):
    from sae_lens.load_model import HookedProxyLM

    from sklearn_jsae.hf import harvest

    model, layer = tiny_models["gpt2"], 2
    ids = torch.randint(1, 59, (2, 7), generator=torch.Generator().manual_seed(1))
    X, Y = harvest(model, layer, input_ids=ids, progress=False)
    for side, expected in (("input", X), ("output", Y)):
        folder = to_saelens(problem[1], tmp_path / side, side=side, model=model, layer=layer)
        hook_name = _cfg(folder)["metadata"]["hook_name"]
        proxy = HookedProxyLM(model, tokenizer=None, hook_names=[hook_name])
        _, cache = proxy.run_with_cache(ids, names_filter=[hook_name])
        assert np.array_equal(cache[hook_name].reshape(-1, 16).numpy(), expected), hook_name


def test_the_saving_page_runs(sae_lens, sparsify, tmp_path, monkeypatch, capsys):
    page = Path(__file__).resolve().parents[1] / "docs" / "saving.rst"
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", page.read_text())
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "saving_page"}
    for block in blocks:
        exec(compile(textwrap.dedent(block), str(page), "exec"), namespace)  # noqa: S102 (our own page)
    printed = capsys.readouterr().out
    assert "loaded without its MLP" in printed and "sequential gelu" in printed
    assert sorted(os.listdir(tmp_path / "run")) == ["h.3.ln_2", "h.3.mlp"]


def _folded_lens(cls=None):
    """A tiny random TransformerLens model (``cls``, default HookedTransformer) with its LayerNorm
    folded (LNPre: ``blocks.1.ln2.hook_normalized`` is the MLP input), built from a config."""
    lens = require("transformer_lens")
    config = lens.HookedTransformerConfig(n_layers=2, d_model=32, d_head=16, n_heads=2, d_mlp=64, d_vocab=100,
                                          n_ctx=64, act_fn="gelu_new", normalization_type="LNPre")
    torch.manual_seed(0)
    return (cls or lens.HookedTransformer)(config).eval()


def _saelens_store(model, tokens, hook_name):
    """SAELens' own ActivationsStore over a local dataset of token ids (nothing downloaded)."""
    require("datasets")
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(
        model=model, dataset=Dataset.from_dict({"input_ids": tokens.tolist()}), streaming=False,
        hook_name=hook_name, hook_head_index=None, context_size=tokens.shape[1], d_in=model.cfg.d_model,
        n_batches_in_buffer=16, total_training_tokens=tokens.size, store_batch_size_prompts=8,
        train_batch_size_tokens=128, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", disable_concat_sequences=True,
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_saelens_activations_store_is_a_stream_for_fit_stream(tmp_path):
    """A SAELens user's ActivationsStore at the MLP input's hook point (blocks.1.ln2.hook_normalized,
    with the LayerNorm folded) is a stream of MLP inputs: every row it yields is one harvest reads
    from the same tokens, fit_stream trains on exactly its rows (the same model as on the recorded
    batches) up to n_tokens (the store never ends).  Its state_dict (a count of sequences, tensors)
    has no load_state_dict: a checkpointed fit says up front that it cannot resume, saves its
    checkpoints all the same, and a restart is refused by name."""
    from sklearn_jsae.exceptions import CheckpointError
    from sklearn_jsae.hf import harvest, mlp_of

    require("sae_lens")
    model = _folded_lens()
    tokens = np.random.default_rng(0).integers(5, 100, size=(64, 16))
    harvested, _ = harvest(model, 1, input_ids=tokens, progress=False)
    store = _saelens_store(model, tokens, "blocks.1.ln2.hook_normalized")
    recorded = []

    def recording():
        for batch in store:
            recorded.append(batch.clone())
            yield batch

    settings = dict(n_components=64, k=4, batch_size=128, n_tokens=1536, random_state=0)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), **settings).fit_stream(recording())
    rows = torch.cat(recorded).numpy()
    assert rows.shape[0] >= 1536 and jsae.history_[-1]["tokens_seen"] == 1536
    # each row the store gave is an MLP input harvest reads from these tokens (float32 rounding)
    distance = ((rows[:, None, :] - harvested[None, :, :]) ** 2).sum(-1).min(axis=1)
    assert distance.max() < 1e-8
    again = JacobianSparseAutoencoder(mlp_of(model, 1), **settings).fit_stream(iter(recorded))
    np.testing.assert_array_equal(again.input_sae_.components_, jsae.input_sae_.components_)
    np.testing.assert_array_equal(again.output_sae_.encoder_, jsae.output_sae_.encoder_)
    checkpointed = JacobianSparseAutoencoder(mlp_of(model, 1), checkpoint_dir=tmp_path / "ck", checkpoint_every=4,
                                             **settings)
    with pytest.warns(UserWarning, match=r"\(ActivationsStore\) has no state_dict/load_state_dict"):
        checkpointed.fit_stream(_saelens_store(model, tokens, "blocks.1.ln2.hook_normalized"))
    from sklearn_jsae._backend.checkpoint import checkpoint_paths

    assert len(checkpoint_paths(tmp_path / "ck")) == 1
    with pytest.raises(CheckpointError, match="has no state_dict/load_state_dict to resume from"):
        checkpointed.fit_stream(_saelens_store(model, tokens, "blocks.1.ln2.hook_normalized"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_spliced_ce_score_equals_saelens_own_splicing(tmp_path):
    """Our spliced CE against SAELens's: the JSAE's two SAEs exported with model= a HookedTransformer
    and attached by SAELens's HookedSAETransformer (reconstruction in place of the activation, no
    error term) give the loss spliced_ce_score reports for each side; the clean loss matches too."""
    from sklearn_jsae.hf import harvest, mlp_of
    from sklearn_jsae.metrics import spliced_ce_score

    sae_lens = require("sae_lens")
    model = _folded_lens(sae_lens.HookedSAETransformer)
    ids = torch.randint(5, 100, (6, 16), generator=torch.Generator().manual_seed(3))
    X, _ = harvest(model, 1, input_ids=ids, progress=False)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=48, k=4, batch_size=16, max_iter=10,
                                     random_state=0).fit(X)
    ours = spliced_ce_score(model, 1, jsae, ids)
    with torch.no_grad():
        assert ours["ce_clean"] == pytest.approx(float(model(ids, return_type="loss")), rel=1e-5)
        for side in ("input", "output"):
            sae = sae_lens.SAE.load_from_disk(to_saelens(jsae, tmp_path / side, side=side, model=model, layer=1))
            spliced = float(model.run_with_saes(ids, saes=[sae], use_error_term=False, return_type="loss"))
            assert ours[f"ce_{side}"] == pytest.approx(spliced, rel=1e-5), side
            assert abs(spliced - ours["ce_clean"]) > 1e-4  # the splice changes the loss: the check bites
    # with an SAE left attached, every pass (the clean one too) includes it: said, not hidden
    model.add_sae(sae, use_error_term=False)
    try:
        with pytest.warns(UserWarning, match=r"HookedSAETransformer has SAEs attached at \['blocks.1.hook_mlp_out'\]"):
            attached = spliced_ce_score(model, 1, jsae, ids)
        with pytest.warns(UserWarning, match="harvest reads the model with their reconstructions spliced in"):
            harvest(model, 1, input_ids=ids, progress=False)
    finally:
        model.reset_saes()
    assert attached["ce_clean"] == pytest.approx(ours["ce_output"], rel=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jacobian_equals_autograd_through_saelens_saes_and_the_lens_mlp(tmp_path):
    """The Jacobian a SAELens user would take by autograd, through the exported SAEs (SAELens's own
    encode and decode) and TransformerLens's own MLP module, moving the active input latents at
    the true input: ours, to float32 rounding, on every token and every active pair."""
    from sklearn_jsae.hf import harvest, mlp_of

    sae_lens = require("sae_lens")
    model = _folded_lens()
    X, _ = harvest(model, 1, input_ids=torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(5)),
                   progress=False)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=48, n_output_components=40, k=4, batch_size=16,
                                     max_iter=10, random_state=0).fit(X)
    sae_x, sae_y = (sae_lens.SAE.load_from_disk(to_saelens(jsae, tmp_path / side, side=side, model=model, layer=1))
                    for side in ("input", "output"))
    rows = X[:12]
    ours = jsae.jacobian(rows).toarray()  # (n, n_out, n_in)
    _, idx_x = jsae.input_sae_._codes(rows)
    _, idx_y = jsae.output_sae_._codes(jsae.mlp_outputs(rows))
    lens_mlp = model.blocks[1].mlp
    for t in range(len(rows)):
        x = torch.from_numpy(rows[t : t + 1])
        active_x, active_y = torch.from_numpy(idx_x[t]).long(), torch.from_numpy(idx_y[t]).long()
        with torch.no_grad():
            start = sae_x.encode(x)[0, active_x]

        def latents_out(values):
            moved = x + (values - start) @ sae_x.W_dec[active_x]  # the input moved along the active decoder rows
            return sae_y.encode(lens_mlp(moved[None]))[0, 0, active_y]

        theirs = torch.autograd.functional.jacobian(latents_out, start).numpy()
        np.testing.assert_allclose(ours[t][np.ix_(idx_y[t], idx_x[t])], theirs, rtol=1e-4, atol=1e-5)
        assert np.abs(theirs).max() > 1e-3


def test_an_export_removes_the_temporaries_a_killed_export_left(problem, tmp_path):
    """As save does: an export's temporaries are named after their writer, and the next export into
    the folder removes a killed one's (every one of 15 kills left them) but not a live writer's."""
    from test_persistence import _dead_and_live_temporaries

    folder = tmp_path / "sl"
    to_saelens(problem[0], folder, side="output")
    left = [_dead_and_live_temporaries(folder, name) for name in ("cfg.json", "sae_weights.safetensors")]
    from_saelens(to_saelens(problem[0], folder, side="output"))
    for dead, live in left:
        assert not dead.exists() and live.exists()

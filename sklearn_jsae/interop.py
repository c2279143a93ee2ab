"""Share SAEs with SAELens and sparsify: export to their folders, import theirs.

Both libraries store one TopK SAE as a folder with a ``cfg.json`` and a safetensors file.  The
functions here write and read those folders directly (neither package is needed to export or
import; the tests load every export with the packages' own loaders).

How our ``s = ReLU(TopK_k((x - b_dec) W_enc^T + b_enc))``, ``x̂ = s W_dec + b_dec`` maps onto each
format (the User Guide's "Saving, loading and sharing" page has the full table):

* SAELens (``architecture="topk"``, ``cfg.json`` + ``sae_weights.safetensors``): ``W_enc`` is
  (d_in, d_sae), our ``encoder_.T``; ``b_enc``, ``W_dec`` (d_sae, d_in) = ``components_`` and
  ``b_dec`` as ours.  ``b_dec`` is subtracted before encoding when ``apply_b_dec_to_input`` (written
  True); TopK then ReLU, as here; ``rescale_acts_by_decoder_norm`` written False.
* sparsify (``cfg.json`` + ``sae.safetensors``): ``encoder.weight`` (n, d) = ``encoder_``,
  ``encoder.bias``, ``W_dec`` (n, d) and ``b_dec``.  ``b_dec`` is subtracted before encoding unless
  ``transcode`` (written False).  ReLU comes *before* TopK: the codes and reconstructions are the
  same; only which zero-valued latents count as "selected" differs.  An SAE is named by its
  folder (the hookpoint); the model and hookpoint we know go in the weights file's header.

All our fitted weights are in raw activation units (the training scale ``scale_`` is folded in),
so an exported SAE encodes the activations the model produces, with no normalisation.

What an export drops
--------------------
The formats hold one SAE.  A :class:`~sklearn_jsae.JacobianSparseAutoencoder` is exported one
side at a time (``side="input"``: the SAE on the MLP inputs; ``"output"``: on the MLP outputs);
the pairing, the MLP, ``jacobian_``, the training history, the hyperparameters other than ``k``
and the size, and ``feature_names_in_`` are not written.  Keep the JSAE itself with
``jsae.save(path)`` (see :func:`sklearn_jsae.load`).

Model and hook metadata
-----------------------
Pass ``model_name`` and ``hook_name`` (SAELens) / ``hookpoint`` (sparsify) when you know them
(for TransformerLens models, SAELens' default, the MLP input is usually
``blocks.{layer}.ln2.hook_normalized`` and its output ``blocks.{layer}.hook_mlp_out``).  A
fitted estimator does not record which model it was trained on, so for SAEs trained on
:func:`sklearn_jsae.hf.harvest` activations pass ``model=`` (the Hugging Face model) and
``layer=``: the names are then filled in as Hugging Face module names, the form both packages
hook (the module whose output is the MLP input, e.g. GPT-2's ``h.3.ln_2``, and the MLP module,
``h.3.mlp``); for SAELens, prefixed to the ``*ForCausalLM`` model
(``transformer.h.3.ln_2``) with ``model_class_name="AutoModelForCausalLM"``, and
``model_name`` is ``model.name_or_path``.  Explicit arguments win over derived names.

Importing
---------
:func:`from_saelens` and :func:`from_sparsify` return a fitted
:class:`~sklearn_jsae.TopKSparseAutoencoder` whose ``transform`` / ``inverse_transform`` equal
the package's ``encode`` / ``decode`` up to float32 rounding (for a bfloat16 or float16 SAE:
the package's own computation in float32; in its stored dtype it rounds, and can pick other
latents near a tie).  Conventions that differ from ours
are folded into the weights exactly: SAELens' ``rescale_acts_by_decoder_norm`` (encoder rows and
bias times the decoder norms, decoder rows divided by them) and ``apply_b_dec_to_input=False``
(``b_enc + b_dec @ W_enc``).  Weights become float32 (float16 and bfloat16 exactly).  What
cannot be represented is refused with :class:`~sklearn_jsae.exceptions.PersistenceError`:
architectures other than TopK, SAELens activation normalisation other than ``"none"``,
sparsify transcoders, skip connections and ``groupmax``.  The imported estimator has
``history_ == []``, ``n_iter_ == 0``, ``dead_fraction_`` NaN and ``scale_`` None (a warm-start
``fit`` measures it from the data; it also renormalises decoder rows to unit norm).

Examples
--------
>>> import json, os, tempfile, numpy as np
>>> from sklearn_jsae import TopKSparseAutoencoder
>>> from sklearn_jsae.interop import from_saelens, to_saelens
>>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
>>> sae = TopKSparseAutoencoder(n_components=16, k=4, max_iter=3, random_state=0).fit(X)
>>> folder = to_saelens(sae, os.path.join(tempfile.mkdtemp(), "sae"), model_name="gpt2",
...                     hook_name="blocks.3.ln2.hook_normalized")
>>> sorted(os.listdir(folder))
['cfg.json', 'sae_weights.safetensors']
>>> json.load(open(os.path.join(folder, "cfg.json")))["metadata"]["hook_name"]
'blocks.3.ln2.hook_normalized'
>>> bool((from_saelens(folder).transform(X) != sae.transform(X)).nnz == 0)
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os

import numpy as np

from .exceptions import PersistenceError

__all__ = ["from_saelens", "from_sparsify", "to_saelens", "to_sparsify"]

CFG_FILENAME = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
# The cfg.json layout written: SAELens reads configs without a version >= 6.0 as its pre-6 layout.
SAELENS_LAYOUT_VERSION = "6.0.0"
_SIDES = ("input", "output")
# The safetensors metadata key of our exports that holds the digest of the cfg.json written with
# the weights: the two files are replaced one after the other, and a pair torn apart by an
# interrupt between them must not import as one SAE.
CFG_DIGEST_KEY = "sklearn_jsae_cfg_sha256"


# ---------------------------------------------------------------------------- export
def _chosen_sae(estimator, side):
    """``(TopKSparseAutoencoder, side or None)`` for an export; errors name ``side``."""
    from sklearn.utils.validation import check_is_fitted

    from ._estimator import JacobianSparseAutoencoder
    from ._topk import TopKSparseAutoencoder

    if side is not None and side not in _SIDES:
        raise ValueError(f"side={side!r} must be 'input', 'output' or None.")
    if isinstance(estimator, JacobianSparseAutoencoder):
        check_is_fitted(estimator)
        if side is None:
            raise ValueError(
                "estimator is a JacobianSparseAutoencoder, a pair of SAEs, and these formats hold one "
                "SAE per folder: pass side='input' (the SAE on the MLP inputs) or side='output' (on "
                "the MLP outputs), one folder each."
            )
        return (estimator.input_sae_ if side == "input" else estimator.output_sae_), side
    if isinstance(estimator, TopKSparseAutoencoder):
        check_is_fitted(estimator)
        return estimator, side
    raise TypeError(
        f"estimator must be a fitted TopKSparseAutoencoder or JacobianSparseAutoencoder, got "
        f"{type(estimator).__name__}."
    )


def _hooks(model, layer, side, named: bool, library: str):
    """The :class:`~sklearn_jsae._hookpoints.MLPHookpoints` of ``model``/``layer``, or None.
    ``named``: the caller gave the hook name, so a missing derived one is no error; ``library``
    ("saelens" or "sparsify"): whose name must exist."""
    if model is None and layer is None:
        return None
    if model is None or layer is None:
        raise ValueError(
            f"pass both model= and layer= to fill the model and hook names (got model="
            f"{type(model).__name__ if model is not None else None}, layer={layer!r})."
        )
    if side is None:
        raise ValueError(
            "model= and layer= name the MLP the SAE was trained on, but not which side: pass "
            "side='input' for an SAE of the MLP inputs or side='output' for its outputs."
        )
    from ._hookpoints import mlp_hookpoints

    hooks = mlp_hookpoints(model, layer)
    name = hooks.saelens(side) if library == "saelens" else hooks.sparsify(side)
    if name is None and not named:
        lens = (f" (TransformerLens: a norm's hook_normalized comes before its weights; with them folded "
                f"into the MLP, fold_ln=True as HookedTransformer.from_pretrained does by default, "
                f"blocks.{layer}.ln2.hook_normalized is the MLP input)" if hooks.lens else "")
        if hooks.lens and type(model).__name__ == "HookedEncoder":
            # Post-LN BERT: the MLP reads ln1 after its weights, which TransformerLens cannot fold.
            lens = (f" (TransformerLens's HookedEncoder is post-LN: its MLP reads blocks.{layer}.ln1's output "
                    f"after the norm's weight and bias, and its only hook there, "
                    f"blocks.{layer}.ln1.hook_normalized, is before them; a SAELens SAE hooked there would "
                    f"read other values. Export for the Hugging Face BertModel instead, or pass a hook_name "
                    f"and apply ln1's weights to the hooked values yourself)")
        where = ("no hook point of the TransformerBridge's block" if library == "saelens" and hooks.bridge
                 else "no module of layer")
        raise ValueError(
            f"{where} {layer} outputs exactly the MLP {side} of {type(model).__name__}, so "
            f"there is no hook name for side={side!r}; pass it yourself (hook_name= or hookpoint=){lens}."
        )
    return hooks


def _check_folder(path) -> str:
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path={path!r} is a file; these formats are folders: pass a folder path.")
    os.makedirs(path, exist_ok=True)
    return path


def _cfg_digest(cfg) -> str:
    """SHA-256 of a parsed cfg.json (sorted keys: its formatting does not count)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _write(path, weights_name, tensors, cfg, header=None) -> str:
    """Write the weights (with ``header`` and the cfg's digest as safetensors metadata) and
    cfg.json to temporary files in ``path``, then rename both into place.

    Both temporaries are written and synced before either rename (renames need no space), so an
    error while writing (a full disk, say) leaves the folder's previous pair as it was; only an
    interrupt between the two renames can leave a pair the import refuses."""
    from safetensors.numpy import save_file

    from ._backend.files import (
        give_default_mode,
        new_temporary,
        remove_dead_temporaries,
        sync_folder,
        temporary_prefix,
        write_failed,
        writer_prefix,
    )

    text = json.dumps(cfg, indent=2)
    # The digest of the cfg as it reads back, as the import computes it (keys become strings).
    header = {**(header or {}), CFG_DIGEST_KEY: _cfg_digest(json.loads(text))}
    weights_path, cfg_path = os.path.join(path, weights_name), os.path.join(path, CFG_FILENAME)
    temporaries = []
    try:
        for final in (weights_path, cfg_path):
            temporaries.append(new_temporary(path, writer_prefix(temporary_prefix(final))))
        weights_tmp, cfg_tmp = temporaries
        save_file(tensors, weights_tmp, metadata=header)
        with open(cfg_tmp, "w", encoding="utf-8") as f:
            f.write(text)
        for temporary, final in ((weights_tmp, weights_path), (cfg_tmp, cfg_path)):
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            # After the write: safetensors' writer sets 0600, which would leave the file
            # unreadable to the owner's group.
            give_default_mode(temporary, replacing=final)
        os.replace(weights_tmp, weights_path)
        os.replace(cfg_tmp, cfg_path)
        sync_folder(path)
    except Exception as e:
        # A full disk: safetensors raises its SafetensorError (not an OSError), an fsync an OSError.
        if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
            raise
        raise write_failed(path, e, f"the folder's previous {weights_name} and {CFG_FILENAME}, if any, are "
                                    f"unchanged unless the error came while renaming; export again") from e
    finally:
        for temporary in temporaries:
            with contextlib.suppress(OSError):
                os.remove(temporary)
    for final in (weights_path, cfg_path):  # a killed export's (named after their dead writer)
        remove_dead_temporaries(path, temporary_prefix(final))
    return path


def _provenance(side) -> dict:
    from . import __version__

    out = {"exported_by": f"sklearn-jsae {__version__}"}
    if side is not None:
        out["sklearn_jsae_side"] = side
    return out


def to_saelens(estimator, path, *, side=None, model=None, layer=None, model_name=None, hook_name=None,
               metadata=None):
    """Write one SAE as a SAELens ``topk`` folder (``cfg.json`` + ``sae_weights.safetensors``).

    ``sae_lens.SAE.load_from_disk(path)`` then gives a ``TopKSAE`` whose ``encode`` /
    ``decode`` equal this estimator's ``transform`` / ``inverse_transform`` (dense) up to
    float32 rounding.

    Parameters
    ----------
    estimator : TopKSparseAutoencoder or JacobianSparseAutoencoder
        Fitted.  A JSAE is a pair of SAEs: choose one with ``side``.
    path : str or os.PathLike
        The folder to write (created; its two files are replaced).
    side : {"input", "output"} or None, default=None
        Which SAE of a JSAE; for a TopKSparseAutoencoder, only needed with ``model``/``layer``
        (to say whether it was trained on the MLP's inputs or outputs).
    model : transformers model, transformer_lens.HookedTransformer or TransformerBridge, optional
        With ``layer``: fill ``model_name``, ``hook_name`` and (with the derived hook name)
        ``model_class_name`` from the Hugging Face model the activations came from (see the
        module docstring); for a TransformerLens model, its hook point names
        (``blocks.3.ln2.hook_normalized``, which needs ``fold_ln=True``, and
        ``blocks.3.hook_mlp_out``) for SAELens' default model class; for a ``TransformerBridge``,
        its hook points that hold exactly the harvested rows (``blocks.3.mlp.hook_in`` on Llama,
        ``blocks.3.hook_mlp_in`` on BERT; ``blocks.3.hook_mlp_out``), where SAELens'
        ``SAETransformerBridge`` attaches the SAE.
    layer : int, optional
        The block index passed to :func:`sklearn_jsae.hf.harvest`.
    model_name, hook_name : str, optional
        ``metadata.model_name`` and ``metadata.hook_name``; override the derived ones.
    metadata : dict, optional
        More SAELens metadata (``context_size``, ``prepend_bos``, ``dataset_path``, ...),
        merged last.  Values must be JSON-serialisable.

    Returns
    -------
    path : str
        The folder written.  The weights file's safetensors metadata holds a digest of
        ``cfg.json``: :func:`from_saelens` refuses a folder whose two files are from different
        exports (an interrupted re-export) or whose ``cfg.json`` was edited since.

    Raises
    ------
    TypeError
        If ``metadata`` is not a dict or holds a value that is not JSON-serialisable (nothing
        is written).
    """
    sae, side = _chosen_sae(estimator, side)
    hooks = _hooks(model, layer, side, named=hook_name is not None, library="saelens")
    meta = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
            "model_name": None, "hook_name": None, "hook_head_index": None}
    if hooks is not None:
        meta["model_name"] = hooks.model_name
        if hook_name is None:
            meta["hook_name"] = hooks.saelens(side)
            if not hooks.lens and hooks.bridge is None:  # a Hugging Face module name, which
                # HookedProxyLM hooks; a TransformerLens hook point is for SAELens' default model
                # class (HookedTransformer) and its SAETransformerBridge
                meta["model_class_name"] = "AutoModelForCausalLM"
    if model_name is not None:
        meta["model_name"] = str(model_name)
    if hook_name is not None:
        meta["hook_name"] = str(hook_name)
    meta.update(_provenance(side))
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
        for key, value in metadata.items():  # checked before the folder is created or written
            try:
                json.dumps({key: value})
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"metadata[{key!r}]={value!r:.80} cannot be written to cfg.json ({exc}): metadata keys "
                    f"must be strings and values JSON-serialisable (str, int, float, bool, None, and lists "
                    f"and dicts of them); convert it first, e.g. str(value) or array.tolist()."
                ) from None
        meta.update(metadata)
    n, d = sae.components_.shape
    cfg = {
        "architecture": "topk", "d_in": int(d), "d_sae": int(n), "k": int(sae.k),
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False, "metadata": meta,
    }
    tensors = {
        "W_enc": np.ascontiguousarray(sae.encoder_.T, dtype=np.float32),
        "b_enc": np.ascontiguousarray(sae.encoder_bias_, dtype=np.float32),
        "W_dec": np.ascontiguousarray(sae.components_, dtype=np.float32),
        "b_dec": np.ascontiguousarray(sae.decoder_bias_, dtype=np.float32),
    }
    return _write(_check_folder(path), SAELENS_WEIGHTS, tensors, cfg)


def to_sparsify(estimator, path, *, side=None, model=None, layer=None, model_name=None, hookpoint=None):
    """Write one SAE as a sparsify folder (``cfg.json`` + ``sae.safetensors``).

    ``sparsify.SparseCoder.load_from_disk(path)`` then gives a ``SparseCoder`` whose
    ``encode`` / ``decode`` equal this estimator's ``transform`` / ``inverse_transform`` up to
    float32 rounding.  sparsify names an SAE by its folder: to build a run that
    ``SparseCoder.load_many(run, local=True)`` reads, export each SAE to ``run/<hookpoint>``.
    ``cfg.json`` holds sparsify's fields only (its loader warns about others); the model name,
    hookpoint, side, exporting version and a digest of ``cfg.json`` (with which
    :func:`from_sparsify` refuses a folder whose two files are from different exports) go in the
    safetensors header of ``sae.safetensors`` (``safe_open(path, "np").metadata()``), which
    sparsify's loader ignores.

    Parameters
    ----------
    estimator : TopKSparseAutoencoder or JacobianSparseAutoencoder
        Fitted.  A JSAE is a pair of SAEs: choose one with ``side``.
    path : str or os.PathLike
        The folder to write (created; its two files are replaced).
    side : {"input", "output"} or None, default=None
        Which SAE of a JSAE; for a TopKSparseAutoencoder, only needed with ``model``/``layer``.
    model : transformers model or transformer_lens TransformerBridge, optional
        With ``layer``: record the model name and the hookpoint (the module name relative to
        ``model.base_model`` whose output the SAE reads, as sparsify's trainer names them); for a
        ``TransformerBridge``, the names in the Hugging Face model it wraps.
    layer : int, optional
        The block index passed to :func:`sklearn_jsae.hf.harvest`.
    model_name, hookpoint : str, optional
        Override the derived names.

    Returns
    -------
    path : str
        The folder written.
    """
    sae, side = _chosen_sae(estimator, side)
    hooks = _hooks(model, layer, side, named=hookpoint is not None, library="sparsify")
    n, d = sae.components_.shape
    cfg = {"activation": "topk", "normalize_decoder": True, "num_latents": int(n), "k": int(sae.k),
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": int(d)}
    if n % d == 0:  # sparsify reads num_latents first; expansion_factor is informative only
        cfg["expansion_factor"] = n // d
    # sparsify's cfg.json has no place for them (and its loader warns about unknown keys): the
    # model and hookpoint go in the weights file's safetensors header, which its loader ignores.
    header = _provenance(side)
    if hooks is not None and hooks.lens and hookpoint is None:
        raise ValueError(
            f"sparsify trains on Hugging Face models, and {type(model).__name__} is a TransformerLens model "
            f"whose hook points are no sparsify hookpoints: pass hookpoint= (the Hugging Face module name "
            f"of the same activation, e.g. 'layers.{layer}.mlp') or export with to_saelens."
        )
    if hooks is not None:
        header.update(model=hooks.model_name, hookpoint=hooks.sparsify(side))
    if model_name is not None:
        header["model"] = str(model_name)
    if hookpoint is not None:
        header["hookpoint"] = str(hookpoint)
    tensors = {
        "encoder.weight": np.ascontiguousarray(sae.encoder_, dtype=np.float32),
        "encoder.bias": np.ascontiguousarray(sae.encoder_bias_, dtype=np.float32),
        "W_dec": np.ascontiguousarray(sae.components_, dtype=np.float32),
        "b_dec": np.ascontiguousarray(sae.decoder_bias_, dtype=np.float32),
    }
    header = {key: value for key, value in header.items() if value is not None}
    return _write(_check_folder(path), SPARSIFY_WEIGHTS, tensors, cfg, header)


# ---------------------------------------------------------------------------- import
def _read_folder(path, weights_name, package):
    """``(cfg dict, {name: float64 array})`` of a folder; PersistenceError on anything unreadable."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise PersistenceError(
            f"{path!r} is not a folder; a {package} SAE is a folder with {CFG_FILENAME} and "
            f"{weights_name}. (A file written by estimator.save loads with sklearn_jsae.load.)"
        )
    for name in (CFG_FILENAME, weights_name):
        if not os.path.isfile(os.path.join(path, name)):
            raise PersistenceError(
                f"{path!r} has no {name}: it is not a {package} SAE folder (expected {CFG_FILENAME} "
                f"and {weights_name})."
            )
    try:
        with open(os.path.join(path, CFG_FILENAME), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PersistenceError(f"{path!r}: {CFG_FILENAME} is not valid JSON ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(cfg, dict):
        raise PersistenceError(f"{path!r}: {CFG_FILENAME} is not a JSON object.")
    try:
        # framework="pt" reads bfloat16 too; torch is a dependency of the package anyway.
        with safe_open(os.path.join(path, weights_name), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PersistenceError(
            f"{path!r}: {weights_name} cannot be read ({type(exc).__name__}: {exc}); it is "
            f"truncated, damaged or not a safetensors file."
        ) from exc
    # Only our exports record the digest; folders SAELens or sparsify wrote have none.
    if CFG_DIGEST_KEY in header and header[CFG_DIGEST_KEY] != _cfg_digest(cfg):
        raise PersistenceError(
            f"{path!r}: {CFG_FILENAME} is not the one exported with {weights_name} (the weights record "
            f"the digest of their {CFG_FILENAME}, and this one differs): the export was interrupted "
            f"between writing the two files, leaving new weights beside an older {CFG_FILENAME}, or "
            f"{CFG_FILENAME} was edited afterwards. Nothing was loaded; export the SAE again to rewrite both."
        )
    arrays = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise PersistenceError(f"{path!r}: tensor {name!r} has dtype {t.dtype}, not a float type.")
        arrays[name] = t.double().numpy()
    return cfg, arrays


def _cfg_int(cfg, key, path, package):
    value = cfg.get(key)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise PersistenceError(f"{path!r}: {package} {CFG_FILENAME} has {key}={value!r}; expected a "
                               f"positive integer.")
    return int(value)


def _cfg_bool(cfg, key, default, path, package):
    """``cfg[key]`` as a bool (``default`` when absent); the strings "true"/"false" in any case
    are read as such, anything else (a truthy "false", null, 0) is refused."""
    value = cfg.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PersistenceError(f"{path!r}: {package} {CFG_FILENAME} has {key}={value!r}; expected true or "
                           f"false.")


def _tensor(arrays, name, shape, path):
    if name not in arrays:
        raise PersistenceError(f"{path!r}: the weights have no tensor {name!r} (found {sorted(arrays)}).")
    a = arrays[name]
    if a.shape != shape:
        raise PersistenceError(f"{path!r}: tensor {name!r} has shape {a.shape}, but {CFG_FILENAME} "
                               f"implies {shape}.")
    return a


def _as_estimator(W_enc_rows, b_enc, W_dec, b_dec, k, path):
    """A fitted TopKSparseAutoencoder from float64 weights in our convention."""
    from ._topk import TopKSparseAutoencoder

    n, d = W_dec.shape
    if k > n:
        raise PersistenceError(f"{path!r}: k={k} exceeds the {n} latents.")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (W_enc_rows, b_enc, W_dec, b_dec)]
    if not all(np.isfinite(a).all() for a in arrays):
        raise PersistenceError(f"{path!r}: the weights contain NaN or inf (or overflow float32).")
    sae = TopKSparseAutoencoder(n_components=n, k=k)
    sae.encoder_, sae.encoder_bias_, sae.components_, sae.decoder_bias_ = arrays
    sae.scale_ = None  # unknown: a warm-start fit measures it from the data
    sae.history_, sae.n_iter_, sae.dead_fraction_ = [], 0, math.nan
    sae.device_, sae.n_features_in_ = "cpu", d
    return sae


def _saelens_before_6(cfg: dict) -> bool:
    """Whether SAELens before 6.0 wrote ``cfg`` (no ``sae_lens_version``, or one below 6), as
    SAELens itself decides when it reads a folder."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    if not version:
        return True
    major = str(version).split(".")[0]
    return major.isdigit() and int(major) < 6


def from_saelens(path):
    """Load a SAELens ``topk`` SAE folder as a fitted TopKSparseAutoencoder.

    Reads the folder ``SAE.save_model`` / ``TrainingSAE.save_inference_model`` write
    (``cfg.json`` + ``sae_weights.safetensors``), and the pre-6.0 layout (architecture
    ``"standard"`` or none with ``activation_fn="topk"``, and a ``scaling_factor`` of ones,
    which is dropped as SAELens drops it).  ``rescale_acts_by_decoder_norm`` and
    ``apply_b_dec_to_input=False`` are folded into the weights (module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The SAE's folder.

    Returns
    -------
    sae : TopKSparseAutoencoder
        ``transform(X)`` equals ``sae_lens_sae.encode(X)`` and ``inverse_transform(S)`` equals
        ``decode(S)`` up to float32 rounding (SAELens loading the SAE in float32).

    Raises
    ------
    PersistenceError
        For a folder that is not a readable SAELens TopK SAE, whose settings have no
        equivalent here (or a boolean setting is neither true nor false), or whose
        ``cfg.json`` is not the one :func:`to_saelens` wrote with its weights (an interrupted
        re-export, or an edit since).
    """
    cfg, arrays = _read_folder(path, SAELENS_WEIGHTS, "SAELens")
    path = os.fspath(path)
    architecture = cfg.get("architecture")
    # Before 6.0 SAELens wrote a TopK SAE as architecture "standard" (or none) with the activation
    # "topk" and k among its keyword arguments; SAELens reads such a folder as a TopK SAE.
    legacy_topk = ((architecture is None or (architecture == "standard" and _saelens_before_6(cfg)))
                   and "topk" in (cfg.get("activation_fn"), cfg.get("activation_fn_str")))
    if architecture != "topk" and not legacy_topk:
        raise PersistenceError(
            f"{path!r} is a SAELens {architecture or cfg.get('activation_fn') or 'standard'!r} SAE; only "
            f"'topk' SAEs have an equivalent TopKSparseAutoencoder."
        )
    kwargs = cfg.get("activation_fn_kwargs")
    if isinstance(kwargs, dict) and "k" in kwargs and ("k" not in cfg or _saelens_before_6(cfg)):
        # SAELens 3-5 kept k among them, and SAELens reads a pre-6.0 folder's k from there even
        # when the config also has a top-level k (which then may be another, stale value).
        cfg = {**cfg, "k": kwargs["k"]}
    d, n, k = (_cfg_int(cfg, key, path, "SAELens") for key in ("d_in", "d_sae", "k"))
    if isinstance(cfg.get("normalize_activations"), bool):  # before 6.0: True meant the expected average
        cfg = {**cfg, "normalize_activations": "expected_average_only_in" if cfg["normalize_activations"]
               else "none"}
    if "scaling_factor" in arrays:
        # A tensor SAELens wrote for a while: all ones it means nothing (SAELens drops it), else
        # it is a fine-tuning scaling factor.
        if not np.allclose(arrays["scaling_factor"], 1.0):
            raise PersistenceError(f"{path!r} has a finetuning scaling factor, which has no equivalent here.")
        arrays = {name: value for name, value in arrays.items() if name != "scaling_factor"}
    normalize = cfg.get("normalize_activations")
    if normalize is not None and not isinstance(normalize, str):  # a list or dict is unhashable below
        raise PersistenceError(f"{path!r}: SAELens {CFG_FILENAME} has normalize_activations={normalize!r:.80}; "
                               f"expected a string such as \"none\" (or a boolean, before SAELens 6.0).")
    normalize = normalize or "none"
    if normalize != "none":
        hint = {
            "expected_average_only_in": "fold the scaling factor first "
                                        "(sae.fold_activation_norm_scaling_factor(factor)) and save again",
            "covariance_whitening": "fold it first (sae.fold_activation_whitening(...)) and save again",
        }.get(normalize, "a per-row normalisation has no equivalent in a TopKSparseAutoencoder")
        raise PersistenceError(f"{path!r} has normalize_activations={normalize!r}: {hint}.")
    # The flag alone means nothing: SAELens resets it when the folder has no scaling_factor or an
    # all-ones one (both dropped above), and a factor that is not all ones was refused above.
    _cfg_bool(cfg, "finetuning_scaling_factor", False, path, "SAELens")
    W_enc = _tensor(arrays, "W_enc", (d, n), path)
    b_enc = _tensor(arrays, "b_enc", (n,), path)
    W_dec = _tensor(arrays, "W_dec", (n, d), path)
    b_dec = _tensor(arrays, "b_dec", (d,), path)
    extra = sorted(set(arrays) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if extra:
        raise PersistenceError(f"{path!r} has tensors a TopK SAE does not use: {extra}.")
    if not _cfg_bool(cfg, "apply_b_dec_to_input", True, path, "SAELens"):
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ W_enc
    if _cfg_bool(cfg, "rescale_acts_by_decoder_norm", False, path, "SAELens"):
        # SAELens scales the pre-activations by ||W_dec[i]|| and divides them back before decoding.
        norms = np.linalg.norm(W_dec, axis=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / np.maximum(norms, 1e-30)[:, None]
    return _as_estimator(W_enc.T, b_enc, W_dec, b_dec, k, path)


def from_sparsify(path):
    """Load a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``) as a fitted TopKSparseAutoencoder.

    Parameters
    ----------
    path : str or os.PathLike
        The SAE's folder (one hookpoint of a sparsify run, e.g. ``run/layers.3.mlp``).

    Returns
    -------
    sae : TopKSparseAutoencoder
        ``transform(X)`` equals ``SparseCoder.encode(X)`` (scattered into dense codes) and
        ``inverse_transform`` equals ``decode`` up to float32 rounding.

    Raises
    ------
    PersistenceError
        For a folder that is not a readable sparsify TopK SAE (transcoders, skip connections
        and ``groupmax`` activations have no equivalent here; a boolean setting must be true
        or false), or whose ``cfg.json`` is not the one :func:`to_sparsify` wrote with its
        weights (an interrupted re-export, or an edit since).
    """
    cfg, arrays = _read_folder(path, SPARSIFY_WEIGHTS, "sparsify")
    path = os.fspath(path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise PersistenceError(
            f"{path!r} uses activation={activation!r}; only 'topk' has an equivalent here."
        )
    if _cfg_bool(cfg, "transcode", False, path, "sparsify"):
        raise PersistenceError(
            f"{path!r} is a transcoder (transcode=true): it predicts a module's output from its input "
            f"and does not subtract b_dec from its input, so it is not an autoencoder."
        )
    if _cfg_bool(cfg, "skip_connection", False, path, "sparsify") or "W_skip" in arrays:
        raise PersistenceError(f"{path!r} has a skip connection (W_skip), which has no equivalent here.")
    if _cfg_bool(cfg, "signed", False, path, "sparsify"):
        raise PersistenceError(f"{path!r} has signed=true (signed activations); only ReLU TopK is supported.")
    d, k = _cfg_int(cfg, "d_in", path, "sparsify"), _cfg_int(cfg, "k", path, "sparsify")
    n = cfg.get("num_latents") or d * _cfg_int(cfg, "expansion_factor", path, "sparsify")
    n = _cfg_int({"num_latents": n}, "num_latents", path, "sparsify")
    W_enc = _tensor(arrays, "encoder.weight", (n, d), path)
    b_enc = _tensor(arrays, "encoder.bias", (n,), path)
    W_dec = _tensor(arrays, "W_dec", (n, d), path)
    b_dec = _tensor(arrays, "b_dec", (d,), path)
    extra = sorted(set(arrays) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise PersistenceError(f"{path!r} has tensors a TopK SAE does not use: {extra}.")
    return _as_estimator(W_enc, b_enc, W_dec, b_dec, k, path)

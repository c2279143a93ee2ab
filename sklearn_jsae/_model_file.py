"""The model file: one safetensors file, tensors plus a JSON description, and back.

The file
--------
``estimator.save(path)`` writes one `safetensors <https://huggingface.co/docs/safetensors>`_
file.  Its tensors are the fitted arrays (float32 weights, the Jacobian's CSR arrays, the MLP's
weights, a few training rows and the MLP's outputs on them, recorded for a callable MLP too); its
header's ``__metadata__`` holds, under the key ``"sklearn_jsae"``, one JSON document with
everything else::

    format, format_version      "sklearn-jsae", "1.0"
    library_version             the sklearn-jsae version that wrote the file
    estimator                   "TopKSparseAutoencoder" or "JacobianSparseAutoencoder"
    params                      get_params() as JSON (random_state: an int, None or a
                                RandomState's full state); ``mlp`` and ``memory`` left out
    dropped_params              parameters that could not be written (repr), loaded as defaults
    fitted                      n_features_in_, feature_names_in_, history_, n_iter_, device_
                                (the training device), scale_ and dead_fraction_ (TopK),
                                n_output_features_ and fit_l1 (JSAE)
    input_sae_, output_sae_     a JSAE's two SAEs, each {params, fitted} as above
    mlp                         a JSAE's MLP: its kind, widths, activation, and each weight's
                                dtype and memory layout (see ``_backend/mlp_io.py``)
    jacobian_                   shape of a JSAE's mean |J| matrix
    output_config               set_output(...) settings, when any
    sha256                      digest of every tensor's name, dtype, shape and bytes
    document_sha256             SHA-256 of this document without its two digests (JSON, sorted
                                keys); absent from format 1.0 files written before it was added

``sklearn_jsae.load(path)`` reads the header without executing anything, checks the format, the
version, the two digests, every tensor's shape and dtype against the JSON and every weight and
scale for NaN or inf (which ``save`` refuses to write), and only then builds the estimator, so a
damaged or foreign file raises :class:`~sklearn_jsae.exceptions.PersistenceError` and nothing is
half-loaded.  Writes go to a temporary file in the target's folder, flushed and renamed over the
target (``os.replace`` is atomic), then the folder is synced, so a crash, or a power cut, leaves
the old file or the new one.

The version rules are in :mod:`sklearn_jsae._persistence`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os

import numpy as np

from . import _persistence
from ._persistence import write_atomically
from ._warnings import warn
from .exceptions import PersistenceError

FORMAT = "sklearn-jsae"
METADATA_KEY = "sklearn_jsae"
_RANDOM_STATE_KEY = "numpy.random.RandomState"
_SAE_ARRAYS = ("encoder_", "encoder_bias_", "components_", "decoder_bias_")
# Where a JSAE loaded without its (unsaved) callable MLP keeps the file's MLP probe outputs, so
# that saving it again still records them.
_LOADED_PROBE_OUTPUTS = "_loaded_mlp_probe_outputs"


class _Invalid(Exception):
    """A fact about a file that makes it unloadable; :func:`build` adds the path."""


# ---------------------------------------------------------------------------- writing
def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _encode_param(value):
    """A JSON value for a parameter, or raise TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, os.PathLike):  # checkpoint_dir=Path(...): loads as its str
        return os.fspath(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = value.get_state()
        return {_RANDOM_STATE_KEY: {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    raise TypeError(type(value).__name__)


# Parameters save leaves out (a model's memory cache belongs to one machine and holds pickles).
_NEVER_SAVED = frozenset({"mlp", "memory"})


def _params_doc(estimator) -> tuple[dict, dict]:
    """``(params, dropped)``: JSON-ready parameters and ``{name: repr}`` of those left out (each
    with a warning at the caller of ``save``)."""
    params, dropped = {}, {}
    for name, value in estimator.get_params(deep=False).items():
        if name == "mlp":
            continue
        if name == "memory":
            if value is not None:
                dropped[name] = repr(value)[:200]
            continue
        try:
            params[name] = _encode_param(value)
        except TypeError:
            dropped[name] = repr(value)[:200]
            warn(
                f"{type(estimator).__name__}.save: parameter {name}={value!r:.80} cannot be written "
                f"to the file (not a number, string, bool, None or RandomState); the loaded model "
                f"gets the default. Set it again after sklearn_jsae.load."
            )
    return params, dropped


def _fitted_common(estimator) -> dict:
    doc = {"n_features_in_": int(estimator.n_features_in_), "history_": estimator.history_,
           "n_iter_": int(estimator.n_iter_), "device_": estimator.device_}
    if hasattr(estimator, "feature_names_in_"):
        doc["feature_names_in_"] = [str(name) for name in estimator.feature_names_in_]
    return doc


def _sae_doc(sae, prefix: str, arrays: dict) -> dict:
    params, dropped = _params_doc(sae)
    fitted = _fitted_common(sae)
    fitted["scale_"] = None if sae.scale_ is None else float(sae.scale_)
    fitted["dead_fraction_"] = float(sae.dead_fraction_)
    for name in _SAE_ARRAYS:
        arrays[prefix + name] = np.ascontiguousarray(getattr(sae, name))
    return {"params": params, "dropped_params": dropped, "fitted": fitted}


def _digest(arrays: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# The document's own digest (format 1.0 files written before it was added have none): the
# parameters and fitted scalars (``k``, ``scale_``, ``history_``, ...) live in the JSON header,
# outside the tensors' digest, and a changed byte there would change the model unseen.
DOCUMENT_DIGEST = "document_sha256"


def _document_digest(doc: dict) -> str:
    """SHA-256 of the document without its digests, as JSON with sorted keys.  Computed on the
    document as it reads back from its JSON (keys as str, numpy scalars as numbers), so that the
    writer and the reader hash the same text."""
    body = {key: value for key, value in doc.items() if key not in ("sha256", DOCUMENT_DIGEST)}
    parsed = json.loads(json.dumps(body, default=_json_default, allow_nan=True))
    return hashlib.sha256(json.dumps(parsed, sort_keys=True, allow_nan=True).encode()).hexdigest()


def document(estimator) -> tuple[dict, dict]:
    """``(JSON document, arrays)`` describing a fitted estimator (the file's two halves)."""
    from sklearn.utils.validation import check_is_fitted

    from . import __version__
    from ._estimator import JacobianSparseAutoencoder

    check_is_fitted(estimator)
    arrays: dict[str, np.ndarray] = {}
    doc = {"format": FORMAT, "format_version": _persistence.FORMAT_VERSION, "library_version": __version__,
           "estimator": type(estimator).__name__}
    if isinstance(estimator, JacobianSparseAutoencoder):
        from ._backend import mlp_io

        params, dropped = _params_doc(estimator)
        fitted = _fitted_common(estimator)
        fitted["n_output_features_"] = int(estimator.n_output_features_)
        # The l1 this fit trained with (paper_lambda_), which set_params may have changed since.
        fitted["fit_l1"] = float(getattr(estimator, "_fit_l1", estimator.l1))
        doc.update(params=params, dropped_params=dropped, fitted=fitted,
                   input_sae_=_sae_doc(estimator.input_sae_, "input_sae_.", arrays),
                   output_sae_=_sae_doc(estimator.output_sae_, "output_sae_.", arrays))
        spec, mlp_arrays = mlp_io.describe(estimator.mlp_, estimator._mlp_map)
        doc["mlp"] = spec
        arrays.update({f"mlp.{name}": a for name, a in mlp_arrays.items()})
        probe = np.ascontiguousarray(estimator._probe_rows, dtype=np.float32)
        arrays["_probe_rows"] = probe
        # A weight with NaN or inf would fail this probe naming X; _check_finite names the weight.
        outputs = (_probe_fingerprint(estimator, probe)
                   if all(np.isfinite(a).all() for a in mlp_arrays.values()) else None)
        if outputs is not None:
            arrays["_mlp_probe_outputs"] = outputs
        J = estimator.jacobian_
        doc["jacobian_"] = {"shape": [int(s) for s in J.shape]}
        for part in ("data", "indices", "indptr"):
            arrays[f"jacobian_.{part}"] = np.ascontiguousarray(getattr(J, part))
    else:
        sae_doc = _sae_doc(estimator, "", arrays)
        doc.update(params=sae_doc["params"], dropped_params=sae_doc["dropped_params"],
                   fitted=sae_doc["fitted"])
    output_config = getattr(estimator, "_sklearn_output_config", None)
    if output_config:
        doc["output_config"] = {str(k): str(v) for k, v in output_config.items()}
    doc["sha256"] = _digest(arrays)
    doc[DOCUMENT_DIGEST] = _document_digest(doc)
    return doc, arrays



def _probe_fingerprint(jsae, probe) -> np.ndarray | None:
    """The MLP's outputs on ``probe``, which a load with ``mlp=`` compares the given MLP against.

    Recorded for callables too, although the file cannot hold the callable itself: they are what
    tells the callable the model was fitted with from another one.  A model loaded without its callable
    cannot compute them and passes on those of its file (None if that file predates them)."""
    from ._backend import mlp_io

    if isinstance(jsae._mlp_map, mlp_io.UnsavedMLP):
        return getattr(jsae, _LOADED_PROBE_OUTPUTS, None)
    return mlp_io.probe_outputs(jsae._mlp_map, probe)


def _attribute_of(name: str) -> str:
    """The estimator attribute a tensor of the file holds (``"mlp.W_in"`` -> ``mlp_ (its weight W_in)``)."""
    if name.startswith("mlp."):
        return f"mlp_ (its weight {name[len('mlp.'):]})"
    if name.startswith("jacobian_."):
        return f"jacobian_ (its {name[len('jacobian_.'):]})"
    return {"_probe_rows": "the training rows recorded for the MLP check (_probe_rows)",
            "_mlp_probe_outputs": "the MLP's outputs on the recorded training rows"}.get(name, name)


def _check_finite(estimator, doc: dict, arrays: dict, path) -> None:
    """Refuse to write a model with NaN or inf in its weights or scales: :func:`load` refuses such
    a file (its transform would fail later, blaming X), so ``save`` says so now, naming the
    attribute, before anything is written."""
    where = f"{type(estimator).__name__}.save({os.fspath(path)!r})"
    fix = ("Such values come from weights set by hand or a fit resumed from a damaged checkpoint: fit the "
           "model again (without that checkpoint), or set finite weights, before saving. Nothing was written.")
    for name in sorted(arrays):
        a = arrays[name]
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise PersistenceError(f"{where}: {_attribute_of(name)} holds {bad} NaN or inf value(s) of "
                                   f"{a.size}. {fix}")
    scalars = [("fit_l1 (the l1 the fit trained with)", doc.get("fitted", {}).get("fit_l1"))]
    for prefix in ("", "input_sae_.", "output_sae_."):
        part = doc if not prefix else doc.get(prefix[:-1], {})
        scalars.append((prefix + "scale_", part.get("fitted", {}).get("scale_")))
    for label, value in scalars:
        if value is not None and not np.isfinite(value):
            raise PersistenceError(f"{where}: {label}={value!r} is not finite. {fix}")


def save(estimator, path) -> str:
    """Write ``estimator`` to ``path``; see :meth:`PersistenceMixin.save`."""
    from safetensors.numpy import save_file

    doc, arrays = document(estimator)
    _check_finite(estimator, doc, arrays, path)
    header = {METADATA_KEY: json.dumps(doc, default=_json_default, allow_nan=True)}
    _check_header_size(estimator, header, arrays, path)
    return write_atomically(path, lambda temporary: save_file(arrays, temporary, metadata=header))


# safetensors refuses to write (or read) a file whose JSON header is larger than this; the header
# holds the document, so a history_ of some 175,000 rows (a JSAE's partial_fit calls) exceeds it.
SAFETENSORS_MAX_HEADER = 100_000_000


def _check_header_size(estimator, header: dict, arrays: dict, path) -> None:
    """Refuse, before writing, a document safetensors cannot hold: its own error ("header too
    large") read as a folder that cannot be written."""
    # the header is JSON holding the document as an escaped string, and one entry per array
    size = len(json.dumps(header)) + 200 * len(arrays)
    if size <= SAFETENSORS_MAX_HEADER:
        return
    rows = {name: len(getattr(part, "history_", [])) for name, part in
            (("history_", estimator), ("input_sae_.history_", getattr(estimator, "input_sae_", None)),
             ("output_sae_.history_", getattr(estimator, "output_sae_", None))) if part is not None}
    raise PersistenceError(
        f"{type(estimator).__name__}.save({os.fspath(path)!r}): the file's header would be about "
        f"{size / 1e6:.0f} MB, over the {SAFETENSORS_MAX_HEADER / 1e6:.0f} MB that safetensors writes and reads; "
        f"it holds the parameters and the history as JSON ({', '.join(f'{k}: {n} rows' for k, n in rows.items())}: "
        f"one per epoch or partial_fit call). Keep fewer history rows before saving, for example "
        f"est.history_ = est.history_[-10000:] (and the same for est.input_sae_ and est.output_sae_ of a "
        f"JacobianSparseAutoencoder), before every save: a partial_fit run keeps its rows and the next "
        f"call gives them back. Nothing was written."
    )



# ---------------------------------------------------------------------------- reading
def _parse_version(text):
    try:
        major, minor = (int(part) for part in str(text).split("."))
    except ValueError:
        return None
    return major, minor


def read(path) -> tuple[dict, dict]:
    """``(JSON document, arrays)`` of a model file, checked for format, version and digest."""
    from safetensors import SafetensorError, safe_open

    from . import __version__

    path = os.fspath(path)
    if os.path.isdir(path):
        raise PersistenceError(
            f"{path!r} is a folder, not a model file written by estimator.save(path). An SAE "
            f"saved by SAELens or sparsify (a folder with cfg.json) loads with "
            f"sklearn_jsae.interop.from_saelens(path) or from_sparsify(path)."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    from ._backend.files import not_a_regular_file

    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO would block the read forever
        raise PersistenceError(f"{path!r} is {kind}, not a model file written by estimator.save(path). "
                               f"Nothing was loaded.")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            arrays = {name: np.array(f.get_tensor(name), copy=True) for name in f.keys()}
    # TypeError (AttributeError before safetensors 0.4.1): a dtype numpy lacks, bf16.
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise PersistenceError(
            f"{path!r} cannot be read as a model file ({type(exc).__name__}: {exc}): it is "
            f"truncated or damaged, or not a file written by estimator.save(path) (those are "
            f"safetensors files). Nothing was loaded."
        ) from exc
    if METADATA_KEY not in metadata:
        raise PersistenceError(
            f"{path!r} is a safetensors file but not an sklearn-jsae model: its header has no "
            f"{METADATA_KEY!r} entry. Load files written by estimator.save(path); an SAE saved by "
            f"SAELens or sparsify loads with sklearn_jsae.interop.from_saelens / from_sparsify on "
            f"its folder."
        )
    try:
        doc = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:  # (nested past Python's recursion limit)
        raise PersistenceError(f"{path!r} has a damaged sklearn-jsae header (invalid JSON: "
                               f"{type(exc).__name__}: {exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PersistenceError(
            f"{path!r} has an {METADATA_KEY!r} header entry that is not an sklearn-jsae model "
            f"description (format={doc.get('format') if isinstance(doc, dict) else None!r})."
        )
    version, ours = _parse_version(doc.get("format_version")), _parse_version(_persistence.FORMAT_VERSION)
    if version is None or version[0] != ours[0] or version[1] > ours[1]:
        writer = doc.get("library_version")
        advice = (f"upgrade to sklearn-jsae {writer!r} or newer" if version is not None and version > ours
                  else f"load it with sklearn-jsae {writer!r}, the version that wrote it")
        raise PersistenceError(
            f"{path!r} was written by sklearn-jsae {writer!r} in format version "
            f"{doc.get('format_version')!r}; this sklearn-jsae {__version__} reads format "
            f"{ours[0]}.0 to {_persistence.FORMAT_VERSION}: {advice}."
        )
    if doc.get("sha256") != _digest(arrays):
        raise PersistenceError(
            f"{path!r} is damaged: its tensors do not match the digest recorded when it was "
            f"written (the file was altered or corrupted after saving). Nothing was loaded."
        )
    if DOCUMENT_DIGEST in doc and doc[DOCUMENT_DIGEST] != _document_digest(doc):
        raise PersistenceError(
            f"{path!r} is damaged: its description (parameters and fitted values in the header) does "
            f"not match the digest recorded when it was written (the file was altered or corrupted "
            f"after saving). Nothing was loaded."
        )
    return doc, arrays


def _field(doc, key, types, where, *, optional=False):
    """``doc[key]`` after checking its JSON type (a bool is not an int here)."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(doc, dict):
        raise _Invalid(f"{where or 'the document'} is not a JSON object")
    if key not in doc:
        if optional:
            return None
        raise _Invalid(f"{where}{key} is missing")
    value = doc[key]
    if optional and value is None:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _Invalid(f"{where}{key}={value!r:.80} has the wrong type")
    return value


def _take(arrays, name, shape, dtype=np.float32):
    """Pop ``arrays[name]`` after checking its dtype and shape (``None`` in shape: any)."""
    if name not in arrays:
        raise _Invalid(f"tensor {name!r} is missing")
    a = arrays.pop(name)
    if a.dtype != np.dtype(dtype):
        raise _Invalid(f"tensor {name!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if len(a.shape) != len(shape) or any(
        s is not None and s != t for s, t in zip(shape, a.shape, strict=True)
    ):
        expected = tuple("any" if s is None else s for s in shape)
        raise _Invalid(f"tensor {name!r} has shape {a.shape}, expected {expected}")
    # save refuses such a model: NaN or inf here would surface later, in transform, as a fault of X.
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise _Invalid(f"tensor {name!r} holds {bad} NaN or inf value(s) of {a.size}")
    return a


def _finite_scalar(fitted, key, where, types=(int, float), *, optional=False):
    """A fitted float of the document (``scale_``, ``fit_l1``), which must be finite."""
    value = _field(fitted, key, types, where, optional=optional)
    if value is None:
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range
        number = math.inf
    if not math.isfinite(number):
        raise _Invalid(f"{where}{key}={value!r:.40} is not finite")
    return number


def _decode_param(name, value, where):
    if isinstance(value, dict) and set(value) == {_RANDOM_STATE_KEY}:
        s = value[_RANDOM_STATE_KEY]
        rs = np.random.RandomState()
        # set_state raises whatever its argument's fault is (an IndexError for keys of the wrong
        # length, a TypeError for a list): all of them mean a damaged description.
        try:
            rs.set_state((s["kind"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                          s["cached_gaussian"]))
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise _Invalid(f"{where}params {name}={value!r:.120} is not a RandomState's state "
                           f"({type(exc).__name__}: {exc})") from exc
        return rs
    if isinstance(value, (dict, list)):
        raise _Invalid(f"{where}params {name}={value!r:.80} is not a number, string, bool or None")
    return value


def _with_params(cls, doc, where, **extra):
    """``cls()`` with the document's parameters set and validated."""
    from sklearn.utils._param_validation import InvalidParameterError

    params = _field(doc, "params", dict, where)
    estimator = cls()
    unknown = sorted(set(params) - set(estimator.get_params(deep=False)))
    if unknown:
        raise _Invalid(f"{where}params has parameters this version does not know: {unknown}")
    # save never writes these: memory holds joblib pickles, which a fit loads, so a file naming a
    # folder of someone else's pickles would run their code at the first fit; mlp is its own entry
    unwritten = sorted(set(params) & _NEVER_SAVED)
    if unwritten:
        raise _Invalid(f"{where}params has {unwritten}, which save never writes (a memory cache holds "
                       f"pickles, which a fit would load)")
    try:
        estimator.set_params(**{name: _decode_param(name, v, where) for name, v in params.items()}, **extra)
        estimator._validate_params()
    except (InvalidParameterError, ValueError, TypeError, KeyError) as exc:
        raise _Invalid(f"{where}params are invalid: {exc}") from exc
    return estimator


def _set_common(estimator, fitted, where):
    n_features = _field(fitted, "n_features_in_", int, where)
    if n_features < 1:
        raise _Invalid(f"{where}n_features_in_={n_features} is not positive")
    history = _field(fitted, "history_", list, where)
    if not all(isinstance(row, dict) for row in history):
        raise _Invalid(f"{where}history_ is not a list of dicts")
    n_iter = _field(fitted, "n_iter_", int, where)
    if n_iter < 0:
        raise _Invalid(f"{where}n_iter_={n_iter} is negative")
    device = _field(fitted, "device_", str, where)
    names = _field(fitted, "feature_names_in_", list, where, optional=True)
    if names is not None:
        if len(names) != n_features or not all(isinstance(n, str) for n in names):
            raise _Invalid(f"{where}feature_names_in_ is not {n_features} strings")
        estimator.feature_names_in_ = np.asarray(names, dtype=object)
    estimator.n_features_in_, estimator.history_ = n_features, history
    estimator.n_iter_, estimator.device_ = n_iter, device
    return n_features


def _build_sae(doc, arrays, prefix, where):
    from ._topk import TopKSparseAutoencoder

    sae = _with_params(TopKSparseAutoencoder, doc, where)
    fitted = _field(doc, "fitted", dict, where)
    d = _set_common(sae, fitted, where + "fitted.")
    sae.scale_ = _finite_scalar(fitted, "scale_", where + "fitted.", optional=True)
    if sae.scale_ is not None and sae.scale_ <= 0:  # an RMS: a fit measures one > 0 (1 for constant data)
        raise _Invalid(f"{where}fitted.scale_={sae.scale_!r} is not positive")
    sae.dead_fraction_ = float(_field(fitted, "dead_fraction_", (int, float), where + "fitted."))
    # NaN is "not known" (an SAE imported from SAELens or sparsify); anything else is a fraction
    if not (math.isnan(sae.dead_fraction_) or 0 <= sae.dead_fraction_ <= 1):
        raise _Invalid(f"{where}fitted.dead_fraction_={sae.dead_fraction_!r} is not a fraction in [0, 1]")
    components = _take(arrays, prefix + "components_", (None, d))
    n = components.shape[0]
    if n < 1:
        raise _Invalid(f"tensor {prefix + 'components_'!r} has no rows")
    sae.components_ = components
    sae.encoder_ = _take(arrays, prefix + "encoder_", (n, d))
    sae.encoder_bias_ = _take(arrays, prefix + "encoder_bias_", (n,))
    sae.decoder_bias_ = _take(arrays, prefix + "decoder_bias_", (d,))
    if sae.k > n:
        raise _Invalid(f"{where}params k={sae.k} exceeds the {n} latents of the saved dictionary")
    return sae


def _build_jsae(doc, arrays, mlp):
    import scipy.sparse as sp

    from ._backend import mlp_io
    from ._estimator import JacobianSparseAutoencoder

    fitted = _field(doc, "fitted", dict, "")
    input_sae = _build_sae(_field(doc, "input_sae_", dict, ""), arrays, "input_sae_.", "input_sae_.")
    output_sae = _build_sae(_field(doc, "output_sae_", dict, ""), arrays, "output_sae_.", "output_sae_.")
    spec = _field(doc, "mlp", dict, "")
    mlp_arrays = {name[len("mlp."):]: arrays.pop(name) for name in list(arrays) if name.startswith("mlp.")}
    for name, a in mlp_arrays.items():  # (rebuild would only report the NaN as a mismatch: NaN != NaN)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise _Invalid(f"tensor 'mlp.{name}' holds {int(a.size - np.count_nonzero(np.isfinite(a)))} "
                           f"NaN or inf value(s) of {a.size}")
    try:
        mlp_param, mlp_copy, mlp_map = mlp_io.rebuild(spec, mlp_arrays)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        # rebuild runs no user code: whatever it raises comes from the file's description.
        raise _Invalid(f"the MLP description is inconsistent: {exc}") from exc
    jsae = _with_params(JacobianSparseAutoencoder, doc, "", mlp=mlp_param)
    d_in = _set_common(jsae, fitted, "fitted.")
    d_out = _field(fitted, "n_output_features_", int, "fitted.")
    if "fit_l1" in fitted:  # (files written before it was recorded: paper_lambda_ reads the l1 parameter)
        jsae._fit_l1 = _finite_scalar(fitted, "fit_l1", "fitted.", float)
    if input_sae.n_features_in_ != d_in or output_sae.n_features_in_ != d_out:
        raise _Invalid(f"the SAEs' widths ({input_sae.n_features_in_}, {output_sae.n_features_in_}) "
                       f"differ from n_features_in_={d_in}, n_output_features_={d_out}")
    if (mlp_map.d_in, mlp_map.d_out) != (d_in, d_out):
        raise _Invalid(f"the MLP maps {mlp_map.d_in} -> {mlp_map.d_out} features, but the SAEs "
                       f"expect {d_in} -> {d_out}")
    probe = _take(arrays, "_probe_rows", (None, d_in))
    if not 1 <= probe.shape[0] <= 8:
        raise _Invalid(f"tensor '_probe_rows' has {probe.shape[0]} rows, expected 1 to 8")
    saved = None
    # Files written before callables' outputs were recorded have none for a callable: those load,
    # with a given mlp unchecked.
    if spec["module"] != "callable" or "_mlp_probe_outputs" in arrays:
        saved = _take(arrays, "_mlp_probe_outputs", (probe.shape[0], d_out))
    if spec["module"] != "callable":
        try:
            outputs = mlp_io.probe_outputs(mlp_map, probe)
        except (ValueError, RuntimeError) as exc:  # the saved weights on the saved rows: the file's fault
            raise _Invalid(f"the MLP fails on the recorded training rows: {exc}") from exc
        # Another machine's BLAS may round differently: tolerate rounding, not other weights.
        if _mlp_differs(saved, outputs):
            raise _Invalid("the MLP weights do not reproduce the MLP outputs recorded at saving")
    shape = _field(doc.get("jacobian_", {}), "shape", list, "jacobian_.")
    n_out, n_in = output_sae.components_.shape[0], input_sae.components_.shape[0]
    if jsae.k > min(n_in, n_out):
        raise _Invalid(f"params k={jsae.k} exceeds the latents of the saved SAEs ({n_in}, {n_out})")
    if shape != [n_out, n_in]:
        raise _Invalid(f"jacobian_.shape={shape} differs from the SAEs' sizes [{n_out}, {n_in}]")
    data = _take(arrays, "jacobian_.data", (None,))
    if data.size and not float(data.min()) >= 0:  # a mean of |J|: never negative (NaN is refused too)
        raise _Invalid(f"jacobian_ holds {float(data.min()):.3g}, but it is a mean of |J| (never negative)")
    indices = arrays.get("jacobian_.indices")
    index_dtype = indices.dtype if indices is not None and indices.dtype in (np.int32, np.int64) else np.int64
    indices = _take(arrays, "jacobian_.indices", (data.shape[0],), index_dtype)
    indptr = _take(arrays, "jacobian_.indptr", (n_out + 1,), index_dtype)
    try:
        J = sp.csr_array((data, indices, indptr), shape=(n_out, n_in))
        J.check_format(full_check=True)
    except ValueError as exc:
        raise _Invalid(f"jacobian_ is not a valid CSR matrix: {exc}") from exc
    J.indices, J.indptr = indices, indptr  # scipy may narrow index dtypes; keep the saved ones

    jsae.input_sae_, jsae.output_sae_ = input_sae, output_sae
    jsae.n_output_features_, jsae.jacobian_ = d_out, J
    jsae.mlp_, jsae._mlp_map, jsae._probe_rows = mlp_copy, mlp_map, probe
    if mlp is not None:
        _attach_mlp(jsae, mlp, saved)
    elif spec["module"] == "callable" and saved is not None:
        setattr(jsae, _LOADED_PROBE_OUTPUTS, saved)
    return jsae


def _mlp_differs(before: np.ndarray, after: np.ndarray, tolerance: float = 1e-5) -> bool:
    """The rule of the estimator's warm-start check: outputs differ beyond float32 rounding
    (``tolerance``, relative; a callable passed back at load is allowed bfloat16's, see
    :func:`_attach_mlp`)."""
    scale = max(float(np.abs(before).max()), 1e-30)
    return before.shape != after.shape or not np.allclose(before, after, rtol=tolerance,
                                                          atol=0.1 * tolerance * scale)


def _attach_mlp(jsae, mlp, saved_outputs) -> None:
    """Use the caller's ``mlp`` for a loaded JSAE, after checking it is the saved model's MLP."""
    from ._backend.mlp import resolve_mlp
    from ._backend.mlp_io import UnsavedMLP, probe_outputs
    from .exceptions import NonFiniteTrainingError

    from ._topk import _inference_device

    try:  # probed for the device the loaded model computes on (a callable runs where its tensors are)
        mlp_copy, mlp_map, d_out = resolve_mlp(mlp, jsae._probe_rows, _inference_device(jsae))
    except NonFiniteTrainingError as exc:  # no training here: the caller's mlp is the fault
        raise ValueError(str(exc)) from None
    if d_out != jsae.n_output_features_:
        raise ValueError(
            f"mlp returns {d_out} features, but the saved model's MLP returns "
            f"{jsae.n_output_features_}; pass the MLP the model was trained with."
        )
    outputs = None if saved_outputs is None else probe_outputs(mlp_map, jsae._probe_rows)
    # A callable may compute in bfloat16 or float16 inside, whose rounding another machine's
    # float32 BLAS can tip by an ulp (about 1%): the check is for another MLP, not for rounding.
    tolerance = 1e-2 if isinstance(jsae._mlp_map, UnsavedMLP) else 1e-5
    if outputs is not None and _mlp_differs(saved_outputs, outputs, tolerance):
        gap = float(np.abs(outputs.astype(np.float64) - saved_outputs).max())
        size = float(np.abs(saved_outputs).max())
        without = ("load without mlp= for the SAE-only methods" if isinstance(jsae._mlp_map, UnsavedMLP)
                   else "load without mlp=, which uses the saved weights")
        raise ValueError(
            f"mlp is not the MLP this model was fitted with: on the {len(outputs)} training rows recorded "
            f"in the file its outputs differ from the fitted MLP's by up to {gap:.3g} (largest output "
            f"magnitude {size:.3g}; rounding is tolerated). Pass the MLP the model was trained "
            f"with (or {without})."
        )
    jsae.mlp, jsae.mlp_, jsae._mlp_map = mlp, mlp_copy, mlp_map


def _output_config(config) -> dict:
    """The document's ``set_output`` settings, checked as sklearn checks them in ``transform``
    (an unknown container would load, and fail at the first transform)."""
    from sklearn.utils._set_output import ADAPTERS_MANAGER

    supported = sorted(ADAPTERS_MANAGER.supported_outputs)
    if not isinstance(config, dict):
        raise _Invalid(f"output_config={config!r:.80} is not a JSON object like {{\"transform\": \"pandas\"}}")
    for method, container in config.items():
        if container not in supported:
            raise _Invalid(f"output_config {method}={container!r:.80} is not one of {supported}")
    return dict(config)


def build(path, doc: dict, arrays: dict, mlp=None):
    """The estimator described by ``doc`` and ``arrays`` (from :func:`read`); consumes ``arrays``."""
    name = doc.get("estimator")
    try:
        if name == "TopKSparseAutoencoder":
            if mlp is not None:
                raise ValueError(f"mlp= is only for a JacobianSparseAutoencoder; {path!r} holds a {name}.")
            estimator = _build_sae(doc, arrays, "", "")
        elif name == "JacobianSparseAutoencoder":
            estimator = _build_jsae(doc, arrays, mlp)
        else:
            raise _Invalid(f"estimator={name!r} is not one this version can load")
        if arrays:
            raise _Invalid(f"unexpected tensors {sorted(arrays)}")
        output_config = doc.get("output_config")
        if output_config:
            estimator._sklearn_output_config = _output_config(output_config)
    except _Invalid as exc:
        raise PersistenceError(
            f"{path!r} (sklearn-jsae {doc.get('library_version')!r}, format "
            f"{doc.get('format_version')!r}) is inconsistent: {exc}. The file was altered or written "
            f"by a faulty tool; nothing was loaded."
        ) from None
    return estimator

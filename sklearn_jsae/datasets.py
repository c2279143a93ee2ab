"""Datasets: a real transformer MLP shipped with the package, and a synthetic generator.

:func:`load_minilm_mlp` needs no network and no ``transformers``: the weights and the
activations are in ``sklearn_jsae/data/``.  :func:`make_synthetic_mlp` draws a random
MLP and sparse-dictionary inputs for quick experiments and tests.
"""

from __future__ import annotations

import copy
import json
import numbers
from pathlib import Path

import numpy as np
import torch
from sklearn.utils import Bunch

from ._backend.mlp import ACTIVATIONS, ElementwiseMLP, GatedMLP
from .metrics._validation import _check_bool, _check_positive_real, _check_random_state

__all__ = ["load_minilm_mlp", "load_python_doc_texts", "make_synthetic_mlp"]

DATA_DIR = Path(__file__).resolve().parent / "data"
_MINILM = "minilm_l6_layer3"
_SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD], [UNK], [CLS], [SEP], [MASK] in BERT's WordPiece vocab


def _float_dtype(dtype, name="dtype"):
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"{name} must be numpy.float32 or numpy.float64, got {dtype!r}.") from exc
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{name} must be numpy.float32 or numpy.float64, got {dtype!r}.")
    return resolved


def _mlp_outputs(mlp, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    """``mlp(X)`` row block by row block, in X's dtype."""
    mlp = copy.deepcopy(mlp).to(torch.float64) if X.dtype == np.float64 else mlp  # .to works in place
    out = []
    with torch.no_grad():
        for start in range(0, X.shape[0], batch):
            out.append(mlp(torch.from_numpy(np.ascontiguousarray(X[start : start + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, mlp.d_out), dtype=X.dtype)


def load_minilm_mlp(*, include_special_tokens=True, dtype=np.float32):
    """Load a real MLP (all-MiniLM-L6-v2, block 3) with 6,144 of its real inputs.

    The MLP is ``Y = gelu(X @ W_in + b_in) @ W_out + b_out`` (exact erf GELU, d_model 384,
    d_mlp 1536) of the pretrained sentence encoder ``sentence-transformers/all-MiniLM-L6-v2``
    (Apache-2.0).  ``X`` are its inputs on 48 sequences of 128 tokens of English prose from
    the Python documentation (PSF licence), captured with :func:`sklearn_jsae.hf.harvest`
    and stored in float16; ``Y`` is recomputed here as ``mlp(X)``.  The full provenance is
    in ``DESCR`` and ``metadata``; ``scripts/make_minilm_dataset.py`` rebuilds the files.

    Parameters
    ----------
    include_special_tokens : bool, default=True
        Keep the ``[CLS]`` (position 0) and ``[SEP]`` (position 127) rows of every sequence.
        ``[CLS]`` rows are outliers with about twice the typical norm.
    dtype : {numpy.float32, numpy.float64}, default=numpy.float32
        dtype of ``X`` and ``Y`` (and of the computation of ``Y``).

    Returns
    -------
    data : sklearn.utils.Bunch
        - ``X`` : ndarray (n_samples, 384), MLP inputs, one row per token (n_samples is 6,144,
          or 6,048 without special tokens), in text order (shuffle before splitting).
        - ``Y`` : ndarray (n_samples, 384), ``mlp(X)``.
        - ``mlp`` : :class:`~sklearn_jsae.mlp.ElementwiseMLP`, float32 torch module with
          ``activation="gelu"``; pass it as ``JacobianSparseAutoencoder(mlp=data.mlp)``.
        - ``W_in`` (384, 1536), ``b_in`` (1536,), ``W_out`` (1536, 384), ``b_out`` (384,):
          float32 ndarrays, row-vector layout (``x @ W_in``).
        - ``token_ids`` : ndarray (n_samples,) int32, WordPiece id of each row's token.
        - ``tokens`` : ndarray (n_samples,) str, the token strings (``"[CLS]"``, ``"##s"``, ...).
        - ``positions`` : ndarray (n_samples,) int16, position in the 128-token sequence.
        - ``sequence_ids`` : ndarray (n_samples,) int16, index of the sequence in the text stream.
        - ``metadata`` : dict, provenance, licences and verification errors.
        - ``DESCR`` : str, a description of the data.

    See Also
    --------
    sklearn_jsae.hf.harvest : capture the same kind of data from any supported model.

    Examples
    --------
    >>> from sklearn_jsae.datasets import load_minilm_mlp
    >>> data = load_minilm_mlp()
    >>> data.X.shape, data.Y.shape, data.mlp.activation
    ((6144, 384), (6144, 384), 'gelu')
    >>> str(data.tokens[0]), int(data.token_ids[0])
    ('[CLS]', 101)
    """
    dtype = _float_dtype(dtype)
    include_special_tokens = _check_bool(include_special_tokens, "include_special_tokens")
    with np.load(DATA_DIR / f"{_MINILM}.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    metadata = json.loads((DATA_DIR / f"{_MINILM}.json").read_text(encoding="utf-8"))
    keep = slice(None)
    if not include_special_tokens:
        keep = ~np.isin(arrays["token_ids"], _SPECIAL_IDS)
    X = arrays["X"][keep].astype(dtype)
    weights = {name: arrays[name].astype(np.float32) for name in ("W_in", "b_in", "W_out", "b_out")}
    mlp = ElementwiseMLP(
        *(torch.from_numpy(weights[name]) for name in ("W_in", "b_in", "W_out", "b_out")), activation="gelu"
    )
    token_ids = arrays["token_ids"][keep]
    lookup = dict(zip(arrays["vocab_ids"].tolist(), arrays["vocab_tokens"].tolist()))
    tokens = np.array([lookup[i] for i in token_ids.tolist()])
    return Bunch(
        X=X,
        Y=_mlp_outputs(mlp, X),
        mlp=mlp,
        **weights,
        token_ids=token_ids,
        tokens=tokens,
        positions=arrays["positions"][keep],
        sequence_ids=arrays["sequence_ids"][keep],
        metadata=metadata,
        DESCR=(DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8"),
    )


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def make_synthetic_mlp(
    n_samples=2000,
    n_features=64,
    n_hidden=256,
    *,
    n_outputs=None,
    activation="gelu",
    gated=False,
    n_atoms=None,
    n_active=4,
    noise=0.05,
    random_state=None,
):
    """A random MLP and inputs built from a sparse dictionary, as float32 numpy + torch.

    Inputs are sparse combinations of ``n_atoms`` random unit-norm directions ("features")
    plus Gaussian noise, the structure sparse autoencoders are meant to recover::

        X = S @ D + noise · N(0, 1),   S (n_samples, n_atoms) with n_active non-zeros per row
                                       drawn from Exp(1), D (n_atoms, n_features) unit rows,

    rescaled so that the mean squared row norm is ``n_features`` (unit scale per feature).
    The MLP has Gaussian weights scaled by ``1/sqrt(fan_in)`` and biases ``N(0, 0.1²)``.

    Parameters
    ----------
    n_samples : int, default=2000
    n_features : int, default=64
        Input width ``d_in``.
    n_hidden : int, default=256
        Hidden width ``d_mlp``.
    n_outputs : int or None, default=None
        Output width ``d_out``; None means ``n_features``.
    activation : str, default="gelu"
        One of :data:`sklearn_jsae.mlp.ACTIVATIONS`.
    gated : bool, default=False
        Return a LLaMA-style :class:`~sklearn_jsae.mlp.GatedMLP` (no biases) instead of an
        :class:`~sklearn_jsae.mlp.ElementwiseMLP`.
    n_atoms : int or None, default=None
        Dictionary size; None means ``4 * n_features``.
    n_active : int, default=4
        Non-zero dictionary coefficients per sample.
    noise : float, default=0.05
        Standard deviation of the added Gaussian noise, before rescaling; finite and >= 0.
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    mlp : ElementwiseMLP or GatedMLP
        Frozen float32 torch module ``(n, n_features) -> (n, n_outputs)``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_jsae.datasets import make_synthetic_mlp
    >>> X, mlp = make_synthetic_mlp(n_samples=100, n_features=8, n_hidden=32, random_state=0)
    >>> X.shape, X.dtype, tuple(mlp(torch.from_numpy(X)).shape)
    ((100, 8), dtype('float32'), (100, 8))
    """
    n_samples = _check_int(n_samples, "n_samples")
    n_features = _check_int(n_features, "n_features")
    n_hidden = _check_int(n_hidden, "n_hidden")
    n_outputs = n_features if n_outputs is None else _check_int(n_outputs, "n_outputs")
    n_atoms = 4 * n_features if n_atoms is None else _check_int(n_atoms, "n_atoms")
    n_active = _check_int(n_active, "n_active")
    if n_active > n_atoms:
        raise ValueError(f"n_active={n_active} must be <= n_atoms={n_atoms}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}.")
    # an infinite noise scale would make every row inf, and the rescaling then NaN
    noise = _check_positive_real(noise, "noise", allow_zero=True)
    gated = _check_bool(gated, "gated")
    rng = _check_random_state(random_state)

    D = rng.standard_normal((n_atoms, n_features))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    S = np.zeros((n_samples, n_atoms))
    active = np.argsort(rng.random_sample((n_samples, n_atoms)), axis=1)[:, :n_active]
    np.put_along_axis(S, active, rng.exponential(1.0, (n_samples, n_active)), axis=1)
    X = S @ D + noise * rng.standard_normal((n_samples, n_features))
    X *= np.sqrt(n_features / np.mean(np.sum(X**2, axis=1)))

    def gaussian(shape, fan_in):
        return torch.from_numpy((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    if gated:
        mlp = GatedMLP(
            gaussian((n_features, n_hidden), n_features),
            gaussian((n_features, n_hidden), n_features),
            gaussian((n_hidden, n_outputs), n_hidden),
            activation=activation,
        )
    else:
        mlp = ElementwiseMLP(
            gaussian((n_features, n_hidden), n_features),
            torch.from_numpy((0.1 * rng.standard_normal(n_hidden)).astype(np.float32)),
            gaussian((n_hidden, n_outputs), n_hidden),
            torch.from_numpy((0.1 * rng.standard_normal(n_outputs)).astype(np.float32)),
            activation,
        )
    return X.astype(np.float32), mlp


def load_python_doc_texts(min_length=80):
    """English paragraphs of the Python documentation topics that ship with Python.

    Real prose available on every machine without a download (``pydoc_data.topics``, PSF
    licence): about 900 paragraphs, 55k MiniLM tokens.  Paragraphs of ``min_length`` characters
    or fewer and indented code blocks are left out; whitespace is collapsed.

    Parameters
    ----------
    min_length : int, default=80
        Paragraphs of this many characters or fewer are left out; must be >= 0.

    Returns
    -------
    texts : list of str

    Examples
    --------
    >>> from sklearn_jsae.datasets import load_python_doc_texts
    >>> texts = load_python_doc_texts()
    >>> len(texts) > 500 and all(len(t) > 80 for t in texts)
    True
    """
    import pydoc_data.topics

    min_length = _check_int(min_length, "min_length", minimum=0)
    out = []
    for topic in pydoc_data.topics.topics.values():
        for paragraph in topic.split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) > min_length and not paragraph.startswith("   "):
                out.append(text)
    return out

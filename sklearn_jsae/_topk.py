"""TopKSparseAutoencoder: one TopK SAE as a scikit-learn transformer (the "traditional" SAE)."""

from __future__ import annotations

import numbers
import os
import sys
import threading

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_array, check_random_state

from . import _validation
from ._persistence import PersistenceMixin
from ._sklearn_compat import NumberInterval, StrOptions, _fit_context, _get_output_config, check_is_fitted, validate_data
from ._sparse import CodesCSR
from ._validation import check_finite_rows, check_float32_range, check_k


def _keep_state_on_error(fit):
    """Run ``fit`` with gradients on; on any error or interrupt restore the estimator's previous
    ``__dict__``, so that a failed fit never leaves a half-fitted estimator or damages a fitted one
    (nor advances a ``RandomState`` passed as ``random_state``).

    Training differentiates its loss, so a caller's ``torch.no_grad()`` or ``inference_mode()``
    (left around the code that produced X, or an MLP callable that itself fits) is lifted for the
    call: it stopped every fit at ``backward()`` with torch's "does not require grad"."""

    def wrapper(self, *args, **kwargs):
        import torch

        snapshot = dict(self.__dict__)
        # A RandomState random_state is advanced by the fit's draw: put back on failure, a rerun
        # draws the same seed, so it resumes the failed fit's checkpoint (the seed is its identity).
        random_state = self.random_state if isinstance(self.random_state, np.random.RandomState) else None
        drawn_from = None if random_state is None else random_state.get_state()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return fit(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(snapshot)
            if random_state is not None:
                random_state.set_state(drawn_from)
            raise

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fit.__name__, fit.__doc__, fit
    return wrapper


_K_CONSTRAINT = NumberInterval(numbers.Integral, 1, None, closed="left")
_COMMON_CONSTRAINTS = {
    "n_components": [NumberInterval(numbers.Integral, 1, None, closed="left")],
    "k": [_K_CONSTRAINT],
    "learning_rate": [NumberInterval(numbers.Real, 0, None, closed="neither")],
    "max_iter": [NumberInterval(numbers.Integral, 1, None, closed="left")],
    "batch_size": [NumberInterval(numbers.Integral, 1, None, closed="left")],
    "aux_coef": [NumberInterval(numbers.Real, 0, None, closed="left")],
    "device": [str],  # "cpu", "cuda", "cuda:N" or "auto": checked by _validation.resolve_device
    "mixed_precision": ["boolean", StrOptions({"auto"})],
    "sparse_output": ["boolean"],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
    "warm_start": ["boolean"],
    "n_tokens": [None, NumberInterval(numbers.Integral, 1, None, closed="left")],
    "checkpoint_dir": [None, str, os.PathLike],
    # Steps, or a duration such as "10min" (its form is checked at fit: checkpoint.checkpoint_interval).
    "checkpoint_every": [NumberInterval(numbers.Integral, 1, None, closed="left"), str],
}


def _validate_X(estimator, X, reset: bool, checked_in_batches: bool = False):
    """Validated X.  With ``checked_in_batches`` (the caller checks every batch it reads, as the
    training pass and ``score`` do, naming the rows), a memmap (an activation store larger than
    memory) is not scanned for NaN or inf here, which would map the whole file into memory, and a
    float16 memmap is not converted to float32 here either (each batch is, as it is read)."""
    from ._backend.train import file_mapping

    X = _from_torch(X)
    out_of_core = checked_in_batches and file_mapping(X) is not None
    X = validate_data(
        estimator,
        X,
        reset=reset,
        # A float16 store (harvest(..., dtype=np.float16)) stays on disk: each batch is converted
        # as it is read.  Converting it here would load all of it into memory, twice its size.
        dtype=[np.float32, np.float64] + ([np.float16] if out_of_core else []),
        ensure_all_finite=False,  # checked below, naming the row (a memmap: batch by batch)
        ensure_min_samples=1,
    )
    if not out_of_core:
        check_finite_rows(X)
        check_float32_range(X)
    return X


def _from_torch(X, name="X"):
    """A torch tensor as a float32 numpy array (detached, on the CPU); anything else unchanged.

    Activations are often harvested as tensors in bf16 or fp16, on a GPU, or still attached to an
    autograd graph, none of which numpy (and so scikit-learn's validation) reads; float32 holds
    bf16 and fp16 values exactly, and float64 tensors keep their precision.  Complex tensors are
    refused as complex arrays are (the cast would drop the imaginary part), and sparse ones as
    SciPy sparse input is."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported: no import here
    if torch is None or not isinstance(X, torch.Tensor):
        return X
    if X.is_meta:
        raise ValueError(f"{name} is a tensor on the meta device, which holds shapes but no values; "
                         f"compute it on a real device ('cpu' or 'cuda') and pass that.")
    if X.is_complex():
        raise ValueError(f"{name} is a complex torch tensor ({X.dtype}); pass real activations "
                         f"(X.real or X.abs(), whichever your data means).")
    if X.layout != torch.strided:
        raise TypeError(f"{name} is a sparse torch tensor ({X.layout}); dense data is required: "
                        f"pass {name}.to_dense().")
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    return X.detach().to(device="cpu", dtype=dtype).numpy()


def _inference_device(estimator) -> str:
    return _validation.resolve_device(estimator.device, for_inference=True)


def _codes_output(estimator, batches, n_rows, k, n_latents, container=None):
    """Code batches ``(first row, values (B, k), indices (B, k))`` (from
    :func:`~sklearn_jsae._backend.inference.iter_codes`) as the estimator's ``sparse_output``
    asks: CSR (or ``container``, a CSR subclass), or a dense float32 ndarray.  Each batch goes into
    the output as it comes, so the (n, k) codes are never held besides it."""
    if not estimator.sparse_output:
        dense = np.zeros((n_rows, n_latents), dtype=np.float32)
        for start, values, indices in batches:
            np.put_along_axis(dense[start : start + len(values)], indices, values, axis=1)
        return dense
    _check_codes_output(estimator)
    builder = CodesCSR(n_rows, n_latents, n_rows * k)  # at most k entries a row, trimmed in place
    for _, values, indices in batches:
        builder.add(values, indices)
    return builder.finish(container)


def _check_codes_output(estimator):
    """Sparse codes cannot be a DataFrame: refuse the combination (``transform`` and, before any
    training, ``fit_transform``)."""
    dense = _get_output_config("transform", estimator)["dense"]
    if estimator.sparse_output and dense != "default":
        raise ValueError(
            f"the transform output is set to {dense!r} (by set_output(transform={dense!r}), or globally by "
            f"sklearn.set_config / config_context(transform_output={dense!r})), which needs dense codes, but "
            f"sparse_output=True; set sparse_output=False on {type(estimator).__name__} to get a DataFrame "
            f"of codes."
        )


def _draw_seed(random_state) -> int:
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class TopKSparseAutoencoder(PersistenceMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin,
                            BaseEstimator):
    r"""TopK sparse autoencoder (Gao et al. 2024): the "traditional" SAE.

    .. math::

        s = \mathrm{ReLU}(\mathrm{TopK}_k((x - b_{dec}) W_{enc}^T + b_{enc})), \qquad
        \hat x = s\, W_{dec} + b_{dec}

    with unit-norm decoder rows ``W_dec`` (``components_``).  Trained with Adam
    on the mean squared error of normalised data (see the User Guide), with the
    learning-rate schedule of Farnik et al. (2025) and the AuxK dead-latent loss.

    Parameters
    ----------
    n_components : int, default=2048
        Number of latents (dictionary size).
    k : int, default=32
        Active latents per sample; must be ``<= n_components``.
    learning_rate : float, default=5e-3
        Adam step size.  Ten times the paper's 5e-4, which assumes ~10⁵ steps: with 10⁴-10⁶
        tokens a fit has hundreds to thousands of steps (see the User Guide's "defaults").
        Warm-up over the first 1% of steps, linear decay to 0 over the last 20%.
    max_iter : int, default=30
        Epochs (full passes over X) of ``fit``; ``partial_fit`` and ``fit_stream`` use each row
        they are given once.
    batch_size : int, default=1024
        Samples per minibatch.
    aux_coef : float, default=1/32
        Weight of the AuxK loss that revives dead latents (0 disables it).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to train and transform: ``"auto"`` is the first CUDA device when there is one, else
        the CPU.  Fitted state is always numpy, so a model trained on CUDA transforms on a
        machine without it (falling back to the CPU with a warning).
    mixed_precision : bool or "auto", default="auto"
        bf16 autocast of the training forward pass, with float32 master weights, optimiser
        state and reductions (as the paper trains), and TF32 matmuls allowed during the fit.
        ``"auto"`` turns it on for CUDA only.  Inference always runs in float32.
    sparse_output : bool, default=True
        ``transform`` returns SciPy CSR codes when True, a dense float32 ndarray when False
        (needed for ``set_output(transform="pandas")`` or ``"polars"``).
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation and shuffling (same seed and device -> identical model).
    verbose : int, default=0
        When > 0, ``fit`` and ``fit_stream`` show a tqdm progress bar over optimiser steps with the
        live loss terms, tokens per second and the time left, and one line of loss terms per epoch;
        silent otherwise.  ``partial_fit`` is always silent (its calls are the caller's loop: read
        ``history_``, one row per call).
    warm_start : bool, default=False
        Continue from the fitted weights on the next ``fit`` or ``fit_stream`` (with a fresh schedule).
    n_tokens : int or None, default=None
        Tokens that ``partial_fit`` calls or ``fit_stream`` will see in all (``fit`` ignores it:
        there the number of steps is known).  With it, both follow ``fit``'s schedule over
        ``ceil(n_tokens / batch_size)`` steps (learning-rate warm-up over 1%, decay to 0 over the
        last 20%), and ``fit_stream`` stops after ``n_tokens`` rows; None warms the learning rate
        up over 100 steps and keeps it constant after (the end is unknown).
    checkpoint_dir : str, path-like or None, default=None
        A folder where ``fit`` and ``fit_stream`` save a checkpoint (weights, optimiser state,
        schedule position, random states, dead-latent counters, data position) every
        ``checkpoint_every`` (steps or a duration) and at the end of each epoch, and from which
        they resume when it holds one: a fit killed at any moment and run again with the same data,
        MLP and settings ends with the same model as an uninterrupted one (bit for bit on the
        CPU).  Each fit has its own file in the folder (named by a hash of its data, MLP and
        settings), so the fits of a ``GridSearchCV`` can share one folder and each resume its own;
        a fit with other data, MLP or settings starts afresh, with a warning.  Writes are atomic;
        a truncated or foreign file is refused with a ``CheckpointError``.  Checkpoints are
        safetensors and JSON, never pickles.
    checkpoint_every : int or str, default=1000
        Optimiser steps between checkpoints, or a duration between them: ``"30s"``, ``"10min"``,
        ``"2h"`` (the first step that ends that long after the last save saves).  A duration
        suits a run whose speed is not known in advance: the same step count is minutes on a CPU
        and seconds on a GPU.  In a data-parallel job rank 0's clock decides for every rank.
    distributed : bool, default=False
        Train data-parallel over the ``torch.distributed`` job this process belongs to, as
        :class:`JacobianSparseAutoencoder` does (see its ``distributed``): ``fit`` splits each
        step's batch between the ranks, which all pass the same X; ``fit_stream`` takes each
        rank's own shard of the stream; every rank ends with the same model, the one-process
        model up to float rounding.  ``partial_fit`` refuses it.  See the User Guide's
        "Scaling out".

    Attributes
    ----------
    components_ : ndarray of shape ``(n_components, n_features_in_)``
        Decoder rows ``W_dec``, unit-norm after training (an imported SAE keeps its source's norms).
    encoder_ : ndarray of shape ``(n_components, n_features_in_)``
        Encoder rows ``W_enc``.
    encoder_bias_ : ndarray of shape (n_components,)
    decoder_bias_ : ndarray of shape ``(n_features_in_,)``
    scale_ : float or None
        Root-mean-square of the centred training data per feature; training ran on ``X / scale_``.
        None for an SAE imported from SAELens or sparsify (:mod:`sklearn_jsae.interop`): a warm
        start measures it from the data.
    history_ : list of dict
        Per-epoch loss terms (``loss``, ``mse_input``, ``aux_input``, ``dead_fraction_input``, ...).
    dead_fraction_ : float
        Fraction of latents that never fired during the last epoch.
    n_iter_ : int
        ``len(history_)`` of the last fit: its epochs for ``fit``, the calls since the optimiser
        (re)started for ``partial_fit``, the records (one per ``max(1, steps // 100)`` steps) for
        ``fit_stream``.
    device_ : str
        The device the last ``fit`` trained on (``"cpu"`` or ``"cuda:N"``).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``
        Defined only when X has string feature names.

    See Also
    --------
    JacobianSparseAutoencoder : a pair of these around an MLP, with a sparse Jacobian.

    References
    ----------
    L. Gao et al., "Scaling and evaluating sparse autoencoders", 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_jsae import TopKSparseAutoencoder
    >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> sae = TopKSparseAutoencoder(n_components=16, k=4, max_iter=5, random_state=0).fit(X)
    >>> codes = sae.transform(X)
    >>> codes.shape, int(np.diff(codes.indptr).max()) <= 4
    ((200, 16), True)
    """

    _parameter_constraints: dict = {**_COMMON_CONSTRAINTS, "distributed": ["boolean"]}

    def __init__(
        self,
        n_components=2048,
        *,
        k=32,
        learning_rate=5e-3,
        max_iter=30,
        batch_size=1024,
        aux_coef=1 / 32,
        device="auto",
        mixed_precision="auto",
        sparse_output=True,
        random_state=None,
        verbose=0,
        warm_start=False,
        n_tokens=None,
        checkpoint_dir=None,
        checkpoint_every=1000,
        distributed=False,
    ):
        self.n_components = n_components
        self.k = k
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.aux_coef = aux_coef
        self.device = device
        self.mixed_precision = mixed_precision
        self.sparse_output = sparse_output
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.n_tokens = n_tokens
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.distributed = distributed

    # ---- fitting -------------------------------------------------------------------------
    @_keep_state_on_error
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the SAE on X of shape (n_samples, n_features); ``y`` is ignored."""
        from ._backend.checkpoint import fingerprint_array
        from ._backend.train import train
        from ._incremental import check_same_fit, join_job, make_checkpointer

        warm = self.warm_start and hasattr(self, "components_")
        X = _validate_X(self, X, reset=not warm, checked_in_batches=True)
        check_k(self.k, self.n_components)
        _validation.warn_if_few_steps(X.shape[0], self.batch_size, self.max_iter)
        parallel, config = join_job(self, self._train_config(_training_device(self)))
        # The data's identity (a hash of every row in memory) is computed once, and only when needed.
        data_identity = (lambda: fingerprint_array(X)) if parallel is None else fingerprint_array(X)
        if parallel is not None:
            check_same_fit(parallel, data_identity, None, config, self)
        init = None
        if warm:
            _check_warm_shape(self.components_.shape[0], self.n_components, "n_components")
            init = (self._params(), None, self.scale_, None)
        checkpoint = make_checkpointer(self, data_identity, None, config, init, "fit",
                                       parallel)
        with _training_precision(config):
            result = train(X, None, config, init=init, checkpoint=checkpoint, parallel=parallel)
        self._trainer = None  # partial_fit after fit starts from the fitted weights
        self._set_fitted(result, config.device, previous=self.history_ if warm else [])
        return self

    @_keep_state_on_error
    def partial_fit(self, X, y=None):
        """One pass over X, in order, one optimiser step per ``batch_size`` rows; never resets.

        The first call measures the data scale on its rows (so give it a representative batch
        of at least a few thousand rows) and starts the optimiser; later calls continue it,
        with the schedule ``n_tokens`` sets.  After ``fit`` (or unpickling) the first call
        continues from the fitted weights with a fresh optimiser.  ``history_`` gets one row per
        call.  Parameters are validated at every call, and a training parameter changed since the
        optimiser started (``set_params(k=...)``, ``learning_rate``, ...) starts it again from the
        fitted weights with the new value.  With ``n_tokens`` set, one call on all rows in
        ``fit``'s batch order gives ``fit``'s model with ``max_iter=1`` (up to the rounding of the
        data statistics).
        """
        from ._incremental import start_trainer, total_steps, train_rows, training_params

        self._validate_params()
        _refuse_distributed_partial_fit(self)
        trainer = getattr(self, "_trainer", None)
        fitted = hasattr(self, "components_")
        X = _validate_X(self, X, reset=not fitted and trainer is None, checked_in_batches=True)
        if trainer is None or trainer.broken or trainer.params != training_params(self):
            _warn_checkpoint_dir_unused(self)
            check_k(self.k, self.n_components)
            if fitted:
                _check_warm_shape(self.components_.shape[0], self.n_components, "n_components", "partial_fit")
            config = self._train_config(_validation.resolve_device(self.device))
            init = (self._params(), None, self.scale_, None) if fitted else None
            trainer = start_trainer(config, X, None, init, total_steps(self.n_tokens, self.batch_size))
            trainer.previous_history = list(self.history_) if fitted else []
            trainer.params = training_params(self)
            self._trainer = trainer
        # An error or interrupt anywhere in this call (the steps, or the jacobian_ pass after them)
        # puts the optimiser back as it was before it, so the estimator (restored as a whole by
        # _keep_state_on_error) and its optimiser agree, and the next call continues the run.
        snapshot = trainer.snapshot()
        try:
            with _training_precision(trainer.config):
                train_rows(trainer, X)
            trainer.close_record(call=len(trainer.history) + 1)
            self._set_fitted(trainer.result(), trainer.config.device, previous=trainer.previous_history)
        except BaseException:
            try:
                trainer.restore(snapshot)
            except BaseException:
                trainer.broken = True  # half-restored: the next call starts again from the fitted state
                raise
            raise
        return self

    @_keep_state_on_error
    def fit_stream(self, batches, *, n_statistics=16384):
        """Fit on a stream of batches, never holding more than a few batches in memory.

        Parameters
        ----------
        batches : iterable of array-like of shape (n_rows, n_features)
            For example :class:`sklearn_jsae.hf.ActivationStream` (a live model's activations
            through a shuffle buffer), any generator of arrays or torch tensors, or a torch
            ``DataLoader`` over ``TensorDataset(X)`` (its one-item batches ``[x]`` are read as
            ``x``), a Hugging Face dataset of stored activations in one column (``{column: x}``
            batches: ``dataset.iter(batch_size=...)``, or, resumable,
            ``dataset.to_iterable_dataset().with_format("numpy").batch(n)``) or SAELens'
            ``ActivationsStore``.  Rows are used in the
            order they come: the stream must mix them.  Rows are re-cut into ``batch_size``
            batches; empty batches are skipped.
        n_statistics : int, default=16384
            Rows read first to measure the data scale ``scale_`` and the initial decoder bias
            (then trained on like any others); at least 2.

        Returns
        -------
        self : TopKSparseAutoencoder
            With ``warm_start=True`` a fitted estimator continues from its weights (with a fresh
            schedule), as ``fit`` does; otherwise a fresh model.

        Notes
        -----
        Training runs until the stream ends or ``n_tokens`` rows were used; the schedule spans
        ``n_tokens`` (open-ended without it).  ``history_`` gets one row per
        ``max(1, total_steps // 100)`` steps.  With ``checkpoint_dir``, a checkpoint also holds
        the stream's position (its ``state_dict()``, if it has one, as
        :class:`~sklearn_jsae.hf.ActivationStream` does) and the rows read but not yet used, so a
        killed run restarted with the same stream resumes without repeating or skipping a token;
        a stream without ``state_dict`` and ``load_state_dict`` cannot resume (a warning says so
        when the fit starts, an error when it is restarted).  With ``n_tokens`` and
        ``n_statistics`` covering the whole stream, it gives the model of one ``partial_fit`` call
        on the same rows in the same order.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_jsae import TopKSparseAutoencoder
        >>> rng = np.random.default_rng(0)
        >>> batches = (rng.normal(size=(256, 8)).astype(np.float32) for _ in range(40))
        >>> sae = TopKSparseAutoencoder(n_components=16, k=4, batch_size=128, n_tokens=10240,
        ...                             random_state=0).fit_stream(batches, n_statistics=1024)
        >>> sum(row["tokens"] for row in sae.history_), sae.score(rng.normal(size=(500, 8))) > 0.3
        (10240, True)
        """
        from ._stream_fit import fit_stream

        return fit_stream(self, batches, n_statistics=n_statistics)

    def _prepare_stream(self, first, warm):
        """``(config, mlp_map, init, finish)`` for :func:`~sklearn_jsae._stream_fit.fit_stream`."""
        check_k(self.k, self.n_components)
        config = self._train_config(_training_device(self))
        init = None
        if warm:
            _check_warm_shape(self.components_.shape[0], self.n_components, "n_components")
            init = (self._params(), None, self.scale_, None)
        previous = list(self.history_) if warm else []

        def finish(result, tail):
            self._set_fitted(result, config.device, previous)

        return config, None, init, finish

    def _train_config(self, device):
        from ._backend.train import TrainConfig

        return TrainConfig(
            n_components=self.n_components,
            n_output_components=None,
            k=self.k,
            learning_rate=self.learning_rate,
            max_iter=self.max_iter,
            batch_size=self.batch_size,
            aux_coef=self.aux_coef,
            device=device,
            autocast_dtype=_validation.resolve_autocast(self.mixed_precision, device),
            seed=_draw_seed(self.random_state),
            verbose=self.verbose,
        )

    def _set_fitted(self, result, device, previous):
        self._set_params_from(result.input_params, result.input_scale)
        self.device_ = device
        self.history_ = list(previous) + result.history
        self.dead_fraction_ = result.dead_fraction_input
        self.n_iter_ = len(result.history)

    def __getstate__(self):
        # A partial_fit's live optimiser state (tensors possibly on a GPU) is not part of the
        # model: a pickled estimator's next partial_fit starts from its fitted weights.
        state = super().__getstate__()
        state.pop("_trainer", None)
        return state

    def _set_params_from(self, params, scale):
        """Store backend ``SAEParams`` (raw units) as numpy fitted attributes."""
        self.encoder_ = params.W_enc.numpy().astype(np.float32)
        self.encoder_bias_ = params.b_enc.numpy().astype(np.float32)
        self.components_ = params.W_dec.numpy().astype(np.float32)
        self.decoder_bias_ = params.b_dec.numpy().astype(np.float32)
        self.scale_ = float(scale)

    def _params(self):
        import torch

        from ._backend.sae import SAEParams

        return SAEParams(
            *(torch.from_numpy(np.array(a, dtype=np.float32)) for a in
              (self.encoder_, self.encoder_bias_, self.components_, self.decoder_bias_))
        )

    # ---- inference ---------------------------------------------------------------------
    def _encoding_k(self) -> int:
        """The ``k`` to encode with: the current one (outputs.rst: a fitted SAE's dictionary can be
        read at another sparsity), checked as ``fit`` checks it, since ``set_params`` does not
        (``k=0`` gave empty codes, ``k=2.0`` and ``k > n_components`` errors from inside torch)."""
        n_components = self.components_.shape[0]
        if not _K_CONSTRAINT.is_satisfied_by(self.k):
            raise ValueError(f"k={self.k!r} must be an int >= 1 (and <= n_components={n_components}); "
                             f"set_params(k=...) with such an int.")
        check_k(int(self.k), n_components)
        return int(self.k)

    def _codes(self, X, device=None):
        """(values, indices) numpy arrays (n, k) for validated X, on ``device`` (default: this
        estimator's; a JSAE passes its own for its two SAEs)."""
        from ._backend.inference import encode_rows

        return encode_rows(self._params(), X, self._encoding_k(), device or _inference_device(self))

    def _code_batches(self, X, device=None):
        """``(first row, values, indices)`` numpy batches of :meth:`_codes`, in row order."""
        from ._backend.inference import iter_codes

        return iter_codes(self._params(), X, self._encoding_k(), device or _inference_device(self))

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X)`` then ``transform(X)``; a sparse ``sparse_output`` under a DataFrame output
        (``set_output``, ``set_config``) is refused before any training, not after it."""
        _check_codes_output(self)
        return super().fit_transform(X, y, **fit_params)

    def transform(self, X):
        """Codes of shape (n_samples, n_components) with at most k non-zeros per row: SciPy CSR, or a
        dense float32 ndarray with ``sparse_output=False``."""
        check_is_fitted(self)
        X = _validate_X(self, X, reset=False, checked_in_batches=True)
        return _codes_output(self, self._code_batches(X), X.shape[0], self._encoding_k(), self.components_.shape[0])

    def inverse_transform(self, X):
        """Decode codes of shape (n_samples, n_components) (sparse or dense) to (n_samples, n_features)."""
        check_is_fitted(self)
        return _decode(X, self.components_, self.decoder_bias_, "X", self.get_feature_names_out)

    def score(self, X, y=None):
        """Explained variance of the reconstruction, ``1 - ||X - X̂||² / ||X - mean(X)||²`` (higher is
        better), over all entries; on rows without variance 1 for an exact reconstruction and 0
        otherwise (scikit-learn's ``force_finite``).  Computed batch by batch, so a memory-mapped
        X larger than memory can be scored."""
        from .metrics import reconstruction_metrics

        check_is_fitted(self)
        return reconstruction_metrics(self, X)["input"]["explained_variance"]

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_is_fitted__(self):
        return hasattr(self, "components_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


class _training_precision:
    """A fit trains in the precision its config names, whatever the caller's.

    * A caller's ``torch.autocast`` for the training device is off for the fit (the trainer turns
      the configured bf16 autocast on around each forward pass): inside a caller's bf16 autocast
      region a fit measured its data scales in bf16 and ``mixed_precision=False`` trained in bf16.
    * A mixed-precision CUDA fit allows TF32 matmuls.  ``torch.backends.cuda.matmul.allow_tf32``
      is process-wide and fits may overlap (threads: ``GridSearchCV`` under joblib's threading
      backend), so the mixed-precision CUDA fits share one window, counted under a lock: the
      first to enter saves the caller's value and sets it, the last to leave puts the saved value
      back.  (Saved and restored per fit, fits A and B entering A, B and leaving A, B ran B with
      TF32 off after A ended and left it on after both.)  While the window is open every fit of
      the process runs TF32 matmuls, one with mixed precision off too, and a value the caller
      sets meanwhile is overwritten at its end.
    """

    _lock = threading.Lock()
    _open = 0  # mixed-precision CUDA fits inside the TF32 window
    _saved = None  # the caller's allow_tf32 from before the window opened

    def __init__(self, config):
        self.on = config.autocast_dtype is not None and config.device.startswith("cuda")
        self.device = config.device

    def __enter__(self):
        from ._backend.mlp import without_autocast

        self.autocast_off = without_autocast(self.device)
        self.autocast_off.__enter__()
        if self.on:
            import torch

            cls = _training_precision
            with cls._lock:
                if cls._open == 0:
                    cls._saved = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = True
                cls._open += 1
        return self

    def __exit__(self, *exc):
        try:
            if self.on:
                import torch

                cls = _training_precision
                with cls._lock:
                    cls._open -= 1
                    if cls._open == 0:
                        torch.backends.cuda.matmul.allow_tf32 = cls._saved
                        cls._saved = None
        finally:
            self.autocast_off.__exit__(*exc)
        return False


def _training_device(estimator) -> str:
    """``estimator.device`` resolved; with ``distributed=True`` on CUDA, one GPU per rank
    (``cuda:LOCAL_RANK``)."""
    device = _validation.resolve_device(estimator.device)
    if estimator.distributed:
        from ._backend.distributed import rank_device

        device = rank_device(estimator.device, device)
    return device


def _warn_checkpoint_dir_unused(estimator) -> None:
    """``partial_fit`` saves no checkpoints: say so once, when it starts its optimiser."""
    if estimator.checkpoint_dir is not None:
        from ._warnings import warn

        warn(
            f"checkpoint_dir={estimator.checkpoint_dir!r} is not used by partial_fit (it is for fit and "
            f"fit_stream): the estimator itself holds the state between calls; save or pickle it to keep "
            f"it, or train with fit_stream to checkpoint a stream."
        )


def _refuse_distributed_partial_fit(estimator) -> None:
    if estimator.distributed:
        raise ValueError(
            "distributed=True is for fit and fit_stream; partial_fit trains on the rows each call "
            "is given, in order, in this process. Use fit_stream with a sharded stream to train "
            "data-parallel batch by batch, or set distributed=False."
        )


def _check_warm_shape(fitted: int, requested: int, name: str, continuing: str = "fit") -> None:
    """Refuse to continue a fitted model (``continuing``: ``"fit"`` with ``warm_start=True``, or
    ``"partial_fit"``, which never resets) with another width than its own."""
    if fitted == requested:
        return
    if continuing == "partial_fit":
        raise ValueError(
            f"partial_fit continues the fitted model, whose {name} is {fitted}, but {name}={requested} now; "
            f"restore {name}={fitted}, or call fit() (warm_start=False) to train a new model of that width."
        )
    raise ValueError(
        f"warm_start=True but {name}={requested} differs from the fitted model's {fitted}; "
        f"set warm_start=False to refit from scratch or restore {name}={fitted}."
    )


def _sparse_torch_as_scipy(codes):
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(codes, torch.Tensor) or codes.layout == torch.strided or codes.ndim != 2:
        return codes
    if codes.is_complex():  # refused as a dense complex tensor is, not cast (the imaginary part dropped)
        return codes
    coo = codes.detach().to("cpu").to_sparse_coo().coalesce()
    values = coo.values()
    values = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32).numpy()
    return sp.coo_array((values, tuple(coo.indices().numpy())), shape=tuple(coo.shape))


def _check_latent_names(codes, latent_names, name):
    """Refuse a DataFrame of codes whose string column names are not this dictionary's latents in
    order (a reordered or renamed frame would decode silently wrong); as scikit-learn does for
    feature names, integer column names (a frame built from an array) carry no names to check.
    ``latent_names``: a callable giving the names (built only for a frame: 65,536 of them cost), or a
    tuple of such callables, any of whose names is accepted (the first is the one a message names)."""
    columns = getattr(codes, "columns", None)
    if columns is None or not len(columns) or not all(isinstance(column, str) for column in columns):
        return
    columns = list(columns)
    accepted = [[str(latent) for latent in names()] for names in
                (latent_names if isinstance(latent_names, tuple) else (latent_names,))]
    if any(columns == names for names in accepted) or len(columns) != len(accepted[0]):  # another width: _decode names it
        return
    latent_names = accepted[0]
    if sorted(columns) == sorted(latent_names):
        problem = "in another order"
    else:
        known = set(latent_names)
        unknown = [column for column in columns if column not in known]
        problem = f"with other names ({', '.join(map(repr, unknown[:3]))}{', ...' if len(unknown) > 3 else ''})"
    raise ValueError(
        f"{name}'s columns hold this dictionary's latents {problem}: decoding them by position would mix "
        f"latents up. Pass the codes as transform returned them, or reorder the frame: "
        f"{name}[list(estimator.get_feature_names_out())] (get_output_feature_names_out() for output codes)."
    )


def _decode(codes, components, bias, name, latent_names):
    _check_latent_names(codes, latent_names, name)
    codes = _sparse_torch_as_scipy(codes)  # codes are sparse: a torch COO/CSR tensor of them decodes too
    codes = _from_torch(codes, name)  # as transform reads tensors: bf16, attached to a graph, on a GPU
    if sp.issparse(codes) and codes.ndim != 2:
        # check_array does not look at the number of dimensions of an n-D COO array: a (t, m, n)
        # Jacobian would broadcast through the product below into a 3-D "reconstruction".
        raise ValueError(
            f"{name} must be 2-D codes of shape (n_samples, {components.shape[0]}); got a sparse array "
            f"of shape {codes.shape}. Pass codes from this estimator's transform."
        )
    # order="C": numpy's product of a column-major array (what pandas 3 holds a frame built from an
    # array as) rounds differently, and the same codes decoded to rows 1 ulp apart.
    codes = check_array(codes, accept_sparse=("csr", "csc", "coo"), dtype=[np.float32, np.float64], order="C",
                        input_name=name)
    if codes.shape[1] != components.shape[0]:
        raise ValueError(
            f"{name} has {codes.shape[1]} columns but the dictionary has n_components="
            f"{components.shape[0]}; pass codes from this estimator's transform."
        )
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by row
        out = codes @ components.astype(codes.dtype, copy=False)
        out = out.toarray() if sp.issparse(out) else np.asarray(out)
        # In place where the sum keeps out's dtype: `out + bias` held a second reconstruction (twice
        # the output's memory, gigabytes for a store's codes).
        if np.result_type(out.dtype, bias.dtype) == out.dtype:
            out += bias
        else:
            out = out + bias
    # By blocks of about a million values: a bool array of the whole output was another quarter of it.
    block = max(1, (1 << 20) // max(1, out.shape[1]))
    bad = np.concatenate([np.flatnonzero(~np.isfinite(out[start:start + block]).all(axis=1)) + start
                          for start in range(0, len(out), block)] or [np.empty(0, dtype=np.intp)])
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"the reconstruction of row {row} of {name} (and of {len(bad)} row(s) in all) "
            f"overflows {out.dtype}: its codes are far larger than any transform gives (largest "
            f"|code| {float(abs(codes).max()):.3g}). Pass codes from this estimator's transform, or "
            f"scale them down."
        )
    return out


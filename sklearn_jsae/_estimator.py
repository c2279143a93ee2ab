"""JacobianSparseAutoencoder: a pair of TopK SAEs around an MLP with a sparse Jacobian."""

from __future__ import annotations

import copy
import numbers
import os
import sys
import tempfile

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_memory

from . import _validation
from ._persistence import PersistenceMixin
from ._sklearn_compat import (
    ADAPTERS_MANAGER,
    HasMethods,
    NumberInterval,
    StrOptions,
    _check_feature_names_in,
    _fit_context,
    _get_output_config,
    check_is_fitted,
)
from ._sparse import AbsJacobianSum, InputCodes, OutputCodes, blocks_to_coo
from ._topk import (
    _COMMON_CONSTRAINTS,
    TopKSparseAutoencoder,
    _check_codes_output,
    _check_warm_shape,
    _codes_output,
    _decode,
    _draw_seed,
    _inference_device,
    _keep_state_on_error,
    _refuse_distributed_partial_fit,
    _warn_checkpoint_dir_unused,
    _training_device,
    _training_precision,
    _validate_X,
)
from ._validation import check_k
from ._warnings import warn

# The most training rows ``jacobian_`` averages over.  Its sum has up to k² entries per row; with
# wide dictionaries (the paper's 65,536 latents) and hundreds of millions of rows, a sum over all
# of them would grow towards n_out · n_in entries (tens of GB) at the end of a fit.
_JACOBIAN_ROWS = 65_536
DEFAULT_L1 = 2.0


def _cacheable_mlp_pass(X, map_kind, map_buffers, scale_x, scale_y, device_type, library_version, mlp_map):
    """:func:`~sklearn_jsae._backend.train.compute_mlp_pass` in the form ``Memory.cache`` wraps:
    every argument but ``mlp_map``, which ``map_kind`` and ``map_buffers`` describe, is the key.
    ``library_version`` is in the key for the code behind this function, which joblib does not
    see: an upgrade that changes how the pass is computed does not read an older cache."""
    from ._backend.train import compute_mlp_pass

    return compute_mlp_pass(X, mlp_map, scale_x, scale_y, device=device_type)


def _library_version() -> str:
    from . import __version__

    return __version__


def _check_cache_folder(location) -> None:
    """Raise a ValueError naming ``memory`` unless ``location`` is (or can be made) a writable folder."""
    path = os.fspath(location)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"memory={path!r} is a file, not a folder; pass a folder path for the cache, or None.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(
            f"memory={path!r} cannot hold the cache: {type(exc).__name__}: {exc.strerror or exc}. Pass a "
            f"folder you can write to, or memory=None to compute the MLP pass at every step."
        ) from exc


def _cached_mlp_pass(memory):
    """A ``train(mlp_pass=...)`` callable that reads and fills ``memory``; None for no cache."""
    if isinstance(memory, (str, os.PathLike)):
        memory = os.fspath(memory)  # scikit-learn's check_memory takes a str, not a pathlib.Path
        _check_cache_folder(memory)
    memory = check_memory(memory)
    if isinstance(memory, joblib.Memory) and memory.location is None:
        return None
    if isinstance(memory, joblib.Memory):
        _check_cache_folder(memory.location)
    cached = memory.cache(_cacheable_mlp_pass, ignore=["mlp_map"])

    def mlp_pass(X, mlp_map, scale_x, scale_y):
        buffers = {name: b.detach().cpu().numpy() for name, b in mlp_map.named_buffers()}
        kind = (type(mlp_map).__name__, getattr(mlp_map, "activation", None))
        # The pass runs where train() placed the map, and CPU and CUDA round differently.
        device_type = next((b.device.type for b in mlp_map.buffers()), "cpu")
        args = (X, kind, buffers, float(scale_x), scale_y, device_type, _library_version())
        # A miss computes the pass and stores it as far as the disk lets it (joblib warns when it
        # cannot); a hit loads it, and an entry that no longer unpickles is computed again by joblib.
        result = cached(*args, mlp_map=mlp_map)
        problem = _cached_pass_problem(result, X.shape[0])
        if problem is not None:
            # What an entry that unpickles holds is not checked by joblib: a damaged one (a flipped
            # bit made an output inf, and the fit "diverged" blaming learning_rate) would fail every
            # later fit.  It is cleared and computed again.
            warn(f"the memory cache's MLP pass for this X {problem}; it is computed again "
                 f"(in {getattr(memory, 'location', memory)!r}).")
            cached.call_and_shelve(*args, mlp_map=mlp_map).clear()
            result = cached(*args, mlp_map=mlp_map)
        return result

    return mlp_pass


def _cached_pass_problem(result, n_rows: int) -> str | None:
    """What is wrong with an MLP pass read from the cache, or None."""
    from ._backend.train import MLPPass

    if not isinstance(result, MLPPass):
        return f"is a {type(result).__name__}, not an MLP pass"
    arrays = {"outputs": result.outputs, "mean_y": result.mean_y}
    if result.weights is not None:
        arrays["weights"] = result.weights
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            return f"holds {name} of type {type(value).__name__}"
    if result.outputs.ndim != 2 or result.outputs.shape[0] != n_rows or result.mean_y.shape != result.outputs.shape[1:] \
            or (result.weights is not None and result.weights.shape[0] != n_rows):
        return f"has outputs of shape {result.outputs.shape} for {n_rows} rows"
    if not (np.isfinite(result.scale_y) and result.scale_y > 0):
        return f"has an output scale of {result.scale_y}"
    for name, value in arrays.items():
        # A memory-mapped entry (joblib.Memory(mmap_mode="r")) is not scanned: that would read the
        # whole pass through its mapping; training checks the rows it reads.
        if not isinstance(value, np.memmap) and not np.isfinite(value).all():
            return f"holds NaN or inf in its {name}"
    return None


def _side_rows_kept(old_history, new_history, old_side) -> list:
    """The side SAE's history rows that carry over: those of ``old_side`` (the side estimator of the
    last fit) when the pair's old history is the start of the new one, row for row (the same
    objects: a ``partial_fit`` call appends to it); else none."""
    import operator

    old_rows = getattr(old_side, "history_", None)
    if (old_history is None or old_rows is None or len(old_rows) != len(old_history)
            or len(old_history) > len(new_history)
            or not all(map(operator.is_, old_history, new_history))):
        return []
    return list(old_rows)


def _column_names(X) -> list[str] | None:
    """The column names of a DataFrame (pandas or polars): codes under ``set_output``, which name
    their side (input or output latents); None for any other array."""
    columns = getattr(X, "columns", None)
    return None if columns is None else [str(name) for name in columns]


def _mlp_changed(fitted_map, new_map, probe_rows) -> bool:
    """Whether ``new_map`` computes something else than ``fitted_map`` on ``probe_rows`` (float32)."""
    from ._backend.inference import map_rows

    before = map_rows(fitted_map, probe_rows, "cpu", len(probe_rows))
    after = map_rows(new_map, probe_rows, "cpu", len(probe_rows))
    scale = max(float(np.abs(before).max()), 1e-30)
    return not np.allclose(before, after, rtol=1e-5, atol=1e-6 * scale)


class JacobianSparseAutoencoder(PersistenceMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin,
                                BaseEstimator):
    r"""Jacobian Sparse Autoencoder (Farnik et al. 2025): sparsify an MLP's computation.

    Two TopK SAEs, one on the MLP's inputs ``x`` and one on its true outputs
    ``y = mlp(x)``, trained so that the Jacobian ``J = ∂s_y/∂s_x`` between their
    latents is sparse::

        s_x = ReLU(TopK_k((x - b_dec_x) W_enc_x^T + b_enc_x)),   x̂ = s_x W_dec_x + b_dec_x
        s_y = ReLU(TopK_k((y - b_dec_y) W_enc_y^T + b_enc_y)),   ŷ = s_y W_dec_y + b_dec_y
        J_t = W_enc_y[I_y] · J_mlp(x_t) · W_dec_x[I_x]^T          (k × k active block per sample)

    Objective per minibatch, on data scaled by ``c_x`` and ``c_y`` (the per-feature
    RMS of the centred training inputs and outputs)::

        L = MSE(x̂/c_x, x/c_x) + MSE(ŷ/c_y, y/c_y)
            + l1 · mean_t Σ_ab |J_t[a, b]| · (c_x / c_y) / sqrt(d_in · d_out)

    The Jacobian is exact, taken at the true input, with a closed form for
    ``Linear → activation → Linear`` and gated MLPs and forward-mode autograd for
    any other torch callable.  For ``d_in = d_out = d`` and ``c_x = c_y = c`` the
    paper's ``λ`` is ``l1 · c² · k² / d`` (:attr:`paper_lambda_`): ``l1 = 0.5`` with unit-scale
    data is the authors' default ``λ = 0.5 k² / d``, and an ``l1`` value means the same across
    widths, ``k`` and activation scales.  ``l1 = 0`` trains two ordinary TopK SAEs.

    Parameters
    ----------
    mlp : None, torch.nn.Module or callable, default=None
        The MLP ``(n, d_in) -> (n, d_out)`` on torch tensors.  None is the identity.
        ``nn.Sequential(nn.Linear, act, nn.Linear)`` with GELU (exact or tanh), ReLU,
        SiLU, Tanh or Sigmoid, and the modules of :mod:`sklearn_jsae.mlp` use the
        closed form; anything else uses exact forward-mode JVPs (slower).  Never modified.
        A module is copied to the fit's device; a callable that is not a module (``lambda x:
        model.mlp(x)``) runs where the tensors it reads are: on the fit's device, or on the CPU
        (rows are moved there and back, with a warning that this is slow).
    n_components : int, default=2048
        Latents of the input SAE.
    n_output_components : int or None, default=None
        Latents of the output SAE; None means ``n_components``.
    k : int, default=32
        Active latents per sample in each SAE.
    l1 : float, default=2.0
        Weight of the Jacobian penalty (normalisation above); 0 gives the traditional pair.
        It ramps linearly from 0 over the first 5% of steps.  The default was chosen from an
        ``l1`` sweep on every layer of all-MiniLM-L6-v2 and three of SmolLM2-135M at 10k and
        100k tokens: on MiniLM it makes 9-16x fewer normalised Jacobian entries exceed 0.01
        than ``l1 = 0`` on layers 4-5 (at most +0.03 FVU), 4-5x on layer 3 and 2-3x on layers
        0-2 (+0.01 to +0.10, mostly on the output SAE); gated SmolLM2 layers get 1.4-1.8x
        and want about 4 (User Guide, "How the defaults were chosen").  At the default length
        on 100k tokens (30 epochs) the ratios are 3.8-28x on MiniLM, for at most +0.064 / +0.084.
    penalty : {"paper", "unit_gain"}, default="paper"
        What the penalty sums.  ``"paper"``: ``|J_t[a, b]|`` as above, the authors' penalty.
        ``"unit_gain"``: ``|J_t[a, b]| / ‖W_enc_y[a]‖``, the Jacobian of each output latent's
        encoder *direction*, so that the penalty cannot be paid by shrinking the output SAE's
        encoder rows (the input side's decoder rows have unit norm already).  Measured on
        MiniLM layer 2 and SmolLM2 layer 15 it is the worse trade (User Guide, "How the
        defaults were chosen"): the output SAE's rows grow instead and few entries fall below
        0.01; it is kept for such ablations.  The traditional pair (``l1 = 0``) is the same under both.
    learning_rate : float, default=5e-3
        Adam step size.  Ten times the paper's 5e-4, which assumes ~10⁵ steps: with 10⁴-10⁶
        tokens a fit has hundreds to thousands of steps (see the User Guide's "defaults").
        Warm-up over 1% of steps, linear decay to 0 over the last 20%.
    max_iter : int, default=30
        Epochs of ``fit``; ``partial_fit`` and ``fit_stream`` use each row they are given once.
    batch_size : int, default=1024
        Samples per minibatch.
    aux_coef : float, default=1/32
        Weight of the AuxK dead-latent loss on each SAE (0 disables it).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        Where to train and transform: ``"auto"`` is the first CUDA device when there is one, else
        the CPU.  Every random draw happens on the CPU, so a seed gives the same initial model on
        every device.  Fitted state is numpy: a model trained on CUDA transforms on a machine
        without it (on the CPU, with a warning).
    mixed_precision : bool or "auto", default="auto"
        bf16 autocast of the training forward pass (float32 master weights, optimiser state,
        MLP pass and Jacobian reductions) and TF32 matmuls during the fit, as the paper trains.
        ``"auto"`` turns it on for CUDA only; True also on the CPU (slower there).
        Inference always runs in float32.
    sparse_output : bool, default=True
        ``transform`` and ``transform_output`` return SciPy CSR codes when True, dense float32
        ndarrays when False (needed for ``set_output(transform="pandas")`` or ``"polars"``).
        ``jacobian`` is always sparse.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation of both SAEs (independent draws) and the batch order.
    verbose : int, default=0
        When > 0, ``fit`` and ``fit_stream`` show a tqdm progress bar over optimiser steps with the
        live loss terms, tokens per second and the time left, and one line of loss terms per epoch;
        silent otherwise.  ``partial_fit`` is always silent (its calls are the caller's loop: read
        ``history_``, one row per call).
    warm_start : bool, default=False
        Continue from the fitted weights on the next ``fit`` or ``fit_stream`` (with a fresh
        schedule).  If the ``mlp`` now computes something else on the first training rows (a
        different MLP of the same shape), the output scale ``c_y`` is re-measured from the new
        outputs, with a warning, so that the loss keeps its scale; the SAE weights continue.
    memory : str, path-like, joblib.Memory or None, default=None
        Where to cache the part of a fit that does not depend on ``l1`` or the SAEs: the MLP's
        outputs and local weights (``φ'(z)``) on every training row and the output
        statistics.  With a cache, a fit computes them once, or reads them if an earlier fit
        with the same X, MLP and device stored them, and does not run the MLP at each step; an
        ``l1`` sweep in :class:`~sklearn.model_selection.GridSearchCV` then runs the MLP once per
        fold instead of once per step of every candidate.  A string is a cache folder.  Costs
        ``n_samples · (d_out + r · d_mlp)`` float32 on disk and in memory (``r = 2`` for gated
        MLPs); ``joblib.Memory(..., mmap_mode="r")`` reads the rows from disk instead.  The key
        hashes X and the MLP's weights (one read of X per fit), never ``l1`` or the SAE settings.
        Callables without a closed-form Jacobian are not cached (their JVPs run the MLP anyway).
        None (default) computes everything at each step, as the paper does.  ``fit`` only:
        ``partial_fit`` and ``fit_stream`` see each row once, so there is nothing to reuse.  The
        cache holds joblib pickles, and loading a pickle can run code: never point ``memory`` at
        a folder that others can write to.  A folder that is a file or is not writable is an error.
    n_tokens : int or None, default=None
        Tokens that ``partial_fit`` calls or ``fit_stream`` will see in all (``fit`` ignores it:
        there the number of steps is known).  With it, ``partial_fit`` follows ``fit``'s schedule
        over ``ceil(n_tokens / batch_size)`` steps (learning-rate warm-up over 1%, decay to 0 over
        the last 20%, ``l1`` ramp over 5%); None warms the learning rate up over 100 steps and
        ``l1`` over 500 and keeps both constant after (the end is unknown).
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
        Train data-parallel over the ``torch.distributed`` job this process belongs to: start
        the same script on every rank with ``torchrun`` (or initialise a process group first,
        :func:`sklearn_jsae.distributed.init_process_group`).  ``fit``: every rank passes the same
        X (the same memmap, say); each optimiser step's batch, the one a one-process fit takes,
        is split between the ranks, each reads only its share, and the gradients, loss terms and
        fired latents are all-reduced, so every rank ends with the same model (the one-process
        model up to float rounding).  ``fit_stream``: each rank passes its own shard of the
        stream (``ActivationStream(..., rank=r, world_size=W)``) and ``batch_size`` is the global
        batch.  ``device="auto"`` or ``"cuda"`` trains rank ``r`` on ``cuda:LOCAL_RANK`` (NCCL),
        the CPU on gloo.  Rank 0 writes the checkpoint (in ``fit_stream`` each rank also writes
        its stream's buffer to a file of its own beside it), and a job restarted with the same
        number of ranks resumes from them; a rank that dies or hangs makes the others stop with
        :class:`~sklearn_jsae.distributed.DistributedTrainingError`.  ``partial_fit`` refuses it.
        See the User Guide's "Scaling out".

    Attributes
    ----------
    input_sae_ : TopKSparseAutoencoder
        Fitted SAE on the MLP inputs; ``input_sae_.components_`` has shape ``(n_components, n_features_in_)``.
        Its ``history_`` rows hold this side's terms of the pair's rows without the side's suffix
        (``mse``, ``aux``, ``dead_fraction``, with ``epoch`` or ``call``, ``tokens``, ``seconds``);
        after :meth:`from_saes`, the SAE's own rows.
    output_sae_ : TopKSparseAutoencoder
        Fitted SAE on the MLP outputs; ``components_`` shape (n_output_components, d_out).  Its
        ``history_`` as ``input_sae_``'s.
    mlp_ : object
        Frozen CPU copy of ``mlp`` (None for the identity).
    jacobian_ : scipy.sparse.csr_array of shape (n_output_components, n_components)
        Mean ``|J|`` over the training samples (a sample whose block misses a pair counts as 0);
        over every ``s``-th of them when there are more than 65,536
        (``s = ceil(n_samples / 65536)``), which bounds its cost at the end of a long fit.
        ``partial_fit``: the last call's rows; ``fit_stream``: the last ``jacobian_rows``.
    history_ : list of dict
        Per-epoch ``loss``, ``mse_input``, ``mse_output``, ``jacobian_l1``, ``aux_input``,
        ``aux_output``, ``l1``, ``dead_fraction_input``, ``dead_fraction_output``, ``seconds``.
    n_iter_ : int
        The rows this fit added to ``history_``: epochs for ``fit``, calls since the optimiser
        (re)started for ``partial_fit``, records for ``fit_stream``.
    device_ : str
        The device the last ``fit`` trained on (``"cpu"`` or ``"cuda:N"``).
    n_features_in_ : int
    n_output_features_ : int
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``

    See Also
    --------
    TopKSparseAutoencoder : a single SAE, the traditional baseline.

    References
    ----------
    L. Farnik, T. Lawson, C. Houghton, L. Aitchison. "Jacobian Sparse Autoencoders:
    Sparsify Computations, Not Just Activations", ICML 2025, arXiv:2502.18147.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=32, k=4, max_iter=3, random_state=0).fit(X)
    >>> jsae.transform(X).shape
    (256, 32)
    >>> J = jsae.jacobian(X[:10])
    >>> J.shape, J.nnz <= 10 * 4 * 4
    ((10, 32, 32), True)
    """

    _parameter_constraints: dict = {
        **_COMMON_CONSTRAINTS,
        "mlp": [None, callable],
        "n_output_components": [None, NumberInterval(numbers.Integral, 1, None, closed="left")],
        "l1": [NumberInterval(numbers.Real, 0, None, closed="left")],
        "penalty": [StrOptions(set(_validation.PENALTIES))],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
        "distributed": ["boolean"],
    }

    def __init__(
        self,
        mlp=None,
        *,
        n_components=2048,
        n_output_components=None,
        k=32,
        l1=DEFAULT_L1,
        penalty="paper",
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
        memory=None,
        n_tokens=None,
        checkpoint_dir=None,
        checkpoint_every=1000,
        distributed=False,
    ):
        self.mlp = mlp
        self.n_components = n_components
        self.n_output_components = n_output_components
        self.k = k
        self.l1 = l1
        self.penalty = penalty
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
        self.memory = memory
        self.n_tokens = n_tokens
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.distributed = distributed

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def from_saes(cls, mlp, input_sae, output_sae, X, **params):
        """A fitted JSAE made of two fitted TopK SAEs around ``mlp``, without training.

        The pair's Jacobian, metrics and splicing are then those of the two SAEs as they are: for
        example two SAEs trained separately (the paper's traditional pair), or SAELens or sparsify
        SAEs read with :func:`sklearn_jsae.interop.from_saelens` /
        :func:`~sklearn_jsae.interop.from_sparsify`.  ``fit`` with ``warm_start=True`` then trains
        the pair on from their weights with the Jacobian penalty.

        Parameters
        ----------
        mlp : callable
            The MLP between them, as in the constructor (:func:`sklearn_jsae.hf.mlp_of`).
        input_sae, output_sae : TopKSparseAutoencoder
            Fitted on the MLP's inputs and on its outputs; the same ``k`` (a JSAE has one).
            They are copied: the returned estimator does not share their arrays.
        X : array-like of shape (n_samples, n_features)
            MLP inputs (a memmap is read batch by batch) to measure the data scales ``c_x`` and
            ``c_y`` on, as ``fit`` does, and ``jacobian_`` (on at most 65,536 of its rows).
        **params
            Any other constructor parameter (``l1``, ``device``, ``random_state``, ...);
            ``n_components``, ``n_output_components`` and ``k`` come from the SAEs.

        Returns
        -------
        jsae : JacobianSparseAutoencoder
            Fitted, with ``n_iter_ = 0`` and an empty ``history_``; its ``input_sae_`` and
            ``output_sae_`` keep the SAEs' own ``history_``, ``n_iter_`` and ``dead_fraction_``.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
        >>> from sklearn_jsae.metrics import jacobian_sparsity
        >>> torch.manual_seed(0) and None
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))
        >>> X = np.random.default_rng(0).normal(size=(512, 6)).astype(np.float32)
        >>> with torch.no_grad():
        ...     Y = mlp(torch.from_numpy(X)).numpy()
        >>> sae_x = TopKSparseAutoencoder(16, k=3, batch_size=64, max_iter=25, random_state=0).fit(X)
        >>> sae_y = TopKSparseAutoencoder(16, k=3, batch_size=64, max_iter=25, random_state=0).fit(Y)
        >>> pair = JacobianSparseAutoencoder.from_saes(mlp, sae_x, sae_y, X)
        >>> bool((pair.transform(X) != sae_x.transform(X)).nnz == 0), pair.jacobian(X[:4]).shape
        (True, (4, 16, 16))
        >>> above = jacobian_sparsity(pair, X[:100], thresholds=[0.01])[0.01]
        >>> 0.0 < above <= 1.0
        True
        """
        import torch
        from sklearn.utils.validation import check_is_fitted

        from ._backend.mlp import placed, without_autocast
        from ._backend.train import TrainResult, _Rows, data_statistics

        for name, sae in (("input_sae", input_sae), ("output_sae", output_sae)):
            if not isinstance(sae, TopKSparseAutoencoder):
                raise TypeError(f"{name} must be a fitted TopKSparseAutoencoder (from_saelens and from_sparsify "
                                f"give one), got {type(sae).__name__}.")
            check_is_fitted(sae, "components_")
        if input_sae.k != output_sae.k:
            raise ValueError(f"input_sae has k={input_sae.k} and output_sae k={output_sae.k}; a "
                             f"JacobianSparseAutoencoder has one k for both SAEs: pass two SAEs with the same k.")
        given = sorted(set(params) & {"n_components", "n_output_components", "k"})
        if given:
            raise TypeError(f"{', '.join(given)} come(s) from the SAEs; do not pass them to from_saes.")
        n_input, n_output = input_sae.components_.shape[0], output_sae.components_.shape[0]
        estimator = cls(mlp=mlp, n_components=n_input, n_output_components=None if n_output == n_input else n_output,
                        k=input_sae.k, **params)
        estimator._validate_params()
        X = _validate_X(estimator, X, reset=True, checked_in_batches=True)
        if input_sae.n_features_in_ != X.shape[1]:
            raise ValueError(f"input_sae was fitted on {input_sae.n_features_in_} features, but X has "
                             f"{X.shape[1]}: X must hold the inputs of the MLP the input SAE encodes.")
        config, mlp_copy, mlp_map, d_out, probe_rows = estimator._prepare(X)
        if output_sae.n_features_in_ != d_out:
            raise ValueError(f"output_sae was fitted on {output_sae.n_features_in_} features, but mlp returns "
                             f"{d_out}: the output SAE must encode this MLP's outputs.")
        # The scales fit measures: the centred RMS of X and of mlp(X), in float32 on the CPU (a
        # caller's autocast off, as in fit).
        rows = _Rows(X, "cpu", torch.float32, resident=False)
        with without_autocast("cpu"):
            _, scale_x = data_statistics(rows, spread_required="X given to from_saes sets the pair's data scales")
            _, scale_y = data_statistics(rows, placed(mlp_map, "cpu", torch.float32),
                                         spread_required="X given to from_saes sets the pair's data scales")
        result = TrainResult(input_sae._params(), output_sae._params(), scale_x, scale_y,
                             dead_fraction_input=input_sae.dead_fraction_,
                             dead_fraction_output=output_sae.dead_fraction_)
        estimator._set_fitted(result, mlp_copy, mlp_map, probe_rows, config.device, d_out, X, previous=[])
        for side, source in ((estimator.input_sae_, input_sae), (estimator.output_sae_, output_sae)):
            side.history_, side.n_iter_ = [dict(row) for row in source.history_], source.n_iter_
        return estimator

    @_keep_state_on_error
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit both SAEs on X, the MLP's inputs (n_samples, n_features); ``y`` is ignored.

        The MLP's true outputs are computed from X batch by batch, or read from ``memory``.
        """
        from ._backend.checkpoint import fingerprint_array
        from ._backend.train import supports_mlp_pass, train
        from ._incremental import check_same_fit, join_job, make_checkpointer

        warm = self.warm_start and hasattr(self, "input_sae_")
        X = _validate_X(self, X, reset=not warm, checked_in_batches=True)
        _validation.warn_if_few_steps(X.shape[0], self.batch_size, self.max_iter)
        if self.memory is not None:
            _cached_mlp_pass(self.memory)  # a bad cache folder fails before the MLP is even probed
        config, mlp_copy, mlp_map, d_out, probe_rows = self._prepare(X)
        parallel, config = join_job(self, config)
        # The data's identity (a hash of every row in memory) is computed once, and only when needed.
        data_identity = (lambda: fingerprint_array(X)) if parallel is None else fingerprint_array(X)
        if parallel is not None:
            check_same_fit(parallel, data_identity, mlp_map, config, self)
        init = self._warm_init(mlp_map, d_out) if warm else None
        mlp_pass = _cached_mlp_pass(self.memory) if supports_mlp_pass(mlp_map) else None
        checkpoint = make_checkpointer(self, data_identity, mlp_map, config, init, "fit",
                                       parallel)
        with _training_precision(config):
            result = train(X, mlp_map, config, init=init, mlp_pass=mlp_pass, checkpoint=checkpoint,
                           parallel=parallel)
        self._trainer = None  # partial_fit after fit starts from the fitted weights
        self._set_fitted(result, mlp_copy, mlp_map, probe_rows, config.device, d_out, X,
                         previous=self.history_ if warm else [])
        return self

    @_keep_state_on_error
    def partial_fit(self, X, y=None):
        """One pass over X, in order, one optimiser step per ``batch_size`` rows; never resets.

        The first call measures the data scales ``c_x`` and ``c_y`` on its rows (give it a
        representative batch of at least a few thousand tokens), probes the MLP and starts the
        optimiser; later calls continue it with the schedule ``n_tokens`` sets (see above).
        After ``fit`` (or unpickling) the first call continues from the fitted weights with a
        fresh optimiser.  Rows are used in the order given: shuffle them (or use a stream with a
        shuffle buffer, :class:`sklearn_jsae.hf.ActivationStream`).  ``history_`` gets one row per
        call and ``jacobian_`` is the mean ``|J|`` over the last call's rows.  Parameters are
        validated at every call, and a training parameter changed since the optimiser started
        (``set_params(k=...)``, ``l1``, ...) starts it again from the fitted weights with the new
        value.  With ``n_tokens=len(X)``, one call on all rows in ``fit``'s batch order gives
        ``fit``'s model with ``max_iter=1``, up to the rounding of the data statistics (summed in
        another order).
        """
        from ._incremental import start_trainer, total_steps, train_rows, training_params

        self._validate_params()
        _refuse_distributed_partial_fit(self)
        trainer = getattr(self, "_trainer", None)
        fitted = hasattr(self, "input_sae_")
        X = _validate_X(self, X, reset=not fitted and trainer is None, checked_in_batches=True)
        if trainer is None or trainer.broken or trainer.params != training_params(self):
            _warn_checkpoint_dir_unused(self)
            config, mlp_copy, mlp_map, d_out, probe_rows = self._prepare(X)
            init = self._warm_init(mlp_map, d_out, "partial_fit") if fitted else None
            trainer = start_trainer(config, X, mlp_map, init, total_steps(self.n_tokens, self.batch_size))
            trainer.previous_history = list(self.history_) if fitted else []
            trainer.model = (mlp_copy, mlp_map, d_out, probe_rows)
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
            mlp_copy, mlp_map, d_out, probe_rows = trainer.model
            self._set_fitted(trainer.result(), mlp_copy, mlp_map, probe_rows, trainer.config.device, d_out, X,
                             previous=trainer.previous_history)
        except BaseException:
            try:
                trainer.restore(snapshot)
            except BaseException:
                trainer.broken = True  # half-restored: the next call starts again from the fitted state
                raise
            raise
        return self

    @_keep_state_on_error
    def fit_stream(self, batches, *, n_statistics=16384, jacobian_rows=4096):
        """Fit on a stream of MLP-input batches, never holding more than a few batches in memory.

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
            Rows read first to measure the data scales ``c_x``, ``c_y`` and the initial decoder
            biases (then trained on like any others); at least 2.
        jacobian_rows : int, default=4096
            ``jacobian_`` is the mean ``|J|`` over the last this many rows of the stream (over
            every ``s``-th of them beyond 65,536, as for ``fit``).

        Returns
        -------
        self : JacobianSparseAutoencoder
            With ``warm_start=True`` a fitted estimator continues from its weights (with a fresh
            schedule), as ``fit`` does; otherwise a fresh model.

        Notes
        -----
        Training runs until the stream ends or ``n_tokens`` rows were used; the schedule spans
        ``n_tokens`` (open-ended without it, see ``n_tokens``).  ``history_`` gets one row per
        ``max(1, total_steps // 100)`` steps.  With ``checkpoint_dir``, a checkpoint also holds
        the stream's position (its ``state_dict()``, if it has one, as
        :class:`~sklearn_jsae.hf.ActivationStream` does) and the rows read but not yet used, so a
        killed run restarted with the same stream resumes without repeating or skipping a token;
        a stream without ``state_dict`` and ``load_state_dict`` cannot resume (a warning says so
        when the fit starts, an error when it is restarted).
        """
        from ._stream_fit import fit_stream

        return fit_stream(self, batches, n_statistics=n_statistics, jacobian_rows=jacobian_rows)

    def _prepare(self, X):
        """Checks, the device, the MLP (probed on X's first rows) and the training config."""
        from ._backend.mlp import resolve_mlp

        n_output_components = self.n_output_components or self.n_components
        check_k(self.k, self.n_components)
        check_k(self.k, n_output_components, "n_output_components")
        device = _training_device(self)
        with np.errstate(over="ignore"):  # rows beyond float32's range: resolve_mlp names them
            probe_rows = np.array(X[: min(8, X.shape[0])], dtype=np.float32)
        mlp_copy, mlp_map, d_out = resolve_mlp(self.mlp, probe_rows, device)
        return self._train_config(device), mlp_copy, mlp_map, d_out, probe_rows

    def _prepare_stream(self, first, warm):
        """``(config, mlp_map, init, finish)`` for :func:`~sklearn_jsae._stream_fit.fit_stream`."""
        config, mlp_copy, mlp_map, d_out, probe_rows = self._prepare(first)
        init = self._warm_init(mlp_map, d_out) if warm else None
        previous = list(self.history_) if warm else []

        def finish(result, tail):
            self._set_fitted(result, mlp_copy, mlp_map, probe_rows, config.device, d_out, tail, previous)

        return config, mlp_map, init, finish

    def _train_config(self, device):
        from ._backend.train import TrainConfig

        return TrainConfig(
            n_components=self.n_components,
            n_output_components=self.n_output_components or self.n_components,
            k=self.k,
            l1=self.l1,
            penalty=self.penalty,
            learning_rate=self.learning_rate,
            max_iter=self.max_iter,
            batch_size=self.batch_size,
            aux_coef=self.aux_coef,
            device=device,
            autocast_dtype=_validation.resolve_autocast(self.mixed_precision, device),
            seed=_draw_seed(self.random_state),
            verbose=self.verbose,
        )

    def _warm_init(self, mlp_map, d_out, continuing="fit"):
        """``(params_x, params_y, c_x, c_y)`` to continue from (``continuing``: ``"fit"`` with
        ``warm_start=True``, or ``"partial_fit"``); ``c_y`` None (re-measured) when the MLP computes
        something else than the fitted one."""
        n_output_components = self.n_output_components or self.n_components
        _check_warm_shape(self.input_sae_.components_.shape[0], self.n_components, "n_components", continuing)
        _check_warm_shape(self.output_sae_.components_.shape[0], n_output_components, "n_output_components",
                          continuing)
        _check_warm_shape(self.n_output_features_, d_out, "the mlp's output width", continuing)
        scale_y = self.output_sae_.scale_
        if _mlp_changed(self._mlp_map, mlp_map, self._probe_rows):
            warn(
                f"{'warm_start=True' if continuing == 'fit' else 'partial_fit'} with an mlp that computes "
                "something else than the fitted one on "
                "the first training rows; the output scale c_y is re-measured from the new "
                "outputs and training continues from the fitted SAEs."
            )
            scale_y = None
        return (self.input_sae_._params(), self.output_sae_._params(), self.input_sae_.scale_, scale_y)

    def _set_fitted(self, result, mlp_copy, mlp_map, probe_rows, device, d_out, X_jacobian, previous):
        n_output_components = self.n_output_components or self.n_components
        earlier = getattr(self, "history_", None), getattr(self, "input_sae_", None), getattr(self, "output_sae_", None)
        self.mlp_ = mlp_copy
        self._mlp_map = mlp_map
        self._probe_rows = probe_rows
        self.device_ = device
        self.n_output_features_ = d_out
        n_iter = len(result.history)
        self.input_sae_ = self._side_estimator(self.n_components, result.input_params,
                                               result.input_scale, result.dead_fraction_input, device, n_iter)
        self.output_sae_ = self._side_estimator(n_output_components, result.output_params,
                                                result.output_scale, result.dead_fraction_output, device, n_iter)
        if hasattr(self, "feature_names_in_"):
            # The input SAE reads the pair's X: a frame of it has the pair's columns.  Without them
            # ``jsae.input_sae_.transform(df)`` warned that it "was fitted without feature names".
            self.input_sae_.feature_names_in_ = self.feature_names_in_.copy()
        self.history_ = list(previous) + result.history
        for (side, prefix), earlier_side in zip(((self.input_sae_, "input"), (self.output_sae_, "output")), earlier[1:]):
            # A partial_fit call adds one row to the history: its sides' rows are those of the last
            # call plus the new one (rebuilding all of them at every call made a loop of calls
            # quadratic: 2.9 s per call after 73,000 calls).
            done = _side_rows_kept(earlier[0], self.history_, earlier_side)
            side.history_ = done + [
                {key.replace(f"_{prefix}", ""): value for key, value in row.items()
                 if key.endswith(prefix) or key in ("epoch", "call", "tokens", "seconds")}
                for row in self.history_[len(done):]
            ]
        self.n_iter_ = n_iter
        self._fit_l1 = self.l1  # paper_lambda_ describes this fit, whatever set_params does after it
        self.jacobian_ = self._mean_abs_jacobian(X_jacobian)

    def __getstate__(self):
        # A partial_fit's live optimiser state (tensors possibly on a GPU) is not part of the
        # model: a pickled estimator's next partial_fit starts from its fitted weights.
        state = super().__getstate__()
        state.pop("_trainer", None)
        # The ``mlp`` parameter is the caller's module, on its device: a module on a GPU would make
        # the pickle unreadable on a CPU-only machine, which the fitted state (NumPy, a CPU copy of
        # the MLP) never is.  Pickled, it is a CPU copy (unpickling always gives a copy).
        mlp, torch = state.get("mlp"), sys.modules.get("torch")  # a module exists only if torch was imported
        if torch is not None and isinstance(mlp, torch.nn.Module) and any(
            t.device.type != "cpu" for t in [*mlp.parameters(), *mlp.buffers()]
        ):
            state["mlp"] = copy.deepcopy(mlp).to("cpu")
        return state

    def _side_estimator(self, n_components, params, scale, dead_fraction, device, n_iter):
        sae = TopKSparseAutoencoder(
            n_components, k=self.k, learning_rate=self.learning_rate, max_iter=self.max_iter,
            batch_size=self.batch_size, aux_coef=self.aux_coef, device=self.device,
            mixed_precision=self.mixed_precision, sparse_output=self.sparse_output,
            random_state=self.random_state,
        )
        sae._set_params_from(params, scale)
        sae.device_ = device
        sae.n_features_in_ = params.W_dec.shape[1]
        sae.dead_fraction_ = dead_fraction
        sae.n_iter_ = n_iter
        return sae

    def _iter_blocks(self, X):
        from ._backend.inference import iter_jacobian_blocks

        return iter_jacobian_blocks(
            self._mlp_map, self.input_sae_._params(), self.output_sae_._params(), X,
            self.input_sae_._encoding_k(), _inference_device(self),
        )

    def _mean_abs_jacobian(self, X):
        """Mean ``|J|`` over X's rows, or over every ``s``-th row when X has more than
        ``_JACOBIAN_ROWS`` (``s = ceil(n / _JACOBIAN_ROWS)``, so that the rows span all of X)."""
        step = -(-X.shape[0] // _JACOBIAN_ROWS)
        if step > 1:
            X = X[::step]
        total = AbsJacobianSum(self.output_sae_.components_.shape[0], self.input_sae_.components_.shape[0])
        for J, idx_y, idx_x in self._iter_blocks(X):
            total.add(J, idx_y, idx_x)
        return total.mean()

    # ---- inference ---------------------------------------------------------------------
    def _output_codes(self, X):
        """Output-side ``(values, indices)`` (n, k) of the true outputs, for validated X."""
        from ._backend.inference import encode_rows

        return encode_rows(self.output_sae_._params(), X, self.output_sae_._encoding_k(),
                           _inference_device(self), mlp_map=self._mlp_map)

    def _output_code_batches(self, X):
        """``(first row, values, indices)`` numpy batches of :meth:`_output_codes`, in row order."""
        from ._backend.inference import iter_codes

        return iter_codes(self.output_sae_._params(), X, self.output_sae_._encoding_k(),
                          _inference_device(self), mlp_map=self._mlp_map)

    def _mlp_outputs(self, X):
        from ._backend.inference import map_rows

        return map_rows(self._mlp_map, X, _inference_device(self))

    def fit_transform(self, X, y=None, **fit_params):
        """``fit(X)`` then ``transform(X)``; a sparse ``sparse_output`` under a DataFrame output
        (``set_output``, ``set_config``) is refused before any training, not after it."""
        _check_codes_output(self)
        return super().fit_transform(X, y, **fit_params)

    def transform(self, X):
        """Input-side codes (n_samples, n_components), at most k non-zeros per row: SciPy CSR, or a
        dense float32 ndarray with ``sparse_output=False``."""
        check_is_fitted(self)
        X = _validate_X(self, X, reset=False, checked_in_batches=True)
        return _codes_output(self, self.input_sae_._code_batches(X, _inference_device(self)), X.shape[0],
                             self.input_sae_._encoding_k(), self._n_latents_in, InputCodes)

    def transform_output(self, X):
        """Output-side codes of the true outputs mlp(X), (n_samples, n_output_components).

        SciPy CSR marked as output codes (:class:`~sklearn_jsae._sparse.OutputCodes`, which
        :meth:`inverse_transform` refuses; decode them with :meth:`inverse_transform_output`), or a
        dense float32 ndarray with ``sparse_output=False`` (a DataFrame with
        :meth:`get_output_feature_names_out` columns under ``set_output(transform="pandas")``).
        """
        check_is_fitted(self)
        X_valid = _validate_X(self, X, reset=False, checked_in_batches=True)
        codes = _codes_output(self, self._output_code_batches(X_valid), X_valid.shape[0],
                              self.output_sae_._encoding_k(), self.output_sae_.components_.shape[0], OutputCodes)
        container = _get_output_config("transform", self)["dense"]
        if container != "default" and not self.sparse_output:
            adapter = ADAPTERS_MANAGER.adapters[container]
            return adapter.create_container(codes, X, columns=self.get_output_feature_names_out())
        return codes

    def mlp_outputs(self, X):
        """The true MLP outputs ``mlp(X)``, float32 ``(n_samples, n_output_features_)``."""
        check_is_fitted(self)
        X = _validate_X(self, X, reset=False, checked_in_batches=True)
        return self._mlp_outputs(X)

    def inverse_transform(self, X):
        """Decode input-side codes (n_samples, n_components) to MLP inputs ``(n_samples, n_features_in_)``.

        Codes from :meth:`transform_output` are refused: decode those with
        :meth:`inverse_transform_output`.
        """
        check_is_fitted(self)
        if isinstance(X, OutputCodes) or _column_names(X) == list(self.get_output_feature_names_out()):
            raise ValueError(
                "X holds output-side codes (from transform_output), but inverse_transform decodes "
                "with the input SAE's dictionary; use inverse_transform_output for output codes."
            )
        # (the input SAE's own codes, from input_sae_.transform, are these latents under its names)
        return _decode(X, self.input_sae_.components_, self.input_sae_.decoder_bias_, "X",
                       (self.get_feature_names_out, self.input_sae_.get_feature_names_out))

    def inverse_transform_output(self, X):
        """Decode output-side codes (n_samples, n_output_components), from :meth:`transform_output`,
        to MLP outputs ``(n_samples, n_output_features_)``: ``ŷ = s_y W_dec_y + b_dec_y``."""
        check_is_fitted(self)
        if isinstance(X, InputCodes) or _column_names(X) == list(self.get_feature_names_out()):
            raise ValueError(
                "X holds input-side codes (from transform), but inverse_transform_output decodes with "
                "the output SAE's dictionary; use inverse_transform for input codes."
            )
        return _decode(X, self.output_sae_.components_, self.output_sae_.decoder_bias_, "X",
                       (self.get_output_feature_names_out, self.output_sae_.get_feature_names_out))

    def get_output_feature_names_out(self, input_features=None):
        """Names of the output-side latents: ``"<classname>_output0"``, ... (``n_output_components``).

        ``input_features`` is checked as :meth:`get_feature_names_out` checks it (it must match
        ``feature_names_in_`` where there is one); the names do not depend on it."""
        check_is_fitted(self)
        _check_feature_names_in(self, input_features, generate_names=False)
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}_output{i}" for i in range(self.output_sae_.components_.shape[0])],
                          dtype=object)

    def jacobian(self, X):
        """Exact latent-to-latent Jacobians at the rows of X.

        Returns
        -------
        J : scipy.sparse.coo_array of shape (n_samples, n_output_components, n_components)
            ``J[t, i, j] = ∂ s_y[i] / ∂ s_x[j]`` at the true input ``X[t]``; only each
            sample's k × k active block is stored (at most k² entries per sample).  As in the
            paper, the TopK/ReLU derivative is 1 on the whole active set: an output latent TopK
            keeps at a pre-activation ≤ 0 (code 0) keeps its row, where autograd through the
            ReLU gives 0 (see the User Guide's "The model").
        """
        check_is_fitted(self)
        X = _validate_X(self, X, reset=False, checked_in_batches=True)
        shape = (X.shape[0], self.output_sae_.components_.shape[0], self._n_latents_in)
        return blocks_to_coo(self._iter_blocks(X), shape)

    def score(self, X, y=None):
        """Mean explained variance of the two SAEs, ``(EV_input + EV_output) / 2`` (higher is better),
        with ``EV = 1 - ||Z - Ẑ||² / ||Z - mean(Z)||²`` for Z = X and Z = mlp(X)."""
        from .metrics import reconstruction_metrics

        check_is_fitted(self)
        sides = reconstruction_metrics(self, X)  # batch by batch: X may be a memmap larger than memory
        return (sides["input"]["explained_variance"] + sides["output"]["explained_variance"]) / 2

    @property
    def paper_lambda_(self):
        """The authors' ``λ`` that weighs this fit's penalty against its reconstruction as ``l1`` does.

        The paper minimises ``MSE(x̂, x) + MSE(ŷ, y) + λ · mean_{t,a,b} |J_t[a, b]|`` in raw units;
        this estimator minimises the same terms divided by ``c_x²`` and ``c_y²`` with the penalty
        ``l1 · (c_x / c_y) · mean_t Σ_ab |J_t[a, b]| / sqrt(d_in · d_out)``.  Multiplied by
        ``c_x · c_y`` (the geometric mean of the two reconstruction weights), that is the paper's
        loss with::

            λ = l1 · c_x² · k² / sqrt(d_in · d_out)

        exactly when ``c_x = c_y``.  To train at the authors' ``λ``, set
        ``l1 = λ · sqrt(d_in · d_out) / (c_x² · k²)``, where ``c_x`` is the RMS of the centred
        inputs (``np.sqrt(X.var(axis=0).mean())``): their default ``λ = 0.5 k² / d`` is
        ``l1 = 0.5 / c_x²``.  With ``penalty="unit_gain"`` the penalty is no longer the paper's,
        and this is the ``λ`` it would have at unit output-encoder gain.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_jsae import JacobianSparseAutoencoder
        >>> X = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
        >>> jsae = JacobianSparseAutoencoder(n_components=32, k=4, l1=0.5, max_iter=2, batch_size=8,
        ...                                  random_state=0).fit(X)
        >>> c_x = np.sqrt(X.var(axis=0).mean())     # unit-scale data: c_x ≈ 1
        >>> bool(np.isclose(jsae.paper_lambda_, 0.5 * c_x**2 * 4**2 / 16, rtol=1e-3))
        True
        """
        check_is_fitted(self)
        c_x = float(self.input_sae_.scale_)
        d_in, d_out = self.n_features_in_, self.n_output_features_
        # The fitted k and l1, not the parameters (set_params may have changed them since); a
        # loaded model's parameters are the ones it was saved with.
        l1 = getattr(self, "_fit_l1", self.l1)
        return float(l1 * c_x**2 * self.input_sae_.k**2 / np.sqrt(d_in * d_out))

    @property
    def _n_latents_in(self):
        return self.input_sae_.components_.shape[0]

    @property
    def _n_features_out(self):
        return self._n_latents_in

    def __sklearn_is_fitted__(self):
        return hasattr(self, "input_sae_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

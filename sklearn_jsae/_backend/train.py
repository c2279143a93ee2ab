"""Training loop for one TopK SAE or a JSAE pair.

Objective per minibatch, in normalised units (``x' = x / c_x``, ``y' = y / c_y``, where
``c`` is the root-mean-square of the centred data per element)::

    L = MSE(x̂', x') + MSE(ŷ', y') + l1(t) · mean_t Σ_{a,b} |J'_t[a, b]| / sqrt(d_in · d_out)
        + aux_coef · (AuxK_x + AuxK_y)

with ``J' = (c_x / c_y) · J`` the Jacobian between normalised latents.  ``l1(t)``
ramps linearly from 0 over the first 5% of steps; the learning rate warms up over
the first 1% and decays linearly to 0 over the last 20%; gradients are clipped
to norm 1; decoder rows are renormalised after every step.  With
``c_x = c_y = c`` and ``d_in = d_out = d`` this is the paper's loss divided by
``c²`` with ``λ_paper = l1 · c² · k² / d``; ``l1 = 0.5`` at ``c = 1`` is their default (ours is 2).

AuxK (Gao et al. 2024): latents that have not fired for ``dead_tokens`` tokens
reconstruct the residual ``x - x̂`` with their own top-``aux_k``; the loss is that
reconstruction's MSE divided by the residual's mean square.

Random numbers: every draw (initialisation, shuffling) comes from a CPU ``torch.Generator`` on
the CPU and is moved to the training device afterwards, so one seed gives the same initial model
and batch order on every device.  From ``seed``: the input SAE is initialised from ``seed``, the
batch order from ``seed + 1`` and the output SAE from ``seed + 2`` (independently of the input
SAE: a shared draw would make ``W_enc_y = W_dec_x`` at initialisation and pull ``J`` towards the
diagonal on near-identity maps).  A single SAE uses ``seed`` and ``seed + 1`` as the input side
does, so the input side of an ``l1 = 0`` pair is exactly a single SAE with the same seed, and the
output side is exactly a single SAE fitted on ``mlp(X)`` with ``init_seed = seed + 2`` and
``shuffle_seed = seed + 1``.

Guards: training stops with :class:`~sklearn_jsae.exceptions.NonFiniteTrainingError` at the
first MLP output, loss term, gradient or parameter that is NaN or inf, and when the
reconstruction error of either SAE exceeds :data:`DIVERGED_MSE` times that of predicting the
mean (a diverged fit, typically a learning rate far too large).

The MLP's outputs and local weights (``φ'(z)``) on the training rows do not depend on
``l1`` or on the SAEs: :func:`compute_mlp_pass` computes them once so that an ``l1``
sweep (with the estimator's ``memory``) reads them instead of recomputing them at every step
of every candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..exceptions import NonFiniteTrainingError
from . import stop
from .checkpoint import Checkpointer
from .jacobian import map_and_local_weights
from .mlp import placed
from .sae import SAEParams
from .trainer import DIVERGED_MSE, Trainer, default_aux_k  # noqa: F401 -- re-exported

_IN_MEMORY_BYTES = 1 << 30



@dataclass
class TrainConfig:
    n_components: int
    n_output_components: int | None  # None: a single SAE (no output side, no Jacobian)
    k: int
    l1: float = 0.0
    learning_rate: float = 5e-4
    max_iter: int = 10
    batch_size: int = 1024
    lr_warmup: float = 0.01
    lr_decay: float = 0.2
    l1_warmup: float = 0.05
    penalty: str = "paper"  # or "unit_gain": see step.jsae_step_losses
    max_grad_norm: float = 1.0
    aux_coef: float = 0.0
    aux_k: int | None = None
    dead_tokens: int | None = None
    device: str = "cpu"
    seed: int = 0
    verbose: int = 0
    dtype: torch.dtype = torch.float32
    # bf16 autocast of the forward pass (master weights, optimiser state and the penalty's
    # reductions stay in ``dtype``); None trains in ``dtype`` throughout.
    autocast_dtype: torch.dtype | None = None
    # Seeds of the output SAE's initialisation and of the batch order; None derives them from
    # ``seed`` (see the module docstring).
    init_seed: int | None = None
    shuffle_seed: int | None = None

    def __post_init__(self):
        # Python numbers, not NumPy scalars (k=np.int64(4) from a GridSearchCV over np.arange, say):
        # the settings go into JSON (checkpoint identities, the ranks' agreement), which has no int64.
        for name, value in vars(self).items():
            if isinstance(value, np.generic):
                setattr(self, name, value.item())
        # Checked here too, not only by the estimators' parameter constraints, which
        # sklearn.set_config(skip_parameter_validation=True) turns off: a negative or NaN l1 then
        # trained with no penalty at all while the history and paper_lambda_ recorded it.
        if not (isinstance(self.l1, (int, float)) and math.isfinite(self.l1) and self.l1 >= 0):
            raise ValueError(f"l1={self.l1!r} must be a finite number >= 0 (0: a traditional SAE pair).")


@dataclass
class TrainResult:
    input_params: SAEParams  # raw units, on CPU
    output_params: SAEParams | None
    input_scale: float
    output_scale: float | None
    history: list = field(default_factory=list)
    dead_fraction_input: float = 0.0
    dead_fraction_output: float | None = None


def file_mapping(X):
    """The ``mmap`` behind a memory-mapped array or any view of one (``np.asarray`` of a memmap, as
    scikit-learn's validation returns, is a plain ndarray whose base is the memmap), else None."""
    obj = X
    while obj is not None:
        if isinstance(obj, mmap.mmap):
            return obj
        if isinstance(obj, np.memmap) and getattr(obj, "_mmap", None) is not None:
            return obj._mmap
        obj = getattr(obj, "base", None)
    return None


def release_pages(X) -> None:
    """Drop the pages of a memory-mapped array from this process's resident memory.

    Reading rows of a memmap maps their pages into the process, and they stay resident (counted
    in its RSS) until unmapped or reclaimed; for a store larger than memory that is the whole
    file.  ``madvise(MADV_DONTNEED)`` on the read-only mapping drops them (they are clean: the
    next read faults them in from the page cache or the disk), so an out-of-core fit's resident
    memory stays at a few batches.  A no-op for other arrays and platforms without madvise.
    """
    mapping = file_mapping(X)
    owner = _owning_memmap(X)
    if owner is not None and owner.mode == "c":
        # Copy-on-write: the pages hold the caller's edits, which the file does not; dropping them
        # would read the file's rows back in their place (the caller's own array changed).
        return
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed mapping, or one the kernel refuses to advise
            pass


class _FileRows:
    """Rows of a C-contiguous array mapped from a file, read with ``os.pread`` (runs of consecutive
    rows in one call) instead of through the mapping."""

    def __init__(self, path: str, offset: int, row_bytes: int, dtype, row_shape):
        self.fd = os.open(path, os.O_RDONLY)
        self.offset, self.row_bytes, self.dtype, self.row_shape = offset, row_bytes, dtype, row_shape

    def read(self, index: np.ndarray) -> np.ndarray:
        """Rows at ``index`` (ascending), as a new array."""
        out = np.empty((len(index), self.row_bytes), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(index)]):
            wanted = (end - start) * self.row_bytes
            got = os.preadv(self.fd, [memoryview(out[start:end]).cast("B")], self.offset + int(index[start]) * self.row_bytes)
            if got != wanted:
                raise OSError(f"short read from the activation store: {got} of {wanted} bytes")
        return out.view(self.dtype).reshape((len(index),) + self.row_shape)

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


def _owning_memmap(X) -> np.memmap | None:
    """The ``np.memmap`` that owns the mapping behind X (X itself, a view of it, or ``np.asarray`` of
    one), else None."""
    node = X
    while node is not None:
        if isinstance(node, np.memmap) and isinstance(node.base, mmap.mmap):
            return node
        node = getattr(node, "base", None)
    return None


def _file_rows(X) -> _FileRows | None:
    """A :class:`_FileRows` for X when it is a C-contiguous view of a file-backed ``np.memmap``.

    X's place in the file is measured from the memmap that owns the mapping (its ``base`` is the
    ``mmap``), whose ``offset`` is where its data starts in the file: a slice of a memmap
    (``np.load(path, mmap_mode="r")[n:]``) is an ``np.memmap`` too, but with its parent's
    ``offset``, so measured from the slice itself row ``n`` would be read as row 0."""
    root = _owning_memmap(X)
    if root is None or getattr(root, "filename", None) is None or not X.flags.c_contiguous or X.ndim < 2:
        return None
    if root.mode == "c":  # copy-on-write: edits made in memory are not in the file
        return None
    start = X.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    # (not X.strides[0]: one row of a strided view is C-contiguous whatever its row stride)
    row_bytes = X.itemsize * math.prod(X.shape[1:])
    return _FileRows(root.filename, root.offset + start, row_bytes, X.dtype, X.shape[1:])


class _Rows:
    """Minibatches of a (possibly memory-mapped) numpy array as tensors on ``device``.

    Arrays up to 1 GiB (not memmaps) are copied to the device once (``resident=True``: training
    draws its batches from them at random, epoch after epoch); memmaps, larger arrays and, with
    ``resident=False`` (one pass in order, as the metrics make), every array are read batch by
    batch, and a memmap's pages are released after each batch (:func:`release_pages`), so memory
    does not grow with the array.
    """

    def __init__(self, X: np.ndarray, device, dtype, resident: bool = True, own: bool = False):
        self.n = X.shape[0]
        self.device, self.dtype = device, dtype
        in_memory = resident and file_mapping(X) is None and X.nbytes <= _IN_MEMORY_BYTES
        # np.array copies, so read-only inputs (memmaps, frozen arrays) never alias a tensor; an
        # array this library made for the fit (``own``: the cached MLP pass) is used as it is.
        usable = own and X.flags.writeable and X.flags.c_contiguous
        self.tensor = (torch.from_numpy(X if usable else np.array(X)).to(device=device, dtype=dtype)
                       if in_memory else None)
        self.X = X
        # A memmap is read with pread, never through its mapping: a page fault maps a whole
        # page-cache folio (up to megabytes), so one batch of 2048 scattered rows of a 400 MB
        # store mapped 350 MB.  pread copies exactly the rows asked for.
        self.file = None if in_memory else _file_rows(X)
        release_pages(X)  # validation may have read it all

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (B,), in that order."""
        if self.tensor is not None:
            return self.tensor[index.to(self.device)]
        # Read in ascending order (sequential disk access), then restore the requested order so
        # that rows of two arrays taken with the same index stay paired.
        index = index.numpy()
        ascending = np.argsort(index, kind="stable")
        rows = np.empty((len(index),) + self.X.shape[1:], dtype=self.X.dtype)
        if self.file is not None:
            rows[ascending] = self.file.read(index[ascending])
        else:
            rows[ascending] = self.X[index[ascending]]
            release_pages(self.X)
        return torch.as_tensor(rows).to(device=self.device, dtype=self.dtype)

    def batches(self, batch_size: int, order: torch.Tensor | None = None, check_finite: bool = False,
                span: tuple[int, int] | None = None):
        """Batches of ``batch_size`` rows in ``order`` (default: rows ``span = (lo, hi)`` in order,
        all rows when None).  With
        ``check_finite`` (a pass over X that was not scanned first: inference and the metrics on a
        memmap), a batch with NaN, inf or a value beyond float32's range raises, naming the row;
        training reports its own with :class:`NonFiniteTrainingError`."""
        lo, hi = (0, len(order)) if order is not None else (span or (0, self.n))
        for start in range(lo, hi, batch_size):
            # Indices stay on the CPU.  In order, each batch's own: arange(n) first held 8 bytes per
            # row for the whole pass (8 GB before the first batch of a 10⁹-row store).
            index = (torch.arange(start, min(start + batch_size, hi)) if order is None
                     else order[start : start + batch_size])
            x = self.take(index)
            if check_finite:
                bad = ~torch.isfinite(x).all(dim=1)
                if bool(bad.any()):
                    row = int(index[int(bad.nonzero()[0, 0])])
                    raise ValueError(
                        f"X has NaN, inf or values beyond float32's range (about 3.4e38) in row {row}; "
                        f"remove or clip those rows (e.g. X[np.isfinite(X).all(axis=1)]) before measuring."
                    )
            yield x


@torch.no_grad()
def data_statistics(rows: _Rows, fn=None, batch_size: int = 2048, part: tuple[int, int] | None = None,
                    parallel=None, spread_required: str | bool | None = None):
    """Mean (d,) and centred per-element RMS of ``fn(x)`` (or x) over all rows, in float64.

    Rows without spread get the scale 1 and a warning (``fit`` of constant data), or, with
    ``spread_required`` (what the rows are and what their scale is for, for the message), a
    ``ValueError``: a scale measured on them would be applied to other rows.  ``False``: neither
    (only the mean is used: a warm start keeps its fitted scale).

    The sums are taken around the first batch's mean ``c``: ``Σ (v - c)`` and ``Σ (v - c)²``.
    Plain ``Σ v² / n - mean²`` cancels when the mean is large against the spread, with an error
    that grows with the rows: at mean / spread = 1e5 the scale was 0.07% off at 10⁸ rows and
    1.6% at 10⁹.

    Data-parallel (``parallel``, a :class:`~sklearn_jsae._backend.distributed.DataParallel`):
    this rank reads only rows ``part = (lo, hi)`` (all rows when None) and every rank's mean,
    sum of squared deviations and row count are merged (Chan et al.'s pairwise formula), so every
    rank gets the statistics of the union of the parts.

    Raises :class:`~sklearn_jsae.exceptions.NonFiniteTrainingError` naming the first rows where
    ``fn`` (the MLP) returns NaN or inf: this pass sees every training row before the first step.
    """
    shift, total, total_sq, n = None, None, None, 0
    lo, hi = (0, rows.n) if part is None else part
    for start, x in zip(range(lo, hi, batch_size), rows.batches(batch_size, span=(lo, hi))):
        v = x if fn is None else fn(x)
        finite = torch.isfinite(v).all(dim=1)
        if not bool(finite.all()):
            bad = (torch.nonzero(~finite).flatten()[:5] + start).tolist()
            what = "the mlp's outputs contain" if fn is not None else "X contains"
            raise NonFiniteTrainingError(
                f"training stopped before the first step: {what} NaN or inf"
                + ("" if fn is not None else f" (or values beyond float32's range, {float(np.finfo(np.float32).max):.1e}, "
                                             f"which float32 makes inf)")
                + f" on {int((~finite).sum())} of rows {start}-{start + x.shape[0] - 1} of X (first: {bad}). "
                + ("Check the MLP on those rows (an overflow, a log or division of their values) or "
                   "remove them from X." if fn is not None else "Remove, repair or rescale those rows."),
                step=None, what="mlp output" if fn is not None else "X",
            )
        v = v.double()
        if shift is None:
            shift = v.mean(0)
            total, total_sq = torch.zeros_like(shift), torch.zeros_like(shift)
        centred = v - shift
        total += centred.sum(0)
        total_sq += (centred * centred).sum(0)
        n += v.shape[0]
    if parallel is not None and shift is None:  # an empty part: this rank must still join the merge
        raise ValueError(f"distributed=True: rank {parallel.rank} has no rows to measure the data "
                         f"statistics on ({rows.n} rows for {parallel.world_size} ranks); give every "
                         f"rank at least one row.")
    mean = shift + total / n
    squared_deviations = (total_sq - total * total / n).clamp_min(0)  # Σ (v - mean)², per element
    if parallel is not None:
        mean, squared_deviations, n = parallel.merge_statistics(mean, squared_deviations, n)
    variance = (squared_deviations / n).mean().item()
    if not math.isfinite(variance):
        raise NonFiniteTrainingError(
            f"training stopped before the first step: the variance of {'the mlp outputs' if fn else 'X'} "
            f"overflows float64 ({variance}); rescale the data.", step=None, what="data variance")
    mean_square = (mean * mean).mean().item()
    if variance <= _NO_SPREAD ** 2 * mean_square and spread_required is not False:
        if spread_required is not None:
            what = "the mlp's outputs on them have" if fn is not None else "they have"
            raise ValueError(
                f"{spread_required}, but {what} (almost) no spread (spread {math.sqrt(variance):.3g} "
                f"around a mean of RMS {math.sqrt(mean_square):.3g}): a scale measured on them describes "
                f"no other data. Pass rows that vary (a representative sample, at least 2 different rows)."
            )
        _warn_no_spread(fn is not None, variance, mean_square)
        # Σv²/n - mean² of rows that are all equal is float64 rounding (1e-8 of the mean, say), not
        # a scale: normalising by it blew the data up 10⁸ times and the first step "diverged".
        if variance <= _CANCELLATION ** 2 * mean_square:
            variance = 0.0
    scale = math.sqrt(variance) if variance > 0 else 1.0
    return mean, scale


# Spread (RMS about the mean) relative to the RMS of the mean below which the data is as good as
# constant in the float32 the SAEs train in (its resolution is 1.2e-7 relative): rows round to a
# handful of values.  Below the second, float64's rounding of Σv²/n - mean² is all there is.
_NO_SPREAD, _CANCELLATION = 1e-5, 1e-7


def _warn_no_spread(outputs: bool, variance: float, mean_square: float) -> None:
    from .._warnings import warn

    spread = f"spread {math.sqrt(variance):.3g} around a mean of RMS {math.sqrt(mean_square):.3g}"
    if outputs:
        message = (f"the mlp's outputs are (almost) constant on X ({spread}): the output SAE has nothing to "
                   f"learn and its FVU means nothing; check that mlp is the MLP of X's layer.")
    else:
        message = (f"X has (almost) no variance ({spread}): in float32, the training dtype, its rows are (almost) "
                   f"equal and the input SAE can only learn their mean; centre X in float64 first "
                   f"(X - X.mean(axis=0)) or check the data.")
    warn(message)


@dataclass
class MLPPass:
    """The ``l1``-independent part of a JSAE fit, for every training row.

    mean_y : (d_out,) float64, mean of the raw outputs ``mlp(x)``.
    scale_y : float, the output normalisation ``c_y`` the outputs below are divided by.
    outputs : (n, d_out) in the training dtype, ``mlp(x) / c_y``.
    weights : (n, r, d_mlp) or None, the normalised map's local weights at each row
        (``φ'(z)`` for ``r = 1``; gated MLPs have ``r = 2``); None for affine maps.
    """

    mean_y: np.ndarray
    scale_y: float
    outputs: np.ndarray
    weights: np.ndarray | None


def supports_mlp_pass(mlp_map) -> bool:
    """Whether :func:`compute_mlp_pass` can stand in for the per-step MLP pass of ``mlp_map``.

    False for callables without a closed form: their Jacobian's JVPs run the MLP anyway.
    """
    return bool(getattr(mlp_map, "has_closed_form", False))


@torch.no_grad()
def compute_mlp_pass(X: np.ndarray, mlp_map, scale_x: float, scale_y: float | None = None,
                     device="cpu", dtype: torch.dtype = torch.float32, batch_size: int = 4096) -> MLPPass:
    """Outputs and local weights of ``mlp_map`` on every row of X, as :func:`train` uses them.

    X : (n, d_in) raw MLP inputs.  ``scale_x`` is ``c_x``; ``scale_y`` fixes ``c_y`` (warm start),
    None measures it from the outputs.  Each row is computed exactly as the training step
    computes it (:func:`~sklearn_jsae._backend.jacobian.map_and_local_weights` of the normalised
    map at ``x / c_x``), batch by batch.
    """
    if not supports_mlp_pass(mlp_map):
        raise ValueError(f"{type(mlp_map).__name__} has no closed-form Jacobian; its MLP pass is not cached")
    device = torch.device(device)
    rows = _Rows(X, device, dtype)
    mlp_map = placed(mlp_map, device, dtype)
    mean_y, measured_scale_y = data_statistics(rows, mlp_map)
    scale_y = measured_scale_y if scale_y is None else scale_y
    normalised_map = mlp_map.rescaled(scale_x, scale_y)
    # Filled batch by batch into arrays of their final size: lists of batches concatenated at the
    # end held the pass twice (the documented n · (d_out + r · d_mlp) floats were 2.9 times that).
    outputs = weights = None
    for start, x in zip(range(0, rows.n, batch_size), rows.batches(batch_size)):
        y, w = map_and_local_weights(normalised_map, x / scale_x)
        y, w = y.cpu().numpy(), None if w is None else w.cpu().numpy()
        if outputs is None:
            outputs = np.empty((rows.n,) + y.shape[1:], dtype=y.dtype)
            weights = None if w is None else np.empty((rows.n,) + w.shape[1:], dtype=w.dtype)
        outputs[start:start + x.shape[0]] = y
        if w is not None:
            weights[start:start + x.shape[0]] = w
    return MLPPass(
        mean_y=mean_y.cpu().numpy(),
        scale_y=scale_y,
        outputs=outputs,
        weights=weights,
    )


def progress_bar(total: int | None, initial: int, enabled: bool, unit: str = "step"):
    """A tqdm bar over steps (live loss terms and tokens/s set by the caller), or None when off."""
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    # Into a log file (stderr not a terminal) every redraw is a new line's worth of bytes: several
    # a second, megabytes per hour of a long run.  There, one line every 30 s; a terminal and a
    # notebook's widget (tqdm.auto picks tqdm.notebook there) keep tqdm's rate.
    notebook = any(cls.__module__.startswith("tqdm.notebook") for cls in tqdm.__mro__)
    interactive = notebook or bool(getattr(sys.stderr, "isatty", lambda: False)())
    # (tqdm's monitor thread redraws a bar idle for maxinterval, 10 s by default: raised with it)
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, leave=True,
                mininterval=0.1 if interactive else 30.0, maxinterval=10.0 if interactive else 30.0)


def show_step(bar, trainer, values: dict, rows: int) -> None:
    """Advance ``bar`` by one step with the step's loss terms and the tokens per second."""
    if bar is None:
        return
    bar.update(1)
    # Tokens over this process's time (tqdm's own rate counts steps, and only once it has redrawn).
    bar.tokens_shown = getattr(bar, "tokens_shown", 0) + rows
    elapsed = bar.format_dict["elapsed"]
    shown = {name: f"{values[name]:.3g}" for name in ("loss", "mse_input", "mse_output", "jacobian_l1")
             if name in values}
    shown["tok/s"] = f"{bar.tokens_shown / elapsed:.3g}" if elapsed > 0 else "-"
    bar.set_postfix(shown, refresh=False)


def train(X: np.ndarray, mlp_map, config: TrainConfig, init: tuple | None = None,
          mlp_pass=None, checkpoint: Checkpointer | None = None, parallel=None) -> TrainResult:
    """Fit one TopK SAE (``config.n_output_components is None``) or a JSAE pair on rows of ``X``.

    X : (n_samples, d_in) numpy array or memmap of MLP inputs.
    mlp_map : backend map d_in -> d_out (ignored for a single SAE).
    init : ``(input_params, output_params, input_scale, output_scale)`` in raw units to
        continue from (warm start), or None for a fresh initialisation.  ``output_scale`` None
        re-measures ``c_y`` (a warm start on a changed MLP).
    mlp_pass : callable ``(X, mlp_map, scale_x, scale_y) -> MLPPass`` or None
        Supplies the outputs and local weights of every row (:func:`compute_mlp_pass`, possibly
        through a cache) instead of computing them at each step; ``scale_y`` is None unless
        ``init`` fixes it.  Only for maps with :func:`supports_mlp_pass`.
    checkpoint : :class:`~sklearn_jsae._backend.checkpoint.Checkpointer` or None
        Resume from its checkpoint if there is one, and save one every ``checkpoint.every`` steps
        and at the end of each epoch.  The data position is the epoch, the next row of the
        epoch's order and the shuffling generator's state at the epoch's start (the order is
        redrawn from it, so a resumed fit sees exactly the batches an uninterrupted one sees).
    parallel : :class:`~sklearn_jsae._backend.distributed.DataParallel` or None
        Train data-parallel: every rank passes the same X and config; each step's batch (the one
        a one-process fit takes, from the same shuffled order) is split between the ranks, each
        reading only its share (and its share of the rows for the data statistics), and the
        gradients are all-reduced.  Only rank 0 writes checkpoints (``checkpoint.writer``); every
        rank resumes from the same file.

    Raises :class:`~sklearn_jsae.exceptions.NonFiniteTrainingError` at the first non-finite MLP
    output, loss, gradient or parameter, and when the fit diverges.
    """
    device, dtype = torch.device(config.device), config.dtype
    rows = _Rows(X, device, dtype)
    pair = config.n_output_components is not None
    if config.dead_tokens is None:
        config = dataclasses.replace(config, dead_tokens=min(10_000_000, rows.n))

    part = None
    if parallel is not None:
        if rows.n < parallel.world_size:
            raise ValueError(f"distributed=True: X has {rows.n} rows, fewer than the {parallel.world_size} "
                             f"ranks of the job; train on more rows or with fewer ranks.")
        part = parallel.split(rows.n)
    mean_x, scale_x = data_statistics(rows, part=part, parallel=parallel)
    fixed_scale_y = None
    if init is not None and init[2] is not None:
        scale_x = init[2]
        fixed_scale_y = init[3] if pair else None
    precomputed = mean_y = scale_y = None
    if pair:
        mlp_map = placed(mlp_map, device, dtype)
        if mlp_pass is None:
            mean_y, scale_y = data_statistics(rows, mlp_map, part=part, parallel=parallel)
        else:
            precomputed = mlp_pass(X, mlp_map, scale_x, fixed_scale_y)
            mean_y, scale_y = torch.from_numpy(np.array(precomputed.mean_y)), precomputed.scale_y
            outputs_rows = _Rows(precomputed.outputs, device, dtype, own=True)
            weights_rows = None if precomputed.weights is None else _Rows(precomputed.weights, device, dtype,
                                                                          own=True)
        if fixed_scale_y is not None:
            scale_y = fixed_scale_y

    steps_per_epoch = math.ceil(rows.n / config.batch_size)
    trainer = Trainer(config, mlp_map, mean_x, scale_x, mean_y, scale_y,
                      init=None if init is None else (init[0], init[1]),
                      total_steps=steps_per_epoch * config.max_iter, parallel=parallel)
    first_epoch, position, epoch_rng = 0, 0, None
    if checkpoint is not None:
        restored = checkpoint.restore(trainer)
        if restored is not None:
            first_epoch, position, epoch_rng = checkpoint.array_position(trainer, *restored, rows.n, config)
        if parallel is not None:
            check_resumed_together(parallel, trainer, checkpoint)
    shown = bool(config.verbose) and (parallel is None or parallel.is_main)
    bar = progress_bar(trainer.total_steps, trainer.step_count, shown)
    # With a checkpoint, a stop request (graceful_stop: SIGTERM) ends the fit after a step and its save.
    with stop.checkpointed_loop(parallel is not None) if checkpoint is not None \
            else contextlib.nullcontext():
        try:
            for epoch in range(first_epoch, config.max_iter):
                if epoch_rng is not None:  # resuming inside an epoch: redraw its order
                    trainer.shuffling.set_state(epoch_rng)
                epoch_rng = trainer.shuffling.get_state()
                order = epoch_order(rows.n, trainer.shuffling)
                for start in range(position, rows.n, config.batch_size):
                    index = order[start : start + config.batch_size].long()
                    share = None
                    if parallel is not None:  # this rank's share of the batch
                        n_global = len(index)
                        index, n_real = parallel.local_rows(index)
                        share = (n_real, n_global)
                    outputs_and_weights = None
                    if precomputed is not None:
                        outputs_and_weights = (
                            outputs_rows.take(index), None if weights_rows is None else weights_rows.take(index)
                        )
                    values = trainer.step(rows.take(index), index, outputs_and_weights, share=share)
                    show_step(bar, trainer, values, len(index) if share is None else share[1])
                    # (the epoch's last step saves below, after its record)
                    if checkpoint is not None and checkpoint.due(trainer.step_count) \
                            and start + config.batch_size < rows.n:
                        checkpoint.save(trainer, dict(epoch=epoch, row=start + config.batch_size),
                                        dict(epoch_rng=epoch_rng))
                        checkpoint.stop_if_requested()
                record = trainer.close_record(epoch=epoch + 1)
                position, epoch_rng = 0, None
                if checkpoint is not None:
                    checkpoint.save(trainer, dict(epoch=epoch + 1, row=0))
                    checkpoint.stop_if_requested()
                if shown:
                    line = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
                    bar.write(f"epoch {epoch + 1}/{config.max_iter}: {line}")
        finally:
            if bar is not None:
                bar.close()
    return trainer.result()


# The most rows an int32 epoch order can number.
INT32_ROWS = torch.iinfo(torch.int32).max


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order of the rows ``0 .. n-1``: ``torch.randperm(n)`` from ``generator`` (CPU).

    Held for the whole epoch, so its size is what an epoch costs beyond the batches: in int32 it is
    4 bytes a row (1.2 GB at 3e8 rows) where int64 takes 8.  Both dtypes draw the same permutation
    and leave ``generator`` in the same state (``tests/test_memory_at_scale.py`` pins it), so every
    seed's batch order, and every model and figure made with it, is the same as with int64.
    """
    dtype = torch.int32 if n <= INT32_ROWS else torch.int64
    return torch.randperm(n, generator=generator, device="cpu", dtype=dtype)


def check_resumed_together(parallel, trainer, checkpoint) -> None:
    """Raise unless every rank restored the same checkpoint (or none): ranks that read different
    files (a checkpoint_dir local to each machine) would train different models."""
    from .checkpoint import CheckpointError

    low, high = parallel.agree(trainer.step_count, "comparing the ranks' checkpoints")
    if low != high:
        raise CheckpointError(
            f"the ranks resumed from different checkpoints (optimiser steps {low} to {high}; this rank, "
            f"{parallel.rank}, from step {trainer.step_count}): checkpoint_dir={checkpoint.folder!r} must be "
            f"one folder that every rank of the job sees (a shared filesystem), not one per machine."
        )

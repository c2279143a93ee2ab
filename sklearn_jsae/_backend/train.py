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
``c²`` with ``λ_paper = l1 · c² · k² / d``; ``l1 = 0.5`` at ``c = 1`` is their default.

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
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..exceptions import NonFiniteTrainingError
from .jacobian import map_and_local_weights
from .mlp import placed
from .optim import Adam
from .sae import SAEParams
from .step import jsae_step_losses, optimiser_step

_IN_MEMORY_BYTES = 1 << 30

# In normalised units predicting the mean gives MSE 1 and a fresh SAE about 1 to 2k/d; a
# reconstruction 10^4 times worse than the mean only happens when the optimiser has diverged.
DIVERGED_MSE = 1e4


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


@dataclass
class TrainResult:
    input_params: SAEParams  # raw units, on CPU
    output_params: SAEParams | None
    input_scale: float
    output_scale: float | None
    history: list = field(default_factory=list)
    dead_fraction_input: float = 0.0
    dead_fraction_output: float | None = None


class _Rows:
    """Minibatches of a (possibly memory-mapped) numpy array as tensors on ``device``."""

    def __init__(self, X: np.ndarray, device, dtype):
        self.n = X.shape[0]
        self.device, self.dtype = device, dtype
        in_memory = not isinstance(X, np.memmap) and X.nbytes <= _IN_MEMORY_BYTES
        # np.array copies, so read-only inputs (memmaps, frozen arrays) never alias a tensor.
        self.tensor = torch.from_numpy(np.array(X)).to(device=device, dtype=dtype) if in_memory else None
        self.X = X

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (B,), in that order."""
        if self.tensor is not None:
            return self.tensor[index.to(self.device)]
        # Read in ascending order (sequential disk access), then restore the requested order so
        # that rows of two arrays taken with the same index stay paired.
        index = index.numpy()
        ascending = np.argsort(index, kind="stable")
        rows = np.empty((len(index),) + self.X.shape[1:], dtype=self.X.dtype)
        rows[ascending] = self.X[index[ascending]]
        return torch.as_tensor(rows).to(device=self.device, dtype=self.dtype)

    def batches(self, batch_size: int, order: torch.Tensor | None = None):
        order = torch.arange(self.n, device="cpu") if order is None else order  # indices stay on the CPU
        for start in range(0, self.n, batch_size):
            yield self.take(order[start : start + batch_size])


@torch.no_grad()
def data_statistics(rows: _Rows, fn=None, batch_size: int = 8192):
    """Mean (d,) and centred per-element RMS of ``fn(x)`` (or x) over all rows, in float64.

    Raises :class:`~sklearn_jsae.exceptions.NonFiniteTrainingError` naming the first rows where
    ``fn`` (the MLP) returns NaN or inf: this pass sees every training row before the first step.
    """
    total, total_sq, n = None, None, 0
    for start, x in zip(range(0, rows.n, batch_size), rows.batches(batch_size)):
        v = x if fn is None else fn(x)
        finite = torch.isfinite(v).all(dim=1)
        if not bool(finite.all()):
            bad = (torch.nonzero(~finite).flatten()[:5] + start).tolist()
            what = "the mlp's outputs" if fn is not None else "X"
            raise NonFiniteTrainingError(
                f"training stopped before the first step: {what} contain NaN or inf on "
                f"{int((~finite).sum())} of rows {start}-{start + x.shape[0] - 1} of X (first: {bad}). "
                + ("Check the MLP on those rows (an overflow, a log or division of their values) or "
                   "remove them from X." if fn is not None else "Remove or repair those rows."),
                step=None, what="mlp output" if fn is not None else "X",
            )
        v = v.double()
        total = v.sum(0) if total is None else total + v.sum(0)
        total_sq = (v * v).sum(0) if total_sq is None else total_sq + (v * v).sum(0)
        n += v.shape[0]
    mean = total / n
    variance = (total_sq / n - mean * mean).clamp_min(0).mean().item()
    if not math.isfinite(variance):
        raise NonFiniteTrainingError(
            f"training stopped before the first step: the variance of {'the mlp outputs' if fn else 'X'} "
            f"overflows float64 ({variance}); rescale the data.", step=None, what="data variance")
    scale = math.sqrt(variance) if variance > 0 else 1.0
    return mean, scale


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
    outputs, weights = [], []
    for x in rows.batches(batch_size):
        y, w = map_and_local_weights(normalised_map, x / scale_x)
        outputs.append(y.cpu().numpy())
        if w is not None:
            weights.append(w.cpu().numpy())
    return MLPPass(
        mean_y=mean_y.cpu().numpy(),
        scale_y=scale_y,
        outputs=np.concatenate(outputs),
        weights=np.concatenate(weights) if weights else None,
    )


def default_aux_k(n_features: int) -> int:
    """The power of two nearest n_features / 2 (Gao et al. 2024)."""
    return 2 ** max(0, round(math.log2(max(1, n_features // 2))))


def _schedule(step: int, total: int, config: TrainConfig) -> tuple[float, float]:
    """(learning-rate factor, l1 factor) at ``step`` of ``total``."""
    warm = max(1, round(config.lr_warmup * total))
    lr_factor = min(1.0, (step + 1) / warm)
    decay_start = total - round(config.lr_decay * total)
    if step >= decay_start:
        lr_factor *= (total - step) / max(1, total - decay_start)
    l1_warm = round(config.l1_warmup * total)
    l1_factor = 1.0 if l1_warm == 0 else min(1.0, step / l1_warm)
    return lr_factor, l1_factor


def _generators(config: TrainConfig):
    """CPU generators ``(input init, output init, shuffling)`` derived as the module docstring says."""
    input_init = torch.Generator(device="cpu").manual_seed(config.seed)
    output_seed = config.seed + 2 if config.init_seed is None else config.init_seed
    output_init = torch.Generator(device="cpu").manual_seed(output_seed)
    shuffle_seed = config.seed + 1 if config.shuffle_seed is None else config.shuffle_seed
    shuffling = torch.Generator(device="cpu").manual_seed(shuffle_seed)
    return input_init, output_init, shuffling


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 (or ``dtype``) autocast of the forward pass on CUDA or the CPU; a no-op when ``dtype`` is
    None or the device has no autocast (other device types run in the training dtype)."""
    if dtype is None or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _non_finite(step: int, epoch: int, what: str, cause: str) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"training stopped at optimiser step {step} (epoch {epoch + 1}): {what}. Likely cause: {cause} "
        f"The estimator keeps the state it had before this fit.",
        step=step, what=what,
    )


def _check_step(step, epoch, loss, terms, x, index, outputs, pair):
    """Raise :class:`NonFiniteTrainingError` if this step's loss is non-finite or has diverged."""
    values = {name: float(value.detach()) for name, value in terms.items()}
    if math.isfinite(float(loss.detach())) and all(math.isfinite(v) for v in values.values()):
        worst = max(values.get("mse_input", 0.0), values.get("mse_output", 0.0))
        if worst > DIVERGED_MSE:
            name = max(("mse_input", "mse_output"), key=lambda key: values.get(key, -1.0))
            raise _non_finite(
                step, epoch, f"the fit diverged: {name}={worst:.3g}, {DIVERGED_MSE:.0e} times the error "
                f"of predicting the mean", "learning_rate is too large for this data; lower it (by 10x).")
        return
    bad = sorted(name for name, v in values.items() if not math.isfinite(v)) or ["loss"]
    if pair and outputs is not None:
        finite_rows = torch.isfinite(outputs).all(dim=1)
        if not bool(finite_rows.all()):
            rows = index[~finite_rows.cpu()][:5].tolist()
            raise _non_finite(step, epoch, f"the mlp returned NaN or inf on rows {rows} of X",
                              "the MLP overflows or divides by zero on those rows; check it there.")
    if not bool(torch.isfinite(x).all()):
        raise _non_finite(step, epoch, "the normalised input batch is not finite",
                          "X holds values too large for the training dtype.")
    raise _non_finite(step, epoch, f"the loss terms {bad} are NaN or inf",
                      "learning_rate too large, or data with extreme outliers; lower learning_rate.")


def train(X: np.ndarray, mlp_map, config: TrainConfig, init: tuple | None = None,
          mlp_pass=None) -> TrainResult:
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

    Raises :class:`~sklearn_jsae.exceptions.NonFiniteTrainingError` at the first non-finite MLP
    output, loss, gradient or parameter, and when the fit diverges.
    """
    device, dtype = torch.device(config.device), config.dtype
    input_init, output_init, shuffling = _generators(config)
    rows = _Rows(X, device, dtype)
    pair = config.n_output_components is not None
    d_in = X.shape[1]

    mean_x, scale_x = data_statistics(rows)
    fixed_scale_y = None
    if init is not None and init[2] is not None:
        scale_x = init[2]
        fixed_scale_y = init[3] if pair else None
    precomputed = None
    if pair:
        mlp_map = placed(mlp_map, device, dtype)
        if mlp_pass is None:
            mean_y, scale_y = data_statistics(rows, mlp_map)
        else:
            precomputed = mlp_pass(X, mlp_map, scale_x, fixed_scale_y)
            mean_y, scale_y = torch.from_numpy(np.array(precomputed.mean_y)), precomputed.scale_y
            outputs_rows = _Rows(precomputed.outputs, device, dtype)
            weights_rows = None if precomputed.weights is None else _Rows(precomputed.weights, device, dtype)
        if fixed_scale_y is not None:
            scale_y = fixed_scale_y
    normalised_map = mlp_map.rescaled(scale_x, scale_y) if pair else None

    def fresh(n, mean, scale, generator):
        return SAEParams.initialise(n, mean.shape[0], (mean / scale).to(device=device, dtype=dtype), generator)

    if init is not None:
        side_x = init[0].scaled(1.0 / scale_x).to(device, dtype).detached()
        side_y = init[1].scaled(1.0 / scale_y).to(device, dtype).detached() if pair else None
    else:
        side_x = fresh(config.n_components, mean_x, scale_x, input_init)
        side_y = fresh(config.n_output_components, mean_y, scale_y, output_init) if pair else None
    sides = [side_x] + ([side_y] if pair else [])
    for side in sides:
        side.requires_grad_()
    d_out = side_y.W_dec.shape[1] if pair else None
    penalty_norm = 1.0 / math.sqrt(d_in * d_out) if pair else 0.0

    tensors = [t for side in sides for t in side.tensors()]
    optimiser = Adam(tensors, lr=config.learning_rate, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(rows.n / config.batch_size)
    total = steps_per_epoch * config.max_iter
    dead_tokens = config.dead_tokens or min(10_000_000, rows.n)
    since_fired = [torch.zeros(side.W_dec.shape[0], dtype=torch.long, device=device) for side in sides]
    aux_k = config.aux_k or default_aux_k(d_in)
    aux_k_out = (config.aux_k or default_aux_k(d_out)) if pair else 0

    history = []
    step = 0
    for epoch in range(config.max_iter):
        started = time.perf_counter()
        sums = dict(loss=0.0, mse_input=0.0, mse_output=0.0, jacobian_l1=0.0, aux_input=0.0, aux_output=0.0)
        fired_epoch = [torch.zeros_like(s, dtype=torch.bool) for s in since_fired]
        order = torch.randperm(rows.n, generator=shuffling, device="cpu")
        for start in range(0, rows.n, config.batch_size):
            index = order[start : start + config.batch_size]
            lr_factor, l1_factor = _schedule(step, total, config)
            for group in optimiser.param_groups:
                group["lr"] = config.learning_rate * lr_factor
            x = rows.take(index) / scale_x
            outputs_and_weights = None
            if precomputed is not None:
                outputs_and_weights = (
                    outputs_rows.take(index), None if weights_rows is None else weights_rows.take(index)
                )
            elif pair:
                # The MLP's pass outside autocast: its outputs are the output SAE's targets, and
                # its local weights feed the penalty, so both stay in the training dtype.
                outputs_and_weights = map_and_local_weights(normalised_map, x)
            dead = [since >= dead_tokens for since in since_fired] + [None]
            with _autocast(device, config.autocast_dtype):
                loss, terms, fired = jsae_step_losses(
                    side_x, side_y, normalised_map, x, config.k,
                    l1=config.l1 * l1_factor if pair and config.l1 > 0 else None,
                    penalty_norm=penalty_norm, dead=(dead[0], dead[1]), aux_coef=config.aux_coef,
                    aux_k=(aux_k, aux_k_out), outputs_and_weights=outputs_and_weights,
                )
            _check_step(step, epoch, loss, terms, x, index,
                        outputs_and_weights[0] if outputs_and_weights is not None else None, pair)
            norms = optimiser_step(loss, optimiser, sides, config.max_grad_norm)
            # One synchronisation for all checks: the gradient norms and every parameter.
            finite = torch.stack([torch.isfinite(norms).all()] + [torch.isfinite(t).all() for t in tensors])
            if not bool(finite.all()):
                raise _non_finite(step, epoch, "a gradient or an SAE parameter is NaN or inf after the update",
                                  "learning_rate too large for this data; lower it.")
            with torch.no_grad():
                for i, (idx, val) in enumerate(fired):
                    hit = torch.zeros_like(fired_epoch[i])
                    hit[idx[val > 0]] = True
                    fired_epoch[i] |= hit
                    since_fired[i] += x.shape[0]
                    since_fired[i][hit] = 0
            weight = x.shape[0] / rows.n
            sums["loss"] += float(loss.detach()) * weight
            for name, value in terms.items():
                sums[name] += float(value.detach()) * weight
            step += 1
        record = dict(epoch=epoch + 1, **sums)
        if not pair:
            for name in ("mse_output", "jacobian_l1", "aux_output"):
                record.pop(name)
        elif config.l1 == 0:
            record.pop("jacobian_l1")
        record["l1"] = config.l1 * _schedule(step - 1, total, config)[1] if pair else 0.0
        record["dead_fraction_input"] = 1.0 - float(fired_epoch[0].float().mean())
        if pair:
            record["dead_fraction_output"] = 1.0 - float(fired_epoch[1].float().mean())
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if config.verbose:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
            print(f"epoch {epoch + 1}/{config.max_iter}: {shown}", flush=True)

    result_x = side_x.detached().scaled(scale_x).to("cpu")
    result_y = side_y.detached().scaled(scale_y).to("cpu") if pair else None
    return TrainResult(
        input_params=result_x,
        output_params=result_y,
        input_scale=scale_x,
        output_scale=scale_y if pair else None,
        history=history,
        dead_fraction_input=history[-1]["dead_fraction_input"] if history else 0.0,
        dead_fraction_output=history[-1].get("dead_fraction_output") if history else None,
    )

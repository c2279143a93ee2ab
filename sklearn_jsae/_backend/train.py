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

The MLP's outputs and local weights (``φ'(z)``) on the training rows do not depend on
``l1`` or on the SAEs: :func:`compute_mlp_pass` computes them once so that an ``l1``
sweep (with the estimator's ``memory``) reads them instead of recomputing them at every step
of every candidate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .jacobian import map_and_local_weights
from .mlp import placed
from .optim import Adam
from .sae import SAEParams
from .step import jsae_step_losses, optimiser_step

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
    max_grad_norm: float = 1.0
    aux_coef: float = 0.0
    aux_k: int | None = None
    dead_tokens: int | None = None
    device: str = "cpu"
    seed: int = 0
    verbose: int = 0
    dtype: torch.dtype = torch.float32


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
        order = torch.arange(self.n) if order is None else order
        for start in range(0, self.n, batch_size):
            yield self.take(order[start : start + batch_size])


@torch.no_grad()
def data_statistics(rows: _Rows, fn=None, batch_size: int = 8192):
    """Mean (d,) and centred per-element RMS of ``fn(x)`` (or x) over all rows, in float64."""
    total, total_sq, n = None, None, 0
    for x in rows.batches(batch_size):
        v = (x if fn is None else fn(x)).double()
        total = v.sum(0) if total is None else total + v.sum(0)
        total_sq = (v * v).sum(0) if total_sq is None else total_sq + (v * v).sum(0)
        n += v.shape[0]
    mean = total / n
    variance = (total_sq / n - mean * mean).clamp_min(0).mean().item()
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


def train(X: np.ndarray, mlp_map, config: TrainConfig, init: tuple | None = None,
          mlp_pass=None) -> TrainResult:
    """Fit one TopK SAE (``config.n_output_components is None``) or a JSAE pair on rows of ``X``.

    X : (n_samples, d_in) numpy array or memmap of MLP inputs.
    mlp_map : backend map d_in -> d_out (ignored for a single SAE).
    init : ``(input_params, output_params, input_scale, output_scale)`` in raw units to
        continue from (warm start), or None for a fresh initialisation.
    mlp_pass : callable ``(X, mlp_map, scale_x, scale_y) -> MLPPass`` or None
        Supplies the outputs and local weights of every row (:func:`compute_mlp_pass`, possibly
        through a cache) instead of computing them at each step; ``scale_y`` is None unless
        ``init`` fixes it.  Only for maps with :func:`supports_mlp_pass`.
    """
    device, dtype = torch.device(config.device), config.dtype
    # One generator per purpose, so that the input side of a JSAE with l1=0 sees exactly the
    # initialisation and batch order of a single TopK SAE fitted with the same seed.
    input_init = torch.Generator().manual_seed(config.seed)
    # The output SAE starts from the same seed: a TopK SAE fitted on mlp(X) with that seed is then
    # exactly the l1 = 0 output side too.
    output_init = torch.Generator().manual_seed(config.seed)
    shuffling = torch.Generator().manual_seed(config.seed + 1)
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
        return SAEParams.initialise(n, mean.shape[0], (mean / scale).to(dtype), generator).to(device)

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
        order = torch.randperm(rows.n, generator=shuffling)
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
            dead = [since >= dead_tokens for since in since_fired] + [None]
            loss, terms, fired = jsae_step_losses(
                side_x, side_y, normalised_map, x, config.k,
                l1=config.l1 * l1_factor if pair and config.l1 > 0 else None,
                penalty_norm=penalty_norm, dead=(dead[0], dead[1]), aux_coef=config.aux_coef,
                aux_k=(aux_k, aux_k_out), outputs_and_weights=outputs_and_weights,
            )
            optimiser_step(loss, optimiser, sides, config.max_grad_norm)
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

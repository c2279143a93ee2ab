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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

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
        if self.tensor is not None:
            return self.tensor[index.to(self.device)]
        rows = np.sort(index.numpy())
        return torch.as_tensor(np.asarray(self.X[rows])).to(device=self.device, dtype=self.dtype)

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


def train(X: np.ndarray, mlp_map, config: TrainConfig, init: tuple | None = None) -> TrainResult:
    """Fit one TopK SAE (``config.n_output_components is None``) or a JSAE pair on rows of ``X``.

    X : (n_samples, d_in) numpy array or memmap of MLP inputs.
    mlp_map : backend map d_in -> d_out (ignored for a single SAE).
    init : ``(input_params, output_params, input_scale, output_scale)`` in raw units to
        continue from (warm start), or None for a fresh initialisation.
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
    if pair:
        mlp_map = placed(mlp_map, device, dtype)
        mean_y, scale_y = data_statistics(rows, mlp_map)
    if init is not None and init[2] is not None:
        scale_x = init[2]
        scale_y = init[3] if pair else None
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
        for x in rows.batches(config.batch_size, order):
            lr_factor, l1_factor = _schedule(step, total, config)
            for group in optimiser.param_groups:
                group["lr"] = config.learning_rate * lr_factor
            x = x / scale_x
            dead = [since >= dead_tokens for since in since_fired] + [None]
            loss, terms, fired = jsae_step_losses(
                side_x, side_y, normalised_map, x, config.k,
                l1=config.l1 * l1_factor if pair and config.l1 > 0 else None,
                penalty_norm=penalty_norm, dead=(dead[0], dead[1]), aux_coef=config.aux_coef,
                aux_k=(aux_k, aux_k_out),
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

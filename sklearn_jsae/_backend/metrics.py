"""Torch kernels behind :mod:`sklearn_jsae.metrics`: reconstruction statistics, latent sweeps
and unit interventions, batch by batch, numpy in and numpy out.

Notation (one TopK SAE, :mod:`sklearn_jsae._backend.sae`)::

    pre(z) = (z - b_dec) W_enc^T + b_enc          (R, n)
    e(z)[i] = ReLU(pre(z)[i]) if i ∈ TopK_k(pre(z)) else 0

``e`` is the full encoder, TopK included: a latent that leaves the top k reads exactly 0.
Every function here evaluates the output SAE through ``e`` on the true MLP output.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .._thread_hooks import this_threads_forward_hook, this_threads_pre_hook
from .inference import MLP_FIX, mapped, numbered_batches, refuse_non_finite
from .mlp import placed, without_autocast
from .sae import SAEParams, decode, encode, pre_activations
from .train import _Rows


def _tensor_params(params: SAEParams, device, dtype=torch.float32) -> SAEParams:
    return params.to(device=device, dtype=dtype)


def latent_values(params: SAEParams, z: torch.Tensor, k: int, latents: torch.Tensor) -> torch.Tensor:
    """``e(z)[latents]`` under the full TopK encoder.

    z (R, d), latents (R, m) int64 -> (R, m): ``ReLU(pre[i])`` where latent i is among the
    top k of its row, else exactly 0.
    """
    pre = pre_activations(params, z)
    top = pre.topk(k, dim=1, sorted=False).indices
    # (R, k, m) membership, not an (R, n_latents) mask: that doubled the memory of a batch
    kept = (top[:, :, None] == latents[:, None, :]).any(dim=1)
    values = F.relu(pre.gather(1, latents))
    return torch.where(kept, values, torch.zeros_like(values))


@torch.no_grad()
def reconstruction_statistics(params_x: SAEParams, params_y: SAEParams | None, mlp_map, X: np.ndarray,
                              k_x: int, k_y: int | None, device="cpu", batch_size=4096) -> dict:
    """One pass over the rows of X: per side, the sums that FVU, L0 and dead fractions need.

    Returns ``{"input": stats, "output": stats}`` (no "output" when ``params_y`` is None) with
    ``stats = dict(n, residual, total, l0, fired)``: ``residual = Σ ||z - ẑ||²``,
    ``total = Σ ||z - mean(z)||²`` (float64, shifted by the first batch's mean for accuracy),
    ``l0 = Σ_rows #{latents with value > 0}`` and ``fired`` (n_latents,) bool, True for every
    latent with a value > 0 on some row.
    """
    sides = {"input": (params_x, k_x)}
    if params_y is not None:
        sides["output"] = (params_y, k_y)
        mlp_map = placed(mlp_map, device, torch.float32)
    tensors = {name: _tensor_params(p, device) for name, (p, _) in sides.items()}
    acc = {
        name: {"n": 0, "residual": 0.0, "shift": None, "s1": None, "s2": None, "l0": 0,
                   "fired": torch.zeros(p.W_dec.shape[0], dtype=torch.bool, device=device)}
        for name, p in tensors.items()
    }
    rows = _Rows(X, device, torch.float32, resident=False)  # one pass: no copy of X
    with without_autocast(device):  # float32 whatever the caller's autocast (see there)
        for start, x in numbered_batches(rows, batch_size):
            data = {"input": x}
            if "output" in sides:
                data["output"] = mapped(mlp_map, x, start)
            for name, z in data.items():
                params, k = tensors[name], sides[name][1]
                values, indices = encode(params, z, k)
                z_hat = decode(params, values, indices)
                a = acc[name]
                z64 = z.double()
                if a["shift"] is None:
                    a["shift"] = z64.mean(0)
                    a["s1"] = torch.zeros_like(a["shift"])
                    a["s2"] = torch.zeros_like(a["shift"])
                centred = z64 - a["shift"]
                a["s1"] += centred.sum(0)
                a["s2"] += (centred * centred).sum(0)
                a["residual"] += float(((z64 - z_hat.double()) ** 2).sum())
                a["n"] += z.shape[0]
                active = values > 0
                a["l0"] += int(active.sum())
                a["fired"][indices[active]] = True
    out = {}
    for name, a in acc.items():
        total = float((a["s2"] - a["s1"] * a["s1"] / a["n"]).clamp_min(0).sum())
        out[name] = {"n": a["n"], "residual": a["residual"], "total": total, "l0": a["l0"], "fired": a["fired"].cpu().numpy()}
    return out


@torch.no_grad()
def sweep_curves(mlp_map, params_x: SAEParams, params_y: SAEParams, k_y: int, x: np.ndarray,
                 current: np.ndarray, in_latent: np.ndarray, out_latent: np.ndarray, grid: np.ndarray,
                 device="cpu", max_rows=None) -> np.ndarray:
    """Output latent values along input-latent sweeps.

    For pair p: ``x_p(v) = x[p] + (v - current[p]) · W_dec_x[in_latent[p]]`` at each grid value
    ``v = grid[p, m]``, and the curve is ``e_y(mlp(x_p(v)))[out_latent[p]]``.

    x (P, d_in), current (P,), in_latent (P,), out_latent (P,), grid (P, M) -> curves (P, M).
    ``max_rows`` (points per batch) defaults to about 2²² elements of the widest of a batch's
    (rows, n_out) pre-activations and (rows, d) activations: a fixed 8,192 rows took 2.5 GB at
    65,536 output latents.
    """
    mlp_map = placed(mlp_map, device, torch.float32)
    px, py = _tensor_params(params_x, device), _tensor_params(params_y, device)
    n_pairs, n_points = grid.shape
    if max_rows is None:
        max_rows = max(1, (1 << 22) // max(py.W_dec.shape[0], px.W_dec.shape[1], py.W_dec.shape[1]))
    step = max(1, max_rows // n_points)
    curves = []
    with without_autocast(device):  # float32 whatever the caller's autocast
        for start in range(0, n_pairs, step):
            sl = slice(start, start + step)
            xb = torch.as_tensor(x[sl], dtype=torch.float32, device=device)
            gb = torch.as_tensor(grid[sl], dtype=torch.float32, device=device)
            cb = torch.as_tensor(current[sl], dtype=torch.float32, device=device)
            direction = px.W_dec[torch.as_tensor(in_latent[sl], device=device)]  # (P, d_in)
            shift = gb - cb[:, None]  # (P, M)
            points = xb[:, None, :] + shift[..., None] * direction[:, None, :]  # (P, M, d_in)
            y = mlp_map(points.reshape(-1, points.shape[-1]))
            refuse_non_finite(y.reshape(points.shape[0], -1), start, "the mlp returned",
                              "check the MLP at those inputs (an overflow, a log or a division of their values) "
                              "or sweep a narrower range (sweep_min, sweep_pad).",
                              where="a point of sweep {} (an input latent moved along its grid)")
            latents = torch.as_tensor(out_latent[sl], device=device).repeat_interleave(n_points)[:, None]
            curves.append(latent_values(py, y, k_y, latents).reshape(shift.shape).cpu().numpy())
    return np.concatenate(curves) if curves else np.zeros((0, n_points), dtype=np.float32)


@torch.no_grad()
def unit_interventions(mlp_map, params_x: SAEParams, params_y: SAEParams, k_x: int, k_y: int,
                       X: np.ndarray, delta: float = 1.0, device="cpu", batch_size=None):
    """Yield, per batch of rows, the Jacobian blocks and the observed effect of removing
    ``delta`` units of each active input latent.

    For row t with active sets I_x (k_x) and I_y (k_y)::

        observed[t, a, b] = e_y(f(x_t))[I_y[a]] - e_y(f(x_t - delta · W_dec_x[I_x[b]]))[I_y[a]]

    which the Jacobian predicts as ``delta · J[t, a, b]``.

    Yields numpy ``(J (B, k_y, k_x), observed (B, k_y, k_x), idx_y (B, k_y), idx_x (B, k_x))``.
    """
    from .jacobian import jacobian_blocks

    mlp_map = placed(mlp_map, device, torch.float32)
    px, py = _tensor_params(params_x, device), _tensor_params(params_y, device)
    n_out = py.W_dec.shape[0]
    batch_size = batch_size or max(1, (1 << 22) // max(1, k_x * max(n_out, mlp_map.d_in)))
    rows = _Rows(X, device, torch.float32, resident=False)
    for start, x in numbered_batches(rows, batch_size):
        # float32 whatever the caller's autocast; per batch, not across the yield (see inference)
        with without_autocast(device):
            _, idx_x = encode(px, x, k_x)
            y = mapped(mlp_map, x, start)
            _, idx_y = encode(py, y, k_y)
            J = jacobian_blocks(mlp_map, x, px.W_dec, idx_x, py.W_enc, idx_y)
            refuse_non_finite(J, start, "the mlp's Jacobian is", MLP_FIX)
            base = latent_values(py, y, k_y, idx_y)  # (B, k_y)
            moved = x[:, None, :] - delta * px.W_dec[idx_x]  # (B, k_x, d_in)
            y_moved = mlp_map(moved.reshape(-1, x.shape[1]))
            refuse_non_finite(y_moved.reshape(x.shape[0], -1), start,
                              "the mlp returned (on the row moved against an active input latent's direction)", MLP_FIX)
            after = latent_values(py, y_moved, k_y, idx_y.repeat_interleave(k_x, dim=0))  # (B·k_x, k_y)
            after = after.reshape(x.shape[0], k_x, k_y).transpose(1, 2)
            observed = base[:, :, None] - after
        yield J.cpu().numpy(), observed.cpu().numpy(), idx_y.cpu().numpy(), idx_x.cpu().numpy()


# ---------------------------------------------------------------------------- randomised control


def redraw_matrices_(module: torch.nn.Module, generator: torch.Generator) -> list[str]:
    """Replace, in place, every floating parameter or buffer with ``ndim >= 2`` of ``module``
    by i.i.d. standard normal entries rescaled to the original Frobenius norm.

    Tensors with ``ndim < 2`` (biases, norm gains) are untouched.  Returns the names redrawn.
    """
    redrawn = []
    named = list(module.named_parameters()) + list(module.named_buffers())
    seen = set()
    for name, tensor in named:
        if tensor is None or id(tensor) in seen or not tensor.is_floating_point() or tensor.ndim < 2:
            continue
        seen.add(id(tensor))
        with torch.no_grad():
            # Drawn on the CPU from the CPU generator (one seed, one redraw on every device),
            # rescaled there with the norm read as a number, then moved.
            draw = torch.randn(tensor.shape, generator=generator, dtype=torch.float64, device="cpu")
            norm = float(tensor.detach().double().norm())
            draw_norm = float(draw.norm())
            scaled = draw * (norm / draw_norm) if draw_norm > 0 else draw * 0
            tensor.copy_(scaled.to(device=tensor.device, dtype=tensor.dtype))
        redrawn.append(name)
    return redrawn


# ------------------------------------------------------------------------ splicing into a model


def _first_tensor(args, kwargs):
    """Where the MLP input module got its input tensor: ``("arg", 0)`` or ``("kw", name)``."""
    if args and isinstance(args[0], torch.Tensor):
        return "arg", 0
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return "kw", key
    raise ValueError(
        "the MLP input module was called without a tensor argument, so there is no input to replace; with "
        "module= given, pass the module (or the (input, output) pair) whose first argument is the MLP's input "
        "tensor, else pass module=... explicitly"
    )


def _reconstruct(params: SAEParams, k: int, z: torch.Tensor) -> torch.Tensor:
    """SAE reconstruction of z (..., d) in z's dtype and device.

    The SAE computes in its parameters' dtype (float32) with the caller's autocast off; the
    model around the splice runs as the caller runs it (under their autocast, if any)."""
    flat = z.reshape(-1, z.shape[-1]).to(params.W_dec.dtype)
    with without_autocast(z.device):
        values, indices = encode(params, flat, k)
        return decode(params, values, indices).reshape(z.shape).to(z.dtype)


# pass name -> (what replaces the MLP input, what replaces the MLP output); None keeps it
SPLICE_PASSES = {
    "clean": (None, None),
    "zero_input": ("zero", None),  # the MLP computes f(0): the input SAE's baseline
    "zero_output": (None, "zero"),  # the MLP's output is 0: the output SAE's baseline
    "input": ("sae", None),  # the MLP computes f(x̂)
    "output": (None, "sae"),  # the MLP's output is ŷ, the output SAE's reconstruction of f(x)
}


@torch.no_grad()
def spliced_cross_entropies(model, input_module, output_module, params_x: SAEParams, k_x: int,
                            params_y: SAEParams, k_y: int, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None, batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy of ``model`` over ``input_ids`` under the interventions
    on one MLP listed in :data:`SPLICE_PASSES`: ``clean``, ``zero_input`` (MLP input replaced
    by 0, so the MLP computes f(0)), ``zero_output`` (MLP output replaced by 0), ``input``
    (MLP input replaced by the input SAE's reconstruction) and ``output`` (MLP output
    replaced by the output SAE's reconstruction of the true output).

    The input is replaced in a forward pre-hook on ``input_module`` (its first tensor
    argument), the output in a forward hook on ``output_module``.

    input_ids (n_seq, T) int64; attention_mask (n_seq, T) or None.  Targets are positions
    1..T-1 whose mask is 1 (and whose predicting position is also 1).  Returns
    ``{"clean", "zero_input", "zero_output", "input", "output", "n_tokens"}``.
    """
    from ..hf._adapters import _eval_mode, logits_of, run_model  # a Hugging Face or TransformerLens forward

    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    px = _tensor_params(params_x, device)
    py = _tensor_params(params_y, device)
    mode = {"value": "clean"}

    def pre_hook(module, args, kwargs):
        action = SPLICE_PASSES[mode["value"]][0]
        if action is None:
            return None
        where, key = _first_tensor(args, kwargs)
        tensor = args[0] if where == "arg" else kwargs[key]
        replaced = torch.zeros_like(tensor) if action == "zero" else _reconstruct(px, k_x, tensor)
        if where == "arg":
            return (replaced,) + tuple(args[1:]), kwargs
        return args, {**kwargs, key: replaced}

    def post_hook(module, args, output):
        action = SPLICE_PASSES[mode["value"]][1]
        if action is None:
            return None
        tensor = output[0] if isinstance(output, tuple) else output
        replaced = torch.zeros_like(tensor) if action == "zero" else _reconstruct(py, k_y, tensor)
        return (replaced,) + tuple(output[1:]) if isinstance(output, tuple) else replaced

    # The hooks sit on the model, so they fire for whoever runs it: another spliced_ce_score (or
    # any forward) of the same model in another thread would be spliced by this call's pass.
    handles = [this_threads_pre_hook(input_module, pre_hook),
               this_threads_forward_hook(output_module, post_hook)]
    sums = dict.fromkeys(SPLICE_PASSES, 0.0)
    n_tokens = 0
    try:
        # each submodule's own train/eval flag is put back after, not the root's flag on all of
        # them (a frozen block in a model in train mode, MC dropout in one in eval mode)
        with _eval_mode(model):
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
                valid = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else (
                    (mask[:, 1:] > 0) & (mask[:, :-1] > 0))
                n_tokens += int(valid.sum())
                for name in sums:
                    mode["value"] = name
                    logits = logits_of(run_model(model, ids, mask))[:, :-1].float()
                    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="none").reshape(valid.shape)
                    sums[name] += float(losses[valid].double().sum())
    finally:
        mode["value"] = "clean"
        for handle in handles:
            handle.remove()
    if n_tokens == 0:
        raise ValueError("input_ids has no next-token targets: pass sequences of at least 2 unmasked tokens.")
    out = {name: value / n_tokens for name, value in sums.items()}
    out["n_tokens"] = n_tokens
    return out

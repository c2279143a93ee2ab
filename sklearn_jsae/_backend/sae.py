"""The TopK sparse autoencoder as plain tensors.

Model (Gao et al. 2024; Farnik et al. 2025)::

    pre   = (x - b_dec) @ W_enc^T + b_enc          (B, n)
    I     = TopK_k(pre)                            (B, k) indices of the k largest pre-activations
    s     = ReLU(pre[I])                           (B, k) values; a kept negative becomes 0, its index stays active
    x_hat = Σ_a s[:, a] · W_dec[I[:, a]] + b_dec   (B, d)

``W_enc`` (n, d) holds encoder ROWS (the transpose of the paper's ``W_enc``) so
that both dictionaries are gathered by row.  Decoder rows have unit L2 norm.
TopK results travel as ``(values, indices)`` pairs, which map straight onto CSR.

Training uses :func:`encode_with_grad`: the dense pre-activations that TopK needs
anyway are computed once without autograd, the k active values are read from
them, and a hand-written backward scatters the gradient into the k active rows
of ``W_enc`` per sample (O(B·k·d) work, no (B, k, d) tensor beyond one chunk).
Its plain twin is ``select_topk`` + :func:`active_values` under autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .chunks import add_rows_, gather_rows, run_chunks


@dataclass
class SAEParams:
    """Trainable tensors of one TopK SAE: W_enc (n, d), b_enc (n,), W_dec (n, d), b_dec (d,)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def tensors(self):
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec]

    @classmethod
    def initialise(cls, n: int, d: int, data_mean: torch.Tensor, generator: torch.Generator) -> "SAEParams":
        """Unit-norm random decoder rows, ``W_enc = W_dec`` (the paper's ``W_enc = W_dec^T``),
        ``b_enc = 0``, ``b_dec`` = the data mean (the paper uses 0; Gao et al. a geometric median).

        The draw happens on the CPU, from ``generator`` (a CPU generator), in float32, and is then
        moved to ``data_mean``'s device and dtype: the same seed gives the same initial model on
        every device (CUDA generators draw different numbers, and a CPU generator cannot draw
        on CUDA at all).  ``data_mean`` (d,) -> tensors on its device, in its dtype.
        """
        device, dtype = data_mean.device, data_mean.dtype
        W_dec = torch.randn(n, d, generator=generator, device="cpu", dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        W_dec = W_dec.to(device=device, dtype=dtype)
        return cls(W_dec.clone(), torch.zeros(n, device=device, dtype=dtype), W_dec, data_mean.clone())

    def requires_grad_(self):
        for t in self.tensors():
            t.requires_grad_(True)
        return self

    def detached(self) -> "SAEParams":
        return SAEParams(*(t.detach().clone() for t in self.tensors()))

    def to(self, device=None, dtype=None) -> "SAEParams":
        return SAEParams(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def scaled(self, scale: float) -> "SAEParams":
        """Parameters for data multiplied by ``scale``: biases scale, directions do not."""
        return SAEParams(self.W_enc, self.b_enc * scale, self.W_dec, self.b_dec * scale)


def pre_activations(params: SAEParams, x: torch.Tensor) -> torch.Tensor:
    """x (B, d) -> pre (B, n)."""
    return torch.addmm(params.b_enc, x - params.b_dec, params.W_enc.T)


def select_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """pre (B, n) -> active indices (B, k), int64, unordered."""
    return pre.topk(k, dim=1, sorted=False).indices


def encode(params: SAEParams, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, d) -> (values (B, k), indices (B, k)).  No gradient (inference)."""
    pre = pre_activations(params, x)
    top = pre.topk(k, dim=1, sorted=False)
    return F.relu(top.values), top.indices


def active_values(params: SAEParams, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """ReLU(pre[indices]) recomputed for the k active latents only, so that autograd
    touches k rows of ``W_enc`` per sample instead of all n.

    x (B, d), indices (B, k) -> values (B, k).
    """
    rows = gather_rows(params.W_enc, indices)  # (B, k, d), with a backward in a fixed order
    pre = torch.einsum("bd,bkd->bk", x - params.b_dec, rows) + gather_rows(params.b_enc, indices)
    return F.relu(pre)


# Elements of one (chunk, k, d) intermediate of the encoder backward (see jacobian.py).
_CPU_CHUNK_ELEMENTS = 1 << 18
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


class _ActiveValues(torch.autograd.Function):
    """``ReLU(pre_active)`` with the gradient of ``pre_active = (x - b_dec) · W_enc[I] + b_enc[I]``.

    Inputs: W_enc (n, d), b_enc (n,), b_dec (d,), x (B, d), indices (B, k),
    pre_active (B, k) (the pre-activations at ``indices``, already computed).
    """

    @staticmethod
    def forward(ctx, W_enc, b_enc, b_dec, x, indices, pre_active):
        ctx.save_for_backward(W_enc, b_dec, x, indices, pre_active)
        return F.relu(pre_active)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values):
        W_enc, b_dec, x, indices, pre_active = ctx.saved_tensors
        need_w, need_b_enc, need_b_dec, need_x = ctx.needs_input_grad[:4]
        g = grad_values * (pre_active > 0)  # (B, k): ReLU passes where the pre-activation is > 0
        batch, k = indices.shape
        n, d = W_enc.shape
        flat = indices.reshape(-1)
        grad_w = grad_b_enc = grad_b_dec = grad_x = None
        if need_w:
            # grad W_enc[i] = Σ_{t, a : I[t, a] = i} g[t, a] (x_t - b_dec), chunk by chunk.
            centred = x - b_dec
            elements = _CPU_CHUNK_ELEMENTS if W_enc.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
            chunk = max(1, elements // (k * d))
            size = min(batch, chunk)

            def make_state():
                return dict(grad=torch.zeros_like(W_enc), rows=W_enc.new_empty(size, k, d))

            def work(st, start, stop):
                rows = torch.mul(g[start:stop, :, None], centred[start:stop, None, :], out=st["rows"][: stop - start])
                add_rows_(st["grad"], flat[start * k : stop * k], rows.view(-1, d))

            states = run_chunks(batch, chunk, make_state, work, W_enc.device,
                                state_bytes=W_enc.numel() * W_enc.element_size())
            grad_w = states[0]["grad"]
            for st in states[1:]:
                grad_w += st["grad"]
        if need_b_enc or need_b_dec:
            per_latent = add_rows_(torch.zeros(n, dtype=g.dtype, device=g.device), flat, g.reshape(-1))
            grad_b_enc = per_latent if need_b_enc else None
            grad_b_dec = -(per_latent @ W_enc) if need_b_dec else None
        if need_x:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=g, mode="sum")
        return grad_w, grad_b_enc, grad_b_dec, grad_x, None, None


def encode_with_grad(params: SAEParams, x: torch.Tensor, k: int):
    """TopK codes for training: values carry gradients to the k active encoder rows only.

    Fast twin of ``select_topk(pre_activations(params, x), k)`` followed by
    :func:`active_values`: the values are read from the dense pre-activations
    (computed once, without autograd) and the backward is hand-written.

    Parameters
    ----------
    params : SAEParams with W_enc (n, d), b_enc (n,), b_dec (d,).
    x : (B, d) inputs.
    k : active latents per sample.

    Returns
    -------
    values : (B, k) ReLU of the active pre-activations, differentiable in W_enc, b_enc,
        b_dec and x (once).
    indices : (B, k) int64 active latents, unordered.
    pre : (B, n) pre-activations, no gradient (for AuxK's dead-latent selection).
    """
    with torch.no_grad():
        pre = pre_activations(params, x)
        indices = select_topk(pre, k)
    return active_values_from_pre(params, x, indices, pre), indices, pre


def active_values_from_pre(params: SAEParams, x: torch.Tensor, indices: torch.Tensor, pre: torch.Tensor):
    """Fast twin of :func:`active_values` when the dense pre-activations are at hand.

    x (B, d), indices (B, k), pre (B, n) = ``pre_activations(params, x)`` (no gradient)
    -> values (B, k) = ``ReLU(pre[indices])``, differentiable in W_enc, b_enc, b_dec and x
    through a hand-written backward that touches the k active rows only.
    """
    pre_active = pre.detach().gather(1, indices).to(params.W_enc.dtype)  # float32 even under autocast
    return _ActiveValues.apply(params.W_enc, params.b_enc, params.b_dec, x, indices, pre_active)


class _SparseDecode(torch.autograd.Function):
    """``Σ_a values[:, a] · W_dec[indices[:, a]]`` (no bias) with a sort-free backward.

    Inputs: W_dec (n, d), values (B, k), indices (B, k).  Forward is ``embedding_bag``;
    the backward scatters ``values ⊗ grad`` into the active rows of W_dec and reads the
    value gradients ``grad_t · W_dec[indices[t, a]]`` from gathered rows, chunk by chunk
    (``embedding_bag``'s own backward sorts the B·k indices, slow on a busy CPU).
    """

    @staticmethod
    def forward(ctx, W_dec, values, indices):
        ctx.save_for_backward(W_dec, values, indices)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        W_dec, values, indices = ctx.saved_tensors
        need_w, need_values = ctx.needs_input_grad[:2]
        batch, k = indices.shape
        d = W_dec.shape[1]
        flat = indices.reshape(-1)
        grad = grad.contiguous()
        grad_values = W_dec.new_empty(batch, k) if need_values else None
        elements = _CPU_CHUNK_ELEMENTS if W_dec.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        chunk = max(1, elements // (k * d))
        size = min(batch, chunk)

        def make_state():
            return dict(grad=torch.zeros_like(W_dec) if need_w else None, rows=W_dec.new_empty(size * k, d))

        def work(st, start, stop):
            nb = stop - start
            rows = flat[start * k : stop * k]
            if need_values:  # grad_values[t, a] = grad_t · W_dec[I[t, a]]
                gathered = torch.index_select(W_dec, 0, rows, out=st["rows"][: nb * k]).view(nb, k, d)
                torch.bmm(gathered, grad[start:stop, :, None], out=grad_values[start:stop, :, None])
            if need_w:  # grad W_dec[i] += values[t, a] · grad_t
                outer = torch.mul(values[start:stop, :, None], grad[start:stop, None, :],
                                  out=st["rows"][: nb * k].view(nb, k, d))
                add_rows_(st["grad"], rows, outer.view(nb * k, d))

        states = run_chunks(batch, chunk, make_state, work, W_dec.device,
                            state_bytes=W_dec.numel() * W_dec.element_size() if need_w else 0)
        grad_w = None
        if need_w:
            grad_w = states[0]["grad"]
            for st in states[1:]:
                grad_w += st["grad"]
        return grad_w, grad_values, None


def decode_rows(W_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``Σ_a values[:, a] · W_dec[indices[:, a]]`` without the bias (AuxK's reconstruction).

    W_dec (n, d), values, indices (B, k) -> (B, d); differentiable in W_dec and values.
    """
    return _SparseDecode.apply(W_dec, values.to(W_dec.dtype), indices)


def decode(params: SAEParams, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sparse decode: gather k decoder rows per sample.  values, indices (B, k) -> x_hat (B, d).

    ``embedding_bag`` forward with a hand-written, sort-free backward; its plain twin is
    :func:`decode_dense`.
    """
    return _SparseDecode.apply(params.W_dec, values.to(params.W_dec.dtype), indices) + params.b_dec


def decode_dense(params: SAEParams, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Plain twin of :func:`decode`: scatter into a dense (B, n) code, then one matmul."""
    dense = torch.zeros(values.shape[0], params.W_dec.shape[0], dtype=values.dtype, device=values.device)
    dense = dense.scatter(1, indices, values)
    return dense @ params.W_dec + params.b_dec


@torch.no_grad()
def normalise_decoder_(params: SAEParams) -> None:
    """Rescale decoder rows to unit L2 norm, in place."""
    params.W_dec /= params.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

"""The TopK sparse autoencoder as plain tensors.

Model (Gao et al. 2024; Farnik et al. 2025)::

    pre   = (x - b_dec) @ W_enc^T + b_enc          (B, n)
    I     = TopK_k(pre)                            (B, k) indices of the k largest pre-activations
    s     = ReLU(pre[I])                           (B, k) values; a kept negative becomes 0, its index stays active
    x_hat = Σ_a s[:, a] · W_dec[I[:, a]] + b_dec   (B, d)

``W_enc`` (n, d) holds encoder ROWS (the transpose of the paper's ``W_enc``) so
that both dictionaries are gathered by row.  Decoder rows have unit L2 norm.
TopK results travel as ``(values, indices)`` pairs, which map straight onto CSR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


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
        ``b_enc = 0``, ``b_dec`` = the data mean (the paper uses 0; Gao et al. a geometric median)."""
        device = data_mean.device
        W_dec = torch.randn(n, d, generator=generator, device=device, dtype=data_mean.dtype)
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return cls(W_dec.clone(), torch.zeros(n, device=device, dtype=data_mean.dtype), W_dec, data_mean.clone())

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
    rows = params.W_enc[indices]  # (B, k, d)
    pre = torch.einsum("bd,bkd->bk", x - params.b_dec, rows) + params.b_enc[indices]
    return F.relu(pre)


def decode(params: SAEParams, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sparse decode: gather k decoder rows per sample.  values, indices (B, k) -> x_hat (B, d)."""
    return F.embedding_bag(indices, params.W_dec, per_sample_weights=values, mode="sum") + params.b_dec


def decode_dense(params: SAEParams, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Plain twin of :func:`decode`: scatter into a dense (B, n) code, then one matmul."""
    dense = torch.zeros(values.shape[0], params.W_dec.shape[0], dtype=values.dtype, device=values.device)
    dense = dense.scatter(1, indices, values)
    return dense @ params.W_dec + params.b_dec


@torch.no_grad()
def normalise_decoder_(params: SAEParams) -> None:
    """Rescale decoder rows to unit L2 norm, in place."""
    params.W_dec /= params.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

"""Adam on a flat list of tensors.

The update of ``torch.optim.Adam`` (Kingma & Ba 2015, bias-corrected, no weight decay),
written out so that building an optimiser does not import ``torch._dynamo`` (seconds per
process: every ``fit`` in a fresh GridSearchCV worker would pay it).  Exposes the part of
the ``torch.optim.Optimizer`` interface the training step uses: ``param_groups[0]["lr"]``,
``zero_grad`` and ``step``.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """``θ ← θ - lr · m̂ / (sqrt(v̂) + eps)`` with ``m``, ``v`` the moving moments of the gradient."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.param_groups = [dict(lr=lr)]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        lr = self.param_groups[0]["lr"]
        correction1 = 1 - self.beta1**self.steps
        correction2 = 1 - self.beta2**self.steps
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denominator = (v / correction2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denominator, value=_representable(-lr / correction1, p.dtype))


def _representable(value: float, dtype: torch.dtype) -> float:
    """``value``, or ±inf where it is beyond ``dtype``'s range: torch refuses a finite scalar that
    overflows the tensor's type, whereas an infinite step leaves non-finite parameters, which the
    trainer reports as a learning rate too large (a named error, not torch's overflow message)."""
    if abs(value) > torch.finfo(dtype).max:
        return math.copysign(math.inf, value)
    return value

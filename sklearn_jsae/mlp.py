"""MLP modules with a closed-form Jacobian, for building the ``mlp`` of a JSAE by hand.

:class:`ElementwiseMLP` is ``y = φ(x W_in + b_in) W_out + b_out`` and
:class:`GatedMLP` is the LLaMA-style ``y = (act(x W_gate + b_gate) ⊙ (x W_up + b_up)) W_down + b_down``.
Both are frozen ``torch.nn.Module`` objects mapping ``x`` (n, d_in) to ``y`` (n, d_out);
:class:`~sklearn_jsae.JacobianSparseAutoencoder` recognises them and uses the exact
closed-form Jacobian instead of autograd.

Weights are in the row-vector orientation ``y = x @ W``: ``W_in``, ``W_gate`` and
``W_up`` are (d_in, d_mlp) and ``W_out``, ``W_down`` are (d_mlp, d_out), i.e. the
*transpose* of ``torch.nn.Linear.weight`` (GPT-2's ``Conv1D.weight`` already has this
layout).  :func:`sklearn_jsae.hf.mlp_of` builds them from Hugging Face models.

Supported activations (:data:`ACTIVATIONS`): ``"gelu"`` (exact, erf), ``"gelu_tanh"``,
``"relu"``, ``"silu"``, ``"tanh"``, ``"sigmoid"``.

Examples
--------
>>> import torch
>>> from sklearn_jsae.mlp import GatedMLP
>>> g = torch.Generator().manual_seed(0)
>>> W_gate, W_up = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
>>> W_down = torch.randn(16, 8, generator=g)
>>> mlp = GatedMLP(W_gate, W_up, W_down)               # SiLU, no biases (LLaMA)
>>> x = torch.randn(5, 8, generator=g)
>>> expected = (torch.nn.functional.silu(x @ W_gate) * (x @ W_up)) @ W_down
>>> bool(torch.allclose(mlp(x), expected))
True
"""

from ._backend.mlp import ACTIVATIONS, ElementwiseMLP, GatedMLP

__all__ = ["ACTIVATIONS", "ElementwiseMLP", "GatedMLP"]

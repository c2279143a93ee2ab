"""The randomised-model control: the same MLP with its weight matrices re-drawn."""

from __future__ import annotations

import copy

import numpy as np

from ._validation import _check_random_state


def randomize_mlp(mlp, random_state=None):
    """A copy of ``mlp`` with its weight matrices re-drawn at the same scale: the paper's control.

    Exactly what happens: ``mlp`` is deep-copied; in the copy every floating-point parameter
    or buffer with two or more dimensions (the weight matrices: ``nn.Linear.weight``,
    ``W_in``/``W_out`` of :class:`~sklearn_jsae.mlp.ElementwiseMLP`, ``W_gate``/``W_up``/
    ``W_down`` of :class:`~sklearn_jsae.mlp.GatedMLP`, ...) is replaced by a matrix of i.i.d.
    standard normal draws rescaled so that its Frobenius norm equals the original's (same
    shape, dtype, device and root-mean-square entry).  Everything with fewer than two
    dimensions (biases, normalisation gains) and every non-tensor attribute (activation,
    shapes) is kept.  ``mlp`` itself is never modified.  Training the same JSAE on ``mlp`` and
    on ``randomize_mlp(mlp)`` shows how much of the Jacobian sparsity comes from the trained
    weights rather than from the method.

    Parameters
    ----------
    mlp : torch.nn.Module
        ``nn.Sequential(nn.Linear, activation, nn.Linear)``, ``nn.Linear``, an
        :class:`~sklearn_jsae.mlp.ElementwiseMLP` / :class:`~sklearn_jsae.mlp.GatedMLP`
        (e.g. from :func:`sklearn_jsae.hf.mlp_of`), or any ``nn.Module`` holding weight matrices.
    random_state : int, RandomState instance or None, default=None
        Seeds a private ``torch.Generator`` (the global torch RNG is untouched).

    Returns
    -------
    randomized : torch.nn.Module
        Same class as ``mlp``.

    Raises
    ------
    TypeError
        If ``mlp`` is not a torch ``nn.Module`` (a plain function has no weights to re-draw).
    ValueError
        If ``mlp`` holds no floating-point tensor with two or more dimensions, or
        ``random_state`` cannot seed a generator (a negative int, a str, ...).

    Examples
    --------
    >>> import torch
    >>> from sklearn_jsae.metrics import randomize_mlp
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    >>> rand = randomize_mlp(mlp, random_state=0)
    >>> bool(torch.equal(rand[0].bias, mlp[0].bias)), bool(torch.equal(rand[0].weight, mlp[0].weight))
    (True, False)
    >>> bool(torch.isclose(rand[2].weight.norm(), mlp[2].weight.norm()))
    True
    """
    import torch

    from .._backend.metrics import redraw_matrices_

    if not isinstance(mlp, torch.nn.Module):
        raise TypeError(
            f"randomize_mlp needs a torch.nn.Module whose weight matrices it can re-draw, got "
            f"{type(mlp).__name__}. Supported: nn.Sequential(nn.Linear, activation, nn.Linear), "
            f"nn.Linear, sklearn_jsae.mlp.ElementwiseMLP / GatedMLP (e.g. from sklearn_jsae.hf.mlp_of), "
            f"or any nn.Module with weight-matrix parameters; a plain function has no weights."
        )
    seed = int(_check_random_state(random_state).randint(np.iinfo(np.int32).max))
    randomized = copy.deepcopy(mlp)
    redrawn = redraw_matrices_(randomized, torch.Generator().manual_seed(seed))
    if not redrawn:
        raise ValueError(
            f"mlp ({type(mlp).__name__}) has no floating-point parameter or buffer with 2 or more "
            f"dimensions, so there is no weight matrix to re-draw (the identity map, for instance). "
            f"Pass the MLP module itself, e.g. nn.Sequential(nn.Linear, nn.GELU(), nn.Linear)."
        )
    return randomized

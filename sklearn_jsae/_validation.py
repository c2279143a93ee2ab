"""Cross-parameter checks, device resolution and input checks shared by the estimators (no torch
import at module level)."""

from __future__ import annotations

import re

import numpy as np

from ._warnings import warn


# Fewer optimiser steps than this in a fit warn.  Measured with the card's call
# JacobianSparseAutoencoder(k=32, l1=1e-2) on 300 rows of 32 features (docs/defaults.rst): the
# training explained variance is < 0 after 30 steps, 0.78 after 60, 0.90 after 90, 0.95 after
# 100-150 and 0.98 after 200.
MIN_STEPS = 100
# The forms of the Jacobian penalty (see sklearn_jsae._backend.step.jsae_step_losses); the first is the paper's.
PENALTIES = ("paper", "unit_gain")

_DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def check_k(k: int, n_components: int, name: str = "n_components") -> None:
    if k > n_components:
        raise ValueError(
            f"k={k} must be <= {name}={n_components}: each sample keeps k of the {name} latents. "
            f"Lower k or raise {name}."
        )


def resolve_device(device: str, *, for_inference: bool = False) -> str:
    """``'cpu' | 'cuda' | 'cuda:N' | 'auto'`` -> a torch device string (``'cpu'`` or ``'cuda:N'``).

    ``'auto'`` is CUDA when available, else the CPU.  An unavailable CUDA device is an error for
    training; for inference (a model fitted on CUDA, unpickled on a machine without it) it falls
    back to the CPU with a warning, since the fitted state is numpy and runs anywhere.
    """
    from ._backend.mlp import cuda_device_count

    if not isinstance(device, str) or _DEVICE_PATTERN.match(device) is None:
        # scikit-learn's constraints cannot express "cuda:N", so the format is checked here.
        raise ValueError(
            f"The 'device' parameter must be 'cpu', 'cuda', 'cuda:N' (N a CUDA device index) or "
            f"'auto'; got {device!r}."
        )
    count = cuda_device_count()
    if device == "auto":
        return "cuda:0" if count > 0 else "cpu"
    if device == "cpu":
        return "cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index < count:
        return f"cuda:{index}"
    reason = (
        "torch.cuda.is_available() is False on this machine" if count == 0
        else f"this machine has {count} CUDA device(s), numbered 0 to {count - 1}"
    )
    if for_inference:
        warn(f"device={device!r} but {reason}; running on the CPU instead (set device='cpu' or "
             f"'auto' to silence this).")
        return "cpu"
    raise ValueError(f"device={device!r} but {reason}; use device='cpu', device='auto' or a valid index.")


def resolve_autocast(mixed_precision, device: str):
    """The autocast dtype for ``mixed_precision`` (``'auto'``, True or False) on ``device``, or None.

    ``'auto'`` turns bf16 autocast on for CUDA only (the paper trains so); True turns it on on the
    CPU too (slower there, useful to check results).
    """
    import torch

    on = device.startswith("cuda") if mixed_precision == "auto" else bool(mixed_precision)
    return torch.bfloat16 if on else None


def check_finite_rows(X, name: str = "X", chunk_rows: int = 65536) -> None:
    """Reject X holding NaN or inf, naming the first such row (scikit-learn's own check names
    neither the row nor a fix that applies here: it suggests imputers and gradient boosting)."""
    with np.errstate(over="ignore", invalid="ignore"):
        # One pass and no boolean copy of X in the usual case: a float64 sum of finite float32
        # values cannot overflow, so a finite sum means finite X (float64 X near its own range
        # can overflow it: the row scan below then finds nothing and X passes).
        # (first in X's own dtype, the fastest pass; a float32 sum of large finite values can overflow)
        if X.size == 0 or np.isfinite(X.sum()) or np.isfinite(X.sum(dtype=np.float64)):
            return
    first, n_bad = None, 0
    for start in range(0, X.shape[0], chunk_rows):
        part = X[start : start + chunk_rows]
        bad = np.flatnonzero(~np.isfinite(part).reshape(len(part), -1).all(axis=1))
        if first is None and len(bad):
            first = start + int(bad[0])
        n_bad += len(bad)
    if n_bad:
        raise ValueError(
            f"{name} contains NaN or inf in row {first} ({n_bad} row(s) in all); remove or repair "
            f"those rows (e.g. {name}[np.isfinite({name}).all(axis=1)]) before passing {name}."
        )


def check_float32_range(X, name: str = "X") -> None:
    """Reject float64 X holding values that become inf in float32, the training dtype."""
    if X.dtype == np.float64 and X.size:
        # max and -min, not abs(X).max(): that made a float64 copy of all of X (2x its memory)
        largest = max(float(X.max()), -float(X.min()))
        limit = float(np.finfo(np.float32).max)
        if largest > limit:
            raise ValueError(
                f"{name} holds a value of magnitude {largest:.3g}, beyond float32's range (max "
                f"{limit:.3g}); training runs in float32, where it would become inf. Rescale {name} "
                f"(divide it by a constant) or remove those rows."
            )


def warn_if_few_steps(n_samples: int, batch_size: int, max_iter: int) -> int:
    """Warn (``ConvergenceWarning``) when a fit would run fewer than :data:`MIN_STEPS` optimiser
    steps; returns the number of steps."""
    from sklearn.exceptions import ConvergenceWarning

    steps = -(-n_samples // batch_size) * max_iter
    if steps < MIN_STEPS:
        per_epoch = -(-n_samples // batch_size)
        needed_epochs = -(-MIN_STEPS // per_epoch)
        smaller_batch = n_samples * max_iter // MIN_STEPS
        fixes = ([f"batch_size<={smaller_batch}"] if smaller_batch >= 1 else []) + [f"max_iter>={needed_epochs}"]
        warn(
            f"this fit runs only {steps} optimiser steps ({n_samples} samples, batch_size={batch_size}, "
            f"max_iter={max_iter}); below {MIN_STEPS} steps the SAEs are usually far from converged "
            f"(score well below its plateau). Use {' or '.join(fixes)}, or more samples.",
            ConvergenceWarning,
        )
    return steps

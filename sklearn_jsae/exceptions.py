"""Errors and warnings raised by sklearn_jsae (no torch import here)."""

from __future__ import annotations


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped because a loss, an MLP output, a gradient or a parameter became NaN or inf,
    or the loss diverged.

    The message names the optimiser step, what went non-finite and the likely cause.  The
    estimator keeps the state it had before the failed ``fit`` (unfitted, or the previous fit).
    Attributes ``step`` (0-based optimiser step, or None before the first step) and ``what``
    (the quantity that failed) repeat the message's facts for programs.
    """

    def __init__(self, message: str, *, step: int | None = None, what: str = ""):
        super().__init__(message)
        self.step = step
        self.what = what

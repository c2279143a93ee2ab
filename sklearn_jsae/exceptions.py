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


class PersistenceError(ValueError):
    """A saved model that this version of sklearn-jsae cannot load, or a model it will not save.

    Raised by :func:`sklearn_jsae.load` for a file that is not readable (truncated, damaged),
    not an sklearn-jsae model (another safetensors or JSON file), written by an incompatible
    format version, whose tensors do not match its own description or hold NaN or inf; by
    ``save`` for a model whose fitted arrays hold NaN or inf (before anything is written); by unpickling an
    estimator pickled with an incompatible version; and by :mod:`sklearn_jsae.interop` for
    folders that are not a loadable SAELens or sparsify TopK SAE.  The message names the file,
    what is wrong and what to do.  Nothing is half-loaded: the error comes before any estimator
    is built.
    """


class CheckpointError(ValueError):
    """A ``checkpoint_dir`` whose checkpoint cannot be resumed by this fit.

    Raised by ``fit``, ``fit_stream`` (and ``python -m sklearn_jsae train``) with a
    ``checkpoint_dir`` when this fit's checkpoint is unreadable (truncated, damaged: its content
    does not match the SHA-256 digest recorded when it was written, or holds NaN, inf or a header
    that is not a fit's) or foreign
    (not an sklearn-jsae checkpoint, or another format version); when it was written by a job of
    another number of ranks; when a stream without ``state_dict`` would need one to resume; or
    when a resumed stream is already at its end.  Nothing is overwritten: the checkpoint stays as
    it was.  (Other fits' checkpoints in the folder, of other data, MLP, warm start or settings,
    are not errors: each fit keeps its own file, and a fit without one starts afresh with a
    warning.)
    """


class MissingMLPError(RuntimeError):
    """An MLP-dependent method of a JacobianSparseAutoencoder loaded without its MLP.

    An arbitrary callable MLP cannot be saved without pickling it, so
    :func:`sklearn_jsae.load` gives a model whose ``transform_output``, ``mlp_outputs``,
    ``jacobian`` and ``score`` raise this error (and ``fit`` a ValueError quoting it) until the
    MLP is passed again with ``sklearn_jsae.load(path, mlp=...)``.  The SAE-only methods
    (``transform``, ``inverse_transform``, ``inverse_transform_output``, ``jacobian_``) work
    without it.
    """


class TrainingStopped(KeyboardInterrupt):
    """A fit, or a ``python -m sklearn_jsae train`` run, stopped by a signal inside
    :func:`sklearn_jsae.graceful_stop` (SIGTERM: a scheduler's time limit or pre-emption).

    A ``KeyboardInterrupt``, so that what cleans up after Ctrl-C cleans up after it.  When a
    checkpointed fit was training, it stopped after an optimiser step and wrote its checkpoint
    first: running the same fit again resumes from that step.  The estimator keeps the state it
    had before the fit.  Attributes: ``signal`` (the signal's number), ``step`` (the optimiser
    steps done when the checkpoint was written, or None when the signal stopped something else)
    and ``checkpoint`` (the checkpoint file written, or None).
    """

    def __init__(self, message: str = "", *, signal: int | None = None, step: int | None = None,
                 checkpoint: str | None = None):
        super().__init__(message)
        self.signal = signal
        self.step = step
        self.checkpoint = checkpoint

"""Ending a checkpointed fit at a step boundary when the process is asked to end (SIGTERM).

A cluster's scheduler ends a job at its time limit or on pre-emption with SIGTERM and, some
seconds later (SLURM's ``KillWait``, 30 s by default; torchrun's agent waits 30 s too), SIGKILL.
Python's default for SIGTERM ends the process at once, losing everything since the last
checkpoint (up to ``checkpoint_every``: five minutes of a ``train`` run).  Inside
:func:`graceful_stop`, a SIGTERM during a fit with ``checkpoint_dir`` is a request that the fit
honours after its current optimiser step: it writes a checkpoint and raises
:class:`~sklearn_jsae.exceptions.TrainingStopped`, so that running the same fit again resumes
exactly there.  Outside such a fit (loading a model, evaluating) the signal raises
``TrainingStopped`` at once, as Ctrl-C raises ``KeyboardInterrupt``: every write is already safe
against that.  A second signal before the step ends raises at once too.

State is per process: signal handlers run in the main thread, and the training loops (which
may run in another thread) only read the request.
"""

from __future__ import annotations

import contextlib
import signal as signal_module
import threading

from ..exceptions import TrainingStopped

# The signal number of a request not yet honoured (None: none), and how many checkpointed
# training loops are running (each honours the request at its next step).
_request: dict = {"signal": None, "loops": 0}


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _request["signal"]


def name(signum: int) -> str:
    try:
        return signal_module.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stopped(signum: int, message: str, **facts) -> TrainingStopped:
    """The exception that ends the fit, the request it answers cleared (a notebook's next fit in
    the same :func:`graceful_stop` block starts without one)."""
    _request["signal"] = None
    return TrainingStopped(message, signal=signum, **facts)


@contextlib.contextmanager
def checkpointed_loop(distributed: bool = False):
    """Around a training loop that checks :func:`requested` after every step (and saves before it
    stops): while one runs, a signal is a request, not an immediate stop.  A request that arrives
    after the loop's last check (its last step, or its final save) stops the fit as it leaves:
    the checkpoint then holds the finished run, and running the fit again completes it.  Not in a
    data-parallel job: there rank 0's request decides at each step, and one rank leaving on its
    own would leave the others waiting in the fit's next collective."""
    _request["loops"] += 1
    try:
        yield
    finally:
        _request["loops"] -= 1
    pending = _request["signal"]
    if distributed and _request["loops"] == 0:
        _request["signal"] = None  # this rank's own request, which rank 0's did not join: not the next fit's
        return
    if pending is not None and _request["loops"] == 0:
        raise stopped(pending, f"stopped by {name(pending)} after the fit's last checkpoint; run the same fit "
                               f"again (same checkpoint_dir) to finish it.")


def _on_signal(signum, frame):
    if _request["loops"] > 0 and _request["signal"] is None:
        _request["signal"] = signum  # the loop saves after this step, then raises
        return
    # No checkpointed loop to stop cleanly, or a second signal while one finishes its step.
    raise stopped(signum, f"stopped by {name(signum)}" + (
        " (a second time, before the step ended: no checkpoint was written for this stop)"
        if _request["signal"] is not None else ""))


@contextlib.contextmanager
def graceful_stop(signals=("SIGTERM",)):
    """Within this block, end checkpointed fits cleanly on ``signals``.

    A ``fit`` or ``fit_stream`` with ``checkpoint_dir`` that is training when one of ``signals``
    arrives finishes its current optimiser step, writes its checkpoint and raises
    :class:`~sklearn_jsae.exceptions.TrainingStopped` (a ``KeyboardInterrupt``, so code that
    cleans up after Ctrl-C cleans up after it too; the estimator keeps the state it had before
    the fit).  Running the same fit again resumes from
    that step.  Anywhere else in the block the signal raises ``TrainingStopped`` at once, and so
    does a second signal while a fit finishes its step.  In a data-parallel job rank 0's signal
    decides, and every rank stops after the same step.  ``python -m sklearn_jsae train`` runs
    inside this block for SIGTERM.

    Parameters
    ----------
    signals : sequence of str or int, default=("SIGTERM",)
        The signals to handle (names such as ``"SIGTERM"``, ``"SIGUSR1"``, or numbers).  Their
        previous handlers are put back when the block ends.

    Examples
    --------
    Outside a fit the signal stops the block at once (in a fit with ``checkpoint_dir``, after the
    step and its checkpoint: :doc:`/long_runs`):

    >>> import os, signal, time
    >>> from sklearn_jsae import graceful_stop
    >>> from sklearn_jsae.exceptions import TrainingStopped
    >>> try:
    ...     with graceful_stop():
    ...         os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends at the time limit
    ...         time.sleep(10)
    ... except TrainingStopped as stop:
    ...     print(stop.signal == signal.SIGTERM, stop.step)
    True None
    >>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the block put the handler back
    True
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("graceful_stop() installs signal handlers, which only the main thread can do; "
                         "enter it in the main thread (a fit in another thread is stopped from there too).")
    numbers = []
    for s in signals:
        try:
            numbers.append(int(getattr(signal_module, s)) if isinstance(s, str) else int(s))
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"graceful_stop(signals=...) got {s!r}, which is not a signal of this platform; "
                             f"give names such as 'SIGTERM' or signal numbers.") from None
    previous = {}
    try:
        for signum in numbers:
            previous[signum] = signal_module.signal(signum, _on_signal)
        yield
    finally:
        for signum, handler in previous.items():
            signal_module.signal(signum, handler)
        _request["signal"] = None

"""``python -m sklearn_jsae``: train a JSAE and a traditional SAE pair on the bundled real MLP and
compare them (see :mod:`sklearn_jsae._main_job`; ``python -m sklearn_jsae --help``).

``python -m sklearn_jsae evaluate [...]`` runs the paper-style evaluation instead
(see ``python -m sklearn_jsae evaluate --help``), and ``python -m sklearn_jsae train [...]`` a long,
resumable run streamed from a model (see ``python -m sklearn_jsae train --help``).

Output piped into a reader that stops early (``| head``) ends the command quietly with status 1
(Python's own recipe for a closed pipe); Ctrl-C ends it with one line on stderr (``train``'s
line says how to resume), by SIGINT as Python's default does (status 130 in a shell); SIGTERM
ends every command the same way, by SIGTERM (``train`` after writing a checkpoint), with its
temporary files removed.  A full disk (or quota, or a file system gone read-only) ends a command
with the one line that says which file could not be written and what was kept, and status 1.
"""

from __future__ import annotations

import difflib
import os
import sys

COMMANDS = ("evaluate", "train")


def _stopping_on_sigterm():
    """Around ``evaluate`` and the main job: a SIGTERM (``kill``, a scheduler's time limit) raises
    :class:`~sklearn_jsae.exceptions.TrainingStopped` as Ctrl-C raises ``KeyboardInterrupt``, so
    that the command's temporary cache is removed (Python's default ended the process with the
    folder left behind, 45 MB for ``evaluate``) and it ends by SIGTERM.  ``train`` has its own
    (:func:`~sklearn_jsae.graceful_stop`, which saves a checkpoint first).  No handler from a
    thread other than the main one (an in-process ``main()``): only that one can install it."""
    import contextlib
    import threading

    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    from ._backend.stop import graceful_stop

    return graceful_stop()


def _dispatch(argv):
    if argv and argv[0] == "evaluate":
        from ._evaluate import main as evaluate

        with _stopping_on_sigterm():
            return evaluate(argv[1:])
    if argv and argv[0] == "train":
        from ._cli_train import main as train

        return train(argv[1:])
    if argv and not argv[0].startswith("-"):
        # The main job takes no positional argument: a bare word first is a command, mistyped
        # (argparse alone would answer "unrecognized arguments", naming no command).
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"python -m sklearn_jsae: error: unknown command {argv[0]!r}; {hint}the commands are "
              f"{' and '.join(COMMANDS)} (none: the main job; python -m sklearn_jsae --help)", file=sys.stderr)
        return 2
    from ._main_job import main as main_job

    with _stopping_on_sigterm():
        return main_job(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            return _dispatch(argv)
        finally:
            # Flushed here, inside the try: a reader that closed the pipe (| head) otherwise
            # raises at the interpreter's exit, past any handler ("Exception ignored ...").
            sys.stdout.flush()
    except BrokenPipeError:
        # Python's recipe (the signal module's docs, "Note on SIGPIPE"): point stdout at devnull
        # so that the exit's own flush does not raise again, and exit 1.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # in-process, stdout captured: nothing to redirect
            pass
        return 1
    except KeyboardInterrupt as interrupt:
        # One line (train's says how to resume), then the interrupt goes on: a caller's loop of
        # in-process main() calls (a notebook) must stop, not run the next one.
        print(f"\n{str(interrupt) or 'interrupted'}", file=sys.stderr)
        raise


# Errors of the disk a command writes to, not of the command: said in one line, as a usage error is.
_DISK_FULL = ("ENOSPC", "EDQUOT", "EROFS")


def _run_as_program(argv=None):
    """``python -m sklearn_jsae``: on Ctrl-C the one line above instead of a traceback, then the
    process ends by SIGINT, as Python's default does, so that a shell loop over commands stops
    (an exit with status 130 would not stop it); on a SIGTERM that stopped ``train`` cleanly, by
    SIGTERM.  A full disk ends it with status 1 and the error's line alone (a traceback after
    hours of ``train`` buried the line saying that its last checkpoint was kept)."""
    import errno

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        sys.exit(main(argv))
    except OSError as exc:
        if exc.errno not in {getattr(errno, name) for name in _DISK_FULL if hasattr(errno, name)}:
            raise
        command = f"python -m sklearn_jsae{' ' + argv[0] if argv and argv[0] in COMMANDS else ''}"
        where = f": {exc.filename!r}" if exc.filename else ""  # (write_failed's names it in its text)
        print(f"{command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        import signal

        # A TrainingStopped (train's SIGTERM) ends by its own signal, as a process without a
        # handler would: a scheduler, or torchrun's agent, sees the exit it expects.
        signum = getattr(interrupt, "signal", None) or getattr(signal, "SIGINT", None)
        if signum is not None and os.name == "posix":
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        sys.exit(128 + int(signum or 2))


if __name__ == "__main__":
    _run_as_program()

"""Run a loop over chunks of a batch, on the CPU spread over threads without per-op barriers.

The fused kernels (:mod:`.jacobian`, :mod:`.sae`) walk a batch a few samples at a
time so that their intermediates stay in cache.  Each chunk is a handful of small
torch ops; letting every one of them fork and join torch's intra-op thread pool costs
a barrier per op, and when the machine is busier than it has cores a barrier waits
for a descheduled thread's next time slice (measured here: a 2-thread step 20× slower
than the 1-thread one under load).  So on the CPU the chunks are dealt round-robin
to as many Python threads as the calling thread's ``torch.get_num_threads()``; they
run single-threaded torch ops (torch releases the GIL inside ops), each with its own
buffers and accumulators, joined once at the end.  The deal is static, so results do
not depend on timing.  Elsewhere (CUDA) the chunks run in order on the calling thread.

Several calls may run at once (``GridSearchCV(n_jobs=2)`` under joblib's threading
backend).  torch (OpenMP build) keeps the thread count per OS thread: a thread's first
torch call copies a process-wide value, and ``torch.set_num_threads`` sets both the
calling thread's count and that process-wide value.  So no call touches its caller's
count: each worker sets its own to 1 before its first chunk, where another call's
restore cannot reach it.  Those sets also write 1 process-wide; the calling thread puts
the value its first worker copied back once all its workers have set theirs, before any
chunk runs.  A module lock covers that start-up and each call's read of its caller's
count, so no call sizes itself by, or restores, another call's passing 1.  Only a thread
outside ``run_chunks`` whose very first torch call falls inside a start-up can still
copy the 1.
"""

from __future__ import annotations

import os
import threading

import torch


# Held while a call reads its caller's thread count and while its workers start, the only
# time the process-wide count is 1 (see the module docstring).
_THREAD_COUNT_LOCK = threading.Lock()


def worker_state_budget() -> int:
    """Bytes all workers' states of one call may hold together: an eighth of the machine's memory
    (at least 1 GiB).  A backward pass's state is a full-size gradient accumulator (the Jacobian
    penalty's is |U|·(r + 1)·d_mlp floats: 1.9 GB at 65,536 latents and d_mlp = 4,096), so one
    per thread would need 30 GB on 16 threads; past the budget fewer workers run."""
    return max(1 << 30, physical_memory() // 8)


def physical_memory() -> int:
    """The machine's memory in bytes; 16 GiB where the system does not say (not POSIX)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 16 << 30


def run_chunks(batch: int, chunk: int, make_state, work, device, state_bytes: int = 0) -> list:
    """Call ``work(state, start, stop)`` for every chunk ``[start, stop)`` of ``range(batch)``.

    Safe to call from several threads at once.  After the call, the calling thread's torch
    thread count and the process-wide one (what threads started later get) are what they
    were before it.

    Parameters
    ----------
    batch : number of samples.
    chunk : samples per chunk (>= 1).
    make_state : callable () -> state
        Fresh per-worker state (buffers, accumulators); called once per worker.
    work : callable (state, start, stop) -> None
        Runs with torch's grad mode of the calling thread and, on a worker thread, with
        torch's thread count at 1.
    device : torch.device of the tensors; threads are used on the CPU only.
    state_bytes : bytes one state holds; the workers are as many as the thread count allows and
        :func:`worker_state_budget` holds (at least one).  The number of workers, and so the
        order of the final reduction, then depends on the machine's memory as well as on the
        thread count, for states that large only.

    Returns
    -------
    states : list of the workers' states in a fixed order (worker i handled chunks
        i, i + W, i + 2W, ...), for the caller to reduce in that order.

    Raises
    ------
    BaseException
        The first error a worker raised (in the order the workers stored them), once every
        worker has stopped.
    """
    starts = list(range(0, batch, chunk))
    workers = 1
    if torch.device(device).type == "cpu":
        with _THREAD_COUNT_LOCK:  # a thread's first read copies the process-wide count: not another call's 1
            threads = torch.get_num_threads()
        workers = max(1, min(threads, len(starts), worker_state_budget() // max(1, state_bytes)))
    if workers == 1:
        state = make_state()
        for start in starts:
            work(state, start, min(batch, start + chunk))
        return [state]
    states = [make_state() for _ in range(workers)]
    errors = []
    grad_mode = torch.is_grad_enabled()  # thread-local: carry the caller's into the workers
    ready = threading.Semaphore(0)
    go = threading.Event()  # set once the process-wide count is back: no work runs while it is 1
    cancelled = False
    copied = []  # the process-wide count, as worker 0 copied it (under the lock)

    def loop(i):
        try:
            try:
                # Read first: torch initialises a thread's count at its first parallel op
                # by copying the process-wide value, which would undo a set made before.
                copied.append(torch.get_num_threads())
                torch.set_num_threads(1)
            finally:
                ready.release()
            go.wait()
            if cancelled:
                return
            with torch.set_grad_enabled(grad_mode):
                for start in starts[i::workers]:
                    work(states[i], start, min(batch, start + chunk))
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the calling thread
            errors.append(exc)

    started = []
    try:
        with _THREAD_COUNT_LOCK:
            try:
                for i in range(workers):
                    thread = threading.Thread(target=loop, args=(i,), daemon=True)
                    thread.start()
                    started.append(thread)
                    ready.acquire()  # one worker at a time sets its count, so no two set it at once
            finally:
                if copied:
                    _restore_process_wide(copied[0], threads)
    except BaseException:
        cancelled = True  # a worker failed to start: the others leave without working
        raise
    finally:
        go.set()
        for thread in started:
            thread.join()
    if errors:
        raise errors[0]
    return states


def _restore_process_wide(value: int, own: int) -> None:
    """Set the process-wide thread count (the one new threads copy) back to ``value`` after the
    workers' ``set_num_threads(1)``, leaving the calling thread's own count at ``own``.

    ``torch.set_num_threads`` sets both; when they differ (this thread met torch before the
    user last changed the count elsewhere) a throw-away thread does the set.
    """
    if value == own:
        torch.set_num_threads(value)
        return
    thread = threading.Thread(target=torch.set_num_threads, args=(value,), daemon=True)
    thread.start()
    thread.join()


def gather_rows(source: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``source[indices]`` (``indices.shape + source.shape[1:]``) whose backward sums in a fixed order.

    source (n, ...), indices (...) int64 (repeats allowed).  The backward of advanced indexing is
    ``index_put_(accumulate=True)``, which on the CPU adds the rows of repeated indices on several
    threads in an order that varies from run to run (repeated fits with a callable MLP differed by
    up to 6e-8 on two threads); ``index_select``'s backward is ``index_add_``, a serial loop there.
    On CUDA it is the reverse (see :func:`add_rows_`): advanced indexing is kept.
    """
    if source.device.type != "cpu":
        return source[indices]
    return torch.index_select(source, 0, indices.reshape(-1)).view(*indices.shape, *source.shape[1:])


def add_rows_(dest: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dest[rows[i]] += src[i]`` for every i, in place, with a deterministic order of sums.

    dest (n, m), rows (R,) int64 (repeats allowed), src (R, m).  ``index_add_`` on the
    CPU (a serial loop); ``index_put_(accumulate=True)`` elsewhere, whose CUDA kernel
    sorts the rows instead of racing atomic adds.
    """
    if dest.device.type == "cpu":
        return dest.index_add_(0, rows, src)
    return dest.index_put_((rows,), src, accumulate=True)

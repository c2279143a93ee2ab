"""Run a loop over chunks of a batch, on the CPU spread over threads without per-op barriers.

The fused kernels (:mod:`.jacobian`, :mod:`.sae`) walk a batch a few samples at a
time so that their intermediates stay in cache.  Each chunk is a handful of small
torch ops; letting every one of them fork and join torch's intra-op thread pool costs
a barrier per op, and when the machine is busier than it has cores a barrier waits
for a descheduled thread's next time slice (measured here: a 2-thread step 20× slower
than the 1-thread one under load).  So on the CPU the chunks are dealt round-robin
to ``torch.get_num_threads()`` Python threads that run single-threaded torch ops
(torch releases the GIL inside ops), each with its own buffers and accumulators,
joined once at the end.  The deal is static, so results do not depend on timing.
Elsewhere (CUDA) the chunks run in order on the calling thread.
"""

from __future__ import annotations

import threading

import torch


def run_chunks(batch: int, chunk: int, make_state, work, device) -> list:
    """Call ``work(state, start, stop)`` for every chunk ``[start, stop)`` of ``range(batch)``.

    Parameters
    ----------
    batch : number of samples.
    chunk : samples per chunk (>= 1).
    make_state : callable () -> state
        Fresh per-worker state (buffers, accumulators); called once per worker.
    work : callable (state, start, stop) -> None
    device : torch.device of the tensors; threads are used on the CPU only.

    Returns
    -------
    states : list of the workers' states in a fixed order (worker i handled chunks
        i, i + W, i + 2W, ...), for the caller to reduce in that order.
    """
    starts = list(range(0, batch, chunk))
    workers = 1
    if torch.device(device).type == "cpu":
        workers = max(1, min(torch.get_num_threads(), len(starts)))
    if workers == 1:
        state = make_state()
        for start in starts:
            work(state, start, min(batch, start + chunk))
        return [state]
    states = [make_state() for _ in range(workers)]
    errors = []
    grad_mode = torch.is_grad_enabled()  # thread-local: carry the caller's into the workers

    def loop(i):
        try:
            with torch.set_grad_enabled(grad_mode):
                for start in starts[i::workers]:
                    work(states[i], start, min(batch, start + chunk))
        except BaseException as exc:  # noqa: BLE001 -- re-raised on the calling thread
            errors.append(exc)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # threads started now run their torch ops single-threaded
    try:
        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(previous)
    if errors:
        raise errors[0]
    return states


def add_rows_(dest: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dest[rows[i]] += src[i]`` for every i, in place, with a deterministic order of sums.

    dest (n, m), rows (R,) int64 (repeats allowed), src (R, m).  ``index_add_`` on the
    CPU (a serial loop); ``index_put_(accumulate=True)`` elsewhere, whose CUDA kernel
    sorts the rows instead of racing atomic adds.
    """
    if dest.device.type == "cpu":
        return dest.index_add_(0, rows, src)
    return dest.index_put_((rows,), src, accumulate=True)

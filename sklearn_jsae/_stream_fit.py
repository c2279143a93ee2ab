"""``JacobianSparseAutoencoder.fit_stream``: train on batches as they come, resumably.

Memory holds the rows read but not yet used (less than two batches), the last
``jacobian_rows`` rows (for ``jacobian_``) and whatever the stream itself buffers, never the
whole stream.  A checkpoint holds the trainer, the stream's own state (``stream.state_dict()``)
and those pending rows, taken at a moment when every row the stream has produced is either
trained on or pending: restoring both continues exactly where the run stopped.
"""

from __future__ import annotations

import numpy as np


class _Stream:
    """Rows from ``batches``, validated, re-cut into batches of exactly ``size`` rows."""

    def __init__(self, estimator, batches):
        self.estimator = estimator
        self.source = batches
        self.iterator = iter(batches)
        self.pending = []  # arrays read and not used yet, in order
        self.n_pending = 0
        self.exhausted = False

    def read(self, reset=False) -> bool:
        """Read one more chunk into ``pending``; False when the stream is exhausted."""
        from ._topk import _validate_X

        try:
            chunk = next(self.iterator)
        except StopIteration:
            self.exhausted = True
            return False
        chunk = _validate_X(self.estimator, chunk, reset=reset)
        self.pending.append(np.asarray(chunk, dtype=np.float32))
        self.n_pending += chunk.shape[0]
        return True

    def take(self, size: int) -> np.ndarray | None:
        """The next ``size`` rows (fewer at the end of the stream), None when nothing is left."""
        while self.n_pending < size and not self.exhausted:
            self.read()
        if self.n_pending == 0:
            return None
        rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        batch, rest = rows[:size], rows[size:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)
        return batch

    def pending_rows(self, d: int) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros((0, d), dtype=np.float32)

    def state(self):
        """``(json_state, arrays)`` of the source (its ``state_dict()``), for a checkpoint."""
        state_dict = getattr(self.source, "state_dict", None)
        if state_dict is None:
            return None, {}
        state = state_dict()
        arrays = {name: value for name, value in state.items() if isinstance(value, np.ndarray)}
        return {name: value for name, value in state.items() if name not in arrays}, arrays


def fit_stream(estimator, batches, n_statistics: int, jacobian_rows: int):
    """The body of :meth:`JacobianSparseAutoencoder.fit_stream` (see there)."""
    from ._backend.checkpoint import CheckpointError
    from ._backend.train import progress_bar
    from ._incremental import make_checkpointer, start_trainer, total_steps, train_rows
    from ._topk import _training_precision

    estimator._validate_params()
    for name, value in (("n_statistics", n_statistics), ("jacobian_rows", jacobian_rows)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    stream = _Stream(estimator, batches)
    n_tokens = estimator.n_tokens
    n_steps = total_steps(n_tokens, estimator.batch_size)

    # The first rows: they fix the data scales and probe the MLP, and are trained on after.
    while stream.n_pending < n_statistics and stream.read(reset=stream.n_pending == 0):
        pass
    if stream.n_pending == 0:
        raise ValueError("batches is empty: fit_stream needs at least one row.")
    first = stream.pending_rows(0)[:n_statistics]
    config, mlp_copy, mlp_map, d_out, probe_rows = estimator._prepare(first)
    trainer = start_trainer(config, first, mlp_map, None, n_steps)
    data_identity = f"stream:{type(batches).__name__}:{getattr(batches, 'identity', lambda: '')()}"
    checkpoint = make_checkpointer(estimator, data_identity, mlp_map, config, None, "stream")
    used = 0
    tail = np.zeros((0, first.shape[1]), dtype=np.float32)
    if checkpoint is not None:
        restored = _restore(checkpoint, trainer, stream, batches, first.shape[1])
        if restored is not None:
            used, tail = restored
    record_every = max(1, (n_steps or 10_000) // 100)
    bar = progress_bar(n_steps, trainer.step_count, bool(estimator.verbose))
    try:
        with _training_precision(config):
            while n_tokens is None or used < n_tokens:
                size = config.batch_size if n_tokens is None else min(config.batch_size, n_tokens - used)
                batch = stream.take(size)
                if batch is None:
                    break
                train_rows(trainer, batch, bar, offset=used)
                used += batch.shape[0]
                tail = np.concatenate([tail, batch])[-jacobian_rows:]
                if trainer.step_count % record_every == 0:
                    trainer.close_record(tokens_seen=used)
                if checkpoint is not None and checkpoint.due(trainer.step_count):
                    _save(checkpoint, trainer, stream, used, tail, first.shape[1])
    finally:
        if bar is not None:
            bar.close()
    if trainer.record_rows:
        trainer.close_record(tokens_seen=used)
    if checkpoint is not None:
        _save(checkpoint, trainer, stream, used, tail, first.shape[1])
    if used == 0:
        raise CheckpointError("the checkpoint is already at the end of this stream: nothing left to train.") \
            if checkpoint is not None else ValueError("batches produced no rows to train on.")
    if n_tokens is not None and used < n_tokens:
        import warnings

        warnings.warn(f"the stream ended after {used} tokens, before n_tokens={n_tokens}; the schedule "
                      f"did not finish its decay.", UserWarning, stacklevel=3)
    estimator._trainer = None
    estimator._set_fitted(trainer.result(), mlp_copy, mlp_map, probe_rows, config.device, d_out, tail,
                          previous=[])
    return estimator


def _save(checkpoint, trainer, stream, used, tail, d):
    import torch

    state, arrays = stream.state()
    extra = {f"stream.{name}": torch.from_numpy(np.ascontiguousarray(value)) for name, value in arrays.items()}
    extra["pending"] = torch.from_numpy(np.ascontiguousarray(stream.pending_rows(d)))
    extra["tail"] = torch.from_numpy(np.ascontiguousarray(tail))
    checkpoint.save(trainer, dict(used=used, stream=state, exhausted=stream.exhausted), extra)


def _restore(checkpoint, trainer, stream, batches, d):
    """Load the checkpoint into ``trainer`` and ``batches``; ``(used, tail)`` or None."""
    from ._backend.checkpoint import CheckpointError

    restored = checkpoint.restore(trainer)
    if restored is None:
        return None
    position, extra = restored
    if position.get("stream") is None or not hasattr(batches, "load_state_dict"):
        raise CheckpointError(
            f"checkpoint_dir={checkpoint.folder!r} holds a stream checkpoint, but this stream "
            f"({type(batches).__name__}) has no state_dict/load_state_dict to resume from: pass an "
            f"ActivationStream, or remove the checkpoint to start afresh."
        )
    arrays = {name[len("stream."):]: t.numpy() for name, t in extra.items() if name.startswith("stream.")}
    batches.load_state_dict({**position["stream"], **arrays})
    # The rows read before the checkpoint: the stream's own iterator restarts after them.
    stream.iterator = iter(batches)
    pending = extra["pending"].numpy()
    stream.pending = [pending] if len(pending) else []
    stream.n_pending = len(pending)
    stream.exhausted = bool(position.get("exhausted", False))
    return int(position["used"]), extra["tail"].numpy()

"""``fit_stream`` of both estimators: train on batches as they come, resumably.

Memory holds the rows read but not yet used (less than two batches), the last
``jacobian_rows`` rows (the pair's ``jacobian_``) and whatever the stream itself buffers, never
the whole stream.  A checkpoint holds the trainer, the stream's own state (``stream.state_dict()``)
and those pending rows, taken at a moment when every row the stream has produced is either
trained on or pending: restoring both continues exactly where the run stopped.

Data-parallel (``distributed=True``): every rank reads its own shard of the stream and, at each
step, takes its share of the global ``batch_size`` rows; the ranks exchange how many rows they
have (a rank whose shard ran dry trains a stand-in row with weight 0) and stop when none has any.
A checkpoint is rank 0's file (the trainer, every rank's stream position) and one file per rank
beside it with that rank's stream arrays and pending rows (each rank writes its own, so no rank
holds another's rows), so that all ranks resume from the same step.  Checkpoints of earlier
versions, with every rank's arrays under ``rank<r>.`` names in the one file, still resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

from ._backend import stop
from ._validation import MIN_STEPS
from ._warnings import warn


def _unpack(chunk, number: int):
    """A batch as given, or the one array inside a one-item tuple, list or dict: a torch
    ``DataLoader`` over ``TensorDataset(X)`` yields ``[x]``, a Hugging Face dataset's ``iter``
    ``{column: x}``."""
    if isinstance(chunk, Mapping):
        arrays = [key for key, value in chunk.items() if hasattr(value, "shape")]
        if len(arrays) == 1 and len(chunk) == 1:
            return chunk[arrays[0]]
        example = arrays[0] if arrays else "activations"
        raise ValueError(
            f"batch {number} of batches is a {type(chunk).__name__} with keys {sorted(map(str, chunk))[:8]}; "
            f"fit_stream trains on the MLP's inputs alone: yield that column, e.g. "
            f"(batch[{example!r}] for batch in dataset.iter(batch_size=4096))."
        )
    # A DataLoader's ``[x]`` or ``(x, y)`` starts with a batch (2-D); a list of 1-D arrays is rows, as fit reads it.
    if (isinstance(chunk, (tuple, list)) and chunk and all(hasattr(item, "shape") for item in chunk)
            and len(chunk[0].shape) >= 2):
        if len(chunk) == 1:
            return chunk[0]
        raise ValueError(
            f"batch {number} of batches is a {type(chunk).__name__} of {len(chunk)} arrays; fit_stream "
            f"trains on the MLP's inputs alone: yield one array per batch, e.g. (x for x, *_ in loader)."
        )
    return chunk


class _Stream:
    """Rows from ``batches``, validated, re-cut into batches of exactly ``size`` rows."""

    def __init__(self, estimator, batches):
        self.estimator = estimator
        self.source = batches
        try:
            self.iterator = iter(batches)
        except TypeError:
            raise TypeError(f"batches must be an iterable of 2-D arrays (n_rows, n_features), such as a list, a "
                            f"generator or sklearn_jsae.hf.ActivationStream; got {type(batches).__name__}.") from None
        self.pending = []  # arrays read and not used yet, in order
        self.n_pending = 0
        self.n_read = 0
        self.exhausted = False

    def read(self, reset=False) -> bool:
        """Read one more chunk into ``pending``; False when the stream is exhausted."""
        from ._topk import _validate_X

        try:
            chunk = next(self.iterator)
        except StopIteration:
            self.exhausted = True
            return False
        self.n_read += 1
        chunk = _unpack(chunk, self.n_read)
        shape = getattr(chunk, "shape", None)
        if shape is not None and len(shape) == 2 and shape[0] == 0:  # a filter that kept no rows
            width = getattr(self.estimator, "n_features_in_", None)
            if reset or width is None or shape[1] == width:
                return True  # nothing to train on; the next batch is read
            raise ValueError(f"batch {self.n_read} of batches: X has {shape[1]} features, but "
                             f"{type(self.estimator).__name__} is expecting {width} features as input.")
        try:
            chunk = _validate_X(self.estimator, chunk, reset=reset)
        except ValueError as exc:  # which batch: the stream may be long
            raise ValueError(f"batch {self.n_read} of batches: {exc}") from exc
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

    def resumable(self) -> bool:
        """Whether the source can be put back where it was: ``state_dict`` and ``load_state_dict``
        (a ``state_dict`` alone, as SAELens' ActivationsStore has, cannot be loaded back), and no
        ``resume_problem`` (an ActivationStream over a one-shot iterator of texts has one)."""
        return (all(callable(getattr(self.source, name, None)) for name in ("state_dict", "load_state_dict"))
                and not self.resume_problem())

    def resume_problem(self) -> str | None:
        problem = getattr(self.source, "resume_problem", None)
        return problem if isinstance(problem, str) else None

    def state(self):
        """``(json_state, arrays)`` of the source (its ``state_dict()``), for a checkpoint."""
        if not self.resumable():
            return None, {}
        state = self.source.state_dict()
        arrays = {name: value for name, value in state.items() if isinstance(value, np.ndarray)}
        return {name: value for name, value in state.items() if name not in arrays}, arrays


def fit_stream(estimator, batches, n_statistics: int, jacobian_rows: int | None = None):
    """The body of :meth:`JacobianSparseAutoencoder.fit_stream` and
    :meth:`TopKSparseAutoencoder.fit_stream` (see there).  The estimator's
    ``_prepare_stream(first, warm)`` gives ``(config, mlp_map, init, finish)``: the training config,
    the MLP (None for one SAE), the warm start's initial state (None: a fresh model) and
    ``finish(result, tail)``, which stores the fitted state; ``tail`` is the last ``jacobian_rows``
    rows (None: none are kept)."""
    from ._backend.checkpoint import CheckpointError
    from ._backend.train import check_resumed_together, progress_bar
    from ._incremental import (check_same_fit, join_job, make_checkpointer, start_trainer, total_steps,
                               train_rows)
    from ._topk import _training_precision

    estimator._validate_params()
    for name, value in (("n_statistics", n_statistics), ("jacobian_rows", jacobian_rows)):
        if name == "jacobian_rows" and value is None:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if n_statistics < 2:  # the scales are a spread: one row has none (scale 1, then a warning blaming X)
        raise ValueError(f"n_statistics={n_statistics}: the data scales are measured on the first n_statistics "
                         f"rows, and one row has no spread; pass at least 2 (the default, 16384, measures them "
                         f"well).")
    stream = _Stream(estimator, batches)
    # A warm start keeps the fitted model's features: the first batch is checked against them.
    warm = estimator.warm_start and estimator.__sklearn_is_fitted__()
    n_tokens = estimator.n_tokens
    n_steps = total_steps(n_tokens, estimator.batch_size)
    if n_steps is not None and n_steps < MIN_STEPS:  # as fit warns: a stream's length is its n_tokens
        from sklearn.exceptions import ConvergenceWarning

        warn(
            f"this fit runs only {n_steps} optimiser steps (n_tokens={n_tokens}, batch_size="
            f"{estimator.batch_size}); below {MIN_STEPS} steps the SAEs are usually far from converged (score "
            f"well below its plateau). Use batch_size<={max(1, n_tokens // MIN_STEPS)} or stream more tokens.",
            ConvergenceWarning)

    # The first rows: they fix the data scales and probe the MLP, and are trained on after.
    while stream.n_pending < n_statistics and stream.read(reset=not warm and stream.n_pending == 0):
        pass
    if stream.n_pending == 0 and getattr(estimator, "distributed", False):
        # This rank's shard is empty (fewer batches than ranks): it joins the job all the same, so
        # that every rank raises the one error below at once, instead of the others waiting at the
        # join for the process group's timeout.  It has no rows to build the fit's config from; the
        # job needs only the device and the seed's broadcast (join_job).
        from ._topk import _training_device

        parallel, _ = join_job(estimator, estimator._train_config(_training_device(estimator)))
        _check_no_empty_shard(parallel, 0)
    if stream.n_pending == 0:
        raise ValueError("batches is empty: fit_stream needs at least one row.")
    first = stream.pending_rows(0)[:n_statistics]
    config, mlp_map, init, finish = estimator._prepare_stream(first, warm)
    parallel, config = join_job(estimator, config)
    if parallel is not None:
        _check_no_empty_shard(parallel, stream.n_pending)
    identity = getattr(batches, "identity", None)  # a method; any other attribute of that name is not one
    data_identity = f"stream:{type(batches).__name__}:{identity() if callable(identity) else ''}"
    # A resumable stream without identity() is known by its first rows, which a restarted run of
    # the same stream reads again (its position is only restored after them): a checkpoint of
    # another dataset is refused.  Data-parallel: every rank's first rows, in rank order.
    by_first_rows = stream.resumable() and not callable(identity)
    first_rows = _first_rows_identity(first, parallel, by_first_rows)
    if by_first_rows:
        data_identity += f":first={first_rows}"
    if parallel is not None:
        _check_shard(batches, parallel)
        check_same_fit(parallel, data_identity, mlp_map, config, estimator, init=init, kind="stream")
    trainer = start_trainer(config, first, mlp_map, init, n_steps, parallel,
                            rows_are=f"the stream's first {len(first)} rows (n_statistics={n_statistics}) set the "
                                     f"data scales for the whole run")
    checkpoint = make_checkpointer(estimator, data_identity, mlp_map, config, init, "stream", parallel)
    used = 0
    tail = _LastRows(jacobian_rows or 0, first.shape[1])
    if checkpoint is not None:
        restored = _restore_together(checkpoint, trainer, stream, batches, first.shape[1], parallel)
        if restored is not None:
            used, rows = restored
            tail.add(rows)
        elif not stream.resumable():  # say so now, not when a killed run is restarted
            why = stream.resume_problem() or (
                f"this stream ({type(batches).__name__}) has no state_dict/load_state_dict")
            fix = ("" if stream.resume_problem() else " Stream with sklearn_jsae.hf.ActivationStream, or any "
                   "iterable with those two methods, to resume.")
            warn(f"checkpoint_dir is set, but {why}: checkpoints are written, but a killed run cannot "
                 f"resume from them.{fix}")
        if parallel is not None:
            check_resumed_together(parallel, trainer, checkpoint)
    record_every = max(1, (n_steps or 10_000) // 100)
    bar = progress_bar(n_steps, trainer.step_count,
                       bool(estimator.verbose) and (parallel is None or parallel.is_main))
    # With a checkpoint, a stop request (graceful_stop: SIGTERM) ends the fit after a step and its save.
    with stop.checkpointed_loop(parallel is not None) if checkpoint is not None \
            else contextlib.nullcontext():
        try:
            with _training_precision(config):
                while n_tokens is None or used < n_tokens:
                    size = config.batch_size if n_tokens is None else min(config.batch_size, n_tokens - used)
                    if parallel is None:
                        batch = stream.take(size)
                        if batch is None:
                            break
                        train_rows(trainer, batch, bar, offset=used)
                        used += batch.shape[0]
                    else:
                        lo, hi = parallel.split(size)
                        batch = stream.take(hi - lo) if hi > lo else None
                        n_real = 0 if batch is None else batch.shape[0]
                        n_global = sum(parallel.gather_counts(n_real, "counting the ranks' rows"))
                        if n_global == 0:
                            break
                        # A rank without rows trains a stand-in row with weight 0 (same collectives).
                        train_rows(trainer, batch if n_real else first[:1], bar, offset=used,
                                   share=(n_real, n_global))
                        used += n_global
                    if batch is not None:
                        tail.add(batch)
                    if trainer.step_count % record_every == 0:
                        trainer.close_record(tokens_seen=used)
                    if checkpoint is not None and checkpoint.due(trainer.step_count):
                        _save(checkpoint, trainer, stream, used, tail.rows(), first.shape[1], parallel)
                        checkpoint.stop_if_requested()
        finally:
            if bar is not None:
                bar.close()
        if trainer.record_rows:
            trainer.close_record(tokens_seen=used)
        if checkpoint is not None:
            _save(checkpoint, trainer, stream, used, tail.rows(), first.shape[1], parallel)
    if used == 0:
        raise CheckpointError("the checkpoint is already at the end of this stream: nothing left to train.") \
            if checkpoint is not None else ValueError("batches produced no rows to train on.")
    if n_tokens is not None and used < n_tokens:
        warn(f"the stream ended after {used} tokens, before n_tokens={n_tokens}; the schedule "
             f"did not finish its decay.")
    estimator._trainer = None
    finish(trainer.result(), tail.rows())
    return estimator


class _LastRows:
    """The last ``size`` rows added, in order (for ``jacobian_``).

    Concatenating each batch onto them and slicing copied all of them at every step: 50 ms per
    step for 65,536 rows of d = 1,024, an hour over the paper's 73,000 steps.  Here the batches are
    kept as they come, and a leading batch is dropped once the others hold ``size`` rows without
    it: memory is ``size`` rows plus a batch (only what the stream gave: a ``jacobian_rows`` far
    beyond the stream's length allocates nothing), and only :meth:`rows` concatenates."""

    def __init__(self, size: int, d: int):
        from collections import deque

        self.size, self.d = size, d
        self.parts, self.n = deque(), 0

    def add(self, rows: np.ndarray) -> None:
        if self.size == 0 or len(rows) == 0:
            return
        self.parts.append(np.array(rows[-self.size:], dtype=np.float32))
        self.n += len(self.parts[-1])
        while self.n - len(self.parts[0]) >= self.size:
            self.n -= len(self.parts.popleft())

    def rows(self) -> np.ndarray:
        """A copy of the last ``size`` rows, oldest first."""
        if not self.parts:
            return np.zeros((0, self.d), dtype=np.float32)
        first = self.parts[0][max(0, self.n - self.size):]  # a view: the first part's rows still wanted
        return np.concatenate([first, *list(self.parts)[1:]])


def _check_no_empty_shard(parallel, n_rows: int) -> None:
    """Raise on every rank when some rank's shard of the stream yielded no rows (``n_rows``: this
    rank's first rows), naming those ranks and the fix.  A 1-rank job's empty stream is the
    one-process error ("batches is empty"): there are no fewer ranks to start."""
    if parallel.world_size == 1:
        return
    counts = parallel.gather_counts(n_rows, "counting the ranks' first rows")
    empty = [rank for rank, count in enumerate(counts) if count == 0]
    if empty:
        shards = (f"shard of rank {empty[0]}" if len(empty) == 1 else
                  f"shards of ranks {', '.join(map(str, empty))}")
        raise ValueError(
            f"distributed=True: the stream {shards} of {parallel.world_size} yielded no rows (batches is "
            f"empty there): the stream has fewer batches than the job has ranks. Start fewer ranks "
            f"(torchrun --nproc-per-node), or stream more data (more sequences, texts or chunks) so "
            f"that every rank's shard gets at least one batch."
        )


def _first_rows_identity(first, parallel, needed: bool) -> str:
    """The fingerprint of the stream's first rows (when ``needed``: a hash of up to
    ``n_statistics`` rows); data-parallel, every rank's (each reads its own shard), in rank order,
    the same string on every rank.  A job of several ranks gathers them whether or not this rank
    needs them, so that every rank makes the same collectives (ranks whose streams differ in
    kind are refused by the data identity after it)."""
    from ._backend.checkpoint import fingerprint_array

    digest = fingerprint_array(first) if needed else "0" * 32
    if parallel is None or parallel.world_size == 1:  # a 1-rank job is the one-process fit, checkpoint included
        return digest
    return ",".join(parallel.gather_digests(digest, "gathering the ranks' first-rows fingerprints"))


def _check_shard(batches, parallel) -> None:
    """Refuse a stream that says it is another rank's shard (``rank`` / ``world_size`` attributes,
    as :class:`~sklearn_jsae.hf.ActivationStream` has); other iterables are the caller's to shard.

    Every rank raises the same error: the ranks' shard attributes are gathered first.  A rank that
    raised alone (every rank given rank 0's shard: rank 0 passes) left the others waiting in the
    next collective for the process group's timeout, 10 minutes by default, before an error that
    did not say why."""
    def attribute(name):
        value = getattr(batches, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1

    given = (attribute("rank"), attribute("world_size")) if getattr(batches, "world_size", None) is not None \
        else (parallel.rank, parallel.world_size)  # nothing to check: counts as right
    if parallel.world_size == 1:
        ranks, sizes = [given[0]], [given[1]]
    else:
        ranks = parallel.gather_counts(given[0], "comparing the ranks' stream shards")
        sizes = parallel.gather_counts(given[1], "comparing the ranks' stream shards")
    wrong = [(r, ranks[r], sizes[r]) for r in range(parallel.world_size)
             if (ranks[r], sizes[r]) != (r, parallel.world_size)]
    if wrong:
        shown = lambda v: "?" if v < 0 else v  # noqa: E731 -- an attribute that is not a rank number
        told = "; ".join(f"rank {r} of {parallel.world_size} was given the stream shard rank={shown(rank)}, "
                         f"world_size={shown(size)}" for r, rank, size in wrong)
        raise ValueError(
            f"distributed=True: {told}; give each rank its own shard, e.g. "
            f"ActivationStream(..., rank=torch.distributed.get_rank(), "
            f"world_size=torch.distributed.get_world_size())."
        )


def _save(checkpoint, trainer, stream, used, tail, d, parallel=None):
    import secrets

    import torch

    state, arrays = stream.state()
    extra = {f"stream.{name}": np.ascontiguousarray(value) for name, value in arrays.items()}
    extra["pending"] = np.ascontiguousarray(stream.pending_rows(d))
    extra["tail"] = np.ascontiguousarray(tail)
    extra = {name: torch.from_numpy(value) for name, value in extra.items()}
    position = dict(used=used, stream=state, exhausted=stream.exhausted)
    if parallel is None or parallel.world_size == 1:  # a 1-rank job's is the one-process fit's file
        checkpoint.save(trainer, position, extra)
        return
    # Each rank writes its own arrays to a file of its own, named by rank 0's token for this save;
    # rank 0 gathers only the ranks' JSON positions and the files' names and digests.
    token = parallel.broadcast_int(secrets.randbits(60) if parallel.is_main else 0,
                                   "agreeing on the name of this checkpoint's rank files")
    shard = _save_shard_together(checkpoint, parallel, token, extra)
    gathered = parallel.gather_object(dict(position, shard=shard), "gathering the ranks' stream positions")
    # On every rank: rank 0 writes, and every rank learns whether it could (Checkpointer.save).
    checkpoint.save(trainer, dict(used=used, ranks=gathered) if parallel.is_main else None)


def _save_shard_together(checkpoint, parallel, token: int, extra: dict) -> dict:
    """This rank's :meth:`~sklearn_jsae._backend.checkpoint.Checkpointer.save_shard`, whose failure
    (a full disk) every rank raises: the rank that failed its own error, the others an error naming
    it.  A failure raised on that rank alone left the others waiting in the next collective for the
    process group's timeout (600 s by default) before an error that did not say why.  The rank files
    this save did write are removed: no checkpoint names them."""
    from ._backend.checkpoint import failure_number, peer_write_failed

    try:
        shard, failure = checkpoint.save_shard(parallel.rank, token, extra), None
    except Exception as exc:  # noqa: BLE001 -- raised below, on this rank, once every rank knows
        shard, failure = None, exc
    numbers = parallel.gather_counts(failure_number(failure), "agreeing on the ranks' checkpoint writes")
    failed = [rank for rank, number in enumerate(numbers) if number]
    if not failed:
        return shard
    if shard is not None:
        checkpoint.discard_shard(shard)
    if failure is not None:
        raise failure
    raise peer_write_failed(numbers[failed[0]], f"rank(s) {', '.join(map(str, failed))} of {parallel.world_size} "
                                                f"could not write their part of the checkpoint", checkpoint.folder)


def _restore_together(checkpoint, trainer, stream, batches, d, parallel):
    """:func:`_restore` on every rank, whose refusal (:class:`CheckpointError`) every rank raises.

    Each rank reads its own rank file: one missing or damaged on one rank raised there alone,
    and the other ranks waited in the next collective for the process group's timeout (600 s by
    default) before an error that did not say why."""
    from ._backend.checkpoint import CheckpointError

    if parallel is None or parallel.world_size == 1:
        return _restore(checkpoint, trainer, stream, batches, d, parallel)
    try:
        restored, refusal = _restore(checkpoint, trainer, stream, batches, d, parallel), None
    except CheckpointError as exc:
        restored, refusal = None, exc
    flags = parallel.gather_counts(int(refusal is not None), "agreeing on the ranks' resume")
    refused = [rank for rank, flag in enumerate(flags) if flag]
    if refusal is not None:
        raise refusal
    if refused:
        raise CheckpointError(
            f"rank(s) {', '.join(map(str, refused))} of this job cannot resume from the checkpoint in "
            f"checkpoint_dir={checkpoint.folder!r} (their error names the file and what is wrong), so no "
            f"rank trains; this rank, {parallel.rank}, read its part.")
    return restored


def _restore(checkpoint, trainer, stream, batches, d, parallel=None):
    """Load the checkpoint into ``trainer`` and ``batches``; ``(used, tail)`` or None."""
    from ._backend.checkpoint import CheckpointError

    restored = checkpoint.restore(trainer)
    if restored is None:
        return None
    position, extra = _checked_position(checkpoint, *restored, d, parallel)
    problem = getattr(batches, "resume_problem", None)
    if isinstance(problem, str):
        raise CheckpointError(f"checkpoint_dir={checkpoint.folder!r} holds a stream checkpoint, but {problem}; "
                              f"remove the checkpoint to start afresh.")
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
    stream.exhausted = position.get("exhausted", False)
    return position["used"], extra["tail"].numpy()


def _checked_position(checkpoint, position, extra, d, parallel):
    """This rank's ``(position, extra tensors)`` of a stream checkpoint, checked: a header or tensors
    that are not this fit's (a foreign writer's, or a version-1 file, without a digest, damaged on
    disk) are refused by name, not met later as a bare KeyError or a concatenation of rows of
    another width."""
    import torch

    from ._backend.checkpoint import damaged

    path = checkpoint.resumed_from
    if "ranks" in position:  # a data-parallel checkpoint (the identity's world_size matched)
        rank = 0 if parallel is None else parallel.rank  # a 1-rank job's, read by one process
        ranks = position["ranks"]
        if not isinstance(ranks, list) or rank >= len(ranks) or not isinstance(ranks[rank], dict):
            raise damaged(path, f"its position holds no stream position for rank {rank}")
        position = ranks[rank]
        if "shard" in position:  # version 3: this rank's arrays are a file of their own
            extra = checkpoint.read_shard(rank, position["shard"])
        else:  # version 2: every rank's arrays in the one file, under rank<r>. names
            prefix = f"rank{rank}."
            extra = {name[len(prefix):]: t for name, t in extra.items() if name.startswith(prefix)}
    used = position.get("used")
    if isinstance(used, bool) or not isinstance(used, int) or used < 0:
        raise damaged(path, f"its position has used={used!r}, not a number of rows")
    if not isinstance(position.get("stream"), (dict, type(None))):
        raise damaged(path, f"its stream state is a {type(position['stream']).__name__}, not a JSON object")
    if not isinstance(position.get("exhausted", False), bool):
        raise damaged(path, f"its position has exhausted={position['exhausted']!r}, not true or false")
    for name in ("pending", "tail"):  # rows of this fit's width, finite: they are trained on, or make jacobian_
        t = extra.get(name)
        if t is None or t.dtype != torch.float32 or t.ndim != 2 or t.shape[1] != d:
            raise damaged(path, f"its {'rows read but not yet used' if name == 'pending' else 'last rows'} "
                                f"(extra.{name}) are " + ("missing" if t is None else
                                                          f"{t.dtype} of shape {tuple(t.shape)}")
                                + f", not float32 rows of this stream's {d} features")
        if not bool(torch.isfinite(t).all()):
            raise damaged(path, f"its extra.{name} rows hold NaN or inf")
    return position, extra

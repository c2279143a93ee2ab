"""A data-parallel stream checkpoint's rank files (format version 3): each rank writes its stream
arrays and pending rows to a file of its own beside rank 0's checkpoint, which names every rank's
file with its digest.  Rank 0 used to gather every rank's shuffle buffer into its one file
(``world_size · buffer_size · d · 4`` bytes of its memory, pickled through the process group).

The files are written and read here through the real :class:`Checkpointer` and the stream fit's
own ``_checked_position``; ``tests/test_distributed.py`` runs them in 2-rank torchrun jobs that are
killed and resumed to the uninterrupted model.
"""

import os
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae._backend import checkpoint as checkpoint_module
from sklearn_jsae._backend.checkpoint import CheckpointError, Checkpointer
from sklearn_jsae._stream_fit import _checked_position

D = 6
IDENTITY = dict(kind="stream", data="rows", world_size=2)


def _trainer():
    from sklearn_jsae._backend.train import TrainConfig
    from sklearn_jsae._incremental import start_trainer

    X = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32)
    return start_trainer(TrainConfig(n_components=8, n_output_components=None, k=2), X, None)


def _rank_arrays(rank, pending_rows=3, seed=0):
    rng = np.random.default_rng([seed, rank])
    return {"stream.buffer": torch.from_numpy(rng.normal(size=(5, D)).astype(np.float32)),
            "pending": torch.from_numpy(rng.normal(size=(pending_rows, D)).astype(np.float32)),
            "tail": torch.from_numpy(rng.normal(size=(2, D)).astype(np.float32))}


def _save(checkpointer, trainer, token, arrays):
    """What ``_stream_fit._save`` does on each rank and then on rank 0, in one process."""
    ranks = [dict(used=0, stream={"next": rank}, exhausted=False,
                  shard=checkpointer.save_shard(rank, token, arrays[rank]))
             for rank in range(len(arrays))]
    checkpointer.save(trainer, dict(used=7, ranks=ranks))
    return {rank["shard"]["file"] for rank in ranks}


def _read_rank(folder, rank):
    """``(position, extra)`` of ``rank`` as its resuming process reads them."""
    reader = Checkpointer(folder, 1, IDENTITY, writer=False)
    header, tensors = reader.read()
    extra = {name[len("extra."):]: t for name, t in tensors.items() if name.startswith("extra.")}
    parallel = type("Rank", (), dict(rank=rank))
    return _checked_position(reader, header["position"], extra, D, parallel)


def _shard_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(checkpoint_module.SHARD_SUFFIX))


@settings(max_examples=15, deadline=None)
@given(world_size=st.integers(1, 4), pending=st.lists(st.integers(0, 4), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_each_rank_reads_back_its_own_arrays_and_rank_0s_file_holds_none(world_size, pending, seed):
    trainer = _trainer()
    with tempfile.TemporaryDirectory() as folder:
        arrays = [_rank_arrays(rank, pending[rank], seed) for rank in range(world_size)]
        named = _save(Checkpointer(folder, 1, IDENTITY), trainer, 12345, arrays)
        assert set(_shard_files(folder)) == named and len(named) == world_size
        header, tensors = Checkpointer(folder, 1, IDENTITY, writer=False).read()
        assert header["version"] == checkpoint_module.SHARDED_VERSION
        assert not [name for name in tensors if name.startswith("extra.")]  # no rank's rows in rank 0's file
        for rank in range(world_size):
            position, extra = _read_rank(folder, rank)
            assert position["stream"] == {"next": rank}
            assert set(extra) == set(arrays[rank])
            for name, t in arrays[rank].items():
                torch.testing.assert_close(extra[name], t, rtol=0, atol=0)


def test_a_save_killed_between_the_rank_files_and_rank_0s_file_leaves_the_previous_checkpoint_whole(tmp_path):
    trainer, writer = _trainer(), Checkpointer(tmp_path, 1, IDENTITY)
    first = [_rank_arrays(rank, seed=1) for rank in range(2)]
    first_files = _save(writer, trainer, 1, first)
    for rank in range(2):  # the next save's rank files, then the kill: rank 0's file is not replaced
        writer.save_shard(rank, 2, _rank_arrays(rank, seed=2))
    for rank in range(2):
        _, extra = _read_rank(tmp_path, rank)
        torch.testing.assert_close(extra["pending"], first[rank]["pending"], rtol=0, atol=0)
    # the rerun resumes and saves again (another token): the resumed checkpoint's files go, the
    # killed save's young files stay (they could be a live job's of this same fit)
    killed = set(_shard_files(tmp_path)) - first_files
    rerun = Checkpointer(tmp_path, 1, IDENTITY)
    rerun.read()  # the resume: it knows the files of the checkpoint it read
    second = _save(rerun, trainer, 3, [_rank_arrays(rank, seed=3) for rank in range(2)])
    assert set(_shard_files(tmp_path)) == second | killed
    old = time.time() - checkpoint_module.STALE_SECONDS - 60
    for name in killed:
        os.utime(tmp_path / name, (old, old))
    third = _save(rerun, trainer, 4, [_rank_arrays(rank, seed=4) for rank in range(2)])
    assert set(_shard_files(tmp_path)) == third  # the killed save's files, an hour old, are gone too


def test_rank_files_that_cannot_be_removed_do_not_stop_the_save(tmp_path, monkeypatch):
    """Removing the replaced checkpoint's rank files comes after the new checkpoint is in place: a
    PermissionError there failed the save (and, in a job, stopped every rank, told that the
    checkpoint could not be written).  They are left for a later save, which removes them."""
    trainer, writer = _trainer(), Checkpointer(tmp_path, 1, IDENTITY)
    first = _save(writer, trainer, 1, [_rank_arrays(rank, seed=1) for rank in range(2)])
    real_remove = os.remove

    def refuse(path, *args, **kwargs):
        if str(path).endswith(checkpoint_module.SHARD_SUFFIX):
            raise PermissionError(13, "Permission denied", str(path))
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "remove", refuse)
    arrays = [_rank_arrays(rank, seed=2) for rank in range(2)]
    second = _save(writer, trainer, 2, arrays)
    assert set(_shard_files(tmp_path)) == first | second
    for rank in range(2):  # the new checkpoint is the one read back
        _, extra = _read_rank(tmp_path, rank)
        torch.testing.assert_close(extra["pending"], arrays[rank]["pending"], rtol=0, atol=0)
    monkeypatch.setattr(checkpoint_module.os, "remove", real_remove)
    old = time.time() - checkpoint_module.STALE_SECONDS - 60
    for name in first:
        os.utime(tmp_path / name, (old, old))
    third = _save(writer, trainer, 3, [_rank_arrays(rank, seed=3) for rank in range(2)])
    assert set(_shard_files(tmp_path)) == third


def test_other_fits_rank_files_are_left_alone(tmp_path):
    trainer = _trainer()
    other = Checkpointer(tmp_path, 1, dict(IDENTITY, data="other rows"))
    others = _save(other, trainer, 1, [_rank_arrays(rank) for rank in range(2)])
    old = time.time() - checkpoint_module.STALE_SECONDS - 60
    for name in others:
        os.utime(tmp_path / name, (old, old))
    mine = _save(Checkpointer(tmp_path, 1, IDENTITY), trainer, 2, [_rank_arrays(rank) for rank in range(2)])
    assert set(_shard_files(tmp_path)) == others | mine


def _damage(folder, how):
    [name] = [n for n in _shard_files(folder) if ".rank1-" in n]
    path = os.path.join(folder, name)
    if how == "missing":
        os.remove(path)
    elif how == "flipped":
        raw = bytearray(open(path, "rb").read())
        raw[-3] ^= 0x40  # a bit of the last row's bytes
        open(path, "wb").write(bytes(raw))
    elif how == "truncated":
        os.truncate(path, 40)
    elif how == "fifo":
        os.remove(path)
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("how, says", [
    ("missing", "is missing"),
    ("flipped", "does not match the digest"),
    ("truncated", "cannot be read"),
    ("fifo", "FIFO"),
])
def test_a_damaged_rank_file_is_refused_naming_it_and_left_as_it_is(tmp_path, how, says):
    _save(Checkpointer(tmp_path, 1, IDENTITY), _trainer(), 7, [_rank_arrays(rank) for rank in range(2)])
    path = _damage(str(tmp_path), how)
    before = sorted(os.listdir(tmp_path))
    _read_rank(tmp_path, 0)  # rank 0's own file is intact
    with pytest.raises(CheckpointError, match=says) as caught:
        _read_rank(tmp_path, 1)
    assert os.path.basename(path) in str(caught.value) and "rank 1" in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("record", [
    "not a record",
    {"file": "../../etc/passwd", "sha256": "0" * 64},
    {"file": "rank0-of-another.shard", "sha256": "0" * 64},
    "rank 0's file",  # another rank's file, with its own digest
])
def test_a_rank_record_that_names_no_file_of_that_rank_is_refused(tmp_path, record):
    writer = Checkpointer(tmp_path, 1, IDENTITY)
    ranks = [dict(used=0, stream=None, exhausted=False, shard=writer.save_shard(rank, 9, _rank_arrays(rank)))
             for rank in range(2)]
    ranks[1]["shard"] = ranks[0]["shard"] if record == "rank 0's file" else record
    writer.save(_trainer(), dict(used=0, ranks=ranks))
    with pytest.raises(CheckpointError, match="its record of rank 1's file"):
        _read_rank(tmp_path, 1)


def test_a_version_2_checkpoint_with_every_ranks_arrays_in_one_file_still_resumes(tmp_path):
    """What the previous version wrote: every rank's arrays under rank<r>. names in rank 0's file."""
    arrays = [_rank_arrays(rank, seed=5) for rank in range(2)]
    writer = Checkpointer(tmp_path, 1, IDENTITY)
    ranks = [dict(used=0, stream={"next": rank}, exhausted=False) for rank in range(2)]
    writer.save(_trainer(), dict(used=7, ranks=ranks),
                {f"rank{rank}.{name}": t for rank in range(2) for name, t in arrays[rank].items()})
    header, _ = Checkpointer(tmp_path, 1, IDENTITY, writer=False).read()
    assert header["version"] == checkpoint_module.VERSION == 2 and not _shard_files(tmp_path)
    for rank in range(2):
        position, extra = _read_rank(tmp_path, rank)
        assert position["stream"] == {"next": rank}
        torch.testing.assert_close(extra["pending"], arrays[rank]["pending"], rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(number=st.sampled_from([0, 5, 13, 28, -1]))
def test_rank_0s_write_outcome_reaches_every_rank_through_agree(number):
    """In a data-parallel job only rank 0 writes the checkpoint; its outcome travels to the other
    ranks (``agree``: rank 0's value on every rank), which raise the same kind of error, so that a
    full disk on rank 0 no longer leaves them waiting in the next step for the process group's
    timeout.  ``number``: 0 a write that succeeds, an error number, or -1 an error that is not an
    ``OSError``."""
    from sklearn_jsae._backend.files import write_failed

    trainer = _trainer()
    with tempfile.TemporaryDirectory() as folder:
        sent = []
        writer = Checkpointer(folder, 1, IDENTITY, agree=lambda value: sent.append(value) or value)
        real = writer._write

        def write(path, *args):
            if number > 0:
                raise write_failed(path, OSError(number, os.strerror(number)), "kept")
            if number < 0:
                raise RuntimeError("a bug")
            return real(path, *args)

        writer._write = write
        if number == 0:
            writer.save(trainer, dict(used=1))
        else:
            with pytest.raises(OSError if number > 0 else RuntimeError) as raised:
                writer.save(trainer, dict(used=1))
            assert (raised.value.errno == number) if number > 0 else str(raised.value) == "a bug"
        assert sent == [number]
        assert os.path.exists(writer.path) == (number == 0)

        reader = Checkpointer(folder, 1, IDENTITY, writer=False, agree=lambda value: (value, number)[1])
        if number == 0:
            reader.save(trainer, None)
            return
        with pytest.raises(OSError if number > 0 else RuntimeError) as raised:
            reader.save(trainer, None)
        message = str(raised.value)
        assert f"rank 0 of this job could not write the checkpoint {writer.path!r}" in message
        assert f"checkpoint_dir={folder!r}, if any, is left as it was" in message
        assert "same number of ranks and checkpoint_dir" in message
        if number > 0:
            assert raised.value.errno == number and os.strerror(number) in message

"""Checkpoints that survive a kill: one safetensors file per fit, replaced atomically (and, for
a data-parallel stream fit, a file per rank with its stream arrays: :meth:`Checkpointer.save_shard`).

A checkpoint folder holds any number of fits' checkpoints side by side, each named by a hash of
its fit's identity (:func:`checkpoint_name`): the folds and candidates of a search that share one
``checkpoint_dir`` each resume their own.

A checkpoint holds a :class:`~sklearn_jsae._backend.trainer.Trainer`'s whole state (both SAEs,
Adam's moments, the step counter behind the schedules, dead-latent counters, the shuffling
generator, the running history) and the data position (epoch and row for an array; what a
stream has read, and its shuffle buffer, for a stream).  Tensors go in safetensors, the rest in
JSON in the file's metadata, so loading a checkpoint never runs code (no pickle).

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
old checkpoint (``os.replace`` is atomic on POSIX), and the folder is synced: a kill (or a power
cut) at any moment leaves either the old checkpoint or the new one, never a mix.  A truncated, foreign or version-mismatched file in a
fit's name, or its checkpoint from a job of another number of ranks, is refused with
:class:`CheckpointError` naming what is wrong; nothing is half-loaded.

A checkpoint records a SHA-256 digest of its JSON header and every tensor (:func:`_digest`): a
bit flipped on disk (bit rot, a bad sector, a copy cut short and padded) is refused, not resumed
into a model with a weight of 1e37 or a header whose epoch went from 2 to 0.  Checkpoints of
format version 1, written before the digest, still resume (a long run must not be lost to an
upgrade), with the checks that need no digest: the header's types and ranges, and finite
tensors and scales.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import time

import numpy as np
import torch

from .._warnings import warn
from . import stop
from ..exceptions import CheckpointError  # noqa: F401  (raised here; public in sklearn_jsae.exceptions)
from .files import (
    HOST,
    STALE_SECONDS,
    give_default_mode,
    new_temporary,
    not_a_regular_file,
    remove_dead_temporaries,
    sync_folder,
    write_failed,
    writer_alive,
    writer_prefix,
)

FORMAT = "sklearn_jsae.checkpoint"
# Version 2 adds the digest (metadata key DIGEST); version 1 files, without one, are still read.
VERSION = 2
DIGEST = f"{FORMAT}.sha256"
# Version 3: a data-parallel stream checkpoint whose ranks' stream positions are files of their own,
# <checkpoint file>.rank<r>-<save token>.shard beside it, named with their digests in its position.
SHARDED_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SHARD_SUFFIX = ".shard"
_SHARD_NAME = re.compile(r"checkpoint-[0-9a-f]{16}\.safetensors\.rank\d+-[0-9a-f]{15}\.shard")
# Before checkpoints were named by their fit, a folder held one, under this name; it still resumes.
FILENAME = "checkpoint.safetensors"


def failure_number(exc: BaseException | None) -> int:
    """What a rank tells the others of its write: 0 for none failed, an ``OSError``'s error number,
    -1 for another error."""
    if exc is None:
        return 0
    return (exc.errno or errno.EIO) if isinstance(exc, OSError) else -1


def peer_write_failed(number: int, what: str, folder: str) -> Exception:
    """The error the other ranks raise when ``what`` (a phrase: "rank 0 of this job could not
    write the checkpoint ...") failed with :func:`failure_number` ``number`` on another rank: an
    ``OSError`` of that number, or a ``RuntimeError``."""
    reason = f"{os.strerror(number)}; its error says more" if number > 0 else "its error says why"
    message = (f"{what} ({reason}): every rank stops here; the checkpoint in checkpoint_dir={folder!r}, if "
               f"any, is left as it was, and so is the estimator.  Fix what that rank's error names (a full "
               f"disk: free space, or write elsewhere), then run the same job again (same number of ranks "
               f"and checkpoint_dir) to resume from that checkpoint.")
    return OSError(number, message) if number > 0 else RuntimeError(message)


def _named_shards(position: dict) -> set[str]:
    """The shard files a checkpoint's ``position`` names (none but a data-parallel stream's)."""
    ranks = position.get("ranks")
    if not isinstance(ranks, list):
        return set()
    return {rank["shard"]["file"] for rank in ranks
            if isinstance(rank, dict) and isinstance(rank.get("shard"), dict)
            and isinstance(rank["shard"].get("file"), str)}


def checkpoint_name(identity: dict) -> str:
    """The file name of the fit whose identity is ``identity`` in a checkpoint folder:
    ``checkpoint-<hash of the identity>.safetensors``.  One folder holds the checkpoints of many
    fits side by side (the folds and candidates of a search share one ``checkpoint_dir``)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"checkpoint-{digest}.safetensors"


def checkpoint_paths(folder) -> list[str]:
    """The checkpoint files in ``folder`` (every fit's, and an unnamed one of an earlier version),
    sorted; empty when the folder does not exist."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name == FILENAME or (name.startswith("checkpoint-") and name.endswith(".safetensors"))]


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hours?)", re.IGNORECASE)


def checkpoint_interval(every) -> tuple[int | None, float | None]:
    """``(steps, seconds)`` of a ``checkpoint_every`` value, one of them None: an int counts
    optimiser steps, a str is a duration such as ``"30s"``, ``"10min"`` or ``"1.5h"``.

    A duration suits a run whose step time is not known in advance (a GPU's steps can be a hundred
    times a CPU's): a stream checkpoint holds the shuffle buffer (``buffer_size · d · 4`` bytes),
    so a step count that is minutes apart on a CPU can mean a write every few seconds on a GPU."""
    if isinstance(every, str):
        match = _DURATION.fullmatch(every.strip())
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(
                f"checkpoint_every={every!r} is neither a number of optimiser steps nor a duration; pass an "
                f"int >= 1 (steps) or a positive duration such as '30s', '10min' or '2h'.")
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)[0].lower()]
        return None, seconds
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"checkpoint_every={every!r}: pass an int >= 1 (optimiser steps) or a duration such "
                         f"as '10min'.")
    return int(every), None


def fingerprint_array(X) -> str:
    """The identity of the training data: shape, dtype and a hash of every row of an array in
    memory (a tenth of a second per 150 MB, next to minutes of training: a rerun on edited rows
    must not resume the other data's checkpoint), or of up to 257 rows spread over a
    memory-mapped one (reading all of a 300M-token store at every start would take minutes)."""
    from .train import file_mapping, release_pages

    digest = hashlib.sha256(f"{X.shape}|{X.dtype}".encode())
    n = X.shape[0]
    if file_mapping(X) is None:
        digest.update(np.ascontiguousarray(X).data)  # no copy for a C-contiguous array
        return digest.hexdigest()[:32]
    picks = np.unique(np.linspace(0, n - 1, num=min(n, 257)).astype(np.int64)) if n else []
    for i in picks:
        digest.update(np.ascontiguousarray(X[int(i)]).tobytes())

    release_pages(X)  # a memmap's pages read here would otherwise stay resident
    return digest.hexdigest()[:32]


def fingerprint_module(module) -> str:
    """Hash of a backend map's kind and every buffer and parameter (the MLP a fit trains on)."""
    if module is None:
        return "none"
    digest = hashlib.sha256(type(module).__name__.encode())
    digest.update(str(getattr(module, "activation", "")).encode())
    for name, t in list(module.named_buffers()) + list(module.named_parameters()):
        if t is None or t.numel() == 0:
            continue
        digest.update(name.encode())
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    fn = getattr(module, "fn", None)  # callables: their own weights when they are modules
    if isinstance(fn, torch.nn.Module):
        digest.update(fingerprint_module(fn).encode())
    elif fn is not None:
        _digest_callable(digest, fn)
    return digest.hexdigest()[:32]


def _digest_callable(digest, fn, seen=None) -> None:
    """Feed a plain callable's name, code and the values it reads into ``digest``, so that an edited
    function, or the same function over other weights, is another MLP.  The values are its closure
    cells, the globals its code names (the layer index of ``lambda x: blocks[layer](x)``) and, for a
    bound method, its object: modules by their parameters and buffers, tensors, arrays, numbers,
    strings, containers of these and other plain functions (recursively); other objects are not
    seen (their repr may hold an address).  Nested code objects go in by their bytes, never by their
    repr (it holds an address)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return
    seen.add(id(fn))
    digest.update(getattr(fn, "__qualname__", type(fn).__name__).encode())

    def add_constant(constant):
        if hasattr(constant, "co_code"):
            add_code(constant)
        elif isinstance(constant, (tuple, frozenset)):
            # A frozenset's order follows string hashing, which differs between processes.
            items = sorted(constant, key=repr) if isinstance(constant, frozenset) else constant
            digest.update(type(constant).__name__.encode())
            for item in items:
                add_constant(item)
        else:
            digest.update(repr(constant).encode())

    names = []

    def add_code(code):
        digest.update(code.co_code)
        names.extend(code.co_names)
        for constant in code.co_consts:
            add_constant(constant)

    code = getattr(fn, "__code__", None)
    if code is not None:
        add_code(code)
    if getattr(fn, "__self__", None) is not None:  # a bound method: block.forward
        _digest_value(digest, fn.__self__, seen)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        _digest_value(digest, value, seen)
    namespace = getattr(fn, "__globals__", None) or {}
    for name in dict.fromkeys(names):  # in order of first use, once each
        if name in namespace:
            digest.update(name.encode())
            _digest_value(digest, namespace[name], seen)


def _digest_value(digest, value, seen) -> None:
    """One value a callable reads (see :func:`_digest_callable`)."""
    if isinstance(value, torch.nn.Module):
        if id(value) not in seen:
            seen.add(id(value))
            digest.update(fingerprint_module(value).encode())
    elif isinstance(value, torch.Tensor):
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bool, int, float, str)):
        digest.update(repr(value).encode())
    elif isinstance(value, (list, tuple, dict)) and id(value) not in seen:
        seen.add(id(value))
        digest.update(type(value).__name__.encode())
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            digest.update(repr(key).encode() if isinstance(key, (bool, int, float, str)) else b"?")
            _digest_value(digest, item, seen)
    elif getattr(value, "__code__", None) is not None:  # a function it calls: edits to it count too
        _digest_callable(digest, value, seen)


def _digest(header_text: str, tensors: dict) -> str:
    """SHA-256 of a checkpoint's header (the JSON text as stored) and of every tensor's name,
    dtype, shape and bytes, in name order.  About 30 ms for the 38 MB of two 2048 x 384 SAEs and
    Adam's moments (half the time of writing them; a CPU step at that size takes seconds)."""
    digest = hashlib.sha256(header_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # any dtype (bf16 too), without a copy
    return digest.hexdigest()


# The fix named in every refusal of a damaged checkpoint (the file is left as it is).
_REMOVE = ("Delete it to start this fit afresh, or point checkpoint_dir at another folder; it was left as "
           "it is.")


def damaged(path: str, what: str) -> CheckpointError:
    """The error for the checkpoint ``path`` whose content is wrong: ``what`` says how."""
    return CheckpointError(f"{path} is damaged or was not written by this fit: {what}. {_REMOVE}")


def _read_file(path: str, with_tensors: bool) -> tuple[dict, dict]:
    """``(header, tensors)`` of a checkpoint file (``tensors`` empty without ``with_tensors``: the
    header alone is cheap to read).  Raises :class:`CheckpointError` for anything but a readable
    checkpoint of this format and a readable version, whose digest (with ``with_tensors``) matches
    its content; the header's sections are JSON objects."""
    from safetensors import SafetensorError, safe_open

    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO in a checkpoint's name blocked every fit in the folder
        raise CheckpointError(f"{path} is {kind}, not a checkpoint; remove it from the checkpoint folder.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); it may be "
            f"truncated or not a checkpoint at all. Remove it to start the fit afresh."
        ) from exc
    if FORMAT not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file but not an sklearn_jsae checkpoint (no "
            f"{FORMAT!r} metadata); use an empty folder for checkpoint_dir."
        )
    try:
        header = json.loads(metadata[FORMAT])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} has corrupt checkpoint metadata ({exc}). {_REMOVE}") from exc
    if not isinstance(header, dict):
        raise damaged(path, f"its checkpoint metadata is a JSON {type(header).__name__}, not an object")
    version = header.get("version")
    if (header.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int)
            or version not in READABLE_VERSIONS):
        raise CheckpointError(
            f"{path} is checkpoint format version {version!r} (written by "
            f"sklearn_jsae {header.get('library_version')!r}); this version reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Finish that fit with the version that wrote it, or "
            f"remove the checkpoint."
        )
    # Version 1 has no digest: it resumes with the checks below and the restore's finite checks.
    # The digest is checked when the file is loaded (with its tensors); the header alone only tells
    # which fit a file is.
    if version >= 2 and with_tensors:
        if not isinstance(metadata.get(DIGEST), str):
            raise damaged(path, f"its digest ({DIGEST!r} metadata) is missing")
        if metadata[DIGEST] != _digest(metadata[FORMAT], tensors):
            raise damaged(path, "its header and tensors do not match the digest recorded when it was written "
                                "(the file was altered or corrupted on disk after it was saved)")
    for section in ("identity", "trainer", "position"):
        if not isinstance(header.get(section), dict):
            raise damaged(path, f"its header's {section!r} is "
                                + ("missing" if section not in header else f"a {type(header[section]).__name__}")
                                + ", not a JSON object")
    world_size = header["identity"].get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise damaged(path, f"its identity's world_size is {world_size!r}, not a number of ranks")
    return header, tensors


def _differences(identity: dict, header: dict) -> list[str]:
    written = header.get("identity", {})
    return sorted(key for key in set(identity) | set(written) if identity.get(key) != written.get(key))


def _other_world_size(path: str, header: dict, identity: dict) -> CheckpointError:
    written = header.get("identity", {}).get("world_size", 1)
    now = identity.get("world_size", 1)
    return CheckpointError(
        f"{path} was written by a job of {written} rank(s) and this job has {now}: a checkpoint "
        f"resumes with the number of ranks that wrote it. Restart with "
        + (f"torchrun --nproc-per-node {written} (or that many ranks in all)" if written > 1
           else "a single process (distributed=False)")
        + ", or use another checkpoint_dir to start afresh."
    )


# (named here too: the tests and earlier code read them from this module)
_HOST, _STALE_SECONDS, _writer_alive = HOST, STALE_SECONDS, writer_alive


class Checkpointer:
    """Save and resume one fit's checkpoint in ``folder``, in the file :func:`checkpoint_name` gives
    its identity: other fits' checkpoints in the same folder are left as they are.

    Parameters
    ----------
    folder : str or path
        Created if missing.
    every : int or str
        Save after every ``every`` optimiser steps, or, for a duration such as ``"10min"``
        (:func:`checkpoint_interval`), at the first step that ends that long after the last save
        (and, either way, at the end of each epoch or stream).
    identity : dict of str -> JSON value
        What makes two fits the same (data, MLP and settings fingerprints); it names the fit's
        file, and a file of that name with another identity is refused.  A data-parallel fit adds
        ``world_size``: its data position (a stream's per-rank state) belongs to that number of
        ranks.
    writer : bool, default=True
        Whether :meth:`save` writes.  In a data-parallel job only rank 0 writes the checkpoint
        (every rank holds the same trainer state) and every rank reads it to resume; a stream
        fit's ranks each write and read their own stream arrays (:meth:`save_shard`).
    agree : callable or None, default=None
        In a data-parallel job: ``agree(value)`` returns rank 0's ``value`` on every rank.  Saving is
        collective (every rank's stream position goes to rank 0, which names the ranks' files) and
        the ranks' clocks differ, so rank 0's clock decides, at every step, for all; and every rank
        learns whether rank 0's write succeeded, so that a failed write (a full disk) stops every
        rank at once with an error that says so, where the others went on to the next step and
        waited there for the process group's timeout (600 s by default).
    """

    def __init__(self, folder, every, identity: dict, writer: bool = True, agree=None):
        self.folder = os.fspath(folder)
        self.steps, self.seconds = checkpoint_interval(every)
        self.agree = agree
        self.stop_signal = self.stop_step = None  # a stop request seen by due(), honoured after the save
        self.shards = set()  # the rank files of the checkpoint on disk (resumed or last written)
        self.last_saved = time.monotonic()
        self.identity = identity
        self.writer = bool(writer)
        self.path = os.path.join(self.folder, checkpoint_name(identity))
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise NotADirectoryError(f"checkpoint_dir={self.folder!r} is a file, not a folder; pass a folder (it is "
                                     f"created if missing) for the checkpoint.")
        os.makedirs(self.folder, exist_ok=True)
        if self.writer:
            # Found now, not at the first save after an epoch (or "10min") of training.
            try:
                with tempfile.TemporaryFile(dir=self.folder):
                    pass
            except OSError as exc:
                raise ValueError(f"checkpoint_dir={self.folder!r} cannot hold checkpoints "
                                 f"({exc.strerror or exc}); pass a folder you can write to.") from exc

    def due(self, step: int) -> bool:
        """Whether to save after optimiser step ``step``: its interval has passed, or the process
        was asked to stop (:func:`~sklearn_jsae._backend.stop.graceful_stop`; the fit then calls
        :meth:`stop_if_requested` after the save).  In a data-parallel job every rank calls this at
        every step and it is a collective: rank 0's clock and signal decide for all, so that every
        rank saves and stops after the same step."""
        if self.steps is not None:
            due = step % self.steps == 0
        else:
            due = time.monotonic() - self.last_saved >= self.seconds
        signum = stop.requested() or 0
        if self.agree is not None:
            flags = int(self.agree(int(due) | signum << 1))
            due, signum = bool(flags & 1), flags >> 1
        if signum:
            self.stop_signal, self.stop_step = signum, step
        return due or bool(signum)

    def stop_if_requested(self) -> None:
        """Raise :class:`~sklearn_jsae.exceptions.TrainingStopped` when :meth:`due` saw a stop
        request (call it once the checkpoint it asked for is written)."""
        if self.stop_signal is None:
            return
        signum, self.stop_signal = self.stop_signal, None
        written = self.path if self.writer else None
        raise stop.stopped(signum, f"stopped by {stop.name(signum)} after optimiser step {self.stop_step}, "
                                   f"with a checkpoint in {self.folder}: run the same fit again (same "
                                   f"checkpoint_dir) to resume from that step.",
                           step=self.stop_step, checkpoint=written)

    def save(self, trainer, position: dict, extra_tensors: dict | None = None) -> None:
        """Write the trainer's state and ``position`` (JSON) atomically (a no-op unless ``writer``).

        A data-parallel stream's ``position`` names each rank's shard (:meth:`save_shard`); once
        the new checkpoint is in place the shards of the checkpoint it replaces (:attr:`shards`:
        the one last read or written) are removed, and so are this fit's shards no checkpoint
        names that are untouched for an hour (a job killed between its shards and this file)."""
        if not self.writer:
            self._learn_rank_0s_write()
            self.last_saved = time.monotonic()
            return
        try:
            self._save(trainer, position, extra_tensors)
        except Exception as exc:
            if self.agree is not None:
                self.agree(failure_number(exc))
            raise
        if self.agree is not None:
            self.agree(0)

    def _learn_rank_0s_write(self) -> None:
        """On a rank that does not write: raise when rank 0's write failed (an ``OSError`` with its
        error number, a ``RuntimeError`` for another error)."""
        if self.agree is None:
            return
        number = int(self.agree(0))
        if number:
            raise peer_write_failed(number, f"rank 0 of this job could not write the checkpoint {self.path!r}",
                                    self.folder)

    def _save(self, trainer, position: dict, extra_tensors: dict | None) -> None:
        from .. import __version__

        tensors, meta = trainer.state_dict()
        for name, t in (extra_tensors or {}).items():
            tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
        named = _named_shards(position)
        # Files with shards are version 3, so that a version that reads only version 2 refuses them
        # by their version rather than as a checkpoint without its ranks' rows.
        header = dict(format=FORMAT, version=SHARDED_VERSION if named else VERSION,
                      library_version=__version__, identity=self.identity, trainer=meta, position=position)
        text = json.dumps(header)
        self._write(self.path, tensors, {FORMAT: text, DIGEST: _digest(text, tensors)},
                    "the previous checkpoint, if any, is left as it was (run the same fit again to resume "
                    "from it once the disk has room), and so is the estimator")
        self._remove_old_shards(self.shards, keep=named)
        self.shards = named
        self.last_saved = time.monotonic()  # after the write: a slow write does not eat the interval

    def _write(self, path: str, tensors: dict, metadata: dict, kept: str) -> None:
        """Write a safetensors file atomically: a temporary, flushed, then renamed over ``path``
        and the folder synced; ``kept`` says what a failed write left, in its error."""
        from safetensors.torch import save_file

        # The temporary is named after the file and its writer (machine and process), so that one
        # a kill left behind (a SIGKILL runs no cleanup) is found and removed by the next save of
        # that file, while other fits' temporaries, and those of another live process training this
        # same fit (identical candidates of a search in parallel), are left alone.
        prefix = f".{os.path.basename(path)}."
        try:
            temporary = new_temporary(self.folder, writer_prefix(prefix))
        except OSError as exc:
            raise write_failed(path, exc, kept) from exc
        try:
            save_file(tensors, temporary, metadata=metadata)
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            # after the write: safetensors leaves it 0600
            give_default_mode(temporary, replacing=path)
            os.replace(temporary, path)
            sync_folder(self.folder)
        except Exception as exc:
            # A full disk: safetensors' SafetensorError is not an OSError and names no path.
            if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
                raise write_failed(path, exc, kept) from exc
            raise
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        remove_dead_temporaries(self.folder, prefix)

    def save_shard(self, rank: int, token: int, tensors: dict) -> dict:
        """Write one rank's part of a data-parallel stream checkpoint (its stream's arrays and
        pending rows) to a file of its own, on every rank (``writer`` or not); returns what the
        checkpoint records of it: ``{"file": name, "sha256": digest}``.

        ``token`` (rank 0's, the same on every rank) names this save, so a save never overwrites
        the shards the checkpoint on disk names: a kill between the shards and the checkpoint
        leaves the previous checkpoint whole.  Each rank writes its own rows, so no rank holds
        another's: gathering every rank's shuffle buffer into rank 0's file took
        ``world_size · buffer_size · d · 4`` bytes of rank 0's memory (2.1 GB for 8 ranks of
        65,536 rows of 1,024 floats), pickled through the process group, at every save."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        digest = _digest("", tensors)
        name = f"{os.path.basename(self.path)}.rank{int(rank)}-{int(token):015x}{SHARD_SUFFIX}"
        self._write(os.path.join(self.folder, name), tensors,
                    {f"{FORMAT}.shard": json.dumps(dict(rank=rank))},
                    "the checkpoint on disk, if any, is left as it was (it names its own ranks' files), and "
                    "so is the estimator")
        return {"file": name, "sha256": digest}

    def discard_shard(self, shard: dict) -> None:
        """Remove the file of :meth:`save_shard`'s record ``shard``, which no checkpoint names (the
        save it was written for failed on another rank)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.folder, shard["file"]))

    def read_shard(self, rank: int, shard) -> dict:
        """The tensors of ``rank``'s shard that the checkpoint read last (:attr:`resumed_from`)
        names as ``shard``, checked against the digest it records; :class:`CheckpointError` for a
        record that is not this fit's shard of that rank, a missing file or altered content."""
        from safetensors import SafetensorError, safe_open

        path = self.resumed_from
        prefix = f"{os.path.basename(self.path)}.rank{int(rank)}-"
        if (not isinstance(shard, dict) or not isinstance(shard.get("file"), str)
                or not isinstance(shard.get("sha256"), str) or not _SHARD_NAME.fullmatch(shard["file"])
                or not shard["file"].startswith(prefix)):
            raise damaged(path, f"its record of rank {rank}'s file is {shard!r}, not a file named {prefix}*"
                                f"{SHARD_SUFFIX} with its digest")
        shard_path = os.path.join(self.folder, shard["file"])
        if not os.path.exists(shard_path):
            raise damaged(path, f"rank {rank}'s part of it, {shard_path}, is missing (each rank's stream "
                                f"position is a file of its own beside the checkpoint: copy or keep them "
                                f"together)")
        kind = not_a_regular_file(shard_path)
        if kind is not None:
            raise damaged(path, f"rank {rank}'s part of it, {shard_path}, is {kind}")
        try:
            with safe_open(shard_path, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise damaged(path, f"rank {rank}'s part of it, {shard_path}, cannot be read "
                                f"({type(exc).__name__}: {exc})") from exc
        if _digest("", tensors) != shard["sha256"]:
            raise damaged(path, f"rank {rank}'s part of it, {shard_path}, does not match the digest the "
                                f"checkpoint recorded (altered or corrupted on disk, or another save's)")
        return tensors

    def _remove_old_shards(self, replaced, keep) -> None:
        """Remove the shards ``replaced`` (file names), and this fit's shards not in ``keep`` that
        are untouched for an hour (their job was killed between its shards and its checkpoint; a
        younger one may be a live job's of this same fit).  A file that cannot be removed (its
        permissions) is left for a later save: the new checkpoint is in place, and a clean-up that
        fails must not stop the fit (in a data-parallel job every rank would stop, told that the
        checkpoint could not be written)."""
        mine = f"{os.path.basename(self.path)}.rank"
        for name in os.listdir(self.folder):
            if not name.startswith(mine) or not _SHARD_NAME.fullmatch(name) or name in keep:
                continue
            path = os.path.join(self.folder, name)
            with contextlib.suppress(OSError):
                if name in replaced or time.time() - os.path.getmtime(path) > STALE_SECONDS:
                    os.remove(path)

    def read(self) -> tuple[dict, dict] | None:
        """``(header, tensors)`` of this fit's checkpoint, None if the folder has none.

        Raises :class:`CheckpointError` for a file in this fit's name that is not a readable
        checkpoint of this format and version or belongs to another fit, and when the folder holds
        this fit's checkpoint from a job of another number of ranks (which cannot resume here).
        Without a checkpoint of this fit, other fits' checkpoints in the folder are left alone and
        the fit starts afresh, with a warning (a changed setting does not resume).
        """
        path = self.path
        if not os.path.exists(path):
            path = self._legacy_or_other_fits()
            if path is None:
                return None
        header, tensors = _read_file(path, with_tensors=True)
        differs = _differences(self.identity, header)
        if "world_size" in differs:
            raise _other_world_size(path, header, self.identity)
        if differs:
            raise CheckpointError(
                f"{path} is the checkpoint of a different fit: it differs in {', '.join(differs)}, but "
                f"has this fit's name (copied or renamed by hand?). Remove it to start this fit afresh."
            )
        self.resumed_from = path
        self.shards = _named_shards(header["position"])  # they go once the next checkpoint is in place
        return header, tensors

    def _legacy_or_other_fits(self) -> str | None:
        """The folder's unnamed checkpoint (written before checkpoints were named by their fit) if it
        is this fit's; raises if another job size wrote this fit; None otherwise (a warning names
        the other fits' checkpoints, which this fit does not resume)."""

        others = checkpoint_paths(self.folder)
        for path in others:
            try:
                header, _ = _read_file(path, with_tensors=False)
            except CheckpointError:
                continue  # not this fit's file: another fit's trouble, met when that fit resumes
            differs = _differences(self.identity, header)
            if differs == ["world_size"]:
                raise _other_world_size(path, header, self.identity)
            if not differs and os.path.basename(path) == FILENAME:
                return path
        if others:
            warn(
                f"checkpoint_dir={self.folder!r} holds checkpoints of other fits (other data, MLP or "
                f"settings) and none of this one: this fit starts afresh, in its own file next to them "
                f"(a fit resumes only with the same data, MLP and settings; in a search whose fits share "
                f"the folder this is expected: filter it with warnings.filterwarnings('ignore', "
                f"'checkpoint_dir=.* holds checkpoints of other fits')).")
        return None

    def restore(self, trainer) -> tuple[dict, dict] | None:
        """Load the folder's checkpoint into ``trainer``; returns ``(position, extra tensors)`` or
        None when there is no checkpoint.  Checks every tensor's shape and dtype, that the state's
        tensors and scales are finite and the trainer's header is well formed, before touching the
        trainer: a damaged checkpoint raises :class:`CheckpointError` and is left as it is."""
        found = self.read()
        if found is None:
            return None
        header, tensors = found
        path = self.resumed_from
        expected = {name: (tuple(t.shape), t.dtype) for name, t in trainer.state_dict()[0].items()}
        extra = {name[len("extra."):]: t for name, t in tensors.items() if name.startswith("extra.")}
        state = {name: t for name, t in tensors.items() if not name.startswith("extra.")}
        wrong = sorted(name for name in expected if name not in state or tuple(state[name].shape) != expected[name][0])
        if wrong or set(state) - set(expected):
            raise CheckpointError(
                f"{path} does not match this fit's shapes ({', '.join(wrong) or 'extra tensors'}); "
                f"it was written for other sizes. Use another checkpoint_dir or remove it."
            )
        # A checkpoint of this fit has this fit's dtypes (the dtype is part of its identity).
        wrong = sorted(f"{name} is {state[name].dtype}, not {dtype}" for name, (_, dtype) in expected.items()
                       if state[name].dtype != dtype)
        if wrong:
            raise damaged(path, "; ".join(wrong))
        # A NaN or inf in the state would come back as a fitted model of NaN (no step is left to
        # notice it when the checkpoint is a finished fit's).
        bad = sorted(name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        if bad:
            raise damaged(path, f"its tensors {bad} hold NaN or inf")
        problem = trainer.meta_problem(header["trainer"])
        if problem is not None:
            raise damaged(path, f"its trainer state {problem}")
        try:
            trainer.load_state_dict(state, header["trainer"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
            raise damaged(path, f"its trainer state cannot be loaded ({type(exc).__name__}: {exc})") from exc
        return header["position"], extra

    def array_position(self, trainer, where: dict, extra: dict, n: int, config) -> tuple:
        """``(epoch, row, epoch_rng)`` where an array fit of ``n`` rows resumes, from the position
        and extra tensors :meth:`restore` returned, checked: a header that is not this fit's (a
        foreign writer's, or a version-1 file, without a digest, damaged on disk) would otherwise
        run on from epoch -5, or fail with a bare KeyError."""
        epoch, row = where.get("epoch"), where.get("row")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, row)) \
                or not 0 <= epoch <= config.max_iter or not 0 <= row < n or row % config.batch_size \
                or (row and epoch == config.max_iter):
            raise damaged(self.resumed_from,
                          f"its position (epoch={epoch!r}, row={row!r}) is not a place in a fit of "
                          f"{config.max_iter} epoch(s) of {n} rows in batches of {config.batch_size}")
        if row == 0:
            return epoch, row, None
        # Inside an epoch: the generator's state at its start redraws its order.
        epoch_rng, expected = extra.get("epoch_rng"), trainer.shuffling.get_state()
        if epoch_rng is None or epoch_rng.dtype != expected.dtype or epoch_rng.shape != expected.shape:
            raise damaged(self.resumed_from, "its epoch's shuffling state (extra.epoch_rng) is missing or not a "
                                             "generator's state")
        return epoch, row, epoch_rng

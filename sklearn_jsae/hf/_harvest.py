"""Activation harvesting: run a model on real tokens and capture one MLP's inputs and outputs
(:func:`harvest`), in memory or streamed to ``.npy`` files larger than memory."""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
from pathlib import Path

import numpy as np
import torch

from .._thread_hooks import this_threads_forward_hook, this_threads_pre_hook
from .._warnings import warn
from ._adapters import _eval_mode, _layout, _unwrap, _warn_attached_saes, run_model

__all__ = ["harvest"]


# ---------------------------------------------------------------------------------------- harvest


class _HarvestStop(Exception):
    """Raised by the output hook once the layer's MLP has run: later layers are skipped."""


_HEADER_BYTES = 128  # fixed .npy v1.0 header size, so the shape can be written at the end


class _NpyWriter:
    """Append rows of a fixed width and dtype to a ``.npy`` file; the header is written on close.

    The rows go to a hidden ``.<name>.partial`` file next to ``path``, which :class:`_FileSink`
    moves to ``path`` once the harvest is complete."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.partial = path.with_name(f".{path.name}.partial")
        self.rows, self.width = 0, None
        # The partial name is fixed: remove whatever is there (a killed harvest's file, or a
        # symlink planted to redirect the write) and create a new file, following nothing.
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.partial)
        # "x": O_CREAT | O_EXCL, which refuses any existing name, a link included.  Opened as a file
        # object at once: os.open's bare descriptor, wrapped by fdopen a line later, leaked if a
        # Ctrl-C came in between.
        try:
            self.file = open(self.partial, "xb")
        except FileExistsError as e:
            raise FileExistsError(
                e.errno, f"{self.partial} was created by something else while harvest was starting; "
                f"make sure nothing else writes into {path.parent} and harvest again."
            ) from e
        try:
            self.file.write(b"\0" * _HEADER_BYTES)
        except BaseException:
            self.file.close()
            with contextlib.suppress(OSError):  # not yet the sink's to clean up
                os.remove(self.partial)
            raise

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.width = rows.shape[1:] if self.width is None else self.width
        self.file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        shape = (self.rows, *(self.width or ()))
        header = repr(
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        )
        prefix = b"\x93NUMPY\x01\x00"
        body_len = _HEADER_BYTES - len(prefix) - 2
        header = header.encode("latin1").ljust(body_len - 1) + b"\n"
        if len(header) != body_len:  # never for 1-D / 2-D shapes below 10**30 rows
            raise RuntimeError(f"npy header too long for {self.path}: {header!r}")
        try:
            self.file.seek(0)
            self.file.write(prefix + body_len.to_bytes(2, "little") + header)
            # On disk before it is renamed in (_swap_in): after a power cut the new name could
            # otherwise stand for a file whose rows were never written (zeros, or nothing).
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()  # flushes: a full disk raises here; the descriptor is released anyway


def _room_for(n_rows: int, example: np.ndarray) -> np.ndarray | None:
    """An empty array of ``n_rows`` rows shaped and typed as ``example``'s, or None where it would
    take more than half the machine's memory (a generous ``n_tokens`` with little input) or the
    system refuses it.  Its pages are only taken as rows are written into them."""
    from .._backend.chunks import physical_memory

    shape = (n_rows,) + example.shape[1:]
    if int(np.prod(shape, dtype=np.int64)) * example.dtype.itemsize > physical_memory() // 2:
        return None
    try:
        return np.empty(shape, dtype=example.dtype)
    except MemoryError:
        return None


class _MemorySink:
    """The harvest in memory.  Given ``capacity`` (``n_tokens``, or a bound on the input's tokens:
    :func:`_token_bound`), each array is allocated once, at that many rows, on its first rows, and
    filled in place; pages no row reaches are never taken, and the rest is given back at the end.
    The chunks and their concatenation held the harvest about 1.5 to 2 times at the end (measured:
    389 MB more at the peak for 166 MB of X and Y).  Without a capacity, where the array would not
    fit, or past its capacity, the rows are kept in chunks and concatenated at the end."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.chunks = {"X": [], "Y": [], "token_ids": []}
        self.filled = {}  # name: [array of capacity rows, rows written]

    def append(self, name, rows):
        if self.capacity is not None and name not in self.filled and not self.chunks[name]:
            array = _room_for(self.capacity, rows)
            if array is not None:
                self.filled[name] = [array, 0]
        if name in self.filled:
            array, written = entry = self.filled[name]
            if written + len(rows) <= len(array):
                array[written : written + len(rows)] = rows
                entry[1] += len(rows)
                return
            # More rows than the bound said (it never happens with n_tokens, which harvest cuts
            # at): the rows so far become the first chunk.
            del self.filled[name]
            array.resize((written,) + array.shape[1:], refcheck=False)
            self.chunks[name].append(array)
        self.chunks[name].append(rows)

    def result(self, dtype):
        """Each array: the filled one cut to its rows (in place: no copy), or the chunks
        concatenated, whose list is then emptied, so that the chunks of the arrays already built
        are freed before the next is (all chunks and all arrays at once held twice the harvest;
        one array at a time about 1.5 times).  For harvests near memory's size, ``out=`` writes a
        store instead."""
        out = {}
        for name, chunks in self.chunks.items():
            if name in self.filled:
                array, rows = self.filled.pop(name)
                if rows < len(array):  # fewer rows than the capacity: give back the rest
                    array.resize((rows,) + array.shape[1:], refcheck=False)  # no view of it exists
                out[name] = array
            else:
                out[name] = np.concatenate(chunks) if chunks else None
                chunks.clear()
        return out

    def abort(self):
        self.filled.clear()


def _token_bound(texts, input_ids, max_length, pack, tokenizer) -> int | None:
    """At most how many tokens ``harvest`` can capture from its input, where that is known without
    reading it: the cells of an id array (its padding included), the ids of a list of rows, or a
    list of texts times the length each is cut to.  None for anything else (a corpus read
    lazily, a dataset's column, packed texts, which keep every token)."""
    if input_ids is not None:
        if _is_id_array(input_ids):
            return int(np.prod(input_ids.shape, dtype=np.int64))
        if isinstance(input_ids, (list, tuple)):
            return sum(len(row) if hasattr(row, "__len__") else 1 for row in input_ids)
        return None
    if pack or not isinstance(texts, (str, list, tuple)):
        return None
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" is about 1e30
        return None
    return (1 if isinstance(texts, str) else len(texts)) * limit


class _FileSink:
    """``X.npy``, ``Y.npy`` and ``token_ids.npy`` in ``folder``, replaced only by a complete harvest.

    A harvest that fails or is interrupted leaves the folder's earlier files as they were (its own
    rows are in hidden partial files, removed on error; a killed one's are overwritten by the next
    harvest).  One harvest at a time writes into a folder: it holds a lock on it, and another
    harvest into it raises ``RuntimeError`` instead of writing into the same partial files.  A
    complete one swaps its files in all or none (:meth:`_swap_in`)."""

    def __init__(self, folder: Path, dtype):
        self.folder = folder
        # Before anything is written: the partial files have fixed names, and two harvests into
        # one folder would write into each other's and swap in a store mixing their rows.
        self.lock = _lock_folder(folder)
        self.writers = {}
        try:
            for name, path, kind in (("X", "X.npy", dtype), ("Y", "Y.npy", dtype),
                                     ("token_ids", "token_ids.npy", np.int32)):
                self.writers[name] = _NpyWriter(folder / path, kind)
        except BaseException:
            self.abort()
            raise

    def append(self, name, rows):
        self.writers[name].append(rows)

    def result(self, dtype):
        try:
            try:
                for writer in self.writers.values():
                    writer.close()
            except BaseException as e:
                self.abort()
                if isinstance(e, OSError):
                    raise type(e)(
                        e.errno, f"could not finish writing the harvest into {self.folder} "
                        f"({e.strerror or e}); its partial files were removed and the folder's earlier "
                        f"X.npy / Y.npy / token_ids.npy, if any, are unchanged. Free space on that disk "
                        f"(or pass another out= folder, or fewer n_tokens) and harvest again."
                    ) from e
                raise
            self._swap_in()
            return {name: np.load(w.path, mmap_mode="r") for name, w in self.writers.items()}
        finally:
            self._unlock()

    def _swap_in(self):
        """Move the complete harvest's files in, all or none.  The earlier files are first renamed
        aside (``.X.npy.old``: never truncated, so an earlier harvest's memmaps stay valid), then
        the new ones renamed in, then the aside ones removed.  An error or interrupt part-way puts
        the earlier files back (unlinking them first lost them, and the abort after it the new
        ones too); a kill part-way leaves the earlier files under their ``.old`` names, never an
        ``X`` of one harvest beside the ``Y`` of another."""
        writers = list(self.writers.values())
        set_aside, moved_in = [], []
        try:
            for writer in writers:
                aside = writer.path.with_name(f".{writer.path.name}.old")
                if os.path.lexists(writer.path):
                    os.replace(writer.path, aside)
                    set_aside.append((writer, aside))
            for writer in writers:
                os.replace(writer.partial, writer.path)
                moved_in.append(writer)
        except BaseException:
            for writer in moved_in:  # back to its partial name, which the abort then removes
                with contextlib.suppress(OSError):
                    os.replace(writer.path, writer.partial)
            for writer, aside in set_aside:
                with contextlib.suppress(OSError):
                    os.replace(aside, writer.path)
            raise
        from .._backend.files import sync_folder

        sync_folder(self.folder)  # the new names, before the earlier files are removed
        for writer in writers:
            with contextlib.suppress(FileNotFoundError):
                os.remove(writer.path.with_name(f".{writer.path.name}.old"))

    def abort(self):
        try:
            for writer in self.writers.values():
                with contextlib.suppress(OSError):  # a close that flushes can fail on a full disk
                    writer.file.close()
                with contextlib.suppress(OSError):
                    os.remove(writer.partial)
        finally:
            self._unlock()

    def _unlock(self):
        if getattr(self, "lock", None) is not None:
            os.close(self.lock)  # closing the descriptor releases the lock
            self.lock = None

    def __del__(self):  # a harvest that fails before its own cleanup runs still lets the folder go
        self._unlock()


def _lock_folder(folder: Path) -> int | None:
    """An exclusive lock on ``folder`` for one harvest (:func:`~sklearn_jsae._backend.files.lock_folder`),
    as an open descriptor; another harvest holding it is an error.  None where there is no
    ``flock``: there two harvests into one folder are not told apart."""
    from .._backend.files import lock_folder

    try:
        return lock_folder(folder)
    except BlockingIOError:
        raise RuntimeError(
            f"out={str(folder)!r}: another harvest is writing into this folder (two harvests into one folder "
            f"would mix their rows); wait for it to finish or harvest into another folder."
        ) from None


def _token_rows(captured: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """The rows of ``keep`` (n_seq, seq_len) bool in a captured MLP tensor, as float32 numpy.

    Most models call their MLP on (n_seq, seq_len, d) tensors; OPT's decoder layer flattens them
    to (n_seq · seq_len, d) first, in the same row-major order."""
    keep = keep.to(captured.device)
    if captured.ndim == keep.ndim + 1:
        return captured[keep].float().cpu().numpy()
    if captured.ndim == 2 and captured.shape[0] == keep.numel():
        return captured[keep.reshape(-1)].float().cpu().numpy()
    raise RuntimeError(f"the MLP was called on a tensor of shape {tuple(captured.shape)} for a batch of "
                       f"{tuple(keep.shape)} tokens; this model calls its MLP in an unexpected way.")


def _check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{none}, got {value!r}.")
    return int(value)


def _check_room_for_text(tokenizer, max_length) -> None:
    """Raise unless ``max_length`` leaves room for text after the special tokens the tokenizer adds
    (a Hugging Face tokenizer does not truncate at all below that: it warns and keeps everything)."""
    if tokenizer is None or max_length is None:
        return
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    added = int(count(pair=False)) if callable(count) else 0
    if max_length <= added:
        raise ValueError(f"max_length={max_length} leaves no room for text: the tokenizer adds {added} special "
                         f"token(s) to each text; pass max_length >= {added + 1} (or None for no truncation).")


def _special_ids(model, tokenizer) -> set[int]:
    if tokenizer is not None:
        return {int(i) for i in tokenizer.all_special_ids}
    config = getattr(_unwrap(model), "config", None)
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id")
    ids = set()
    for name in names:
        value = getattr(config, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, numbers.Integral):
                ids.add(int(v))
    return ids


def _pad(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of token-id lists: ids and mask, both (n_seq, max_len) int64."""
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), max(length, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _corpus_or_texts(texts):
    """A corpus path's texts, read lazily as :class:`~sklearn_jsae.hf.ActivationStream` reads them
    (a path object, or a str naming an existing file or folder); any other str is one text."""
    if isinstance(texts, os.PathLike) or (isinstance(texts, str) and os.path.exists(texts)):
        from ._corpus import check_corpus_path, texts_of_file

        check_corpus_path(texts)
        return texts_of_file(texts)
    return texts


def _text_batches(texts, tokenizer, batch_size, max_length):
    if isinstance(texts, str):
        texts = [texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = []

    def encode(batch):
        # max_length=None truncates to the tokenizer's own limit (model_max_length): a text longer
        # than the model's positions would otherwise reach the model and fail there.
        encoded = tokenizer(list(batch), truncation=True, max_length=max_length)["input_ids"]
        return _pad(encoded, pad_id)

    for text in texts:
        if not isinstance(text, str):
            raise _not_a_text(text)
        batch.append(text)
        if len(batch) == batch_size:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)


def _packed_batches(texts, tokenizer, batch_size, max_length):
    """Batches of ``batch_size`` packed sequences of ``max_length`` tokens (:mod:`._packing`); the
    packer is made here, so a ``max_length`` too short for the special tokens is refused at once."""
    from ._packing import TextPacker

    packer = TextPacker(tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = packer.sequences([texts] if isinstance(texts, str) else texts)
    return (_pad(group, pad_id) for group in iter(lambda: list(itertools.islice(sequences, batch_size)), []))


def _not_a_text(item) -> TypeError:
    """The error for an item of ``texts`` that is not a str; a row of a Hugging Face dataset (a dict)
    is told which column to pass."""
    hint = ""
    if isinstance(item, dict):
        column = "text" if isinstance(item.get("text"), str) else next(
            (key for key, value in item.items() if isinstance(value, str)), None)
        if column is not None:
            # The column itself, not a generator over the rows: it can be read again, so a
            # checkpointed stream can resume (Dataset and IterableDataset alike).
            hint = (f" It looks like a row of a datasets.Dataset: pass its text column, e.g. "
                    f"texts=dataset[{column!r}] (a Dataset's or an IterableDataset's; it can be read again "
                    f"to resume, a generator over the rows cannot).")
    return TypeError(f"texts must be strings; got an item of type {type(item).__name__}: {item!r:.60}.{hint}")


def _is_id_array(input_ids) -> bool:
    """Whether ``input_ids`` is an array or tensor (read as its rows), not a sequence of rows (a list,
    a dataset's column, or a pandas Series or object array of rows of different lengths)."""
    if not hasattr(input_ids, "ndim"):
        return False
    dtype = getattr(input_ids, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return True
    # pandas' nullable dtypes (Int64) are not numpy dtypes: their numpy_dtype says what they hold
    dtype = getattr(dtype, "numpy_dtype", dtype)
    try:
        return np.dtype(dtype if dtype is not None else object).kind != "O"
    except TypeError:
        return False


def _as_rows(array):
    """A 1-D array of token ids (one sequence) as one row; a 2-D one as it is.  Array-likes that are
    neither numpy arrays nor tensors (a pandas Series of ids) are read as numpy arrays."""
    if not isinstance(array, (np.ndarray, torch.Tensor)):
        if hasattr(array, "isna") and bool(np.asarray(array.isna()).any()):  # pandas' NA would read as -2⁶³
            raise ValueError("input_ids (or attention_mask) holds missing values (NA); every token needs an id: "
                             "drop or fill them first.")
        dtype = getattr(getattr(array, "dtype", None), "numpy_dtype", None)  # pandas' Int64: int64
        # (a copy: np.asarray of a Series can be a read-only view, or, of Int64, an object array)
        array = array.to_numpy(dtype=dtype, copy=True) if hasattr(array, "to_numpy") else np.asarray(array)
    return array if array.ndim == 2 else array.reshape(1, -1)


def _is_integer_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    try:
        return np.dtype(getattr(dtype, "numpy_dtype", dtype)).kind in "iu"  # (pandas' Int64: its numpy dtype)
    except TypeError:
        return False


def _check_token_arrays(input_ids, attention_mask):
    """Raise unless ``input_ids`` and ``attention_mask`` of :func:`harvest` or
    :class:`~sklearn_jsae.hf.ActivationStream` can be read as token ids and their mask; return the
    mask, an array (nested lists made one) or None.

    Shapes and dtypes only: the values are checked a batch at a time as they are read
    (:func:`_array_block`, :func:`_rows_block`, :func:`~sklearn_jsae.hf._adapters.check_token_ids`), so
    a memmap is not read twice.  A float id, or a 3-D array, would otherwise be truncated or flattened
    into sequences that are not the caller's."""
    if attention_mask is not None and input_ids is None:
        raise ValueError("attention_mask is for input_ids; with texts the tokenizer pads and masks itself.")
    if input_ids is None:
        return None
    if not _is_id_array(input_ids):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only accepted with a 2-D input_ids array or tensor: for rows of equal "
                "length padded by the tokenizer (a dataset column of padding='max_length' ids), pass both as "
                "arrays (np.asarray(column)); for unpadded rows of different lengths leave attention_mask=None "
                "(padding is added internally and masked).")
        return None  # a sequence of rows: each row is checked as it is read
    shape = tuple(input_ids.shape)
    if len(shape) not in (1, 2) or not _is_integer_dtype(input_ids.dtype):
        raise ValueError(
            f"input_ids must be a 2-D integer array (n_sequences, seq_len), got shape {shape} and dtype "
            f"{input_ids.dtype}; token ids are whole numbers (a 1-D array is one sequence, and rows of "
            f"different lengths are passed as a list of rows).")
    if attention_mask is None:
        return None
    if not _is_id_array(attention_mask):
        try:
            attention_mask = np.asarray(attention_mask)
        except ValueError:  # rows of different lengths
            attention_mask = np.asarray(attention_mask, dtype=object)
    mask_shape = tuple(attention_mask.shape)
    as_rows = lambda dims: dims if len(dims) != 1 else (1, *dims)  # noqa: E731 - a 1-D array is one row
    if as_rows(mask_shape) != as_rows(shape):
        raise ValueError(f"attention_mask has shape {mask_shape} but input_ids has shape {shape}; pass a "
                         f"mask of the same shape (1 = real token, 0 = padding).")
    dtype = attention_mask.dtype
    if (dtype.is_complex if isinstance(dtype, torch.dtype) else np.dtype(dtype).kind not in "biuf"):
        raise ValueError(f"attention_mask must hold 1 (real token) and 0 (padding), as bool or int, got "
                         f"dtype {dtype}.")
    return attention_mask


def _long_tensor(block) -> torch.Tensor:
    """A block of ids or mask (numpy, memmap, or a tensor on any device) as a CPU int64 tensor."""
    if isinstance(block, torch.Tensor):
        return block.to(device="cpu", dtype=torch.long)
    return torch.as_tensor(np.asarray(block)).to(dtype=torch.long)


def _array_block(ids, mask, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of a 2-D input_ids array and of its mask (None: every token is real) as CPU
    int64 tensors; a mask value other than 0 and 1 is refused (cast to int, 0.5 would be padding and
    2 a real token, silently)."""
    block = _long_tensor(ids[start:stop])
    if mask is None:
        return block, torch.ones_like(block)
    raw = mask[start:stop]
    raw = raw.to("cpu") if isinstance(raw, torch.Tensor) else torch.as_tensor(np.asarray(raw))
    bad = (raw != 0) & (raw != 1)
    if bool(bad.any()):
        row, column = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"attention_mask[{start + row}, {column}] is {raw[row, column].item()!r}; a mask "
                         f"holds only 1 (real token) and 0 (padding).")
    return block, raw.to(torch.long)


def _rows_block(rows, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of any lengths, ``input_ids[start]`` onwards, padded with 0 and masked (:func:`_pad`);
    a row that is not 1-D or not of integers is refused (it would be flattened or truncated)."""
    sequences = []
    for index, row in enumerate(rows, start):
        array = np.asarray(row)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):  # [] is float64 to numpy
            raise ValueError(f"input_ids[{index}] must be a 1-D row of integer token ids, got shape "
                             f"{array.shape} and dtype {array.dtype}; pass a list of rows ([[1, 2, 3]] for "
                             f"one sequence) or a 2-D integer array.")
        sequences.append(array.tolist())
    return _pad(sequences, 0)


def _id_batches(input_ids, attention_mask, batch_size):
    """Batches of ``input_ids`` (and ``attention_mask``, checked by :func:`_check_token_arrays`)."""
    if _is_id_array(input_ids):
        ids, mask = _as_rows(input_ids), None if attention_mask is None else _as_rows(attention_mask)
        for start in range(0, ids.shape[0], batch_size):
            yield _array_block(ids, mask, start, start + batch_size)
        return
    # A sequence that slices (a list, a datasets Column) is read a batch at a time: with n_tokens,
    # only the rows needed are read.
    sequences = input_ids if hasattr(input_ids, "__len__") and hasattr(input_ids, "__getitem__") else list(input_ids)
    for start in range(0, len(sequences), batch_size):
        yield _rows_block(sequences[start : start + batch_size], start)


def _out_folder(out) -> Path:
    """``out`` as a folder, created if missing; a path that cannot be one is refused by name."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder's path (str or path-like) or None, got {type(out).__name__}: "
                        f"{out!r:.60}.")
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"out={os.fspath(out)!r} is a file, or inside one; out must be a folder (X.npy, "
                         f"Y.npy and token_ids.npy are written in it): pass the path of a folder, new or "
                         f"existing.") from None
    return folder


def _progress_bar(progress, total):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, unit="tok", desc="harvest")


def harvest(
    model,
    layer,
    texts=None,
    *,
    tokenizer=None,
    input_ids=None,
    attention_mask=None,
    n_tokens=None,
    batch_size=8,
    max_length=128,
    exclude_special_tokens=False,
    out=None,
    dtype=np.float32,
    return_tokens=False,
    progress=True,
    pack=False,
):
    """Capture the inputs and outputs of block ``layer``'s MLP on real tokens.

    The model runs in eval mode under ``torch.no_grad``; forward hooks on
    :func:`mlp_hook_points` record the MLP input (after the block's normalisation) and
    output (before dropout, residual and output normalisation) of every token whose
    attention-mask entry is 1, in order (sequence by sequence, position by position).  The
    forward pass stops right after the layer's MLP, so later layers cost nothing.  The
    model's training flag is restored and the hooks removed afterwards, even on error.

    Parameters
    ----------
    model : transformers.PreTrainedModel, transformer_lens.HookedTransformer or TransformerBridge
        A loaded model of a supported architecture (see :func:`mlp_of`); never downloaded here.
    layer : int
        0-based block index; negative values count from the end.
    texts : iterable of str, str or path, optional
        Raw texts, tokenised one batch at a time with ``tokenizer`` (each text becomes one
        sequence, truncated to ``max_length`` tokens, unless ``pack``), or the path of a corpus
        read lazily as :class:`ActivationStream` reads it (a text, ``.jsonl`` or ``.parquet``
        file, compressed or not, or a folder of them); a str that names no file or folder is one
        text.  Exactly one of ``texts`` and ``input_ids`` must be given.
    tokenizer : transformers tokenizer, optional
        Required with ``texts``.  Also used for ``exclude_special_tokens``.
    input_ids : array-like of int, optional
        Token ids: a 2-D integer array or tensor (n_seq, seq_len) (a 1-D one is one sequence),
        or a sequence of 1-D integer rows of any lengths (a list, a Hugging Face dataset's
        column; padded internally).  Read one batch at a time, so a memmap works.  Every id must
        be in the model's vocabulary, ``0 <= id <`` its input embedding's size: an id outside it,
        a float array or one of more dimensions raises ``ValueError``.
    attention_mask : array-like of {0, 1}, optional
        Same shape as an array ``input_ids``, 1 for a real token and 0 for padding (any other
        value raises ``ValueError``); None means every token is real.
    n_tokens : int, optional
        Stop after this many captured tokens; None means all of them.  If the input runs
        out first a ``UserWarning`` says how many were captured.  In memory (``out=None``) the
        arrays are then allocated once at this size and filled in place, so the harvest is held
        once.  Without it they are allocated at a bound the input gives without being read (the
        cells of an id array, the ids of a list of rows, a list of texts times ``max_length``;
        only the pages rows reach are taken, the rest given back at the end); where there is
        none (a corpus path, a dataset's column, ``pack=True``) the rows are gathered in chunks
        and concatenated at the end, about 1.5 times the result at the peak.
    batch_size : int, default=8
        Sequences per forward pass.
    max_length : int or None, default=128
        Truncation length for ``texts``; None keeps the tokenizer's own limit.
    exclude_special_tokens : bool, default=False
        Drop tokens whose id is special: ``tokenizer.all_special_ids`` if a tokenizer is
        given, else the model config's BOS/EOS/PAD/CLS/SEP ids.  The default keeps every token,
        as the bundled dataset does; :class:`ActivationStream` drops them by default, so pass
        True to evaluate a model trained on a stream on the tokens it was trained on.
    out : str or path-like, optional
        A folder: stream ``X.npy``, ``Y.npy`` and ``token_ids.npy`` there and return read-only
        memmaps, so runs larger than memory work.  Files of an earlier harvest there are replaced
        when this one is complete; an error or an interrupt leaves them as they were (a kill in the
        fraction of a second the final renames take leaves them as ``.X.npy.old``,
        ``.Y.npy.old`` and ``.token_ids.npy.old``: rename them back).  None
        keeps everything in memory.  The path of a file raises ``ValueError``.
    dtype : {numpy.float32, numpy.float16}, default=numpy.float32
        Storage dtype of ``X`` and ``Y``.  float16 raises ``ValueError`` if a value overflows.
    return_tokens : bool, default=False
        Also return the token id of each row.
    progress : bool, default=True
        Show a tqdm progress bar (if tqdm is installed).
    pack : bool, default=False
        Concatenate the texts' tokens (an EOS token between two texts of a sequence) and cut
        them into sequences of ``max_length`` tokens, each with the tokenizer's own special
        tokens, instead of one text per sequence truncated to ``max_length``: every token of a
        long text is captured, as :class:`ActivationStream` ``(pack=True)`` reads them.

    Returns
    -------
    X : ndarray or memmap of shape (n_captured, d_model)
        MLP inputs, one row per token.
    Y : ndarray or memmap of shape (n_captured, d_model)
        MLP outputs for the same tokens, ``mlp_of(model, layer)(X) ≈ Y``.
    token_ids : ndarray of shape (n_captured,), int32
        Only if ``return_tokens``.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from sklearn_jsae.hf import harvest, mlp_of
    >>> torch.manual_seed(0) and None
    >>> model = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50))
    >>> ids = torch.randint(0, 50, (3, 10))
    >>> X, Y = harvest(model, 1, input_ids=ids, n_tokens=25, progress=False)
    >>> X.shape, Y.shape
    ((25, 16), (25, 16))
    >>> bool(abs(mlp_of(model, 1)(torch.as_tensor(X)).numpy() - Y).max() < 1e-5)
    True
    """
    layout = _layout(model, layer)
    _warn_attached_saes(model, "harvest reads")
    if (texts is None) == (input_ids is None):
        raise ValueError(
            "pass exactly one of texts (with tokenizer) and input_ids; got "
            + ("neither." if texts is None else "both.")
        )
    if texts is not None and tokenizer is None:
        raise ValueError(
            "texts were given without a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)."
        )
    attention_mask = _check_token_arrays(input_ids, attention_mask)
    n_tokens = _check_positive_int(n_tokens, "n_tokens", allow_none=True)
    batch_size = _check_positive_int(batch_size, "batch_size")
    max_length = _check_positive_int(max_length, "max_length", allow_none=True)
    if pack and (texts is None or max_length is None):
        raise ValueError("pack=True packs texts into sequences of max_length tokens: pass texts (with tokenizer) "
                         "and an int max_length" + (", not input_ids." if texts is None else "."))
    if texts is not None and not pack:
        _check_room_for_text(tokenizer, max_length)
    texts = _corpus_or_texts(texts)
    try:
        store = np.dtype(dtype)
    except (TypeError, ValueError):  # not a dtype at all, as 'x'
        store = None
    if store not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be numpy.float32 or numpy.float16 (the storage dtype of X and Y), got "
                         f"{dtype!r}.")
    special = None
    if exclude_special_tokens:
        special = _special_ids(model, tokenizer)
        if not special:
            raise ValueError(
                "exclude_special_tokens=True, but no special token ids are known: pass the tokenizer "
                "(its all_special_ids are used) or set them in model.config."
            )
        special = torch.tensor(sorted(special), dtype=torch.long)
    if pack:
        batches = _packed_batches(texts, tokenizer, batch_size, max_length)
    elif texts is not None:
        batches = _text_batches(texts, tokenizer, batch_size, max_length)
    else:
        batches = _id_batches(input_ids, attention_mask, batch_size)

    runner = _unwrap(model)
    device = next(runner.parameters()).device
    captured = {}

    def grab_input(module, args, kwargs):
        captured["x"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))

    def grab_output(module, args, output):
        captured["y"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _HarvestStop

    if out is not None:
        sink = _FileSink(_out_folder(out), store)
    else:
        bound = _token_bound(texts, input_ids, max_length, pack, tokenizer)
        sink = _MemorySink(n_tokens if bound is None or (n_tokens is not None and n_tokens < bound) else bound)
    bar = _progress_bar(progress, n_tokens)
    # The hooks sit on the model, so they fire for whoever runs it: another harvest (or any
    # forward) of the same model in another thread would put its rows here, or be stopped.
    handles = [this_threads_pre_hook(layout.input_module, grab_input),
               this_threads_forward_hook(layout.output_module, grab_output)]
    written = first_row = 0
    try:
        with torch.no_grad(), _eval_mode(runner):
            for ids, mask in batches:
                row, first_row = first_row, first_row + ids.shape[0]
                if ids.numel() == 0:
                    continue
                captured.clear()
                try:
                    run_model(runner, ids.to(device), mask.to(device), first_row=row)
                except _HarvestStop:
                    pass
                if "y" not in captured or "x" not in captured:
                    raise RuntimeError(
                        f"the forward hooks on layer {layout.layer}'s MLP did not fire during "
                        f"{type(runner).__name__}.forward; this model calls its MLP in an unexpected way."
                    )
                keep = mask.bool()
                if special is not None:
                    keep &= ~torch.isin(ids, special)
                x, y = _token_rows(captured["x"], keep), _token_rows(captured["y"], keep)
                tok = ids[keep.to(ids.device)].cpu().numpy().astype(np.int32)
                if n_tokens is not None:
                    x, y, tok = x[: n_tokens - written], y[: n_tokens - written], tok[: n_tokens - written]
                with np.errstate(over="ignore"):  # float16 overflow is reported just below
                    x_store, y_store = x.astype(store), y.astype(store)
                if store == np.float16 and not (np.isfinite(x_store).all() and np.isfinite(y_store).all()):
                    raise ValueError(
                        f"MLP activations of layer {layout.layer} exceed the float16 range (max |x| "
                        f"{np.abs(x).max():.3g}, max |y| {np.abs(y).max():.3g} > 65504): use dtype=np.float32."
                    )
                sink.append("X", x_store)
                sink.append("Y", y_store)
                sink.append("token_ids", tok)
                written += len(x)
                if bar is not None:
                    bar.update(len(x))
                if n_tokens is not None and written >= n_tokens:
                    break
    except BaseException:
        sink.abort()
        raise
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    if written == 0:
        sink.abort()
        raise ValueError(
            "no tokens were captured: the input is empty, or every token is padding"
            + (" or special (exclude_special_tokens=True)." if special is not None else ".")
        )
    if n_tokens is not None and written < n_tokens:
        warn(f"harvest captured {written} tokens, fewer than n_tokens={n_tokens}: the input ran out. "
             f"Pass more texts / input_ids for more.")
    try:
        result = sink.result(store)
    except BaseException:
        sink.abort()  # result already cleaned up after a failed write; this is for anything else
        raise
    if return_tokens:
        return result["X"], result["Y"], result["token_ids"]
    return result["X"], result["Y"]

"""Texts of a corpus on disk, read lazily: text, JSON Lines and Parquet files, compressed or not,
or a folder of shards (:func:`texts_of_file`), for :class:`~sklearn_jsae.hf.ActivationStream`
and the ``train`` command."""

from __future__ import annotations

import json
import os

# The files a corpus folder's texts are read from, in sorted order (shards of one corpus); text and
# JSON Lines files may be compressed.
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet") + tuple(
    plain + compressed for plain in (".txt", ".jsonl") for compressed in COMPRESSIONS)


# UTF-8, a byte-order mark (which some Windows tools write) dropped: it would otherwise start the
# first text, and make a .jsonl file's first line fail to parse.
ENCODING = "utf-8-sig"


def check_corpus_path(path) -> None:
    """Raise a ValueError naming ``texts`` unless ``path`` (a corpus given as a path) exists."""
    if not os.path.exists(path):
        raise ValueError(f"texts={os.fspath(path)!r} is not a file; pass a corpus file's path (text, .jsonl, "
                         f".parquet) or folder, or a list of str.")


def _open_text(path: str):
    """A UTF-8 text stream of ``path``, decompressed on the fly by its suffix (``.gz``, ``.bz2``,
    ``.xz``: the standard library; ``.zst``: the zstandard package)."""
    import bz2
    import gzip
    import io
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    suffix = os.path.splitext(path)[1].lower()
    if suffix in openers:
        return openers[suffix](path, "rt", encoding=ENCODING)
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path!r} needs zstandard: pip install zstandard (or "
                              f"sklearn-jsae[corpora]).") from None
        raw = open(path, "rb")  # noqa: SIM115 - closed with the text stream
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding=ENCODING)
    return open(path, encoding=ENCODING)  # noqa: SIM115 - the caller's with closes it


def texts_of_file(path):
    """The texts of a corpus file, read lazily.

    - a UTF-8 text file: one text per non-empty line;
    - a ``.jsonl`` file (JSON Lines, as corpora such as the Pile ship): one text per line, the
      line's JSON object's ``"text"`` field (which may hold newlines) or a JSON string;
    - either of them compressed (``.gz``, ``.bz2``, ``.xz``, or ``.zst`` with zstandard, as in the
      Pile's ``.jsonl.zst``), decompressed as it is read;
    - a ``.parquet`` file (as the Hugging Face Hub stores datasets): its ``"text"`` column, read
      one row group at a time (needs pyarrow);
    - a folder: the files in it with one of these suffixes, in sorted order (a corpus's shards).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        shards = sorted(name for name in os.listdir(path) if name.lower().endswith(TEXT_FILE_SUFFIXES))
        if not shards:
            raise ValueError(f"texts={path!r} is a folder without corpus files (.txt, .jsonl or .parquet, the "
                             f"first two possibly compressed: {', '.join(COMPRESSIONS)}); pass a corpus file, or "
                             f"a folder of its shards.")
        for name in shards:
            yield from texts_of_file(os.path.join(path, name))
        return
    name = path.lower()  # suffixes in any case: CORPUS.JSONL.GZ is JSON Lines too
    if name.endswith(".parquet"):
        yield from _parquet_texts(path)
        return
    jsonl = name.removesuffix(os.path.splitext(name)[1] if name.endswith(COMPRESSIONS) else "").endswith(".jsonl")
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if not jsonl:
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path!r}, line {number}, is not JSON ({error.msg}); a .jsonl file holds one "
                                 f"JSON object per line.") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise ValueError(f"{path!r}, line {number}: expected an object with a \"text\" string field or a "
                                 f"JSON string, got {found}. Rename the text field to \"text\".")
            if text:  # an empty text is no text, as an empty line or parquet row is not
                yield text


def _parquet_texts(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path!r} needs pyarrow: pip install pyarrow (datasets brings it).") from None
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise ValueError(f"{path!r} has no \"text\" column (its columns: {file.schema_arrow.names}); rename the "
                         f"text column to \"text\".")
    for batch in file.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:  # a null or empty row is no text, as an empty line is not
                yield text

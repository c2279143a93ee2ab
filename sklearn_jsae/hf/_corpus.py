"""Texts of a corpus on disk, read lazily: text, JSON Lines and Parquet files, compressed or not,
or a folder of shards (:func:`texts_of_file`), for :class:`~sklearn_jsae.hf.ActivationStream`
and the ``train`` command."""

from __future__ import annotations

import io
import json
import os

from .._backend.files import not_a_regular_file

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


def _open_binary(path: str):
    """The bytes of ``path``, decompressed on the fly by its suffix (``.gz``, ``.bz2``, ``.xz``: the
    standard library; ``.zst``: the zstandard package)."""
    import bz2
    import gzip
    import lzma

    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    suffix = os.path.splitext(path)[1].lower()
    if suffix in openers:
        return openers[suffix](path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"reading {path!r} needs zstandard: pip install zstandard (or "
                              f"sklearn-jsae[corpora]).") from None
        return io.BufferedReader(_ZstdReader(path, zstandard))
    return open(path, "rb")  # noqa: SIM115 - the caller's with closes it


def _open_text(path: str):
    """A UTF-8 text stream of ``path``, decompressed on the fly by its suffix (:func:`_open_binary`)."""
    return io.TextIOWrapper(_open_binary(path), encoding=ENCODING)


def _first_line_not_utf8(path: str) -> int | None:
    """The number of the first line of ``path`` that is not UTF-8 (a decoding error's position is
    in a block read ahead, not a line); None if it cannot be found."""
    try:
        # Lines split as the text reader splits them (a lone \r ends one too), so that this number
        # and the "after line N" of other errors count alike: latin-1 maps every byte to one char.
        with _open_binary(path) as f, io.TextIOWrapper(f, encoding="latin-1", newline=None) as text:
            for number, line in enumerate(text, 1):
                try:
                    line.encode("latin-1").decode("utf-8")  # a byte-order mark is UTF-8 too
                except UnicodeDecodeError:
                    return number
    except Exception:  # noqa: BLE001 - only a better message is lost: the error is raised anyway
        return None
    return None


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, every frame of it (a file may hold several, as
    pzstd writes them); a file that ends inside a frame raises ``EOFError``, as a truncated
    ``.gz`` does.  (zstandard's ``stream_reader`` ends quietly at a truncated frame, and at the
    end of the first frame: a cut or multi-frame corpus would read as a shorter one.)"""

    CHUNK = 1 << 17

    def __init__(self, path, zstandard):
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this reader
        self._context = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read, None between frames
        self._out, self._at = b"", 0  # decompressed bytes not yet read, and how many of them were
        self._ended = False

    def readable(self):
        return True

    def readinto(self, target):
        while self._at == len(self._out):
            if self._ended:
                return 0
            data = self._file.read(self.CHUNK)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                self._ended = True
                return 0
            pieces = []
            while data:
                if self._frame is None:
                    self._frame = self._context.decompressobj()
                pieces.append(self._frame.decompress(data))
                data = b""
                if self._frame.eof:  # a frame ends here: what follows is the next one's
                    data, self._frame = self._frame.unused_data, None
            self._out, self._at = b"".join(pieces), 0
        n = min(len(target), len(self._out) - self._at)
        target[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def close(self):
        self._file.close()
        super().close()


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
            kind = not_a_regular_file(os.path.join(path, name))
            if kind is not None:  # a link to the folder itself recursed 40 levels, rereading its texts
                raise ValueError(f"corpus folder {path!r} holds {name!r}, which is {kind}, not a corpus file; "
                                 f"remove it from the folder (shards are the folder's own files).")
            yield from texts_of_file(os.path.join(path, name))
        return
    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO blocked the read forever
        raise ValueError(f"corpus file {path!r} is {kind}; pass a corpus file or a folder of its shards.")
    name = path.lower()  # suffixes in any case: CORPUS.JSONL.GZ is JSON Lines too
    where = {"line": 0, "row": None}  # the last line (or parquet row) read, for an error's message
    try:
        if name.endswith(".parquet"):
            yield from _parquet_texts(path, where)
        else:
            yield from _lines_texts(path, name, where)
    except GeneratorExit:
        # Closed before its end (a stream stopped early, or finalised at the interpreter's exit,
        # where _read_errors' imports fail: "Exception ignored ... ImportError: sys.meta_path is
        # None" after a command's last line): matched here, before that clause is evaluated.
        raise
    except _read_errors() as error:
        # The codec's or pyarrow's own error names neither the file nor, in a folder, the shard.
        at = (f" after row {where['row']}" if where["row"]
              else f" after line {where['line']}" if where["line"] else "")
        if isinstance(error, UnicodeDecodeError):
            bad = _first_line_not_utf8(path)
            line = "" if bad is None else f", line {bad},"
            raise ValueError(  # noqa: TRY004 - the file's content is wrong, as for every corpus error here
                f"corpus file {path!r}{line} is not UTF-8 text ({error}); convert it to UTF-8 (iconv -f latin1 "
                f"-t utf-8, say) or remove it from the corpus.") from error
        fix = ("check that it exists and can be read" if isinstance(error, OSError) and error.errno is not None
               else "it is truncated or damaged: write or download it again")  # an errno: the system's refusal
        raise ValueError(f"corpus file {path!r} could not be read{at} ({type(error).__name__}: {error}); {fix}, "
                         f"or remove it from the corpus.") from error


def _read_errors() -> tuple:
    """The errors a damaged file raises while read: the codecs', and pyarrow's and zstandard's when
    they are loaded (an error of one that is not loaded cannot have been raised)."""
    import lzma
    import sys
    import zlib

    errors = [UnicodeDecodeError, EOFError, OSError, lzma.LZMAError, zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        error = getattr(sys.modules.get(module), name, None)  # the module may be None: import refused
        if isinstance(error, type):
            errors.append(error)
    return tuple(errors)


# The longest line a corpus may have (characters): one text, or one JSON document, per line.  A
# file without newlines (or a decompression bomb of one) was read whole into memory.
MAX_LINE = 64 << 20


def _bounded_lines(f, path, limit=None):
    """The lines of the text stream ``f``, each read at most ``limit`` characters at a time; a longer
    one raises ``ValueError`` naming the file and the line."""
    limit = MAX_LINE if limit is None else limit
    number = 0
    while True:
        line = f.readline(limit)
        if not line:
            return
        number += 1
        if len(line) == limit and not line.endswith(("\n", "\r")):
            raise ValueError(f"corpus file {path!r}, line {number}, is longer than {limit:,} characters (no newline "
                             f"within them): one text or JSON document per line is expected; split the file into "
                             f"lines.")
        yield line


def _lines_texts(path, name, where):
    jsonl = name.removesuffix(os.path.splitext(name)[1] if name.endswith(COMPRESSIONS) else "").endswith(".jsonl")
    with _open_text(path) as f:
        for number, line in enumerate(_bounded_lines(f, path), 1):
            where["line"] = number
            line = line.strip()
            if not line:
                continue
            if not jsonl:
                yield line
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # (an int past 4,300 digits, nesting past the limit)
                reason = error.msg if isinstance(error, json.JSONDecodeError) else f"{type(error).__name__}: {error}"
                raise ValueError(f"{path!r}, line {number}, is not JSON ({reason}); a .jsonl file holds one "
                                 f"JSON object per line.") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise ValueError(f"{path!r}, line {number}: expected an object with a \"text\" string field or a "
                                 f"JSON string, got {found}. Rename the text field to \"text\".")
            if text:  # an empty text is no text, as an empty line or parquet row is not
                yield text


def _parquet_texts(path, where):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path!r} needs pyarrow: pip install pyarrow (datasets brings it).") from None
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise ValueError(f"{path!r} has no \"text\" column (its columns: {file.schema_arrow.names}); rename the "
                         f"text column to \"text\".")
    kind = file.schema_arrow.field("text").type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    strings = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None), pa.types.is_null)
    if not any(is_kind is not None and is_kind(value_kind) for is_kind in strings):
        # Its ints or lists would reach the tokenizer, which fails without naming the file.
        raise ValueError(f"{path!r}: the \"text\" column holds {kind}, not strings; cast it to strings "
                         f"(table.set_column(..., pyarrow.compute.cast(column, pyarrow.string())) or put the texts "
                         f"in a string column named \"text\".")
    where["row"] = 0
    for batch in file.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:  # a null or empty row is no text, as an empty line is not
                yield text
        where["row"] += batch.num_rows

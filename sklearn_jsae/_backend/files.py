"""The permissions of the files this package writes through a temporary (atomic) file.

safetensors' writer (and ``tempfile.mkstemp``) creates its file readable by its owner alone
(0600), whatever the umask, and the rename keeps that: a model, an export or a checkpoint written
on a shared cluster could not be read by the owner's group, as a file written with ``open`` (0666
less the umask) can.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import socket
import threading
import time

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    ``/proc/self/status``); elsewhere set and put back at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def give_default_mode(path: str, replacing: str | None = None) -> None:
    """Give ``path`` the mode ``open`` would give the file ``replacing`` (the one it is about to be
    renamed over): that file's own mode when it exists (a model the user made private stays so),
    else a new file's, 0666 less the umask."""
    import stat

    try:
        mode = stat.S_IMODE(os.stat(replacing).st_mode) if replacing is not None else None
    except OSError:
        mode = None
    os.chmod(path, 0o666 & ~umask() if mode is None else mode)


def temporary_prefix(path: str) -> str:
    """The prefix of the temporaries written beside ``path`` (``.<name>.``), its name cut so that a
    temporary's (the prefix, its writer's name, its 8 random characters and ``.tmp``) stays within
    the 255 bytes a file name may have: a legal name of 242-255 bytes could not be saved."""
    name = os.path.basename(path).encode()[:150].decode(errors="ignore")
    return f".{name}."


# This machine's name as it goes into temporary files' names (letters, digits and _ only).
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"

# A temporary untouched this long is a killed writer's, whoever wrote it (a write takes seconds).
STALE_SECONDS = 3600


def writer_prefix(prefix: str) -> str:
    """``prefix`` with this process's name (machine and pid) for :func:`new_temporary`: a temporary a
    kill left behind (a SIGKILL runs no cleanup) is then known as a dead writer's, and removed by
    :func:`remove_dead_temporaries` at the next write of the same file."""
    return f"{prefix}{HOST}-{os.getpid()}."


def writer_alive(rest: str, path: str) -> bool:
    """Whether the writer of the temporary ``path``, named ``<prefix><rest>``, may still be writing
    it: a live process of this machine, or one we cannot see (another machine's, or any on Windows)
    that touched it within the last hour; False for a dead one's, and for a name without a writer
    (written before writers were named)."""
    match = re.match(r"([A-Za-z0-9_]+)-(\d+)\.", rest)
    if match is None:
        return False
    host, pid = match.group(1), int(match.group(2))
    if pid == os.getpid() and host == HOST:
        return True
    if host != HOST or os.name == "nt":  # (os.kill(pid, 0) is a Ctrl-C on Windows)
        try:
            return time.time() - os.path.getmtime(path) < STALE_SECONDS
        except OSError:  # removed meanwhile
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def new_temporary(folder: str, prefix: str, suffix: str = ".tmp") -> str:
    """Create an empty file ``<folder>/<prefix><8 random characters><suffix>`` and return its path:
    ``tempfile.mkstemp``'s guarantees (a name no one else has, created exclusively, so a planted
    link is never followed) without a bare descriptor.  mkstemp's ``os.open`` hands one back that a
    Ctrl-C arriving just then left open, with its file, until the process ended (14 of 400 random
    interrupts of small checkpointed fits); ``open(..., "xb")`` wraps it as it is made, and it is
    closed here.  The file's mode is a new file's (``open``'s), not mkstemp's 0600."""
    import secrets

    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            with open(path, "xb"):
                return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused temporary name {prefix}*{suffix} in {folder!r}")


def sync_folder(folder) -> None:
    """``fsync`` the folder itself, after a rename in it: the renamed file's own ``fsync`` makes its
    bytes durable, not its new name, which POSIX leaves to the folder's (after a power cut or a
    kernel crash the folder could still list the old file, or none).  Nothing is done where a
    folder cannot be opened or synced (Windows, some network file systems)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# What follows the prefix in a temporary's name: its writer (machine and pid) and 8 random
# characters, or those alone (written before writers were named).  Anything else that matches
# the prefix is another file's (``.model.`` is also the start of ``.model.safetensors.``'s).
_TEMPORARY_REST = re.compile(r"(?:[A-Za-z0-9_]+-\d+\.)?[A-Za-z0-9_]+\.tmp")


def remove_dead_temporaries(folder: str, prefix: str) -> None:
    """Remove the temporaries ``<prefix>*.tmp`` in ``folder`` whose writers are dead (killed part-way
    through a write); live writers' (another process writing the same file now), and files whose
    names only start like this path's temporaries, are left alone.  Called once the new file is in
    place: one that cannot be removed (another user's, in a shared folder) is left, rather than
    failing a write that succeeded."""
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        rest = os.path.basename(stale)[len(prefix):]
        if _TEMPORARY_REST.fullmatch(rest) and not writer_alive(rest, stale):
            with contextlib.suppress(OSError):
                os.remove(stale)


@contextlib.contextmanager
def cache_folder(kind: str):
    """A temporary folder for a command's cache of the MLP's pass (``jsae_<kind>_<writer>.XXXXXXXX``
    in the system's temporary folder), removed when the block ends.  A SIGKILL runs no cleanup
    (45-90 MB each for ``evaluate``): such folders of dead writers, and unnamed ones (written before
    writers were named) untouched for an hour, are removed when the next one is made."""
    import shutil
    import tempfile

    prefix = f"jsae_{kind}_"
    root = tempfile.gettempdir()
    for stale in glob.glob(os.path.join(glob.escape(root), glob.escape(prefix) + "*")):
        rest = os.path.basename(stale)[len(prefix):]
        if os.path.islink(stale) or not os.path.isdir(stale):
            continue
        if re.fullmatch(r"[A-Za-z0-9_]+-\d+\.[A-Za-z0-9_]+", rest):
            dead = not writer_alive(rest, stale)
        else:
            try:
                dead = bool(re.fullmatch(r"[A-Za-z0-9_]+", rest)) and time.time() - os.path.getmtime(stale) > STALE_SECONDS
            except OSError:  # removed meanwhile
                dead = False
        if dead:
            shutil.rmtree(stale, ignore_errors=True)  # (another user's: not ours to remove, and left)
    with tempfile.TemporaryDirectory(prefix=writer_prefix(prefix)) as folder:
        yield folder


def write_failed(path: str, exc: BaseException,
                 kept: str = "the previous file there, if any, is intact") -> OSError:
    """An ``OSError`` naming ``path`` for a write that failed (safetensors' ``SafetensorError``,
    which a full disk raises, is not an ``OSError`` and names no path), saying what was ``kept``
    and what to do."""
    import errno as errno_module
    import re

    number, reason = getattr(exc, "errno", None), getattr(exc, "strerror", None)
    if number is None:  # safetensors: "... No space left on device (os error 28)"
        found = re.search(r"os error (\d+)", str(exc))
        if found:
            number = int(found.group(1))
            reason = os.strerror(number)
    reason = reason or str(exc) or type(exc).__name__
    number = errno_module.EIO if number is None else number
    advice = ("free space on its disk, or write elsewhere" if number == errno_module.ENOSPC else
              "check that the folder can be written, or write elsewhere")
    return OSError(number, f"cannot write {path!r} ({reason}): {kept}; {advice}")


def not_a_regular_file(path) -> str | None:
    """What ``path`` is when it is not a regular file (after symlinks), as a phrase ("a FIFO"), else
    None.  Reading a FIFO blocks until something writes to it: a file standing in for a model,
    a checkpoint or a corpus shard hung the reader forever."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the reader's own error says so
    for test, what in ((stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def lock_folder(folder) -> int | None:
    """An exclusive ``flock`` on ``folder`` itself (nothing is added to it), as an open descriptor:
    close it to let go.  Raises ``BlockingIOError`` when another process (or another open of the
    folder) holds it.  None where there is no ``flock`` (Windows), or where the file system has
    none for folders (NFS: EBADF, Lustre without ``-o flock``: ENOSYS): there nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(descriptor)
        if isinstance(exc, BlockingIOError):
            raise
        return None
    except BaseException:  # a Ctrl-C with the lock taken: nothing would ever let go of it
        os.close(descriptor)
        raise
    return descriptor

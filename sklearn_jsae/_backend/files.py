"""The permissions of the files this package writes through a temporary (atomic) file.

``tempfile.mkstemp`` creates its file readable by its owner alone (0600), whatever the umask, and
the rename keeps that: a model, an export or a checkpoint written on a shared cluster could not be
read by the owner's group, as a file written with ``open`` (0666 less the umask) can.
"""

from __future__ import annotations

import os
import threading

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    ``/proc/self/status``); elsewhere set and put back at once, under a lock."""
    try:
        with open("/proc/self/status") as status:
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

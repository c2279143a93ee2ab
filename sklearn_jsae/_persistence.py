"""Saving and loading fitted estimators without pickle, and pickles that know their version.

``estimator.save(path)`` writes one safetensors file (tensors, plus a JSON description in its
header; the format is described in :mod:`sklearn_jsae._model_file`) and
:func:`sklearn_jsae.load` reads it back without executing anything.  Pickles, which
scikit-learn and joblib still need, carry the library and format versions.

Compatibility
-------------
One version number covers files and pickles.  A change to the fitted attributes bumps the minor
version; a change to the file layout that old readers cannot follow bumps the major.

* Files load in any sklearn-jsae that reads the same major version and an equal or newer minor
  (format 1.0 files load in every 1.x reader); a file from a newer minor or another major is
  refused, naming the version that wrote it.
* Pickles (which scikit-learn and joblib still need) hold private attributes, so they load only
  in a version with the same major.minor format; anything else, or a pickle without the stamp,
  is refused with the advice to unpickle with the writing version and ``save`` from there.
"""

from __future__ import annotations

import os
import tempfile

from .exceptions import PersistenceError

FORMAT_VERSION = "1.0"
_PICKLE_KEY = "_sklearn_jsae_pickle"


# ---------------------------------------------------------------------------- the mixin
class PersistenceMixin:
    """``save(path)`` and version-stamped pickling for the sklearn-jsae estimators."""

    def save(self, path):
        """Save the fitted estimator to ``path`` (one safetensors file; no pickle).

        Tensors go in safetensors, everything else (parameters, scales, history, the library
        and format versions, the training device, a JSAE's MLP kind and weights) in JSON inside
        the file's header.  Load it with :func:`sklearn_jsae.load`; loading never runs code.
        A JSAE whose ``mlp`` is an arbitrary callable is saved without it, but with its outputs
        on a few training rows, against which :func:`sklearn_jsae.load` checks the ``mlp`` passed
        back.  The file is written to a temporary name and renamed into
        place, so ``path`` always holds a complete file.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write (replaced if it exists).  Any name works;
            ``.safetensors`` lets other tools recognise it.

        Returns
        -------
        path : str
            The path written.

        Raises
        ------
        PersistenceError
            If a fitted array (weights, ``jacobian_``) or ``scale_`` / the fit's ``l1`` holds NaN
            or inf: :func:`sklearn_jsae.load` would refuse the file.  The message names the
            attribute; nothing is written and a file already at ``path`` is left as it was.

        Examples
        --------
        >>> import os, tempfile, numpy as np
        >>> from sklearn_jsae import TopKSparseAutoencoder, load
        >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
        >>> sae = TopKSparseAutoencoder(n_components=16, k=4, max_iter=3, random_state=0).fit(X)
        >>> path = sae.save(os.path.join(tempfile.mkdtemp(), "sae.safetensors"))
        >>> bool((load(path).transform(X) != sae.transform(X)).nnz == 0)
        True
        """
        from ._model_file import save

        return save(self, path)

    def __getstate__(self):
        from . import __version__

        state = dict(super().__getstate__())  # Python's default returns __dict__ itself: copy it
        state[_PICKLE_KEY] = {"format_version": FORMAT_VERSION, "library_version": __version__}
        return state

    def __setstate__(self, state):
        state = dict(state)
        check_pickle_stamp(type(self).__name__, state.pop(_PICKLE_KEY, None))
        super().__setstate__(state)


def check_pickle_stamp(name: str, stamp) -> None:
    """Raise :class:`PersistenceError` unless ``stamp`` is this version's pickle format."""
    from . import __version__

    advice = (f"Unpickle it with the sklearn-jsae version that pickled it and save it with "
              f"estimator.save(path): sklearn_jsae.load reads such files across versions "
              f"(this is sklearn-jsae {__version__}, persistence format {FORMAT_VERSION}).")
    if not isinstance(stamp, dict):
        raise PersistenceError(
            f"this {name} pickle records no sklearn-jsae version: it was pickled before pickles "
            f"were version-stamped, or its state was altered, and its private attributes may not "
            f"match this version. {advice}"
        )
    if stamp.get("format_version") != FORMAT_VERSION:
        raise PersistenceError(
            f"this {name} was pickled by sklearn-jsae {stamp.get('library_version')!r} with "
            f"persistence format {stamp.get('format_version')!r}; pickles hold private "
            f"attributes and load only under the same format. {advice}"
        )



def write_atomically(path, write) -> str:
    """Call ``write(temporary_path)`` then rename the temporary file over ``path``.

    A symbolic link is followed: the file it points to is replaced and the link stays (the rename
    replaced the link itself with a regular file, leaving its target stale).  A path that exists
    and is not a regular file (``/dev/null``, a FIFO, ``/dev/fd/N`` of a shell's ``>(...)``) is
    written through, as ``open`` writes it: a rename replaced the device node with a file (as
    root, ``/dev/null`` itself), or failed after the work.
    """
    path = os.fspath(path)
    from ._backend.files import not_a_regular_file

    special = not_a_regular_file(path)
    if special is not None and special != "a folder":
        return _write_through(path, write)
    given = path  # returned as given (a link's name, not its target's)
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a folder; pass a file path such as {os.path.join(path, 'model.safetensors')!r}."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist; create it first "
                                f"(os.makedirs) or pass a path in an existing folder.")
    from ._backend.files import (
        give_default_mode,
        new_temporary,
        remove_dead_temporaries,
        sync_folder,
        temporary_prefix,
        write_failed,
        writer_prefix,
    )

    # named after its writer: one a kill left behind (full size: it may be what fills the disk) is
    # removed by the next write of this path, before it writes
    remove_dead_temporaries(folder, temporary_prefix(path))
    try:
        temporary = new_temporary(folder, writer_prefix(temporary_prefix(path)))
    except OSError as exc:  # a read-only folder, one without write permission
        raise write_failed(path, exc) from exc
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        # After the write: safetensors' writer sets 0600, which would leave the file unreadable
        # to the owner's group.
        give_default_mode(temporary, replacing=path)
        os.replace(temporary, path)
        sync_folder(folder)
    except Exception as exc:
        # A full disk: safetensors raises its own SafetensorError (not an OSError, naming no path),
        # an fsync a bare OSError; both are said with the path.  Other errors are the caller's.
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise write_failed(path, exc) from exc
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    remove_dead_temporaries(folder, temporary_prefix(path))
    return given


def save_figure(fig, path, **savefig_kwargs) -> str:
    """``fig.savefig(path)`` through :func:`write_atomically`: a kill or a full disk part-way
    through left a truncated image in place of the previous one.  The format is ``path``'s suffix
    (the temporary's is ``.tmp``), or matplotlib's default without one."""
    import matplotlib

    kind = os.path.splitext(path)[1][1:].lower() or matplotlib.rcParams["savefig.format"]
    return write_atomically(path, lambda temporary: fig.savefig(temporary, format=kind, **savefig_kwargs))


def _write_through(path: str, write) -> str:
    """``write`` to a temporary file, then its bytes into ``path``, a file that is not a regular
    one (a device, a FIFO), opened as ``open`` opens it."""
    import shutil

    from ._backend.files import new_temporary, not_a_regular_file, write_failed

    temporary = None
    try:
        temporary = new_temporary(tempfile.gettempdir(), "jsae_write_")
        write(temporary)
        with open(temporary, "rb") as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target)
    except OSError as exc:
        raise write_failed(path, exc, kept=f"it is {not_a_regular_file(path) or 'not a regular file'}, "
                                            f"written in place, and the write did not complete") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
    return path



def load(path, *, mlp=None):
    """Load an estimator saved with ``estimator.save(path)``; no code is executed.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :meth:`TopKSparseAutoencoder.save` or
        :meth:`JacobianSparseAutoencoder.save`.
    mlp : None, torch.nn.Module or callable, default=None
        Only for a JacobianSparseAutoencoder.  A JSAE's MLP is saved with it when it has a
        closed form (None, ``nn.Identity``, ``nn.Linear``, ``nn.Sequential(Linear, act,
        Linear)``, the :mod:`sklearn_jsae.mlp` modules and every :func:`sklearn_jsae.hf.mlp_of`
        map), and the loaded model is fully functional without this argument.  Any other
        callable cannot be saved without pickling it: the loaded model's ``transform``,
        ``inverse_transform``, ``inverse_transform_output`` and ``jacobian_`` work, while
        ``transform_output``, ``mlp_outputs``, ``jacobian`` and ``score`` raise
        :class:`~sklearn_jsae.exceptions.MissingMLPError` until you load again passing the MLP
        here.  A given ``mlp`` replaces the saved one after a check that it reproduces the
        MLP outputs the file records on a few training rows, up to float32 rounding (for a
        callable, files written before these outputs were recorded for callables skip it).

    Returns
    -------
    estimator : TopKSparseAutoencoder or JacobianSparseAutoencoder
        Fitted, with the saved parameters and fitted attributes: ``transform``,
        ``inverse_transform``, ``transform_output``, ``jacobian`` and ``jacobian_`` equal the
        saved model's bit for bit on the same machine.  ``memory`` is None (a cache folder
        belongs to one machine); parameters listed in the file's ``dropped_params`` have their
        defaults.

    Raises
    ------
    PersistenceError
        If the file is truncated, damaged, not an sklearn-jsae model, written by an
        incompatible format version, or inconsistent (a tensor's shape or dtype differs from
        the description, a value of the description has the wrong type, or a weight or scale
        is NaN or inf).  Nothing is loaded.
    ValueError
        If ``mlp`` is given for a TopKSparseAutoencoder, fails on the recorded training rows,
        returns another number of features than the saved MLP, or is not the MLP the model
        was fitted with (its outputs there differ; the message says by how much).

    Examples
    --------
    >>> import os, tempfile, numpy as np, torch
    >>> from sklearn_jsae import JacobianSparseAutoencoder, load
    >>> torch.manual_seed(0) and None
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> X = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    >>> jsae = JacobianSparseAutoencoder(mlp=mlp, n_components=32, k=4, max_iter=3, random_state=0).fit(X)
    >>> path = jsae.save(os.path.join(tempfile.mkdtemp(), "jsae.safetensors"))
    >>> loaded = load(path)
    >>> bool(np.array_equal(loaded.jacobian(X[:5]).toarray(), jsae.jacobian(X[:5]).toarray()))
    True
    """
    from . import _model_file

    path = os.fspath(path)
    doc, arrays = _model_file.read(path)
    return _model_file.build(path, doc, arrays, mlp)

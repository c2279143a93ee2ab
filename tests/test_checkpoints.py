"""Checkpoints: a fit killed at any moment and run again ends with the uninterrupted model.

The kill test runs real subprocesses and sends SIGKILL at random moments, several times in a row,
then lets the fit finish; the result must equal an uninterrupted fit bit for bit (CPU, same
thread count).  Corrupted, foreign, version-mismatched and other-fit checkpoints are refused with
a clear error; an interrupted write never damages the previous checkpoint.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from distributed_worker import RowStream, fake_checkpoint_clock
import torch

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend import checkpoint as checkpoint_module
from sklearn_jsae._backend import trainer as trainer_module
import sklearn_jsae
from sklearn_jsae._backend.checkpoint import FILENAME, CheckpointError, checkpoint_paths

SETTINGS = dict(n_components=32, k=4, max_iter=3, batch_size=64, random_state=0, device="cpu", l1=0.5)


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.exponential(size=(600, 30)) * (rng.random((600, 30)) < 0.1) @ rng.normal(size=(30, 10))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))


def _model_arrays(est):
    sides = (est.input_sae_, est.output_sae_) if hasattr(est, "input_sae_") else (est,)
    arrays = {}
    for i, side in enumerate(sides):
        for name in ("components_", "encoder_", "encoder_bias_", "decoder_bias_"):
            arrays[f"{i}{name}"] = getattr(side, name)
    if hasattr(est, "jacobian_"):
        arrays["jacobian"] = est.jacobian_.toarray()
    return arrays


def _history(est):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in est.history_]


def _assert_same_model(a, b):
    left, right = _model_arrays(a), _model_arrays(b)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
    assert _history(a) == _history(b)


class _Interrupt(BaseException):
    pass


def _interrupt_at(monkeypatch, steps):
    """Make Trainer.step raise (like Ctrl-C) once at each optimiser step count in ``steps``."""
    real = trainer_module.Trainer.step
    pending = set(steps)

    def step(self, *args, **kwargs):
        if self.step_count in pending:
            pending.discard(self.step_count)
            raise _Interrupt(f"interrupted at step {self.step_count}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)


@pytest.mark.parametrize("make", [lambda mlp: JacobianSparseAutoencoder(mlp, **SETTINGS),
                                  lambda mlp: TopKSparseAutoencoder(**{k: v for k, v in SETTINGS.items() if k != "l1"})],
                         ids=["jsae", "topk"])
def test_interrupted_fit_resumes_to_the_uninterrupted_model(X, mlp, tmp_path, monkeypatch, make):
    expected = make(mlp).fit(X)
    est = make(mlp).set_params(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    _interrupt_at(monkeypatch, [3, 9, 24])  # mid-epoch, mid-epoch, just after an epoch boundary
    for _ in range(3):
        with pytest.raises(_Interrupt):
            est.fit(X)
        assert not hasattr(est, "history_")  # a failed fit leaves the estimator unfitted
    est.fit(X)
    _assert_same_model(est, expected)
    # Running the finished fit again reads the final checkpoint and trains nothing more.
    _assert_same_model(make(mlp).set_params(checkpoint_dir=str(tmp_path), checkpoint_every=2).fit(X), expected)


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from sklearn_jsae import JacobianSparseAutoencoder
    rng = np.random.default_rng(0)
    X = (rng.exponential(size=(6000, 30)) * (rng.random((6000, 30)) < 0.1) @ rng.normal(size=(30, 12))).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.GELU(), torch.nn.Linear(48, 12))
    folder, out = sys.argv[1], sys.argv[2]
    jsae = JacobianSparseAutoencoder(mlp, n_components=64, k=4, max_iter=4, batch_size=64, l1=0.5, device="cpu",
                                     random_state=0, checkpoint_dir=None if folder == "-" else folder,
                                     checkpoint_every=1)
    jsae.fit(X)
    np.savez(out, W_x=jsae.input_sae_.components_, E_x=jsae.input_sae_.encoder_,
             W_y=jsae.output_sae_.components_, E_y=jsae.output_sae_.encoder_, b_y=jsae.output_sae_.decoder_bias_,
             J=jsae.jacobian_.toarray(), loss=np.array([row["loss"] for row in jsae.history_]))
""")


def _kill_and_resume(script_text, tmp_path, max_kills, seed, max_delay):
    """Run ``script_text FOLDER OUT`` once uninterrupted (FOLDER ``-``: no checkpoints), then with a
    checkpoint folder, SIGKILLing it a random moment (up to ``max_delay`` s: mid-step, mid-write or
    between two) after each new checkpoint, up to ``max_kills`` times, and let the last run finish.
    Returns ``(expected, got, kills)``: the two runs' saved arrays and the kills that landed."""
    script = tmp_path / "fit.py"
    script.write_text(script_text)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    def written():
        """The modification time of the run's checkpoint (None before the first)."""
        paths = checkpoint_paths(tmp_path / "run")
        return os.stat(paths[0]).st_mtime_ns if paths else None

    def run(folder, out, chooser=None):
        """Whether the run finished (False: it was killed)."""
        before = written()
        proc = subprocess.Popen([sys.executable, str(script), folder, str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while chooser is not None and proc.poll() is None and time.monotonic() < deadline:
            if written() not in (None, before):
                time.sleep(chooser.uniform(0.0, max_delay))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return False
            time.sleep(0.01)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return True

    run("-", tmp_path / "expected.npz")
    chooser = random.Random(seed)
    kills = 0
    while kills < max_kills and not run(str(tmp_path / "run"), tmp_path / "got.npz", chooser):
        kills += 1
    if kills == max_kills:
        run(str(tmp_path / "run"), tmp_path / "got.npz")
    return np.load(tmp_path / "expected.npz"), np.load(tmp_path / "got.npz"), kills


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_model(tmp_path):
    expected, got, kills = _kill_and_resume(KILL_SCRIPT, tmp_path, max_kills=4, seed=1234, max_delay=0.5)
    assert kills >= 3, f"only {kills} kills landed before the fit finished; make the fit longer"
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # A kill during a write leaves its temporary file; the fit's next save removes it.
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".tmp")]


def _checkpointed(X, mlp, folder, **kw):
    """A checkpointed JSAE; ``folder`` is a pathlib.Path (other tests pass str)."""
    return JacobianSparseAutoencoder(mlp, **{**SETTINGS, "checkpoint_dir": folder, "checkpoint_every": 2, **kw})


def _the_checkpoint(folder):
    """The path of the one checkpoint in ``folder`` (one fit's)."""
    [path] = checkpoint_paths(folder)
    return Path(path)


def _header_of(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[checkpoint_module.FORMAT])


def _read_checkpoint(path):
    """``(header, tensors)`` of a checkpoint file, as written."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (json.loads(f.metadata()[checkpoint_module.FORMAT]),
                {name: f.get_tensor(name) for name in f.keys()})


def _write_checkpoint(path, header, tensors, digest=True):
    """Write a checkpoint as a writer other than this fit's would, with a digest that matches
    (``digest=False``: none, as version 1 wrote them)."""
    from safetensors.torch import save_file

    text = json.dumps(header)
    metadata = {checkpoint_module.FORMAT: text}
    if digest and hasattr(checkpoint_module, "DIGEST"):  # (none before checkpoints had one)
        metadata[checkpoint_module.DIGEST] = checkpoint_module._digest(text, tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_truncated_checkpoint_is_refused_and_nothing_is_loaded(X, mlp, tmp_path):
    _checkpointed(X, mlp, tmp_path).fit(X)
    path = _the_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    est = _checkpointed(X, mlp, tmp_path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*truncated"):
        est.fit(X)
    assert not hasattr(est, "input_sae_")


def test_foreign_and_other_version_checkpoints_are_refused(X, mlp, tmp_path):
    """In this fit's file: a foreign safetensors file, a text file, another format version."""
    from safetensors.torch import save_file

    _checkpointed(X, mlp, tmp_path).fit(X)
    path = _the_checkpoint(tmp_path)
    original = path.read_bytes()
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not an sklearn_jsae checkpoint"):
        _checkpointed(X, mlp, tmp_path).fit(X)
    path.write_text("not even safetensors")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        _checkpointed(X, mlp, tmp_path).fit(X)
    path.write_bytes(original)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    header = json.loads(metadata[checkpoint_module.FORMAT])
    future = max(checkpoint_module.READABLE_VERSIONS) + 1
    header["version"] = future
    save_file(tensors, str(path), metadata={checkpoint_module.FORMAT: json.dumps(header)})
    with pytest.raises(CheckpointError, match=f"format version {future}"):
        _checkpointed(X, mlp, tmp_path).fit(X)


def test_other_fits_keep_their_checkpoints_side_by_side_in_one_folder(X, mlp, tmp_path):
    """Another fit (other settings, data, MLP) in the same folder starts afresh in its own file, with a
    warning, and leaves the first fit's checkpoint byte for byte; each then resumes its own (a rerun
    of a finished fit trains nothing more: its model and history are those of the first run)."""
    from sklearn_jsae import exceptions

    assert exceptions.CheckpointError is CheckpointError
    fitted = _checkpointed(X, mlp, tmp_path).fit(X)
    first = _the_checkpoint(tmp_path)
    before = first.read_bytes()
    saved = fitted.save(tmp_path.parent / f"{tmp_path.name}.jsae")  # a Path parameter saves as str
    assert sklearn_jsae.load(saved, mlp=mlp).checkpoint_dir == str(tmp_path)
    other_penalty = "unit_gain" if _checkpointed(X, mlp, tmp_path).penalty == "paper" else "paper"
    other_mlp = torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))
    others = [(dict(l1=1.0), X, mlp, "settings"), (dict(penalty=other_penalty), X, mlp, "settings"),
              ({}, X[::-1].copy(), mlp, "data"), ({}, X, other_mlp, "mlp")]
    for kw, data, net, differs in others:  # fresh fits, equal to fits without a checkpoint
        existing = set(checkpoint_paths(tmp_path))
        with pytest.warns(UserWarning, match="holds checkpoints of other fits .* this fit starts afresh"):
            est = _checkpointed(X, net, tmp_path, **kw).fit(data)
        _assert_same_model(est, JacobianSparseAutoencoder(net, **{**SETTINGS, **kw}).fit(data))
        [new] = set(checkpoint_paths(tmp_path)) - existing
        identities = _header_of(first)["identity"], _header_of(new)["identity"]
        assert [key for key in identities[0] if identities[0][key] != identities[1][key]] == [differs]
    assert first.read_bytes() == before
    _assert_same_model(_checkpointed(X, mlp, tmp_path).fit(X), fitted)
    assert first.read_bytes() == before


@pytest.mark.parametrize("make", [lambda mlp, **kw: JacobianSparseAutoencoder(mlp, **SETTINGS, **kw),
                                  lambda mlp, **kw: TopKSparseAutoencoder(
                                      **{k: v for k, v in SETTINGS.items() if k != "l1"}, **kw)],
                         ids=["jsae", "topk"])
def test_interrupted_warm_start_resumes_and_its_checkpoint_is_its_own(X, mlp, tmp_path, monkeypatch, make):
    """A warm-started fit with a checkpoint folder: interrupted, it keeps the model it started
    from and resumes to the uninterrupted warm fit; the warm start's weights are part of the
    checkpoint's identity, so a cold fit does not pick up the warm fit's checkpoint."""
    expected = make(mlp, warm_start=True).fit(X)
    cold_end_loss, cold_start_loss = expected.history_[-1]["loss"], expected.history_[0]["loss"]
    expected.fit(X)
    assert len(expected.history_) == 2 * SETTINGS["max_iter"]
    # It started where the first fit ended, not afresh.
    assert abs(expected.history_[SETTINGS["max_iter"]]["loss"] - cold_end_loss) \
        < abs(cold_start_loss - cold_end_loss) / 2

    est = make(mlp, warm_start=True).fit(X)
    first_fit = _model_arrays(est)
    est.set_params(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, [13])
        with pytest.raises(_Interrupt):
            est.fit(X)
    for name, array in first_fit.items():
        np.testing.assert_array_equal(_model_arrays(est)[name], array, err_msg=name)
    warm_checkpoint = _the_checkpoint(tmp_path)
    est.fit(X)
    _assert_same_model(est, expected)
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        cold = make(mlp, checkpoint_dir=str(tmp_path)).fit(X)
    _assert_same_model(cold, make(mlp).fit(X))
    assert len(checkpoint_paths(tmp_path)) == 2 and warm_checkpoint.exists()


class _Residual(torch.nn.Module):
    """A module MLP without a closed form (the fit takes the JVP route)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))

    def forward(self, x):
        return self.inner(x) + 0.5 * x


def _scaled_tanh(x):
    return 2 * torch.tanh(x)


def _shifted_tanh(x):
    return torch.tanh(x) + 0.1


def test_callable_mlps_resume_and_are_told_apart(X, tmp_path, monkeypatch):
    """Custom modules are fingerprinted by their weights and plain functions by name: an
    interrupted fit resumes to the uninterrupted model, and another MLP does not resume it (its fit
    starts afresh, in its own file)."""
    for mlp, other in ((_Residual(0), _Residual(1)), (_scaled_tanh, _shifted_tanh)):
        folder = tmp_path / getattr(mlp, "__name__", "module")
        expected = JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X)
        est = _checkpointed(X, mlp, folder)
        with monkeypatch.context() as patch:
            _interrupt_at(patch, [11])
            with pytest.raises(_Interrupt):
                est.fit(X)
        est.fit(X)
        _assert_same_model(est, expected)
        with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
            _checkpointed(X, other, folder).fit(X)
        identities = [_header_of(path)["identity"] for path in checkpoint_paths(folder)]
        assert len(identities) == 2 and identities[0]["mlp"] != identities[1]["mlp"]
        assert {key for key in identities[0] if identities[0][key] != identities[1][key]} == {"mlp"}


MLP_MODULE = textwrap.dedent("""
    import torch

    def tanh_mlp(x):
        return torch.tanh(x) * {scale}

    def over(W):
        def mlp(x):
            return torch.tanh(x @ W)
        return mlp

    def over_array(A):  # a NumPy array closed over
        return lambda x: torch.tanh(x @ torch.as_tensor(A))

    def scaled_by(c):  # a number closed over
        return lambda x: c * torch.tanh(x)

    def nested(x):  # a code object among the constants (its repr holds an address)
        return (lambda v: torch.tanh(v) * 2)(x)

    def with_a_set(x):  # a frozenset constant (its order follows the process's string hashing)
        return torch.tanh(x) if "gelu" not in {{"relu", "tanh", "silu", "sigmoid", "swish"}} else x

    def over_module(block):  # a module closed over: its weights
        return lambda x: torch.tanh(block(x))

    BLOCKS = [torch.nn.Identity(), torch.nn.Tanh()]
    layer = 0

    def global_layer(x):  # globals it reads: a list of modules and the index of one
        return BLOCKS[layer](x)
""")


def _fingerprints(folder, scale, hash_seed="0"):
    """Fingerprints of the callables of MLP_MODULE written with ``scale``, in a fresh process."""
    (folder / "user_mlps.py").write_text(MLP_MODULE.format(scale=scale))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(folder)!r})
        import numpy as np
        import user_mlps
        from user_mlps import tanh_mlp, over, nested, with_a_set, over_array, scaled_by, over_module
        from sklearn_jsae._backend.checkpoint import fingerprint_module
        from sklearn_jsae._backend.mlp import CallableMap
        W = torch.eye(10, dtype=torch.float64)
        torch.manual_seed(0)
        A, B = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)
        fns = [tanh_mlp, over(W), over(2 * W), nested, with_a_set, over_array(np.eye(10)),
               over_array(2 * np.eye(10)), scaled_by(2.0), scaled_by(3.0), over_module(A), over_module(B),
               A.forward, B.forward, user_mlps.global_layer]
        prints = [fingerprint_module(CallableMap(fn, 10, 10)) for fn in fns]
        user_mlps.layer = 1
        print(" ".join(prints + [fingerprint_module(CallableMap(user_mlps.global_layer, 10, 10))]))
    """)
    # -B: no .pyc, which could outlive an edit of the same size within the same second.
    result = subprocess.run([sys.executable, "-B", "-c", script], check=True, capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed})
    return result.stdout.split()


def test_plain_function_fingerprints_see_edits_and_weights_and_are_stable(tmp_path):
    first, again, edited = (_fingerprints(tmp_path, scale, seed) for scale, seed in ((2, "0"), (2, "1"), (3, "2")))
    assert first == again  # the same across processes (string hashing too), nested code and sets included
    assert edited[0] != first[0] and edited[1:] == first[1:]  # an edited body is another MLP
    # the same function over other weights (a tensor, an array, a number, a module closed over, the
    # module of a bound method, a global index into a global list of modules) is another MLP
    assert first[1] != first[2] and first[5] != first[6] and first[7] != first[8]
    assert first[9] != first[10] and first[11] != first[12] and first[13] != first[14]
    assert len(set(first)) == len(first) == 15


def test_a_checkpoint_dir_that_is_a_file_is_named_and_left_alone(X, mlp, tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("my notes")
    est = _checkpointed(X, mlp, not_a_folder)
    with pytest.raises(NotADirectoryError, match=r"checkpoint_dir='.*notes.txt' is a file, not a folder"):
        est.fit(X)
    assert not_a_folder.read_text() == "my notes" and not hasattr(est, "input_sae_")


def test_checkpoints_with_corrupt_metadata_or_other_shapes_are_refused(X, mlp, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _checkpointed(X, mlp, tmp_path).fit(X)
    path = str(_the_checkpoint(tmp_path))
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors, path, metadata={checkpoint_module.FORMAT: metadata[checkpoint_module.FORMAT][:-5]})
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        _checkpointed(X, mlp, tmp_path).fit(X)
    name = next(n for n in tensors if not n.startswith("extra.") and tensors[n].ndim == 2)
    resized = {**tensors, name: tensors[name][:-1].clone()}
    _write_checkpoint(path, json.loads(metadata[checkpoint_module.FORMAT]), resized)  # its digest matches
    est = _checkpointed(X, mlp, tmp_path)
    with pytest.raises(CheckpointError, match=rf"does not match this fit's shapes \({name}\)"):
        est.fit(X)
    assert not hasattr(est, "input_sae_")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(X, mlp, tmp_path, monkeypatch):
    """A kill during a write: the temporary file is half-written, the checkpoint untouched."""
    from safetensors import torch as safetensors_torch

    est = _checkpointed(X, mlp, tmp_path, max_iter=1)
    est.fit(X)
    path = _the_checkpoint(tmp_path)
    before = path.read_bytes()
    real = safetensors_torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise _Interrupt("killed while writing")

    monkeypatch.setattr(safetensors_torch, "save_file", dies_half_way)
    with pytest.raises(_Interrupt):
        # the same fit's checkpointer (the same file), over the finished fit's checkpoint
        checkpoint_module.Checkpointer(tmp_path, 1, _header_of(path)["identity"]).save(_trainer_of(X), {"epoch": 0})
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_fit_without_a_seed_resumes_its_own_random_draws(X, mlp, tmp_path, monkeypatch):
    """``random_state=None`` draws a new seed per run, but the seed is not part of a fit's identity
    and the checkpoint holds every random state: the rerun continues the killed run (its first
    epoch's record and the remaining epochs' shuffles), not a fresh draw."""
    _interrupt_at(monkeypatch, [13])  # epoch 2 of 3 (10 steps per epoch); saved at step 12
    with pytest.raises(_Interrupt):
        _checkpointed(X, mlp, tmp_path, random_state=None).fit(X)
    written = _header_of(_the_checkpoint(tmp_path))["trainer"]
    assert written["step_count"] == 12 and len(written["history"]) == 1
    resumed = _checkpointed(X, mlp, tmp_path, random_state=None).fit(X)
    assert resumed.history_[0] == written["history"][0] and len(resumed.history_) == SETTINGS["max_iter"]
    fresh = _checkpointed(X, mlp, tmp_path / "fresh", random_state=None).fit(X)
    assert fresh.history_[0]["loss"] != resumed.history_[0]["loss"]  # another draw: a fresh fit differs


def test_fits_drawing_from_one_random_state_are_distinct_fits_and_a_rerun_resumes_each(X, mlp, tmp_path):
    """A seed study drawing in turn from one RandomState shared one checkpoint: every fit after the
    first returned the first's model.  Now the seed each draws is its identity, so a rerun that
    builds RandomState(0) again draws the same seeds and finds each its own checkpoint."""
    def study():
        state = np.random.RandomState(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "checkpoint_dir=.* holds checkpoints of other fits")
            return [_checkpointed(X, mlp, tmp_path, random_state=state).fit(X) for _ in range(2)]

    first, second = study()
    assert len(checkpoint_paths(tmp_path)) == 2
    state = np.random.RandomState(0)
    alone = [JacobianSparseAutoencoder(mlp, **{**SETTINGS, "random_state": state}).fit(X) for _ in range(2)]
    _assert_same_model(first, alone[0])
    _assert_same_model(second, alone[1])
    for fit, again in zip((first, second), study()):  # resumed from their finished checkpoints
        _assert_same_model(fit, again)
    assert len(checkpoint_paths(tmp_path)) == 2


def test_an_interrupted_random_state_fit_run_again_in_the_session_resumes(X, mlp, tmp_path, monkeypatch):
    """The seed a RandomState draws is a fit's identity, and the failed fit had advanced it: the
    rerun drew another seed and started afresh beside the interrupted checkpoint."""
    state = np.random.RandomState(0)
    before = state.get_state()[1].copy()
    est = _checkpointed(X, mlp, tmp_path, random_state=state)
    _interrupt_at(monkeypatch, [13])
    with pytest.raises(_Interrupt):
        est.fit(X)
    np.testing.assert_array_equal(state.get_state()[1], before)  # not advanced by the failed fit
    resumed = est.fit(X)
    assert len(checkpoint_paths(tmp_path)) == 1
    alone = JacobianSparseAutoencoder(mlp, **{**SETTINGS, "random_state": np.random.RandomState(0)}).fit(X)
    _assert_same_model(resumed, alone)


def test_fits_of_other_seeds_do_not_resume_each_others_checkpoints(X, mlp, tmp_path):
    """A seed study sharing one folder: seed 1 resumed seed 0's finished checkpoint and returned
    seed 0's model."""
    _checkpointed(X, mlp, tmp_path, random_state=0).fit(X)
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        seed_1 = _checkpointed(X, mlp, tmp_path, random_state=1).fit(X)
    _assert_same_model(seed_1, JacobianSparseAutoencoder(mlp, **{**SETTINGS, "random_state": 1}).fit(X))
    assert len(checkpoint_paths(tmp_path)) == 2


def test_a_fit_on_edited_rows_in_memory_does_not_resume_the_other_datas_checkpoint(X, mlp, tmp_path):
    """The data's identity sampled 257 rows: a rerun after clipping rows between them resumed the
    original data's checkpoint (its scales, its weights) without a word."""
    from sklearn_jsae._backend.checkpoint import fingerprint_array

    _checkpointed(X, mlp, tmp_path).fit(X)
    edited = X.copy()
    sampled = np.unique(np.linspace(0, len(X) - 1, num=257).astype(np.int64))  # the rows the identity read
    skipped = np.setdiff1d(np.arange(len(X)), sampled)
    edited[skipped] = np.clip(edited[skipped], -0.1, 0.1)
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        rerun = _checkpointed(edited, mlp, tmp_path).fit(edited)
    _assert_same_model(rerun, JacobianSparseAutoencoder(mlp, **SETTINGS).fit(edited))
    assert len(checkpoint_paths(tmp_path)) == 2
    store = tmp_path / "X.npy"
    np.save(store, X)
    mapped = np.load(store, mmap_mode="r")  # a store is sampled: views of it share its identity
    assert fingerprint_array(mapped) == fingerprint_array(np.asarray(mapped)) == fingerprint_array(mapped[:])


def test_the_temporary_file_a_kill_leaves_is_removed_by_that_fits_next_save(X, mlp, tmp_path, monkeypatch):
    """A SIGKILL during a write runs no cleanup: its temporary file (as big as a checkpoint, a
    stream's shuffle buffer included) stays.  It is named after its fit's checkpoint, and that fit's
    next save removes it; another fit's temporaries in the same folder are not touched."""
    _interrupt_at(monkeypatch, [3])
    with pytest.raises(_Interrupt):
        _checkpointed(X, mlp, tmp_path).fit(X)  # saved at step 2
    name = _the_checkpoint(tmp_path).name
    left = [tmp_path / f".{name}.k1ll3d.tmp", tmp_path / f".{name}.0ther.tmp"]
    other = tmp_path / ".checkpoint-0123456789abcdef.safetensors.a1b2c3.tmp"
    for path in (*left, other):
        path.write_bytes(b"half a checkpoint")
    _checkpointed(X, mlp, tmp_path).fit(X)
    assert not any(path.exists() for path in left)
    assert other.read_bytes() == b"half a checkpoint"


def test_a_temporary_another_live_process_is_writing_for_the_same_fit_is_left_alone(X, mlp, tmp_path,
                                                                                    monkeypatch):
    """Identical fits in parallel (the candidates of a search over a later pipeline step) share a
    checkpoint name: each one's cleanup deleted the other's temporary mid-write, and that save failed
    (FileNotFoundError at the rename).  A dead writer's temporary is still removed."""
    _interrupt_at(monkeypatch, [3])
    with pytest.raises(_Interrupt):
        _checkpointed(X, mlp, tmp_path).fit(X)
    name = _the_checkpoint(tmp_path).name
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()
    live = tmp_path / f".{name}.{checkpoint_module._HOST}-{live_pid}.x1y2z3.tmp"
    dead = tmp_path / f".{name}.{checkpoint_module._HOST}-{dead_pid}.x1y2z3.tmp"
    elsewhere = tmp_path / f".{name}.another_machine-{os.getpid()}.x1y2z3.tmp"
    # another machine's (its processes cannot be seen from here), untouched for two hours: a killed one's
    abandoned = tmp_path / f".{name}.another_machine-{os.getpid()}.a1b2c3.tmp"
    for path in (live, dead, elsewhere, abandoned):
        path.write_bytes(b"half a checkpoint")
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    _checkpointed(X, mlp, tmp_path).fit(X)
    assert live.read_bytes() == elsewhere.read_bytes() == b"half a checkpoint"
    assert not dead.exists() and not abandoned.exists()
    written = []
    real_new_temporary = checkpoint_module.new_temporary
    monkeypatch.setattr(checkpoint_module, "new_temporary",
                        lambda folder, prefix, *a: written.append(prefix) or real_new_temporary(folder, prefix, *a))
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        _checkpointed(X, mlp, tmp_path, random_state=1).fit(X)
    assert written and all(p.endswith(f".{checkpoint_module._HOST}-{os.getpid()}.") for p in written)


def _trainer_of(X):
    from sklearn_jsae._backend.train import TrainConfig
    from sklearn_jsae._incremental import start_trainer

    return start_trainer(TrainConfig(n_components=8, n_output_components=None, k=2), X, None)


def test_checkpoint_is_safetensors_and_json_not_a_pickle(X, mlp, tmp_path):
    _checkpointed(X, mlp, tmp_path, max_iter=1).fit(X)
    raw = _the_checkpoint(tmp_path).read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    meta = json.loads(header["__metadata__"][checkpoint_module.FORMAT])
    assert meta["format"] == checkpoint_module.FORMAT and meta["position"] == {"epoch": 1, "row": 0}
    assert b"\x80\x04\x95" not in raw[: 8 + header_length]  # no pickle protocol-4 frame in the header
    assert {"W_enc_x", "W_dec_y", "adam_m_0", "shuffling_rng"} <= set(header)


STREAM_KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch, transformers
    torch.set_num_threads(1)
    from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
    from sklearn_jsae.hf import ActivationStream, mlp_of
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                                           vocab_size=60, bos_token_id=59, eos_token_id=59)).eval()
    ids = np.random.default_rng(0).integers(0, 59, size=(700, 12))
    stream = ActivationStream(model, 1, input_ids=ids, batch_size=48, buffer_size=480, seed=2)
    folder, out = sys.argv[1], sys.argv[2]
    settings = dict(n_components=48, k=4, batch_size=64, n_tokens=7000, device="cpu", random_state=0,
                    checkpoint_every=1, checkpoint_dir=None if folder == "-" else folder)
    if KIND == "jsae":
        est = JacobianSparseAutoencoder(mlp_of(model, 1), **settings).fit_stream(stream, n_statistics=500)
        sides = dict(E_x=est.input_sae_.encoder_, E_y=est.output_sae_.encoder_, W_y=est.output_sae_.components_)
    else:  # one SAE on the same stream
        est = TopKSparseAutoencoder(**settings).fit_stream(stream, n_statistics=500)
        sides = dict(E_x=est.encoder_, W_x=est.components_)
    np.savez(out, **sides, loss=np.array([row["loss"] for row in est.history_]),
             tokens=np.array([r["tokens"] for r in est.history_]))
""")


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_sigkill_of_a_stream_fit_then_resume_repeats_and_skips_no_token(tmp_path, kind):
    """The same kill test for fit_stream: the checkpoint holds the stream's buffer and position."""
    pytest.importorskip("transformers")
    script = STREAM_KILL_SCRIPT.replace("KIND ==", f"{kind!r} ==")
    expected, got, kills = _kill_and_resume(script, tmp_path, max_kills=3, seed=99, max_delay=0.3)
    assert kills >= 2, f"only {kills} kills landed before the fit finished"
    assert int(got["tokens"].sum()) == 7000
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def _saved_steps(monkeypatch):
    """The optimiser step of every checkpoint written from now on."""
    saved = []
    real = checkpoint_module.Checkpointer.save

    def save(checkpointer, trainer, *args, **kwargs):
        saved.append(trainer.step_count)
        return real(checkpointer, trainer, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "save", save)
    return saved


def _expected_duration_saves(steps_per_epoch, n_epochs, seconds_per_step, interval):
    """The rule: at the first step ending ``interval`` seconds or more after the last save, and at
    the end of every epoch (which restarts the interval)."""
    saves, last = [], 0.0
    for step in range(1, steps_per_epoch * n_epochs + 1):
        if step % steps_per_epoch == 0 or step * seconds_per_step - last >= interval:
            saves.append(step)
            last = step * seconds_per_step
    return saves


@pytest.mark.parametrize("interval", ["4s", "2.5s", "1h"])
def test_a_duration_checkpoints_when_that_long_has_passed_and_at_epoch_ends(X, mlp, tmp_path, monkeypatch,
                                                                             interval):
    seconds = checkpoint_module.checkpoint_interval(interval)[1]
    fake_checkpoint_clock(1.0, monkeypatch.setattr)
    saved = _saved_steps(monkeypatch)
    est = _checkpointed(X, mlp, tmp_path, checkpoint_every=interval).fit(X)
    steps_per_epoch = -(-X.shape[0] // SETTINGS["batch_size"])
    assert saved == _expected_duration_saves(steps_per_epoch, SETTINGS["max_iter"], 1.0, seconds)
    assert len(est.history_) == SETTINGS["max_iter"]


def test_a_stream_fit_checkpoints_by_duration_and_resumes_to_the_uninterrupted_model(X, mlp, tmp_path,
                                                                                       monkeypatch):
    settings = dict(SETTINGS, n_tokens=X.shape[0] * 2)
    rows = np.concatenate([X, X])
    expected = JacobianSparseAutoencoder(mlp, **settings).fit_stream(RowStream(rows, 50), n_statistics=200)
    fake_checkpoint_clock(1.0, monkeypatch.setattr)
    saved = _saved_steps(monkeypatch)
    _interrupt_at(monkeypatch, [11])
    est = JacobianSparseAutoencoder(mlp, **settings, checkpoint_dir=str(tmp_path), checkpoint_every="3s")
    with pytest.raises(_Interrupt):
        est.fit_stream(RowStream(rows, 50), n_statistics=200)
    assert saved == [3, 6, 9]  # a stream has no epochs: only the duration decides
    header = _header_of(_the_checkpoint(tmp_path))
    assert header["position"]["used"] == 9 * SETTINGS["batch_size"]
    est.fit_stream(RowStream(rows, 50), n_statistics=200)
    _assert_same_model(est, expected)


@pytest.mark.parametrize("make", [lambda mlp, **kw: JacobianSparseAutoencoder(mlp, **SETTINGS, **kw),
                                  lambda mlp, **kw: TopKSparseAutoencoder(
                                      **{k: v for k, v in SETTINGS.items() if k != "l1"}, **kw)],
                         ids=["jsae", "topk"])
@pytest.mark.parametrize("restart", ["same stream object", "other n_statistics"])
def test_a_resumed_stream_fit_keeps_the_checkpoints_data_scales(X, mlp, tmp_path, monkeypatch, make, restart):
    """The scales ``c_x``, ``c_y`` are measured on a stream's first rows, and a resumed run reads
    other first rows when it continues the stream object that was interrupted (a notebook's Ctrl-C)
    or measures on another ``n_statistics``: the checkpoint's parameters are in its own scales, so
    those are restored (they were re-measured, and the model silently changed)."""
    rows = np.concatenate([X, X])
    settings = dict(n_tokens=rows.shape[0])
    expected = make(mlp, **settings).fit_stream(RowStream(rows, 50), n_statistics=200)
    _interrupt_at(monkeypatch, [11])
    est = make(mlp, **settings, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    stream = RowStream(rows, 50)
    with pytest.raises(_Interrupt):
        est.fit_stream(stream, n_statistics=200)
    again = stream if restart == "same stream object" else RowStream(rows, 50)
    est.fit_stream(again, n_statistics=200 if restart == "same stream object" else 500)
    sides = (est.input_sae_, est.output_sae_) if hasattr(est, "input_sae_") else (est,)
    expected_sides = (expected.input_sae_, expected.output_sae_) if hasattr(expected, "input_sae_") else (expected,)
    assert [side.scale_ for side in sides] == [side.scale_ for side in expected_sides]
    _assert_same_model(est, expected)


def test_a_stream_fit_of_another_length_does_not_resume_a_checkpoint(X, mlp, tmp_path):
    """``n_tokens`` sets a stream fit's schedule: a fit of another length (a sweep over it, or a
    changed command) starts afresh in its own file, as any other changed setting does; it resumed
    the other length's checkpoint and returned that model, trained on the wrong number of tokens."""
    rows = np.concatenate([X, X])
    long = JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=1200, checkpoint_dir=str(tmp_path))
    long.fit_stream(RowStream(rows, 50), n_statistics=200)
    short = JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=640, checkpoint_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        short.fit_stream(RowStream(rows, 50), n_statistics=200)
    assert sum(row["tokens"] for row in short.history_) == 640
    _assert_same_model(short, JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=640).fit_stream(
        RowStream(rows, 50), n_statistics=200))
    assert len(checkpoint_paths(tmp_path)) == 2


def test_a_malformed_checkpoint_every_is_named_with_the_fix(X, mlp, tmp_path):
    for value in ("ten minutes", "5 parsecs", "0s", "-3min"):
        with pytest.raises(ValueError, match=f"checkpoint_every='{value}'.*'30s', '10min' or '2h'"):
            _checkpointed(X, mlp, tmp_path, checkpoint_every=value).fit(X)
        # without a folder too: the setting is wrong whether or not it is used yet
        with pytest.raises(ValueError, match=f"checkpoint_every='{value}'"):
            JacobianSparseAutoencoder(mlp, **SETTINGS, checkpoint_every=value).fit(X)
    assert not checkpoint_paths(tmp_path)


@settings(max_examples=200, deadline=None)
@given(number=st.decimals(min_value="0.001", max_value="100000", places=3),
       unit=st.sampled_from(["s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
                             "h", "hour", "hours", "S", "Min", "H"]),
       space=st.sampled_from(["", " ", "  "]), steps=st.integers(1, 10**9))
def test_checkpoint_every_reads_any_duration_spelling_and_any_step_count(number, unit, space, steps):
    text = f"{space}{number.normalize():f}{space}{unit}{space}"
    assert checkpoint_module.checkpoint_interval(text) == (
        None, pytest.approx(float(number) * {"s": 1, "m": 60, "h": 3600}[unit[0].lower()]))
    assert checkpoint_module.checkpoint_interval(steps) == (steps, None)
    assert checkpoint_module.checkpoint_interval(np.int64(steps)) == (steps, None)


def test_a_checkpoint_of_an_earlier_version_name_resumes(X, mlp, tmp_path, monkeypatch):
    """A folder from before checkpoints were named by their fit holds ``checkpoint.safetensors``:
    this fit's resumes (to the uninterrupted model); another fit's is left alone."""
    expected = _checkpointed(X, mlp, None).fit(X)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, [13])
        with pytest.raises(_Interrupt):
            _checkpointed(X, mlp, tmp_path).fit(X)
    os.replace(_the_checkpoint(tmp_path), tmp_path / FILENAME)
    steps = _count_steps(monkeypatch)
    _assert_same_model(_checkpointed(X, mlp, tmp_path).fit(X), expected)
    assert steps == [SETTINGS["max_iter"] * 10 - 12]  # it resumed after step 12, the last checkpoint
    legacy = (tmp_path / FILENAME).read_bytes()
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        _checkpointed(X, mlp, tmp_path, l1=1.0).fit(X)
    assert (tmp_path / FILENAME).read_bytes() == legacy


def _count_steps(monkeypatch):
    """A list whose one element counts the optimiser steps run from now on."""
    count = [0]
    real = trainer_module.Trainer.step

    def step(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    return count


def test_a_search_shares_one_checkpoint_dir_and_a_killed_search_resumes(X, mlp, tmp_path, monkeypatch):
    """GridSearchCV clones the estimator, checkpoint_dir included: every fold and candidate keeps its
    own checkpoint in the one folder.  A search interrupted in its third fit and run again resumes
    every fit from its checkpoint (the finished ones train nothing) and scores as an uninterrupted
    search does."""
    from sklearn.model_selection import GridSearchCV

    grid, settings = {"l1": [0.0, 0.5]}, dict(SETTINGS, max_iter=2)
    expected = GridSearchCV(JacobianSparseAutoencoder(mlp, **settings), grid, cv=2).fit(X)
    search = GridSearchCV(JacobianSparseAutoencoder(mlp, **settings, checkpoint_dir=str(tmp_path),
                                                    checkpoint_every=3), grid, cv=2)
    steps_per_fit = settings["max_iter"] * -(-(X.shape[0] // 2) // settings["batch_size"])  # 2 x 5
    with monkeypatch.context() as patch:
        calls = _count_steps(patch)  # Trainer.step_count restarts with every fit: count calls instead
        real = trainer_module.Trainer.step

        def interrupting(self, *args, **kwargs):
            if calls[0] == 2 * steps_per_fit + 4:
                raise _Interrupt("interrupted in the third fit")
            return real(self, *args, **kwargs)

        patch.setattr(trainer_module.Trainer, "step", interrupting)
        with pytest.raises(_Interrupt), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            search.fit(X)
    assert len(checkpoint_paths(tmp_path)) == 3  # two finished fits, the third up to its step 3
    calls = _count_steps(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        search.fit(X)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], expected.cv_results_["mean_test_score"])
    _assert_same_model(search.best_estimator_, expected.best_estimator_)
    assert len(checkpoint_paths(tmp_path)) == 5  # 2 candidates x 2 folds, and the refit
    refit_steps = settings["max_iter"] * -(-X.shape[0] // settings["batch_size"])
    assert calls[0] == (steps_per_fit - 3) + 1 * steps_per_fit + refit_steps  # fit 3 after step 3, fit 4, refit


def _refused(fit, path, match):
    """``fit()`` raises a CheckpointError that names ``path`` and says to delete it, matching
    ``match``, and leaves the file byte for byte as it was."""
    before = Path(path).read_bytes()
    with pytest.raises(CheckpointError, match=match) as error:
        fit()
    assert str(path) in str(error.value) and "Delete it" in str(error.value)
    assert Path(path).read_bytes() == before


def test_a_checkpoint_damaged_on_disk_is_refused_by_its_digest_and_left_as_it_is(X, mlp, tmp_path):
    """One flipped bit (bit rot, a bad sector) in a finished fit's checkpoint was resumed without a
    word: the exponent bit of a weight made it 1e37, and the model scored -1e73; a bit in the header
    ('trainer' to 'trainEr') gave a bare KeyError.  The digest of the header and tensors refuses both."""
    _checkpointed(X, mlp, tmp_path).fit(X)
    path = _the_checkpoint(tmp_path)
    clean = path.read_bytes()
    header_length = int.from_bytes(clean[:8], "little")
    start, _ = json.loads(clean[8 : 8 + header_length])["W_enc_x"]["data_offsets"]
    weight = 8 + header_length + start + 3  # the top byte of the first float32 of W_enc_x
    key = clean.index(b'\\"trainer\\"') + 2 + 5  # the 'e' of 'trainer' in the metadata's JSON text
    for offset, bit in ((weight, 0x40), (weight - 2, 0x01), (key, 0x20)):
        damaged = bytearray(clean)
        damaged[offset] ^= bit
        path.write_bytes(bytes(damaged))
        est = _checkpointed(X, mlp, tmp_path)
        _refused(lambda est=est: est.fit(X), path, "do not match the digest recorded when it was written")
        assert not hasattr(est, "input_sae_")
    path.write_bytes(clean)
    header, tensors = _read_checkpoint(path)
    _write_checkpoint(path, header, tensors, digest=False)  # a version-2 file without its digest
    _refused(lambda: _checkpointed(X, mlp, tmp_path).fit(X), path, "its digest .* is missing")


def _as_version_1(path, change=None):
    """Rewrite the checkpoint ``path`` as version 1 wrote it (no digest), after ``change(header,
    tensors)``."""
    header, tensors = _read_checkpoint(path)
    header["version"] = 1
    if change is not None:
        change(header, tensors)
    _write_checkpoint(path, header, tensors, digest=False)


def test_a_version_1_checkpoint_without_a_digest_resumes_but_not_with_nan(X, mlp, tmp_path, monkeypatch):
    """Checkpoints written before the digest still resume (an upgrade must not lose a long run),
    checked for what needs no digest: a NaN or inf in its tensors or scales came back as a fitted
    model of NaN (a finished fit's checkpoint has no step left to notice it)."""
    expected = _checkpointed(X, mlp, None).fit(X)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, [13])
        with pytest.raises(_Interrupt):
            _checkpointed(X, mlp, tmp_path).fit(X)
    path = _the_checkpoint(tmp_path)
    _as_version_1(path)
    _assert_same_model(_checkpointed(X, mlp, tmp_path).fit(X), expected)  # resumed, to the same model
    clean = path.read_bytes()  # the finished fit's, written as version 2
    changes = {r"its tensors \['W_enc_x'\] hold NaN": lambda h, t: t["W_enc_x"].view(-1).__setitem__(0, np.nan),
               r"adam_v_1.* hold NaN or inf": lambda h, t: t["adam_v_1"].view(-1).__setitem__(3, np.inf),
               "scale_y=inf": lambda h, t: h["trainer"].__setitem__("scale_y", float("inf")),
               "scale_x=nan": lambda h, t: h["trainer"].__setitem__("scale_x", float("nan"))}
    for match, change in changes.items():
        path.write_bytes(clean)
        _as_version_1(path, change)
        est = _checkpointed(X, mlp, tmp_path)
        _refused(lambda est=est: est.fit(X), path, match)
        assert not hasattr(est, "input_sae_")


def _set(*keys, value):
    def change(header, tensors):
        for key in keys[:-1]:
            header = header[key]
        header[keys[-1]] = value
    return change


def _delete(*keys):
    def change(header, tensors):
        for key in keys[:-1]:
            header = header[key]
        del header[keys[-1]]
    return change


MALFORMED = {
    "header is a list": (lambda h, t: [h], "metadata is a JSON list, not an object"),
    "no trainer": (_delete("trainer"), "'trainer' is missing"),
    "position a list": (_set("position", value=[1]), "'position' is a list"),
    "identity's world_size a str": (_set("identity", "world_size", value="two"), "world_size is 'two'"),
    "step_count a str": (_set("trainer", "step_count", value="abc"), "step_count='abc', not a count"),
    "no adam_steps": (_delete("trainer", "adam_steps"), "adam_steps=None"),
    "sums a list": (_set("trainer", "sums", value=[1]), r"sums=\[1\]"),
    "history a str": (_set("trainer", "history", value="abc"), "history that is not a list"),
    "scale_x zero": (_set("trainer", "scale_x", value=0.0), "scale_x=0.0, not a positive"),
    # 0 in float32, where training divides by it: the fit stopped blaming X
    "scale_x below float32": (_set("trainer", "scale_x", value=1e-300), r"scale_x=1e-300, not a positive number in "
                                                                         r"float32's range"),
    "scale_y beyond float32": (_set("trainer", "scale_y", value=1e39), r"scale_y=1e\+39, not a positive number in "
                                                                        r"float32's range"),
    "scale_y a str": (_set("trainer", "scale_y", value="x"), "scale_y='x'"),
    "epoch -5": (_set("position", "epoch", value=-5), r"position \(epoch=-5, row=0\) is not a place"),
    "epoch past the end": (_set("position", "epoch", value=10**6), "epoch=1000000"),
    "row not a batch's start": (_set("position", "row", value=7), "row=7"),
    "row in a finished fit": (_set("position", "row", value=64), "epoch=3, row=64"),
    "no epoch": (_delete("position", "epoch"), "epoch=None"),
    "W_enc_x float16": (lambda h, t: t.__setitem__("W_enc_x", t["W_enc_x"].half()), "W_enc_x is torch.float16"),
    "shuffling_rng float32": (lambda h, t: t.__setitem__("shuffling_rng", t["shuffling_rng"].float()),
                              "shuffling_rng is torch.float32"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_well_digested_but_malformed_header_is_refused_by_name(X, mlp, tmp_path, case):
    """A header whose digest matches but whose content is not this fit's (a foreign or buggy
    writer's) gave bare KeyError, TypeError, ValueError or AttributeError, or, with epoch -5,
    trained 9 epochs of a 3-epoch fit: it is refused with a CheckpointError naming the file, what is
    wrong and the fix."""
    change, match = MALFORMED[case]
    _checkpointed(X, mlp, tmp_path).fit(X)
    path = _the_checkpoint(tmp_path)
    header, tensors = _read_checkpoint(path)
    header = change(header, tensors) or header
    _write_checkpoint(path, header, tensors)
    est = _checkpointed(X, mlp, tmp_path)
    _refused(lambda: est.fit(X), path, match)
    assert not hasattr(est, "input_sae_")


def test_a_mid_epoch_checkpoint_without_its_epochs_shuffling_state_is_refused(X, mlp, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _interrupt_at(patch, [13])
        with pytest.raises(_Interrupt):
            _checkpointed(X, mlp, tmp_path).fit(X)  # saved at step 12, inside epoch 2
    path = _the_checkpoint(tmp_path)
    header, tensors = _read_checkpoint(path)
    assert header["position"]["row"] > 0
    del tensors["extra.epoch_rng"]
    _write_checkpoint(path, header, tensors)
    _refused(lambda: _checkpointed(X, mlp, tmp_path).fit(X), path, r"extra.epoch_rng\) is missing")


STREAM_DAMAGE = {
    "no pending rows": (lambda h, t: t.pop("extra.pending"), r"extra.pending\) are missing"),
    "no tail": (lambda h, t: t.pop("extra.tail"), r"extra.tail\) are missing"),
    "tail of another width": (lambda h, t: t.__setitem__("extra.tail", t["extra.tail"][:, :4].contiguous()),
                              r"shape \(\d+, 4\), not float32 rows of this stream's 10 features"),
    "pending rows of another width": (lambda h, t: t.__setitem__("extra.pending", torch.zeros((1, 4))),
                                      r"shape \(1, 4\)"),
    "NaN in the tail": (lambda h, t: t["extra.tail"].view(-1).__setitem__(0, np.nan), "extra.tail rows hold NaN"),
    "no used": (lambda h, t: h["position"].pop("used"), "used=None, not a number of rows"),
    "stream state a list": (lambda h, t: h["position"].__setitem__("stream", [1]), "stream state is a list"),
    "exhausted a str": (lambda h, t: h["position"].__setitem__("exhausted", "no"), "exhausted='no'"),
}


@pytest.mark.parametrize("case", list(STREAM_DAMAGE))
def test_a_stream_checkpoint_with_missing_or_misshapen_rows_is_refused(X, mlp, tmp_path, monkeypatch, case):
    """A stream checkpoint's pending rows and Jacobian tail were used unchecked: missing, a bare
    KeyError; of another width, a NumPy concatenation error mid-fit; NaN, a jacobian_ of NaN."""
    change, match = STREAM_DAMAGE[case]
    rows = np.concatenate([X, X])
    est = JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=len(rows), checkpoint_dir=str(tmp_path),
                                    checkpoint_every=2)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, [5])
        with pytest.raises(_Interrupt):
            est.fit_stream(RowStream(rows, 50), n_statistics=200, jacobian_rows=100)
    path = _the_checkpoint(tmp_path)
    header, tensors = _read_checkpoint(path)
    assert tensors["extra.tail"].shape == (100, 10) and tensors["extra.pending"].shape[0] > 0
    change(header, tensors)
    _write_checkpoint(path, header, tensors)
    _refused(lambda: est.fit_stream(RowStream(rows, 50), n_statistics=200, jacobian_rows=100), path, match)
    assert not hasattr(est, "input_sae_")


def test_numpy_scalar_settings_checkpoint_as_their_python_values(X, mlp, tmp_path):
    """GridSearchCV over np.arange gives k=np.int64(3): the checkpoint identity (JSON) raised
    "Object of type int64 is not JSON serializable" in every checkpointed fit."""
    numpy_settings = dict(k=np.int64(4), batch_size=np.int64(64), l1=np.float32(0.5), learning_rate=np.float64(5e-3))
    with_numpy = _checkpointed(X, mlp, tmp_path, **numpy_settings).fit(X)
    plain = _checkpointed(X, mlp, tmp_path, **{name: value.item() for name, value in numpy_settings.items()}).fit(X)
    _assert_same_model(with_numpy, plain)
    assert len(checkpoint_paths(tmp_path)) == 1  # one fit: the second resumed the first's finished checkpoint
    topk_settings = {name: value for name, value in SETTINGS.items() if name != "l1"}
    streamed = TopKSparseAutoencoder(**topk_settings, n_tokens=np.int64(300), checkpoint_dir=tmp_path / "s")
    streamed.fit_stream([X[:300]])
    assert len(checkpoint_paths(tmp_path / "s")) == 1


def _disk_full_at(monkeypatch, saves):
    """safetensors' save_file (the checkpoint's writer) raises as a full disk does (a SafetensorError,
    not an OSError, naming no path) at the given save calls (1-based)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) in saves:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)  # imported at each save


def test_a_full_disk_at_a_checkpoint_names_the_file_and_keeps_the_previous_one(X, mlp, tmp_path, monkeypatch):
    """A full disk mid-fit raised safetensors' SafetensorError (not an OSError) naming no path."""
    _disk_full_at(monkeypatch, {3})
    with pytest.raises(OSError, match=r"cannot write '.*checkpoint-[0-9a-f]{16}\.safetensors' \(No space left on "
                                      r"device\): the previous checkpoint, if any, is left as it was .*free "
                                      r"space on its disk") as info:
        _checkpointed(X, mlp, tmp_path).fit(X)
    assert info.value.errno == 28
    path = _the_checkpoint(tmp_path)
    assert _header_of(path)["trainer"]["step_count"] == 4  # the second save's, intact
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    monkeypatch.undo()
    _assert_same_model(_checkpointed(X, mlp, tmp_path).fit(X), JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X))


def test_a_checkpoint_dir_that_cannot_be_written_is_named_before_training(X, mlp, tmp_path, monkeypatch):
    """It was found at the first save, after an epoch (or "10min") of training, naming a temporary."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    steps = []
    real = trainer_module.Trainer.step
    monkeypatch.setattr(trainer_module.Trainer, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*' cannot hold checkpoints \(Read-only file system\); "
                                         r"pass a folder you can write to"):
        _checkpointed(X, mlp, str(tmp_path)).fit(X)
    assert not steps

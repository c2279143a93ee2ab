"""Paths that no other test executed in-process (a coverage run of the suite found them unrun).

Each test drives one such path and checks the effect its code or docstring promises: checkpoint
writes and reads that fail, fingerprints of callables that recurse or call helpers, stream and
partial_fit argument checks, and model files whose document is malformed.
"""

import contextlib
import io
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, load
from sklearn_jsae._backend import checkpoint as checkpoint_module
from sklearn_jsae._backend.checkpoint import CheckpointError, checkpoint_paths
from sklearn_jsae._backend.mlp import CallableMap
from sklearn_jsae.exceptions import PersistenceError
from test_persistence import _rewrite  # a model file edited, its digests recomputed

SETTINGS = dict(n_components=16, k=4, max_iter=2, batch_size=64, random_state=0, device="cpu", l1=0.5)
TOPK = {key: value for key, value in SETTINGS.items() if key != "l1"}


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    """Tiny fits warn that they are short; the tests below check other things."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="this fit runs only")
        yield


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.exponential(size=(256, 30)) * (rng.random((256, 30)) < 0.1) @ rng.normal(size=(30, 10))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.GELU(), torch.nn.Linear(20, 10))


def _checkpointed(mlp, folder, **kw):
    return JacobianSparseAutoencoder(mlp, **{**SETTINGS, "checkpoint_dir": str(folder), "checkpoint_every": 2, **kw})


def _read_checkpoint(path):
    with safe_open(str(path), framework="pt") as f:
        return (json.loads(f.metadata()[checkpoint_module.FORMAT]),
                {name: f.get_tensor(name) for name in f.keys()})


def _write_checkpoint(path, header, tensors):
    """A checkpoint whose digest matches its (edited) content, as another writer would leave it."""
    from safetensors.torch import save_file

    text = json.dumps(header)
    save_file(tensors, str(path), metadata={checkpoint_module.FORMAT: text,
                                            checkpoint_module.DIGEST: checkpoint_module._digest(text, tensors)})


# ------------------------------------------------------------------------------ checkpoint.py
@pytest.mark.parametrize("every", [0, -1, True, 2.5])
def test_checkpoint_interval_refuses_a_step_count_below_one_or_not_an_int(every):
    """checkpoint_interval's int branch (the CLI's ``--checkpoint-every 0`` reaches it; the
    estimators' parameter validation refuses these first): 0, a negative count, a bool and a float
    are not step counts, and the message names the value and the fix."""
    with pytest.raises(ValueError, match=rf"checkpoint_every={every!r}: pass an int >= 1 .* '10min'"):
        checkpoint_module.checkpoint_interval(every)


def _recursive(x, depth=0):
    return torch.tanh(x) if depth else _recursive(x, 1)


def _helper_a(x):
    return torch.tanh(x)


def _helper_b(x):
    return 2 * torch.tanh(x)


HELPER = _helper_a


def _calls_helper(x):
    return HELPER(x)


def test_fingerprint_of_a_recursive_function_and_of_one_calling_a_global_helper(monkeypatch):
    """_digest_callable's ``seen`` guard (a function that names itself among its globals would
    recurse forever) and _digest_value's branch for a plain function read from the globals
    ("a function it calls: edits to it count too"): another helper is another MLP."""
    first = checkpoint_module.fingerprint_module(CallableMap(_recursive, 10, 10))
    assert first == checkpoint_module.fingerprint_module(CallableMap(_recursive, 10, 10))
    with_a = checkpoint_module.fingerprint_module(CallableMap(_calls_helper, 10, 10))
    monkeypatch.setitem(globals(), "HELPER", _helper_b)
    with_b = checkpoint_module.fingerprint_module(CallableMap(_calls_helper, 10, 10))
    assert with_a != with_b


def test_fingerprint_of_a_closure_whose_cell_is_not_filled_yet():
    """A closure cell read before it is assigned raises ValueError on ``cell_contents``; the
    fingerprint skips it (and, once the cell is filled, its value counts)."""
    def make():
        def fn(x):
            return later * torch.tanh(x)
        empty = checkpoint_module.fingerprint_module(CallableMap(fn, 10, 10))
        later = 2.0  # noqa: F841 (fills fn's cell)
        return empty, checkpoint_module.fingerprint_module(CallableMap(fn, 10, 10))

    empty, filled = make()
    assert len(empty) == 32 and empty != filled


def test_a_checkpoint_copied_onto_another_fits_name_is_refused_and_left_as_it_is(X, mlp, tmp_path):
    """Checkpointer.read: a file in this fit's name whose identity is another fit's (copied or
    renamed by hand) is refused, naming what differs, and not overwritten."""
    _checkpointed(mlp, tmp_path).fit(X)
    [first] = checkpoint_paths(tmp_path)
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        _checkpointed(mlp, tmp_path, l1=1.0).fit(X)
    [second] = [path for path in checkpoint_paths(tmp_path) if path != first]
    shutil.copy(first, second)
    copied = open(second, "rb").read()
    with pytest.raises(CheckpointError, match=r"is the checkpoint of a different fit: it differs in settings.*"
                                              r"copied or renamed by hand"):
        _checkpointed(mlp, tmp_path, l1=1.0).fit(X)
    assert open(second, "rb").read() == copied


def test_an_unreadable_checkpoint_of_another_name_does_not_stop_this_fit(X, mlp, tmp_path):
    """_legacy_or_other_fits skips a checkpoint-*.safetensors it cannot read ("another fit's
    trouble, met when that fit resumes"): this fit trains, warns about the other file, and leaves it."""
    junk = tmp_path / "checkpoint-0123456789abcdef.safetensors"
    junk.write_text("not a checkpoint")
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        est = _checkpointed(mlp, tmp_path).fit(X)
    assert est.n_iter_ == SETTINGS["max_iter"]
    assert junk.read_text() == "not a checkpoint"
    assert len(checkpoint_paths(tmp_path)) == 2


def test_a_temporary_file_that_cannot_be_created_names_the_checkpoint(X, mlp, tmp_path, monkeypatch):
    """Checkpointer.save: the temporary's creation failing (a disk full of inodes, a folder made
    read-only after the start) raises the OSError naming the checkpoint file and that nothing else
    was touched."""
    import builtins

    real_open = builtins.open

    def no_space(file, mode="r", *args, **kwargs):
        if mode == "xb":  # the exclusive creation of the temporary
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    est = _checkpointed(mlp, tmp_path)
    monkeypatch.setattr(builtins, "open", no_space)
    with pytest.raises(OSError, match=r"cannot write '.*checkpoint-[0-9a-f]{16}\.safetensors' \(No space left on "
                                      r"device\): the previous checkpoint, if any, is left as it was") as info:
        est.fit(X)
    assert info.value.errno == 28
    assert os.listdir(tmp_path) == []
    assert not hasattr(est, "input_sae_")


def test_an_error_of_the_writer_that_is_not_the_disks_is_raised_as_it_is(X, mlp, tmp_path, monkeypatch):
    """Checkpointer.save re-raises an error that is neither an OSError nor safetensors' own (a bug,
    a bad tensor) unchanged, not dressed as a full disk, and removes its temporary file."""
    import safetensors.torch

    def broken(*args, **kwargs):
        raise TypeError("a writer's bug")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(TypeError, match="^a writer's bug$"):
        _checkpointed(mlp, tmp_path).fit(X)
    assert os.listdir(tmp_path) == []


def test_writer_alive_for_this_process_another_users_and_a_vanished_file(tmp_path, monkeypatch):
    """_writer_alive: a temporary of this very process (another thread's save of the same fit) and
    one of a process we may not signal (another user's: EPERM) are alive; one of another machine
    removed meanwhile counts as alive (nothing left to remove)."""
    here = checkpoint_module._HOST
    assert checkpoint_module._writer_alive(f"{here}-{os.getpid()}.abc.tmp", str(tmp_path / "t"))

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    assert checkpoint_module._writer_alive(f"{here}-4194000.abc.tmp", str(tmp_path / "t"))
    assert checkpoint_module._writer_alive("other_machine-12.abc.tmp", str(tmp_path / "vanished"))


def test_a_trainer_state_that_passes_the_checks_but_cannot_be_loaded_is_named(X, mlp, tmp_path):
    """Checkpointer.restore: a state whose shapes, dtypes and header are right but which the
    trainer cannot load (a shuffling generator state torch calls invalid) is refused as damaged,
    naming the error, and the file is left as it is."""
    _checkpointed(mlp, tmp_path).fit(X)
    [path] = checkpoint_paths(tmp_path)
    header, tensors = _read_checkpoint(path)
    tensors["shuffling_rng"] = torch.full_like(tensors["shuffling_rng"], 255)
    _write_checkpoint(path, header, tensors)
    written = open(path, "rb").read()
    with pytest.raises(CheckpointError, match=r"damaged or was not written by this fit: its trainer state cannot be "
                                              r"loaded \(RuntimeError: .*mt19937"):
        _checkpointed(mlp, tmp_path).fit(X)
    assert open(path, "rb").read() == written


@pytest.mark.parametrize("name", ["rows_done", "position"])
def test_a_trainer_header_with_a_negative_row_count_is_refused_by_name(X, mlp, tmp_path, name):
    """Trainer.meta_problem: ``rows_done`` and ``position`` (absent from older checkpoints, checked
    when present) must be counts."""
    _checkpointed(mlp, tmp_path).fit(X)
    [path] = checkpoint_paths(tmp_path)
    header, tensors = _read_checkpoint(path)
    header["trainer"][name] = -1
    _write_checkpoint(path, header, tensors)
    with pytest.raises(CheckpointError, match=rf"its trainer state has {name}=-1, not a count"):
        _checkpointed(mlp, tmp_path).fit(X)


# ------------------------------------------------------------------------------ _stream_fit.py
@pytest.mark.parametrize("name, value", [("n_statistics", 0), ("n_statistics", 2.5), ("n_statistics", True),
                                         ("n_statistics", None), ("jacobian_rows", 0), ("jacobian_rows", 1.0)])
def test_fit_stream_refuses_counts_that_are_not_positive_ints(X, mlp, name, value):
    """fit_stream's argument check, before any row is read: n_statistics and jacobian_rows must
    be positive ints (a bool and a float are not)."""
    read = []

    def batches():
        read.append(1)
        yield X

    est = JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=256)
    with pytest.raises(ValueError, match=rf"^{name} must be a positive int, got {value!r}\.$"):
        est.fit_stream(batches(), **{name: value})
    assert not read and not hasattr(est, "input_sae_")


def test_a_verbose_stream_fit_shows_and_closes_its_progress_bar(X, mlp, monkeypatch):
    """fit_stream with verbose=1: a progress bar counts the stream's steps and is closed when the
    fit ends (tqdm's close marks it disabled; an open bar would be left to the garbage collector)."""
    from sklearn_jsae._backend import train as train_module

    bars, real = [], train_module.progress_bar
    monkeypatch.setattr(train_module, "progress_bar", lambda *a, **kw: bars.append(real(*a, **kw)) or bars[-1])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        est = JacobianSparseAutoencoder(mlp, **SETTINGS, n_tokens=256, verbose=1).fit_stream(
            [X[:128], X[128:]], n_statistics=64)
    assert est.n_iter_ >= 1
    [bar] = bars
    assert bar.n == bar.total == 4 and bar.disable  # every step counted, then closed
    assert "4/4" in err.getvalue() and "100%" in err.getvalue()


# ------------------------------------------------------------------------------ _incremental.py / trainer.py
def test_partial_fit_with_a_device_that_is_not_here_names_it_and_can_continue_after(X, mlp):
    """training_params tolerates a device that does not resolve here (its ValueError is left to
    the optimiser's start, which names the device); the failed call changes nothing and the next
    call with a real device continues the run."""
    est = JacobianSparseAutoencoder(mlp, **SETTINGS).partial_fit(X[:128])
    before = est.input_sae_.components_.copy()
    est.set_params(device="cuda:99")
    with pytest.raises(ValueError, match="cuda:99"):
        est.partial_fit(X[128:])
    np.testing.assert_array_equal(est.input_sae_.components_, before)
    est.set_params(device="cpu").partial_fit(X[128:])
    assert est.n_iter_ == 2


def test_partial_fit_past_its_schedule_warns_once(X):
    """Trainer._warn_past_schedule: training past n_tokens warns the first time only (a loop of
    partial_fit calls would otherwise warn at every call)."""
    est = TopKSparseAutoencoder(**TOPK, n_tokens=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start in (0, 64, 128, 192):
            est.partial_fit(X[start:start + 64])
    assert sum("its schedule spans" in str(w.message) for w in caught) == 1


# ------------------------------------------------------------------------------ _model_file.py / _persistence.py
@pytest.fixture(scope="module")
def saved_models(X, mlp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    topk = TopKSparseAutoencoder(**TOPK).fit(X).save(folder / "topk.safetensors")
    jsae = JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X).save(folder / "jsae.safetensors")
    return {"topk": topk, "jsae": jsae}


def _fitted(key, value):
    return lambda doc: doc["fitted"].__setitem__(key, value)


def _no_latents(arrays):
    for name in ("components_", "encoder_", "encoder_bias_"):
        arrays[name] = arrays[name][:0]


def _nine_probe_rows(arrays):
    arrays["_probe_rows"] = np.repeat(arrays["_probe_rows"][:1], 9, axis=0)


MALFORMED = {
    "n_iter_ a string": ("topk", _fitted("n_iter_", "3"), None, r"fitted.n_iter_='3' has the wrong type"),
    "scale_ past float": ("topk", _fitted("scale_", 10**400), None, r"fitted.scale_=1000.* is not finite"),
    "a param a list": ("topk", lambda doc: doc["params"].__setitem__("k", [4]), None,
                       r"params k=\[4\] is not a number, string, bool or None"),
    "no features": ("topk", _fitted("n_features_in_", 0), None, r"fitted.n_features_in_=0 is not positive"),
    "history of numbers": ("topk", _fitted("history_", [1, 2]), None, r"fitted.history_ is not a list of dicts"),
    "one feature name": ("topk", _fitted("feature_names_in_", ["a"]), None,
                         r"fitted.feature_names_in_ is not 10 strings"),
    "no latents": ("topk", None, _no_latents, r"tensor 'components_' has no rows"),
    "nine probe rows": ("jsae", None, _nine_probe_rows, r"tensor '_probe_rows' has 9 rows, expected 1 to 8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_well_digested_but_malformed_model_file_is_refused_by_name(saved_models, tmp_path, case):
    """load's document checks (_field's type check, _finite_scalar's integer overflow,
    _decode_param, _set_common, _build_sae, _build_jsae): a file whose digests match but whose
    document a faulty tool wrote is refused, naming the field, with nothing loaded."""
    kind, edit_doc, edit_arrays, match = MALFORMED[case]
    target = _rewrite(saved_models[kind], tmp_path / "edited.safetensors", edit_doc, edit_arrays)
    with pytest.raises(PersistenceError, match=r"is inconsistent: " + match + r".*nothing was loaded"):
        load(target)


def test_a_numpy_bool_parameter_is_saved_as_a_bool(X, tmp_path):
    """_encode_param's np.bool_ branch: ``warm_start=np.True_`` (numpy's bool passes scikit-learn's
    "boolean" validation) is written as JSON true and loads as a Python bool."""
    est = TopKSparseAutoencoder(**TOPK, warm_start=np.bool_(True)).fit(X)
    loaded = load(est.save(tmp_path / "model.safetensors"))
    assert loaded.warm_start is True


def test_save_names_the_file_when_its_temporary_cannot_be_created(X, tmp_path, monkeypatch):
    """write_atomically: the temporary's creation failing (a read-only folder) raises the OSError
    naming the path being saved, and nothing is written."""
    import builtins

    est = TopKSparseAutoencoder(**TOPK).fit(X)
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if mode == "xb":  # the exclusive creation of the temporary
            raise PermissionError(13, "Permission denied")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(OSError, match=r"cannot write '.*model\.safetensors' \(Permission denied\)"):
        est.save(tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_reraises_a_writer_error_that_is_not_the_disks_and_leaves_nothing(X, tmp_path, monkeypatch):
    """write_atomically: an error of the writer that is neither an OSError nor safetensors' own is
    the caller's: raised unchanged, and the temporary file removed."""
    import safetensors.numpy

    est = TopKSparseAutoencoder(**TOPK).fit(X)

    def broken(*args, **kwargs):
        raise TypeError("a writer's bug")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(TypeError, match="^a writer's bug$"):
        est.save(tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ _topk.py
def test_inverse_transform_of_codes_of_another_width_names_n_components(X):
    """_decode: codes with another number of columns than the dictionary's latents are refused,
    naming both widths and the fix."""
    est = TopKSparseAutoencoder(**TOPK).fit(X)
    with pytest.raises(ValueError, match=r"X has 5 columns but the dictionary has n_components=16; pass codes "
                                         r"from this estimator's transform"):
        est.inverse_transform(np.zeros((2, 5), dtype=np.float32))


# ------------------------------------------------------------------------------ _backend/metrics.py (splicing)
class _ToyLM(torch.nn.Module):
    """A one-block language model whose MLP input module (``pre``) is called positionally or by
    keyword, as some model code does (``self.norm(input=h)``)."""

    def __init__(self, mlp, by_keyword):
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.pre, self.mlp = torch.nn.Embedding(40, 10), torch.nn.Identity(), mlp
        self.head, self.by_keyword = torch.nn.Linear(10, 40), by_keyword

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        z = self.pre(input=h) if self.by_keyword else self.pre(h)
        return self.head(h + self.mlp(z))


@pytest.fixture(scope="module")
def toy_splice(X, mlp):
    jsae = JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X)
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    return jsae, ids


def test_spliced_ce_replaces_an_mlp_input_passed_by_keyword(mlp, toy_splice):
    """spliced_cross_entropies' pre-hook on an input module called with its tensor as a keyword
    argument (_first_tensor's keyword branch, the hook's keyword return): the input SAE's splice
    replaces that tensor, so every score equals the same model's with a positional call."""
    from sklearn_jsae.metrics import spliced_ce_score

    jsae, ids = toy_splice
    scores = {}
    for by_keyword in (False, True):
        model = _ToyLM(mlp, by_keyword).eval()
        scores[by_keyword] = spliced_ce_score(model, 0, jsae, ids, module=(model.pre, model.mlp))
    assert scores[True] == scores[False]
    assert scores[True]["ce_input"] != scores[True]["ce_clean"]  # the splice did change the pass


def test_spliced_ce_names_an_input_module_called_without_a_tensor_and_too_short_sequences(mlp, toy_splice):
    """_first_tensor's refusal (an input module called with no tensor: nothing to splice) and
    spliced_cross_entropies' refusal of a mask that leaves no next-token target."""
    from sklearn_jsae.metrics import spliced_ce_score

    jsae, ids = toy_splice

    class NoTensor(_ToyLM):
        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            self.pre(None)
            return self.head(h + self.mlp(h))

    model = NoTensor(mlp, False).eval()
    with pytest.raises(ValueError, match="the MLP input module was called without a tensor argument"):
        spliced_ce_score(model, 0, jsae, ids, module=(model.pre, model.mlp))
    model = _ToyLM(mlp, False).eval()
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1  # one unmasked token per sequence: nothing to predict
    with pytest.raises(ValueError, match="input_ids has no next-token targets: pass sequences of at least 2"):
        spliced_ce_score(model, 0, jsae, ids, attention_mask=mask, module=(model.pre, model.mlp))


def test_save_names_an_mlp_weight_with_nan_not_X(X, mlp, tmp_path):
    """The branch of save's finiteness check that names an MLP weight was unreachable: the probe of
    the MLP on the recorded rows ran first and blamed "row 0 of X", which save does not have."""
    import copy

    jsae = copy.deepcopy(JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X))
    with torch.no_grad():
        next(iter(jsae._mlp_map.buffers())).fill_(float("nan"))
    path = tmp_path / "model.safetensors"
    with pytest.raises(PersistenceError, match=r"mlp_ \(its weight W_in\) holds .* NaN or inf .*Nothing was written"):
        jsae.save(path)
    assert not path.exists()

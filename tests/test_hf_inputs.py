"""Token ids and masks given to ``harvest`` and ``ActivationStream``: read as the caller meant or refused
by name (a 3-D or float ``input_ids``, a mask value other than 0 and 1, an id outside the vocabulary),
and the other arguments' wording (``seed``, ``dtype``, ``out``)."""

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from test_hf import V, _ids, _tiny  # noqa: E402

from sklearn_jsae.hf import ActivationStream, harvest  # noqa: E402
from sklearn_jsae.hf._adapters import check_token_ids  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    model, _, _ = _tiny("gpt2")
    return model.eval()


def _harvest(model, **kwargs):
    """The harvested MLP inputs."""
    return harvest(model, 0, progress=False, **kwargs)[0]


def _stream(model, **kwargs):
    """Every row the stream yields: ids are read (and checked) a batch at a time, as the model runs."""
    kwargs = {"batch_size": 4, "buffer_size": 8, **kwargs}
    return np.concatenate(list(ActivationStream(model, 0, **kwargs)))


READERS = {"harvest": _harvest, "stream": _stream}


# ---------------------------------------------------------------------------------- input_ids


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    "make, shape, dtype",
    [
        (lambda ids: ids[None], r"\(1, 3, 12\)", "int64"),  # once flattened into one long sequence
        (lambda ids: ids.reshape(3, 3, 4), r"\(3, 3, 4\)", "int64"),
        (lambda ids: ids + 0.7, r"\(3, 12\)", "float64"),  # once truncated to the ids themselves
        (lambda ids: torch.from_numpy(ids).float(), r"\(3, 12\)", "torch.float32"),
        (lambda ids: ids > 50, r"\(3, 12\)", "bool"),
    ],
)
def test_input_ids_that_are_not_a_2d_integer_array_are_refused(gpt2, reader, make, shape, dtype):
    ids = _ids()[0].numpy()
    with pytest.raises(ValueError, match=rf"input_ids must be a 2-D integer array \(n_sequences, seq_len\), "
                                         rf"got shape {shape} and dtype {dtype}"):
        READERS[reader](gpt2, input_ids=make(ids))


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_1d_array_is_still_one_sequence(gpt2, reader):
    ids = _ids()[0].numpy()
    assert len(READERS[reader](gpt2, input_ids=ids[0])) == 12  # one row: 12 tokens, none of them special


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    "row, shape, dtype",
    [([1.5, 2.0, 3.0], r"\(3,\)", "float64"), ([[1, 2], [3, 4]], r"\(2, 2\)", "int64"),
     (7, r"\(\)", "int64")],
)
def test_a_row_of_a_list_that_is_not_1d_integers_is_refused(gpt2, reader, row, shape, dtype):
    with pytest.raises(ValueError, match=rf"input_ids\[1\] must be a 1-D row of integer token ids, got shape "
                                         rf"{shape} and dtype {dtype}"):
        READERS[reader](gpt2, input_ids=[[1, 2, 3], row])


# ---------------------------------------------------------------------------- attention_mask


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("value", [2, 0.5, -1])
def test_a_mask_value_other_than_0_and_1_is_refused_by_position(gpt2, reader, value):
    """2 was read as a real token and 0.5 as padding (a "no tokens" error when every value was 0.5)."""
    ids, mask = (t.numpy() for t in _ids())
    mask = mask.astype(type(value))
    mask[2, 5] = value
    # one sequence per forward pass: the bad row is in the third batch, named by its place in the input
    per_batch = {"harvest": {"batch_size": 1}, "stream": {"sequences_per_forward": 1}}[reader]
    message = rf"attention_mask\[2, 5\] is {value}; a mask holds only 1 \(real token\) and 0 \(padding\)"
    with pytest.raises(ValueError, match=message):
        READERS[reader](gpt2, input_ids=ids, attention_mask=mask, **per_batch)


def test_masks_of_0_and_1_read_alike_in_any_dtype(gpt2):
    ids, mask = (t.numpy() for t in _ids())
    X = _harvest(gpt2, input_ids=ids, attention_mask=mask)
    for same in (mask.astype(bool), mask.astype(np.float32), torch.from_numpy(mask).bool(), mask.tolist()):
        np.testing.assert_array_equal(_harvest(gpt2, input_ids=ids, attention_mask=same), X)
    assert len(X) == mask.sum()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_mask_of_strings_is_refused(gpt2, reader):
    ids, mask = (t.numpy() for t in _ids())
    message = r"attention_mask must hold 1 \(real token\) and 0 \(padding\), as bool or int, got dtype <U\d+"
    with pytest.raises(ValueError, match=message):
        READERS[reader](gpt2, input_ids=ids, attention_mask=mask.astype(str))


def test_harvest_refuses_a_mask_with_texts_as_the_stream_does(gpt2):
    with pytest.raises(ValueError, match="attention_mask is for input_ids"):
        _harvest(gpt2, texts=["a text"], tokenizer=object(), attention_mask=np.ones((1, 3), int))


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n_seq=st.integers(1, 4), length=st.integers(1, 6))
def test_the_first_bad_mask_value_is_the_one_named(gpt2, data, n_seq, length):
    """Property: for any mask holding a value other than 0 and 1, the error names the first such value
    (row-major) and its place; the model never runs on it."""
    values = st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.0, 3.0])
    mask = np.array(data.draw(st.lists(values, min_size=n_seq * length, max_size=n_seq * length))).reshape(
        n_seq, length)
    bad = np.argwhere((mask != 0) & (mask != 1))
    ids = np.ones((n_seq, length), dtype=np.int64)
    if not len(bad):
        if mask.any():
            assert len(_harvest(gpt2, input_ids=ids, attention_mask=mask, batch_size=n_seq)) == mask.sum()
        else:
            with pytest.raises(ValueError, match="every token is padding"):
                _harvest(gpt2, input_ids=ids, attention_mask=mask, batch_size=n_seq)
        return
    row, column = bad[0]
    with pytest.raises(ValueError, match=rf"attention_mask\[{row}, {column}\] is {mask[row, column]};"):
        _harvest(gpt2, input_ids=ids, attention_mask=mask, batch_size=n_seq)


# ------------------------------------------------------------------------------ the vocabulary


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("value", [V, V + 41, -1])
def test_a_token_id_outside_the_vocabulary_is_named_with_its_place(gpt2, reader, value):
    """Once torch's bare 'IndexError: index out of range in self' from the embedding."""
    ids = _ids()[0].numpy()
    ids[2, 7] = value
    per_batch = {"harvest": {"batch_size": 2}, "stream": {"sequences_per_forward": 2}}[reader]
    message = (rf"token id {value} at sequence 2, position 7 of the input is outside the vocabulary of "
               rf"GPT2LMHeadModel, ids 0 to {V - 1}")
    with pytest.raises(ValueError, match=message):
        READERS[reader](gpt2, input_ids=ids, **per_batch)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_token_id_outside_the_vocabulary_in_a_list_of_rows_is_named(gpt2, reader):
    with pytest.raises(ValueError, match=rf"token id {V} at sequence 1, position 2 of the input"):
        READERS[reader](gpt2, input_ids=[[1, 2, 3, 4], [5, 6, V]])


def test_the_vocabulary_is_the_embeddings_rows_else_the_configurations():
    """An embedding padded past config.vocab_size takes the ids it has rows for; a model without
    get_input_embeddings (TransformerLens) is bounded by its cfg.d_vocab."""
    model, _, _ = _tiny("gpt2")
    model.config.vocab_size = V - 10
    X = _harvest(model, input_ids=np.full((1, 4), V - 5))
    assert len(X) == 4
    lens_like = types.SimpleNamespace(cfg=types.SimpleNamespace(d_vocab=7))
    check_token_ids(lens_like, torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match=r"token id 7 at row 0 of a batch, position 1 .* ids 0 to 6"):
        check_token_ids(lens_like, torch.tensor([[0, 7]]))


# ------------------------------------------------------------------------------- other arguments


@pytest.mark.parametrize("seed", ["a", -1, 1.5, True, None])
def test_stream_seed_must_be_a_nonnegative_int(gpt2, seed):
    ids = _ids()[0].numpy()
    with pytest.raises(ValueError, match=rf"seed must be an int >= 0 .*got {seed!r}\."):
        ActivationStream(gpt2, 0, input_ids=ids, seed=seed)
    assert ActivationStream(gpt2, 0, input_ids=ids, seed=np.int64(3)).seed == 3


@pytest.mark.parametrize("dtype", ["x", "float64", object()])
def test_harvest_dtype_names_itself_and_what_is_accepted(gpt2, dtype):
    message = r"dtype must be numpy.float32 or numpy.float16 \(the storage dtype of X and Y\), got"
    with pytest.raises(ValueError, match=message):
        _harvest(gpt2, input_ids=_ids()[0], dtype=dtype)


def test_harvest_out_must_be_a_folder(gpt2, tmp_path):
    ids = _ids()[0]
    file = tmp_path / "acts.npy"
    file.write_bytes(b"keep me")
    for out in (file, str(file), file / "inside"):
        with pytest.raises(ValueError, match=rf"out='{out}' is a file, or inside one; out must be a folder"):
            _harvest(gpt2, input_ids=ids, out=out)
    assert file.read_bytes() == b"keep me"
    with pytest.raises(TypeError, match="out must be a folder's path .str or path-like. or None, got int: 3"):
        _harvest(gpt2, input_ids=ids, out=3)
    X = _harvest(gpt2, input_ids=ids, out=tmp_path / "new" / "acts")  # a new folder is made
    assert X.shape == (36, 32)


def test_a_state_that_is_not_the_streams_is_refused_and_leaves_it_as_it_was(gpt2):
    """A dict without the stream's keys raised a bare KeyError after resetting the stream half-way."""
    ids = _ids(8, 12)[0]
    stream = ActivationStream(gpt2, 0, input_ids=ids, batch_size=4, buffer_size=8)
    batches = iter(stream)
    next(batches)
    saved = stream.state_dict()
    rest = np.concatenate(list(batches))
    for junk, message in (({}, r"it has no \['buffer', 'captured'"), ([1, 2], "got list"),
                          ({**saved, "d": "wide"}, r"not a state_dict\(\) of a stream like this one \(ValueError"),
                          ({**saved, "buffer": np.zeros((3, 7))}, r"not a state_dict\(\) of a stream like this one"),
                          ({**saved, "groups_done": -5}, r"out of range"), ({**saved, "filled": 999}, r"out of range")):
        stream.load_state_dict(saved)
        with pytest.raises(ValueError, match=message):
            stream.load_state_dict(junk)
        # the failed load changed nothing: the stream goes on from the state loaded before it
        np.testing.assert_array_equal(np.concatenate(list(stream)), rest)


def test_a_state_of_another_width_or_a_bad_rng_is_refused_when_loaded(gpt2):
    """A state with another d was taken, and failed at the first rows with a numpy shape error; an
    rng that is not a dict raised a bare AttributeError; a (n, 1) buffer broadcast into the rows."""
    ids = _ids(8, 12)[0]

    def stream():
        return ActivationStream(gpt2, 0, input_ids=ids, batch_size=4, buffer_size=8)

    started = stream()
    batches = iter(started)
    next(batches)
    saved = started.state_dict()
    rest = np.concatenate(list(batches))
    filled = saved["filled"]
    narrow = {**saved, "d": 5, "buffer": np.zeros((filled, 5), np.float32), "waiting": np.zeros((0, 5), np.float32)}
    assert filled > 0
    damaged = np.array(saved["buffer"], dtype=np.float32)
    damaged[filled - 1, 3] = np.nan  # a damaged state was taken, and the NaN met batches later
    for junk, message in ((narrow, r"d=5, but layer 0's MLP input has width 32: the state is of another model"),
                          ({**saved, "buffer": damaged}, r"the buffer rows hold NaN or inf"),
                          ({**saved, "source_done": "False"}, r"source_done='False' is not a bool"),
                          ({**saved, "rng": [1, 2]}, r"rng is a list, not a numpy bit generator's state"),
                          ({**saved, "buffer": np.zeros((filled, 1), np.float32)},
                           rf"a buffer of shape \({filled}, 1\) for filled={filled}, d=32"),
                          ({**saved, "waiting": np.zeros((4, 8), np.float32)}, r"waiting rows of shape \(4, 8\)")):
        for target in (stream(), started):  # before the first rows (the width from the model) and after
            target.load_state_dict(saved)
            with pytest.raises(ValueError, match=r"not a state_dict\(\) of a stream like this one .*" + message):
                target.load_state_dict(junk)
            np.testing.assert_array_equal(np.concatenate(list(target)), rest)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_pandas_series_of_rows_is_read_as_rows(gpt2, reader):
    """A Series has ndim (1) and an object dtype: it was taken for a 1-D array of ids and refused."""
    pd = pytest.importorskip("pandas")
    ids = _ids()[0].numpy()
    rows = [ids[0].tolist(), ids[1, :7].tolist()]
    read = READERS[reader]
    np.testing.assert_array_equal(read(gpt2, input_ids=pd.Series(rows)), read(gpt2, input_ids=rows))


def test_a_folder_that_cannot_be_locked_is_harvested_unlocked(gpt2, tmp_path, monkeypatch):
    """NFS refuses flock on a folder opened read-only (EBADF), Lustre without -o flock has none
    (ENOSYS): harvest writes there as before instead of failing."""
    import errno
    import fcntl

    def no_flock(descriptor, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    ids = _ids()[0].numpy()
    X, _ = harvest(gpt2, 0, input_ids=ids, out=tmp_path / "acts", progress=False)
    np.testing.assert_array_equal(X, _harvest(gpt2, input_ids=ids))


def test_a_filtered_pandas_series_of_rows_streams_by_position(gpt2):
    """The stream's identity read rows of a Series by label (s[i]): a filtered Series (index 1, 3, ...)
    raised KeyError in every fit_stream."""
    pd = pytest.importorskip("pandas")
    ids = _ids(6)[0].numpy()
    rows = pd.Series([row.tolist() for row in ids])[1::2]  # labels 1, 3, 5
    stream = ActivationStream(gpt2, 0, input_ids=rows, batch_size=4, buffer_size=8)
    assert stream.identity() != ActivationStream(gpt2, 0, input_ids=list(rows)[::-1], batch_size=4,
                                                 buffer_size=8).identity()
    np.testing.assert_array_equal(np.concatenate(list(stream)), _stream(gpt2, input_ids=list(rows)))


@pytest.mark.parametrize("dtype", ["int64", "Int64"])
def test_a_pandas_series_of_token_ids_is_one_sequence(gpt2, dtype):
    """A 1-D Series of ids (numpy int64, or pandas' nullable Int64) is one sequence, as a 1-D array
    is: it crashed ('Series' object has no attribute 'reshape') or gave a bare numpy TypeError."""
    import warnings

    pd = pytest.importorskip("pandas")
    ids = _ids()[0].numpy()[0]
    expected = _harvest(gpt2, input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's, on a read-only view of the Series
        np.testing.assert_array_equal(_harvest(gpt2, input_ids=pd.Series(ids, dtype=dtype)), expected)
    stream = ActivationStream(gpt2, 0, input_ids=pd.Series(ids, dtype=dtype), batch_size=len(ids), buffer_size=len(ids))
    assert np.concatenate(list(stream)).shape == expected.shape
    with pytest.raises(ValueError, match=r"input_ids \(or attention_mask\) holds missing values \(NA\)"):
        _harvest(gpt2, input_ids=pd.Series([*ids[:3], None], dtype="Int64"))

"""What grows with a long run: the cost of a ``partial_fit`` call must not grow with the calls
before it, and the history stays what a rebuild from scratch gives."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder

SETTINGS = dict(n_components=16, k=2, batch_size=8, device="cpu", random_state=0)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6))


def _side_rows_from_scratch(history, prefix):
    """The plain twin: a side SAE's rows are the pair's rows with that side's terms, unsuffixed."""
    return [{key.replace(f"_{prefix}", ""): value for key, value in row.items()
             if key.endswith(prefix) or key in ("epoch", "call", "tokens", "seconds")} for row in history]


def test_a_partial_fit_call_reuses_its_sides_earlier_history_rows(X, mlp):
    """Each call rebuilt every side row of every earlier call (2.9 s per call after 73,000 calls):
    the rows of earlier calls are now carried over, and only the new call's row is made."""
    jsae = JacobianSparseAutoencoder(mlp, **SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in (0, 16, 32):
            jsae.partial_fit(X[start:start + 16])
            before = list(jsae.input_sae_.history_), list(jsae.output_sae_.history_)
        jsae.partial_fit(X[48:64])
    for side, kept in zip((jsae.input_sae_, jsae.output_sae_), before):
        assert len(side.history_) == len(kept) + 1
        assert all(a is b for a, b in zip(side.history_, kept))  # the same row objects, not rebuilt


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(st.sampled_from(["call", "call", "call", "refit", "warm_fit", "new_l1"]), min_size=1, max_size=7))
def test_side_histories_equal_a_rebuild_after_any_sequence_of_fits(X, mlp, ops):
    """Whatever mix of partial_fit calls, fits, warm starts and restarts of the optimiser (a changed
    l1), each side's history is exactly the one derived from the pair's history from scratch."""
    jsae = JacobianSparseAutoencoder(mlp, **SETTINGS, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, op in enumerate(ops):
            rows = X[(16 * i) % 384:(16 * i) % 384 + 16]
            if op == "call":
                jsae.partial_fit(rows)
            elif op == "new_l1":
                jsae.set_params(l1=jsae.l1 + 0.5).partial_fit(rows)
            else:
                jsae.set_params(warm_start=op == "warm_fit").fit(X[:64])
    for side, prefix in ((jsae.input_sae_, "input"), (jsae.output_sae_, "output")):
        assert side.history_ == _side_rows_from_scratch(jsae.history_, prefix)


def _header_estimate(estimator):
    import json

    from sklearn_jsae import _model_file

    doc, arrays = _model_file.document(estimator)
    header = {_model_file.METADATA_KEY: json.dumps(doc, default=_model_file._json_default, allow_nan=True)}
    return len(json.dumps(header)) + 200 * len(arrays)


@pytest.mark.parametrize("names", ["ascii", "unicode"])
def test_the_header_estimate_bounds_the_header_safetensors_writes(X, mlp, tmp_path, names):
    """save refuses a document too large for safetensors before writing; its estimate must not be
    below the real header (the first 8 bytes of the file give its length), or an oversized file
    would still fail in safetensors' own words."""
    import pandas as pd

    columns = [f"{'特征' if names == 'unicode' else 'f'}{i}" for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jsae = JacobianSparseAutoencoder(mlp, **SETTINGS, max_iter=3).fit(pd.DataFrame(X, columns=columns))
        for start in range(0, 96, 16):
            jsae.partial_fit(pd.DataFrame(X[start:start + 16], columns=columns))
    path = jsae.save(tmp_path / "m.safetensors")
    with open(path, "rb") as f:
        written = int.from_bytes(f.read(8), "little")
    assert written <= _header_estimate(jsae) <= 2 * written


def test_a_history_too_long_for_the_file_is_refused_before_writing(X, mlp, tmp_path, monkeypatch):
    """safetensors caps its header at 100 MB (a JSAE's history reaches it after about 175,000
    partial_fit calls): the write failed as "cannot write ... check that the folder can be written".
    Now save says what is too large and how to go on, and leaves a previous file as it was."""
    from sklearn_jsae import _model_file
    from sklearn_jsae.exceptions import PersistenceError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jsae = JacobianSparseAutoencoder(mlp, **SETTINGS, max_iter=1).fit(X[:64])
        path = jsae.save(tmp_path / "m.safetensors")
        before = open(path, "rb").read()
        for start in range(0, 320, 8):
            jsae.partial_fit(X[start:start + 8])
    monkeypatch.setattr(_model_file, "SAFETENSORS_MAX_HEADER", _header_estimate(jsae) - 1)
    with pytest.raises(PersistenceError, match=r"header would be about .* MB, over the .* that safetensors writes "
                                               r"and reads.*history_: 41 rows.*history_\[-10000:\].*Nothing was written"):
        jsae.save(path)
    assert open(path, "rb").read() == before
    jsae.history_ = jsae.history_[-5:]
    for side in (jsae.input_sae_, jsae.output_sae_):
        side.history_ = side.history_[-5:]
    from sklearn_jsae import load

    assert len(load(jsae.save(path)).history_) == 5  # the way out it gives

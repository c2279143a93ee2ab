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

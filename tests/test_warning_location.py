"""Every warning of the package points at the user's line: the first frame outside the package.

A fixed ``stacklevel`` pointed at one of the package's own files on all paths but one (the
no-variance warning at ``sklearn_jsae/_backend/train.py``, the past-schedule one inside the
trainer, a save's dropped parameter inside ``_model_file.py``), where a user cannot act on it and
``warnings.filterwarnings(module=...)`` on their own module misses it.
"""

import contextlib
import inspect
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

import sklearn_jsae
from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._warnings import warn

SMALL = dict(n_components=16, k=2, batch_size=32, max_iter=4, random_state=0)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)


class _Rows:
    """A resumable stream of X's rows (state_dict / load_state_dict), ``rows`` at a time."""

    def __init__(self, X, rows):
        self.X, self.rows, self.position = X, rows, 0

    def __iter__(self):
        while self.position < len(self.X):
            start = self.position
            self.position += self.rows
            yield self.X[start : self.position]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class _ModelWithAttention(torch.nn.Module):
    """An MLP-shaped module whose name says "attention": mlp= warns it looks like a whole block."""

    def __init__(self):
        super().__init__()
        self.attention = torch.nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.attention(x))


def _few_steps_fit(X, tmp_path):
    TopKSparseAutoencoder(**SMALL).fit(X[:40])


def _few_steps_stream(X, tmp_path):
    JacobianSparseAutoencoder(**{**SMALL, "n_tokens": 64}).fit_stream(_Rows(X, 32))


def _no_variance(X, tmp_path):
    TopKSparseAutoencoder(**{**SMALL, "max_iter": 30}).fit(np.ones((256, 6), dtype=np.float32))


def _checkpoint_dir_unused_by_partial_fit(X, tmp_path):
    TopKSparseAutoencoder(**SMALL, checkpoint_dir=str(tmp_path)).partial_fit(X)


def _checkpoints_of_other_fits(X, tmp_path):
    settings = {**SMALL, "max_iter": 30, "checkpoint_dir": str(tmp_path)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TopKSparseAutoencoder(**settings).fit(X)
    TopKSparseAutoencoder(**{**settings, "k": 3}).fit(X)


def _stream_cannot_resume(X, tmp_path):
    TopKSparseAutoencoder(**{**SMALL, "checkpoint_dir": str(tmp_path)}).fit_stream([X[:128], X[128:]])


def _stream_ended_before_n_tokens(X, tmp_path):
    TopKSparseAutoencoder(**{**SMALL, "n_tokens": 100_000}).fit_stream(_Rows(X, 64))


def _past_the_schedule(X, tmp_path):
    sae = TopKSparseAutoencoder(**{**SMALL, "n_tokens": 64})
    sae.partial_fit(X[:64])
    sae.partial_fit(X[64:128])


def _warm_start_with_another_mlp(X, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jsae = JacobianSparseAutoencoder(torch.tanh, **{**SMALL, "max_iter": 30}).fit(X)
    jsae.set_params(mlp=torch.sin).partial_fit(X)


def _looks_like_a_whole_model(X, tmp_path):
    JacobianSparseAutoencoder(_ModelWithAttention(), **{**SMALL, "max_iter": 30}).fit(X)


def _inference_on_a_missing_gpu(X, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = TopKSparseAutoencoder(**{**SMALL, "max_iter": 30}).fit(X)
    sae.set_params(device="cuda:7").transform(X)


def _save_drops_a_parameter(X, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = TopKSparseAutoencoder(**{**SMALL, "max_iter": 30}).fit(X)
    sae.set_params(random_state=np.random.default_rng(0)).save(str(tmp_path / "model.safetensors"))


CALLS = {
    "few steps (fit)": (_few_steps_fit, ConvergenceWarning, "optimiser steps"),
    "few steps (fit_stream)": (_few_steps_stream, ConvergenceWarning, "optimiser steps"),
    "no variance": (_no_variance, UserWarning, "no variance"),
    "partial_fit's checkpoint_dir": (_checkpoint_dir_unused_by_partial_fit, UserWarning, "not used by partial_fit"),
    "other fits' checkpoints": (_checkpoints_of_other_fits, UserWarning, "checkpoints of other fits"),
    "a stream that cannot resume": (_stream_cannot_resume, UserWarning, "cannot resume from them"),
    "a stream shorter than n_tokens": (_stream_ended_before_n_tokens, UserWarning, "the stream ended after"),
    "past the schedule": (_past_the_schedule, UserWarning, "its schedule spans"),
    "another mlp": (_warm_start_with_another_mlp, UserWarning, "computes something else"),
    "a whole model as mlp": (_looks_like_a_whole_model, UserWarning, "looks like a whole model"),
    "a missing GPU at inference": (_inference_on_a_missing_gpu, UserWarning, "running on the CPU instead"),
    "a parameter save drops": (_save_drops_a_parameter, UserWarning, "cannot be written"),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_each_warning_points_at_the_callers_line(X, tmp_path, case):
    call, category, text = CALLS[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(X, tmp_path)
    ours = [w for w in caught if issubclass(w.category, category) and text in str(w.message)]
    assert ours, [str(w.message)[:80] for w in caught]
    assert {(w.filename, w.lineno > 0) for w in ours} == {(__file__, True)}, [(w.filename, w.lineno) for w in ours]


def test_a_module_filter_on_the_callers_module_catches_the_warnings(X):
    """What the location is for: ``filterwarnings(module=...)`` on the calling module's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=UserWarning, module=__name__)
        _no_variance(X, None)
    assert not [w for w in caught if "no variance" in str(w.message)]


_PACKAGE = os.path.dirname(sklearn_jsae.__file__)


def _package_frames(depth: int, through_contextlib: bool, warning: str):
    """A chain of ``depth`` functions whose code claims a file inside the package (as the package's
    own frames do), optionally entered through a contextlib context manager, ending in ``warn``."""
    namespace = {"warn": warn, "contextlib": contextlib}
    source = ["def level_0():\n    warn(MESSAGE)\n"]
    for i in range(1, depth + 1):
        body = (f"    with contextlib.nullcontext():\n        level_{i - 1}()\n" if through_contextlib and i == 1
                else f"    level_{i - 1}()\n")
        source.append(f"def level_{i}():\n{body}")
    code = compile("".join(source), os.path.join(_PACKAGE, "_frames_under_test.py"), "exec")
    namespace["MESSAGE"] = warning
    exec(code, namespace)
    return namespace[f"level_{depth}"]


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(0, 12), through_contextlib=st.booleans())
def test_warn_skips_any_number_of_package_frames(depth, through_contextlib):
    entry = _package_frames(depth, through_contextlib, f"depth {depth}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        entry()  # the line the warning must name
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]

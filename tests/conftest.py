"""Fixtures shared by several test files."""

import pytest

import sklearn_jsae._backend.train as train_module


@pytest.fixture
def mlp_pass_calls(monkeypatch):
    """The device of every call of the real ``compute_mlp_pass`` (a cache miss), in order."""
    calls = []
    real = train_module.compute_mlp_pass

    def counting(*args, **kwargs):
        calls.append(kwargs.get("device", "cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_mlp_pass", counting)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (the processes they start get the cores), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def caller_state():
    """A caller with 3 torch threads and the svg backend (a stand-in for a notebook's inline one),
    restored after the test."""
    matplotlib = pytest.importorskip("matplotlib")
    import torch

    threads, backend = torch.get_num_threads(), matplotlib.get_backend()
    torch.set_num_threads(3)
    matplotlib.use("svg")
    yield
    torch.set_num_threads(threads)
    matplotlib.use(backend)


@pytest.fixture
def no_work(monkeypatch):
    """``evaluate``'s data loading or any JSAE fit fails the test: a command's checks must come
    before any work."""
    from sklearn_jsae import JacobianSparseAutoencoder, _evaluate

    def refuse(*args, **kwargs):
        pytest.fail("work started before the options were checked")

    monkeypatch.setattr(_evaluate, "_load", refuse)
    monkeypatch.setattr(JacobianSparseAutoencoder, "fit", refuse)

"""The library and the process-wide or thread-wide state it shares with its caller and other threads.

torch and Python keep state that a library call can read or change without meaning to: hooks on a
model every thread runs, the calling thread's ``torch.autocast``, the process-wide TF32 flag, the
order in which torch's threads add up a gradient, the process-wide warning filters.  Each test here
pins one way a call used to leak into that state, or let it leak in:

* ``spliced_ce_score``'s splice hooks fire only for its own thread's forward passes (two scores
  computed at once, or a caller's forward of the same model meanwhile, were spliced by each other),
  and so do the hooks of interop's search for hook names (another thread's forward was stopped);
  a forward in another thread caught inside torch's two-step registration of any of the package's
  pre-hooks runs clean (it raised a TypeError there);
* a caller's ambient ``torch.autocast`` changes nothing: inference runs in float32 and training in
  the precision ``mixed_precision`` configures, and ``from_saes`` measures its scales in float32
  (inference raised "unsupported ScalarType BFloat16", scores differed, ``mixed_precision=False``
  trained in bf16);
* overlapping mixed-precision CUDA fits share one TF32 window, so the flag stays on while any of
  them trains and the caller's value comes back after the last (saved and restored per fit, fits
  entering A, B and leaving A, B turned it off under B and left it on);
* repeated fits whose Jacobian penalty goes through ``torch.func.jvp`` (a callable or a general
  ``nn.Module`` MLP) are bit-identical on two torch threads (advanced indexing's backward added
  repeated rows in a varying order: differences up to 6e-8);
* the first ``jvp`` of a process keeps the warning filters other threads add meanwhile
  (``warnings.catch_warnings`` put an old copy of the list back).

Fits are tiny (512 or 1,024 × 16 rows, 64 latents, k = 4) so that the file runs in seconds.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, metrics

D = 16
KW = dict(n_components=64, k=4, max_iter=2, device="cpu", random_state=0, batch_size=128)


def _X(n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _sequential(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.GELU(), torch.nn.Linear(2 * D, D))


class _Softplus(torch.nn.Module):
    """A general module (no closed form): its Jacobian goes through torch.func.jvp."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(D, 2 * D), torch.nn.Linear(2 * D, D)

    def forward(self, x):
        return self.b(torch.nn.functional.softplus(self.a(x)))


def _tanh_callable():
    """A plain function of a Linear module's weights: a callable MLP (jvp path)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(D, D)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    return lambda x: torch.tanh(x @ weight.T + bias)


def _fitted_arrays(estimator) -> dict:
    """Every floating numpy array of a fitted estimator (both SAEs of a JSAE)."""
    owners = {"": estimator}
    for side in ("input_sae_", "output_sae_"):
        if hasattr(estimator, side):
            owners[side] = getattr(estimator, side)
    return {prefix + name: value.copy() for prefix, owner in owners.items() for name, value in vars(owner).items()
            if isinstance(value, np.ndarray) and value.dtype.kind == "f"}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _dense(value):
    if hasattr(value, "toarray"):
        return value.toarray()
    if hasattr(value, "todense"):
        return np.asarray(value.todense())
    return value


# ------------------------------------------------------------------ ambient torch.autocast


@pytest.fixture(scope="module")
def fitted():
    X = _X()
    return dict(
        X=X,
        closed=JacobianSparseAutoencoder(mlp=_sequential(), **KW).fit(X),
        general=JacobianSparseAutoencoder(mlp=_Softplus(), l1=1.0, **KW).fit(X),
        topk=TopKSparseAutoencoder(**KW).fit(X),
    )


def _inference_results(jsae, topk, X) -> dict:
    """Every public inference method and metric of the two estimators on X."""
    codes, output_codes = jsae.transform(X), jsae.transform_output(X)
    out = dict(
        transform=_dense(codes), transform_output=_dense(output_codes),
        inverse_transform=jsae.inverse_transform(codes), inverse_transform_output=jsae.inverse_transform_output(output_codes),
        mlp_outputs=jsae.mlp_outputs(X), jacobian=_dense(jsae.jacobian(X)), score=jsae.score(X),
        topk_transform=_dense(topk.transform(X)), topk_inverse=topk.inverse_transform(topk.transform(X)),
        topk_score=topk.score(X),
        jacobian_sparsity=metrics.jacobian_sparsity(jsae, X),
        global_jacobian_sparsity=metrics.global_jacobian_sparsity(jsae, X),
        reconstruction_metrics=metrics.reconstruction_metrics(jsae, X),
        fraction_variance_unexplained=metrics.fraction_variance_unexplained(jsae, X),
        topk_reconstruction_metrics=metrics.reconstruction_metrics(topk, X),
        linearity=metrics.linearity(jsae, X, n_samples=8, n_points=11, random_state=0, return_curves=True),
        intervention_agreement=metrics.intervention_agreement(jsae, X, return_details=True),
    )
    return out


def _assert_results_equal(got, expected, where=""):
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_results_equal(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_results_equal(g, e, f"{where}[{i}]")
    elif isinstance(expected, (np.ndarray, float, int, np.generic)):
        np.testing.assert_array_equal(_dense(got), _dense(expected), err_msg=where)
    else:
        assert got == expected, where


def _cpu_autocast_enabled():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 (the package allows 2.2): no device argument
        return torch.is_autocast_cpu_enabled()


@pytest.mark.parametrize("mlp", ["closed", "general"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_ignores_ambient_autocast(fitted, mlp, dtype):
    """transform, transform_output, inverse_transform(_output), mlp_outputs, jacobian, score, TopK's
    methods and the metrics give, bit for bit, inside a caller's CPU autocast what they give outside."""
    X = fitted["X"][:64]
    expected = _inference_results(fitted[mlp], fitted["topk"], X)
    with torch.autocast("cpu", dtype=dtype):
        got = _inference_results(fitted[mlp], fitted["topk"], X)
        assert _cpu_autocast_enabled()  # the caller's state is theirs again after each call
    _assert_results_equal(got, expected)


def test_inference_generators_leave_the_callers_autocast_between_batches(fitted):
    """The Jacobian blocks come batch by batch: the caller's code between two batches runs under
    the caller's autocast, not the library's float32."""
    jsae = fitted["closed"]
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in jsae._iter_blocks(fitted["X"][:64]):
            seen.append(_cpu_autocast_enabled())
    assert seen and all(seen)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: TopKSparseAutoencoder(mixed_precision=False, **KW), id="topk-float32"),
    pytest.param(lambda: JacobianSparseAutoencoder(mlp=_sequential(), l1=1.0, mixed_precision=False, **KW),
                 id="jsae-float32"),
    pytest.param(lambda: JacobianSparseAutoencoder(mlp=_sequential(), l1=1.0, mixed_precision=True, **KW),
                 id="jsae-bf16"),
])
def test_fit_trains_in_the_configured_precision_under_ambient_autocast(make):
    """The estimator's ``mixed_precision`` alone decides the training precision: a fit (and
    partial_fit, which measures its scales elsewhere) inside a caller's autocast region gives,
    bit for bit, the model it gives outside (float32, or its own bf16 autocast)."""
    X = _X()
    expected = _fitted_arrays(make().fit(X))
    expected_partial = _fitted_arrays(make().partial_fit(X))
    with torch.autocast("cpu", dtype=torch.float16):
        got = _fitted_arrays(make().fit(X))
        got_partial = _fitted_arrays(make().partial_fit(X))
    _assert_same(got, expected)
    _assert_same(got_partial, expected_partial)


def test_from_saes_measures_its_scales_in_float32_under_ambient_autocast(fitted):
    """from_saes measures c_x and c_y as fit does: in float32, whatever the caller's autocast."""
    X, jsae = fitted["X"], fitted["closed"]
    expected = JacobianSparseAutoencoder.from_saes(_sequential(), jsae.input_sae_, jsae.output_sae_, X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = JacobianSparseAutoencoder.from_saes(_sequential(), jsae.input_sae_, jsae.output_sae_, X)
    assert (got.input_sae_.scale_, got.output_sae_.scale_) == (expected.input_sae_.scale_,
                                                                 expected.output_sae_.scale_)
    _assert_same(_fitted_arrays(got), _fitted_arrays(expected))


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_training_step_replaces_the_callers_autocast(autocast_dtype):
    """The backend's training loop on its own (a single SAE, whose data statistics have no matrix
    product), outside the estimators' own guard: each step runs in the configured precision."""
    from sklearn_jsae._backend.train import TrainConfig, train

    X = _X()
    config = TrainConfig(n_components=64, n_output_components=None, k=4, max_iter=2, batch_size=128,
                         autocast_dtype=autocast_dtype)
    expected = train(X, None, config).input_params
    with torch.autocast("cpu", dtype=torch.float16):
        got = train(X, None, config).input_params
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), got.tensors(), expected.tensors()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------- the TF32 window


@settings(max_examples=60, deadline=None)
@given(data=st.data(), user_flag=st.booleans(),
       mixed=st.lists(st.booleans(), min_size=1, max_size=5))
def test_overlapping_mixed_precision_fits_share_one_tf32_window(data, user_flag, mixed):
    """Any interleaving of fits entering and leaving _training_precision (threads of a parallel
    search), with mixed precision on CUDA or not: TF32 stays allowed while a mixed-precision fit
    is inside, and the caller's value is back once none is (and unchanged when none ever was)."""
    from sklearn_jsae._topk import _training_precision

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = user_flag
    inside = set()
    try:
        contexts = [_training_precision(SimpleNamespace(autocast_dtype=torch.bfloat16 if on else None,
                                                        device="cuda:0")) for on in mixed]
        # an order of 2n events in which each fit enters before it leaves
        pending = {i: ["enter", "exit"] for i in range(len(contexts))}
        while pending:
            i = data.draw(st.sampled_from(sorted(pending)))
            event = pending[i].pop(0)
            if not pending[i]:
                del pending[i]
            if event == "enter":
                contexts[i].__enter__()
                inside.add(i)
            else:
                contexts[i].__exit__(None, None, None)
                inside.discard(i)
            if any(mixed[j] for j in inside):
                assert torch.backends.cuda.matmul.allow_tf32 is True
            else:
                assert torch.backends.cuda.matmul.allow_tf32 is user_flag
        assert torch.backends.cuda.matmul.allow_tf32 is user_flag
    finally:
        for i in inside:  # a failed example leaves no fit inside the window for the next one
            contexts[i].__exit__(None, None, None)
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_window_in_threads():
    """The same from threads: fit B enters while A is inside, A leaves first; B still has TF32."""
    from sklearn_jsae._topk import _training_precision

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    config = SimpleNamespace(autocast_dtype=torch.bfloat16, device="cuda:0")
    both_in, a_out = threading.Barrier(2), threading.Event()

    def fit_a():
        with _training_precision(config):
            both_in.wait()
        a_out.set()

    def fit_b():
        with _training_precision(config):
            both_in.wait()
            a_out.wait()
            return torch.backends.cuda.matmul.allow_tf32

    try:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(fit_a), pool.submit(fit_b)
            a.result()
            assert b.result() is True
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# -------------------------------------------------------- repeated fits on two torch threads


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("make_mlp", [_tanh_callable, _Softplus], ids=["callable", "module"])
def test_repeated_jvp_fits_are_bit_identical_on_two_threads(two_threads, make_mlp):
    """docs/reproducibility.rst: the same seed, data and thread count give bit-identical models,
    for an MLP whose Jacobian penalty goes through torch.func.jvp too (batches of 512 rows: the
    gathered decoder rows' gradient is large enough for torch to split it between threads; the
    old backward differed in 9 or 10 of 10 trials of three fits)."""
    X = _X(1024)
    mlp = make_mlp()
    kw = dict(KW, batch_size=512, l1=1.0)
    first = _fitted_arrays(JacobianSparseAutoencoder(mlp=mlp, **kw).fit(X))
    for _ in range(3):
        _assert_same(_fitted_arrays(JacobianSparseAutoencoder(mlp=mlp, **kw).fit(X)), first)


# ------------------------------------------------------------------- warning filters


def test_first_jvp_keeps_the_warning_filters_other_threads_add(monkeypatch):
    """A filter another thread installs while load_forward_ad runs torch's first jvp survives it,
    and load_forward_ad's own filter, which still silences torch.jit.script's DeprecationWarning
    under ``-W error::DeprecationWarning``, is gone after it."""
    import sklearn_jsae._backend.jacobian as jacobian

    real_jvp = jacobian.jvp

    def jvp_while_another_thread_adds_a_filter(fn, primals, tangents):
        other = threading.Thread(target=warnings.filterwarnings, args=("ignore",),
                                 kwargs=dict(message="another thread's filter"))
        other.start()
        other.join()
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`.", DeprecationWarning)
        return real_jvp(fn, primals, tangents)

    monkeypatch.setattr(jacobian, "jvp", jvp_while_another_thread_adds_a_filter)
    with warnings.catch_warnings():  # (this test's own changes to the filters are undone after it)
        warnings.simplefilter("error", DeprecationWarning)
        before = list(warnings.filters)
        jacobian.load_forward_ad.__wrapped__()  # the uncached function: it runs at every call
        after = list(warnings.filters)
    patterns = [f[1].pattern if f[1] is not None else None for f in after]
    assert "another thread's filter" in patterns
    assert after[1:] == before and after[0][1].pattern == "another thread's filter"


# ------------------------------------------------------------- hooks on a shared model


def _tiny_gpt2_lm():
    """``(model, ids)``: a tiny random GPT-2 language model and 16 sequences of 12 token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=60,
                                     bos_token_id=59, eos_token_id=59)
    return transformers.GPT2LMHeadModel(config).eval(), np.random.default_rng(0).integers(0, 59, size=(16, 12))


def _recording_forward(model, ids, output, others):
    """A function that runs ``model(ids)`` without gradients and appends ``output(result)``, or the
    exception it met (what another thread meets is the finding), to ``others``."""
    def forward():
        try:
            with torch.no_grad():
                others.append(output(model(ids)))
        except BaseException as exc:  # noqa: BLE001
            others.append(exc)
    return forward


def test_spliced_ce_score_hooks_splice_only_their_own_threads_forwards():
    """Two spliced_ce_score calls on one model at once (two estimators, two threads) give their
    sequential values, and a caller's plain forward of the model in a third thread meanwhile
    gives its clean logits."""
    model, ids = _tiny_gpt2_lm()
    from sklearn_jsae.hf import harvest, mlp_of
    from sklearn_jsae.metrics import spliced_ce_score

    X, _ = harvest(model, 1, input_ids=ids, progress=False)
    mlp = mlp_of(model, 1)
    estimators = [JacobianSparseAutoencoder(mlp=mlp, n_components=32, k=k, max_iter=1, random_state=seed).fit(X)
                  for k, seed in ((4, 0), (1, 1))]
    sequential = [spliced_ce_score(model, 1, e, ids, batch_size=4) for e in estimators]
    plain_ids = torch.as_tensor(ids[:4])
    with torch.no_grad():
        clean = model(plain_ids).logits.clone()
    start = threading.Barrier(3)
    scoring = threading.Event()

    def score(estimator):
        start.wait()
        try:
            return [spliced_ce_score(model, 1, estimator, ids, batch_size=4) for _ in range(2)]
        finally:
            scoring.set()

    def plain_forwards():
        start.wait()
        same = []
        while not scoring.is_set() or not same:
            with torch.no_grad():
                same.append(torch.equal(model(plain_ids).logits, clean))
        return same

    with ThreadPoolExecutor(3) as pool:
        scored = [pool.submit(score, e) for e in estimators]
        plain = pool.submit(plain_forwards)
        results = [f.result() for f in scored]
        same = plain.result()
    for expected, got in zip(sequential, results):
        for run in got:
            assert run == expected
    assert all(same)


def test_finding_hook_names_leaves_other_threads_forwards_of_the_model_alone(monkeypatch):
    """interop's hook-name search hooks the user's model for one probe forward pass; a forward of
    the same model in another thread meanwhile was stopped by its capture hook (an exception from
    inside the model) instead of running to the end."""
    transformers = pytest.importorskip("transformers")
    from sklearn_jsae import _hookpoints
    from sklearn_jsae.hf import _adapters

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=60)
    model = transformers.GPT2Model(config).eval()
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    others = []
    real_run = _adapters.run_model

    def run_with_another_threads_forward(*args, **kwargs):  # while the probe's hooks are in place
        thread = threading.Thread(target=_recording_forward(model, ids, lambda out: out.last_hidden_state, others))
        thread.start()
        thread.join()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(_adapters, "run_model", run_with_another_threads_forward)
    hooks = _hookpoints.mlp_hookpoints(model, 1)
    assert hooks.input == "h.1.ln_2"
    assert len(others) == 1 and isinstance(others[0], torch.Tensor), others
    torch.testing.assert_close(others[0], expected, rtol=0, atol=0)


class _ForwardInTheRegistrationWindow(OrderedDict):
    """A module's with-kwargs pre-hook flags whose every insert first runs ``forward`` in another
    thread to its end: torch registers such a hook in two steps (the hook, then this flag), so that
    forward meets the new hook in the window between them, which a real second thread hits rarely
    (once in CI, as ``pre_hook() missing 1 required positional argument: 'kwargs'``)."""

    def __init__(self, forward):
        super().__init__()
        self.forward = forward

    def __setitem__(self, key, value):
        thread = threading.Thread(target=self.forward)
        thread.start()
        thread.join()
        super().__setitem__(key, value)


def _stream_rows(model, ids, watch):
    from sklearn_jsae.hf import ActivationStream
    stream = ActivationStream(model, 1, input_ids=ids, batch_size=8, buffer_size=16, seed=0)
    watch()
    return next(iter(stream))


def _harvest_rows(model, ids, watch):
    from sklearn_jsae.hf import harvest
    watch()
    return harvest(model, 1, input_ids=ids, progress=False)


def _hook_names(model, ids, watch):
    from sklearn_jsae import _hookpoints
    watch()
    return _hookpoints.mlp_hookpoints(model, 1)


def _spliced_scores(model, ids, watch):
    from sklearn_jsae.hf import harvest, mlp_of
    from sklearn_jsae.metrics import spliced_ce_score
    X, _ = harvest(model, 1, input_ids=ids, progress=False)
    jsae = JacobianSparseAutoencoder(mlp=mlp_of(model, 1), n_components=32, k=4, max_iter=1, random_state=0)
    jsae.fit(X)
    watch()
    return spliced_ce_score(model, 1, jsae, ids, batch_size=4)


@pytest.mark.parametrize("call", [_harvest_rows, _stream_rows, _hook_names, _spliced_scores])
def test_a_forward_in_another_thread_while_the_hooks_are_registered_runs_clean(call):
    """Every call that hooks the user's model (harvest, a stream's capture, the hook-name probe,
    spliced_ce_score) leaves a forward of that model in another thread, made to run between the two
    steps of torch's registration of the call's pre-hook, unchanged and free of errors."""
    model, ids = _tiny_gpt2_lm()
    plain_ids = torch.as_tensor(ids[:2])
    with torch.no_grad():
        clean = model(plain_ids).logits
    others = []
    forward = _recording_forward(model, plain_ids, lambda out: out.logits, others)

    def watch():  # from here on, the call's own registrations
        for module in model.modules():
            module._forward_pre_hooks_with_kwargs = _ForwardInTheRegistrationWindow(forward)

    call(model, ids, watch)
    assert others, "no pre-hook with kwargs was registered: the window was never reached"
    for got in others:
        assert isinstance(got, torch.Tensor), got
        torch.testing.assert_close(got, clean, rtol=0, atol=0)

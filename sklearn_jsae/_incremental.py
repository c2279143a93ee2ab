"""What the estimators share for fits beyond one in-memory ``fit``: checkpoints, ``partial_fit``
and stream fits.  Torch is imported inside the functions, as in the estimators.

* :func:`make_checkpointer` ties ``checkpoint_dir`` to one fit by an identity (data, MLP and
  settings fingerprints), so a rerun of the same fit resumes and any other fit is refused.
* :func:`start_trainer` measures the data statistics on a first batch of rows (``partial_fit``'s
  first call, a stream's first rows) and builds the :class:`~sklearn_jsae._backend.trainer.Trainer`.
* :func:`train_rows` runs optimiser steps over rows in the order given.
* :func:`join_job` joins the ``torch.distributed`` job of a ``distributed=True`` fit.
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np


def total_steps(n_tokens, batch_size):
    """Steps the schedules span for ``n_tokens`` tokens; None (open-ended) without it."""
    return None if n_tokens is None else max(1, math.ceil(n_tokens / batch_size))


def _settings(config) -> str:
    """The training settings that define a fit, as JSON (the seed is not one: an int seed joins
    the identity in :func:`make_checkpointer`, and the checkpoint holds every random state, so a
    fit with ``random_state=None`` can resume too)."""
    keys = ("n_components", "n_output_components", "k", "l1", "learning_rate", "max_iter", "batch_size",
            "lr_warmup", "lr_decay", "l1_warmup", "max_grad_norm", "aux_coef", "aux_k", "dead_tokens")
    settings = {key: getattr(config, key) for key in keys}
    settings["dtype"] = str(config.dtype)
    settings["autocast_dtype"] = str(config.autocast_dtype)
    if config.penalty != "paper":  # absent for the paper's penalty: checkpoints written before it existed resume
        settings["penalty"] = config.penalty
    return json.dumps(settings, sort_keys=True)


# Parameters that do not change what a running ``partial_fit`` trains (``max_iter`` counts fit's
# epochs; partial_fit has none).
_NOT_TRAINING = frozenset({"verbose", "checkpoint_dir", "checkpoint_every", "warm_start", "sparse_output", "memory",
                           "random_state", "distributed", "max_iter"})


def training_params(estimator) -> dict:
    """The parameters that shape ``estimator``'s training (``k``, ``l1``, the MLP, ...): a
    ``partial_fit`` whose running optimiser started with other values (``set_params`` between two
    calls) starts again from the fitted weights with these.  ``device`` is compared as resolved
    (``"auto"`` is ``"cpu"`` on a machine without CUDA)."""
    from ._validation import resolve_device

    params = {name: value for name, value in estimator.get_params(deep=False).items() if name not in _NOT_TRAINING}
    if "device" in params:
        try:
            params["device"] = resolve_device(params["device"])
        except ValueError:  # not a device here: starting the optimiser names it
            pass
    return params


def join_job(estimator, config):
    """``(parallel, config)``: the :class:`~sklearn_jsae._backend.distributed.DataParallel` of a
    ``distributed=True`` estimator (None otherwise) and the config with rank 0's seed, so that
    ``random_state=None`` gives every rank the same initialisation and batch order."""
    import dataclasses

    if not getattr(estimator, "distributed", False):
        return None, config
    from ._backend.distributed import DataParallel

    parallel = DataParallel.join(config.device)
    return parallel, dataclasses.replace(config, seed=parallel.broadcast_int(config.seed, "sharing the seed"))


# What a fit continues from when ``check_same_fit`` is not told: the estimator's fitted model
# under ``warm_start`` (``fit`` builds its ``init`` only after the check).
_FITTED = object()


def _warm_state(estimator):
    """``(params_x, params_y, scale_x, scale_y)`` of the fitted model a ``warm_start`` fit continues
    from, or None (a fresh model): the tensors and scales its ``init`` is built from."""
    if not (estimator.warm_start and estimator.__sklearn_is_fitted__()):
        return None
    if hasattr(estimator, "input_sae_"):  # the pair
        return (estimator.input_sae_._params(), estimator.output_sae_._params(), estimator.input_sae_.scale_,
                estimator.output_sae_.scale_)
    return estimator._params(), None, estimator.scale_, None


def _warm_fingerprint(init) -> str:
    """Hash of a warm start's SAE parameters and scales; ``"none"`` for a fresh model."""
    from ._backend.checkpoint import fingerprint_module

    if init is None:
        return "none"
    scales = tuple(None if scale is None else float(scale) for scale in init[2:])
    return f"{fingerprint_module(_params_module(init[0], init[1]))}:{scales}"


def _seed_setting(random_state):
    """``random_state`` as the ranks compare it: an int's value; None and a RandomState by kind (they
    are drawn from on rank 0 alone, and the draw broadcast, see :func:`join_job`)."""
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return None if random_state is None else type(random_state).__name__


# check_same_fit's values as its error names them, and what to do when one differs between ranks.
_LABELS = dict(data="X (or the stream)", settings="settings (n_components, k, l1, ...)",
               warm_start="warm start (the fitted model warm_start=True continues from)",
               checkpoint="checkpoint_dir (set or not, checkpoint_every)", memory="memory (set or not)")
_FIXES = dict(
    random_state="Pass the same random_state on every rank (not the rank): the ranks train one model, "
                 "from one seed, and a checkpoint names that seed.",
    warm_start="With warm_start=True every rank must continue from the same fitted model: fit it "
               "data-parallel, or load the same saved model on every rank (or pass warm_start=False).",
    n_tokens="n_tokens is the whole job's number of tokens (every rank's shard together): pass the same "
             "value on every rank.",
)


def check_same_fit(parallel, data_identity: str, mlp_map, config, estimator, init=_FITTED,
                   kind: str = "fit") -> None:
    """Raise on every rank unless all ranks fit the same data, MLP, settings, ``random_state`` and
    warm start (fingerprints of the ``init`` the fit continues from: by default the estimator's
    fitted model under ``warm_start``; None: a fresh model), for a stream (``kind="stream"``) the
    same ``n_tokens``, and all or none of them checkpoint (every ``checkpoint_every``) and cache the
    MLP pass (``memory``): those change the collectives a rank makes, and ranks that disagree fail in
    one (a gloo abort, an NCCL hang) instead of with this error.  The folders may differ.

    ``random_state``: rank 0's seed trains every rank (:func:`join_job`), so a seed per rank
    (``random_state=rank``) was silently ignored, and the checkpoint identity, which names an int
    seed, differed between ranks: the job could never resume.  ``n_tokens`` sets a stream's
    schedule and its stopping point: ranks that disagree train different models or fail mid-run."""
    from ._backend.checkpoint import fingerprint_module

    if init is _FITTED:
        init = _warm_state(estimator)
    values = dict(data=data_identity, mlp=fingerprint_module(mlp_map), settings=_settings(config),
                  random_state=_seed_setting(estimator.random_state), warm_start=_warm_fingerprint(init),
                  checkpoint=None if estimator.checkpoint_dir is None else str(estimator.checkpoint_every),
                  memory=getattr(estimator, "memory", None) is not None)
    if kind == "stream":
        values["n_tokens"] = None if estimator.n_tokens is None else int(estimator.n_tokens)
    parallel.check_same(values, "X, mlp, settings, random_state, warm start, n_tokens, checkpoint_dir or memory",
                        _FIXES, _LABELS)


def make_checkpointer(estimator, data_identity, mlp_map, config, init, kind: str, parallel=None):
    """The :class:`~sklearn_jsae._backend.checkpoint.Checkpointer` for ``estimator.checkpoint_dir``,
    or None without one.  ``data_identity`` fingerprints the training data (a str, or a callable
    returning one, called only when there is a checkpoint folder: it reads the data); ``init``
    (warm start) is part of the identity too, and so are the seed of an int ``random_state`` or a
    ``RandomState`` (the seed drawn from it) and, for a stream
    (``kind="stream"``), ``n_tokens``.
    Data-parallel (``parallel``): the number of ranks is part of the identity and only rank 0
    writes."""
    from ._backend.checkpoint import checkpoint_interval

    checkpoint_interval(estimator.checkpoint_every)  # a malformed duration fails, with or without a folder
    if estimator.checkpoint_dir is None:
        return None
    if callable(data_identity):
        data_identity = data_identity()
    from ._backend.checkpoint import Checkpointer, fingerprint_module

    warm = "none"
    if init is not None:
        warm = fingerprint_module(_params_module(init[0], init[1]))
    identity = dict(kind=kind, estimator=type(estimator).__name__, data=data_identity,
                    mlp=fingerprint_module(mlp_map), settings=_settings(config), warm_start=warm)
    if kind == "stream":  # a stream's length sets its schedule (an array fit's is its rows times max_iter)
        # an int, not a NumPy scalar (np.int64 is not JSON): the identity is hashed as JSON
        identity["n_tokens"] = None if estimator.n_tokens is None else int(estimator.n_tokens)
    if isinstance(estimator.random_state, numbers.Integral):
        # Another seed is another fit (a seed study sharing a folder); without one (None) a rerun
        # resumes: the checkpoint holds the draws.
        identity["seed"] = int(estimator.random_state)
    elif estimator.random_state is not None:
        # A RandomState: the seed this fit drew from it.  A rerun that builds RandomState(s) again
        # draws the same one and resumes; fits drawing in turn from one RandomState (a seed study)
        # are distinct fits, which shared one checkpoint (every fit after the first returned the
        # first's model).
        identity["seed"] = int(config.seed)
    if parallel is not None and parallel.world_size > 1:  # a 1-rank job is the one-process fit, bit for bit
        identity["world_size"] = parallel.world_size
    agree = None if parallel is None else (
        lambda due: parallel.broadcast_int(due, "agreeing on rank 0's checkpoint time"))
    return Checkpointer(estimator.checkpoint_dir, estimator.checkpoint_every, identity,
                        writer=parallel is None or parallel.is_main, agree=agree)


def _params_module(*params):
    """The tensors of SAE parameters as a module, so that :func:`fingerprint_module` hashes them."""
    import torch

    module = torch.nn.Module()
    for i, p in enumerate(params):
        if p is None:
            continue
        for name, t in zip(("W_enc", "b_enc", "W_dec", "b_dec"), p.tensors()):
            module.register_buffer(f"{name}_{i}", t.detach().clone())
    return module


def start_trainer(config, X: np.ndarray, mlp_map, init=None, n_steps=None, parallel=None,
                  rows_are: str = "the rows of partial_fit's first call set the data scales for the whole run"):
    """A :class:`~sklearn_jsae._backend.trainer.Trainer` whose scales come from the rows of ``X``
    (or from ``init``, a warm start ``(params_x, params_y, scale_x, scale_y)``).

    X : (n, d_in) raw inputs (the first rows of a stream, or ``partial_fit``'s first call).
    parallel : data-parallel job or None; each rank passes its own rows (the first rows of its
        shard of a stream) and the statistics are those of all ranks' rows together.
    """
    import dataclasses

    import torch

    from ._backend.mlp import placed, without_autocast
    from ._backend.train import _Rows, data_statistics
    from ._backend.trainer import Trainer

    device = torch.device(config.device)
    rows = _Rows(X, device, config.dtype, resident=False)  # the statistics: a pass or two, in order
    pair = config.n_output_components is not None
    # rows_are: what X is, for the error when its scale would be measured on rows without spread
    # (a warm start keeps its fitted scales and only needs the means)
    measured_x = init is None or init[2] is None
    measured_y = init is None or init[2] is None or init[3] is None
    # in the training dtype with a caller's autocast off, as fit measures them (_training_precision)
    with without_autocast(device):
        mean_x, scale_x = data_statistics(rows, parallel=parallel,
                                          spread_required=rows_are if measured_x else False)
        mean_y = scale_y = None
        if pair:  # the trainer keeps the map as given (not this copy on the device) for a checkpoint's scales
            mean_y, scale_y = data_statistics(rows, placed(mlp_map, device, config.dtype), parallel=parallel,
                                              spread_required=rows_are if measured_y else False)
    if init is not None and init[2] is not None:  # an imported SAE has no scale: measured here, as fit does
        scale_x = init[2]
        scale_y = init[3] if init[3] is not None else scale_y
    if config.dead_tokens is None:
        config = dataclasses.replace(config, dead_tokens=10_000_000)
    trainer = Trainer(config, mlp_map, mean_x, scale_x, mean_y, scale_y,
                      init=None if init is None else (init[0], init[1]), total_steps=n_steps, parallel=parallel)
    trainer.schedule_by_rows = True  # calls of any length: the schedule follows the rows
    return trainer


def _check_finite_batch(x, rows, step: int) -> None:
    """Raise NonFiniteTrainingError naming the first row of the batch ``x`` (rows numbered
    ``rows``) that holds NaN or inf (or a value float32 made inf)."""
    import torch

    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        from .exceptions import NonFiniteTrainingError

        where = bad.nonzero()[:, 0].cpu()
        raise NonFiniteTrainingError(
            f"training stopped at optimiser step {step}: X contains NaN or inf (or values beyond float32's "
            f"range, {np.finfo(np.float32).max:.1e}, which float32 makes inf) in row {int(rows[where[0]])} of X "
            f"({len(where)} row(s) of this batch). Remove, repair or rescale those rows.",
            step=step, what="X",
        )


def train_rows(trainer, X: np.ndarray, bar=None, offset: int = 0, share=None) -> int:
    """One optimiser step per ``batch_size`` rows of X, in order (no shuffling: a stream or the
    caller mixes the data).  Returns the number of steps.  ``offset`` numbers the rows in error
    messages.  ``share`` (data-parallel): ``(n_r, N)`` of the one step that X (at most
    ``batch_size`` rows, this rank's share of the global batch) makes, see ``Trainer.step``."""
    import torch

    from ._backend.train import _Rows, show_step

    from ._backend.train import file_mapping

    config = trainer.config
    rows = _Rows(X, trainer.device, config.dtype, resident=False)  # one pass, in order
    # A memmap was not scanned for NaN or inf when it was validated (that would read the whole
    # store): each batch is checked here, naming the row, as fit's statistics pass does.  (A later
    # partial_fit call measures no statistics: the step then blamed the MLP or the data's size.)
    unscanned = file_mapping(X) is not None
    steps = 0
    for start in range(0, rows.n, config.batch_size):
        index = torch.arange(start, min(rows.n, start + config.batch_size), device="cpu")
        x = rows.take(index)
        if unscanned:
            _check_finite_batch(x, index + offset, trainer.step_count)
        values = trainer.step(x, index + offset, share=share)
        show_step(bar, trainer, values, len(index) if share is None else share[1])
        steps += 1
    return steps

"""The training state of one TopK SAE or a JSAE pair, advanced one minibatch at a time.

:class:`Trainer` holds everything a fit changes: both SAEs' parameters (normalised units),
Adam's moments, the step counter that drives the schedules, the dead-latent counters, the
running sums of the current history record and the history itself.  ``fit`` (epochs over an
array), ``partial_fit`` (successive calls) and stream fits (batches from a live model) all
call :meth:`Trainer.step`; a checkpoint is :meth:`Trainer.state_dict` plus the data position,
and :meth:`Trainer.load_state_dict` restores it exactly (bit for bit on the CPU).

Schedules (:func:`schedule`): with a known number of steps ``total`` the learning rate warms
up over the first 1% of steps and decays linearly to 0 over the last 20%, and ``l1`` ramps
from 0 over the first 5% (the paper's).  With ``total=None`` (``partial_fit`` without
``n_tokens``) the warm-ups last :data:`OPEN_LR_WARMUP_STEPS` and :data:`OPEN_L1_WARMUP_STEPS`
steps and both stay constant after (no decay: the end is not known).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ..exceptions import NonFiniteTrainingError
from .jacobian import map_and_local_weights
from .mlp import placed, without_autocast
from .optim import Adam
from .sae import SAEParams
from .step import jsae_step_losses, optimiser_step

# The range of a positive float32 (subnormals included): data scales outside it cannot be trained with.
_FLOAT32_TINY, _FLOAT32_MAX = float(torch.finfo(torch.float32).smallest_normal) * 2.0 ** -23, float(
    torch.finfo(torch.float32).max)

# In normalised units predicting the mean gives MSE 1 and a fresh SAE about 1 to 2k/d; a
# reconstruction 10^4 times worse than the mean only happens when the optimiser has diverged.
DIVERGED_MSE = 1e4

# A fit's own data has a per-feature RMS of 1 in training units (``X / c_x``): even one value
# holding all the variance of 10^8 rows of 10^4 features stays below 10^6.  A batch beyond this
# was not scaled by its own data's scales, but by an earlier call's.
FAR_FROM_SCALE = 1e8
_OTHER_SCALE = ("the scales were measured on the data of an earlier call (partial_fit, warm_start=True and a "
                "checkpoint keep a fit's scales): fit a new model (warm_start=False) on data of this scale, or "
                "rescale X to that of the earlier data.")

# Warm-ups of an open-ended fit (partial_fit without n_tokens): the paper's 1% and 5% of its
# 73k steps are 730 and 3,650 steps; an open-ended fit may be far shorter, so shorter ramps.
OPEN_LR_WARMUP_STEPS = 100
OPEN_L1_WARMUP_STEPS = 500

_TERMS = ("loss", "mse_input", "mse_output", "jacobian_l1", "aux_input", "aux_output")


def default_aux_k(n_features: int) -> int:
    """The power of two nearest n_features / 2 (Gao et al. 2024)."""
    return 2 ** max(0, round(math.log2(max(1, n_features // 2))))


def schedule(step: int, total: int | None, config) -> tuple[float, float]:
    """(learning-rate factor, l1 factor) at ``step`` of ``total`` (None: open-ended)."""
    if total is None:
        lr_factor = min(1.0, (step + 1) / OPEN_LR_WARMUP_STEPS)
        return lr_factor, min(1.0, step / OPEN_L1_WARMUP_STEPS)
    warm = max(1, round(config.lr_warmup * total))
    lr_factor = min(1.0, (step + 1) / warm)
    decay_start = total - round(config.lr_decay * total)
    if step >= decay_start:
        lr_factor *= max(0.0, (total - step) / max(1, total - decay_start))
    l1_warm = round(config.l1_warmup * total)
    l1_factor = 1.0 if l1_warm == 0 else min(1.0, step / l1_warm)
    return lr_factor, l1_factor


def generators(config):
    """CPU generators ``(input init, output init, shuffling)``: seeds ``seed``, ``seed + 2`` (or
    ``init_seed``) and ``seed + 1`` (or ``shuffle_seed``), see :mod:`.train`."""
    input_init = torch.Generator(device="cpu").manual_seed(config.seed)
    output_seed = config.seed + 2 if config.init_seed is None else config.init_seed
    output_init = torch.Generator(device="cpu").manual_seed(output_seed)
    shuffle_seed = config.seed + 1 if config.shuffle_seed is None else config.shuffle_seed
    shuffling = torch.Generator(device="cpu").manual_seed(shuffle_seed)
    return input_init, output_init, shuffling


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast of the forward pass to ``dtype`` on CUDA or the CPU; with ``dtype`` None (or on a
    device without autocast) the training dtype, with a caller's autocast turned off: the
    configured precision replaces the caller's, so a fit with ``mixed_precision=False`` inside a
    caller's ``torch.autocast`` region trains in float32 (see
    :func:`~sklearn_jsae._backend.mlp.without_autocast`)."""
    if dtype is None or device.type not in ("cuda", "cpu"):
        with without_autocast(device):
            yield
        return
    try:
        with torch.autocast(device.type, dtype=dtype):
            yield
    finally:
        # autocast keeps its casts of the parameters until the outermost autocast region ends; inside
        # another region (a caller's, or _training_precision's autocast-off) that is not this one, and
        # the next step would read this step's bf16 copies of weights the optimiser has since updated.
        torch.clear_autocast_cache()


def _non_finite(step: int, what: str, cause: str) -> NonFiniteTrainingError:
    return NonFiniteTrainingError(
        f"training stopped at optimiser step {step}: {what}. Likely cause: {cause} "
        f"The estimator keeps the state it had before this fit.",
        step=step, what=what,
    )


class Trainer:
    """Parameters, optimiser and counters of one fit, in normalised units.

    Parameters
    ----------
    config : :class:`~sklearn_jsae._backend.train.TrainConfig`
    mlp_map : backend map d_in -> d_out, or None for a single SAE.
    mean_x : (d_in,) tensor, scale_x : float
        Mean and per-element RMS ``c_x`` of the raw inputs (the mean seeds ``b_dec``).
    mean_y : (d_out,) tensor or None, scale_y : float or None
        The same for the MLP's outputs (a pair only).
    init : ``(input_params, output_params)`` in raw units to continue from, or None.
    total_steps : int or None
        Steps the schedules span; None for an open-ended fit.
    parallel : :class:`~sklearn_jsae._backend.distributed.DataParallel` or None
        This process's place in a data-parallel job: every step then all-reduces the gradients,
        loss terms and fired latents (see :mod:`~sklearn_jsae._backend.distributed`).
    """

    def __init__(self, config, mlp_map, mean_x, scale_x, mean_y=None, scale_y=None, init=None,
                 total_steps=None, parallel=None):
        self.config = config
        self.parallel = parallel
        self.device, self.dtype = torch.device(config.device), config.dtype
        self.pair = config.n_output_components is not None
        self.scale_x, self.scale_y = float(scale_x), (None if scale_y is None else float(scale_y))
        self.total_steps = total_steps
        self.mlp_map = mlp_map  # raw units, kept to rescale it with a checkpoint's scales
        self.normalised_map = None
        if self.pair:
            self.normalised_map = self._normalised(mlp_map)
        input_init, output_init, self.shuffling = generators(config)

        def fresh(n, mean, scale, generator):
            mean = (mean / scale).to(device=self.device, dtype=self.dtype)
            return SAEParams.initialise(n, mean.shape[0], mean, generator)

        if init is not None:
            self.side_x = init[0].scaled(1.0 / self.scale_x).to(self.device, self.dtype).detached()
            self.side_y = (init[1].scaled(1.0 / self.scale_y).to(self.device, self.dtype).detached()
                           if self.pair else None)
        else:
            self.side_x = fresh(config.n_components, mean_x, self.scale_x, input_init)
            self.side_y = fresh(config.n_output_components, mean_y, self.scale_y, output_init) if self.pair else None
        self.sides = [self.side_x] + ([self.side_y] if self.pair else [])
        for side in self.sides:
            side.requires_grad_()
        if parallel is not None:
            parallel.attach(self)  # parameters (and DDP) before the optimiser holds them
        self.d_in = self.side_x.W_dec.shape[1]
        self.d_out = self.side_y.W_dec.shape[1] if self.pair else None
        self.penalty_norm = 1.0 / math.sqrt(self.d_in * self.d_out) if self.pair else 0.0
        self.tensors = [t for side in self.sides for t in side.tensors()]
        self.optimiser = Adam(self.tensors, lr=config.learning_rate, betas=(0.9, 0.999))
        self.aux_k = (config.aux_k or default_aux_k(self.d_in),
                      (config.aux_k or default_aux_k(self.d_out)) if self.pair else 0)
        self.dead_tokens = config.dead_tokens or 10_000_000
        self.since_fired = [torch.zeros(side.W_dec.shape[0], dtype=torch.long, device=self.device)
                            for side in self.sides]
        self.step_count = 0
        # partial_fit and stream fits place a step in the schedule by the rows trained before it
        # (``rows_done // batch_size``): partial_fit calls of any length take a short step at
        # each call's end, and counted in steps they would run past ``total_steps`` (learning
        # rate 0 for the rest).  An array fit counts steps, each epoch's last short one included.
        self.schedule_by_rows = False
        self.rows_done = 0
        self.position = 0  # the schedule position of the last step
        self.warned_past_schedule = False
        self.broken = False  # set by a caller when a step failed half-way (partial_fit)
        self.history: list[dict] = []
        self._new_record()

    # ---- one minibatch ----------------------------------------------------------------
    def _new_record(self):
        self.sums = dict.fromkeys(_TERMS, 0.0)
        self.record_rows = 0
        self.record_started = time.perf_counter()
        self.fired_record = [torch.zeros_like(s, dtype=torch.bool) for s in self.since_fired]

    def _normalised(self, mlp_map):
        """The MLP between normalised units, ``x' ↦ mlp(c_x · x') / c_y``, on the training device."""
        return placed(mlp_map, self.device, self.dtype).rescaled(self.scale_x, self.scale_y)

    def step(self, x_raw: torch.Tensor, index: torch.Tensor | None = None, outputs_and_weights=None,
             share: tuple[int, int] | None = None) -> dict:
        """One optimiser step on raw inputs ``x_raw`` (B, d_in) on the training device.

        ``index`` (B,) CPU int64: the rows' positions in the data, for error messages.
        ``outputs_and_weights``: the normalised MLP's ``(y (B, d_out), weights)`` if already known
        (a cached MLP pass), else computed here.  ``share`` (data-parallel only): ``(n_r, N)``,
        this rank's real rows among ``x_raw`` (0: ``x_raw`` is a stand-in row of weight 0) and the
        rows of the global batch.  Returns the step's loss terms as floats (over the global batch).

        Runs with a caller's autocast off: only the forward pass runs under the configured one.
        """
        with without_autocast(self.device):
            return self._step(x_raw, index, outputs_and_weights, share)

    def _step(self, x_raw, index, outputs_and_weights, share) -> dict:
        config = self.config
        self.position = self.rows_done // config.batch_size if self.schedule_by_rows else self.step_count
        if self.schedule_by_rows and self.total_steps is not None and self.position >= self.total_steps:
            self._warn_past_schedule()
        lr_factor, l1_factor = schedule(self.position, self.total_steps, config)
        self.optimiser.param_groups[0]["lr"] = config.learning_rate * lr_factor
        x = x_raw / self.scale_x
        if self.pair and outputs_and_weights is None:
            # The MLP's pass outside autocast: its outputs are the output SAE's targets, and its
            # local weights feed the penalty, so both stay in the training dtype.
            outputs_and_weights = map_and_local_weights(self.normalised_map, x)
        dead = [since >= self.dead_tokens for since in self.since_fired] + [None]
        parallel = self.parallel
        step_args = dict(
            l1=config.l1 * l1_factor if self.pair and config.l1 > 0 else None,
            penalty_norm=self.penalty_norm, dead=(dead[0], dead[1]), aux_coef=config.aux_coef,
            aux_k=self.aux_k, outputs_and_weights=outputs_and_weights, penalty=config.penalty,
        )
        if parallel is None:
            with _autocast(self.device, config.autocast_dtype):
                loss, terms, fired = jsae_step_losses(self.side_x, self.side_y, self.normalised_map, x,
                                                      config.k, **step_args)
            values = self._check_losses(loss, terms, x_raw, x, index, outputs_and_weights)
            norms = optimiser_step(loss, self.optimiser, self.sides, config.max_grad_norm)
            hits = []
            for i, (idx, val) in enumerate(fired):
                hit = torch.zeros_like(self.fired_record[i])
                hit[idx[val > 0]] = True
                hits.append(hit)
            rows = x.shape[0]
        else:
            share = (x.shape[0], x.shape[0]) if share is None else share
            parallel.step_index = self.step_count
            with _autocast(self.device, config.autocast_dtype):
                loss, terms, fired = parallel.forward(self, x, mean_square=parallel.mean_square(share),
                                                      **step_args)

            def check(global_values):
                return self._check_losses(loss, terms, x_raw, x, index, outputs_and_weights, values=global_values)

            values, hits, norms = parallel.optimiser_step(self, loss, terms, fired, share, check)
            rows = share[1]
        # One synchronisation for all checks: the gradient norms and every parameter.
        finite = torch.stack([torch.isfinite(norms).all()] + [torch.isfinite(t).all() for t in self.tensors])
        if not bool(finite.all()):
            raise self._non_finite_update(bool(finite[0]))
        with torch.no_grad():
            for i, hit in enumerate(hits):
                self.fired_record[i] |= hit
                self.since_fired[i] += rows
                self.since_fired[i][hit] = 0
        for name, value in values.items():
            self.sums[name] += value * rows
        self.record_rows += rows
        self.rows_done += rows
        self.step_count += 1
        return values

    def _warn_past_schedule(self):
        if self.warned_past_schedule:
            return
        self.warned_past_schedule = True
        from .._warnings import warn

        warn(
            f"this fit has trained on {self.rows_done} rows, the n_tokens={self.total_steps * self.config.batch_size} "
            f"(rounded up to whole batches) its schedule spans: the learning rate is 0 from here on and further "
            f"rows change nothing. Set n_tokens to the rows all partial_fit calls will see, or start a new fit."
        )

    def _non_finite_update(self, gradients_finite: bool) -> NonFiniteTrainingError:
        """The error for a step whose loss was finite but whose gradients (a term overflowed, most
        often the penalty under a huge ``l1``) or updated parameters (too large a step) are not."""
        config = self.config
        if gradients_finite:
            return _non_finite(self.step_count, "an SAE parameter is NaN or inf after the update",
                               f"learning_rate={config.learning_rate:g} is too large for this data; lower it.")
        if self.pair and config.l1 > 0 and config.l1 >= config.aux_coef:
            cause = (f"l1={config.l1:g} weighs the Jacobian penalty so heavily that its gradient overflows; "
                     f"lower l1.")
        elif config.aux_coef > 1:
            cause = (f"aux_coef={config.aux_coef:g} weighs the AuxK loss so heavily that its gradient overflows; "
                     f"lower it.")
        else:
            cause = "a reconstruction term's gradient overflows: X holds extreme values; check or rescale X."
        return _non_finite(self.step_count, "a gradient is NaN or inf (the loss was finite)", cause)

    def _scale_cause(self, raw, what: str, symbol: str, side: str, scale: float) -> str:
        """Why rows that are finite as given overflow in training units (``raw / c``)."""
        if not bool(torch.isfinite(raw).all()):
            return f"{what} hold values too large for the training dtype; check or rescale X."
        largest = float(raw.abs().max()) if raw.numel() else float("nan")
        return (f"{what} are finite (up to |{symbol}| = {largest:.3g}) but overflow float32 over the {side} "
                f"scale c_{symbol} = {scale:.3g}; {_OTHER_SCALE}")

    def _far_from_scales(self, x, y) -> str | None:
        """The cause of an overflowing loss when the batch, in training units, lies far beyond the
        scales (a fit's own data stays near 1 there), else None."""
        far = []
        for t, symbol, scale in ((x, "x", self.scale_x), (y, "y", self.scale_y)):
            finite = t[torch.isfinite(t)] if t is not None else None
            largest = float(finite.abs().max()) if finite is not None and finite.numel() else 0.0
            if largest > FAR_FROM_SCALE:
                far.append(f"|{symbol}| / c_{symbol} reaches {largest:.3g} (c_{symbol} = {scale:.3g})")
        if not far:
            return None
        return f"in training units {' and '.join(far)}, where a fit's own data stays near 1; {_OTHER_SCALE}"

    def _heavy_weight(self) -> str | None:
        """The largest loss weight above 1 (``l1`` of the penalty, ``aux_coef`` of AuxK) as "<name>=<value>
        weighs <its term>", or None: when every term is finite and the loss is not, only a weight can
        have overflowed float32 (a weight of 1e39 is inf in float32, and inf times a zero AuxK term is
        NaN before any latent is dead)."""
        config = self.config
        weights = [(config.aux_coef, "aux_coef", "the AuxK loss")]
        if self.pair:
            weights.append((config.l1, "l1", "the Jacobian penalty"))
        value, name, term = max(weights)
        return f"{name}={value:g} weighs {term}" if value > 1 else None

    def _check_losses(self, loss, terms, x_raw, x, index, outputs_and_weights, values=None) -> dict:
        """The step's terms as floats; raise :class:`NonFiniteTrainingError` if one is non-finite
        or the fit has diverged.  ``values`` (data-parallel: the all-reduced terms) replaces this
        batch's own; the batch (``x_raw`` and its normalised ``x``) then only serves to name the rows
        and the cause behind a non-finite value."""
        if values is None:
            values = {"loss": float(loss.detach())}
            values.update({name: float(value.detach()) for name, value in terms.items()})
        if all(math.isfinite(v) for v in values.values()):
            worst = max(("mse_input", "mse_output"), key=lambda key: values.get(key, -1.0))
            if values[worst] > DIVERGED_MSE:
                # Before the first update the learning rate has done nothing yet: the error is the
                # starting model's, on data whose measured scale does not describe it.
                cause = (f"learning_rate={self.config.learning_rate:g} is too large for this data; lower it (by 10x)."
                         if self.optimiser.steps else
                         "this is the starting model's error, before any update (not the learning rate's): a "
                         "warm start's weights that do not fit this data (fitted at another scale?), or X or "
                         "the mlp's outputs with almost no variance (a warning says so).")
                raise _non_finite(
                    self.step_count, f"the fit diverged: {worst}={values[worst]:.3g}, {DIVERGED_MSE:.0e} times "
                    f"the error of predicting the mean", cause)
            return values
        bad = sorted(name for name, v in values.items() if not math.isfinite(v))

        def rows_of(finite_rows):
            return (index[~finite_rows] if index is not None else torch.nonzero(~finite_rows).flatten())[:5].tolist()

        # The input first: the MLP's outputs are computed from it, and cannot be finite without it.
        finite_rows = torch.isfinite(x).all(dim=1).cpu()
        if not bool(finite_rows.all()):
            raw = x_raw[~finite_rows.to(x_raw.device)]
            raise _non_finite(self.step_count, f"rows {rows_of(finite_rows)} of X are not finite in training units "
                              f"(X / c_x)", self._scale_cause(raw, "those rows of X", "x", "input", self.scale_x))
        if self.pair and outputs_and_weights is not None:
            finite_rows = torch.isfinite(outputs_and_weights[0]).all(dim=1).cpu()
            if not bool(finite_rows.all()):
                cause = "the MLP overflows or divides by zero on those rows; check it there."
                try:  # the MLP on those rows as given: finite there, only the output scale overflows
                    with torch.no_grad():
                        y_raw = placed(self.mlp_map, self.device, self.dtype)(x_raw[~finite_rows.to(x_raw.device)][:64])
                    if bool(torch.isfinite(y_raw).all()):
                        cause = self._scale_cause(y_raw, "the mlp's outputs on those rows", "y", "output", self.scale_y)
                except Exception:  # noqa: BLE001 - only a better message is lost: the error below is raised anyway
                    pass
                raise _non_finite(self.step_count, f"the mlp returned NaN or inf on rows {rows_of(finite_rows)} of X",
                                  cause)
        heavy = self._heavy_weight()
        if bad == ["loss"] and heavy is not None:  # every term finite, their weighted sum is not
            raise _non_finite(self.step_count, "the loss is NaN or inf while each of its terms is finite",
                              f"{heavy} so heavily that the weighted sum overflows float32; lower it.")
        far = self._far_from_scales(x, outputs_and_weights[0] if self.pair and outputs_and_weights else None)
        if far is not None:
            cause = far
        elif not self.optimiser.steps:  # no update yet: the learning rate has done nothing
            # (a term itself is NaN or inf here, so no weight is to blame: lowering it cannot help)
            cause = ("the starting model's loss on this data overflows: X or the mlp's outputs hold extreme "
                     "values; check or rescale them.")
        else:
            cause = (f"learning_rate={self.config.learning_rate:g} too large, or data with extreme outliers; "
                     f"lower learning_rate.")
        raise _non_finite(self.step_count, f"the loss terms {bad} are NaN or inf", cause)

    # ---- history ------------------------------------------------------------------------
    def close_record(self, **extra) -> dict:
        """Append one history row (the mean loss terms since the last row, dead fractions,
        ``l1`` reached, seconds) and start the next; ``extra`` (e.g. ``epoch``) goes first."""
        rows = max(1, self.record_rows)
        record = dict(extra, **{name: total / rows for name, total in self.sums.items()})
        if not self.pair:
            for name in ("mse_output", "jacobian_l1", "aux_output"):
                record.pop(name)
        elif self.config.l1 == 0:
            record.pop("jacobian_l1")
        record["l1"] = self.config.l1 * schedule(self.position, self.total_steps, self.config)[1] \
            if self.pair else 0.0
        record["dead_fraction_input"] = 1.0 - float(self.fired_record[0].float().mean())
        if self.pair:
            record["dead_fraction_output"] = 1.0 - float(self.fired_record[1].float().mean())
        record["tokens"] = self.record_rows
        record["seconds"] = time.perf_counter() - self.record_started
        self.history.append(record)
        self._new_record()
        return record

    def result(self):
        """The fitted parameters in raw units on the CPU, as a :class:`~.train.TrainResult`."""
        from .train import TrainResult

        history = self.history
        return TrainResult(
            input_params=self.side_x.detached().scaled(self.scale_x).to("cpu"),
            output_params=self.side_y.detached().scaled(self.scale_y).to("cpu") if self.pair else None,
            input_scale=self.scale_x,
            output_scale=self.scale_y if self.pair else None,
            history=list(history),
            dead_fraction_input=history[-1]["dead_fraction_input"] if history else 0.0,
            dead_fraction_output=history[-1].get("dead_fraction_output") if history else None,
        )

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """``(tensors, meta)``: every tensor of the state on the CPU, and JSON-able metadata."""
        tensors = {}
        for name, side in zip(("x", "y"), self.sides):
            for field, t in zip(("W_enc", "b_enc", "W_dec", "b_dec"), side.tensors()):
                tensors[f"{field}_{name}"] = t.detach().cpu().contiguous()
        for i, (m, v) in enumerate(zip(self.optimiser.exp_avg, self.optimiser.exp_avg_sq)):
            tensors[f"adam_m_{i}"], tensors[f"adam_v_{i}"] = m.cpu().contiguous(), v.cpu().contiguous()
        for i, (since, fired) in enumerate(zip(self.since_fired, self.fired_record)):
            tensors[f"since_fired_{i}"] = since.cpu().contiguous()
            tensors[f"fired_record_{i}"] = fired.cpu().to(torch.uint8).contiguous()
        tensors["shuffling_rng"] = self.shuffling.get_state()
        meta = dict(step_count=self.step_count, adam_steps=self.optimiser.steps, history=self.history,
                    sums=self.sums, record_rows=self.record_rows, scale_x=self.scale_x, scale_y=self.scale_y,
                    total_steps=self.total_steps, rows_done=self.rows_done, position=self.position)
        return tensors, meta

    def meta_problem(self, meta: dict) -> str | None:
        """What is wrong with :meth:`state_dict`'s ``meta`` as a checkpoint holds it (a phrase), or
        None.  A checkpoint's digest catches damage on disk; this catches a header that is well
        formed JSON but not this trainer's (another writer's, a buggy one's, or a digest-less
        version-1 file damaged on disk), before :meth:`load_state_dict` touches anything."""
        def count(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def scale(value):
            # a data RMS in float32, where training divides by it: 1e-300 became 0 there, and the
            # fit stopped blaming X
            return number(value) and _FLOAT32_TINY <= value <= _FLOAT32_MAX

        for name in ("step_count", "adam_steps", "record_rows"):
            if not count(meta.get(name)):
                return f"has {name}={meta.get(name)!r}, not a count"
        for name in ("rows_done", "position"):  # (absent from checkpoints written before they were kept)
            if name in meta and not count(meta[name]):
                return f"has {name}={meta[name]!r}, not a count"
        if not scale(meta.get("scale_x")):
            return f"has scale_x={meta.get('scale_x')!r}, not a positive number in float32's range"
        scale_y = meta.get("scale_y", "missing")
        if (self.pair and not scale(scale_y)) or (not self.pair and scale_y is not None):
            return f"has scale_y={scale_y!r}, not " + ("a positive number in float32's range" if self.pair
                                                       else "null (one SAE)")
        sums = meta.get("sums")
        if not isinstance(sums, dict) or set(sums) != set(self.sums) or not all(map(number, sums.values())):
            return f"has sums={sums!r}, not finite numbers for {sorted(self.sums)}"
        history = meta.get("history")
        if not isinstance(history, list) or not all(
                isinstance(row, dict) and all(number(v) for v in row.values()) for row in history):
            return "has a history that is not a list of records of finite numbers"
        return None

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        """Restore :meth:`state_dict`'s output (shapes, dtypes and :meth:`meta_problem` were checked
        by the caller)."""
        with torch.no_grad():
            for name, side in zip(("x", "y"), self.sides):
                for field, t in zip(("W_enc", "b_enc", "W_dec", "b_dec"), side.tensors()):
                    t.copy_(tensors[f"{field}_{name}"])
            for i, (m, v) in enumerate(zip(self.optimiser.exp_avg, self.optimiser.exp_avg_sq)):
                m.copy_(tensors[f"adam_m_{i}"])
                v.copy_(tensors[f"adam_v_{i}"])
            for i in range(len(self.since_fired)):
                self.since_fired[i].copy_(tensors[f"since_fired_{i}"])
                self.fired_record[i].copy_(tensors[f"fired_record_{i}"].to(torch.bool))
        self.shuffling.set_state(tensors["shuffling_rng"])
        self.step_count, self.optimiser.steps = int(meta["step_count"]), int(meta["adam_steps"])
        self.history = list(meta["history"])
        self.sums, self.record_rows = dict(meta["sums"]), int(meta["record_rows"])
        # (checkpoints written before these were kept: full batches, as a stream's are)
        self.rows_done = int(meta.get("rows_done", self.step_count * self.config.batch_size))
        self.position = int(meta.get("position", max(0, self.step_count - 1)))
        # The checkpoint's parameters are in the units of its scales.  This run measured its own on
        # the rows it read first, which differ when a stream is resumed from where it stopped or with
        # another n_statistics: the checkpoint's are the model's.
        scale_x, scale_y = float(meta["scale_x"]), None if meta["scale_y"] is None else float(meta["scale_y"])
        if (scale_x, scale_y) != (self.scale_x, self.scale_y):
            self.scale_x, self.scale_y = scale_x, scale_y
            if self.pair:
                self.normalised_map = self._normalised(self.mlp_map)

    def snapshot(self) -> tuple:
        """A copy of the state that :meth:`restore` puts back (``partial_fit``: a call that fails or
        is interrupted half-way leaves the optimiser, its moments and the schedule as they were, so
        that the next call continues the run).  Kept on the training device: a copy to the host
        each call would cost more than a short call's steps on a GPU."""
        tensors = [t.detach().clone() for t in self.tensors]
        tensors += [t.clone() for t in self.optimiser.exp_avg + self.optimiser.exp_avg_sq]
        tensors += [t.clone() for t in self.since_fired + self.fired_record]
        # A call only appends to the history: its length is enough to undo it (a copy of the
        # whole history at every call would grow with the calls).
        meta = dict(step_count=self.step_count, adam_steps=self.optimiser.steps, history_length=len(self.history),
                    sums=dict(self.sums), record_rows=self.record_rows, rows_done=self.rows_done,
                    position=self.position, warned_past_schedule=self.warned_past_schedule)
        return tensors, meta

    def restore(self, snapshot: tuple) -> None:
        """Put back the state :meth:`snapshot` copied."""
        tensors, meta = snapshot
        live = self.tensors + self.optimiser.exp_avg + self.optimiser.exp_avg_sq + self.since_fired + self.fired_record
        with torch.no_grad():
            for t, saved in zip(live, tensors, strict=True):
                t.copy_(saved)
        for t in self.tensors:
            t.grad = None
        self.step_count, self.optimiser.steps = meta["step_count"], meta["adam_steps"]
        del self.history[meta["history_length"]:]
        self.sums, self.record_rows = dict(meta["sums"]), meta["record_rows"]
        self.rows_done, self.position = meta["rows_done"], meta["position"]
        self.warned_past_schedule = meta["warned_past_schedule"]
        self.record_started = time.perf_counter()

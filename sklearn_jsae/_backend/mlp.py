"""MLP maps with a known Jacobian structure, and a wrapper for any torch callable.

Every map is a frozen ``nn.Module`` taking ``x`` of shape (B, d_in) to
``y`` of shape (B, d_out).  Maps with a closed-form Jacobian expose it through
two pieces that :mod:`sklearn_jsae._backend.jacobian` contracts:

* ``input_projection``  ``P_in``  (d_in, r * d_mlp): the linear map into the hidden layer(s);
* ``output_projection`` ``P_out`` (d_mlp, d_out): the linear map out of it;
* ``local_weights(x)``  ``w``  (B, r, d_mlp): per-sample diagonal factors, so that

      J_f(x_t) = P_in · diag(concat_r(w_t[r])) · tile_r(P_out)      (row-vector convention,
                                                                  dy = dx · J_f)

  i.e. ``r = 1`` and ``w = φ'(z)`` for ``φ(x W_in + b_in) W_out + b_out``, and ``r = 2``,
  ``w = (act'(g) ⊙ u, act(g))`` with ``P_in = [W_g, W_u]`` for the gated MLP
  ``(act(x W_g + b_g) ⊙ (x W_u + b_u)) W_d + b_d``.

Weights are stored in the row-vector orientation used throughout the backend
(``y = x @ W``), not in ``nn.Linear``'s (out, in) layout.
"""

from __future__ import annotations

import contextlib
import copy
import numpy as np
import math

import torch
from torch import nn
from torch.nn import functional as F

from .._warnings import warn

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh", "sigmoid")

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """φ(z) for ``name`` in :data:`ACTIVATIONS`; any shape."""
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu(z)
    if name == "silu":
        return F.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_derivative(name: str, z: torch.Tensor) -> torch.Tensor:
    """φ'(z), written out (no autograd), for ``name`` in :data:`ACTIVATIONS`; any shape."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / _SQRT_2))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "tanh":
        return 1.0 - torch.tanh(z) ** 2
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def _computes_as(module, cls) -> bool:
    """Whether ``module`` is a ``cls`` that computes what ``cls`` computes: ``cls``'s own forward (not a
    subclass's, nor one set on the instance, as accelerate's hooks do) and no forward hook.  A
    subclass that overrides ``forward`` (a squared ReLU, a scaled Linear) or a hook changes the outputs, which a closed form built from the class would not see: such a
    module is run as any callable is."""
    import torch.nn.modules.module as torch_module

    global_hooks = (getattr(torch_module, "_global_forward_hooks", None)
                    or getattr(torch_module, "_global_forward_pre_hooks", None))
    return (isinstance(module, cls) and type(module).forward is cls.forward and "forward" not in vars(module)
            and not global_hooks and not module._forward_hooks and not module._forward_pre_hooks)


def _activation_of_module(module: nn.Module) -> str | None:
    """The activation name of a torch activation module, or None if unsupported."""
    if _computes_as(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid")):
        if _computes_as(module, cls):
            return name
    return None


class _FrozenMap(nn.Module):
    """Base: weights are buffers, never parameters, so optimisers never see them."""

    d_in: int
    d_out: int
    has_closed_form = True

    def rescaled(self, input_scale: float, output_scale: float) -> "_FrozenMap":
        """The map ``x' ↦ f(input_scale · x') / output_scale`` of the same kind."""
        raise NotImplementedError


class AffineMap(_FrozenMap):
    """``y = x @ W + b``; ``W`` (d_in, d_out), ``b`` (d_out,).  ``W=None`` is the identity."""

    def __init__(self, d_in: int, W: torch.Tensor | None = None, b: torch.Tensor | None = None):
        super().__init__()
        self.d_in = d_in
        self.d_out = d_in if W is None else W.shape[1]
        # An empty buffer that moves with ``.to(device, dtype)`` so that the identity, which has
        # no weights, still knows where it was placed.
        self.register_buffer("placement_probe", torch.zeros(0))
        self.register_buffer("W", None if W is None else W.detach().clone())
        self.register_buffer("b", None if b is None else b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.W is None else x @ self.W
        return y if self.b is None else y + self.b

    def rescaled(self, input_scale, output_scale):
        if self.W is None:
            # The identity, made explicit on the device and in the dtype the map was placed on
            # (``b`` may be None too, so the map's own placement is read from a probe buffer).
            like = self.placement_probe
            W = torch.eye(self.d_in, device=like.device, dtype=like.dtype)
        else:
            W = self.W
        b = None if self.b is None else self.b / output_scale
        return AffineMap(self.d_in, W * (input_scale / output_scale), b)


class ElementwiseMLP(_FrozenMap):
    """``y = φ(x @ W_in + b_in) @ W_out + b_out``.

    Shapes: ``W_in`` (d_in, d_mlp), ``b_in`` (d_mlp,), ``W_out`` (d_mlp, d_out), ``b_out`` (d_out,).
    ``activation`` is one of :data:`ACTIVATIONS` (``"gelu"`` is the exact erf GELU).
    """

    def __init__(self, W_in, b_in, W_out, b_out, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
        self.activation = activation
        self.d_in, self.d_mlp = W_in.shape
        self.d_out = W_out.shape[1]
        for name, t in (("W_in", W_in), ("b_in", b_in), ("W_out", W_out), ("b_out", b_out)):
            self.register_buffer(name, None if t is None else torch.as_tensor(t).detach().clone())

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "ElementwiseMLP | None":
        """Convert ``nn.Sequential(nn.Linear, activation, nn.Linear)``; None if not of that form."""
        if not _computes_as(seq, nn.Sequential) or len(seq) != 3:
            return None
        first, act, second = seq
        name = _activation_of_module(act)
        if not (_computes_as(first, nn.Linear) and _computes_as(second, nn.Linear)) or name is None:
            return None
        if second.in_features != first.out_features:
            raise ValueError(
                f"mlp is inconsistent: its second nn.Linear has in_features={second.in_features} but "
                f"its first produces out_features={first.out_features}; fix the module's layer sizes."
            )
        return cls(
            first.weight.T, first.bias, second.weight.T, second.bias, name
        )

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """z (B, d_mlp)."""
        z = x @ self.W_in
        return z if self.b_in is None else z + self.b_in

    def forward(self, x):
        y = activation(self.activation, self.pre_activation(x)) @ self.W_out
        return y if self.b_out is None else y + self.b_out

    @property
    def input_projection(self):
        return self.W_in

    @property
    def output_projection(self):
        return self.W_out

    def local_weights(self, x: torch.Tensor) -> torch.Tensor:
        """φ'(z) as (B, 1, d_mlp)."""
        return activation_derivative(self.activation, self.pre_activation(x)).unsqueeze(1)

    def rescaled(self, input_scale, output_scale):
        return ElementwiseMLP(
            self.W_in * input_scale,
            self.b_in,
            self.W_out / output_scale,
            None if self.b_out is None else self.b_out / output_scale,
            self.activation,
        )


class GatedMLP(_FrozenMap):
    """``y = (act(x @ W_gate + b_gate) ⊙ (x @ W_up + b_up)) @ W_down + b_down`` (LLaMA-style).

    Shapes: ``W_gate``, ``W_up`` (d_in, d_mlp); ``W_down`` (d_mlp, d_out); biases optional
    (None means zero, as in LLaMA, Mistral, Qwen and SmolLM2).  ``activation`` defaults to SiLU.
    """

    def __init__(self, W_gate, W_up, W_down, b_gate=None, b_up=None, b_down=None, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
        self.activation = activation
        self.d_in, self.d_mlp = W_gate.shape
        self.d_out = W_down.shape[1]
        for name, t in (
            ("W_gate", W_gate), ("W_up", W_up), ("W_down", W_down),
            ("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down),
        ):
            self.register_buffer(name, None if t is None else torch.as_tensor(t).detach().clone())

    def _gate_up(self, x):
        g = x @ self.W_gate
        u = x @ self.W_up
        if self.b_gate is not None:
            g = g + self.b_gate
        if self.b_up is not None:
            u = u + self.b_up
        return g, u

    def forward(self, x):
        g, u = self._gate_up(x)
        y = (activation(self.activation, g) * u) @ self.W_down
        return y if self.b_down is None else y + self.b_down

    @property
    def input_projection(self):
        return torch.cat([self.W_gate, self.W_up], dim=1)

    @property
    def output_projection(self):
        return self.W_down

    def local_weights(self, x):
        """(act'(g) ⊙ u, act(g)) stacked as (B, 2, d_mlp)."""
        g, u = self._gate_up(x)
        return torch.stack([activation_derivative(self.activation, g) * u, activation(self.activation, g)], dim=1)

    def rescaled(self, input_scale, output_scale):
        return GatedMLP(
            self.W_gate * input_scale,
            self.W_up * input_scale,
            self.W_down / output_scale,
            self.b_gate,
            self.b_up,
            None if self.b_down is None else self.b_down / output_scale,
            self.activation,
        )


class CallableMap(_FrozenMap):
    """Any differentiable torch callable ``(B, d_in) -> (B, d_out)``; Jacobians by forward-mode AD.

    The callable must treat rows independently (one token per row), as an MLP does.

    ``home``: the device the callable runs on, or None when it runs on any (its input's).  A plain
    function or callable object is not an ``nn.Module``, so moving the map does not move the
    tensors it reads (``lambda x: model.mlp(x)`` over a model on a GPU, or on the CPU in a GPU
    fit); :func:`resolve_mlp` finds where it runs, and its rows are moved there and its outputs
    back (``Tensor.to`` is differentiable in both modes, so Jacobians go through the move).
    """

    has_closed_form = False

    def __init__(self, fn, d_in: int, d_out: int, input_scale: float = 1.0, output_scale: float = 1.0,
                 home: str | None = None):
        super().__init__()
        self.fn = fn
        self.d_in, self.d_out = d_in, d_out
        self.input_scale, self.output_scale = float(input_scale), float(output_scale)
        self.home = home

    def forward(self, x):
        y = self._at_home(x)
        if self.home is not None and isinstance(y, torch.Tensor) and y.device != x.device:
            y = y.to(x.device)
        return y

    def _at_home(self, x):
        if self.home is not None:
            x = x.to(self.home)
        if self.input_scale == 1.0 and self.output_scale == 1.0:
            y = self.fn(x)
        else:
            y = self.fn(x * self.input_scale) / self.output_scale
        # A callable that computes in another precision (a .double() inside) returns the dtype it
        # was given, as a module placed in the training dtype does.
        if isinstance(y, torch.Tensor) and y.dtype != x.dtype and y.is_floating_point():
            return y.to(x.dtype)
        return y  # (not a tensor, or not floating: the first probe says what is wrong with it)

    def rescaled(self, input_scale, output_scale):
        return CallableMap(
            self.fn, self.d_in, self.d_out, self.input_scale * input_scale, self.output_scale * output_scale,
            self.home,
        )


def frozen_copy(module):
    """A deep copy with ``requires_grad=False`` everywhere and eval mode, on CPU."""
    clone = copy.deepcopy(module)
    if isinstance(clone, nn.Module):
        clone = clone.to("cpu").eval()
        for p in clone.parameters():
            p.requires_grad_(False)
    return clone


def as_map(mlp, d_in: int, d_out: int) -> _FrozenMap:
    """The backend map for a user's ``mlp`` (already a frozen copy), see module docstring."""
    if mlp is None:
        return AffineMap(d_in)
    if isinstance(mlp, _FrozenMap) and any(_computes_as(mlp, cls) for cls in _MAPS):
        return mlp  # (a subclass of a map may compute something else: run as a callable, below)
    if _computes_as(mlp, nn.Linear):
        return AffineMap(d_in, mlp.weight.T, mlp.bias)
    if _computes_as(mlp, nn.Identity):
        return AffineMap(d_in)
    if isinstance(mlp, nn.Sequential):
        closed = ElementwiseMLP.from_sequential(mlp)
        if closed is not None:
            return closed
    return CallableMap(mlp, d_in, d_out)


# The maps as_map takes as they are (exactly these classes: see _computes_as).
_MAPS = (AffineMap, ElementwiseMLP, GatedMLP, CallableMap)


def placed(mlp_map: _FrozenMap, device, dtype) -> _FrozenMap:
    """``mlp_map`` on ``device`` in ``dtype``: the same object if it already is, else a moved copy
    (``nn.Module.to`` works in place, and the estimator's own copy must stay on the CPU)."""
    device = torch.device(device)
    tensors = list(mlp_map.buffers()) + list(mlp_map.parameters())
    if all(
        t.device.type == device.type and (not t.is_floating_point() or t.dtype == dtype) for t in tensors
    ):
        return mlp_map
    return copy.deepcopy(mlp_map).to(device=device, dtype=dtype)


def without_autocast(device):
    """A region where a caller's ``torch.autocast`` for ``device``'s type is off.

    autocast is the calling thread's state: a fit or a transform called inside the caller's
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (a hook of a model run under autocast) ran
    its matrix products in bf16, so that codes failed to become numpy arrays ("unsupported
    ScalarType BFloat16"), scores differed and ``mixed_precision=False`` trained in bf16.  The
    library's inference runs in float32 and training in the precision ``mixed_precision``
    configures, whatever the caller's.  A no-op for device types without autocast (``meta``).
    """
    kind = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", None)  # (torch >= 2.4)
    if not (available(kind) if available is not None else kind in ("cpu", "cuda")):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _declared_out_features(mlp) -> int | None:
    """The output width an mlp claims: ``out_features``, or its last ``nn.Linear``'s."""
    declared = getattr(mlp, "out_features", None)
    if isinstance(declared, int):
        return declared
    if isinstance(mlp, nn.Sequential) and len(mlp) and isinstance(mlp[-1], nn.Linear):
        return mlp[-1].out_features
    return None


def _declared_in_features(mlp) -> int | None:
    declared = getattr(mlp, "in_features", None)
    if isinstance(declared, int):
        return declared
    if isinstance(mlp, nn.Sequential) and len(mlp) and isinstance(mlp[0], nn.Linear):
        return mlp[0].in_features
    if isinstance(mlp, _FrozenMap):
        return mlp.d_in
    return None


def _whole_model_hint(mlp) -> str:
    """A hint when ``mlp`` is a whole transformer or block rather than its MLP (it holds
    attention or embedding modules), else ''."""
    if not isinstance(mlp, torch.nn.Module):
        return ""
    names = [name.lower() for name, _ in mlp.named_modules()]
    if not any(part in name for name in names for part in ("attn", "attention", "embed")):
        return ""
    return (f" {type(mlp).__name__} holds attention or embedding modules: it looks like a whole model or "
            f"transformer block, not its MLP (on rows of X, a block's attention sees one token per row). "
            f"Pass the MLP, e.g. sklearn_jsae.hf.mlp_of(model, layer) for a Hugging Face model.")


def resolve_mlp(mlp, X_probe, device="cpu") -> tuple[object, _FrozenMap, int]:
    """Check a user's ``mlp`` against a few rows of X and freeze it.

    Returns ``(frozen CPU copy or None, backend map, d_out)``.  Raises TypeError /
    ValueError naming ``mlp`` or ``X``, the offending value and the fix.  The MLP is probed as
    training runs it, in float32 with a caller's autocast off (:func:`without_autocast`): under a
    bf16 one a callable's rows computed alone and in the batch round differently.  ``device``:
    where the map will run; a callable that is not a module runs where its own tensors are
    (:class:`CallableMap`'s ``home``, found by :func:`_callable_home`).
    """
    with without_autocast("cpu"):
        return _resolve_mlp(mlp, X_probe, str(device))


def _runs_on(fn, probe: torch.Tensor, device: str) -> BaseException | None:
    """None if ``fn`` runs on ``probe`` moved to ``device``, else what it raised."""
    try:
        with torch.no_grad(), without_autocast(device):
            fn(probe.to(device))
    except Exception as exc:  # noqa: BLE001 -- the user's code; the caller says what failed
        return exc
    return None


def _device_hint(exc: BaseException, device: str) -> str:
    """Advice for a probe that failed on tensors of another device (a callable over a model on a GPU,
    in a fit on the CPU)."""
    if "device" not in str(exc):
        return ""
    return (f" It reads tensors on another device than its input's: a callable that is not an nn.Module runs "
            f"where its own tensors are, on the CPU or on the device the fit runs on (here {device}); fit "
            f"with device= theirs, or move them.")


def _callable_home(frozen, probe: torch.Tensor, device: str) -> str | None:
    """Where a callable that is not a module runs: None where it runs on the CPU and on ``device``
    (a function of its input alone, ``torch.tanh``), ``device`` where only there (it reads tensors
    on that device: ``lambda x: model.mlp(x)`` with the model on the GPU the fit trains on), the
    CPU where only there (tensors on the CPU, in a fit on a GPU: it works, slowly, with a warning).
    The CPU's error stands when it runs on neither (the probe that follows raises it)."""
    if isinstance(frozen, nn.Module) or torch.device(device).type == "cpu":
        return None  # a module moves with the map; on the CPU there is nowhere else to run
    failed_on_cpu = _runs_on(frozen, probe, "cpu")
    failed_on_device = _runs_on(frozen, probe, device)
    if failed_on_cpu is None and failed_on_device is not None:
        reason = (str(failed_on_device).splitlines() or [""])[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        warn(f"mlp ({getattr(frozen, '__qualname__', type(frozen).__name__)}) is a callable that runs on the "
             f"CPU but not on {device}, where this fit runs ({type(failed_on_device).__name__}: "
             f"{reason}): every pass of the MLP moves its rows to the CPU and back and "
             f"computes there, slowly.  Move the tensors it uses to {device} (model.to({device!r})), or pass "
             f"the nn.Module itself (mlp=module: it moves with the fit).")
        return "cpu"
    if failed_on_cpu is not None and failed_on_device is None:
        return device
    return None


def _resolve_mlp(mlp, X_probe, device="cpu") -> tuple[object, _FrozenMap, int]:
    d_in = X_probe.shape[1]
    if mlp is None:
        return None, AffineMap(d_in), d_in
    if not callable(mlp):
        raise TypeError(
            f"mlp must be None (identity), a torch nn.Module or a differentiable torch callable "
            f"(n, d_in) -> (n, d_out); got {type(mlp).__name__} ({mlp!r:.80}), which is not callable."
        )
    if isinstance(mlp, torch.nn.Module) and any(t.is_meta for t in [*mlp.parameters(), *mlp.buffers()]):
        raise ValueError(
            f"mlp ({type(mlp).__name__}) has parameters on the meta device, which hold shapes but no "
            f"values; load its weights first (e.g. module.to_empty(device='cpu') then load_state_dict, "
            f"or from_pretrained without a meta-device context)."
        )
    declared_in = _declared_in_features(mlp)
    if declared_in is not None and declared_in != d_in:
        raise ValueError(
            f"X has {d_in} features, but mlp expects in_features={declared_in}. X must hold the "
            f"MLP's inputs, one row per token: pass X with {declared_in} columns or the matching mlp."
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: named just below
        bad = ~np.isfinite(np.asarray(X_probe, dtype=np.float32)).all(axis=1)
    if bad.any():  # an unscanned memmap: X's rows, not the mlp, are at fault (as the statistics pass says)
        from ..exceptions import NonFiniteTrainingError

        raise NonFiniteTrainingError(
            f"training stopped before the first step: X contains NaN or inf (or values beyond float32's "
            f"range, {np.finfo(np.float32).max:.1e}, which float32 makes inf) on {int(bad.sum())} of rows "
            f"0-{len(bad) - 1} of X (first: {np.flatnonzero(bad)[:5].tolist()}). Remove, repair or rescale "
            f"those rows.",
            step=None, what="X",
        )
    frozen = frozen_copy(mlp)
    probe = torch.from_numpy(np.array(X_probe, dtype=np.float32))
    probe_map = as_map(frozen, d_in, 0)
    if isinstance(probe_map, CallableMap):
        probe_map.home = _callable_home(frozen, probe, device)
    probe_fn = placed(probe_map, "cpu", torch.float32) if isinstance(probe_map, _FrozenMap) else probe_map
    try:
        with torch.no_grad():
            out = probe_fn(probe)
    except Exception as exc:  # the user's code: report what failed and how to fix it
        raise ValueError(
            f"mlp failed on a float32 torch tensor of shape {tuple(probe.shape)} taken from X: "
            f"{type(exc).__name__}: {exc}. mlp must map (n, {d_in}) torch tensors to (n, d_out) "
            f"torch tensors; numpy functions are not supported (Jacobians need torch autograd)."
            f"{_whole_model_hint(mlp)}{_device_hint(exc, device)}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"mlp must return a torch.Tensor, got {type(out).__name__}. Write the MLP with torch "
            f"operations so that its Jacobian can be computed (numpy callables are not supported)."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"mlp returned a tensor of dtype {out.dtype}; it must return floating-point outputs (the JSAE "
            f"differentiates them): compute in float32 or float64, without rounding to integers, bools or "
            f"complex numbers."
        )
    if out.ndim != 2 or out.shape[0] != probe.shape[0]:
        raise ValueError(
            f"mlp must map (n, {d_in}) to (n, d_out); on an input of shape {tuple(probe.shape)} it "
            f"returned shape {tuple(out.shape)}. Make it return one output row per input row."
        )
    d_out = out.shape[1]
    declared_out = _declared_out_features(mlp)
    if declared_out is not None and declared_out != d_out:
        raise ValueError(
            f"mlp declares out_features={declared_out} but returned {d_out} columns on X; fix the "
            f"module so that its declared and actual output widths agree."
        )
    if not torch.isfinite(out).all():
        # The training pass's own check (every row) raises this class too: a caller catching
        # FloatingPointError sees an MLP that goes non-finite on any row, the probed ones included.
        from ..exceptions import NonFiniteTrainingError

        row = int((~torch.isfinite(out).all(dim=1)).nonzero()[0, 0])
        raise NonFiniteTrainingError(
            f"mlp returned NaN or inf on row {row} of X (finite input); check the MLP on it (an overflow, a log "
            f"or a division of its values) and the input scale.", what="mlp output")
    hint = _whole_model_hint(mlp)
    if hint:  # it ran (a BERT block takes each row as a one-token sequence), but is likely a mistake
        warn(f"mlp:{hint}")
    backend_map = as_map(frozen, d_in, d_out)
    if isinstance(backend_map, CallableMap):
        backend_map.d_out, backend_map.home = d_out, probe_map.home
        # Checked as training runs it: on the float32 copy training places on its device.
        training_map = placed(backend_map, "cpu", torch.float32)
        _check_rows_independent(training_map, probe, out)
        _check_differentiable(training_map, probe)
    return frozen, backend_map, d_out


def _check_rows_independent(backend_map: CallableMap, probe: torch.Tensor, out: torch.Tensor) -> None:
    """Each probe row alone must give the output it gives inside the batch: a callable that mixes
    rows (a batch mean or norm) would make every Jacobian the library computes wrong."""
    if probe.shape[0] < 2:
        return
    with torch.no_grad():
        alone = torch.cat([backend_map(probe[i : i + 1]) for i in range(probe.shape[0])])
    tolerance = 1e-4 * float(out.abs().max()) + 1e-6
    gap = float((alone - out).abs().max())
    if gap > tolerance:
        raise ValueError(
            f"mlp mixes rows: on {probe.shape[0]} rows of X, each row computed alone differs from the "
            f"same row computed in the batch by up to {gap:.3g}. The JSAE needs one token per row, "
            f"processed independently (no batch mean, batch norm in training mode or attention over "
            f"rows); put such a module in eval mode or compute it per row."
        )


# Exceptions that mean "this callable cannot be differentiated with torch.func.jvp".  Anything
# else (a warning turned into an error by -W error, a KeyboardInterrupt) is not the MLP's fault.
_NOT_DIFFERENTIABLE = (RuntimeError, TypeError, NotImplementedError, ValueError, AttributeError)


def _check_differentiable(backend_map: CallableMap, probe: torch.Tensor) -> None:
    """Forward-mode derivative of the callable on the probe rows, compared with a central finite
    difference: a callable that detaches part of its graph has a JVP that misses that part."""
    from .jacobian import jvp, load_forward_ad

    load_forward_ad()
    direction = torch.randn(probe.shape, generator=torch.Generator(device="cpu").manual_seed(0),
                            device="cpu", dtype=torch.float32).to(probe.dtype)
    try:
        _, tangent = jvp(backend_map, (probe,), (direction,))
    except _NOT_DIFFERENTIABLE as exc:
        raise ValueError(
            f"mlp is not differentiable with torch.func.jvp ({type(exc).__name__}: {exc}). The JSAE "
            f"needs d mlp(x) / dx: use torch operations only, without .detach(), .numpy() or in-place "
            f"tricks that break forward-mode autograd."
        ) from exc
    if tangent is None or not torch.isfinite(tangent).all():
        where = "" if tangent is None else f" (row {int((~torch.isfinite(tangent).all(dim=1)).nonzero()[0, 0])})"
        raise ValueError(f"mlp's Jacobian is not finite on rows of X{where}; the JSAE needs an mlp "
                         f"differentiable at every input (no sqrt, log or 1/x where they have no derivative).")
    # A zero JVP on the probe rows alone is no evidence of a cut graph (dead ReLUs, saturated units
    # or rows of padding zeros have a zero Jacobian too): the comparison below, off those points,
    # tells a detached output (zero JVP, non-zero difference) from a flat one, and a step function
    # (a rounding or an integer cast: a zero JVP at every point, yet outputs that differ between
    # rows, which a flat region cannot give) is refused after it.
    flat_at_probe = tangent
    # Compare with a central difference at the probe rows moved slightly off any kink (rows of
    # exact zeros sit on ReLU's).  Its error is O(h²) for smooth maps, and kinks touch few entries,
    # so a detached branch shows as a disagreement on most entries, a kink on a few.
    generator = torch.Generator(device="cpu").manual_seed(1)
    scale = float(probe.abs().max()) + 1.0
    point = probe + 1e-2 * scale * torch.rand(probe.shape, generator=generator).to(probe.dtype)
    _, tangent = jvp(backend_map, (point,), (direction,))
    tangent = tangent.double()
    # A step of 1e-3 of the inputs' scale, then, if most entries disagree, one of 1e-1: a callable
    # that computes in bfloat16 inside rounds its outputs to 3 digits, which swamps a small step's
    # difference (97% of entries disagree at 1e-3 on a bfloat16 MLP, 14% at 1e-1), while a detached
    # branch disagrees at any step.
    for relative_step in (1e-3, 1e-1):
        h = relative_step * scale / float(direction.abs().max())
        with torch.no_grad():
            plus, minus = backend_map(point + h * direction), backend_map(point - h * direction)
            difference = (plus.double() - minus.double()) / (2 * h)
        tolerance = 0.05 * (difference.abs() + tangent.abs()) + 1e-3 * float(difference.abs().max())
        disagree = float(((difference - tangent).abs() > tolerance).double().mean())
        if disagree <= 0.5:
            break
    if not tangent.abs().sum() > 0 and not flat_at_probe.abs().sum() > 0:
        with torch.no_grad():
            outputs = backend_map(probe)
        if bool((outputs != outputs[:1]).any()):
            raise ValueError(
                "mlp's output does not depend differentiably on its input: its outputs differ between rows "
                "of X, but its Jacobian is zero on every row and next to them (a rounding, an integer cast "
                "or a .detach() cuts the gradient); remove it."
            )
    if disagree > 0.5:
        raise ValueError(
            f"mlp's forward-mode derivative disagrees with a finite difference on rows of X "
            f"({disagree:.0%} of output entries): part of the output is detached from its input (.detach(), "
            f"torch.no_grad() or a .numpy() round trip inside the mlp), so its Jacobian would be "
            f"wrong. Keep the whole computation in torch autograd."
        )

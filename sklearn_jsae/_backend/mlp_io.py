"""A fitted JSAE's MLP as JSON plus named numpy arrays, and back, without running user code.

What the library computes with is the backend map (``jsae._mlp_map``): an :class:`AffineMap`,
:class:`ElementwiseMLP` or :class:`GatedMLP` holds its whole computation in buffers and an
activation name, so it is written out and rebuilt exactly; a :class:`CallableMap` wraps user
code, which is never saved (saving it would mean pickling, and loading a pickle runs code), and
neither is a subclass of a map class (it may override what it computes).

Bit-exact reloads need more than equal values: a matmul with a transposed (column-major) weight
runs another BLAS kernel than with a row-major one and can round differently.  Every tensor is
therefore stored with its layout (``"rows"``: C-contiguous, ``"columns"``: the transpose of a
C-contiguous array, as ``nn.Linear.weight.T`` is) and its dtype (bfloat16, which numpy lacks, is
stored as float32, exactly), and rebuilt with the same strides into freshly allocated memory.

The user-facing ``mlp_`` is rebuilt from the map, as the module kind the user passed:
``None``, ``nn.Identity``, ``nn.Linear`` or ``nn.Sequential(Linear, act, Linear)`` (recreated
with the same weights), or the map itself for :mod:`sklearn_jsae.mlp` modules (which fit uses as
their own map).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .mlp import ACTIVATIONS, AffineMap, CallableMap, ElementwiseMLP, GatedMLP, as_map, frozen_copy

# nn.Module kinds of ``mlp_`` that fit recognises as closed forms, and what ``mlp_`` was.
MODULE_KINDS = ("none", "identity", "linear", "sequential", "map", "callable")
_MAP_BUFFERS = {
    "AffineMap": ("W", "b"),
    "ElementwiseMLP": ("W_in", "b_in", "W_out", "b_out"),
    "GatedMLP": ("W_gate", "W_up", "W_down", "b_gate", "b_up", "b_down"),
}
_MAP_CLASSES = {"AffineMap": AffineMap, "ElementwiseMLP": ElementwiseMLP, "GatedMLP": GatedMLP}
_ACTIVATION_MODULES = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class UnsavedMLP(nn.Module):
    """Stands in for an MLP that could not be saved (any callable without a closed form).

    It is the loaded JSAE's ``mlp``, ``mlp_`` and backend map: calling it raises
    :class:`~sklearn_jsae.exceptions.MissingMLPError`, so every MLP-dependent method
    (``transform_output``, ``mlp_outputs``, ``jacobian``, ``score``, a warm-start ``fit``) says
    what to pass, while the SAE-only methods never touch it.
    """

    has_closed_form = False

    def __init__(self, d_in: int, d_out: int, description: str):
        super().__init__()
        self.d_in, self.d_out, self.description = int(d_in), int(d_out), str(description)

    def forward(self, x):
        from ..exceptions import MissingMLPError

        raise MissingMLPError(
            f"this JacobianSparseAutoencoder was loaded without its MLP ({self.description}, "
            f"{self.d_in} -> {self.d_out} features): an arbitrary callable cannot be saved without "
            f"pickling it. Load it again with sklearn_jsae.load(path, mlp=the_mlp) to use "
            f"transform_output, mlp_outputs, jacobian, score or a warm-start fit; transform, "
            f"inverse_transform, inverse_transform_output and jacobian_ work without it."
        )

    def __repr__(self):
        return f"UnsavedMLP({self.description!r}, d_in={self.d_in}, d_out={self.d_out})"


def _describe_callable(fn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}" if module else name


def _encode_tensor(t: torch.Tensor) -> tuple[dict, np.ndarray]:
    """(JSON description, C-contiguous numpy array) of a CPU tensor, keeping its layout."""
    t = t.detach().to("cpu")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"an MLP weight has dtype {t.dtype}; only {sorted(_DTYPES)} can be saved.")
    layout = "rows"
    if t.ndim == 2 and not t.is_contiguous() and t.T.is_contiguous():
        layout, t = "columns", t.T
    stored = t.to(torch.float32) if t.dtype == torch.bfloat16 else t
    return {"dtype": dtype, "layout": layout}, stored.contiguous().numpy().copy()


def _decode_tensor(meta: dict, array: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`_encode_tensor`: a tensor in fresh memory with the saved dtype and layout."""
    # (a damaged description may hold any JSON here: a string, a list, a list as the dtype, which
    # is unhashable)
    known = isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
    dtype = _DTYPES.get(meta["dtype"]) if known else None
    if dtype is None or meta.get("layout") not in ("rows", "columns"):
        raise ValueError(f"unknown dtype or layout {meta!r:.80}: expected {{'dtype': one of {sorted(_DTYPES)}, "
                         f"'layout': 'rows' or 'columns'}}")
    if meta["layout"] == "columns" and array.ndim != 2:
        raise ValueError(f"layout 'columns' needs a 2-D array, got shape {array.shape}")
    stored = np.dtype(np.float32 if meta["dtype"] == "bfloat16" else meta["dtype"])  # as _encode_tensor stores it
    if array.dtype != stored:  # (a complex array lost its imaginary part in the cast below)
        raise ValueError(f"the weight is stored as {array.dtype}, but its description says {meta['dtype']} "
                         f"(stored as {stored})")
    t = torch.from_numpy(np.array(array, copy=True)).to(dtype).clone()
    return t.T if meta["layout"] == "columns" else t


def _module_kind(mlp_copy, mlp_map) -> str:
    """What the user passed, as one of :data:`MODULE_KINDS`."""
    if mlp_copy is None:
        return "none"
    if type(mlp_map) not in _MAP_CLASSES.values():
        # CallableMap wraps user code; a subclass of a map class may compute something else.
        return "callable"
    if mlp_copy is mlp_map:
        return "map"
    if isinstance(mlp_copy, nn.Identity):
        return "identity"
    if isinstance(mlp_copy, nn.Linear):
        return "linear"
    if isinstance(mlp_copy, nn.Sequential) and isinstance(mlp_map, ElementwiseMLP):
        return "sequential"
    return "callable"


def describe(mlp_copy, mlp_map) -> tuple[dict, dict[str, np.ndarray]]:
    """``(spec, arrays)`` for a JSAE's ``mlp_`` and backend map.

    ``spec`` is JSON-ready: ``module`` (one of :data:`MODULE_KINDS`), ``map`` (the map class, or
    ``"CallableMap"``), ``d_in``, ``d_out``, ``activation``, and per saved buffer its dtype and
    layout; ``arrays`` maps each buffer name to a numpy array.  What cannot be rebuilt without
    the user's code (kind ``"callable"``) gets a ``description`` (its qualified name) and no arrays.
    """
    module = _module_kind(mlp_copy, mlp_map)
    spec = {"module": module, "map": type(mlp_map).__name__, "d_in": int(mlp_map.d_in),
            "d_out": int(mlp_map.d_out)}
    if module == "callable":
        spec["description"] = _describe_callable(mlp_map.fn if isinstance(mlp_map, CallableMap) else mlp_copy)
        return spec, {}
    spec["activation"] = getattr(mlp_map, "activation", None)
    spec["buffers"], arrays = {}, {}
    for name in _MAP_BUFFERS[type(mlp_map).__name__]:
        t = getattr(mlp_map, name)
        if t is None:
            spec["buffers"][name] = None
            continue
        spec["buffers"][name], arrays[name] = _encode_tensor(t)
    return spec, arrays


def _linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    """``nn.Linear`` computing ``x @ W + b`` whose weight is ``W.T`` (same storage layout as a
    module the user built: ``as_map`` takes ``weight.T`` back, as it did at fit time)."""
    d_in, d_out = W.shape
    layer = nn.Linear(d_in, d_out, bias=b is not None, device="meta")
    layer.weight = nn.Parameter(W.T.clone() if W.T.is_contiguous() else W.T.contiguous())
    if b is not None:
        layer.bias = nn.Parameter(b.clone())
    return layer


def rebuild(spec: dict, arrays: dict[str, np.ndarray]) -> tuple[object, object, nn.Module]:
    """``(mlp, mlp_, map)`` from :func:`describe`'s output; raises ValueError naming what is wrong.

    ``mlp`` is the estimator parameter (a fresh module, or None), ``mlp_`` the frozen copy and
    ``map`` the backend map.  For a callable all three are one :class:`UnsavedMLP`.
    """
    module, map_name = spec.get("module"), spec.get("map")
    # isinstance first: a list is unhashable (a TypeError from the dict lookups below)
    if not isinstance(module, str) or module not in MODULE_KINDS:
        raise ValueError(f"unknown MLP kind {module!r:.80}; expected one of {MODULE_KINDS}")
    d_in, d_out = spec.get("d_in"), spec.get("d_out")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in (d_in, d_out)):
        raise ValueError(f"MLP widths d_in={d_in!r}, d_out={d_out!r} are not positive integers")
    if module == "callable":
        description = spec.get("description", "a callable")
        if not isinstance(description, str):
            raise ValueError(f"the callable's description {description!r:.80} is not a string")
        placeholder = UnsavedMLP(d_in, d_out, description)
        return placeholder, placeholder, placeholder
    if not isinstance(map_name, str) or map_name not in _MAP_CLASSES:
        raise ValueError(f"unknown MLP map {map_name!r:.80}; expected one of {sorted(_MAP_CLASSES)}")
    buffer_specs = spec.get("buffers")
    names = _MAP_BUFFERS[map_name]
    if not isinstance(buffer_specs, dict) or set(buffer_specs) != set(names):
        raise ValueError(f"the map {map_name} needs exactly the buffers {list(names)}, got {buffer_specs!r}")
    missing = sorted(n for n in names if buffer_specs[n] is not None and n not in arrays)
    extra = sorted(set(arrays) - {n for n in names if buffer_specs[n] is not None})
    if missing or extra:
        raise ValueError(f"MLP tensors missing: {missing}, unexpected: {extra}")
    t = {n: None if buffer_specs[n] is None else _decode_tensor(buffer_specs[n], arrays[n]) for n in names}
    activation = spec.get("activation")
    if map_name != "AffineMap" and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if map_name == "AffineMap":
        mlp_map = AffineMap(d_in, t["W"], t["b"])
    elif map_name == "ElementwiseMLP":
        mlp_map = ElementwiseMLP(t["W_in"], t["b_in"], t["W_out"], t["b_out"], activation)
    else:
        mlp_map = GatedMLP(t["W_gate"], t["W_up"], t["W_down"], t["b_gate"], t["b_up"], t["b_down"],
                           activation)
    _check_shapes(mlp_map, d_in, d_out)

    if module == "none":
        if not (map_name == "AffineMap" and mlp_map.W is None and mlp_map.b is None):
            raise ValueError("MLP kind 'none' (the identity) must be an AffineMap without weights")
        return None, None, mlp_map
    if module == "map":
        mlp = frozen_copy(mlp_map)
        return mlp, mlp_map, mlp_map
    if module == "identity":
        if not (map_name == "AffineMap" and mlp_map.W is None and mlp_map.b is None):
            raise ValueError("MLP kind 'identity' must be an AffineMap without weights")
        mlp = nn.Identity()
    elif module == "linear":
        if map_name != "AffineMap" or mlp_map.W is None:
            raise ValueError("MLP kind 'linear' must be an AffineMap with a weight")
        mlp = _linear(mlp_map.W, mlp_map.b)
    else:  # "sequential"
        if map_name != "ElementwiseMLP":
            raise ValueError("MLP kind 'sequential' must be an ElementwiseMLP")
        mlp = nn.Sequential(_linear(mlp_map.W_in, mlp_map.b_in), _ACTIVATION_MODULES[activation](),
                            _linear(mlp_map.W_out, mlp_map.b_out))
    mlp_copy = frozen_copy(mlp)
    # The map fit would have built from this module has the same weights and layouts; the saved
    # one is kept (it is what the saved model computed with).
    check = as_map(mlp_copy, d_in, d_out)
    for name in _MAP_BUFFERS[map_name]:
        a, b = getattr(check, name), getattr(mlp_map, name)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            raise ValueError(f"the rebuilt {module} module disagrees with the saved map on {name}")
    return mlp, mlp_copy, mlp_map


def _check_shapes(mlp_map, d_in: int, d_out: int) -> None:
    """Every buffer's shape agrees with the declared widths and with the others."""
    if mlp_map.d_in != d_in or mlp_map.d_out != d_out:
        raise ValueError(f"the MLP weights map {mlp_map.d_in} -> {mlp_map.d_out} features, but the "
                         f"file declares {d_in} -> {d_out}")
    if isinstance(mlp_map, AffineMap):
        expected = {"W": (d_in, d_out), "b": (d_out,)}
    else:
        d_mlp = mlp_map.d_mlp
        expected = {"W_in": (d_in, d_mlp), "b_in": (d_mlp,), "W_out": (d_mlp, d_out), "b_out": (d_out,),
                    "W_gate": (d_in, d_mlp), "W_up": (d_in, d_mlp), "W_down": (d_mlp, d_out),
                    "b_gate": (d_mlp,), "b_up": (d_mlp,), "b_down": (d_out,)}
    for name in _MAP_BUFFERS[type(mlp_map).__name__]:
        t = getattr(mlp_map, name)
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"MLP tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}")


def probe_outputs(mlp_map, probe_rows: np.ndarray) -> np.ndarray:
    """``mlp_map(probe_rows)`` as float32 numpy, on the CPU (the fingerprint a load checks)."""
    from .inference import map_rows

    return map_rows(mlp_map, probe_rows, "cpu", max(1, len(probe_rows)))

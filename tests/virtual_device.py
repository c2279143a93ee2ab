"""A virtual accelerator for CPU-only machines: real values, another device.

The CUDA code path of the backend cannot run in CI (no GPU), so device-placement bugs
(a tensor created on the default CPU device and combined with tensors on the accelerator,
a CPU ``torch.Generator`` passed to a random op that draws on the accelerator) only show up
on a GPU.  This module lets the backend run with ``device="meta"`` on the CPU:

* :class:`VirtualTensor` is a wrapper tensor subclass that holds a real CPU tensor
  (``.inner``) but reports ``device=torch.device("meta")``.  Every aten op on it runs on
  the inner CPU tensors, so values are real: losses, ``topk``, boolean indexing, ``.item()``,
  ``float()`` and ``bool()`` behave as on CUDA, and autograd (custom ``autograd.Function`` s
  included) works through it.  ``.numpy()`` fails, as for a CUDA tensor; ``.cpu()`` /
  ``.to("cpu")`` return a plain CPU tensor.
* :func:`virtual_device` is a context manager (a ``TorchDispatchMode``) under which factory
  ops asked for ``device="meta"`` (``torch.zeros``, ``empty``, ``full``, ``arange``,
  ``randn``, ``randperm``, ``eye``, ``scalar_tensor``, ``tensor``, ``as_tensor``,
  ``x.to("meta")`` ...: anything whose ``device`` keyword is meta) return VirtualTensors,
  and under which every op that touches the virtual device is checked.  A violation
  raises :class:`DevicePlacementError` (an ``AssertionError``) naming the aten op and the
  offending argument's name, device, shape and dtype:

  1. a plain CPU tensor with ``dim() > 0`` mixed with virtual tensors.  0-dim CPU tensors
     are allowed where CUDA allows them: in elementwise ops (aten ops tagged ``pointwise``:
     ``x * torch.tensor(2.)``), as ``fill_`` / ``masked_fill`` / ``index_put`` values and in
     the TensorIterator losses (``mse_loss`` ...); elsewhere (``stack``, ``mm`` ...) they are
     an error too.  CUDA's own exceptions are allowed: CPU index
     tensors in ``aten.index`` / ``index_put(_)`` (``x[cpu_index]``, ``x[cpu_mask] = v``),
     cross-device ``copy_`` / ``_to_copy`` and the template argument of ``*_like`` /
     ``new_*`` factories.  A *real* meta tensor (no data: created by a factory outside the
     context, e.g. on another Python thread) mixed with virtual tensors is an error too;
  2. a random op whose ``generator`` is on another device than the one the result is
     created on (CUDA: "Expected a 'cuda' device type for generator but found 'cpu'");
  3. with ``strict_dtype=<dtype>``: a floating tensor of another dtype among the arguments
     of an op that touches the virtual device (explicit casts ``_to_copy`` / ``copy_`` and
     read-outs ``.item()`` / ``detach`` excepted), so that a float64 run catches tensors
     created in the default float32.  Plain CPU 0-dim tensors are not checked (type
     promotion never lets them change a result's dtype).  By default
     (``allow_explicit_dtypes=True``) a virtual tensor whose dtype was *chosen* is let
     through: one made by an op given ``dtype=`` (``torch.zeros(n, dtype=torch.float32,
     device=d)``, ``.float()``, ``.to(torch.float32)``) or computed only from such tensors.
     What is flagged is a dtype that came by default: a factory without ``dtype=``, a host
     tensor moved with ``.to(device)`` alone.

Usage::

    from virtual_device import virtual_device, VIRTUAL, VirtualTensor, DevicePlacementError, is_virtual

    with virtual_device(strict_dtype=None, allow_explicit_dtypes=True) as mode:
        W = torch.randn(4, 4).to(VIRTUAL)          # VirtualTensor, real values
        y = (W @ W).sum()                          # runs on the CPU, reports device meta
        y.item(); y.cpu()                          # fine
        torch.eye(4) @ W                           # DevicePlacementError (aten.mm, arg 'self')
        train(X, mlp_map, TrainConfig(..., device="meta"))   # the backend's accelerator path

``VIRTUAL`` is ``torch.device("meta")``; pass ``device="meta"`` wherever the code under test
takes a device.  Compare results through ``.cpu()``.

Also patched while the context is active (process-wide, restored on exit):

* ``torch.Generator(device="meta")`` returns a :class:`VirtualGenerator` (a CPU generator
  that reports device meta), the analogue of ``torch.Generator(device="cuda")``: accepted
  by random ops that create virtual tensors, rejected by those that create CPU tensors.
* ``torch.autocast("meta", ...)`` (and ``torch.amp.autocast``) is accepted as a no-op: a bare
  meta autocast raises "unsupported scalarType", where ``torch.autocast("cuda", enabled=False)``
  works.  With ``enabled=True`` it warns (RuntimeWarning): autocast's own casts do not happen
  on the virtual device (its ops reach the inner CPU tensors below the autocast dispatch key),
  so the code around an autocast region is checked, not what autocast would compute.
* ``torch.tensor`` / ``torch.as_tensor`` / ``torch.asarray`` with ``device="meta"`` (and
  ``VirtualTensor.new_tensor``) build on the host and move the result: torch builds these
  in C++ below the dispatcher, where a mode cannot intercept them.  A name imported before
  the context (``from torch import tensor``) is not patched; if such a real meta tensor
  (no values) reaches an op inside the context, that op raises DevicePlacementError.
* the backward of custom ``torch.autograd.Function`` s: torch's autograd engine skips its
  gradient-device check ("invalid gradient at index 0 - expected device cuda:0 but got
  cpu") for tensor subclasses, so the harness redoes it and raises DevicePlacementError
  for a dim > 0 gradient on the wrong device (CUDA moves 0-dim ones silently).
* ``torch.func.jvp`` on virtual tensors is emulated by double backward (``J v`` as
  ``d/du <J^T u, v>``): functorch's forward-mode transforms crash the process (segfault)
  on wrapper subclasses.  The function still runs forward on the virtual device, so its
  placement is checked; the tangent is differentiable in the tangents, not the primals;
  one tensor output, no ``has_aux``.  ``torch.func.jacfwd`` / ``hessian`` and
  ``torch.autograd.forward_ad.make_dual`` raise NotImplementedError on virtual tensors.
  ``torch.func.vjp`` / ``jacrev`` / ``vmap`` work natively.  Patched as module attributes:
  code that did ``from torch.func import jvp`` at import time bypasses the patch (the
  backend imports it inside the function, at call time).

A ``TorchFunctionMode`` also runs inside the context, to see Python-level calls that the
dispatch level cannot tell apart: a VirtualGenerator (torch hands ``__torch_dispatch__`` a
fresh generator object) and explicit casts (``.to(d)`` and ``.to(d, dtype)`` are both
``aten._to_copy`` with ``dtype=``).

Threads.  The dispatch-mode stack is thread-local: a Python thread started inside the
context does not see the mode.  Ops there on VirtualTensors still run and are still checked
(through ``VirtualTensor.__torch_dispatch__``, with the options of the innermost active
context), but a factory call with ``device="meta"`` on such a thread creates a *real* meta
tensor (no data); using it with virtual tensors then raises DevicePlacementError.  A
VirtualGenerator used on such a thread is seen as a CPU generator.  The patches above are
process-wide while any context is open.  The backend (``_backend/chunks.py``) only uses
threads when ``device.type == "cpu"``, so on the virtual device everything runs on the
calling thread; the autograd engine runs the backward of meta-device tensors on the
calling thread too (and would carry the mode to its own threads).

What this harness cannot see:

* anything inside CUDA kernels, cuBLAS / cuDNN: wrong results, unsupported dtypes on CUDA
  (some ops lack bf16/half kernels), illegal memory accesses, index asserts;
* numerical differences between CUDA and CPU kernels (TF32 matmuls, reduction order,
  atomics, non-deterministic ``index_put_(accumulate=True)``): values here are CPU values;
* CUDA autocast (a no-op here, see above) and ``GradScaler``;
* performance, memory (OOM, the ``_ACCELERATOR_CHUNK_ELEMENTS`` sizing), streams,
  host/device synchronisation (``.item()`` is free here), pinned memory / non_blocking races;
* CUDA's RNG: ``torch.randn(..., device="meta")`` without a generator draws from the CPU
  default generator, so "same seed, same numbers as CUDA" is not checked;
* multi-GPU (``cuda:0`` vs ``cuda:1``): there is one virtual device;
* the exact set of ops whose CUDA kernels accept a CPU 0-dim tensor beside CUDA tensors
  (approximated here by the ``pointwise`` tag plus a short list, see ``_CPU_SCALAR_OPS``);
* code that branches on ``tensor.is_meta`` / ``device.type == "meta"`` (torch's own
  ``assert_close`` compares only metadata for meta tensors: compare ``.cpu()`` results),
  or on ``device.type == "cuda"`` (the virtual device is not "cuda": such branches are not
  taken; ``device.type != "cpu"`` branches are).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "VIRTUAL",
    "DevicePlacementError",
    "VirtualGenerator",
    "VirtualTensor",
    "is_virtual",
    "virtual_device",
]

VIRTUAL = torch.device("meta")
_CPU = torch.device("cpu")
aten = torch.ops.aten


class DevicePlacementError(AssertionError):
    """An op that CUDA would reject (or that breaks the strict-dtype rule) on the virtual device."""


# ----------------------------------------------------------------------------- the tensor


class VirtualTensor(torch.Tensor):
    """A real CPU tensor (``.inner``) that reports ``device=meta``; see the module docstring."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        if type(inner) is not torch.Tensor or inner.device.type != "cpu":
            raise TypeError(
                f"VirtualTensor wraps a plain CPU tensor, got {type(inner).__name__} on {inner.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.size(),
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=VIRTUAL,
            requires_grad=requires_grad,
        )
        out.inner = inner
        out.dtype_explicit = False  # strict_dtype bookkeeping: was this dtype chosen with dtype=?
        return out

    def __init__(self, inner: torch.Tensor, requires_grad: bool = False):
        pass

    # No torch_function-level rewrapping: everything happens at the dispatch level.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, *, tensor_contents=None):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"VirtualTensor({self.inner!r}, device='meta'{grad})"

    def __format__(self, spec):
        # torch.Tensor.__format__ formats 0-dim tensors via .item() only for plain,
        # non-meta tensors; CUDA tensors take that path, so this one does too.
        if self.dim() == 0:
            return self.item().__format__(spec)
        return object.__format__(self, spec)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False, pin_memory=False):
        # torch builds new_tensor's result below the dispatcher (no values on meta): build it
        # on the host and move it, as torch.tensor does inside the context.
        device = self.device if device is None else device
        return torch.tensor(data, dtype=self.dtype if dtype is None else dtype, device=device,
                            requires_grad=requires_grad, pin_memory=pin_memory)

    def numpy(self, *, force=False):
        # CUDA: TypeError: can't convert cuda:0 device type tensor to numpy. ...
        raise TypeError("can't convert meta (virtual accelerator) device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    def __array__(self, dtype=None, copy=None):
        self.numpy()

    def tolist(self):
        # torch refuses .tolist() on tensor subclasses; CUDA tensors allow it (copy to host).
        return self.cpu().tolist()

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return VirtualTensor(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached when no virtual_device() mode is active on this thread (worker threads,
        # or a VirtualTensor used after its context closed).
        return _dispatch(func, args, kwargs or {}, _current_options())


def is_virtual(t) -> bool:
    """Whether ``t`` is a tensor on the virtual device (a VirtualTensor)."""
    return isinstance(t, VirtualTensor)


class VirtualGenerator(torch.Generator):
    """A CPU generator that reports ``device=meta``: what ``torch.Generator(device="meta")``
    returns inside :func:`virtual_device` (the analogue of a CUDA generator)."""

    @property
    def device(self):  # noqa: D401 -- mirrors torch.Generator.device
        return VIRTUAL

    def __repr__(self):
        return "VirtualGenerator(device='meta')"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    strict_dtype: torch.dtype | None = None
    allow_explicit: bool = True


_DEFAULT_OPTIONS = _Options()
_options_stack: list[_Options] = []  # process-wide, so that worker threads see the options too
_options_lock = threading.Lock()


def _current_options() -> _Options:
    with _options_lock:
        return _options_stack[-1] if _options_stack else _DEFAULT_OPTIONS


# --------------------------------------------------------------------- the op handler

_CAST_OPS = {
    aten._to_copy.default,
    aten.to.dtype_layout,
    aten.to.device,
    aten.to.dtype,
    aten.to.other,
    aten.copy_.default,
    aten.copy.default,
    aten._copy_from.default,
    aten._copy_from_and_resize.default,
}
# Ops whose list of index tensors may live on the CPU (CUDA moves them).
_INDEX_OPS = {
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
    aten._unsafe_index.Tensor,
    aten._unsafe_index_put.default,
}
# Besides elementwise (TensorIterator, tagged pointwise) ops, the ops whose CUDA kernels take a
# CPU 0-dim tensor beside CUDA tensors (value arguments read as scalars, TensorIterator losses).
_CPU_SCALAR_OPS = {
    aten.masked_fill_.Tensor, aten.masked_fill.Tensor, aten.fill_.Tensor, aten.fill.Tensor,
    aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default,
    aten.mse_loss.default, aten.mse_loss_backward.default, aten.l1_loss.default,
    aten.smooth_l1_loss.default, aten.smooth_l1_loss_backward.default, aten.huber_loss.default,
    aten.huber_loss_backward.default,
}


def _takes_cpu_scalars(func) -> bool:
    return func in _CPU_SCALAR_OPS or torch.Tag.pointwise in getattr(func, "tags", ())


# Read-outs and aliases: not dtype-checked.
_READOUT_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.detach.default,
    aten.alias.default,
    aten.lift_fresh.default,
    aten.equal.default,
}


def _is_template_op(func) -> bool:
    """``*_like`` / ``new_*`` factories: their ``self`` gives shape (and defaults), not data."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    name = schema.name.split("::")[-1]
    return name.endswith("_like") or name.startswith("new_")


def _describe(t: torch.Tensor) -> str:
    if isinstance(t, VirtualTensor):
        where = "virtual device 'meta'"
    elif t.device.type == "meta":
        where = "a REAL meta device (no data)"
    else:
        where = f"device '{t.device}'"
    return f"{where}, shape {tuple(t.shape)}, dtype {t.dtype}"


def _named_arguments(func, args, kwargs):
    """``[(name, value)]`` for every argument of ``func``, positional ones named by the schema."""
    schema = getattr(func, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    named = []
    for i, value in enumerate(args):
        named.append((names[i] if i < len(names) else f"arg{i}", value))
    named.extend(kwargs.items())
    return named


def _tensor_leaves(name, value):
    """``[(label, tensor)]`` inside one argument (a tensor or a list / tuple of optional tensors)."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return []


def _as_device(value):
    if value is None:
        return None
    return value if isinstance(value, torch.device) else torch.device(value)


def _fail(func, message):
    raise DevicePlacementError(f"{func}: {message}")


def _dispatch(func, args, kwargs, options: _Options):
    if func is torch.ops.aten._efficientzerotensor.default:
        # sgn's double backward (|x| in a callable MLP, through forward-mode AD) makes a ZeroTensor,
        # which inside a wrapper subclass crashes the process; plain zeros have its values.
        func = torch.ops.aten.zeros.default
    named = _named_arguments(func, args, kwargs)
    leaves = [leaf for name, value in named for leaf in _tensor_leaves(name, value)]
    has_virtual = any(isinstance(t, VirtualTensor) for _, t in leaves)
    requested = _as_device(kwargs.get("device"))
    template = _is_template_op(func) or func in _CAST_OPS

    # Where new outputs live: an explicit device keyword, else (for templates / casts) the
    # first argument's device, else the virtual device if any argument is virtual.
    if requested is not None:
        result_virtual = requested.type == "meta"
    elif template and args and isinstance(args[0], torch.Tensor):
        result_virtual = isinstance(args[0], VirtualTensor)
    else:
        result_virtual = has_virtual

    # 1. generator device against the device the result is created on
    for name, value in named:
        if isinstance(value, torch._C.Generator):
            # torch hands __torch_dispatch__ a fresh Python object for the generator, so a
            # VirtualGenerator is recognised by _PythonLevelMode, which saw the Python-level call.
            generator_virtual = (isinstance(value, VirtualGenerator)
                                 or getattr(_tls, "virtual_generator", 0) > 0)
            if generator_virtual != result_virtual:
                expected = "meta" if result_virtual else "cpu"
                found = "meta" if generator_virtual else value.device.type
                _fail(func, f"argument '{name}': Expected a '{expected}' device type for generator but found "
                            f"'{found}' (CUDA raises the same for a CPU generator with device='cuda'). Draw "
                            f"on the generator's device and move the result, or use a generator on the "
                            f"result's device.")

    if not has_virtual and not result_virtual:
        for label, t in leaves:
            if t.device.type == "meta":
                _fail(func, f"argument '{label}' is on {_describe(t)}: a tensor reached the virtual "
                            f"device by a path this harness does not intercept (a C++ factory such as "
                            f"torch.tensor imported before the context, or a factory on another thread).")
        return func(*args, **kwargs)  # plain CPU op: nothing virtual involved

    # 2. devices of the tensor arguments
    if func not in _CAST_OPS:
        for name, value in named:
            if template and name == "self":
                continue
            if func in _INDEX_OPS and name == "indices":
                continue
            for label, t in _tensor_leaves(name, value):
                if isinstance(t, VirtualTensor):
                    continue
                if t.device.type == "meta":
                    _fail(func, f"argument '{label}' is on {_describe(t)}, mixed with virtual-device "
                                f"tensors; "
                                f"it was created with device='meta' outside virtual_device() (on another "
                                f"thread?), so it holds no values.")
                if t.dim() > 0:
                    _fail(func, f"argument '{label}' is on {_describe(t)}, but the op runs on the virtual "
                                f"device (CUDA: 'Expected all tensors to be on the same device'). Create it "
                                f"with device=<the tensors' device> or move it with .to(device).")
                if not _takes_cpu_scalars(func):
                    _fail(func, f"argument '{label}' is a 0-dim tensor on {_describe(t)}, but the op runs on "
                                f"the virtual device and is not elementwise: CUDA accepts CPU 0-dim tensors "
                                f"only in elementwise ops, fill / masked_fill / index_put values and copies "
                                f"('Expected all tensors to be on the same device'). Move it with "
                                f".to(device).")

    # 3. strict dtype
    strict = options.strict_dtype
    explicit_out = False
    if strict is not None:
        dtype_given = kwargs.get("dtype") is not None
        off_dtype = [t for _, t in leaves if isinstance(t, VirtualTensor) and t.is_floating_point()
                     and t.dtype != strict]
        # New outputs count as "dtype chosen explicitly" when dtype= was given, or when every
        # off-dtype virtual input was itself chosen explicitly (a deliberate float32 side
        # computation stays deliberate).
        if func in _CAST_OPS:  # .to(device) fills in dtype= too: ask the Python-level call
            changes_dtype = (dtype_given and bool(args) and isinstance(args[0], torch.Tensor)
                             and kwargs["dtype"] != args[0].dtype)
            dtype_given = getattr(_tls, "explicit_cast", 0) > 0 or changes_dtype
        explicit_out = dtype_given or (bool(off_dtype) and all(t.dtype_explicit for t in off_dtype))
    if strict is not None and func not in _CAST_OPS and func not in _READOUT_OPS:
        for name, value in named:
            if template and name == "self" and kwargs.get("dtype") is not None:
                continue
            for label, t in _tensor_leaves(name, value):
                if not t.is_floating_point() or t.dtype == strict:
                    continue
                if isinstance(t, VirtualTensor):
                    if options.allow_explicit and t.dtype_explicit:
                        continue
                elif t.dim() == 0:
                    continue
                if getattr(t, "dtype_explicit", False):
                    why = ("its dtype was chosen explicitly (dtype=, .float(), .to(dtype)), and "
                           "allow_explicit_dtypes=False")
                else:
                    why = ("this tensor got its dtype by default (a factory without dtype=, the default "
                           "float32, or a host tensor moved without dtype=), not by choice. Pass dtype= "
                           "where it is created or cast it explicitly")
                _fail(func, f"argument '{label}' is on {_describe(t)}, but strict_dtype={strict}: {why}.")

    # Run on the inner CPU tensors.
    def unwrap(x):
        if isinstance(x, VirtualTensor):
            return x.inner
        if isinstance(x, torch.device) and x.type == "meta":
            return _CPU
        return x

    inner_args = pytree.tree_map(unwrap, args)
    inner_kwargs = pytree.tree_map(unwrap, kwargs)
    out = func(*inner_args, **inner_kwargs)

    # Outputs that are inputs (in-place ops, out= variants) map back to the argument object;
    # views and fresh tensors are wrapped when they live on the virtual device.
    originals = {}
    for _, t in leaves:
        originals[id(t.inner if isinstance(t, VirtualTensor) else t)] = t

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        original = originals.get(id(x))
        if original is not None:
            return original
        if not result_virtual or x.device.type != "cpu":
            return x
        wrapped = VirtualTensor(x.detach() if x.requires_grad else x)
        wrapped.dtype_explicit = explicit_out
        return wrapped

    return pytree.tree_map(wrap, out)


# ------------------------------------------------------------------------- the mode

_tls = threading.local()


_CAST_METHODS = {
    torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.double,
    torch.Tensor.half, torch.Tensor.bfloat16,
}


def _names_a_dtype(func, args, kwargs) -> bool:
    """Whether a Python-level cast call chose its dtype (``.to(dtype)``, ``.float()``, ...)."""
    if func is not torch.Tensor.to and func is not torch.Tensor.type:
        return True
    def names_dtype(a):
        if isinstance(a, torch.dtype):
            return True
        return isinstance(a, str) and a.split(":")[0] not in ("cpu", "cuda", "meta")  # .type("torch.X")

    return kwargs.get("dtype") is not None or any(names_dtype(a) for a in args[1:])


class _PythonLevelMode(TorchFunctionMode):
    """Sees the Python-level calls, before torch turns them into aten ops: marks calls that pass
    a VirtualGenerator (torch hands __torch_dispatch__ a fresh generator object) and explicit
    dtype casts (``.to(d)`` and ``.to(d, dtype)`` are the same aten ``_to_copy``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        marks = []
        if any(isinstance(v, VirtualGenerator) for v in (*args, *kwargs.values())):
            marks.append("virtual_generator")
        if func in _CAST_METHODS and _names_a_dtype(func, args, kwargs):
            marks.append("explicit_cast")
        if not marks:
            return func(*args, **kwargs)
        for mark in marks:
            setattr(_tls, mark, getattr(_tls, mark, 0) + 1)
        try:
            return func(*args, **kwargs)
        finally:
            for mark in marks:
                setattr(_tls, mark, getattr(_tls, mark) - 1)


class _VirtualDeviceMode(TorchDispatchMode):
    def __init__(self, options: _Options):
        super().__init__()
        self.options = options

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {}, self.options)


_RealGenerator = torch.Generator
_RealAutocast = torch.amp.autocast_mode.autocast


class _GeneratorMeta(type(_RealGenerator)):
    # ``isinstance(g, torch.Generator)`` must stay true for every generator inside the context.
    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealGenerator)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _RealGenerator)


class _GeneratorFactory(_RealGenerator, metaclass=_GeneratorMeta):
    """Stands in for ``torch.Generator`` inside the context: ``device="meta"`` gives a
    VirtualGenerator, anything else a real generator."""

    def __new__(cls, device="cpu"):
        if device is not None and _as_device(device).type == "meta":
            return VirtualGenerator()
        return _RealGenerator(device) if device is not None else _RealGenerator()


class _Autocast(_RealAutocast):
    """``torch.autocast`` that accepts ``device_type="meta"`` as a no-op (see the module docstring)."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        self._virtual = device_type == "meta"
        if not self._virtual:
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
            return
        self.device, self.fast_dtype, self._enabled = "meta", dtype, enabled
        if enabled:
            warnings.warn("virtual_device: torch.autocast('meta', enabled=True) is a no-op; ops on the "
                          "virtual device run in their inputs' dtypes, not in the autocast dtype.",
                          RuntimeWarning, stacklevel=2)

    def __enter__(self):
        return self if self._virtual else super().__enter__()

    def __exit__(self, *exc):
        return False if self._virtual else super().__exit__(*exc)


_real_tensor, _real_as_tensor, _real_asarray = torch.tensor, torch.as_tensor, torch.asarray


def _move_if_virtual(t, device, requires_grad=False):
    if device is not None and _as_device(device).type == "meta":
        t = t.to(VIRTUAL)
        if requires_grad:
            t.requires_grad_(True)
    return t


# torch.tensor / as_tensor / asarray build their result in C++ below the dispatcher, so a
# mode never sees them: with device="meta" they would return a real meta tensor (no values).
# Inside the context they build on the host and move the result with .to("meta").
def _tensor(data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
    if device is not None and _as_device(device).type == "meta":
        return _move_if_virtual(_real_tensor(data, dtype=dtype, pin_memory=pin_memory), device, requires_grad)
    return _real_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad, pin_memory=pin_memory)


def _as_tensor(data, dtype=None, device=None):
    if device is not None and _as_device(device).type == "meta":
        return _move_if_virtual(_real_as_tensor(data, dtype=dtype), device)
    return _real_as_tensor(data, dtype=dtype, device=device)


def _asarray(obj, *, dtype=None, device=None, copy=None, requires_grad=False):
    if device is not None and _as_device(device).type == "meta":
        host = _real_asarray(obj, dtype=dtype, copy=copy)
        return _move_if_virtual(host, device, requires_grad)
    return _real_asarray(obj, dtype=dtype, device=device, copy=copy, requires_grad=requires_grad)


_BackwardCFunction = torch.autograd.function.BackwardCFunction
_real_backward_apply = _BackwardCFunction.apply


def _checked_backward_apply(self, *args):
    """A custom ``autograd.Function``'s backward, then CUDA's check of its gradients' devices.

    The autograd engine skips its device check ("invalid gradient at index i - expected device
    cuda:0 but got cpu") for tensor subclasses, so it is redone here for virtual tensors.
    """
    result = _real_backward_apply(self, *args)
    grads = result if isinstance(result, tuple) else (result,)
    for i, (grad, (node, input_nr)) in enumerate(zip(grads, self.next_functions)):
        # (torch 2.2, the oldest the package allows, has no _input_metadata: nothing to check against)
        if node is None or not isinstance(grad, torch.Tensor) or not hasattr(node, "_input_metadata"):
            continue
        expected = node._input_metadata[input_nr].device
        if (expected.type == "meta") == isinstance(grad, VirtualTensor):
            continue
        if expected.type == "cpu" or grad.dim() > 0:  # CUDA moves 0-dim gradients silently
            raise DevicePlacementError(
                f"{self._forward_cls.__qualname__}.backward: invalid gradient at index {i} - expected "
                f"device {'meta (virtual)' if expected.type == 'meta' else expected} but got "
                f"{_describe(grad)} (CUDA raises the same).")
    return result


import torch.func as _torch_func  # noqa: E402
import torch.autograd.forward_ad as _forward_ad  # noqa: E402

_real_jvp = _torch_func.jvp
_real_jacfwd = _torch_func.jacfwd
_real_hessian = _torch_func.hessian
_real_make_dual = _forward_ad.make_dual


def _any_virtual(*trees):
    return any(isinstance(t, VirtualTensor) for t in pytree.tree_leaves(trees))


def _jvp(func, primals, tangents, *, strict=False, has_aux=False):
    """``torch.func.jvp``; on virtual tensors emulated by double backward.

    functorch's forward-mode transforms crash the process (segfault) on wrapper subclasses, so
    for virtual primals or tangents ``J v`` is computed as ``d/du <J^T u, v>`` with two reverse
    passes: ``func`` still runs forward on the virtual device (its placement is checked), and
    the tangent is differentiable in the tangents (not in the primals).  One tensor output,
    no ``has_aux``.
    """
    if not _any_virtual(primals, tangents):
        return _real_jvp(func, primals, tangents, strict=strict, has_aux=has_aux)
    if has_aux:
        raise NotImplementedError("virtual_device: torch.func.jvp(has_aux=True) on virtual tensors")
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xs = tuple(p.detach().requires_grad_(True) for p in primals)
        out = func(*xs)
        if not isinstance(out, torch.Tensor):
            raise NotImplementedError("virtual_device: torch.func.jvp of a function with several outputs")
        u = torch.zeros_like(out, requires_grad=True)
        vjps = torch.autograd.grad(out, xs, u, create_graph=True, allow_unused=True, materialize_grads=True)
        (tangent,) = torch.autograd.grad(vjps, u, tuple(tangents), create_graph=keep_graph, allow_unused=True,
                                         materialize_grads=True)
    return out.detach(), tangent if keep_graph else tangent.detach()


def _unsupported(real, what):
    def call(*args, **kwargs):
        if _any_virtual(args, kwargs):
            raise NotImplementedError(f"virtual_device: {what} does not work on virtual tensors "
                                      f"(torch's forward-mode AD crashes on wrapper subclasses)")
        return real(*args, **kwargs)
    return call


_FUNC_PATCHES = {
    (_torch_func, "jvp"): _jvp,
    (_torch_func, "jacfwd"): _unsupported(_real_jacfwd, "torch.func.jacfwd"),
    (_torch_func, "hessian"): _unsupported(_real_hessian, "torch.func.hessian"),
    (_forward_ad, "make_dual"): _unsupported(_real_make_dual, "torch.autograd.forward_ad.make_dual"),
}
_FUNC_ORIGINALS = {key: getattr(*key) for key in _FUNC_PATCHES}

_PATCHES = {
    "Generator": _GeneratorFactory,
    "autocast": _Autocast,
    "tensor": _tensor,
    "as_tensor": _as_tensor,
    "asarray": _asarray,
}
_ORIGINALS = {name: getattr(torch, name) for name in _PATCHES}

_patch_depth = 0
_patch_lock = threading.Lock()


@contextlib.contextmanager
def _patched_torch():
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for name, replacement in _PATCHES.items():
                setattr(torch, name, replacement)
            _BackwardCFunction.apply = _checked_backward_apply
            for (module, name), replacement in _FUNC_PATCHES.items():
                setattr(module, name, replacement)
            torch.amp.autocast = _Autocast
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for name, original in _ORIGINALS.items():
                    setattr(torch, name, original)
                _BackwardCFunction.apply = _real_backward_apply
                for (module, name), original in _FUNC_ORIGINALS.items():
                    setattr(module, name, original)
                torch.amp.autocast = _RealAutocast


@contextlib.contextmanager
def virtual_device(strict_dtype: torch.dtype | None = None, allow_explicit_dtypes: bool = True):
    """Run the enclosed code with ``device="meta"`` meaning the virtual accelerator.

    Parameters
    ----------
    strict_dtype : torch.dtype or None
        If given, every floating tensor argument of an op on the virtual device must have
        this dtype (explicit casts and read-outs excepted).
    allow_explicit_dtypes : bool
        With ``strict_dtype``: let through virtual tensors whose other dtype was chosen
        explicitly (made by an op given ``dtype=``: ``torch.zeros(..., dtype=torch.float32)``,
        ``.float()``, ``.to(torch.float32)``, or computed only from such tensors), so that a
        deliberate float32 statistic is not reported.  False flags every off-dtype argument.

    Yields the dispatch mode (its ``options.strict_dtype`` is the setting).  Raises
    :class:`DevicePlacementError` at the first op CUDA would reject.
    """
    floating = isinstance(strict_dtype, torch.dtype) and strict_dtype.is_floating_point
    if strict_dtype is not None and not floating:
        raise TypeError(f"strict_dtype must be None or a floating torch.dtype, got {strict_dtype!r}")
    options = _Options(strict_dtype=strict_dtype, allow_explicit=allow_explicit_dtypes)
    with _options_lock:
        _options_stack.append(options)
    try:
        with _patched_torch(), _PythonLevelMode(), _VirtualDeviceMode(options) as mode:
            yield mode
    finally:
        with _options_lock:
            for i in range(len(_options_stack) - 1, -1, -1):
                if _options_stack[i] is options:
                    del _options_stack[i]
                    break

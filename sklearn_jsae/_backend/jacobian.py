"""The exact latent-to-latent Jacobian of a JSAE, restricted to each sample's active block.

For sample t with active input latents I_x(t) and active output latents I_y(t)::

    J_t = E_t · J_f(x_t) · D_t^T        (k_out, k_in)

where ``D_t = W_dec_x[I_x(t)]`` (k_in, d_in) are the input SAE's decoder rows,
``E_t = W_enc_y[I_y(t)]`` (k_out, d_out) the output SAE's encoder rows, and
``J_f(x_t)`` (d_out, d_in) the MLP's Jacobian at the TRUE input x_t.  The TopK /
ReLU derivative is taken as 1 on the active set and the index sets are
constants, so gradients reach ``W_dec_x`` and ``W_enc_y`` only.

Fast path (:func:`jacobian_blocks`) for maps with a closed form
(see :mod:`sklearn_jsae._backend.mlp`)::

    A = (W_dec_x[U_x] @ P_in)[inverse_x]            (B, k_in, r·d_mlp)
    C = (W_enc_y[U_y] @ P_out^T)[inverse_y]         (B, k_out, d_mlp)
    J = (C ⊙ w) @ A^T                               (B, k_out, k_in)

with U the latents active anywhere in the batch: the products are formed once
per distinct active latent, which is never more work than the authors' route
(all n latents) nor than the per-sample route (B·k rows).  Maps without a
closed form use k forward-mode JVPs.  Without autograd (inference) the
per-sample contraction runs a chunk of samples at a time in reused buffers
(:func:`_blocks_chunked`), so memory is O(B·k² + |U|·d_mlp).
:func:`jacobian_blocks_reference` is the plain per-sample autograd twin that the
tests pin the fast path to.

Training penalty (:func:`jacobian_penalty`): ``mean_t Σ_ab |J_t[a, b]|`` with a
hand-written backward.  Since ``∂|J|/∂J = sign(J)`` is known as soon as a chunk
of blocks is formed, the gradients with respect to the per-latent products
(``dA = sign(J)^T (C ⊙ w)``, ``dC = (sign(J) A) ⊙ w``) are accumulated chunk by
chunk during the forward pass into buffers of the size of the products, so no
(B, k, d_mlp) tensor ever exists beyond one chunk and nothing of that size is
kept for the backward pass.  :func:`jacobian_penalty_reference` is its plain
autograd twin (``jacobian_blocks(...).abs().sum((1, 2)).mean()``).  On the CPU the
chunks are spread over threads by :func:`sklearn_jsae._backend.chunks.run_chunks`.

Measured on the MiniLM-like training step (benchmarks/RESULTS.md): the fused
penalty replaced a plain autograd penalty that cost more than the authors' whole
route on a 2-core CPU, at a sixth of the authors' peak memory.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import torch

from .chunks import add_rows_, gather_rows, run_chunks
from .mlp import AffineMap, CallableMap

# Elements of one (chunk, k, width) intermediate of the fused penalty.  Small on the CPU,
# so that the chunk's gathers and products stay in cache and its buffers are reused; large
# on accelerators, where few big batched matmuls beat many small ones.
_CPU_CHUNK_ELEMENTS = 1 << 18
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def default_chunk_elements(device: torch.device) -> int:
    """Elements of one (chunk, k, width) intermediate for tensors on ``device``."""
    return _CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS


def _project_active(rows: torch.Tensor, indices: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``(rows[indices]) @ projection`` computed once per distinct index.

    rows (n, d), indices (B, k) int64, projection (d, m) -> (B, k, m).
    """
    unique, inverse = unique_inverse(indices, rows.shape[0])
    return gather_rows(rows[unique] @ projection, inverse)


def unique_inverse(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(indices, return_inverse=True)`` for indices in ``[0, n)``, without a sort.

    indices (B, k) int64 -> (unique (U,) sorted, inverse (B, k)).  O(n + B·k) with a
    presence mask; a parallel sort of B·k keys is the slowest op of a training step
    on a busy CPU.
    """
    present = torch.zeros(n, dtype=torch.bool, device=indices.device)
    present[indices.reshape(-1)] = True
    unique = present.nonzero().squeeze(1)
    position = torch.empty(n, dtype=indices.dtype, device=indices.device)
    position[unique] = torch.arange(unique.shape[0], dtype=indices.dtype, device=indices.device)
    return unique, position[indices]


def _unique_products(rows: torch.Tensor, indices: torch.Tensor, projection: torch.Tensor | None):
    """``rows[U] @ projection`` for the distinct indices U, and where each index sits in U.

    rows (n, d), indices (B, k), projection (d, m) or None (identity) ->
    (products (|U|, m), inverse (B, k) int64 into the products).
    """
    unique, inverse = unique_inverse(indices, rows.shape[0])
    active = rows[unique]
    return (active if projection is None else active @ projection), inverse


# torch keeps one stack of forward-mode AD levels per process, not per thread: two threads inside
# ``torch.func.jvp`` at once (a GridSearchCV under joblib's threading backend, a web server sharing
# one fitted model) pop each other's level ("no level exists", "invalid index"), which a fit then
# blamed on the user's MLP.  Every jvp of this package runs under this lock; closed-form MLPs never
# take it.  Reentrant, since a callable MLP may itself call into this package.
JVP_LOCK = threading.RLock()


def jvp(fn, primals, tangents):
    """``torch.func.jvp`` under :data:`JVP_LOCK` (see there)."""
    from torch.func import jvp as torch_jvp

    with JVP_LOCK:
        return torch_jvp(fn, primals, tangents)


# The message pattern of load_forward_ad's filter.  The regex comment makes it unlike any other
# filter's, so that adding it replaces no equal filter of the caller's and removing it removes
# that very entry.
_JIT_SCRIPT_DEPRECATED = r".*torch.jit.script.*deprecated(?#sklearn_jsae load_forward_ad)"


def _remove_filter(pattern: str) -> None:
    """Remove the filter whose message pattern is ``pattern`` from ``warnings.filters``, wherever the
    filters other threads added since have moved it, leaving every other entry in place."""
    entry = next((f for f in list(warnings.filters) if f[1] is not None and f[1].pattern == pattern), None)
    if entry is None:  # another thread's warnings.resetwarnings() took it already
        return
    with contextlib.suppress(ValueError):  # (one list operation: atomic for other threads)
        warnings.filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings calls after a change
    if mutated is not None:
        mutated()


@functools.lru_cache(maxsize=None)
def load_forward_ad() -> None:
    """Run torch's one-time set-up of forward-mode AD with its own DeprecationWarning silenced.

    The first ``torch.func.jvp`` of a process loads decompositions through ``torch.jit.script``,
    which warns that it is deprecated: under ``-W error::DeprecationWarning`` that import fails
    halfway, and the failure would be blamed on the user's MLP.  Call before any ``jvp``.
    """
    # One filter inserted and that entry removed after, not warnings.catch_warnings(): that swaps
    # the process-wide filter list and puts a copy back on exit, dropping the filters any other
    # thread installed meanwhile.
    with JVP_LOCK:
        warnings.filterwarnings("ignore", message=_JIT_SCRIPT_DEPRECATED, category=DeprecationWarning)
        try:
            zero = torch.zeros(1, dtype=torch.float32, device="cpu")
            jvp(torch.sin, (zero,), (torch.ones_like(zero),))
        finally:
            _remove_filter(_JIT_SCRIPT_DEPRECATED)


def _jvp_columns(mlp, x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """J_f(x_t) d for each of the k directions of each sample.

    x (B, d_in), directions (B, k, d_in) -> (B, k, d_out).  Differentiable in ``directions``.
    """
    load_forward_ad()
    columns = []
    for a in range(directions.shape[1]):
        _, tangent = jvp(mlp, (x,), (directions[:, a],))
        columns.append(tangent)
    return torch.stack(columns, dim=1)


def jacobian_blocks(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Active Jacobian blocks, fast path.

    Parameters
    ----------
    mlp : backend map (AffineMap, ElementwiseMLP, GatedMLP or CallableMap), d_in -> d_out.
    x : (B, d_in) true MLP inputs.
    W_dec_x : (n_in, d_in) input SAE decoder rows.
    indices_x : (B, k_in) active input latents.
    W_enc_y : (n_out, d_out) output SAE encoder rows.
    indices_y : (B, k_out) active output latents.
    chunk_elements : int or None
        Without autograd (inference), the per-sample products are formed a chunk of
        samples at a time in reused buffers holding about this many elements (None:
        :func:`default_chunk_elements`), so memory is O(B · k² + |U| · d_mlp).  With
        autograd the blocks are formed in one batched product.

    Returns
    -------
    J : (B, k_out, k_in), ``J[t, a, b] = ∂ s_y[indices_y[t, a]] / ∂ s_x[indices_x[t, b]]``.
    """
    differentiable = torch.is_grad_enabled() and (W_dec_x.requires_grad or W_enc_y.requires_grad)
    if isinstance(mlp, CallableMap) or not getattr(mlp, "has_closed_form", False):
        # gather_rows, not W[indices]: a backward that sums in the same order at every run
        columns = _jvp_columns(mlp, x, gather_rows(W_dec_x, indices_x))  # (B, k_in, d_out)
        return torch.bmm(gather_rows(W_enc_y, indices_y), columns.transpose(1, 2))
    if not differentiable:
        PA, inverse_x, PC, inverse_y, weights = _closed_form_factors(mlp, x, W_dec_x, indices_x, W_enc_y, indices_y)
        chunk = _chunk_samples(indices_x, indices_y, PA.shape[1], x.device, chunk_elements)
        return _blocks_chunked(PA, inverse_x, PC, inverse_y, weights, chunk)
    if isinstance(mlp, AffineMap):
        projection = torch.eye(mlp.d_in, dtype=x.dtype, device=x.device) if mlp.W is None else mlp.W
        A = _project_active(W_dec_x, indices_x, projection)  # (B, k_in, d_out)
        E = gather_rows(W_enc_y, indices_y)  # (B, k_out, d_out)
        return torch.bmm(E, A.transpose(1, 2))
    weights = mlp.local_weights(x)  # (B, r, d_mlp)
    batch, r, d_mlp = weights.shape
    A = _project_active(W_dec_x, indices_x, mlp.input_projection)  # (B, k_in, r·d_mlp)
    C = _project_active(W_enc_y, indices_y, mlp.output_projection.T)  # (B, k_out, d_mlp)
    if r == 1:
        weighted = C * weights
    else:
        weighted = (C.unsqueeze(2) * weights.unsqueeze(1)).reshape(batch, C.shape[1], r * d_mlp)
    return torch.bmm(weighted, A.transpose(1, 2))


def _closed_form_factors(mlp, x, W_dec_x, indices_x, W_enc_y, indices_y, weights=None):
    """Per-latent products, inverse indices and local weights of a closed-form map.

    Returns ``(PA (U_x, r·m), inverse_x (B, k_in), PC (U_y, m), inverse_y (B, k_out),
    weights (B, r, m) or None)`` with ``J_t = (PC[inverse_y[t]] ⊙ w_t) · PA[inverse_x[t]]^T``.
    """
    if isinstance(mlp, AffineMap):
        PA, inverse_x = _unique_products(W_dec_x, indices_x, mlp.W)
        PC, inverse_y = _unique_products(W_enc_y, indices_y, None)
        return PA, inverse_x, PC.to(PA.dtype), inverse_y, None
    if weights is None:
        weights = mlp.local_weights(x)
    PA, inverse_x = _unique_products(W_dec_x, indices_x, mlp.input_projection)
    PC, inverse_y = _unique_products(W_enc_y, indices_y, mlp.output_projection.T)
    # Under autocast the products may come out in lower precision: contract in PA's dtype.
    return PA, inverse_x, PC.to(PA.dtype), inverse_y, weights.detach().to(PA.dtype)


def _chunk_samples(indices_x, indices_y, width, device, chunk_elements=None) -> int:
    """Samples per chunk so that one (chunk, k, width) intermediate holds about ``chunk_elements``."""
    chunk_elements = chunk_elements or default_chunk_elements(device)
    k = max(indices_x.shape[1], indices_y.shape[1])
    return max(1, chunk_elements // (k * width))


def _weighted(C, w, r, out):
    """``C ⊙ w`` for one chunk: C (nb, k_out, m), w (nb, r, m) or None -> (nb, k_out, r·m)."""
    nb, k_out, m = C.shape
    if w is None:
        return C
    if r == 1:
        return torch.mul(C, w, out=out[:nb])
    Cw = torch.mul(C.unsqueeze(2), w.unsqueeze(1), out=out[:nb].view(nb, k_out, r, m))
    return Cw.view(nb, k_out, r * m)


@torch.no_grad()
def _blocks_chunked(PA, inverse_x, PC, inverse_y, weights, chunk) -> torch.Tensor:
    """All blocks ``J (B, k_out, k_in)`` formed ``chunk`` samples at a time in reused buffers."""
    batch, k_in = inverse_x.shape
    k_out = inverse_y.shape[1]
    width, m = PA.shape[1], PC.shape[1]
    r = width // m
    size = min(batch, chunk)
    J = PA.new_empty(batch, k_out, k_in)

    def make_state():
        return dict(a=PA.new_empty(size * k_in, width), c=PC.new_empty(size * k_out, m),
                    cw=PC.new_empty(size, k_out, width) if weights is not None else None)

    def work(st, start, stop):
        nb = stop - start
        A = torch.index_select(PA, 0, inverse_x[start:stop].reshape(-1), out=st["a"][: nb * k_in])
        C = torch.index_select(PC, 0, inverse_y[start:stop].reshape(-1), out=st["c"][: nb * k_out])
        w = None if weights is None else weights[start:stop]
        Cw = _weighted(C.view(nb, k_out, m), w, r, st["cw"])
        torch.bmm(Cw, A.view(nb, k_in, width).transpose(1, 2), out=J[start:stop])

    with torch.autocast(PA.device.type, enabled=False):
        run_chunks(batch, chunk, make_state, work, PA.device)
    return J


def jacobian_blocks_reference(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
) -> torch.Tensor:
    """Plain twin of :func:`jacobian_blocks`: full autograd Jacobian of ``mlp`` per sample.

    Same shapes and meaning; O(B · d_out · d_in) memory, for tests only.
    """
    from torch.func import jacrev

    blocks = []
    for t in range(x.shape[0]):
        J_f = jacrev(lambda row: mlp(row.unsqueeze(0)).squeeze(0))(x[t])  # (d_out, d_in)
        blocks.append(W_enc_y[indices_y[t]] @ J_f @ W_dec_x[indices_x[t]].T)
    return torch.stack(blocks)


class _AbsJacobianSum(torch.autograd.Function):
    """``mean_t Σ_ab |J_t[a, b]|`` from per-latent products, gradients formed in the forward pass.

    Inputs: ``PA`` (U_x, r·m) input-side products, ``inverse_x`` (B, k_in) rows of ``PA`` per
    sample, ``PC`` (U_y, m) output-side products, ``inverse_y`` (B, k_out), ``weights``
    (B, r, m) or None (all ones, r = 1), ``chunk`` samples per step.  The weights are
    constants (the paper's φ'), so no gradient flows to them.
    """

    @staticmethod
    def forward(ctx, PA, inverse_x, PC, inverse_y, weights, chunk):
        batch, k_in = inverse_x.shape
        k_out = inverse_y.shape[1]
        width, m = PA.shape[1], PC.shape[1]
        r = width // m
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        size = min(batch, chunk)
        # Low-precision operands (autocast): bmm in that precision, sums of gradients in float32.
        accumulate = torch.float32 if PA.dtype in (torch.float16, torch.bfloat16) else PA.dtype

        def make_state():  # one set of buffers per worker, reused by each of its chunks
            return dict(
                total=torch.zeros((), dtype=torch.float64, device=PA.device),
                grad_a=torch.zeros(PA.shape, dtype=accumulate, device=PA.device) if need_a else None,
                grad_c=torch.zeros(PC.shape, dtype=accumulate, device=PC.device) if need_c else None,
                a=PA.new_empty(size * k_in, width),
                c=PC.new_empty(size * k_out, m),
                cw=PC.new_empty(size, k_out, width) if weights is not None else None,
                j=PA.new_empty(size, k_out, k_in),
                grad=PA.new_empty(size * max(k_in, k_out) * width) if (need_a or need_c) else None,
            )

        def work(st, start, stop):
            nb = stop - start
            rows_a = inverse_x[start:stop].reshape(-1)
            rows_c = inverse_y[start:stop].reshape(-1)
            A = torch.index_select(PA, 0, rows_a, out=st["a"][: nb * k_in]).view(nb, k_in, width)
            C = torch.index_select(PC, 0, rows_c, out=st["c"][: nb * k_out]).view(nb, k_out, m)
            w = None if weights is None else weights[start:stop]  # (nb, r, m)
            Cw = _weighted(C, w, r, st["cw"])
            J = torch.bmm(Cw, A.transpose(1, 2), out=st["j"][:nb])  # (nb, k_out, k_in)
            st["total"] += J.abs().sum(dtype=torch.float64)
            sign = J.sign_()  # ∂|J|/∂J, 0 where J = 0 as in autograd
            if need_a:  # dA = sign^T (C ⊙ w)
                dA = torch.bmm(sign.transpose(1, 2), Cw, out=st["grad"][: nb * k_in * width].view(nb, k_in, width))
                add_rows_(st["grad_a"], rows_a, dA.view(nb * k_in, width).to(accumulate))
            if need_c:  # dC = (sign A) ⊙ w, summed over the r local-weight factors
                dCw = torch.bmm(sign, A, out=st["grad"][: nb * k_out * width].view(nb, k_out, width))
                if w is None:
                    dC = dCw
                elif r == 1:
                    dC = dCw.mul_(w)
                else:
                    dC = (dCw.view(nb, k_out, r, m) * w.unsqueeze(1)).sum(2)
                add_rows_(st["grad_c"], rows_c, dC.reshape(nb * k_out, m).to(accumulate))

        with torch.autocast(PA.device.type, enabled=False):
            accumulators = (PA.numel() if need_a else 0) + (PC.numel() if need_c else 0)
            states = run_chunks(batch, chunk, make_state, work, PA.device,
                                state_bytes=accumulators * torch.empty((), dtype=accumulate).element_size())
        total, grad_a, grad_c = states[0]["total"], states[0]["grad_a"], states[0]["grad_c"]
        for st in states[1:]:  # fixed order: deterministic
            total += st["total"]
            if need_a:
                grad_a += st["grad_a"]
            if need_c:
                grad_c += st["grad_c"]
        ctx.batch = batch
        ctx.dtypes = (PA.dtype, PC.dtype)
        ctx.save_for_backward(grad_a, grad_c)
        # At least float32: under bf16 autocast the value (a loss term, history_'s jacobian_l1 and
        # the backward's scale) would otherwise be rounded to 3 significant digits.
        return (total / batch).to(torch.promote_types(PA.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_a, grad_c = ctx.saved_tensors
        scale = grad_output / ctx.batch
        return (
            None if grad_a is None else (grad_a * scale).to(ctx.dtypes[0]),
            None,
            None if grad_c is None else (grad_c * scale).to(ctx.dtypes[1]),
            None,
            None,
            None,
        )


def jacobian_penalty(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The training penalty ``mean_t Σ_ab |J_t[a, b]|``, fused and chunked.

    Equal to :func:`jacobian_penalty_reference` (its plain twin) in value and in its
    gradients with respect to ``W_dec_x`` and ``W_enc_y``; the MLP factors are
    constants.  The per-latent products (one per distinct active latent) stay in
    autograd; everything per sample is formed ``chunk`` samples at a time, and the
    gradient of ``|J|`` with respect to those products is accumulated in the forward
    pass, so memory is O(W · (|U| · d_mlp + chunk · k · d_mlp)) instead of O(B · k · d_mlp),
    with W the CPU worker threads (one on CUDA), as many as the thread count and
    :func:`~sklearn_jsae._backend.chunks.worker_state_budget` allow.  Maps without a closed form fall back to the plain route.

    Parameters
    ----------
    mlp : backend map (AffineMap, ElementwiseMLP, GatedMLP or CallableMap), d_in -> d_out.
    x : (B, d_in) true MLP inputs.
    W_dec_x : (n_in, d_in) input SAE decoder rows.
    indices_x : (B, k_in) active input latents.
    W_enc_y : (n_out, d_out) output SAE encoder rows.
    indices_y : (B, k_out) active output latents.
    weights : (B, r, d_mlp) or None
        ``mlp.local_weights(x)`` if already computed (see :func:`map_and_local_weights`);
        None computes it.
    chunk_elements : int or None
        Bound on the elements of one (chunk, k, width) intermediate; None picks
        :func:`default_chunk_elements` for the device.

    Returns
    -------
    penalty : () scalar tensor, differentiable in ``W_dec_x`` and ``W_enc_y``
        (not twice differentiable).
    """
    if isinstance(mlp, CallableMap) or not getattr(mlp, "has_closed_form", False):
        return jacobian_penalty_reference(mlp, x, W_dec_x, indices_x, W_enc_y, indices_y)
    PA, inverse_x, PC, inverse_y, weights = _closed_form_factors(
        mlp, x, W_dec_x, indices_x, W_enc_y, indices_y, weights
    )
    chunk = _chunk_samples(indices_x, indices_y, PA.shape[1], x.device, chunk_elements)
    return _AbsJacobianSum.apply(PA, inverse_x, PC, inverse_y, weights, chunk)


def jacobian_penalty_reference(
    mlp,
    x: torch.Tensor,
    W_dec_x: torch.Tensor,
    indices_x: torch.Tensor,
    W_enc_y: torch.Tensor,
    indices_y: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Plain twin of :func:`jacobian_penalty`: ``jacobian_blocks(...).abs().sum((1, 2)).mean()``.

    Same arguments (``weights`` and ``chunk_elements`` are ignored); plain autograd,
    O(B · k · d_mlp) memory.  Returns a () scalar tensor.
    """
    J = jacobian_blocks(mlp, x, W_dec_x, indices_x, W_enc_y, indices_y)
    return J.abs().sum(dim=(1, 2)).mean()


# Matrix products of fewer rows than this take BLAS's small-matrix kernels, which round each row
# differently from the same row inside a larger product (up to 1.4e-6 on 1-3 rows of d = 16); see
# map_and_local_weights.
_MIN_PRODUCT_ROWS = 8


def map_and_local_weights(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mlp(x), mlp.local_weights(x))`` sharing one pass through the hidden layer.

    x (B, d_in) -> y (B, d_out), weights (B, r, d_mlp) or None for maps without
    local weights (affine maps and callables).  No gradient.

    A closed-form map computes fewer than :data:`_MIN_PRODUCT_ROWS` rows padded with zero rows to
    that many: the training step computes each minibatch here and the ``memory`` cache computes
    4,096-row chunks, and a short last batch or chunk would otherwise round its rows differently
    from the other route, breaking "the cached fit is the uncached one, bit for bit".
    """
    from .mlp import ElementwiseMLP, GatedMLP, activation, activation_derivative

    n = x.shape[0]
    if 0 < n < _MIN_PRODUCT_ROWS and getattr(mlp, "has_closed_form", False):
        padded = torch.cat([x, x.new_zeros((_MIN_PRODUCT_ROWS - n, *x.shape[1:]))])
        y, weights = map_and_local_weights(mlp, padded)
        return y[:n], None if weights is None else weights[:n]
    with torch.no_grad():
        if isinstance(mlp, ElementwiseMLP):
            z = mlp.pre_activation(x)
            y = activation(mlp.activation, z) @ mlp.W_out
            y = y if mlp.b_out is None else y + mlp.b_out
            return y, activation_derivative(mlp.activation, z).unsqueeze(1)
        if isinstance(mlp, GatedMLP):
            g, u = mlp._gate_up(x)
            act = activation(mlp.activation, g)
            y = (act * u) @ mlp.W_down
            y = y if mlp.b_down is None else y + mlp.b_down
            return y, torch.stack([activation_derivative(mlp.activation, g) * u, act], dim=1)
        return mlp(x), None

"""Data-parallel training over ``torch.distributed``: W ranks, one model, each batch split between them.

Every rank holds the same SAE parameters and optimiser state.  At each step the ranks agree on a
global batch of ``N`` rows (for an array: the rows a one-process fit uses at that step, in the
same order, from the shared shuffling generator); rank ``r`` trains on its contiguous share of
``n_r`` rows (:meth:`DataParallel.split`) and back-propagates its mean loss scaled by
``n_r / N``.  Summing over ranks gives::

    g = Σ_r (n_r / N) · ∇ mean_{t ∈ rows_r} L_t = ∇ mean_{t ∈ batch} L_t

the gradient of the one-process step, because every loss term is a mean over rows (MSE, the
Jacobian penalty); AuxK's denominator, the residual's mean square, is all-reduced the same way
before it divides (:func:`~sklearn_jsae._backend.step.side_losses`).  The same all-reduce carries
the loss terms (weighted the same way: history and the finiteness checks see global values) and
which latents fired anywhere (the dead-latent counters advance by ``N`` on every rank).  Every
rank then clips, steps Adam and renormalises the decoder rows on identical numbers, so the
parameters stay identical on every rank without being broadcast.

A rank with no rows in a step (the last batch of an epoch can hold fewer rows than there are
ranks; a stream that ran dry) runs its forward and backward pass on one row with weight 0, so
that every rank issues the same collectives in the same order.

How the gradients are all-reduced (``sync``), both timed by ``benchmarks/scaling_out.py``:

* ``"allreduce"`` (default): one all-reduce of a flat buffer holding every gradient, the loss
  terms and the fired latents, after the backward pass;
* ``"ddp"``: :class:`torch.nn.parallel.DistributedDataParallel` over a module holding the SAE
  tensors (bucketed all-reduces overlapping the backward pass; it averages over ranks, so the
  loss is scaled by ``W · n_r / N``), plus one small all-reduce of the terms and fired latents.

Agreement with a one-process fit: the sums run in another order (each rank's matmuls reduce
over its rows, then the all-reduce adds the ranks), so float32 results differ by rounding
(about 1e-7 relative per step), which Adam and the TopK selection carry on; see
``tests/test_distributed.py`` for the measured gap and the tolerance.

Failures: every collective runs under the process group's timeout.  One that fails (a rank died:
its connection resets; a rank hangs: the timeout expires) raises
:class:`~sklearn_jsae.distributed.DistributedTrainingError` naming the rank, the step and what
to do, after destroying the process group (a group whose collective failed cannot be used
again, and a gloo group left alive aborts the process at exit).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from ..distributed import DistributedTrainingError

DEFAULT_TIMEOUT = 600.0  # seconds; longer than rank 0 takes to write a paper-scale checkpoint
SYNC_MODES = ("allreduce", "ddp")
# What ``DataParallel.join`` uses: the faster of the two on the measurements in
# benchmarks/RESULTS.md ("Data-parallel training").  The benchmark and the tests set it to time
# and check the other.
SYNC = "allreduce"
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The timeout the default group was created with here (torch does not expose it), for messages
# and the monitored barrier; absent when the caller created the group with torch directly.
_GROUP_TIMEOUT: dict = {}


def launched_by_torchrun() -> bool:
    """Whether the environment names this process's place in a job (torchrun sets these)."""
    return all(name in os.environ for name in _LAUNCH_VARIABLES)


def backend_for(device: str) -> str:
    """``"nccl"`` for a CUDA training device, ``"gloo"`` otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_default_group(backend: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                       device: str = "cpu", caller: str = "estimator") -> None:
    """Initialise the default process group from torchrun's environment (``env://``).

    ``backend`` None picks it from ``device`` (:func:`backend_for`); with NCCL the rank's CUDA
    device (``device``) becomes the current one, as NCCL requires.  A no-op if it is initialised.
    ``caller`` words the error outside torchrun: ``"estimator"`` (``distributed=True``) or
    ``"init_process_group"`` (the public helper, whose user cannot be told to call it first).
    """
    if not dist.is_available():
        raise DistributedTrainingError("this torch build has no torch.distributed; install a build with it.")
    if dist.is_initialized():
        return
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing and caller == "init_process_group":
        raise ValueError(
            f"init_process_group(): this process was not started by torchrun ({', '.join(missing)} not "
            f"set), so there is no job to join. Launch the script with `torchrun --nproc-per-node N "
            f"script.py`, or set {', '.join(_LAUNCH_VARIABLES)} in the environment (env://) before "
            f"calling it."
        )
    if missing:
        raise ValueError(
            f"distributed=True, but this process was not started by torchrun ({', '.join(missing)} not "
            f"set) and no process group is initialised. Launch it with `torchrun --nproc-per-node N "
            f"script.py`, call sklearn_jsae.distributed.init_process_group() first, or pass "
            f"distributed=False."
        )
    backend = backend or backend_for(device)
    if backend == "nccl" and str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=float(timeout)))
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    _GROUP_TIMEOUT.clear()
    if timeout is not None:
        _GROUP_TIMEOUT[id(dist.group.WORLD)] = float(timeout)


def rank_device(requested: str, resolved: str) -> str:
    """The training device of this rank: ``"auto"`` and ``"cuda"`` mean ``cuda:LOCAL_RANK`` (one GPU
    per process, as torchrun starts them) when CUDA is there; anything else stays as resolved."""
    if requested in ("auto", "cuda") and resolved.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(
                f"device={requested!r} with distributed=True gives local rank {local} the GPU "
                f"cuda:{local}, but this machine has {count}; start at most {count} processes per machine "
                f"(torchrun --nproc-per-node {count}) or pass device='cpu'."
            )
        return f"cuda:{local}"
    return resolved


def _summary(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class DataParallel:
    """This process's place in a data-parallel job, and the collectives a fit needs.

    Parameters
    ----------
    device : str
        The rank's training device (collectives run on it: NCCL needs CUDA tensors).
    sync : {"allreduce", "ddp"}
        How gradients are all-reduced (module docstring).
    timeout : float or None
        The process group's timeout in seconds, for error messages (None: unknown).
    """

    def __init__(self, device: str = "cpu", sync: str = "allreduce", timeout: float | None = None):
        if sync not in SYNC_MODES:
            raise ValueError(f"sync={sync!r} must be one of {SYNC_MODES}.")
        if not dist.is_initialized():
            raise DistributedTrainingError("no process group is initialised: call init_default_group first.")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.sync = sync
        self.timeout = timeout
        self.backend = dist.get_backend()
        self.module = None  # the DDP-wrapped step module (sync="ddp"), set by attach
        self.step_index = None  # the optimiser step in progress, for error messages

    @classmethod
    def join(cls, device: str, timeout: float | None = DEFAULT_TIMEOUT,
             sync: str | None = None) -> "DataParallel":
        """Join the job (initialising the default group from torchrun's environment if needed)
        and wait until every rank is there.  ``sync`` None is :data:`SYNC`."""
        init_default_group(None, timeout, device)
        parallel = cls(device, sync or SYNC, _GROUP_TIMEOUT.get(id(dist.group.WORLD)))
        parallel.barrier("joining the job")
        return parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- splitting the data ---------------------------------------------------------
    def split(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``(lo, hi)``: the contiguous share of rows ``[lo, hi)`` of ``n`` that ``rank`` (default:
        this one) trains on; shares differ by at most one row and cover ``[0, n)`` exactly."""
        rank = self.rank if rank is None else rank
        return n * rank // self.world_size, n * (rank + 1) // self.world_size

    def local_rows(self, index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's rows of the global batch ``index`` (N,) and how many are real: an empty share
        is replaced by the batch's first row, with 0 real rows (weight 0, see the module docstring)."""
        lo, hi = self.split(len(index))
        if hi > lo:
            return index[lo:hi], hi - lo
        return index[:1], 0

    # ---- collectives ----------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> DistributedTrainingError:
        self.shutdown()
        where = f" at optimiser step {self.step_index}" if self.step_index is not None else ""
        timeout = f"timeout={self.timeout:g} s" if self.timeout is not None else "the process group's timeout"
        return DistributedTrainingError(
            f"rank {self.rank} of {self.world_size}: {what}{where} failed ({_summary(exc)}). Another rank "
            f"stopped (killed, out of memory, or raised an error: see its log) or did not reach this point "
            f"within {timeout}. The job cannot continue: restart it with the same number of ranks "
            f"({self.world_size}) and the same checkpoint_dir to resume from the last checkpoint.",
            rank=self.rank, world_size=self.world_size, step=self.step_index,
        )

    @contextlib.contextmanager
    def collective(self, what: str):
        """Turn a failing collective (gloo and NCCL raise RuntimeError subclasses: a reset
        connection, a timeout) into :class:`DistributedTrainingError`."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, DistributedTrainingError):
                raise
            raise self._failed(what, exc) from exc

    def shutdown(self) -> None:
        """Destroy the default process group (after a failure; a no-op when there is none)."""
        with contextlib.suppress(RuntimeError, ValueError, AssertionError):
            if dist.is_initialized():
                dist.destroy_process_group()

    def all_reduce(self, tensor: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        with self.collective(what):
            dist.all_reduce(tensor, op=op)
        return tensor

    def barrier(self, what: str) -> None:
        """A barrier with the process group's timeout; on gloo a monitored one, whose error names
        the ranks that did not arrive."""
        with self.collective(what):
            if self.backend == "gloo" and self.timeout is not None:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=self.timeout), wait_all_ranks=True)
            else:
                dist.barrier()

    def broadcast_int(self, value: int, what: str) -> int:
        """Rank 0's ``value`` on every rank (a seed drawn from ``random_state=None``)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        with self.collective(what):
            dist.broadcast(t, src=0)
        return int(t.item())

    def gather_counts(self, n: int, what: str) -> list[int]:
        """Every rank's ``n``, in rank order."""
        t = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        t[self.rank] = int(n)
        return [int(v) for v in self.all_reduce(t, what).tolist()]

    def gather_digests(self, digest: str, what: str) -> list[str]:
        """Every rank's hex ``digest``, in rank order, on every rank: its first 15 hex digits (60
        bits) travel as an int64 in :meth:`gather_counts`' all-reduce (no pickling, NCCL too)."""
        return [f"{value:015x}" for value in self.gather_counts(int(digest[:15], 16), what)]

    def gather_object(self, obj, what: str) -> list | None:
        """Every rank's picklable ``obj`` on rank 0, in rank order (None on the others).  The objects
        travel between the job's own processes and are never written to disk as pickles."""
        gathered = [None] * self.world_size if self.is_main else None
        with self.collective(what):
            dist.gather_object(obj, gathered, dst=0)
        return gathered

    def check_same(self, values: dict, what: str, fixes: dict | None = None, labels: dict | None = None) -> None:
        """Raise unless every rank passes the same ``values`` (JSON-able), e.g. data fingerprints.

        Compares a 60-bit hash of each value's ``repr`` by one all-reduce of their minima and
        maxima, so that the error names the values that differ (every rank passes the same keys):
        by their ``labels`` (default: the key), with ``fixes[key]``, what to do, after.  ``what``
        names them all, for a failing collective."""
        names = sorted(values)
        digests = [int(hashlib.sha256(repr(values[name]).encode()).hexdigest()[:15], 16) for name in names]
        t = torch.tensor(digests + [-d for d in digests], dtype=torch.int64, device=self.device)
        self.all_reduce(t, f"checking {what}", op=dist.ReduceOp.MIN)
        n = len(names)
        differ = [name for i, name in enumerate(names) if int(t[i]) != -int(t[n + i])]
        if differ:
            labels, fixes = labels or {}, fixes or {}
            advice = "".join(f" {fixes[name]}" for name in differ if name in fixes)
            held = {name: values[name] for name in differ}
            raise ValueError(
                f"distributed=True: the ranks of this job were given different "
                f"{', '.join(labels.get(name, name) for name in differ)} (rank {self.rank} has {held}). "
                f"Every rank must call fit with the same X, mlp and settings (the same memmap, say): each "
                f"rank reads only its share of every batch.{advice}"
            )

    def agree(self, value: int, what: str) -> tuple[int, int]:
        """``(min, max)`` of ``value`` over the ranks."""
        t = torch.tensor([int(value), -int(value)], dtype=torch.int64, device=self.device)
        self.all_reduce(t, what, op=dist.ReduceOp.MIN)
        return int(t[0]), -int(t[1])

    def merge_statistics(self, mean: torch.Tensor, squared_deviations: torch.Tensor, n: int):
        """The union's float64 ``(mean, Σ (v - mean)², n)`` from every rank's own, as
        :func:`~sklearn_jsae._backend.train.data_statistics` measures them: Chan et al.'s merge,
        ``M2 = Σ_r M2_r + n_r (mean_r - mean)²``, in two all-reduces (the mean first), with no
        cancellation of large sums (all-reducing ``Σ v`` and ``Σ v²`` had it)."""
        d = mean.shape[0]
        weighted = torch.cat([mean * n, mean.new_tensor([float(n)])]).to(self.device, torch.float64)
        self.all_reduce(weighted, "the data statistics all-reduce")
        union_n = int(round(float(weighted[-1])))
        union_mean = (weighted[:d] / union_n).to(mean.device)
        spread = (squared_deviations + n * (mean - union_mean) ** 2).to(self.device, torch.float64)
        self.all_reduce(spread, "the data statistics all-reduce")
        return union_mean, spread.to(mean.device), union_n

    # ---- the training step ----------------------------------------------------------
    def attach(self, trainer) -> None:
        """Make the trainer's SAE tensors ``nn.Parameter`` objects (before the optimiser is built on
        them) and, for ``sync="ddp"``, wrap them in DistributedDataParallel."""
        for side in trainer.sides:
            for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
                setattr(side, field, torch.nn.Parameter(getattr(side, field).detach(), requires_grad=True))
        if self.sync == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            module = _StepModule(trainer)
            device_ids = [self.device] if self.device.type == "cuda" else None
            with self.collective("wrapping the SAEs in DistributedDataParallel"):
                self.module = DistributedDataParallel(module, device_ids=device_ids)

    def forward(self, trainer, x, **kwargs):
        """The step's losses, through DDP's forward when ``sync="ddp"`` (it must see the forward
        pass to reduce the gradients of the backward one)."""
        from .step import jsae_step_losses

        if self.module is not None:
            return self.module(x, **kwargs)
        return jsae_step_losses(trainer.side_x, trainer.side_y, trainer.normalised_map, x, trainer.config.k,
                                **kwargs)

    def mean_square(self, share: tuple[int, int]):
        """AuxK's residual mean square over every rank's rows: ``Σ_r (n_r / N) · ms_r``."""
        weight = share[0] / share[1]

        def reduce(local: torch.Tensor) -> torch.Tensor:
            t = (local.detach().float() * weight).reshape(1).clone()
            return self.all_reduce(t, "the AuxK all-reduce")[0].to(local.dtype)

        return reduce

    def optimiser_step(self, trainer, loss, terms: dict, fired, share: tuple[int, int], check):
        """Backward, all-reduce, clip, Adam, renormalise: the data-parallel twin of
        :func:`~sklearn_jsae._backend.step.optimiser_step`.

        loss : () tensor, this rank's mean loss over its ``share[0]`` real rows of ``share[1]``.
        terms : dict of () tensors; fired : list of ``(indices, values)`` (n_r, k) per SAE.
        check : callable ``values -> values`` raising on non-finite or diverged global values
            (with this rank's rows for the details).
        Returns ``(values, hits, norms)``: the global loss terms (floats), per SAE an (n,) bool
        tensor of the latents that fired on any rank, and the gradient norms before clipping.
        """
        from .step import optimiser_step

        n_real, n_global = share
        weight = n_real / n_global
        names = list(terms)
        local = torch.stack([loss.detach()] + [terms[name].detach() for name in names]).float() * weight
        hits = []
        for i, (idx, val) in enumerate(fired):
            hit = torch.zeros_like(trainer.since_fired[i], dtype=torch.float32)
            if n_real > 0:
                hit[idx[val > 0]] = 1.0
            hits.append(hit)
        extras = torch.cat([local] + hits)
        reduced = {}

        def synchronise():
            if self.module is None:
                params = trainer.tensors
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([g.reshape(-1) for g in grads] + [extras.to(grads[0].dtype)])
                self.all_reduce(flat, "the gradient all-reduce")
                offset = 0
                for p in params:
                    p.grad = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                reduced["extras"] = flat[offset:].float()
            else:  # DDP reduced the gradients during backward
                reduced["extras"] = self.all_reduce(extras.clone(), "the loss-term all-reduce")
            totals = reduced["extras"][: len(names) + 1].tolist()
            reduced["values"] = check(dict(zip(["loss"] + names, totals)))

        # DDP averages over the W ranks; the explicit all-reduce sums.
        scale = weight * self.world_size if self.module is not None else weight
        norms = optimiser_step(loss * scale, trainer.optimiser, trainer.sides, trainer.config.max_grad_norm,
                               synchronise=synchronise)
        counts = reduced["extras"][len(names) + 1 :]
        out, offset = [], 0
        for hit in hits:
            out.append(counts[offset : offset + hit.numel()] > 0.5)
            offset += hit.numel()
        return reduced["values"], out, norms


class _StepModule(torch.nn.Module):
    """The SAE tensors as parameters and the step's forward pass: what DDP wraps."""

    def __init__(self, trainer):
        super().__init__()
        self._trainer = (trainer,)  # a tuple: not registered as a submodule
        self.params = torch.nn.ParameterList([t for side in trainer.sides for t in side.tensors()])

    def forward(self, x, **kwargs):
        from .step import jsae_step_losses

        trainer = self._trainer[0]
        return jsae_step_losses(trainer.side_x, trainer.side_y, trainer.normalised_map, x, trainer.config.k,
                                **kwargs)

"""Data-parallel training on ``torch.distributed``: one JSAE, several processes, one model.

Start the same script on every rank with ``torchrun`` and pass ``distributed=True``::

    torchrun --nproc-per-node 4 train.py            # one machine, 4 GPUs (NCCL) or 4 CPU processes (gloo)

    # train.py
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.distributed import is_main_process

    X = np.load("store/X.npy", mmap_mode="r")       # the same store on every rank
    jsae = JacobianSparseAutoencoder(mlp, distributed=True, random_state=0,
                                     checkpoint_dir="run/checkpoint").fit(X)
    if is_main_process():
        jsae.save("run/model.safetensors")

Each step's batch (the one a one-process fit with the same ``batch_size`` and seed takes) is
split between the ranks; each reads only its share, the gradients are all-reduced, and every rank
ends with the same model, which agrees with the one-process fit up to float rounding.  Only rank
0 writes checkpoints; a job restarted with the same number of ranks resumes from them.  A rank
that dies or hangs makes the others stop with :class:`DistributedTrainingError` instead of
waiting forever.  The User Guide's "Scaling out" page has the commands (several machines, NCCL,
``python -m sklearn_jsae train`` under torchrun) and the Dask set-up for ``l1`` sweeps.

This module imports torch only inside its functions.
"""

from __future__ import annotations

__all__ = ["DistributedTrainingError", "init_process_group", "is_main_process"]

# The longest timeout accepted, in seconds (about 3 years): "never time out" in practice.  torch
# converts the timeout to a ``datetime.timedelta``, which overflows (a bare OverflowError from
# inside init_process_group) from about 1e14 s, and ``inf`` does not convert at all.
MAX_TIMEOUT = 1e8


class DistributedTrainingError(RuntimeError):
    """A data-parallel fit stopped because a collective operation failed.

    Raised on the ranks that survive when another rank died (its connection reset), hung past the
    process group's timeout, or raised an error of its own.  The message names this rank, the
    optimiser step and how to resume (restart the job with the same number of ranks and the
    same ``checkpoint_dir``).  Attributes ``rank``, ``world_size`` and ``step`` (None outside a
    step) repeat the message's facts for programs.  The process group is destroyed before this
    is raised: it cannot be used again.
    """

    def __init__(self, message: str, *, rank: int | None = None, world_size: int | None = None,
                 step: int | None = None):
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size
        self.step = step


def init_process_group(backend=None, timeout=600.0, device="auto"):
    """Join the job ``torchrun`` started, with a timeout on every collective.

    ``JacobianSparseAutoencoder(distributed=True)`` calls this itself with the defaults when no
    process group exists; call it first to choose the backend or the timeout.  Reads torchrun's
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``env://``).  A no-op
    (returning the existing group's rank and size) when a process group is already initialised.

    Parameters
    ----------
    backend : {"nccl", "gloo"} or None, default=None
        None picks NCCL when ``device`` resolves to CUDA, else gloo.
    timeout : float, default=600.0
        Seconds a collective may wait for the other ranks before every rank stops with
        :class:`DistributedTrainingError`.  It must exceed the longest pause of any rank between
        two steps: rank 0 writing a checkpoint, a stream filling its shuffle buffer.  At most
        ``1e8`` (about 3 years; ``inf`` is refused).
    device : {"auto", "cpu", "cuda", "cuda:N"}, default="auto"
        The training device, as the estimator's ``device``: ``"auto"`` and ``"cuda"`` mean
        ``cuda:LOCAL_RANK`` (one GPU per process) when CUDA is there.  With NCCL it becomes the
        current CUDA device.

    Returns
    -------
    rank, world_size : int
    """
    import torch.distributed as dist

    from ._backend.distributed import init_default_group, rank_device
    from ._validation import resolve_device

    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds.")
    if not timeout <= MAX_TIMEOUT:  # inf and 1e15 overflowed torch's timedelta with a bare OverflowError
        raise ValueError(f"timeout={timeout!r} must be a finite number of seconds, at most {MAX_TIMEOUT:g} "
                         f"(about 3 years): pass that for a job that should wait as long as it takes.")
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend={backend!r} must be 'nccl', 'gloo' or None.")
    init_default_group(backend, timeout, rank_device(device, resolve_device(device)), caller="init_process_group")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 of a data-parallel job, and in a process that belongs to no job: the process
    that writes files (the fitted model, summaries) once for the whole job."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

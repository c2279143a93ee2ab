"""Scaling out: data-parallel fits on torch.distributed and ``l1`` sweeps on Dask, timed.

Three measurements, on a synthetic GELU MLP (``make_synthetic_mlp``):

1. **Gradient all-reduce**: the same 2-rank fit with the explicit flat all-reduce and with
   DistributedDataParallel; median wall and CPU seconds per optimiser step (after the first 3
   steps), and the explicit path's all-reduce seconds per step.
2. **2 ranks vs 1**: wall time of the 2-rank fit (one thread per rank) against one process on
   one thread and on as many threads as ranks, and the largest difference between the 2-rank
   and the one-process weights (the same global batch and data order).  The configurations
   alternate over ``--repeats`` so that a change in machine load hits all of them.
3. **Sweep**: ``GridSearchCV`` over ``l1`` serially (one thread) and on a
   ``dask.distributed.LocalCluster`` (2 workers of one thread) through ``joblib``'s Dask backend;
   wall times and whether ``cv_results_`` agree exactly.

Each torch.distributed run is ``torchrun --standalone --nproc-per-node N`` of this file.  On a
CUDA machine, ``--device cuda --ranks 1`` runs the 1-GPU case (NCCL) against a one-process fit on
the same GPU (``benchmarks/gpu.sh`` does)::

    python benchmarks/scaling_out.py --out benchmarks/results/scaling_out.json
    python benchmarks/scaling_out.py --device cuda --ranks 1 --skip-sweep --out $OUT/gpu_scaling_out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.abspath(__file__)


def _data(args):
    from sklearn_jsae.datasets import make_synthetic_mlp

    with torch.random.fork_rng():
        torch.manual_seed(0)
        X, mlp = make_synthetic_mlp(args.n_tokens, args.d, args.d_mlp, random_state=0)
    return X, mlp


def _estimator(args, mlp, **extra):
    from sklearn_jsae import JacobianSparseAutoencoder

    return JacobianSparseAutoencoder(mlp, n_components=args.n_components, k=args.k, max_iter=args.max_iter,
                                     batch_size=args.batch_size, l1=0.5, random_state=0, device=args.device,
                                     mixed_precision=False, **extra)


def _timed_steps():
    """Wrap ``Trainer.step`` to record each step's seconds (synchronised on CUDA)."""
    from sklearn_jsae._backend import trainer as trainer_module

    times, cpu = [], []
    real = trainer_module.Trainer.step

    def step(self, *a, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        out = real(self, *a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        return out

    trainer_module.Trainer.step = step
    return times, cpu


def _timed_all_reduce(backend):
    """Seconds of every all-reduce of a training step (the explicit path; DDP's run inside backward)."""
    seconds = []
    real = backend.DataParallel.all_reduce

    def all_reduce(self, tensor, what, *args, **kwargs):
        started = time.perf_counter()
        out = real(self, tensor, what, *args, **kwargs)
        if self.step_index is not None:
            seconds.append(time.perf_counter() - started)
        return out

    backend.DataParallel.all_reduce = all_reduce
    return seconds


def _weights(jsae):
    return {f"{p}_{n}": getattr(side, n) for p, side in (("x", jsae.input_sae_), ("y", jsae.output_sae_))
            for n in ("components_", "encoder_", "decoder_bias_")}


def job(args):
    """One rank (or the one process, ``--nproc 0``): fit and report times (and weights) from rank 0."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from sklearn_jsae._backend import distributed as backend
    from sklearn_jsae.distributed import init_process_group, is_main_process

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    torch.set_num_threads(args.threads)
    distributed = args.ranks > 0
    if distributed:
        backend.SYNC = args.sync
        init_process_group(device=args.device)
    X, mlp = _data(args)
    times, cpu = _timed_steps()
    communication = _timed_all_reduce(backend)
    started = time.perf_counter()
    jsae = _estimator(args, mlp, distributed=distributed).fit(X)
    wall = time.perf_counter() - started
    if is_main_process():
        np.savez(os.path.join(args.job, "weights.npz"), **_weights(jsae))
        with open(os.path.join(args.job, "times.json"), "w") as f:
            json.dump(dict(wall_s=wall, step_median_s=statistics.median(times[3:]), steps=len(times),
                           step_cpu_median_s=statistics.median(cpu[3:]),
                           all_reduce_s_per_step=sum(communication) / max(1, len(times))), f)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _run(args, nproc, threads, sync="allreduce"):
    """Run :func:`job` with ``nproc`` ranks (0: one plain process); returns (times, weights).

    The job's settings travel in the environment (``_JOB``): torchrun's own argument parser
    would take abbreviations of its options (``--d``, ``--nproc``) from the script's arguments."""
    with tempfile.TemporaryDirectory() as folder:
        settings = dict(vars(args), job=folder, ranks=nproc, threads=threads, sync=sync)
        launcher = [sys.executable]
        if nproc > 0:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), _JOB=json.dumps(settings))
        subprocess.run(launcher + [HERE], check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(folder, "times.json")) as f:
            times = json.load(f)
        weights = dict(np.load(os.path.join(folder, "weights.npz")))
    return times, weights


def _max_difference(a, b):
    return max(float(np.abs(a[key] - b[key]).max()) for key in a)


def _difference(a, b):
    """Largest and median absolute difference of two runs' weights, and the fraction of dictionary
    rows (of the 2-D arrays) that differ by more than 1e-5 anywhere."""
    diffs = {key: np.abs(a[key] - b[key]) for key in a}
    rows = [d.max(axis=1) > 1e-5 for d in diffs.values() if d.ndim == 2]
    return dict(max=float(max(d.max() for d in diffs.values())),
                median=float(np.median(np.concatenate([d.ravel() for d in diffs.values()]))),
                rows_differing_above_1e5=round(float(np.concatenate(rows).mean()), 4))


def sweep(args):
    """Serial and Dask GridSearchCV over l1: wall times and whether the scores agree exactly."""
    import joblib
    from distributed import Client, LocalCluster
    from sklearn.model_selection import GridSearchCV

    from sklearn_jsae.model_selection import make_scoring, sparsest_within_tolerance

    X, mlp = _data(args)
    X = X[: args.sweep_tokens]

    def search():
        return GridSearchCV(_estimator(args, mlp, n_tokens=None).set_params(max_iter=args.sweep_max_iter),
                            {"l1": args.l1}, cv=2, scoring=make_scoring(threshold=0.01),
                            refit=sparsest_within_tolerance(tolerance=0.05))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        serial = search().fit(X)
        serial_s = time.perf_counter() - started
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("sklearn_jsae").JacobianSparseAutoencoder)  # imports, off the clock
            started = time.perf_counter()
            with joblib.parallel_backend("dask"):
                on_dask = search().fit(X)
            dask_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    keys = [key for key in serial.cv_results_ if key.startswith(("split", "mean_test_"))]
    same = all(np.array_equal(serial.cv_results_[key], on_dask.cv_results_[key]) for key in keys)
    return dict(candidates=len(args.l1), folds=2, fits=2 * len(args.l1) + 1, tokens=int(X.shape[0]),
                max_iter=args.sweep_max_iter, serial_s=round(serial_s, 2), dask_2_workers_s=round(dask_s, 2),
                speed_up=round(serial_s / dask_s, 2), cv_results_identical=bool(same))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel runs")
    parser.add_argument("--n-tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--d-mlp", type=int, default=256)
    parser.add_argument("--n-components", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-iter", type=int, default=3)
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.1, 0.5, 2.0, 5.0])
    parser.add_argument("--sweep-tokens", type=int, default=8192)
    parser.add_argument("--sweep-max-iter", type=int, default=5)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    if "_JOB" in os.environ:  # one rank of a run started by _run
        return job(argparse.Namespace(**json.loads(os.environ["_JOB"])))
    args = parser.parse_args()
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # short fits, on purpose
    cuda = args.device.startswith("cuda")
    result = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     load_average=os.getloadavg()[0],
                     gpu=torch.cuda.get_device_name(0) if cuda else None),
        config=dict(n_tokens=args.n_tokens, d=args.d, d_mlp=args.d_mlp, n_components=args.n_components,
                    k=args.k, batch_size=args.batch_size, max_iter=args.max_iter, device=args.device,
                    ranks=args.ranks, repeats=args.repeats),
    )
    # One thread per rank on the CPU (torchrun's default); a GPU rank needs few CPU threads.
    rank_threads = 1 if not cuda else max(1, (os.cpu_count() or 1) // max(1, args.ranks))
    # name -> (ranks, threads, sync); the runs alternate over the repeats, so that a change in
    # the machine's load hits every configuration.
    configs = {"allreduce": (args.ranks, rank_threads, "allreduce"), "ddp": (args.ranks, rank_threads, "ddp"),
               "one_process_1_thread": (0, 1, "allreduce")}
    if not cuda and args.ranks > 1:
        configs[f"one_process_{args.ranks}_threads"] = (0, args.ranks, "allreduce")
    runs = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, (ranks, threads, sync) in configs.items():
            runs[name].append(_run(args, ranks, threads, sync))
            print(f"repeat {repeat}, {name}: {runs[name][-1][0]}", flush=True)

    def summary(name):
        times = [t for t, _ in runs[name]]
        out = dict(wall_s=[round(t["wall_s"], 2) for t in times],
                   step_median_ms=[round(1e3 * t["step_median_s"], 2) for t in times],
                   # CPU seconds of one process (rank 0) per step: the work a rank does, whatever
                   # share of a core the machine's other jobs leave it.
                   step_cpu_median_ms=[round(1e3 * t["step_cpu_median_s"], 2) for t in times],
                   steps=times[0]["steps"])
        if configs[name][0] > 0 and configs[name][2] == "allreduce":
            out["all_reduce_ms_per_step"] = [round(1e3 * t["all_reduce_s_per_step"], 2) for t in times]
        return out

    result["runs"] = {name: summary(name) for name in configs}
    reference = runs["one_process_1_thread"][0][1]
    # Against the one-process fit on one thread; the same fit on more threads shows the size of a
    # difference that float rounding alone makes (its sums too run in another order).
    result["agreement"] = dict(
        max_abs_weight=max(float(np.abs(v).max()) for v in reference.values()),
        **{f"{name}_vs_one_process_1_thread": _difference(runs[name][0][1], reference)
           for name in configs if name != "one_process_1_thread"},
        repeats_identical=all(_max_difference(w, runs[name][0][1]) == 0
                              for name in configs for _, w in runs[name]),
    )
    if not args.skip_sweep:
        result["sweep"] = sweep(args)
        print(f"sweep: {result['sweep']}", flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""What ``memory`` saves in an l1 sweep: GridSearchCV with and without the MLP-pass cache.

Runs the same ``GridSearchCV`` over ``l1`` on the bundled all-MiniLM-L6-v2 layer-3 MLP twice,
once with ``memory=None`` (the MLP runs at every step of every candidate) and once with a
fresh cache folder (the MLP runs once per fold and once for the refit), and checks that both
give the same cross-validation scores.  Then times single fits on the same tokens: no cache,
a cold cache (computes and stores the pass) and a warm cache (reads it).  The two sweeps are
run in alternating order over ``--repeats`` so that a change in machine load hits both::

    python benchmarks/l1_sweep_cache.py --out benchmarks/results/l1_sweep_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp


def _sweep(X, mlp, args, memory):
    search = GridSearchCV(
        JacobianSparseAutoencoder(mlp, n_components=args.n_components, k=args.k, max_iter=args.max_iter,
                                  batch_size=args.batch_size, random_state=0, memory=memory),
        {"l1": args.l1}, cv=args.cv,
    )
    started = time.perf_counter()
    search.fit(X)
    return time.perf_counter() - started, search.cv_results_["mean_test_score"]


def _fit(X, mlp, args, memory):
    started = time.perf_counter()
    JacobianSparseAutoencoder(mlp, n_components=args.n_components, k=args.k, max_iter=args.max_iter,
                              batch_size=args.batch_size, random_state=0, memory=memory).fit(X)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--cv", type=int, default=2)
    parser.add_argument("--n-tokens", type=int, default=4096)
    parser.add_argument("--n-components", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_minilm_mlp()
    X = data.X[np.random.default_rng(0).permutation(len(data.X))[: args.n_tokens]]
    record = dict(vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(), load_start=os.getloadavg())
    sweeps = {"no_cache": [], "cache": []}
    for repeat in range(args.repeats):
        for name in (("no_cache", "cache") if repeat % 2 == 0 else ("cache", "no_cache")):
            with tempfile.TemporaryDirectory() as folder:
                seconds, scores = _sweep(X, data.mlp, args, folder if name == "cache" else None)
            sweeps[name].append(seconds)
            sweeps[name + "_scores"] = scores.tolist()
            print(f"sweep, {name:>8}: {seconds:6.1f} s", flush=True)
    record["sweep_seconds"] = sweeps
    record["same_scores"] = sweeps["no_cache_scores"] == sweeps["cache_scores"]

    fits = {"no_cache": [], "cold_cache": [], "warm_cache": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            fits["no_cache"].append(_fit(X, data.mlp, args, None))
            fits["cold_cache"].append(_fit(X, data.mlp, args, folder))
            fits["warm_cache"].append(_fit(X, data.mlp, args, folder))
    record["fit_seconds"] = fits
    record["load_end"] = os.getloadavg()
    for name, times in fits.items():
        print(f"one fit, {name:>10}: median {np.median(times):6.1f} s", flush=True)
    ratio = np.median(sweeps["cache"]) / np.median(sweeps["no_cache"])
    print(f"sweep with cache / without: {ratio:.3f}; same CV scores: {record['same_scores']}")
    record["sweep_ratio"] = ratio
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()

"""``score`` batch by batch against its plain twin (whole arrays at once): time and peak memory.

The plain twin is what ``score`` did before it ran through ``reconstruction_metrics``: the MLP's
outputs for all rows, both SAEs' codes as CSR, both reconstructions dense, and X and the outputs
in float64, all at once.  The batched ``score`` holds one batch of each.  Both on the same fitted
pair (a MiniLM-sized GELU MLP, 2,048 latents, k = 32), interleaved, median of ``--repeats``; the
peak is numpy's (``tracemalloc`` sees numpy's buffers, not torch's, so it is the host memory the
plain twin's arrays take; the batched path allocates its batches in torch)::

    python benchmarks/score.py --rows 20000 --threads 2
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np
import torch


def plain_score(jsae, X):
    """The plain twin: everything for all rows at once."""
    from sklearn_jsae._sparse import topk_to_csr
    from sklearn_jsae._topk import _decode, _inference_device

    def explained_variance(Z, Z_hat):
        Z = np.asarray(Z, dtype=np.float64)
        return 1.0 - ((Z - Z_hat) ** 2).sum() / ((Z - Z.mean(axis=0)) ** 2).sum()

    Y = jsae._mlp_outputs(X)
    codes_x = topk_to_csr(*jsae.input_sae_._codes(X, _inference_device(jsae)), jsae.n_components)
    codes_y = topk_to_csr(*jsae._output_codes(X), jsae.output_sae_.components_.shape[0])
    ev_x = explained_variance(X, _decode(codes_x, jsae.input_sae_.components_, jsae.input_sae_.decoder_bias_, "X"))
    ev_y = explained_variance(Y, _decode(codes_y, jsae.output_sae_.components_, jsae.output_sae_.decoder_bias_, "X"))
    return (ev_x + ev_y) / 2


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def numpy_peak(fn, *args):
    """Peak bytes of numpy buffers during one call (a separate call: tracing slows allocations)."""
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    from sklearn_jsae import JacobianSparseAutoencoder

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 384)).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    jsae = JacobianSparseAutoencoder(mlp, n_components=2048, k=32, max_iter=1, batch_size=4096, device="cpu",
                                     random_state=0).fit(X[:4096])
    functions = {"plain": lambda: plain_score(jsae, X), "batched": lambda: jsae.score(X)}
    runs = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, fn in functions.items():
            runs[name].append(timed(fn))
    print(f"{args.rows:,} rows x 384, 2,048 latents, k = 32, {args.threads} thread(s), median of {args.repeats}")
    for name, results in runs.items():
        print(f"{name:8s} score {results[0][0]:.10f}  {np.median([r[1] for r in results]):.2f} s  "
              f"numpy peak {numpy_peak(functions[name]) / 1e6:.0f} MB")
    ratio = np.median([r[1] for r in runs["batched"]]) / np.median([r[1] for r in runs["plain"]])
    print(f"time batched / plain: {ratio:.2f}")


if __name__ == "__main__":
    main()

"""Fit the default JSAE on real MLP data from an .npz file and report sparsity, FVU and time.

Usage: python scripts/check_real_mlp.py PATH.npz [--l1 0 0.5] [--n-train 10000] [--max-iter 30]

The file needs W_in (d_mlp, d_in), b_in, W_out (d_out, d_mlp), b_out (nn.Linear layout) and X
(the format of ../shared/data/minilm_layer3_mlp.npz); the MLP is Linear -> exact GELU -> Linear.
Not part of the test suite: it reads a file the user supplies.
"""

import argparse
import time

import numpy as np
import torch

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.metrics import fraction_variance_unexplained, jacobian_sparsity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, None])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--aux-coef", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--x-scale", type=float, default=1.0, help="multiply X by this (scale robustness)")
    args = parser.parse_args()

    data = np.load(args.path)
    mlp = torch.nn.Sequential(torch.nn.Linear(*data["W_in"].shape[::-1]), torch.nn.GELU(),
                              torch.nn.Linear(*data["W_out"].shape[::-1]))
    with torch.no_grad():
        mlp[0].weight.copy_(torch.from_numpy(data["W_in"]) / args.x_scale)
        mlp[0].bias.copy_(torch.from_numpy(data["b_in"]))
        mlp[2].weight.copy_(torch.from_numpy(data["W_out"]))
        mlp[2].bias.copy_(torch.from_numpy(data["b_out"]))
    X = data["X"].astype(np.float32) * args.x_scale
    order = np.random.default_rng(0).permutation(len(X))
    X_train, X_test = X[order[: args.n_train]], X[order[args.n_train : args.n_train + args.n_test]]

    extra = {k: v for k, v in dict(max_iter=args.max_iter, batch_size=args.batch_size, aux_coef=args.aux_coef,
                                   learning_rate=args.learning_rate).items() if v is not None}
    print(f"data: {args.path}  train {X_train.shape}  test {X_test.shape}  extra {extra}")
    for l1 in args.l1:
        params = dict(mlp=mlp, random_state=0, **extra)
        if l1 is not None:
            params["l1"] = l1
        jsae = JacobianSparseAutoencoder(**params)
        started = time.perf_counter()
        jsae.fit(X_train)
        seconds = time.perf_counter() - started
        frac = jacobian_sparsity(jsae, X_test, thresholds=(0.005, 0.01, 0.02))  # fraction of active entries
        fvu = fraction_variance_unexplained(jsae, X_test)
        fvu_x, fvu_y = fvu["input"], fvu["output"]
        print(f"l1={jsae.l1:<5} |J|>0.005 {frac[0.005]:.3f} |J|>0.01 {frac[0.01]:.3f} |J|>0.02 {frac[0.02]:.3f} "
              f"FVU_x {fvu_x:.3f} FVU_y {fvu_y:.3f} dead_x {jsae.input_sae_.dead_fraction_:.3f} "
              f"dead_y {jsae.output_sae_.dead_fraction_:.3f} fit {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()

"""``python -m sklearn_jsae``: train a JSAE on the bundled real MLP and print a report.

``python -m sklearn_jsae evaluate [...]`` runs the paper-style evaluation instead
(see ``python -m sklearn_jsae evaluate --help``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import JacobianSparseAutoencoder
from ._topk import explained_variance

THRESHOLDS = (0.005, 0.01, 0.015, 0.02)


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_jsae",
        description="Train a Jacobian SAE on the bundled all-MiniLM-L6-v2 layer-3 MLP and report "
        "Jacobian sparsity and reconstruction quality on held-out tokens.",
    )
    defaults = JacobianSparseAutoencoder()
    parser.add_argument("--n-components", type=int, default=defaults.n_components)
    parser.add_argument("--k", type=int, default=defaults.k)
    parser.add_argument("--l1", type=float, default=defaults.l1)
    parser.add_argument("--max-iter", type=int, default=10, help="epochs (default 10 keeps the run under two minutes)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--n-test", type=int, default=1024, help="held-out tokens for the report")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "evaluate":
        from ._evaluate import main as evaluate

        return evaluate(argv[1:])
    args = _parse(argv)
    from .datasets import load_minilm_mlp

    data = load_minilm_mlp()
    order = np.random.default_rng(args.random_state).permutation(len(data.X))
    test, train = order[: args.n_test], order[args.n_test :]
    X_train, X_test = data.X[train], data.X[test]
    print(f"data: all-MiniLM-L6-v2 layer-3 MLP (384 -> 1536 GELU -> 384), real activations on Python "
          f"documentation prose; {len(train)} training tokens, {len(test)} held-out tokens")
    jsae = JacobianSparseAutoencoder(
        mlp=data.mlp, n_components=args.n_components, k=args.k, l1=args.l1, max_iter=args.max_iter,
        batch_size=args.batch_size, device=args.device, random_state=args.random_state, verbose=args.verbose,
    )
    print(f"model: {jsae}")
    started = time.perf_counter()
    jsae.fit(X_train)
    seconds = time.perf_counter() - started

    J = jsae.jacobian(X_test)
    entries = X_test.shape[0] * jsae.k**2
    magnitudes = np.abs(J.data)
    print(f"\nfit: {seconds:.1f} s on {args.device}")
    print("Jacobian sparsity on held-out tokens (fraction of the k x k active entries with |J| > tau):")
    for tau in THRESHOLDS:
        print(f"  tau = {tau:<6} {np.count_nonzero(magnitudes > tau) / entries:.3f}")
    Y_test = jsae.mlp_outputs(X_test)
    fvu_x = 1 - explained_variance(X_test, jsae.inverse_transform(jsae.transform(X_test)))
    fvu_y = 1 - explained_variance(Y_test, jsae.output_sae_.inverse_transform(jsae.transform_output(X_test)))
    print("Reconstruction on held-out tokens (fraction of variance unexplained):")
    print(f"  input SAE  {fvu_x:.3f}   (dead latents {jsae.input_sae_.dead_fraction_:.1%})")
    print(f"  output SAE {fvu_y:.3f}   (dead latents {jsae.output_sae_.dead_fraction_:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

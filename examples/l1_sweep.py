"""Choose l1 with GridSearchCV: the sparsest Jacobian within a reconstruction tolerance.

An l1 sweep trades reconstruction for a sparser computation.  This example sweeps ``l1``
on the bundled all-MiniLM-L6-v2 layer-3 MLP with 2-fold cross-validation, scores every
candidate with :func:`sklearn_jsae.model_selection.make_scoring` (explained variance of both
SAEs, Jacobian density at τ = 0.01, L0, dead latents, all in one pass per fold), refits the
sparsest candidate whose explained variance is within 0.02 of the best, and draws the
Pareto front.  ``memory`` caches the MLP's outputs and local weights (they do not depend on
``l1``), so the MLP runs once per fold instead of at every step of every candidate.  Small
settings keep it to a few minutes on a laptop CPU::

    python examples/l1_sweep.py                       # prints the table, saves l1_sweep.png
    python examples/l1_sweep.py --max-iter 10 --n-components 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from sklearn.model_selection import GridSearchCV

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp
from sklearn_jsae.metrics import jacobian_sparsity
from sklearn_jsae.model_selection import make_scoring, sparsest_within_tolerance


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.1, 0.5, 2.0, 8.0])
    parser.add_argument("--n-components", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--max-iter", type=int, default=4)
    parser.add_argument("--n-tokens", type=int, default=3072)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--output", default="l1_sweep.png")
    args = parser.parse_args()

    data = load_minilm_mlp()
    rng = np.random.default_rng(0)
    X = data.X[rng.permutation(len(data.X))[: args.n_tokens]]
    cache = tempfile.TemporaryDirectory(prefix="jsae_sweep_")
    search = GridSearchCV(
        JacobianSparseAutoencoder(data.mlp, n_components=args.n_components, k=args.k, max_iter=args.max_iter,
                                  random_state=0, memory=cache.name),
        {"l1": args.l1},
        cv=2,
        scoring=make_scoring(threshold=0.01),
        refit=sparsest_within_tolerance(tolerance=args.tolerance),
    )
    started = time.perf_counter()
    with cache:
        search.fit(X)
    print(f"{len(args.l1)} candidates x 2 folds + refit in {time.perf_counter() - started:.0f} s\n")

    results = search.cv_results_
    print(f"{'l1':>6} {'explained var.':>15} {'|J|>0.01':>9} {'dead':>6}")
    for a, l1 in enumerate(results["param_l1"]):
        mark = "  <- chosen" if a == search.best_index_ else ""
        print(f"{l1:>6g} {results['mean_test_explained_variance'][a]:>15.3f} "
              f"{-results['mean_test_neg_jacobian_sparsity'][a]:>9.3f} "
              f"{-results['mean_test_neg_dead_fraction'][a]:>6.3f}{mark}")
    best = search.best_estimator_
    print(f"\nchosen l1={best.l1}: Jacobian density on all tokens "
          f"{jacobian_sparsity(best, X, [0.01])[0.01]:.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from sklearn_jsae.plotting import plot_l1_pareto
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'sklearn-jsae[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    plot_l1_pareto(search, ax=ax)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"Pareto front saved to {args.output}")


if __name__ == "__main__":
    main()

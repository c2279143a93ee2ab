"""
Choosing ``l1`` with ``GridSearchCV``
=====================================

``l1`` trades reconstruction for a sparser computation.  This example sweeps it
with scikit-learn's :class:`~sklearn.model_selection.GridSearchCV`: every
candidate is scored on held-out sequences by all of
:func:`~sklearn_jsae.model_selection.make_scoring`'s scores at once, and
:func:`~sklearn_jsae.model_selection.sparsest_within_tolerance` refits the
candidate with the sparsest Jacobian among those whose explained variance is
within 0.02 of the best.  The Pareto front shows the trade-off and the choice.
"""

# %%
# The search
# ----------
# Cross-validation splits by sequence
# (:class:`~sklearn.model_selection.GroupKFold`), so that no sequence has
# tokens on both sides of a split.  ``memory`` caches the MLP's outputs and
# local weights, which do not depend on ``l1``: the MLP then runs once per fold
# instead of at every step of every candidate, and the models are the same as
# without the cache.
import tempfile

from sklearn.model_selection import GridSearchCV, GroupKFold

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp
from sklearn_jsae.model_selection import (
    make_scoring,
    sparsest_within_tolerance,
)

data = load_minilm_mlp()
X, groups = data.X[:4096], data.sequence_ids[:4096]  # the first 32 sequences

cache = tempfile.TemporaryDirectory(prefix="jsae_sweep_")
search = GridSearchCV(
    JacobianSparseAutoencoder(
        data.mlp,
        n_components=256,
        k=16,
        max_iter=5,
        batch_size=96,
        random_state=0,
        memory=cache.name,
    ),
    param_grid={"l1": [0.0, 0.5, 2.0, 8.0]},
    cv=GroupKFold(n_splits=2),
    scoring=make_scoring(threshold=0.01),
    refit=sparsest_within_tolerance(tolerance=0.02),
)
search.fit(X, groups=groups)
cache.cleanup()

# %%
# Every score of every candidate
# ------------------------------
# ``make_scoring`` records each score as ``mean_test_<name>``; names starting
# with ``neg_`` are negated so that higher is better, as in scikit-learn.
results = search.cv_results_
print(f"{'l1':>5}{'explained var.':>16}{'|J| > 0.01':>12}{'L0':>6}{'dead':>7}")
for a, l1 in enumerate(results["param_l1"]):
    ev = results["mean_test_explained_variance"][a]
    density = -results["mean_test_neg_jacobian_sparsity"][a]
    l0 = -results["mean_test_neg_l0"][a]
    dead = -results["mean_test_neg_dead_fraction"][a]
    chosen = "  <- chosen" if a == search.best_index_ else ""
    print(f"{l1:>5g}{ev:>16.3f}{density:>12.1%}{l0:>6.1f}{dead:>7.1%}{chosen}")
print(f"\nchosen: l1={search.best_params_['l1']:g}")
print(f"search.best_estimator_ is that candidate refitted on {len(X)} tokens")

# %%
# The Pareto front
# ----------------
# :func:`~sklearn_jsae.plotting.plot_l1_pareto` puts each candidate at its
# Jacobian density (x, lower is sparser) and explained variance (y, higher is
# better), joins the candidates that no other beats on both, and stars the one
# the refit rule chose.
import matplotlib.pyplot as plt

from sklearn_jsae.plotting import plot_l1_pareto

fig, ax = plt.subplots(figsize=(7, 5))
plot_l1_pareto(search, ax=ax)
best = results["mean_test_explained_variance"].max()
ax.axhline(
    best - 0.02,
    color="grey",
    linestyle=":",
    linewidth=1,
    label="best - tolerance",
)
ax.margins(x=0.15, y=0.1)  # room for the labels
ax.legend()
fig.tight_layout()
plt.show()

# %%
# What to look at: moving right to left, larger ``l1`` buys a sparser Jacobian
# for a lower explained variance; the star is the leftmost candidate still
# above the dotted line (the best explained variance minus the 0.02 tolerance),
# which is the model ``search.best_estimator_`` holds.

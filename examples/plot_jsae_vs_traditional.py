"""
A JSAE against the traditional SAE pair
=======================================

The paper's point: a JSAE and a traditional pair of SAEs (the same estimator
with ``l1 = 0``) reconstruct the MLP's inputs and outputs about equally well,
but the JSAE's Jacobian between the two sets of latents is much sparser.  This
example trains both with the same settings and seed on the bundled MiniLM data
and compares them on held-out tokens.  (``make run`` prints the same comparison
with larger settings.)
"""

# %%
# Two fits that differ only in ``l1``
# -----------------------------------
# The traditional pair is two ordinary TopK SAEs (``l1 = 0``, exactly); the
# JSAE adds the Jacobian penalty (``l1 = 2``, the default).  With the same
# ``random_state`` both start from the same initial SAEs and see the tokens in
# the same order.
from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp

data = load_minilm_mlp()
X_train, X_test = (
    data.X[:5120],
    data.X[5120:],
)  # 40 sequences to train, 8 held out

settings = dict(
    mlp=data.mlp,
    n_components=512,
    k=32,
    max_iter=5,
    batch_size=256,
    random_state=0,
)
jsae = JacobianSparseAutoencoder(l1=2.0, **settings).fit(X_train)
traditional = JacobianSparseAutoencoder(l1=0.0, **settings).fit(X_train)
models = {"JSAE (l1=2)": jsae, "traditional (l1=0)": traditional}

# %%
# Sparsity and reconstruction on held-out tokens
# ----------------------------------------------
# :func:`~sklearn_jsae.metrics.jacobian_sparsity` is the paper's measure: per
# token, the fraction of the ``k × k`` active Jacobian entries with ``|J| > τ``
# (lower is sparser).
# :func:`~sklearn_jsae.metrics.fraction_variance_unexplained` is each SAE's
# reconstruction error (lower is better).
from sklearn_jsae.metrics import (
    fraction_variance_unexplained,
    jacobian_sparsity,
)

thresholds = (0.005, 0.01, 0.02)
for name, model in models.items():
    density = jacobian_sparsity(model, X_test, thresholds)
    fvu = fraction_variance_unexplained(model, X_test)
    print(name)
    for tau in thresholds:
        print(f"    active entries with |J| > {tau:<5g}  {density[tau]:.0%}")
    print(f"    FVU, input SAE                   {fvu['input']:.3f}")
    print(f"    FVU, output SAE                  {fvu['output']:.3f}")

# %%
# The distribution of ``|J|``
# ---------------------------
# :func:`~sklearn_jsae.plotting.plot_jacobian_histogram` pools the active
# entries of every token and draws their magnitudes on a log scale, one curve
# per model, with the thresholds as dashed lines.
import matplotlib.pyplot as plt

from sklearn_jsae.plotting import plot_jacobian_block, plot_jacobian_histogram

fig, ax = plt.subplots(figsize=(8, 4.5))
plot_jacobian_histogram(models, X_test, thresholds=thresholds, ax=ax)
ax.set_title("|J| over the active entries of 1,024 held-out tokens")
fig.tight_layout()

# %%
# One token, both models
# ----------------------
# The same token's ``k × k`` block under each model, on one colour scale.
t = 5
fig, axes = plt.subplots(2, 1, figsize=(7.5, 12))
for ax, (name, model) in zip(axes, models.items()):
    plot_jacobian_block(model, X_test[t], ax=ax)
    ax.set_title(f"{name}: token {str(data.tokens[5120 + t])!r}")
limit = max(abs(value) for ax in axes for value in ax.images[0].get_clim())
for ax in axes:
    ax.images[0].set_clim(-limit, limit)
fig.tight_layout()
plt.show()

# %%
# Two SAEs trained separately, then trained on as a JSAE
# -------------------------------------------------------
# Any two fitted TopK SAEs of the MLP's inputs and outputs make a pair with
# :meth:`~sklearn_jsae.JacobianSparseAutoencoder.from_saes`, without training:
# SAEs trained on their own here, or read from SAELens or sparsify
# (:mod:`sklearn_jsae.interop`).  Their Jacobian is as dense as the traditional
# pair's; ``fit`` with ``warm_start=True`` then adds the penalty and trains the
# two on from where they are.
from sklearn_jsae import TopKSparseAutoencoder

sae_settings = dict(n_components=512, k=32, max_iter=5, batch_size=256, random_state=1)
sae_x = TopKSparseAutoencoder(**sae_settings).fit(X_train)
sae_y = TopKSparseAutoencoder(**sae_settings).fit(traditional.mlp_outputs(X_train))
pair = JacobianSparseAutoencoder.from_saes(data.mlp, sae_x, sae_y, X_train, batch_size=256, random_state=0)
before = jacobian_sparsity(pair, X_test, [0.01])[0.01]
pair.set_params(warm_start=True, l1=2.0, max_iter=5).fit(X_train)
after = jacobian_sparsity(pair, X_test, [0.01])[0.01]
fvu = fraction_variance_unexplained(pair, X_test)
print(f"separate SAEs: {before:.0%} of active entries above 0.01; trained on as a JSAE: {after:.0%} "
      f"(FVU {fvu['input']:.3f} / {fvu['output']:.3f})")

# %%
# What to look at: in the histogram the JSAE's curve sits left of the
# traditional pair's (its median entry is about seven times smaller), so far
# fewer of its entries cross the dashed thresholds, while the table shows a
# somewhat higher FVU, mostly on the output SAE; on the common colour scale the
# JSAE's block is mostly pale with a few strong cells, the traditional pair's
# busy throughout.

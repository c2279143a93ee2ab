"""
Quick start: a JSAE on a real MLP
=================================

A Jacobian sparse autoencoder (JSAE) is a pair of TopK sparse autoencoders
around an MLP, one on its inputs and one on its outputs, trained so that each
output latent depends on few input latents.  This example fits one on the data
bundled with the package, reads its sparse codes, and draws the exact Jacobian
of one token.
"""

# %%
# The data
# --------
# :func:`~sklearn_jsae.datasets.load_minilm_mlp` returns the MLP of block 3 of
# the sentence encoder all-MiniLM-L6-v2 (384 → 1536 GELU → 384) and 6,144 of
# its real inputs, one row per token of 48 sequences of Python documentation
# prose, in text order.  The first 40 sequences train; the last 8 are held out.
from sklearn_jsae.datasets import load_minilm_mlp

data = load_minilm_mlp()
X_train, X_test = data.X[:5120], data.X[5120:]
tokens_test = data.tokens[5120:]
print(f"X: {data.X.shape}, MLP: {data.mlp}")
print("first tokens:", " ".join(data.tokens[:9]))

# %%
# Fit
# ---
# ``mlp`` is the MLP whose computation the JSAE sparsifies; the estimator
# computes its true outputs itself.  ``k`` latents of each SAE are active per
# token, out of ``n_components``. ``l1`` (default 2) weighs the Jacobian
# penalty.
from sklearn_jsae import JacobianSparseAutoencoder

jsae = JacobianSparseAutoencoder(
    mlp=data.mlp,
    n_components=512,
    k=16,
    max_iter=5,
    batch_size=256,
    random_state=0,
)
jsae.fit(X_train)
# score: the mean explained variance of the two SAEs
print(f"held-out score: {jsae.score(X_test):.3f}")

# %%
# Sparse codes
# ------------
# :meth:`~sklearn_jsae.JacobianSparseAutoencoder.transform` returns the input
# SAE's codes as a SciPy CSR array: row ``t`` stores the active latents of
# token ``t`` and their values.
# :meth:`~sklearn_jsae.JacobianSparseAutoencoder.transform_output` does the
# same for the output SAE, on the MLP's true outputs.
import numpy as np

S = jsae.transform(X_test)
S_out = jsae.transform_output(X_test)
t = 5  # one held-out token
row = slice(S.indptr[t], S.indptr[t + 1])
order = np.argsort(-S.data[row])[:5]
print(f"scipy.sparse {S.format} {S.shape}")
print(f"active latents per token: at most {np.diff(S.indptr).max()}")
print(f"token {str(tokens_test[t])!r}:")
for latent, value in zip(S.indices[row][order], S.data[row][order]):
    print(f"    input latent {latent:>3} = {value:.2f}")

# %%
# One token's Jacobian
# --------------------
# :meth:`~sklearn_jsae.JacobianSparseAutoencoder.jacobian` returns the exact
# Jacobian ``∂s_y/∂s_x`` of each token as a 3-D sparse COO array; only the
# ``k × k`` block of the token's active output and input latents can be
# non-zero.
J = jsae.jacobian(X_test[t : t + 1])
print(f"{type(J).__name__} {J.shape}")
print(f"{J.nnz} stored entries (k * k = {jsae.k**2})")
print(f"entries with |J| > 0.01: {np.mean(np.abs(J.data) > 0.01):.0%}")

# %%
# :func:`~sklearn_jsae.plotting.plot_jacobian_block` draws that block, its rows
# and columns sorted by how strongly each latent is active.
import matplotlib.pyplot as plt

from sklearn_jsae.plotting import plot_jacobian_block

fig, ax = plt.subplots(figsize=(8, 6.5))
plot_jacobian_block(jsae, X_test[t], ax=ax)
ax.set_title(f"The Jacobian at the token {str(tokens_test[t])!r}")
fig.tight_layout()
plt.show()

# %%
# What to look at: on one colour scale most cells are pale and a few are dark:
# each active output latent (a row) is driven mostly by a few of the token's
# active input latents (the columns), and which ones differs from row to row.

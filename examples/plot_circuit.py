"""
Reading a circuit: what feeds one output latent
===============================================

A JSAE's Jacobian says which input latents each output latent depends on.  This
example trains one on the bundled MiniLM data, picks a frequently active output
latent, ranks the input latents that feed it by the mean ``|J|`` of their edge,
and shows the tokens on which each of them fires most, in context.
"""

# %%
# Fit
# -----
# The default ``l1 = 2`` (a larger one makes the computation sparser still, at
# some reconstruction cost: :doc:`/choosing`); a sparse computation makes
# circuits easier to read.
import numpy as np

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp

data = load_minilm_mlp()
X, tokens, positions = data.X, data.tokens, data.positions
jsae = JacobianSparseAutoencoder(
    data.mlp,
    n_components=512,
    k=16,
    l1=2.0,
    max_iter=6,
    batch_size=256,
    random_state=0,
).fit(X)
S_in, S_out = jsae.transform(X), jsae.transform_output(X)


# %%
# Tokens in context
# -----------------
# The rows of ``X`` are tokens in text order; ``positions`` restarts at 0 with
# each sequence.
def in_context(row, width=3):
    """Token ``row`` in brackets, with up to ``width`` neighbours a side."""
    start = row - min(width, int(positions[row]))
    end = row + 1
    while (
        end < len(tokens)
        and end - row <= width
        and positions[end] > positions[row]
    ):
        end += 1
    words = [
        f"[{tokens[i]}]" if i == row else str(tokens[i])
        for i in range(start, end)
    ]
    return " ".join(words).replace(" ##", "")


def top_contexts(codes, latent, n=3):
    """The ``n`` distinct contexts where ``latent`` is largest in ``codes``."""
    column = codes[:, [latent]].toarray().ravel()
    contexts = []
    for r in np.argsort(-column):
        if column[r] <= 0 or len(contexts) == n:
            break
        if in_context(r) not in contexts:  # the text repeats some passages
            contexts.append(in_context(r))
    return contexts


def top_tokens(codes, latent, n=3):
    """The ``n`` distinct tokens where ``latent`` is largest, quoted."""
    column = codes[:, [latent]].toarray().ravel()
    found = []
    for r in np.argsort(-column)[:200]:
        if column[r] > 0 and repr(str(tokens[r])) not in found:
            found.append(repr(str(tokens[r])))
    return ", ".join(found[:n])


# %%
# Choose an output latent
# -----------------------
# ``jsae.jacobian_`` is the fitted graph: the mean ``|J|`` of every (output,
# input) pair over the training tokens.  Among the output latents active on at
# least 1% of the tokens, take the one with the strongest single edge.
G = jsae.jacobian_.tocsr()
fires = np.bincount(S_out.indices, minlength=S_out.shape[1])
strongest = np.where(
    fires >= 0.01 * len(X), G.max(axis=1).toarray().ravel(), -1.0
)
output_latent = int(np.argmax(strongest))
n_active = fires[output_latent]
print(f"output latent {output_latent}: active on {n_active} tokens")
print("it fires most on")
for context in top_contexts(S_out, output_latent, n=5):
    print("   ", context)

# %%
# Its strongest inputs
# --------------------
# :func:`~sklearn_jsae.plotting.plot_top_edges` ranks the input latents by the
# mean ``|J|`` of their edge into the output latent, over the tokens where the
# output latent is active
# (:func:`~sklearn_jsae.metrics.global_jacobian_sparsity`).  Each bar is
# labelled with the input latent and the distinct tokens on which it fires
# most.
import matplotlib.pyplot as plt

from sklearn_jsae.metrics import global_jacobian_sparsity
from sklearn_jsae.plotting import plot_top_edges

_, G_active = global_jacobian_sparsity(
    jsae, X, thresholds=[0.0], return_matrix=True
)
row = G_active[[output_latent], :].tocoo()
top_inputs = row.coords[1][np.argsort(-row.data)[:8]]
labels = {}
for j in top_inputs:
    labels[int(j)] = f"{j}: {top_tokens(S_in, j)}"
    print(f"input latent {j}: " + " | ".join(top_contexts(S_in, j)))

output_words = top_tokens(S_out, output_latent)
fig, ax = plt.subplots(figsize=(8, 5))
plot_top_edges(
    jsae,
    X,
    output_latent,
    n_edges=8,
    input_labels=labels,
    output_label=f"output latent {output_latent} ({output_words})",
    ax=ax,
)
fig.tight_layout()
plt.show()

# %%
# What to look at: the bars fall off quickly, so a few input latents carry most
# of the output latent's dependence, and the tokens in the labels show what
# each of those inputs stands for next to what the output latent stands for in
# the title.

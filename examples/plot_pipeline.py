"""
JSAE codes as features in a ``Pipeline``
========================================

:class:`~sklearn_jsae.JacobianSparseAutoencoder` is a scikit-learn transformer:
``transform`` returns its sparse input-side codes, so it can sit in a
:class:`~sklearn.pipeline.Pipeline` in front of any estimator that accepts
SciPy sparse input.  This example predicts, from a token's MLP input, whether
the token continues a word (a WordPiece ``##`` piece such as ``##ing``), with a
logistic regression on the JSAE's codes, on a traditional SAE's codes, and on
the raw activations, and reads the most predictive latents.
"""

# %%
# The task
# --------
# The labels come from the bundled token strings.  Cross-validation splits by
# sequence.
import numpy as np

from sklearn_jsae.datasets import load_minilm_mlp

data = load_minilm_mlp()
X, tokens, groups = data.X, data.tokens, data.sequence_ids
y = np.char.startswith(tokens.astype(str), "##")
print(f"{len(y)} tokens, {y.mean():.1%} of them word continuations")

# %%
# Three pipelines, one protocol
# -----------------------------
# The two SAEs keep 16 of 512 latents per token; the logistic regression sees
# only those. ``class_weight="balanced"`` and the balanced accuracy account for
# the rare positive class.
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder

sae_settings = dict(
    n_components=512, k=16, max_iter=5, batch_size=128, random_state=0
)
classifier = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
pipelines = {
    "JSAE codes": make_pipeline(
        JacobianSparseAutoencoder(data.mlp, **sae_settings), classifier
    ),
    "traditional SAE codes": make_pipeline(
        TopKSparseAutoencoder(**sae_settings), classifier
    ),
    "raw activations": make_pipeline(StandardScaler(), classifier),
}
scores = {}
for name, pipeline in pipelines.items():
    result = cross_validate(
        pipeline,
        X,
        y,
        groups=groups,
        cv=GroupKFold(n_splits=2),
        scoring="balanced_accuracy",
        return_estimator=True,
    )
    scores[name] = result["test_score"]
    print(f"{name:<22} balanced accuracy {result['test_score'].mean():.3f}")
    if name == "JSAE codes":
        fitted = result["estimator"][0]  # the first fold's fitted pipeline

# %%
# The most predictive latents
# ---------------------------
# The codes are sparse and non-negative, so a positive coefficient reads as
# "this latent firing makes a continuation more likely".  The tokens on which
# each latent fires most say what it stands for.
jsae, logistic = fitted[0], fitted[-1]
codes = jsae.transform(X)
for latent in np.argsort(-logistic.coef_[0])[:5]:
    column = codes[:, [latent]].toarray().ravel()
    top = []
    for r in np.argsort(-column)[:100]:
        if column[r] > 0 and str(tokens[r]) not in top:
            top.append(str(tokens[r]))
    weight = logistic.coef_[0, latent]
    words = ", ".join(top[:6])
    print(f"latent {latent:>3}  coefficient {weight:+.2f}  fires on: {words}")

# %%
# The scores
# ----------
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5))
names = list(scores)
ax.barh(
    names,
    [scores[n].mean() for n in names],
    color=["tab:blue", "tab:orange", "tab:grey"],
)
for i, n in enumerate(names):
    ax.plot(
        scores[n],
        [i] * len(scores[n]),
        "k|",
        markersize=14,
        label="one fold" if i == 0 else None,
    )
ax.axvline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
ax.set_xlim(0.4, 1.02)
ax.set_xlabel("balanced accuracy (held-out sequences)")
ax.set_title("Is the token a word continuation? Logistic regression on...")
ax.invert_yaxis()
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.tight_layout()
plt.show()

# %%
# What to look at: the two SAEs' bars show how much of the answer survives when
# a token is cut down to 16 active latents out of 512, against the raw
# 384-dimensional activation below them, and the fold marks show how much each
# score moves between held-out halves.

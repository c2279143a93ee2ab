"""Hugging Face ``transformers`` models: exact MLP modules and activation harvesting.

Point a JSAE at one MLP sublayer of a model you loaded yourself::

    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.hf import harvest, mlp_of

    mlp = mlp_of(model, layer=3)                 # frozen torch module, MLP input -> MLP output
    X, Y = harvest(model, 3, texts, tokenizer=tok, n_tokens=200_000)
    jsae = JacobianSparseAutoencoder(mlp=mlp, k=32).fit(X)

:func:`mlp_of` copies the layer's weights into an :class:`~sklearn_jsae.mlp.ElementwiseMLP`
or :class:`~sklearn_jsae.mlp.GatedMLP`, whose Jacobian has a closed form, and checks
numerically that it reproduces the Hugging Face module.  :func:`harvest` runs the
model under ``torch.no_grad`` in eval mode and captures, with forward hooks, the MLP
input (after the block's normalisation) and the MLP output (before any dropout,
residual addition or output normalisation) of every non-padding token.
:class:`ActivationStream` does the same batch by batch through a shuffle buffer, for
``fit_stream`` at any number of tokens, resumably.  Texts are one sequence each (truncated to
``max_length``) or, with ``pack=True``, concatenated and cut into full sequences; a corpus on
disk (text, ``.jsonl`` or ``.parquet`` files, compressed or not, or a folder of shards) is read
lazily.  Nothing here downloads anything: every function takes a model object.

Supported architectures (:data:`SUPPORTED_ARCHITECTURES`): GPT-2, GPT-BigCode, GPT-J,
GPT-NeoX / Pythia, Falcon, Phi, OPT, LLaMA-style gated MLPs (Llama, Mistral, Qwen2/3, Gemma 1/2,
OLMo 2, SmolLM2, ...), Phi-3's gated MLP with a fused gate and up projection, and BERT-style
encoders (BERT, RoBERTa, MiniLM, DistilBERT, ...); TransformerLens's ``HookedTransformer`` and its
``TransformerBridge``, read through the Hugging Face model it wraps.  For anything else pass a torch
callable ``(n, d_in) -> (n, d_out)`` as ``JacobianSparseAutoencoder(mlp=...)``: its
Jacobian is then computed exactly by autograd (slower).
"""

from ._adapters import SUPPORTED_ARCHITECTURES, mlp_hook_points, mlp_module, mlp_of
from ._harvest import harvest
from ._stream import ActivationStream

__all__ = ["SUPPORTED_ARCHITECTURES", "ActivationStream", "harvest", "mlp_hook_points", "mlp_module", "mlp_of"]

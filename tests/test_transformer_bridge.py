"""TransformerLens's TransformerBridge (its 3.x replacement for HookedTransformer): hook points
around a Hugging Face model that it runs itself, with bridge components put in place of the
model's own modules.  mlp_of, harvest, ActivationStream and spliced_ce_score read it through that
model; to_saelens names its hook points, which SAELens' SAETransformerBridge hooks.

The models are tiny random ones of ten layouts (LAYOUTS) built from a config, booted with a word-level
tokenizer built here, and the real SmolLM2: nothing is downloaded (the bridge reads the config
from a folder).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from installed import INSTALL_HINT, prose, require  # noqa: E402

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder  # noqa: E402
from sklearn_jsae.hf import ActivationStream, harvest, mlp_of  # noqa: E402
from sklearn_jsae.interop import to_saelens, to_sparsify  # noqa: E402
from sklearn_jsae.metrics import spliced_ce_score  # noqa: E402
from sklearn_jsae.mlp import ElementwiseMLP, GatedMLP  # noqa: E402

V = 100
# kind -> (the bridge's hook point of the MLP input, the closed-form class)
KINDS = {"llama": ("blocks.1.mlp.hook_in", GatedMLP), "bert": ("blocks.1.hook_mlp_in", ElementwiseMLP)}
# GPT-2's Conv1D, Pythia's, GPT-J's, Phi's, OPT's MLP on the decoder layer itself, gated (Llama,
# Qwen2, Gemma 2, Phi-3's fused gate and up projection), BERT's
LAYOUTS = ["gpt2", "gpt_neox", "gptj", "phi", "opt", "llama", "qwen2", "gemma2", "phi3", "bert"]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t3", cls_token="t1", sep_token="t2",
        mask_token="t4",
    )


def _hf_model(kind):
    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **small))
        with torch.no_grad():  # norm weights of 1 would hide a missing one
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    elif kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**small))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                                     vocab_size=V))
    elif kind == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**small))
    elif kind == "gptj":
        model = transformers.GPTJForCausalLM(transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                                     vocab_size=V, rotary_dim=8))
    elif kind == "phi":
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**small))
    elif kind == "phi3":  # gated, with a fused gate and up projection
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **small))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **small))
    elif kind == "gemma2":  # its hook_mlp_out alias is after the post-feed-forward norm, not the MLP's
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, **small))
    elif kind == "opt":  # fc1 / fc2 on the decoder layer itself
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
            word_embed_proj_dim=32, max_position_embeddings=64))
    else:
        raise ValueError(f"no tiny model of kind {kind!r}")
    return model.eval()


def _bridge(kind, folder, cls=None):
    """A bridge (``cls``, default TransformerBridge) around a fresh tiny model of ``kind``, and that
    model: the bridge boots from the config and tokenizer written to ``folder``."""
    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    model = _hf_model(kind)
    model.config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # the bridge reads its name_or_path
    bridge = (cls or TransformerBridge).boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer)
    return bridge, model


def _ids(n_seq=3, length=12, seed=0):
    return torch.randint(5, V, (n_seq, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("compatibility", [False, True], ids=["plain", "compatibility_mode"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bridge_mlp_harvest_and_stream_match_its_hook_points(kind, compatibility, tmp_path):
    """The rows harvest and ActivationStream read from a bridge are exactly what its own hook
    points hold, and mlp_of computes its MLP; in compatibility mode (LayerNorm folded into the
    weights, processed in place) too."""
    bridge, _ = _bridge(kind, tmp_path)
    if compatibility:
        bridge.enable_compatibility_mode()
    input_hook, cls = KINDS[kind]
    mlp = mlp_of(bridge, 1)
    assert type(mlp) is cls
    ids = _ids()
    X, Y = harvest(bridge, 1, input_ids=ids, progress=False)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    np.testing.assert_array_equal(X, cache[input_hook].reshape(-1, 32).numpy())
    np.testing.assert_array_equal(Y, cache["blocks.1.hook_mlp_out"].reshape(-1, 32).numpy())
    with torch.no_grad():
        np.testing.assert_allclose(mlp(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5)
    streamed = np.concatenate(list(ActivationStream(bridge, 1, input_ids=ids.numpy(), batch_size=8,
                                                    buffer_size=16)))
    np.testing.assert_array_equal(streamed[np.lexsort(streamed.T)], X[np.lexsort(X.T)])


@pytest.mark.parametrize("kind", LAYOUTS)
def test_a_bridge_reads_as_the_model_it_wraps(kind, tmp_path):
    """On every layout (GPT-2's Conv1D, Pythia's, OPT's MLP on the decoder layer itself, gated,
    BERT's): the bridge's MLP, rows and sparsify names are those of the same model unbridged, and
    the SAELens hook names it gets hold exactly the rows in the bridge's own cache."""
    bridge, _ = _bridge(kind, tmp_path / "model")
    twin = _hf_model(kind)  # the same seed: the same weights, never bridged
    ids = _ids()
    X, Y = harvest(bridge, 1, input_ids=ids, progress=False)
    X_twin, Y_twin = harvest(twin, 1, input_ids=ids, progress=False)
    np.testing.assert_allclose(X, X_twin, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Y, Y_twin, rtol=1e-6, atol=1e-6)
    for name, value in mlp_of(bridge, 1).state_dict().items():
        torch.testing.assert_close(value, mlp_of(twin, 1).state_dict()[name], rtol=0, atol=0)
    sae = TopKSparseAutoencoder(16, k=3, max_iter=2, batch_size=8, random_state=0).fit(X)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    for side, rows in (("input", X), ("output", Y)):
        folder = to_saelens(sae, tmp_path / side, side=side, model=bridge, layer=1)
        with open(os.path.join(folder, "cfg.json")) as f:
            hook_name = json.load(f)["metadata"]["hook_name"]
        np.testing.assert_array_equal(cache[hook_name].reshape(-1, 32).numpy(), rows)
        assert _sparsify_hookpoint(sae, tmp_path / f"sp_{side}", side, bridge) \
            == _sparsify_hookpoint(sae, tmp_path / f"sp_twin_{side}", side, twin)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout_in_compatibility_mode_reads_its_processed_model(kind, tmp_path):
    """After enable_compatibility_mode (weights processed in place: LayerNorm folded where the
    architecture allows, writing weights centred), harvest's rows are what the bridge's hooks
    hold, mlp_of computes them, and the SAELens names hold them."""
    bridge, _ = _bridge(kind, tmp_path / "model")
    bridge.enable_compatibility_mode()
    ids = _ids()
    X, Y = harvest(bridge, 1, input_ids=ids, progress=False)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        np.testing.assert_allclose(mlp_of(bridge, 1)(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5)
    sae = TopKSparseAutoencoder(16, k=3, max_iter=2, batch_size=8, random_state=0).fit(X)
    for side, rows in (("input", X), ("output", Y)):
        folder = to_saelens(sae, tmp_path / side, side=side, model=bridge, layer=1)
        with open(os.path.join(folder, "cfg.json")) as f:
            hook_name = json.load(f)["metadata"]["hook_name"]
        np.testing.assert_array_equal(cache[hook_name].reshape(-1, 32).numpy(), rows)


def test_bridge_compatibility_mode_changes_what_is_read(tmp_path):
    """Folding LayerNorm into the weights changes the MLP input the bridge's hooks see, and the
    rows and MLP read from it follow (they are read from the processed model, not a stale copy)."""
    bridge, _ = _bridge("llama", tmp_path)
    ids = _ids()
    X_plain, Y_plain = harvest(bridge, 1, input_ids=ids, progress=False)
    W_plain = mlp_of(bridge, 1).W_up.clone()
    bridge.enable_compatibility_mode()
    X_folded, Y_folded = harvest(bridge, 1, input_ids=ids, progress=False)
    assert not np.allclose(X_folded, X_plain, atol=1e-3)  # the norm's weights moved into the MLP
    assert not torch.allclose(mlp_of(bridge, 1).W_up, W_plain, atol=1e-3)
    np.testing.assert_allclose(Y_folded, Y_plain, rtol=1e-4, atol=1e-4)  # the same MLP output


def test_spliced_ce_score_on_a_bridge_is_its_own_loss(tmp_path):
    bridge, _ = _bridge("llama", tmp_path)
    ids = _ids(6, 12, seed=2)
    X, _ = harvest(bridge, 1, input_ids=ids, progress=False)
    jsae = JacobianSparseAutoencoder(mlp_of(bridge, 1), n_components=32, k=4, max_iter=3, batch_size=16,
                                     random_state=0).fit(X)
    scores = spliced_ce_score(bridge, 1, jsae, ids)
    with torch.no_grad():
        assert scores["ce_clean"] == pytest.approx(float(bridge(ids, return_type="loss")), rel=1e-5)
    assert scores["n_tokens"] == 6 * 11 and np.isfinite(scores["score_mean"])
    assert scores["ce_zero_input"] > scores["ce_clean"]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_saelens_export_of_a_bridge_is_hooked_by_saelens_bridge(kind, tmp_path):
    """Exported with model= a bridge: the hook names are the bridge's hook points that hold exactly
    the rows (the MLP input's differs between architectures), with no model_class_name; SAELens' SAETransformerBridge attaches the
    loaded SAE there and its latents on the model's own forward are our transform codes.  sparsify
    gets the wrapped Hugging Face model's module names, those of the same model unbridged."""
    sae_lens = require("sae_lens")
    from sae_lens import SAETransformerBridge

    bridge, _ = _bridge(kind, tmp_path / "model", cls=SAETransformerBridge)
    ids = _ids()
    X, Y = harvest(bridge, 1, input_ids=ids, progress=False)
    sae = TopKSparseAutoencoder(16, k=3, max_iter=2, batch_size=8, random_state=0).fit(X)
    out_sae = TopKSparseAutoencoder(16, k=3, max_iter=2, batch_size=8, random_state=0).fit(Y)
    with torch.no_grad():
        _, clean = bridge.run_with_cache(ids)
    for side, rows, fitted in (("input", X, sae), ("output", Y, out_sae)):
        folder = to_saelens(fitted, tmp_path / side, side=side, model=bridge, layer=1)
        with open(os.path.join(folder, "cfg.json")) as f:
            meta = json.load(f)["metadata"]
        assert meta["hook_name"].startswith("blocks.1.")  # the block's hook point holding exactly the rows
        np.testing.assert_array_equal(clean[meta["hook_name"]].reshape(-1, 32).numpy(), rows)
        assert "model_class_name" not in meta and meta["model_name"] == str(tmp_path / "model")
        loaded = sae_lens.SAE.load_from_disk(folder)
        bridge.add_sae(loaded)
        try:
            with torch.no_grad():
                _, cache = bridge.run_with_cache(ids)
            codes = cache[bridge.get_sae_hook_name(loaded)].reshape(-1, 16).numpy()
        finally:
            bridge.reset_saes()
        np.testing.assert_allclose(codes, fitted.transform(rows).toarray(), rtol=1e-5, atol=1e-5)
        assert _sparsify_hookpoint(fitted, tmp_path / f"sparsify_{side}", side, bridge) \
            == _sparsify_hookpoint(fitted, tmp_path / f"sparsify_plain_{side}", side, _hf_model(kind))


def _sparsify_hookpoint(sae, folder, side, model):
    from safetensors import safe_open

    folder = to_sparsify(sae, folder, side=side, model=model, layer=1)
    with safe_open(os.path.join(folder, "sae.safetensors"), "pt") as f:
        return f.metadata()["hookpoint"]


@pytest.mark.realmodel
def test_a_bridge_around_smollm2_reads_its_gated_mlp(tmp_path):
    """SmolLM2-135M (the converted test model, a copy of its own: booting a bridge rewires the
    model in place) in a bridge: the rows of real text are those of the unbridged model (the
    bridge runs its own attention path: equal to float32 rounding), mlp_of computes the MLP
    exactly on them, and the SAELens input hook is blocks.15.mlp.hook_in."""
    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    folder = Path(os.environ.get("SKLEARN_JSAE_MODELS", Path(__file__).resolve().parents[1] / ".models")) \
        / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").exists():
        message = f"the converted SmolLM2 is not in {folder.parent}; {INSTALL_HINT}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer=tokenizer)
    texts = prose(3)
    X, Y = harvest(bridge, 15, texts, tokenizer=tokenizer, max_length=64, progress=False)
    X_plain, Y_plain = harvest(plain, 15, texts, tokenizer=tokenizer, max_length=64, progress=False)
    assert X.shape == X_plain.shape and X.shape[1] == 576 and X.shape[0] > 100
    np.testing.assert_allclose(X, X_plain, rtol=1e-4, atol=1e-4 * np.abs(X_plain).max())
    np.testing.assert_allclose(Y, Y_plain, rtol=1e-4, atol=1e-4 * np.abs(Y_plain).max())
    mlp = mlp_of(bridge, 15)
    assert type(mlp) is GatedMLP
    with torch.no_grad():
        np.testing.assert_allclose(mlp(torch.from_numpy(X)).numpy(), Y, rtol=1e-5, atol=1e-5 * np.abs(Y).max())
    sae = TopKSparseAutoencoder(64, k=4, max_iter=2, batch_size=64, random_state=0).fit(X)
    folder_written = to_saelens(sae, tmp_path / "sae", side="input", model=bridge, layer=15)
    with open(os.path.join(folder_written, "cfg.json")) as f:
        assert json.load(f)["metadata"]["hook_name"] == "blocks.15.mlp.hook_in"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "opt"])
def test_spliced_ce_score_equals_saelens_bridge_splicing(kind, tmp_path):
    """spliced_ce_score on a bridge against SAELens's SAETransformerBridge with the exported SAE
    attached (reconstruction in place of the activation): the same loss on each side."""
    require("sae_lens")
    from sae_lens import SAE, SAETransformerBridge

    bridge, _ = _bridge(kind, tmp_path / "model", cls=SAETransformerBridge)
    ids = _ids(6, 12, seed=4)
    X, _ = harvest(bridge, 1, input_ids=ids, progress=False)
    jsae = JacobianSparseAutoencoder(mlp_of(bridge, 1), n_components=48, k=4, batch_size=16, max_iter=10,
                                     random_state=0).fit(X)
    ours = spliced_ce_score(bridge, 1, jsae, ids)
    for side in ("input", "output"):
        sae = SAE.load_from_disk(to_saelens(jsae, tmp_path / side, side=side, model=bridge, layer=1))
        bridge.add_sae(sae, use_error_term=False)
        try:
            with torch.no_grad():
                spliced = float(bridge(ids, return_type="loss"))
        finally:
            bridge.reset_saes()
        assert ours[f"ce_{side}"] == pytest.approx(spliced, rel=1e-5), side
        assert abs(spliced - ours["ce_clean"]) > 1e-4

"""Adapters from Hugging Face ``transformers`` models to exact MLP maps: :func:`mlp_of` copies one
block's MLP into a closed-form :class:`~sklearn_jsae.mlp.ElementwiseMLP` or
:class:`~sklearn_jsae.mlp.GatedMLP` and checks it numerically; :func:`mlp_hook_points` and
:func:`mlp_module` name the modules whose input and output are the MLP's."""

from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .._backend.mlp import ACTIVATIONS, ElementwiseMLP, GatedMLP, activation

__all__ = ["SUPPORTED_ARCHITECTURES", "mlp_hook_points", "mlp_module", "mlp_of"]

SUPPORTED_ARCHITECTURES = (
    "GPT-2 (mlp.c_fc / mlp.c_proj, Conv1D), GPT-BigCode / StarCoder (the same names, Linear)",
    "GPT-J (mlp.fc_in / mlp.fc_out)",
    "GPT-NeoX / Pythia, Falcon (mlp.dense_h_to_4h / mlp.dense_4h_to_h)",
    "Phi (mlp.fc1 / mlp.fc2)",
    "LLaMA-style gated MLPs: Llama, Mistral, Qwen2/3, Gemma 1/2, OLMo 2, SmolLM2, ... "
    "(mlp.gate_proj / mlp.up_proj / mlp.down_proj)",
    "Phi-3-style gated MLPs with a fused gate and up projection: Phi-3, Phi-4-mini, ... "
    "(mlp.gate_up_proj / mlp.down_proj)",
    "BERT-style encoders: BERT, RoBERTa, MiniLM, ... (intermediate.dense / output.dense)",
    "DistilBERT (ffn.lin1 / ffn.lin2)",
    "OPT (fc1 / fc2 on the decoder layer itself)",
    "TransformerLens HookedTransformer (blocks[i].mlp: W_in / W_out, and W_gate for gated MLPs)",
    "TransformerLens TransformerBridge around any model above (its Hugging Face model is used)",
)

# (first linear, second linear, activation) attribute names of Linear -> act -> Linear MLPs.
_ELEMENTWISE_PATTERNS = (
    ("c_fc", "c_proj", "act"),  # GPT-2 (Conv1D)
    ("dense_h_to_4h", "dense_4h_to_h", "act"),  # GPT-NeoX / Pythia
    ("fc_in", "fc_out", "act"),  # GPT-J
    ("fc1", "fc2", "activation_fn"),  # Phi
    ("lin1", "lin2", "activation"),  # DistilBERT (its MLP module is the block's `ffn`)
)
# OPT keeps fc1 / fc2 / activation_fn on the decoder layer, with no MLP module around them.
_BLOCK_PATTERN = ("fc1", "fc2", "activation_fn")
_GATED_PATTERN = ("gate_proj", "up_proj", "down_proj", "act_fn")
# Phi-3: one linear computes [gate, up] (d, 2 · d_mlp), split in halves before the product.
_FUSED_GATED_PATTERN = ("gate_up_proj", "down_proj", "activation_fn")
_LAYER_LISTS = ("h", "layers", "encoder.layer", "transformer.h", "model.layers", "gpt_neox.layers",
                "decoder.layers", "model.decoder.layers", "transformer.layer", "blocks")


class _Unsupported(ValueError):
    pass


def _unsupported_message(what: str) -> str:
    supported = "\n  - ".join(SUPPORTED_ARCHITECTURES)
    return (
        f"{what}\nSupported architectures:\n  - {supported}\n"
        "For any other model, write the MLP as a torch callable mapping (n, d_in) tensors to "
        "(n, d_out) tensors and pass it as JacobianSparseAutoencoder(mlp=callable): its Jacobian "
        "is then computed exactly by autograd (slower than the closed form)."
    )


@dataclass
class _Layout:
    """Where one layer's MLP lives inside a model."""

    family: str  # "elementwise" | "gated" | "fused_gated" | "bert" | "block" | "lens" | "lens_gated"
    layer: int
    block: nn.Module
    input_module: nn.Module  # forward input (first argument) is the MLP input
    output_module: nn.Module  # forward output is the MLP output
    mlp_module: nn.Module | None  # one module doing both, None for BERT and OPT
    linears: tuple
    act: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP computed by the Hugging Face modules themselves (x (n, d_in) -> (n, d_out))."""
        if self.family == "bert":  # `intermediate` applies the activation itself
            return self.output_module(self.input_module(x))
        if self.family == "block":  # OPT: fc1 -> activation -> fc2, called by the decoder layer
            return self.output_module(self.act(self.input_module(x)))
        return self.mlp_module(x)


def _is_bridge(model) -> bool:
    """A TransformerLens ``TransformerBridge``: hook points around a Hugging Face model it runs
    as it is (``original_model``), whose weights its compatibility mode processes in place."""
    return (any(cls.__name__ == "TransformerBridge" and cls.__module__.split(".")[0] == "transformer_lens"
                for cls in type(model).__mro__)
            and isinstance(model.__dict__.get("original_model"), nn.Module))


def _unwrap(model):
    """The transformers model inside a sentence-transformers wrapper or a TransformerLens
    ``TransformerBridge``, else ``model``."""
    if _is_bridge(model):
        # The bridge's forward runs these very modules (processed weights included), so the
        # MLP, its activations and the logits read from the model are the bridge's.
        return model.__dict__["original_model"]
    auto = getattr(model, "auto_model", None)
    if isinstance(auto, nn.Module):
        return auto
    if (
        isinstance(model, nn.Sequential)
        and len(model)
        and isinstance(getattr(model[0], "auto_model", None), nn.Module)
    ):
        return model[0].auto_model
    return model


def _warn_attached_saes(model, what: str) -> None:
    """Warn when SAELens SAEs are attached to ``model`` (a ``HookedSAETransformer`` or
    ``SAETransformerBridge``): they run inside every forward pass, so ``what`` sees the model
    with their reconstructions spliced in, not the model itself."""
    attached = getattr(model, "acts_to_saes", None)
    if isinstance(attached, dict) and attached:
        from .._warnings import warn

        warn(
            f"{type(model).__name__} has SAEs attached at {sorted(attached)}: they run in every forward "
            f"pass, so {what} the model with their reconstructions spliced in. Call model.reset_saes() "
            f"first for the model's own activations.")


def _is_transformer_lens(model) -> bool:
    """A TransformerLens model (``HookedTransformer``), whose forward takes token ids first and
    returns the logits themselves (a ``TransformerBridge`` is read through its Hugging Face model)."""
    return (not _is_bridge(model)
            and any(cls.__module__.split(".")[0] == "transformer_lens" for cls in type(model).__mro__))


def run_model(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              first_row: int | None = None):
    """``model``'s forward pass on token ids (n_seq, seq_len): Hugging Face's ``input_ids=``, or
    TransformerLens's first argument (with the mask as ``attention_mask``, or, for its BERT,
    ``HookedEncoder``, as ``one_zero_attention_mask``).

    A model with a table of learned positions fails on longer sequences with an indexing or shape
    error that does not say why; that failure is raised as a ``ValueError`` naming the lengths.
    (Rotary models run past their configured length, so the length is only checked on failure.)
    So does a token id outside the vocabulary, checked before the model runs (:func:`check_token_ids`;
    ``first_row`` is the index of the batch's first sequence in the whole input, for its message)."""
    check_token_ids(model, input_ids, first_row)
    try:
        return _forward(model, input_ids, attention_mask)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but never a question of length
        raise
    except (IndexError, RuntimeError) as exc:
        name, limit = _max_positions(model)
        if limit is not None and input_ids.shape[-1] > limit:
            raise ValueError(
                f"sequences of {input_ids.shape[-1]} tokens reached {type(model).__name__}, which has "
                f"{limit} positions ({name}={limit}): pass max_length <= {limit} with texts, or input_ids "
                f"rows of at most {limit} tokens.") from exc
        raise


def vocabulary_size(model) -> int | None:
    """The number of token ids ``model`` embeds: its input embedding's rows (which may exceed
    ``config.vocab_size``, padded for speed), else the configuration's ``vocab_size`` (Hugging
    Face) or ``d_vocab`` (TransformerLens); None if neither is known."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except (NotImplementedError, AttributeError):  # a PreTrainedModel that does not say
            embeddings = None
        if isinstance(embeddings, nn.Embedding):
            return embeddings.num_embeddings
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("vocab_size", "d_vocab"):
        value = getattr(config, name, None)
        if isinstance(value, numbers.Integral) and value > 0:
            return int(value)
    return None


def check_token_ids(model, input_ids: torch.Tensor, first_row: int | None = None) -> None:
    """Raise a ValueError naming the first token id outside ``[0, vocabulary_size(model))`` and its
    place, rather than the embedding's bare ``IndexError: index out of range in self``."""
    vocab = vocabulary_size(model)
    if vocab is None or input_ids.numel() == 0:
        return
    outside = (input_ids < 0) | (input_ids >= vocab)
    if not bool(outside.any()):
        return
    row, column = (int(i) for i in torch.nonzero(outside)[0])
    # first_row None: the caller's batches are not numbered, so the row is the batch's own
    place = (f"sequence {first_row + row}, position {column}" if first_row is not None
             else f"row {row} of a batch, position {column}")
    raise ValueError(
        f"token id {int(input_ids[row, column])} at {place} of the input is outside the vocabulary of "
        f"{type(model).__name__}, ids 0 to {vocab - 1}: pass token ids of this model's own tokenizer.")


def _max_positions(model) -> tuple[str | None, int | None]:
    """``(config attribute, value)`` of the longest sequence a model's configuration declares."""
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return name, value
    return None, None


def _forward(model, input_ids, attention_mask):
    if _is_transformer_lens(model):
        import inspect

        # only where the forward names it (a subclass's forward may take *args, **kwargs)
        parameters = inspect.signature(model.forward).parameters
        keyword = ("one_zero_attention_mask" if "one_zero_attention_mask" in parameters
                   and "attention_mask" not in parameters else "attention_mask")
        return model(input_ids, **{keyword: attention_mask})
    position_ids = _positions_past_padding(model, attention_mask)
    if position_ids is None:
        return model(input_ids=input_ids, attention_mask=attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def _numbers_positions_itself(model) -> bool:
    """Whether a model numbers a padded row's positions itself: OPT from the attention mask, and
    the RoBERTa family (RoBERTa, XLM-R, data2vec-text, MPNet, ...) from its pad tokens, which its
    position table marks with a ``padding_idx``.  Left padding is right for them as it is."""
    if getattr(getattr(model, "config", None), "model_type", None) == "opt":
        return True
    return any(isinstance(module, nn.Embedding) and module.padding_idx is not None and "position" in name
               for name, module in model.named_modules())


def _positions_past_padding(model, attention_mask):
    """``position_ids`` (B, T) that start each row's tokens at 0 after its leading padding, as
    ``generate`` numbers a left-padded batch, for a Hugging Face model given a row with padding
    before its first token; None otherwise.  (GPT-2, BERT and most others number positions by
    slot: a left-padded token would be read at the position of its slot, and its activations
    silently be another position's.)  A hole inside a row keeps the slot numbering the model
    gives it itself; only the leading padding is taken off."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.long)
    real = mask > 0
    leading = torch.where(real.any(dim=-1), real.to(torch.int8).argmax(dim=-1), 0)  # zeros before the first 1
    if not bool((leading > 0).any()) or _numbers_positions_itself(model):
        return None
    import inspect

    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"some rows of attention_mask have padding before their tokens (left padding), but "
            f"{type(model).__name__} numbers positions by slot and takes no position_ids: its activations "
            f"would be those of shifted positions. Pad on the right (tokenizer.padding_side = 'right').")
    slots = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return (slots - leading.unsqueeze(-1)).clamp_min(0)


def logits_of(output) -> torch.Tensor:
    """The logits of a forward pass: Hugging Face's ``output.logits`` or TransformerLens's tensor."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _get_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _blocks(model) -> nn.ModuleList:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a Hugging Face transformers model (a torch.nn.Module), got "
            f"{type(model).__name__}. Load one with e.g. AutoModel.from_pretrained(path)."
        )
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        # BART's decoder.layers would be found, and read on the shifted decoder input with the
        # whole encoder input in view: not the layer a user of a token's activations means.
        raise _Unsupported(
            _unsupported_message(f"model ({type(inner).__name__}) is an encoder-decoder model; only decoder-only "
                                 f"and encoder-only models are read."))
    candidates = [inner]
    base = getattr(inner, "base_model", None)
    if isinstance(base, nn.Module) and base is not inner:
        candidates.insert(0, base)
    for root in candidates:
        for path in _LAYER_LISTS:
            blocks = _get_path(root, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return blocks
    raise _Unsupported(
        _unsupported_message(
            f"model ({type(inner).__name__}) has no list of transformer blocks at any of "
            f"{', '.join(_LAYER_LISTS)}."
        )
    )


def _check_layer(layer, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer must be an int (0-based block index), got {type(layer).__name__} {layer!r}.")
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer={layer} is out of range: the model has {n_layers} blocks; pass 0 <= layer < "
            f"{n_layers} (or a negative index counting from the end)."
        )
    return int(layer) % n_layers


def _layout(model, layer) -> _Layout:
    blocks = _blocks(model)
    index = _check_layer(layer, len(blocks))
    block = blocks[index]
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Module):
        mlp = getattr(block, "ffn", None)  # DistilBERT
    if isinstance(mlp, nn.Module) and _wrapped(mlp) is not mlp and getattr(mlp, "name", "") is None:
        # a TransformerBridge's "containerless" MLP component (OPT's fc1/fc2 sit on the decoder
        # layer): it wraps the whole layer, attention included, so the block's own modules follow
        mlp = None
    if isinstance(mlp, nn.Module):
        gate, up, down, act = (getattr(mlp, name, None) for name in _GATED_PATTERN)
        if all(isinstance(m, nn.Module) for m in (gate, up, down)) and callable(act):
            return _Layout("gated", index, block, mlp, mlp, mlp, (gate, up, down), act)
        gate_up, down, act = (getattr(mlp, name, None) for name in _FUSED_GATED_PATTERN)
        if isinstance(gate_up, nn.Module) and isinstance(down, nn.Module) and callable(act):
            return _Layout("fused_gated", index, block, mlp, mlp, mlp, (gate_up, down), act)
        # TransformerLens: weights as parameters of the MLP module itself, (d_model, d_mlp) layout
        # (a TransformerBridge's MLP component wraps a Hugging Face MLP instead, matched below)
        bridged = _wrapped(mlp) is not mlp
        W_in, W_out, act = (getattr(mlp, name, None) for name in ("W_in", "W_out", "act_fn"))
        if not bridged and isinstance(W_in, nn.Parameter) and isinstance(W_out, nn.Parameter) and callable(act):
            if getattr(mlp, "ln", None) is not None:  # SoLU: a LayerNorm inside the MLP
                raise _Unsupported(_unsupported_message(
                    f"layer {index}'s MLP normalises its hidden activations ({type(mlp.ln).__name__}, "
                    f"TransformerLens's SoLU-LN), which has no closed-form Jacobian here."))
            gated = isinstance(getattr(mlp, "W_gate", None), nn.Parameter)
            return _Layout("lens_gated" if gated else "lens", index, block, mlp, mlp, mlp, (mlp,), act)
        for first_name, second_name, act_name in _ELEMENTWISE_PATTERNS:
            first, second, act = (getattr(mlp, n, None) for n in (first_name, second_name, act_name))
            if isinstance(first, nn.Module) and isinstance(second, nn.Module) and callable(act):
                return _Layout("elementwise", index, block, mlp, mlp, mlp, (first, second), act)
        if bridged and not isinstance(block, nn.ModuleList):
            # a TransformerBridge adds an `mlp` component to blocks whose MLP is not one module
            # (BERT's intermediate/output, OPT's fc1/fc2): the block's own modules follow
            return _layout_of_block(block, index, model)
        children = ", ".join(name for name, _ in mlp.named_children()) or "none"
        raise _Unsupported(
            _unsupported_message(
                f"layer {index} of {type(_unwrap(model)).__name__} has an MLP module of type "
                f"{type(mlp).__name__} with sub-modules ({children}) that match no supported layout."
            )
        )
    return _layout_of_block(block, index, model)


def _layout_of_block(block, index, model) -> _Layout:
    """The layout of a block without an MLP module: BERT's or OPT's."""
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    first, second = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    act = getattr(intermediate, "intermediate_act_fn", None)
    if isinstance(first, nn.Module) and isinstance(second, nn.Module) and callable(act):
        return _Layout("bert", index, block, intermediate, second, None, (first, second), act)
    first, second, act = (getattr(block, name, None) for name in _BLOCK_PATTERN)
    if isinstance(first, nn.Module) and isinstance(second, nn.Module) and callable(act):
        return _Layout("block", index, block, first, second, None, (first, second), act)
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise _Unsupported(
        _unsupported_message(
            f"block {index} of {type(_unwrap(model)).__name__} ({type(block).__name__}, sub-modules: "
            f"{children}) has neither an `mlp` (or `ffn`) module, BERT's `intermediate`/`output` pair "
            f"nor OPT's `fc1`/`fc2`."
        )
    )


def _input_width(layout: _Layout) -> int | None:
    """The width of the MLP input (the rows a harvest or stream captures), read off the first
    weight's shape; None where the module is of an unknown kind (the first rows tell then)."""
    first = _wrapped(layout.linears[0])
    if layout.family in ("lens", "lens_gated"):  # W_in is (d_model, d_mlp)
        return int(first.W_in.shape[0])
    if isinstance(first, nn.Linear):
        return int(first.in_features)
    if type(first).__name__ == "Conv1D" and hasattr(first, "nf"):  # GPT-2: weight is (in, out)
        return int(first.weight.shape[0])
    return None


def _wrapped(module):
    """The module a TransformerBridge component (its ``LinearBridge``) wraps, else ``module``: the
    bridge puts its components in place of the Hugging Face model's own, hooks around them."""
    if type(module).__module__.split(".")[0] == "transformer_lens":
        inner = getattr(module, "original_component", None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def _affine(module: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-vector weights ``W`` (d_in, d_out) and bias (d_out,) or None, float32 on the CPU."""
    module = _wrapped(module)
    if isinstance(module, nn.Linear):
        W = module.weight.T
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is (in, out)
        W = module.weight
    else:
        raise _Unsupported(
            _unsupported_message(
                f"{where} is a {type(module).__name__}, not torch.nn.Linear or GPT-2's Conv1D."
            )
        )
    bias = getattr(module, "bias", None)

    def cpu32(t):
        return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).clone()

    return cpu32(W), cpu32(bias)


def _activation_name(act, where: str) -> str:
    """Identify a Hugging Face activation by its values on a grid (robust to class renames)."""
    # A wide grid: a clipped variant (GPT-2's "gelu_10") equals its activation up to the clip.
    for dtype in (torch.float64, torch.float32):
        z = torch.linspace(-40.0, 40.0, 3201, dtype=dtype)
        try:
            with torch.no_grad():
                values = act(z).to(torch.float64)
        except Exception:  # an activation that only runs in float32 or on its own device
            continue
        z = z.to(torch.float64)
        for name in ACTIVATIONS:
            expected = activation(name, z)
            if values.shape == expected.shape and torch.all(
                (values - expected).abs() <= 1e-5 * (1 + expected.abs())
            ):
                return name
        break
    raise _Unsupported(
        _unsupported_message(
            f"{where} is {act!r}, which matches none of the closed-form activations {ACTIVATIONS} "
            f"(checked numerically on [-40, 40])."
        )
    )


# Every module in eval mode under some _eval_mode, by identity: (entries not yet left, the flag it had
# before the first).  Two reads of one model in two threads (or one inside another) overlap: the
# flag saved is the one from before the first, put back when the last leaves, not the eval mode
# the other read had set.
_HELD_IN_EVAL: dict[int, tuple[nn.Module, int, bool]] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """``module`` and all its submodules in eval mode, then each submodule's own ``training`` flag
    put back (also on error): a model in train mode with a frozen block in eval mode, or in eval
    mode with MC dropout on, is left as the user set it, not flattened to the root's flag."""
    registered = []  # the submodules this entry holds: only those are released (an interrupt can
    # land halfway through; entries left behind would pin the model and its flags for good)
    try:
        with _HELD_LOCK:
            for sub in module.modules():
                _, count, flag = _HELD_IN_EVAL.get(id(sub), (sub, 0, sub.training))
                _HELD_IN_EVAL[id(sub)] = (sub, count + 1, flag)
                registered.append(sub)
                # the attribute itself, not eval(): a module's own train() override runs no code here
                sub.training = False
        yield
    finally:
        with _HELD_LOCK:
            for sub in registered:
                _, count, flag = _HELD_IN_EVAL.pop(id(sub))
                if count > 1:
                    _HELD_IN_EVAL[id(sub)] = (sub, count - 1, flag)
                else:  # the attribute itself: train() would set the submodules too
                    sub.training = flag


def _build(layout: _Layout):
    where = f"layer {layout.layer}"
    if layout.family == "gated":
        gate, up, down = layout.linears
        W_gate, b_gate = _affine(gate, f"{where} mlp.gate_proj")
        W_up, b_up = _affine(up, f"{where} mlp.up_proj")
        W_down, b_down = _affine(down, f"{where} mlp.down_proj")
        name = _activation_name(layout.act, f"{where} mlp.act_fn")
        return GatedMLP(W_gate, W_up, W_down, b_gate, b_up, b_down, activation=name)
    if layout.family in ("lens", "lens_gated"):
        (mlp,) = layout.linears

        def cpu32(name):
            return getattr(mlp, name).detach().to(device="cpu", dtype=torch.float32).clone()

        name = _activation_name(layout.act, f"{where} mlp.act_fn")
        if layout.family == "lens":
            return ElementwiseMLP(cpu32("W_in"), cpu32("b_in"), cpu32("W_out"), cpu32("b_out"), name)
        # act(x W_gate) * (x W_in) + b_in, then W_out: b_in adds b_in W_out to the output bias
        W_out = cpu32("W_out")
        b_down = cpu32("b_out") + cpu32("b_in") @ W_out
        return GatedMLP(cpu32("W_gate"), cpu32("W_in"), W_out, None, None, b_down, activation=name)
    if layout.family == "fused_gated":
        gate_up, down = layout.linears
        W_gate_up, b_gate_up = _affine(gate_up, f"{where} mlp.gate_up_proj")
        W_down, b_down = _affine(down, f"{where} mlp.down_proj")
        d_mlp = W_down.shape[0]
        if W_gate_up.shape[1] != 2 * d_mlp:
            raise _Unsupported(_unsupported_message(
                f"{where} mlp.gate_up_proj has {W_gate_up.shape[1]} outputs, not twice mlp.down_proj's "
                f"{d_mlp} inputs, so it does not split into a gate and an up projection."))

        def halves(t):
            return (None, None) if t is None else (t[..., :d_mlp].contiguous(), t[..., d_mlp:].contiguous())

        (W_gate, W_up), (b_gate, b_up) = halves(W_gate_up), halves(b_gate_up)
        name = _activation_name(layout.act, f"{where} mlp.activation_fn")
        return GatedMLP(W_gate, W_up, W_down, b_gate, b_up, b_down, activation=name)
    first, second = layout.linears
    W_in, b_in = _affine(first, f"{where} first MLP linear")
    W_out, b_out = _affine(second, f"{where} second MLP linear")
    name = _activation_name(layout.act, f"{where} MLP activation")
    return ElementwiseMLP(W_in, b_in, W_out, b_out, name)


def _verify(mlp, layout: _Layout, model_name: str) -> None:
    """Check ``mlp`` against the Hugging Face modules on random inputs; raise if they differ."""
    param = next(layout.block.parameters())
    x = torch.randn(16, mlp.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _eval_mode(layout.block):
        expected = layout.forward(x.to(device=param.device, dtype=param.dtype))
        expected = expected.to(device="cpu", dtype=torch.float32)
        got = mlp(x)
    tol = 1e-4 if param.dtype in (torch.float32, torch.float64) else 5e-2
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    if not error <= tol:
        raise _Unsupported(
            _unsupported_message(
                f"layer {layout.layer} of {model_name} has the module names of a supported MLP, but "
                f"its forward differs from the closed form (relative error {error:.2e} > {tol:.0e} on "
                f"random inputs): it is not a plain {layout.family} MLP."
            )
        )


def mlp_of(model, layer, *, verify=True):
    """The MLP of block ``layer`` as a frozen module with a closed-form Jacobian.

    Parameters
    ----------
    model : transformers.PreTrainedModel, transformer_lens.HookedTransformer or TransformerBridge
        A loaded model of a supported architecture (:data:`SUPPORTED_ARCHITECTURES`), with or
        without a task head (``GPT2LMHeadModel`` and ``GPT2Model`` both work); a
        sentence-transformers ``SentenceTransformer`` is unwrapped to its transformer.  A
        TransformerLens model's MLP is read from its ``W_in``/``W_out`` (``W_gate``) parameters,
        so folded LayerNorm weights (``fold_ln=True``) are part of it, as in TransformerLens; a
        ``TransformerBridge`` is read through the Hugging Face model it wraps and runs (with the
        weights its compatibility mode processed in place).
    layer : int
        0-based block index; negative values count from the end.
    verify : bool, default=True
        Check on 16 random inputs that the returned module reproduces the Hugging Face
        modules (relative Frobenius error below 1e-4 for float32/float64 models, 5e-2 for
        half precision) and raise ``ValueError`` otherwise.

    Returns
    -------
    mlp : ElementwiseMLP or GatedMLP
        A CPU float32 ``torch.nn.Module`` mapping ``x`` (n, d_model) to ``y`` (n, d_model),
        the MLP input (after the block's normalisation) to the MLP output (before dropout,
        residual addition and any output normalisation).  Weights are copies; the model
        is not modified.  ``copy.deepcopy(mlp).to(torch.float64)`` gives a float64 copy of the
        same map (``.to`` converts a module in place).

        - GPT-2, GPT-J, GPT-NeoX, Phi, BERT, DistilBERT, OPT:
          :class:`~sklearn_jsae.mlp.ElementwiseMLP`,
          ``act(x @ W_in + b_in) @ W_out + b_out`` (GPT-2's ``gelu_new`` is ``"gelu_tanh"``,
          BERT's and Pythia's ``gelu`` the exact erf GELU).
        - LLaMA-style: :class:`~sklearn_jsae.mlp.GatedMLP`,
          ``(silu(x @ W_gate) * (x @ W_up)) @ W_down`` (biases only if the model has them).
        - Phi-3-style: the same :class:`~sklearn_jsae.mlp.GatedMLP`, with ``W_gate`` and ``W_up``
          the first and second half of the fused ``gate_up_proj``.
        - TransformerLens: :class:`~sklearn_jsae.mlp.ElementwiseMLP` or, for gated MLPs,
          :class:`~sklearn_jsae.mlp.GatedMLP` (TransformerLens adds ``b_in`` after the product;
          it is folded into the output bias).

    Raises
    ------
    ValueError
        If the architecture or activation is not supported; the message lists what is and
        how to use any torch callable instead.

    See Also
    --------
    harvest : capture the inputs and outputs of the same MLP on real text.
    mlp_hook_points : the modules whose forward hooks see the MLP input and output.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from sklearn_jsae.hf import mlp_of
    >>> torch.manual_seed(0) and None
    >>> model = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50))
    >>> mlp = mlp_of(model, layer=1)
    >>> mlp.activation, mlp.W_in.shape
    ('gelu_tanh', torch.Size([16, 64]))
    >>> x = torch.randn(4, 16)
    >>> bool(torch.allclose(mlp(x), model.eval().h[1].mlp(x), atol=1e-6))
    True
    """
    layout = _layout(model, layer)
    mlp = _build(layout)
    if verify:
        _verify(mlp, layout, type(_unwrap(model)).__name__)
    return mlp


def mlp_hook_points(model, layer):
    """The modules whose forward hooks see block ``layer``'s MLP input and output.

    Parameters
    ----------
    model : transformers.PreTrainedModel, transformer_lens.HookedTransformer or TransformerBridge
        A model of a supported architecture.
    layer : int
        0-based block index; negative values count from the end.

    Returns
    -------
    input_module : torch.nn.Module
        The first positional argument of its ``forward`` is the MLP input (n_seq, seq_len, d_model).
    output_module : torch.nn.Module
        Its ``forward`` returns the MLP output (n_seq, seq_len, d_model); replacing that return
        value in a forward hook splices a different MLP output into the model.

    Notes
    -----
    For every architecture with a single MLP module (GPT-2, GPT-NeoX, LLaMA, DistilBERT's
    ``ffn``, ...) both are that module (:func:`mlp_module`).  For BERT-style encoders the MLP is
    split across two modules: ``input_module`` is ``block.intermediate`` (dense + activation) and
    ``output_module`` is ``block.output.dense`` (the output projection, before dropout, the
    residual addition and the LayerNorm that ``block.output`` also applies).  For OPT they are
    the decoder layer's ``fc1`` and ``fc2`` (the layer applies the activation between them).
    """
    layout = _layout(model, layer)
    return layout.input_module, layout.output_module


def mlp_module(model, layer):
    """The Hugging Face module whose forward maps block ``layer``'s MLP input to its output.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a supported architecture other than BERT-style encoders and OPT.
    layer : int
        0-based block index; negative values count from the end.

    Returns
    -------
    module : torch.nn.Module
        E.g. ``model.transformer.h[layer].mlp`` for GPT-2, ``model.model.layers[layer].mlp``
        for LLaMA.  Its forward takes (n_seq, seq_len, d_model) and returns the same shape.

    Raises
    ------
    ValueError
        For BERT-style encoders, where no single module computes exactly the MLP
        (``block.output`` also adds the residual and applies a LayerNorm), and for OPT, whose
        decoder layer calls ``fc1``, the activation and ``fc2`` itself: use
        :func:`mlp_hook_points` there.
    """
    layout = _layout(model, layer)
    if layout.mlp_module is None:
        where = ("`intermediate` and `output.dense` (BERT-style)" if layout.family == "bert"
                 else "`fc1` and `fc2`, with the activation applied by the decoder layer (OPT)")
        raise ValueError(
            f"layer {layout.layer} of {type(_unwrap(model)).__name__} splits its MLP across {where}, "
            f"so no single module computes it. Use mlp_hook_points(model, layer) -> "
            f"(input_module, output_module) instead."
        )
    return layout.mlp_module

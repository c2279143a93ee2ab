"""Where a Hugging Face model's MLP input and output can be hooked, by module name.

SAELens (``model_class_name="AutoModelForCausalLM"``) and sparsify both read an activation as
the *output* of a named module.  The MLP output is the output of
:func:`sklearn_jsae.hf.mlp_hook_points`' output module.  The MLP input is the *input* of a
module, so the module that produces it is found by running the model on four tokens, stopping
as soon as the MLP is reached, and picking the module inside the block whose output is that very
tensor object (GPT-2's ``ln_2``, Llama's ``post_attention_layernorm``, GPT-J's shared ``ln_1``,
BERT's ``attention.output.LayerNorm``): identity, not equality, so the name is exact.

A TransformerLens ``TransformerBridge`` is read through the Hugging Face model it wraps (sparsify's
hookpoints are that model's module names), and SAELens hooks it by its own hook point names, which
differ between architectures (Llama's MLP input is ``blocks.3.mlp.hook_in``, BERT's
``blocks.3.hook_mlp_in``): the bridge is run on the same four tokens and the names whose cached
tensors equal the MLP's input and output are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._thread_hooks import this_threads_forward_hook, this_threads_pre_hook


@dataclass
class MLPHookpoints:
    """Names of the modules whose outputs are one layer's MLP input and output.

    ``input`` and ``output`` are relative to ``model.base_model`` (sparsify's hookpoints);
    ``prefix`` is the base model's attribute in its ``*ForCausalLM`` class (``"transformer"``,
    ``"model"``, ...), so ``f"{prefix}.{input}"`` is the name SAELens' ``HookedProxyLM`` hooks.
    ``model_name`` is ``model.name_or_path`` (a hub id or a local folder), None when empty.
    ``lens``: a TransformerLens model, whose names are its hook points
    (``blocks.3.ln2.hook_normalized``, ``blocks.3.hook_mlp_out``), the names SAELens hooks on a
    ``HookedTransformer``; sparsify has none.  ``bridge``: a ``TransformerBridge``'s hook point
    names (input, output; None where no hook point holds that activation), which SAELens hooks
    on it, while ``input``/``output`` are its Hugging Face model's, for sparsify.
    """

    input: str | None
    output: str
    prefix: str
    model_name: str | None
    lens: bool = False
    bridge: tuple[str | None, str | None] | None = None

    def saelens(self, side: str) -> str | None:
        if self.bridge is not None:
            return self.bridge[0] if side == "input" else self.bridge[1]
        name = self.input if side == "input" else self.output
        return None if name is None else f"{self.prefix}.{name}" if self.prefix else name

    def sparsify(self, side: str) -> str | None:
        return self.input if side == "input" else self.output


def _named_modules(root):
    """``root.named_modules()`` with the Hugging Face names: inside a TransformerBridge's component
    (put in place of a module of the model) only its ``_original_component``, the module it wraps,
    is followed, under the component's own name, so the bridge's aliases (``ln2``, ``mlp.in``) and
    its ``_original_component`` segments never appear."""
    from .hf._adapters import _wrapped

    seen = {id(root)}
    found = [("", root)]

    def visit(module, path):
        bridged = _wrapped(module) is not module
        for child_name, child in module.named_children():
            if bridged and child_name != "_original_component":
                continue
            child_path = path if bridged else f"{path}.{child_name}" if path else child_name
            if id(child) not in seen:
                seen.add(id(child))
                found.append((child_path, child))
                visit(child, child_path)

    visit(root, "")
    return found


class _Reached(Exception):
    """Raised by the MLP's pre-hook once its input is captured: later layers never run."""


def mlp_hookpoints(model, layer) -> MLPHookpoints:
    """The hookpoints of block ``layer``'s MLP in ``model`` (a supported Hugging Face or
    TransformerLens model)."""
    import torch

    from .hf._adapters import _eval_mode, _is_bridge, _is_transformer_lens, _layout, _unwrap, run_model

    inner = _unwrap(model)
    base = getattr(inner, "base_model", inner)
    layout = _layout(model, layer)
    names = {id(module): name for name, module in _named_modules(base)}
    if id(layout.output_module) not in names or id(layout.block) not in names:
        raise ValueError(f"layer {layer}'s MLP is not a sub-module of {type(base).__name__}.")
    block_name = names[id(layout.block)]
    inside_mlp = {id(m) for part in (layout.input_module, layout.output_module) for m in part.modules()}

    produced: list[tuple[str, object]] = []
    received: list[object] = []

    def recorder(name):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) and output else output
            if isinstance(first, torch.Tensor):
                produced.append((name, first))
        return hook

    def grab(module, args, kwargs):
        received.append(args[0] if args else kwargs.get("hidden_states"))
        raise _Reached

    lens = _is_transformer_lens(inner)
    # TransformerLens hooks only its HookPoint modules, and an unfolded LayerNorm's output is none
    # (its hook_normalized comes before the affine weights): then there is no input hook name
    # The hooks are on the user's model, which other threads may run meanwhile: they act on this
    # thread's forward pass only (grab stopped another thread's forward with _Reached).
    handles = [this_threads_forward_hook(module, recorder(f"{block_name}.{name}" if name else block_name))
               for name, module in _named_modules(layout.block)
               if id(module) not in inside_mlp and (not lens or type(module).__name__ == "HookPoint")]
    handles.append(this_threads_pre_hook(layout.input_module, grab))
    parameter = next(inner.parameters())
    config = getattr(inner, "config", None) or getattr(inner, "cfg", None)  # Hugging Face / TransformerLens
    vocab = int(getattr(config, "vocab_size", None) or getattr(config, "d_vocab", None) or 8)
    ids = torch.arange(1, 5, device=parameter.device).clamp(max=vocab - 1).unsqueeze(0)
    try:
        with torch.no_grad(), _eval_mode(inner):
            run_model(inner, ids, torch.ones_like(ids))
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    input_name = None
    if received:
        input_name = next((name for name, t in produced if t is received[0]), None)
    if lens:  # the hook points: the input one found above, hook_mlp_out
        output = f"{block_name}.hook_mlp_out"
        if not isinstance(getattr(layout.block, "hook_mlp_out", None), torch.nn.Module):
            output = names[id(layout.output_module)]
        return MLPHookpoints(input=input_name, output=output, prefix="",
                             model_name=getattr(inner.cfg, "model_name", None) or None, lens=True)
    name_or_path = getattr(inner, "name_or_path", "") or getattr(inner.config, "_name_or_path", "")
    return MLPHookpoints(
        input=input_name,
        output=names[id(layout.output_module)],
        prefix=getattr(type(base), "base_model_prefix", "") or "",
        # a bridge's name is the one its boot_transformers took (SAELens' SAETransformerBridge too)
        model_name=(_is_bridge(model) and getattr(model.cfg, "model_name", None)) or str(name_or_path) or None,
        bridge=_bridge_hook_names(model, layout, ids) if _is_bridge(model) else None,
    )


# Preferred first: the alias names SAELens' released SAEs use, then the bridge's canonical ones
# (its MLP component's, then those of the MLP's first and last projections).
_BRIDGE_INPUT_NAMES = ("hook_mlp_in", "mlp.hook_in", "mlp.in.hook_in", "ln2.hook_out")
_BRIDGE_OUTPUT_NAMES = ("hook_mlp_out", "mlp.hook_out", "mlp.out.hook_out")


def _bridge_hook_names(bridge, layout, ids) -> tuple[str | None, str | None]:
    """The hook point names of ``bridge``'s block ``layout.layer`` whose values, on ``ids``, are
    exactly the MLP's input and output as the Hugging Face modules see them (None where none is)."""
    import torch

    from .hf._adapters import _eval_mode

    inner = bridge.__dict__["original_model"]
    seen = {}

    def grab_input(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs.get("hidden_states")).detach().clone()

    def grab_output(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        seen["output"] = first.detach().clone()

    block = f"blocks.{layout.layer}."
    # on this thread's forward only, as above: another thread's forward meanwhile is not the probe's
    handles = [this_threads_pre_hook(layout.input_module, grab_input),
               this_threads_forward_hook(layout.output_module, grab_output)]
    try:
        with torch.no_grad(), _eval_mode(inner):
            # no names_filter: with one the cache leaves out alias names (hook_mlp_in)
            _, cache = bridge.run_with_cache(ids)
    finally:
        for handle in handles:
            handle.remove()

    def matching(side, preferred):
        target = seen.get(side)
        if target is None:
            return None
        ranked = [block + name for name in preferred] + sorted(n for n in cache.keys() if n.startswith(block))
        for name in ranked:
            value = cache[name] if name in cache else None
            # rows of the last dimension: OPT calls its MLP on (n_seq · seq_len, d) tokens
            if (isinstance(value, torch.Tensor) and value.shape[-1:] == target.shape[-1:]
                    and value.numel() == target.numel()
                    and torch.equal(value.reshape(-1, value.shape[-1]), target.reshape(-1, target.shape[-1]))):
                return name
        return None

    return matching("input", _BRIDGE_INPUT_NAMES), matching("output", _BRIDGE_OUTPUT_NAMES)

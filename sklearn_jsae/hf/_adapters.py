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
residual addition or output normalisation) of every non-padding token.  Nothing here
downloads anything: every function takes a model object.

Supported architectures (:data:`SUPPORTED_ARCHITECTURES`): GPT-2, GPT-J, GPT-NeoX /
Pythia, Phi, LLaMA-style gated MLPs (Llama, Mistral, Qwen2/3, Gemma, SmolLM2, ...) and
BERT-style encoders (BERT, RoBERTa, MiniLM, ...).  For anything else pass a torch
callable ``(n, d_in) -> (n, d_out)`` as ``JacobianSparseAutoencoder(mlp=...)``: its
Jacobian is then computed exactly by autograd (slower).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._backend.mlp import ACTIVATIONS, ElementwiseMLP, GatedMLP, activation

__all__ = ["SUPPORTED_ARCHITECTURES", "harvest", "mlp_hook_points", "mlp_module", "mlp_of"]

SUPPORTED_ARCHITECTURES = (
    "GPT-2 (mlp.c_fc / mlp.c_proj, Conv1D)",
    "GPT-J (mlp.fc_in / mlp.fc_out)",
    "GPT-NeoX / Pythia (mlp.dense_h_to_4h / mlp.dense_4h_to_h)",
    "Phi (mlp.fc1 / mlp.fc2)",
    "LLaMA-style gated MLPs: Llama, Mistral, Qwen2/3, Gemma, SmolLM2, ... "
    "(mlp.gate_proj / mlp.up_proj / mlp.down_proj)",
    "BERT-style encoders: BERT, RoBERTa, MiniLM, ... (intermediate.dense / output.dense)",
)

# (first linear, second linear, activation) attribute names of Linear -> act -> Linear MLPs.
_ELEMENTWISE_PATTERNS = (
    ("c_fc", "c_proj", "act"),  # GPT-2 (Conv1D)
    ("dense_h_to_4h", "dense_4h_to_h", "act"),  # GPT-NeoX / Pythia
    ("fc_in", "fc_out", "act"),  # GPT-J
    ("fc1", "fc2", "activation_fn"),  # Phi
)
_GATED_PATTERN = ("gate_proj", "up_proj", "down_proj", "act_fn")
_LAYER_LISTS = ("h", "layers", "encoder.layer", "transformer.h", "model.layers", "gpt_neox.layers")


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

    family: str  # "elementwise" | "gated" | "bert"
    layer: int
    block: nn.Module
    input_module: nn.Module  # forward input (first argument) is the MLP input
    output_module: nn.Module  # forward output is the MLP output
    mlp_module: nn.Module | None  # one module doing both, None for BERT
    linears: tuple
    act: object

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP computed by the Hugging Face modules themselves (x (n, d_in) -> (n, d_out))."""
        if self.family == "bert":
            return self.output_module(self.input_module(x))
        return self.mlp_module(x)


def _unwrap(model):
    """The transformers model inside a sentence-transformers wrapper, else ``model``."""
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
    if isinstance(mlp, nn.Module):
        gate, up, down, act = (getattr(mlp, name, None) for name in _GATED_PATTERN)
        if all(isinstance(m, nn.Module) for m in (gate, up, down)) and callable(act):
            return _Layout("gated", index, block, mlp, mlp, mlp, (gate, up, down), act)
        for first_name, second_name, act_name in _ELEMENTWISE_PATTERNS:
            first, second, act = (getattr(mlp, n, None) for n in (first_name, second_name, act_name))
            if isinstance(first, nn.Module) and isinstance(second, nn.Module) and callable(act):
                return _Layout("elementwise", index, block, mlp, mlp, mlp, (first, second), act)
        children = ", ".join(name for name, _ in mlp.named_children()) or "none"
        raise _Unsupported(
            _unsupported_message(
                f"layer {index} of {type(_unwrap(model)).__name__} has an MLP module of type "
                f"{type(mlp).__name__} with sub-modules ({children}) that match no supported layout."
            )
        )
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    first, second = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    act = getattr(intermediate, "intermediate_act_fn", None)
    if isinstance(first, nn.Module) and isinstance(second, nn.Module) and callable(act):
        return _Layout("bert", index, block, intermediate, second, None, (first, second), act)
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise _Unsupported(
        _unsupported_message(
            f"block {index} of {type(_unwrap(model)).__name__} ({type(block).__name__}, sub-modules: "
            f"{children}) has neither an `mlp` module nor BERT's `intermediate`/`output` pair."
        )
    )


def _affine(module: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-vector weights ``W`` (d_in, d_out) and bias (d_out,) or None, float32 on the CPU."""
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
    for dtype in (torch.float64, torch.float32):
        z = torch.linspace(-8.0, 8.0, 641, dtype=dtype)
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
            f"(checked numerically on [-8, 8])."
        )
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _build(layout: _Layout):
    where = f"layer {layout.layer}"
    if layout.family == "gated":
        gate, up, down = layout.linears
        W_gate, b_gate = _affine(gate, f"{where} mlp.gate_proj")
        W_up, b_up = _affine(up, f"{where} mlp.up_proj")
        W_down, b_down = _affine(down, f"{where} mlp.down_proj")
        name = _activation_name(layout.act, f"{where} mlp.act_fn")
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
    model : transformers.PreTrainedModel
        A loaded model of a supported architecture (:data:`SUPPORTED_ARCHITECTURES`), with or
        without a task head (``GPT2LMHeadModel`` and ``GPT2Model`` both work); a
        sentence-transformers ``SentenceTransformer`` is unwrapped to its transformer.
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
        is not modified.  ``mlp.to(torch.float64)`` gives a float64 copy of the same map.

        - GPT-2, GPT-J, GPT-NeoX, Phi, BERT: :class:`~sklearn_jsae.mlp.ElementwiseMLP`,
          ``act(x @ W_in + b_in) @ W_out + b_out`` (GPT-2's ``gelu_new`` is ``"gelu_tanh"``,
          BERT's and Pythia's ``gelu`` the exact erf GELU).
        - LLaMA-style: :class:`~sklearn_jsae.mlp.GatedMLP`,
          ``(silu(x @ W_gate) * (x @ W_up)) @ W_down`` (biases only if the model has them).

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
    model : transformers.PreTrainedModel
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

    For every architecture with a single MLP module (GPT-2, GPT-NeoX, LLaMA, ...) both are
    that module (:func:`mlp_module`).  For BERT-style encoders the MLP is split across two
    modules: ``input_module`` is ``block.intermediate`` (dense + activation) and
    ``output_module`` is ``block.output.dense`` (the output projection, before dropout, the
    residual addition and the LayerNorm that ``block.output`` also applies).
    """
    layout = _layout(model, layer)
    return layout.input_module, layout.output_module


def mlp_module(model, layer):
    """The Hugging Face module whose forward maps block ``layer``'s MLP input to its output.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a supported architecture other than BERT-style encoders.
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
        (``block.output`` also adds the residual and applies a LayerNorm): use
        :func:`mlp_hook_points` there.
    """
    layout = _layout(model, layer)
    if layout.mlp_module is None:
        raise ValueError(
            f"layer {layout.layer} of {type(_unwrap(model)).__name__} splits its MLP across "
            f"`intermediate` and `output.dense` (BERT-style), so no single module computes it. Use "
            f"mlp_hook_points(model, layer) -> (input_module, output_module) instead."
        )
    return layout.mlp_module


# ---------------------------------------------------------------------------------------- harvest


class _HarvestStop(Exception):
    """Raised by the output hook once the layer's MLP has run: later layers are skipped."""


_HEADER_BYTES = 128  # fixed .npy v1.0 header size, so the shape can be written at the end


class _NpyWriter:
    """Append rows of a fixed width and dtype to a ``.npy`` file; the header is written on close."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.rows, self.width = 0, None
        self.file = open(path, "wb")
        self.file.write(b"\0" * _HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.width = rows.shape[1:] if self.width is None else self.width
        self.file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        shape = (self.rows, *(self.width or ()))
        header = repr(
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        )
        prefix = b"\x93NUMPY\x01\x00"
        body_len = _HEADER_BYTES - len(prefix) - 2
        header = header.encode("latin1").ljust(body_len - 1) + b"\n"
        if len(header) != body_len:  # never for 1-D / 2-D shapes below 10**30 rows
            raise RuntimeError(f"npy header too long for {self.path}: {header!r}")
        self.file.seek(0)
        self.file.write(prefix + body_len.to_bytes(2, "little") + header)
        self.file.close()


class _MemorySink:
    def __init__(self):
        self.chunks = {"X": [], "Y": [], "token_ids": []}

    def append(self, name, rows):
        self.chunks[name].append(rows)

    def result(self, dtype):
        out = {}
        for name, chunks in self.chunks.items():
            out[name] = np.concatenate(chunks) if chunks else None
        return out

    def abort(self):
        pass


class _FileSink:
    def __init__(self, folder: Path, dtype):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.writers = {
            "X": _NpyWriter(folder / "X.npy", dtype),
            "Y": _NpyWriter(folder / "Y.npy", dtype),
            "token_ids": _NpyWriter(folder / "token_ids.npy", np.int32),
        }

    def append(self, name, rows):
        self.writers[name].append(rows)

    def result(self, dtype):
        for writer in self.writers.values():
            writer.close()
        return {name: np.load(w.path, mmap_mode="r") for name, w in self.writers.items()}

    def abort(self):
        for writer in self.writers.values():
            writer.file.close()
            with contextlib.suppress(OSError):
                os.remove(writer.path)


def _check_positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{none}, got {value!r}.")
    return int(value)


def _special_ids(model, tokenizer) -> set[int]:
    if tokenizer is not None:
        return {int(i) for i in tokenizer.all_special_ids}
    config = getattr(_unwrap(model), "config", None)
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id")
    ids = set()
    for name in names:
        value = getattr(config, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, numbers.Integral):
                ids.add(int(v))
    return ids


def _pad(sequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of token-id lists: ids and mask, both (n_seq, max_len) int64."""
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), max(length, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _text_batches(texts, tokenizer, batch_size, max_length):
    if isinstance(texts, str):
        texts = [texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = []

    def encode(batch):
        kwargs = {"truncation": True, "max_length": max_length} if max_length is not None else {}
        encoded = tokenizer(list(batch), **kwargs)["input_ids"]
        return _pad(encoded, pad_id)

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(
                f"texts must be strings; got an item of type {type(text).__name__}: {text!r:.60}."
            )
        batch.append(text)
        if len(batch) == batch_size:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)


def _id_batches(input_ids, attention_mask, batch_size):
    if isinstance(input_ids, (torch.Tensor, np.ndarray)):
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        if attention_mask is not None:
            if not isinstance(attention_mask, (torch.Tensor, np.ndarray)):
                attention_mask = np.asarray(attention_mask)
            attention_mask = attention_mask if attention_mask.ndim == 2 else attention_mask.reshape(1, -1)
            if tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                    f"{tuple(ids.shape)}; pass a mask of the same shape (1 = real token, 0 = padding)."
                )

        def rows(array, start):
            block = array[start : start + batch_size]
            block = block if isinstance(block, torch.Tensor) else torch.as_tensor(np.asarray(block))
            return block.to(device="cpu", dtype=torch.long)

        for start in range(0, ids.shape[0], batch_size):
            chunk = rows(ids, start)
            yield chunk, torch.ones_like(chunk) if attention_mask is None else rows(attention_mask, start)
        return
    # a list of (possibly ragged) token-id sequences
    if attention_mask is not None:
        raise ValueError(
            "attention_mask is only accepted with a 2-D input_ids array or tensor; for a list of "
            "sequences of different lengths leave attention_mask=None (padding is added internally)."
        )
    sequences = list(input_ids)
    for start in range(0, len(sequences), batch_size):
        yield _pad(sequences[start : start + batch_size], 0)


def _progress_bar(progress, total):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, unit="tok", desc="harvest")


def harvest(
    model,
    layer,
    texts=None,
    *,
    tokenizer=None,
    input_ids=None,
    attention_mask=None,
    n_tokens=None,
    batch_size=8,
    max_length=128,
    exclude_special_tokens=False,
    out=None,
    dtype=np.float32,
    return_tokens=False,
    progress=True,
):
    """Capture the inputs and outputs of block ``layer``'s MLP on real tokens.

    The model runs in eval mode under ``torch.no_grad``; forward hooks on
    :func:`mlp_hook_points` record the MLP input (after the block's normalisation) and
    output (before dropout, residual and output normalisation) of every token whose
    attention-mask entry is 1, in order (sequence by sequence, position by position).  The
    forward pass stops right after the layer's MLP, so later layers cost nothing.  The
    model's training flag is restored and the hooks removed afterwards, even on error.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A loaded model of a supported architecture (see :func:`mlp_of`); never downloaded here.
    layer : int
        0-based block index; negative values count from the end.
    texts : iterable of str, optional
        Raw texts, tokenised one batch at a time with ``tokenizer`` (each text becomes one
        sequence, truncated to ``max_length`` tokens).  Exactly one of ``texts`` and
        ``input_ids`` must be given.
    tokenizer : transformers tokenizer, optional
        Required with ``texts``.  Also used for ``exclude_special_tokens``.
    input_ids : array-like of int, optional
        Token ids: a 2-D array or tensor (n_seq, seq_len), or a list of sequences of any
        lengths (padded internally).  Read one batch at a time, so a memmap works.
    attention_mask : array-like of {0, 1}, optional
        Same shape as a 2-D ``input_ids``; None means every token is real.
    n_tokens : int, optional
        Stop after this many captured tokens; None means all of them.  If the input runs
        out first a ``UserWarning`` says how many were captured.
    batch_size : int, default=8
        Sequences per forward pass.
    max_length : int or None, default=128
        Truncation length for ``texts``; None keeps the tokenizer's own limit.
    exclude_special_tokens : bool, default=False
        Drop tokens whose id is special: ``tokenizer.all_special_ids`` if a tokenizer is
        given, else the model config's BOS/EOS/PAD/CLS/SEP ids.
    out : str or path-like, optional
        A folder: stream ``X.npy``, ``Y.npy`` and ``token_ids.npy`` there (overwriting them)
        and return read-only memmaps, so runs larger than memory work.  None keeps everything
        in memory.
    dtype : {numpy.float32, numpy.float16}, default=numpy.float32
        Storage dtype of ``X`` and ``Y``.  float16 raises ``ValueError`` if a value overflows.
    return_tokens : bool, default=False
        Also return the token id of each row.
    progress : bool, default=True
        Show a tqdm progress bar (if tqdm is installed).

    Returns
    -------
    X : ndarray or memmap of shape (n_captured, d_model)
        MLP inputs, one row per token.
    Y : ndarray or memmap of shape (n_captured, d_model)
        MLP outputs for the same tokens, ``mlp_of(model, layer)(X) ≈ Y``.
    token_ids : ndarray of shape (n_captured,), int32
        Only if ``return_tokens``.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from sklearn_jsae.hf import harvest, mlp_of
    >>> torch.manual_seed(0) and None
    >>> model = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50))
    >>> ids = torch.randint(0, 50, (3, 10))
    >>> X, Y = harvest(model, 1, input_ids=ids, n_tokens=25, progress=False)
    >>> X.shape, Y.shape
    ((25, 16), (25, 16))
    >>> bool(abs(mlp_of(model, 1)(torch.as_tensor(X)).numpy() - Y).max() < 1e-5)
    True
    """
    layout = _layout(model, layer)
    if (texts is None) == (input_ids is None):
        raise ValueError(
            "pass exactly one of texts (with tokenizer) and input_ids; got "
            + ("neither." if texts is None else "both.")
        )
    if texts is not None and tokenizer is None:
        raise ValueError(
            "texts were given without a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)."
        )
    n_tokens = _check_positive_int(n_tokens, "n_tokens", allow_none=True)
    batch_size = _check_positive_int(batch_size, "batch_size")
    max_length = _check_positive_int(max_length, "max_length", allow_none=True)
    store = np.dtype(dtype)
    if store not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be numpy.float32 or numpy.float16, got {dtype!r}.")
    special = None
    if exclude_special_tokens:
        special = _special_ids(model, tokenizer)
        if not special:
            raise ValueError(
                "exclude_special_tokens=True, but no special token ids are known: pass the tokenizer "
                "(its all_special_ids are used) or set them in model.config."
            )
        special = torch.tensor(sorted(special), dtype=torch.long)
    batches = (
        _text_batches(texts, tokenizer, batch_size, max_length)
        if texts is not None
        else _id_batches(input_ids, attention_mask, batch_size)
    )

    runner = _unwrap(model)
    device = next(runner.parameters()).device
    captured = {}

    def grab_input(module, args, kwargs):
        captured["x"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))

    def grab_output(module, args, output):
        captured["y"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _HarvestStop

    sink = _FileSink(Path(out), store) if out is not None else _MemorySink()
    bar = _progress_bar(progress, n_tokens)
    handles = [
        layout.input_module.register_forward_pre_hook(grab_input, with_kwargs=True),
        layout.output_module.register_forward_hook(grab_output),
    ]
    written = 0
    try:
        with torch.no_grad(), _eval_mode(runner):
            for ids, mask in batches:
                if ids.numel() == 0:
                    continue
                captured.clear()
                try:
                    runner(input_ids=ids.to(device), attention_mask=mask.to(device))
                except _HarvestStop:
                    pass
                if "y" not in captured or "x" not in captured:
                    raise RuntimeError(
                        f"the forward hooks on layer {layout.layer}'s MLP did not fire during "
                        f"{type(runner).__name__}.forward; this model calls its MLP in an unexpected way."
                    )
                keep = mask.bool()
                if special is not None:
                    keep &= ~torch.isin(ids, special)
                keep = keep.to(captured["x"].device)
                x = captured["x"][keep].float().cpu().numpy()
                y = captured["y"][keep].float().cpu().numpy()
                tok = ids.to(keep.device)[keep].cpu().numpy().astype(np.int32)
                if n_tokens is not None:
                    x, y, tok = x[: n_tokens - written], y[: n_tokens - written], tok[: n_tokens - written]
                with np.errstate(over="ignore"):  # float16 overflow is reported just below
                    x_store, y_store = x.astype(store), y.astype(store)
                if store == np.float16 and not (np.isfinite(x_store).all() and np.isfinite(y_store).all()):
                    raise ValueError(
                        f"MLP activations of layer {layout.layer} exceed the float16 range (max |x| "
                        f"{np.abs(x).max():.3g}, max |y| {np.abs(y).max():.3g} > 65504): use dtype=np.float32."
                    )
                sink.append("X", x_store)
                sink.append("Y", y_store)
                sink.append("token_ids", tok)
                written += len(x)
                if bar is not None:
                    bar.update(len(x))
                if n_tokens is not None and written >= n_tokens:
                    break
    except BaseException:
        sink.abort()
        raise
    finally:
        for handle in handles:
            handle.remove()
        if bar is not None:
            bar.close()
    if written == 0:
        sink.abort()
        raise ValueError(
            "no tokens were captured: the input is empty, or every token is padding"
            + (" or special (exclude_special_tokens=True)." if special is not None else ".")
        )
    if n_tokens is not None and written < n_tokens:
        warnings.warn(
            f"harvest captured {written} tokens, fewer than n_tokens={n_tokens}: the input ran out. "
            f"Pass more texts / input_ids for more.",
            UserWarning,
            stacklevel=2,
        )
    result = sink.result(store)
    if return_tokens:
        return result["X"], result["Y"], result["token_ids"]
    return result["X"], result["Y"]

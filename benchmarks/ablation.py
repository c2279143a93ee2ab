"""What each fast path of the training step buys: the step rebuilt from plain twins, one change at a time.

Usage::

    python benchmarks/ablation.py [--config minilm] [--steps 4] [--threads N] [--out ablation.json]

Variants (each a full optimiser step on the same problem as ``run.py``, interleaved
round-robin, median of ``--steps`` after one warm-up step):

``v0 initial``       the backend as first written: ``select_topk`` + ``active_values`` (autograd
                     through gathered encoder rows), ``embedding_bag`` decode with its own
                     backward, ``jacobian_blocks(...).abs().sum((1, 2)).mean()`` under autograd;
``v1 +penalty``      v0 with the fused, chunked ``jacobian_penalty``;
``v2 +encoder``      v1 with ``encode_with_grad`` (hand-written encoder backward);
``v3 serial``        the current step (``jsae_step_losses``: v2 + sort-free decode backward and
                     unique) with every chunk loop run serially on the calling thread;
``v4 current``       the current step, chunk loops on per-thread workers (``chunks.run_chunks``);
``authors``          the authors' route of ``routes.py``, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from routes import CONFIGS, L1, Route, random_inputs, random_mlp

import sklearn_jsae._backend.jacobian as jacobian_module
import sklearn_jsae._backend.sae as sae_module
from sklearn_jsae._backend.jacobian import jacobian_blocks, jacobian_penalty, map_and_local_weights
from sklearn_jsae._backend.sae import active_values, encode_with_grad, pre_activations, select_topk
from sklearn_jsae._backend.step import jsae_step_losses, optimiser_step

_RUN_CHUNKS = jacobian_module.run_chunks


def _serial_chunks(batch, chunk, make_state, work, device):
    state = make_state()
    for start in range(0, batch, chunk):
        work(state, start, min(batch, start + chunk))
    return [state]


def _use_chunk_runner(runner):
    jacobian_module.run_chunks = runner
    sae_module.run_chunks = runner


class Variant(Route):
    def step(self):
        _use_chunk_runner(_serial_chunks if self.name == "v3 serial" else _RUN_CHUNKS)
        if self.name in ("v3 serial", "v4 current"):
            loss, _, _ = jsae_step_losses(self.side_x, self.side_y, self.mlp, self.x, self.config.k, l1=L1,
                                          penalty_norm=self.penalty_norm)
        elif self.name == "authors":
            return super().step()
        else:
            loss = self._partial_losses()
        optimiser_step(loss, self.optimiser, self.sides, 1.0)
        return float(loss.detach())

    def _partial_losses(self):
        k = self.config.k

        def side(params, v):
            if self.name == "v2 +encoder":
                values, indices, _ = encode_with_grad(params, v, k)
            else:
                with torch.no_grad():
                    indices = select_topk(pre_activations(params, v), k)
                values = active_values(params, v, indices)
            v_hat = F.embedding_bag(indices, params.W_dec, per_sample_weights=values, mode="sum") + params.b_dec
            return F.mse_loss(v_hat, v), indices

        mse_x, idx_x = side(self.side_x, self.x)
        y, weights = map_and_local_weights(self.mlp, self.x)
        mse_y, idx_y = side(self.side_y, y)
        if self.name == "v0 initial":
            J = jacobian_blocks(self.mlp, self.x, self.side_x.W_dec, idx_x, self.side_y.W_enc, idx_y)
            penalty = J.abs().sum(dim=(1, 2)).mean()
        else:
            penalty = jacobian_penalty(self.mlp, self.x, self.side_x.W_dec, idx_x, self.side_y.W_enc, idx_y,
                                       weights=weights)
        return mse_x + mse_y + L1 * self.penalty_norm * penalty


VARIANTS = ("v0 initial", "v1 +penalty", "v2 +encoder", "v3 serial", "v4 current", "authors")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="minilm", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", nargs="*", default=[], help="variant names to leave out")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    device = "cuda" if "cuda" in config.devices and torch.cuda.is_available() else "cpu"
    mlp, x = random_mlp(config, device), random_inputs(config, device)
    variants = {name: Variant(name, config, mlp, x) for name in VARIANTS if name not in args.skip}
    times = {name: [] for name in variants}
    for rep in range(1 + args.steps):
        for name, variant in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            variant.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t0)
    _use_chunk_runner(_RUN_CHUNKS)
    authors = statistics.median(times["authors"])
    result = dict(config=args.config, device=device, threads=args.threads, load_average=os.getloadavg(),
                  ms={name: 1e3 * statistics.median(t) for name, t in times.items()})
    print(f"{args.config} on {device}, {args.threads} thread(s), load average {os.getloadavg()}")
    print(f"{'variant':14s} {'ms/step':>9s} {'x authors':>10s}")
    for name, t in times.items():
        print(f"{name:14s} {1e3 * statistics.median(t):9.0f} {statistics.median(t) / authors:10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

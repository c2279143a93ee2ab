"""Benchmark suite: training-step time and memory per route, and inference throughput.

Usage::

    python benchmarks/run.py [--out results.json] [--configs minilm pythia70m pythia410m]
                             [--steps N] [--warmup N] [--threads N] [--skip-inference]

Runs every configuration the current machine can: ``minilm`` (d=384, d_mlp=1536,
n=2048, k=32, batch 1024) on the CPU; ``pythia70m`` (512, 2048, 16384, 32, 4096) and
``pythia410m`` (1024, 4096, 65536, 32, 4096) on CUDA only (skipped with a line saying
so when CUDA is unavailable).  For each configuration:

* milliseconds per optimiser step (forward, backward, per-SAE clipping, Adam, decoder
  renormalisation) of each route in ``routes.py``: our JSAE step, our l1 = 0 pair, the
  authors' route re-implemented, the authors' dense pair; the routes' steps are
  interleaved round-robin in one process (after ``--warmup`` steps each) so that load
  from other processes hits all routes alike, and the median of ``--steps`` is reported
  together with the median process CPU time per step;
* our JSAE step once more through ``train()`` itself (one minibatch per epoch, the
  median of the per-epoch seconds), to show the training loop pays what the step costs;
* the naive dense autograd Jacobian per token (``--naive-tokens`` tokens, for scale);
* peak memory per route: on CUDA ``torch.cuda.max_memory_allocated`` over two steps
  minus what was allocated before them; on the CPU, in a fresh subprocess per route
  (glibc told to serve every allocation over 64 KiB by mmap, so freed tensors leave
  the resident set), the peak resident set size (``VmHWM``, reset through
  /proc/self/clear_refs after set-up) over two steps minus the resident set after
  set-up: parameters, data and the MLP are excluded, gradients, Adam state and every
  intermediate are included;
* ``jacobian(X)`` and ``transform(X)`` of a fitted ``JacobianSparseAutoencoder``:
  tokens per second and peak memory (same methods, the CPU figures per size in a
  fresh subprocess) for growing ``n_samples``, and peak memory per stored Jacobian
  entry (it must stay flat: memory linear in n_samples · k², never n_out × n_in);
* ratios against the authors' route and against our pair, from the same run.

The table is printed and the JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from routes import CONFIGS, STEP_ROUTES, Route, naive_token_step, random_inputs, random_mlp

INFERENCE_SIZES = {"cpu": (1024, 4096, 8192), "cuda": (4096, 16384, 65536)}


# ---- helpers -----------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mb(field: str) -> float:
    """A ``Vm*`` field of /proc/self/status in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak RSS of this process since exec or the last reset, in MiB.  (``ru_maxrss`` would not
    do: Linux carries it over from the parent across fork and exec.)"""
    return _status_mb("VmHWM")


def machine_description(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(
        cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
        python=platform.python_version(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def _probe(args: list[str], threads: int) -> dict:
    """Run this script in a fresh subprocess in probe mode; return its JSON answer."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- training steps ---------------------------------------------------------------------
def time_steps(config, device, steps: int, warmup: int) -> dict:
    mlp = random_mlp(config, device)
    x = random_inputs(config, device)
    routes = {name: Route(name, config, mlp, x) for name in STEP_ROUTES}
    wall = {name: [] for name in routes}
    cpu = {name: [] for name in routes}
    for rep in range(warmup + steps):
        for name, route in routes.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            route.step()
            _sync(device)
            if rep >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    result = {
        name: dict(ms=1e3 * statistics.median(wall[name]), cpu_ms=1e3 * statistics.median(cpu[name]),
                   ms_all=[round(1e3 * t, 2) for t in wall[name]])
        for name in routes
    }
    if torch.device(device).type == "cuda":
        for name, route in routes.items():
            result[name]["peak_mb"] = _cuda_peak(route.step, device)
    return result


def _cuda_peak(fn, device, repeats: int = 2) -> float:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(repeats):
        fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def probe_step_memory(config, route_name: str, device, steps: int) -> dict:
    """(subprocess) Peak RSS over ``steps`` steps of one route, minus the RSS after set-up."""
    mlp = random_mlp(config, device)
    x = random_inputs(config, device)
    route = Route(route_name, config, mlp, x)
    reset = _reset_peak_rss()
    baseline = _rss_mb()
    for _ in range(steps):
        route.step()
    return dict(peak_mb=max(0.0, _peak_rss_mb() - baseline), baseline_mb=baseline, reset=reset)


def time_naive(config, device, tokens: int) -> dict:
    mlp = random_mlp(config, device)
    x = random_inputs(config, device)
    route = Route("jsae", config, mlp, x)
    chunk = None if torch.device(device).type == "cpu" else 2048
    naive_token_step(route, 0, chunk)  # warm-up
    times = []
    for t in range(1, tokens + 1):
        _sync(device)
        t0 = time.perf_counter()
        naive_token_step(route, t, chunk)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    return dict(ms_per_token=ms, ms_per_step_extrapolated=ms * config.batch, tokens=tokens)


def time_train(config, device, steps: int, warmup: int) -> dict:
    """Our JSAE step through train(): one minibatch per epoch, median per-epoch seconds."""
    from sklearn_jsae._backend.train import TrainConfig, train

    mlp = random_mlp(config, "cpu")
    X = random_inputs(config, "cpu").numpy()
    cfg = TrainConfig(n_components=config.n, n_output_components=config.n, k=config.k, l1=0.5,
                      max_iter=warmup + steps, batch_size=config.batch, aux_coef=0.0, device=device, seed=0)
    result = train(X, mlp, cfg)
    seconds = [row["seconds"] for row in result.history[warmup:]]
    return dict(ms=1e3 * statistics.median(seconds), ms_all=[round(1e3 * s, 2) for s in seconds])


# ---- inference --------------------------------------------------------------------------
def _fitted_estimator(config, device):
    from sklearn_jsae import JacobianSparseAutoencoder

    mlp_map = random_mlp(config, "cpu")
    mlp = torch.nn.Sequential(torch.nn.Linear(config.d, config.d_mlp), torch.nn.GELU(),
                              torch.nn.Linear(config.d_mlp, config.d))
    with torch.no_grad():
        mlp[0].weight.copy_(mlp_map.W_in.T)
        mlp[0].bias.copy_(mlp_map.b_in)
        mlp[2].weight.copy_(mlp_map.W_out.T)
        mlp[2].bias.copy_(mlp_map.b_out)
    X = random_inputs(config, "cpu").numpy()
    est = JacobianSparseAutoencoder(mlp=mlp, n_components=config.n, k=config.k, max_iter=1,
                                    batch_size=config.batch, device=device, random_state=0)
    return est.fit(X)


def _inference_data(config, size: int) -> np.ndarray:
    return np.random.default_rng(size).standard_normal((size, config.d)).astype(np.float32)


def _run_method(est, method: str, X):
    out = getattr(est, method)(X)
    return out.nnz


def probe_inference_memory(model_path: str, config, method: str, size: int) -> dict:
    """(subprocess) Peak RSS of one ``est.<method>(X)`` call minus the RSS before it."""
    import pickle

    with open(model_path, "rb") as f:
        est = pickle.load(f)
    X = _inference_data(config, size)
    _run_method(est, method, X[:8])  # warm-up: lazy imports, thread pools
    reset = _reset_peak_rss()
    baseline = _rss_mb()
    nnz = _run_method(est, method, X)
    return dict(peak_mb=max(0.0, _peak_rss_mb() - baseline), nnz=int(nnz), reset=reset)


def time_inference(config, device, threads: int, measure_memory: bool) -> list[dict]:
    import pickle

    est = _fitted_estimator(config, device)
    rows = []
    path = None
    if measure_memory and torch.device(device).type == "cpu":
        handle, path = tempfile.mkstemp(suffix=".pkl")
        with os.fdopen(handle, "wb") as f:
            pickle.dump(est, f)
    try:
        for method in ("jacobian", "transform"):
            _run_method(est, method, _inference_data(config, 64))  # warm-up
            for size in INFERENCE_SIZES[torch.device(device).type]:
                X = _inference_data(config, size)
                _sync(device)
                if torch.device(device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                nnz = _run_method(est, method, X)
                _sync(device)
                seconds = time.perf_counter() - t0
                row = dict(method=method, n_samples=size, tokens_per_s=size / seconds, seconds=seconds,
                           nnz=int(nnz))
                if torch.device(device).type == "cuda":
                    row["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                elif path is not None:
                    probe = _probe(["--probe", "inference", "--model", path, "--config", config.name,
                                    "--method", method, "--size", str(size)], threads)
                    row["peak_mb"] = probe.get("peak_mb", float("nan"))
                if "peak_mb" in row:
                    row["bytes_per_entry"] = row["peak_mb"] * 2**20 / max(1, nnz)
                rows.append(row)
    finally:
        if path is not None:
            os.unlink(path)
    return rows


# ---- report -----------------------------------------------------------------------------
LABELS = {
    "jsae": "(a) ours, JSAE step",
    "jsae_train": "(a) ours, via train()",
    "pair": "(b) ours, l1=0 pair",
    "authors": "(c) authors' route",
    "authors_pair": "(c0) authors' l1=0 pair",
    "naive": "(d) naive autograd",
}


def ratios(steps: dict) -> dict:
    out = {}
    a, b, c = steps["jsae"], steps["pair"], steps["authors"]
    out["jsae_over_authors"] = a["ms"] / c["ms"]
    out["jsae_over_pair"] = a["ms"] / b["ms"]
    out["pair_over_authors_pair"] = b["ms"] / steps["authors_pair"]["ms"]
    out["jsae_over_authors_cpu_time"] = a["cpu_ms"] / c["cpu_ms"]
    if "peak_mb" in a and "peak_mb" in c and c["peak_mb"]:
        out["jsae_peak_over_authors_peak"] = a["peak_mb"] / c["peak_mb"]
    return out


def format_config(name: str, res: dict) -> str:
    lines = [f"\n== {name} {res['shape']} on {res['device']} =="]
    lines.append(f"{'route':28s} {'ms/step':>10s} {'cpu ms':>10s} {'peak MiB':>10s} {'vs (c)':>8s} {'vs (b)':>8s}")
    steps = res["steps"]
    ref_c, ref_b = steps["authors"]["ms"], steps["pair"]["ms"]
    for key in ("jsae", "jsae_train", "pair", "authors", "authors_pair"):
        if key not in steps:
            continue
        s = steps[key]
        peak = f"{s['peak_mb']:10.1f}" if s.get("peak_mb") is not None else f"{'-':>10s}"
        cpu_ms = f"{s['cpu_ms']:10.1f}" if "cpu_ms" in s else f"{'-':>10s}"
        lines.append(f"{LABELS[key]:28s} {s['ms']:10.1f} {cpu_ms} {peak} {s['ms'] / ref_c:8.2f} "
                     f"{s['ms'] / ref_b:8.2f}")
    if "naive" in res and "error" in res["naive"]:
        lines.append(f"{LABELS['naive']:28s} failed: {res['naive']['error']}")
    elif "naive" in res:
        nv = res["naive"]
        lines.append(f"{LABELS['naive']:28s} {nv['ms_per_step_extrapolated']:10.0f} "
                     f"({nv['ms_per_token']:.0f} ms per token x batch {res['shape']['batch']}, "
                     f"{nv['tokens']} tokens timed)")
    r = res["ratios"]
    lines.append("ratios: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()))
    if res.get("inference"):
        lines.append(f"{'inference':12s} {'n_samples':>9s} {'tokens/s':>10s} {'peak MiB':>9s} {'B/entry':>8s}")
        for row in res["inference"]:
            peak = f"{row['peak_mb']:9.1f}" if "peak_mb" in row else f"{'-':>9s}"
            per = f"{row['bytes_per_entry']:8.1f}" if "bytes_per_entry" in row else f"{'-':>8s}"
            lines.append(f"{row['method']:12s} {row['n_samples']:9d} {row['tokens_per_s']:10.0f} {peak} {per}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per route (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--naive-tokens", type=int, default=2)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="CPU: skip the per-route subprocesses")
    parser.add_argument("--skip-train", action="store_true", help="skip the train() cross-check")
    parser.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision for every route (CUDA: 'high' allows TF32)")
    # internal: subprocess probes
    parser.add_argument("--probe", choices=("step", "inference"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)

    if args.probe == "step":
        print(json.dumps(probe_step_memory(CONFIGS[args.config], args.route, "cpu", args.warmup + args.steps)))
        return
    if args.probe == "inference":
        print(json.dumps(probe_inference_memory(args.model, CONFIGS[args.config], args.method, args.size)))
        return

    results = dict(machine=machine_description(args.threads), command=" ".join(["python"] + sys.argv),
                   matmul_precision=args.matmul_precision, configs={})
    print("machine: " + ", ".join(f"{k}={v}" for k, v in results["machine"].items()), flush=True)
    for name in args.configs:
        config = CONFIGS[name]
        device = "cuda" if "cuda" in config.devices else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print(f"\n== {name}: skipped, it runs on CUDA only and torch.cuda.is_available() is False ==",
                  flush=True)
            results["configs"][name] = dict(skipped="needs CUDA; torch.cuda.is_available() is False")
            continue
        started = time.perf_counter()
        res = dict(device=device, shape=config.as_dict())
        res["steps"] = time_steps(config, device, args.steps, args.warmup)
        if device == "cpu" and not args.skip_memory:
            for route in STEP_ROUTES:
                probe = _probe(["--probe", "step", "--config", name, "--route", route,
                                "--steps", "1", "--warmup", "1"], args.threads)
                res["steps"][route]["peak_mb"] = probe.get("peak_mb")
        if not args.skip_train:
            res["steps"]["jsae_train"] = time_train(config, device, min(args.steps, 3), args.warmup)
        if args.naive_tokens > 0:
            try:
                res["naive"] = time_naive(config, device, args.naive_tokens)
            except (RuntimeError, MemoryError) as exc:  # the dense route may not fit (410m: 16 GiB per token)
                res["naive"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
        res["ratios"] = ratios(res["steps"])
        if not args.skip_inference:
            res["inference"] = time_inference(config, device, args.threads, not args.skip_memory)
        res["seconds"] = time.perf_counter() - started
        results["configs"][name] = res
        print(format_config(name, res), flush=True)
    try:
        results["machine"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

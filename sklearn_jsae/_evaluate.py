"""``python -m sklearn_jsae evaluate``: the paper's evaluation table on the bundled real MLP.

Trains four models on the same tokens: a traditional pair (``l1 = 0``) and a JSAE (default
``l1``), each on the trained MLP and on its randomised copy (:func:`~sklearn_jsae.metrics.randomize_mlp`),
then prints, on held-out tokens, Jacobian sparsity at each τ, the FVU of both SAEs, the
linear / JumpReLU / other fractions of f_s and the Jacobian-vs-intervention agreement, with
Farnik et al.'s Pythia-410m numbers beside them.  Jacobian sparsity is reported twice: with
τ on ``|J|`` (the paper's absolute view; JSON keys ``sparsity`` and ``global_sparsity``) and
on the normalised ``(c_x / c_y) · |J|`` (``sparsity_normalized``,
``global_sparsity_normalized``; ``jacobian_scale`` is each model's ``c_x / c_y``).
``--figures DIR`` saves the plots, ``--json PATH`` the numbers (``--json -``: on stdout, the table
and progress then on stderr, so that ``> report.json`` holds the JSON alone).  Also runnable as
``python -m sklearn_jsae._evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from .metrics import (
    DEFAULT_THRESHOLDS,
    global_jacobian_sparsity,
    intervention_agreement,
    jacobian_scale,
    linearity,
    randomize_mlp,
    reconstruction_metrics,
)
from ._backend.files import cache_folder
from .metrics._sparsity import _jacobian_sparsity_views

#: Farnik et al. (2025), Pythia-410m layer 15, 65,536 latents, k = 32 (None: not reported).
PAPER = {
    "sparsity": {
        0.005: (0.165, 0.771, 0.421, 0.921),
        0.01: (0.062, 0.583, 0.225, 0.844),
        0.015: (None, None, None, None),
        0.02: (0.019, 0.334, 0.097, 0.699),
    },
    "linear": (0.88, 0.75, None, None),
    "intervention": (0.977, None, None, None),
}
MODELS = (("jsae", "trained"), ("traditional", "trained"), ("jsae", "random"), ("traditional", "random"))
HEADERS = ("JSAE", "trad", "JSAE-rnd", "trad-rnd")


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_jsae evaluate",
        description="Train a traditional SAE pair (l1=0) and a JSAE on the bundled all-MiniLM-L6-v2 "
        "layer-3 MLP and on a randomised copy of it, and print the paper-style evaluation table.",
    )
    from ._estimator import DEFAULT_L1

    parser.add_argument("--n-components", type=int, default=2048,
                        help="latents per SAE (default 2048, 5.3x d_model; the paper uses 32-64x)")
    parser.add_argument("--k", type=int, default=32, help="active latents per sample (default 32)")
    parser.add_argument("--l1", type=float, default=DEFAULT_L1, help=f"JSAE penalty (default {DEFAULT_L1})")
    parser.add_argument("--max-iter", type=int, default=10, help="epochs per model (default 10)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=None, help="training tokens (default: all but the test set)")
    parser.add_argument("--n-test", type=int, default=1024, help="held-out tokens for the metrics (default 1024)")
    parser.add_argument("--linearity-samples", type=int, default=32,
                        help="tokens for the linearity sweep, k pairs of 100 points each (default 32)")
    parser.add_argument("--intervention-samples", type=int, default=512,
                        help="tokens for the intervention check, k x k triples each (default 512)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use a seeded synthetic MLP instead of the bundled real one")
    parser.add_argument("--figures", metavar="DIR", default=None, help="save the figures (PNG) in DIR")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write every number to PATH as JSON; '-' (or /dev/stdout, or the file stdout is "
                             "redirected to) writes it to stdout, and the table and progress to stderr")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0, help="training verbosity passed to the estimators")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is much faster on a busy machine")
    return parser


def _load(args):
    """(X, mlp, description)."""
    if not args.synthetic:
        try:
            from .datasets import load_minilm_mlp
        except ImportError:  # pragma: no cover - the bundled data ships with the package
            print("bundled data not available; falling back to a synthetic MLP", file=sys.stderr)
        else:
            data = load_minilm_mlp()
            return data.X, data.mlp, (
                "all-MiniLM-L6-v2 block-3 MLP (384 -> 1536 GELU -> 384), real activations on Python "
                "documentation prose (bundled)")
    from .datasets import make_synthetic_mlp

    X, mlp = make_synthetic_mlp(n_samples=6144, n_features=64, n_hidden=256, random_state=args.random_state)
    return X, mlp, "synthetic MLP (64 -> 256 GELU -> 64, Gaussian weights), sparse-dictionary inputs"


def _fmt(value, percent=True):
    if value is None:
        return "—"
    if isinstance(value, float) and not np.isfinite(value):
        return "nan"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _evaluate_model(jsae, X_test, args, rng_seed):
    lin_rows = X_test[: args.linearity_samples]
    int_rows = X_test[: args.intervention_samples]
    recon = reconstruction_metrics(jsae, X_test)
    # both views of both sparsities from one pass over the Jacobian
    (sparsity, global_sparsity), (sparsity_normalized, global_normalized) = _jacobian_sparsity_views(
        jsae, X_test, DEFAULT_THRESHOLDS, ("absolute", "normalized"), global_sparsity=True)
    return {
        "sparsity": sparsity,
        "global_sparsity": global_sparsity,
        "sparsity_normalized": sparsity_normalized,
        "global_sparsity_normalized": global_normalized,
        "jacobian_scale": jacobian_scale(jsae),
        "fvu_input": recon["input"]["fvu"],
        "fvu_output": recon["output"]["fvu"],
        "dead_input": recon["input"]["dead_fraction"],
        "dead_output": recon["output"]["dead_fraction"],
        "linearity": linearity(jsae, lin_rows, n_samples=len(lin_rows), random_state=rng_seed),
        "intervention": intervention_agreement(jsae, int_rows),
    }


def _table(results, args, description, n_train, n_test, seconds):
    lines = []
    add = lines.append
    width = 24
    add(f"data: {description}")
    add(f"      {n_train} training tokens, {n_test} held-out tokens (metrics are on held-out tokens)")
    add(f"models: n_components={args.n_components} per SAE, k={args.k}, max_iter={args.max_iter}, "
        f"batch_size={args.batch_size}; JSAE l1={args.l1}, traditional l1=0; 'rnd' = the same training on the "
        f"MLP with its weight matrices re-drawn (randomize_mlp)")
    add("fit time: " + ", ".join(f"{h} {seconds[m]:.0f} s" for h, m in zip(HEADERS, MODELS)))
    add("")
    head = f"{'':{width}}" + "".join(f"{h:>10}" for h in HEADERS) + "   |" + "".join(f"{h:>10}" for h in HEADERS)
    add(f"{'':{width}}{'this run':^40}   |{'paper (Pythia-410m L15, 65k latents)':^40}")
    add(head)
    add("-" * len(head))
    add("Jacobian sparsity: fraction of active k x k entries with |J| > tau (the paper's view; lower is sparser)")
    for tau in DEFAULT_THRESHOLDS:
        ours = "".join(f"{_fmt(results[m]['sparsity'][tau]):>10}" for m in MODELS)
        paper = "".join(f"{_fmt(v):>10}" for v in PAPER["sparsity"][tau])
        add(f"{'  tau = ' + str(tau):{width}}{ours}   |{paper}")
    add("Normalised: fraction of active entries with (c_x/c_y)|J| > tau (the Jacobian the penalty acts on)")
    ratios = "".join(f"{1 / results[m]['jacobian_scale']:>10.2f}" for m in MODELS)
    add(f"{'  c_y / c_x (size of J)':{width}}{ratios}   |{'(not reported)':>40}")
    for tau in DEFAULT_THRESHOLDS:
        ours = "".join(f"{_fmt(results[m]['sparsity_normalized'][tau]):>10}" for m in MODELS)
        add(f"{'  tau = ' + str(tau):{width}}{ours}   |{'(not reported)':>40}")
    add("Global sparsity: fraction of all n_out x n_in pairs with mean |J| > tau")
    for key, view in (("global_sparsity", "|J|"), ("global_sparsity_normalized", "(c_x/c_y)|J|")):
        for tau in (0.01,):
            ours = "".join(f"{_fmt(results[m][key][tau]):>10}" for m in MODELS)
            add(f"{'  ' + view + ' > ' + str(tau):{width}}{ours}   |{'(not reported)':>40}")
    add("Reconstruction: fraction of variance unexplained")
    for key, name in (("fvu_input", "input SAE"), ("fvu_output", "output SAE")):
        ours = "".join(f"{_fmt(results[m][key], percent=False):>10}" for m in MODELS)
        add(f"{'  ' + name:{width}}{ours}   |{'—':>10}{'—':>10}{'—':>10}{'—':>10}")
    for key, name in (("dead_input", "dead latents, input"), ("dead_output", "dead latents, output")):
        ours = "".join(f"{_fmt(results[m][key]):>10}" for m in MODELS)
        add(f"{'  ' + name:{width}}{ours}   |{'—':>10}{'—':>10}{'—':>10}{'—':>10}")
    add("Linearity of f_s (sweep of one input latent, paper's classification, tol 0.01)")
    for key in ("linear", "jumprelu", "other"):
        ours = "".join(f"{_fmt(results[m]['linearity'][key]):>10}" for m in MODELS)
        paper_values = PAPER["linear"] if key == "linear" else (None,) * 4
        paper = "".join(f"{_fmt(v):>10}" for v in paper_values)
        add(f"{'  ' + key:{width}}{ours}   |{paper}")
    add("Jacobian vs intervention: |change from removing one unit - J| <= 0.1, all k x k pairs")
    ours = "".join(f"{_fmt(results[m]['intervention']):>10}" for m in MODELS)
    paper = "".join(f"{_fmt(v):>10}" for v in PAPER["intervention"])
    add(f"{'  agreement':{width}}{ours}   |{paper}")
    return "\n".join(lines)


def _figure(**kwargs):
    """A Figure with its own Agg canvas, outside pyplot: main() also runs in-process (a notebook, a
    test), where matplotlib.use("Agg") would switch the caller's backend and its rcParams."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _figures(directory, fitted, X_test, data_tokens=None):
    from .plotting import plot_jacobian_block, plot_jacobian_histogram, plot_top_edges

    os.makedirs(directory, exist_ok=True)
    saved = []
    names = dict(zip(MODELS, ("JSAE", "traditional", "JSAE, random MLP", "traditional, random MLP")))
    fig = _figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2)
    for ax, scale in zip(axes, ("absolute", "normalized")):
        plot_jacobian_histogram({names[m]: fitted[m] for m in MODELS}, X_test[:512], thresholds=DEFAULT_THRESHOLDS,
                                scale=scale, ax=ax)
    saved.append(_save(fig, directory, "jacobian_histogram.png"))

    fig = _figure(figsize=(13, 5.5))
    axes = fig.subplots(1, 2)
    for ax, model in zip(axes, (("jsae", "trained"), ("traditional", "trained"))):
        plot_jacobian_block(fitted[model], X_test[0], ax=ax)
        ax.set_title(f"{names[model]}: Jacobian of one token")
    saved.append(_save(fig, directory, "jacobian_block.png"))

    jsae = fitted[("jsae", "trained")]
    # the output latent with the strongest single edge among those active on >= 1% of the tokens
    codes = jsae.transform_output(X_test[:512])
    counts = np.bincount(codes.indices, minlength=codes.shape[1])
    _, G = global_jacobian_sparsity(jsae, X_test[:512], thresholds=[0.0], return_matrix=True)
    strongest = np.where(counts >= max(1, codes.shape[0] // 100), G.max(axis=1).toarray().ravel(), -1.0)
    latent = int(np.argmax(strongest))
    fig = _figure(figsize=(6, 4.5))
    ax = fig.subplots()
    plot_top_edges(jsae, X_test[:512], latent, n_edges=12, ax=ax)
    saved.append(_save(fig, directory, "top_edges.png"))

    _, details = linearity(jsae, X_test[:64], n_samples=64, random_state=0, return_curves=True)
    fig = _figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, label in zip(axes, ("linear", "jumprelu", "other")):
        chosen = np.flatnonzero(details["labels"] == label)
        # show the curves that move most: flat lines say little
        spread = np.ptp(details["curves"][chosen], axis=1) if chosen.size else np.zeros(0)
        for p in chosen[np.argsort(-spread)][:6]:
            ax.plot(details["grid"][p], details["curves"][p], linewidth=1)
        ax.set_title(f"{label} ({chosen.size} of {details['labels'].size})")
        ax.set_xlabel("input latent value s_x[j]")
    axes[0].set_ylabel("output latent value s_y[i]")
    saved.append(_save(fig, directory, "linearity_examples.png"))
    return saved


def _save(fig, directory, name):
    from ._persistence import save_figure

    fig.tight_layout()
    return save_figure(fig, os.path.join(directory, name), dpi=110)


def main(argv=None):
    """Run the evaluation; ``argv`` as for ``python -m sklearn_jsae evaluate`` (without "evaluate").

    Returns 0 on success, 1 when the ``--json`` file could not be written (the process exit status).
    """
    from ._cli_train import check_estimator_options, check_output_file, check_output_folder

    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    for name in ("n_components", "k", "max_iter", "batch_size", "n_test", "linearity_samples",
                 "intervention_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_train is not None and args.n_train < 1:  # a negative count sliced from the end
        parser.error(f"--n-train must be >= 1 (training tokens), got {args.n_train}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    # Everything the four fits and the outputs would refuse, before the first fit: a bad --json or
    # --figures would otherwise stop the command after all of its minutes of training.
    check_estimator_options(parser, dict(
        n_components=args.n_components, k=args.k, l1=args.l1, max_iter=args.max_iter,
        batch_size=args.batch_size, device=args.device, random_state=args.random_state, verbose=args.verbose))
    if args.json == "" or args.figures == "":
        parser.error(f"argument --{'json' if args.json == '' else 'figures'}: an empty path; give a "
                     f"{'file' if args.json == '' else 'folder'} path")
    to_stdout = bool(args.json) and _is_stdout(args.json)
    if args.json and not to_stdout:
        check_output_file(parser, "--json", args.json)
        start = _start_if_not_json(args.json)
        if start is not None:
            parser.error(f"argument --json: {args.json!r} holds something other than JSON (it starts "
                         f"{start!r}), not an earlier report; remove it or give another path")
    if args.figures:
        check_output_folder(parser, "--figures", args.figures)
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            parser.error("argument --figures: needs matplotlib, which is not installed "
                         "(pip install matplotlib)")
    if args.threads is None:
        return _run(args, to_stdout)
    import torch

    # main() also runs in-process (a notebook, a test): the caller's thread count comes back
    # however the run ends.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, to_stdout)
    finally:
        torch.set_num_threads(threads)


def _start_if_not_json(path):
    """The first bytes of ``path`` when it is a regular file that holds something other than JSON (a
    model given as ``--json model.safetensors`` was replaced by the report), else None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return None  # the writer's own error says why
    text = head.decode("utf-8", errors="replace").lstrip()
    return None if not text or text[0] in "{[" else head[:16]


def _is_stdout(path):
    """Whether ``--json path`` names stdout: ``-``, or the file stdout is (``/dev/stdout``, or the
    file of ``> report.json`` given again).  Opening that with "w" truncated it while the table's
    prints went on at their old offset: a file of NUL bytes, JSON and the table mixed."""
    if path == "-":
        return True
    try:
        target, stdout = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no such file yet; in-process, stdout captured
        return False
    return (target.st_dev, target.st_ino) == (stdout.st_dev, stdout.st_ino)


def _run(args, to_stdout=False):
    """The evaluation; with ``to_stdout`` (``--json -``) the JSON alone on stdout, the rest on stderr."""
    if not to_stdout:
        return _evaluate(args, to_stdout)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the table, progress and any fit's verbose prints
        payload = _evaluate(args, to_stdout)
    stdout.flush()
    json.dump(payload, stdout, indent=2, default=float)
    stdout.write("\n")
    return 0


def _evaluate(args, to_stdout):
    """The four fits, their metrics and the outputs, once the options are checked.  Returns 0, or,
    with ``--json -``, the JSON payload for :func:`_run` to write on stdout."""
    from ._estimator import JacobianSparseAutoencoder

    X, mlp, description = _load(args)
    order = np.random.default_rng(args.random_state).permutation(X.shape[0])
    n_test = min(args.n_test, X.shape[0] // 2)
    test, train = order[:n_test], order[n_test:]
    if args.n_train is not None:
        train = train[: args.n_train]
    X_train, X_test = np.ascontiguousarray(X[train]), np.ascontiguousarray(X[test])
    mlps = {"trained": mlp, "random": randomize_mlp(mlp, random_state=args.random_state)}
    print(f"data: {description}; training {len(train)} tokens x 4 models", flush=True)

    fitted, seconds, results = {}, {}, {}
    # The JSAE and the traditional pair on one MLP share its outputs and local weights: the
    # cache computes them once per MLP (the models are the same as without it).
    with cache_folder("evaluate") as cache:
        for kind, which in MODELS:
            estimator = JacobianSparseAutoencoder(
                mlps[which], n_components=args.n_components, k=args.k, l1=args.l1 if kind == "jsae" else 0.0,
                max_iter=args.max_iter, batch_size=args.batch_size, device=args.device,
                random_state=args.random_state, verbose=args.verbose, memory=cache,
            )
            started = time.perf_counter()
            estimator.fit(X_train)
            seconds[(kind, which)] = time.perf_counter() - started
            started = time.perf_counter()
            results[(kind, which)] = _evaluate_model(estimator, X_test, args, args.random_state)
            fitted[(kind, which)] = estimator
            print(f"  {kind:<11} on the {which} MLP: fit {seconds[(kind, which)]:.0f} s, "
                  f"metrics {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(_table(results, args, description, len(train), len(test), seconds))
    status = 0  # 1 when the --json file could not be written (the figures are still made)
    if args.json:
        payload = {
            "data": description, "n_train": len(train), "n_test": len(test),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "figures")},
            "models": {f"{kind}-{which}": dict(results[(kind, which)], fit_seconds=seconds[(kind, which)])
                       for kind, which in MODELS},
            "paper": {"sparsity": {str(t): v for t, v in PAPER["sparsity"].items()},
                      "linear": PAPER["linear"], "intervention": PAPER["intervention"]},
        }
        if not to_stdout:
            status = _write_json(args.json, payload)
            if status == 0:
                print(f"\nnumbers written to {args.json}")
    if args.figures:
        try:
            saved = _figures(args.figures, fitted, X_test)
        except OSError as exc:  # a full disk: write_failed's line names the file and what is intact
            reason = exc.strerror or str(exc)
            if args.figures not in reason:
                reason = f"cannot write in {args.figures!r} ({reason})"
            print(f"python -m sklearn_jsae evaluate: error: --figures: {reason}", file=sys.stderr)
            return 1
        print("\nfigures: " + ", ".join(saved))
    return payload if to_stdout else status


def _write_json(path, payload):
    """Write the report to ``path`` through a temporary renamed over it; 0, or 1 with a one-line error.

    A plain ``open(path, "w")`` truncated an existing report first, and a full disk then left cut-off
    JSON at ``path`` and a traceback; now the previous file stays whole and the run says so.
    """
    from ._persistence import write_atomically

    text = json.dumps(payload, indent=2, default=float)

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    try:
        write_atomically(path, write)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if repr(path) not in reason:  # write_atomically's own errors name the path and what is intact
            reason = f"cannot write {path!r} ({reason}): the previous file there, if any, is intact"
        print(f"python -m sklearn_jsae evaluate: error: --json: {reason} (the table above holds the "
              f"numbers).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # As `python -m sklearn_jsae evaluate`: a closed pipe, Ctrl-C and SIGTERM end it as they end that.
    from sklearn_jsae.__main__ import _run_as_program

    _run_as_program(["evaluate", *sys.argv[1:]])

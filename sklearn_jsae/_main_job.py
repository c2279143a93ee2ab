"""``python -m sklearn_jsae``: the paper's point on the bundled data, in under a minute on two CPU cores.

Trains a JSAE (``l1`` > 0) and a traditional pair (``l1 = 0``, two ordinary TopK SAEs) with
the same settings and the same seed on the bundled all-MiniLM-L6-v2 layer-3 MLP tokens, then
prints, on held-out tokens, the fraction of active Jacobian entries with ``|J| > τ`` and the
fraction of variance unexplained (FVU) of each SAE side by side, and saves a figure (the
``|J|`` histograms of both models and the fractions above each τ) to a path it prints.

The penalty's point: at almost the same reconstruction error, far fewer of the
``k × k`` active entries of the JSAE's Jacobian are large.  ``python -m sklearn_jsae evaluate``
runs the paper's whole evaluation (linearity, interventions, randomised control) instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from ._backend.files import cache_folder

THRESHOLDS = (0.005, 0.01, 0.015, 0.02)
#: Where the figure goes unless ``--figure`` says otherwise (outside the working tree).
# (a folder named "sklearn-jsae", not "sklearn_jsae": a script run from the temp folder would
# import that folder as the package)
DEFAULT_FIGURE = os.path.join(tempfile.gettempdir(), "sklearn-jsae", "jsae_vs_traditional.png")
DATA_DESCRIPTION = (
    "all-MiniLM-L6-v2 layer-3 MLP (384 -> 1536 GELU -> 384), real activations on Python documentation "
    "prose (bundled)"
)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _parser():
    from ._estimator import DEFAULT_L1

    parser = argparse.ArgumentParser(
        prog="python -m sklearn_jsae",
        description="Train a Jacobian SAE and a traditional SAE pair (l1=0) with the same settings on the "
        "bundled all-MiniLM-L6-v2 layer-3 MLP, print their held-out Jacobian sparsity and reconstruction "
        "side by side and save |J| histograms.  Other commands: 'python -m sklearn_jsae evaluate --help' "
        "(the paper's full evaluation) and 'python -m sklearn_jsae train --help' (a long, resumable run "
        "streamed from a model).",
    )
    parser.add_argument("--n-components", type=_positive_int, default=1024,
                        help="latents per SAE (default 1024)")
    parser.add_argument("--k", type=_positive_int, default=32, help="active latents per token (default 32)")
    parser.add_argument("--l1", type=float, default=DEFAULT_L1,
                        help=f"the JSAE's Jacobian penalty (default {DEFAULT_L1}); the traditional pair: 0")
    parser.add_argument("--max-iter", type=_positive_int, default=8, help="epochs per model (default 8)")
    parser.add_argument("--batch-size", type=_positive_int, default=256,
                        help="tokens per step (default 256: 160 steps per model on 5120 tokens)")
    parser.add_argument("--n-samples", type=_positive_int, default=None,
                        help="training tokens (default: every bundled token not held out, 5120)")
    parser.add_argument("--n-test", type=_positive_int, default=1024, help="held-out tokens (default 1024)")
    parser.add_argument("--figure", metavar="PATH", default=DEFAULT_FIGURE,
                        help=f"where to save the figure (default {DEFAULT_FIGURE}); its suffix is the format "
                        "(.png, .pdf, .svg, ...; none: .png is added); 'none' for no figure")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0, help="training verbosity of each fit (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small products gain little from more "
                        "threads and lose several times over when other jobs share the cores); 0 keeps "
                        "torch's choice")
    return parser


def _split(n_rows, n_test, n_samples, random_state):
    """(train, test) row indices: a seeded shuffle, the first ``n_test`` rows held out."""
    order = np.random.default_rng(random_state).permutation(n_rows)
    n_test = min(n_test, n_rows // 2)
    test, train = order[:n_test], order[n_test:]
    if n_samples is not None:
        train = train[:n_samples]
    return np.sort(train), np.sort(test)


def compare(X_train, X_test, mlp, *, l1, random_state=0, memory=None, **settings):
    """Fit a JSAE (``l1``) and a traditional pair (``l1=0``) with the same ``settings``.

    Returns ``{"jsae": {...}, "traditional": {...}}``; each holds the fitted ``model``, its
    held-out ``sparsity`` (``{τ: fraction of active entries with |J| > τ}``), the same with τ on
    ``(c_x / c_y) · |J|`` as ``sparsity_normalized``, ``fvu_input``,
    ``fvu_output``, ``dead_input``, ``dead_output`` and the fit time in ``seconds``.
    """
    from . import JacobianSparseAutoencoder
    from .metrics import jacobian_sparsity, reconstruction_metrics

    results = {}
    for name, penalty in (("traditional", 0.0), ("jsae", l1)):
        model = JacobianSparseAutoencoder(mlp, l1=penalty, random_state=random_state, memory=memory,
                                          **settings)
        started = time.perf_counter()
        model.fit(X_train)
        seconds = time.perf_counter() - started
        recon = reconstruction_metrics(model, X_test)
        results[name] = {
            "model": model,
            "seconds": seconds,
            "sparsity": jacobian_sparsity(model, X_test, THRESHOLDS),
            "sparsity_normalized": jacobian_sparsity(model, X_test, THRESHOLDS, scale="normalized"),
            "fvu_input": recon["input"]["fvu"],
            "fvu_output": recon["output"]["fvu"],
            "dead_input": recon["input"]["dead_fraction"],
            "dead_output": recon["output"]["dead_fraction"],
        }
        label = "JSAE" if name == "jsae" else "traditional pair"
        print(f"  {label} (l1={penalty:g}): fit in {seconds:.0f} s", flush=True)
    return results


def table(results, l1):
    """The side-by-side report as text (one line per metric)."""
    jsae, trad = results["jsae"], results["traditional"]
    head = f"{'held-out tokens':<34}{f'JSAE (l1={l1:g})':>16}{'traditional (l1=0)':>20}"
    lines = [head, "-" * len(head), "active Jacobian entries with |J| > tau (lower is sparser)"]
    for tau in THRESHOLDS:
        lines.append(f"{f'  tau = {tau:g}':<34}{jsae['sparsity'][tau]:>16.1%}{trad['sparsity'][tau]:>20.1%}")
    lines.append("the same with tau on (c_x/c_y)|J|, the normalised view")
    for tau in THRESHOLDS:
        lines.append(f"{f'  tau = {tau:g}':<34}{jsae['sparsity_normalized'][tau]:>16.1%}"
                     f"{trad['sparsity_normalized'][tau]:>20.1%}")
    lines.append("fraction of variance unexplained (lower is better)")
    for key, label in (("fvu_input", "input SAE"), ("fvu_output", "output SAE")):
        lines.append(f"{'  ' + label:<34}{jsae[key]:>16.3f}{trad[key]:>20.3f}")
    lines.append("latents that never fire on these tokens")
    for key, label in (("dead_input", "input SAE"), ("dead_output", "output SAE")):
        lines.append(f"{'  ' + label:<34}{jsae[key]:>16.1%}{trad[key]:>20.1%}")
    lines.append(f"{'fit time':<34}{jsae['seconds']:>15.0f}s{trad['seconds']:>19.0f}s")
    return "\n".join(lines)


def summary(results, tau=0.01):
    """One sentence: what the penalty bought and what it cost."""
    jsae, trad = results["jsae"], results["traditional"]
    return (
        f"The Jacobian penalty cuts the active entries with |J| > {tau:g} from {trad['sparsity'][tau]:.0%} "
        f"(traditional) to {jsae['sparsity'][tau]:.0%} (JSAE), for an FVU change of "
        f"{jsae['fvu_input'] - trad['fvu_input']:+.3f} (input SAE) and "
        f"{jsae['fvu_output'] - trad['fvu_output']:+.3f} (output SAE)."
    )


def save_figure(results, X_test, path, l1):
    """|J| histograms of both models and their fractions above each τ, as one image at ``path``
    (its format from the suffix: PNG, PDF, SVG, ...)."""
    # A Figure with its own Agg canvas, outside pyplot: main() also runs in-process (a notebook, a
    # test), where matplotlib.use("Agg") would switch the caller's backend and its rcParams.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plotting import plot_jacobian_histogram

    names = {"jsae": f"JSAE (l1={l1:g})", "traditional": "traditional (l1=0)"}
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    plot_jacobian_histogram({names[m]: results[m]["model"] for m in ("jsae", "traditional")},
                            X_test[:512], thresholds=THRESHOLDS, ax=left)
    left.set_title("|J| over the active k x k entries, 512 held-out tokens")
    positions = np.arange(len(THRESHOLDS))
    for offset, m in ((-0.2, "jsae"), (0.2, "traditional")):
        r = results[m]
        label = f"{names[m]}: FVU {r['fvu_input']:.3f} in / {r['fvu_output']:.3f} out"
        bars = right.bar(positions + offset, [r["sparsity"][t] for t in THRESHOLDS], width=0.4, label=label)
        right.bar_label(bars, fmt="{:.0%}", fontsize=8)
    right.set_xticks(positions, [f"τ = {t:g}" for t in THRESHOLDS])
    right.set_ylim(0, 1.15)
    right.set_ylabel("fraction of active entries with |J| > τ")
    right.set_title("Jacobian density (lower is sparser)")
    right.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    from ._persistence import save_figure as save_atomically

    return save_atomically(fig, path, dpi=110)


def _figure_path(parser, path):
    """The file ``--figure`` names, as it will be written: a usage error before the two fits (not a
    traceback after them) for a folder, a path that cannot be written or a format matplotlib does
    not have; a path without a suffix gets ``.png`` (matplotlib's default, which it adds itself, so
    that the path printed is the file written).  None when matplotlib is missing (the run says so)."""
    import importlib.util

    from ._cli_train import _nearest_existing

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    if not path:
        parser.error("argument --figure: an empty path; give a file path, or 'none' for no figure")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        parser.error(f"argument --figure: {path!r} is a folder; give a file path, such as "
                     f"{os.path.join(path, os.path.basename(DEFAULT_FIGURE))!r}")
    suffix = os.path.splitext(path)[1]
    if not suffix:
        path += ".png"
    else:
        import shutil

        import matplotlib

        kinds = set(FigureCanvasBase.get_supported_filetypes())
        if shutil.which(str(matplotlib.rcParams.get("pgf.texsystem", "xelatex"))) is None:
            kinds.discard("pgf")  # written through a TeX program this machine lacks: it failed after both fits
        if suffix[1:].lower() not in kinds:
            parser.error(f"argument --figure: {path!r}: matplotlib cannot write {suffix!r} files here; end the "
                         f"path in one of " + ", ".join(f".{kind}" for kind in sorted(kinds))
                         + " (.png without a suffix)")
    # save_figure creates the folder: its nearest existing ancestor must be a writable folder.
    existing = _nearest_existing(os.path.dirname(os.path.realpath(path)))  # (a link's target is replaced)
    if not existing.is_dir():
        parser.error(f"argument --figure: cannot write {path!r}: {str(existing)!r} is a file, not a folder; "
                     f"give another path")
    from ._backend.files import not_a_regular_file

    # A regular file is written beside itself and renamed over (save_figure), a device in place.
    special = os.path.exists(path) and not_a_regular_file(path) is not None
    if not os.access(path if special else existing, os.W_OK):
        parser.error(f"argument --figure: cannot write {path!r} (permission denied); give a writable path")
    return path


def main(argv=None):
    """Run the comparison; ``argv`` as for ``python -m sklearn_jsae``.  Returns the exit status."""
    from ._cli_train import check_estimator_options

    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    # What the two fits would refuse (k > n_components, l1 < 0, a GPU that is not there, ...), as
    # a usage error before anything trains, not a traceback after the first lines of output.
    check_estimator_options(parser, dict(
        n_components=args.n_components, k=args.k, l1=args.l1, max_iter=args.max_iter,
        batch_size=args.batch_size, device=args.device, random_state=args.random_state, verbose=args.verbose))
    if args.figure.lower() != "none":
        args.figure = _figure_path(parser, args.figure)
    if args.threads == 0:
        return _run(args)
    import torch

    # A command-line option, but main() also runs in-process (a notebook, a test): the caller's
    # thread count comes back however the run ends.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    """The comparison itself, once the options are checked and the threads set."""
    from .datasets import load_minilm_mlp

    data = load_minilm_mlp()
    train, test = _split(len(data.X), args.n_test, args.n_samples, args.random_state)
    X_train, X_test = data.X[train], data.X[test]
    settings = dict(n_components=args.n_components, k=args.k, max_iter=args.max_iter,
                    batch_size=args.batch_size, device=args.device, verbose=args.verbose)
    print(f"data: {DATA_DESCRIPTION}; {len(train)} training tokens, {len(test)} held-out tokens")
    print("both models: " + ", ".join(f"{key}={value}" for key, value in settings.items() if key != "verbose")
          + f", random_state={args.random_state}; the only difference is l1")
    # The two fits share the MLP's outputs and local weights (they do not depend on l1): the
    # cache computes them once; the models are the same as without it.
    with cache_folder("main") as cache:
        results = compare(X_train, X_test, data.mlp, l1=args.l1, random_state=args.random_state,
                          memory=cache, **settings)
    print()
    print(table(results, args.l1))
    print()
    print(summary(results))
    if args.figure is None:
        print("no figure: matplotlib is not installed (pip install 'sklearn-jsae[plot]')")
    elif args.figure.lower() != "none":
        try:
            path = save_figure(results, X_test, args.figure, args.l1)
        except OSError as exc:  # a full disk: write_failed's line names the file and what is intact
            reason = exc.strerror or str(exc)
            if repr(args.figure) not in reason:  # os.makedirs's own
                reason = f"cannot write {args.figure!r} ({reason})"
            print(f"python -m sklearn_jsae: error: --figure: {reason}", file=sys.stderr)
            return 1
        print(f"figure (|J| histograms and fractions above tau): {path}")
    return 0

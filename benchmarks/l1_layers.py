"""The l1 trade-off on every layer: Jacobian sparsity (absolute and normalised τ) and FVU against l1.

For each model and layer, harvests the MLP's inputs from real English text with
:func:`sklearn_jsae.hf.harvest` (the Python 3.11 documentation's prose from Debian's
``python3.11-doc`` when it is installed, else ``pydoc_data.topics``), holds out the first 40
paragraphs of a seeded random order (``--split shuffled``, the default: held-out and training
tokens come from the whole corpus; ``--split file-order`` holds out the corpus's first 40, so that
a 10,000-token fit trains on the C API chapters and is tested on the introduction), then fits a
:class:`~sklearn_jsae.JacobianSparseAutoencoder` for every ``l1`` at every token count, with the
defaults otherwise except ``max_iter``: every fit processes about ``--token-steps`` tokens (30
epochs at 10k tokens, the default; 3 at 100k), so the counts compare data, not compute.
``--param NAME=VALUE`` changes other estimator parameters (``max_iter`` too) and ``--l1-warmup``
the length of the ``l1`` ramp.  On the held-out tokens it records, for τ in (0.005, 0.01, 0.02),
the fraction of active Jacobian entries above τ in both views (``absolute``: the paper's τ on
∂s_y/∂s_x; ``normalized``: τ on (c_x / c_y)·J, the view the penalty acts on) and the FVU of
each SAE, and the normalised fractions at unit gain (every entry divided by its output latent's
encoder-row norm, whose median is recorded too: shrinking those rows lowers a whole row of J at a
cost to the output SAE, so the unit-gain ratio is the part of the sparsification that is
structure; ``encoder_gain.py`` has the details).  ``l1 = 0`` is the traditional pair, the
baseline of every row trained the same way.

Every finished fit is appended to ``--out`` at once, and fits already there are skipped, so an
interrupted sweep continues where it stopped::

    python benchmarks/l1_layers.py --model minilm --layers 0 1 2 3 4 5 --counts 10000 100000 \\
        --l1 0 2 3 4 --out benchmarks/results/l1_layers_minilm.json
    python benchmarks/l1_layers.py --model smollm2 --layers 5 15 25 --counts 10000 100000 \\
        --l1 0 4 --out benchmarks/results/l1_layers_smollm2.json
    python benchmarks/l1_layers.py --summarise benchmarks/results/l1_layers_minilm.json \\
        benchmarks/results/l1_layers_smollm2.json --l1-default 2 \\
        --rst docs/l1_layers_table.txt --figure docs/images/l1_tradeoff.png

The table and the figure show the rows trained with the defaults on the shuffled split;
``--summarise`` prints every row, experiments included (for example
``--split file-order --layers 2 --counts 10000 --l1 0 2 --param learning_rate=2e-3``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings

THRESHOLDS = (0.005, 0.01, 0.02)


def _texts(split="shuffled"):
    """``(corpus name, paragraphs)``; ``split="shuffled"`` puts them in a seeded random order, so
    that the held-out paragraphs (the first 40) and the training ones come from the whole corpus."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tokens_curve import DOCS, python_docs_paragraphs

    if os.path.isdir(DOCS):
        corpus, texts = "python-docs", python_docs_paragraphs()
    else:
        from sklearn_jsae.datasets import load_python_doc_texts

        corpus, texts = "pydoc", load_python_doc_texts()
    if split == "shuffled":
        texts = list(texts)
        random.Random(0).shuffle(texts)
    return corpus, texts


def _fractions(J, factor, gains):
    """Fractions above τ of ``|J|`` (absolute), ``factor · |J|`` (normalised) and of the normalised
    entries divided by their output latent's encoder-row norm ``gains[a]`` (unit gain: the part of
    the sparsity that shrinking an output encoder row cannot produce, see ``encoder_gain.py``)."""
    from sklearn_jsae.metrics import jacobian_sparsity

    views = []
    for row_factor in (None, factor, factor / gains[J.coords[1]]):
        scaled = J.copy()
        if row_factor is not None:
            scaled.data = scaled.data * row_factor
        views.append({str(t): round(v, 4) for t, v in jacobian_sparsity(scaled, thresholds=THRESHOLDS).items()})
    return views


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return dict(rows=[])


def _save(path, results):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def harvest_split(model, tokenizer, layer, texts, n_tokens, n_held_out=2048):
    """``(X, held_out)``: the MLP inputs of ``layer`` on the first ``n_tokens`` tokens of
    ``texts[40:]`` and on at most ``n_held_out`` tokens of ``texts[:40]``."""
    from sklearn_jsae.hf import harvest

    held_out, _ = harvest(model, layer, texts[:40], tokenizer=tokenizer, exclude_special_tokens=True, progress=False)
    X, _ = harvest(model, layer, texts[40:], tokenizer=tokenizer, exclude_special_tokens=True, n_tokens=n_tokens,
                   progress=False)
    return X, held_out[:n_held_out]


def _parse_params(pairs):
    """``["learning_rate=2e-3", "batch_size=256"]`` -> estimator keyword arguments."""
    params = {}
    for pair in pairs or ():
        name, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:  # a word, such as device=cuda
            params[name] = value
            continue
        params[name] = int(number) if number.is_integer() and "." not in value and "e" not in value else number
    return params


def _key(row):
    """What makes two rows the same fit."""
    return (row["model"], row["layer"], row["tokens"], row["l1"], row.get("split", "file-order"),
            json.dumps(row.get("params", {}), sort_keys=True))


def _patch_l1_warmup(fraction):
    """Make every fit ramp ``l1`` over ``fraction`` of its steps (the trainer's default is 0.05)."""
    import dataclasses

    from sklearn_jsae import JacobianSparseAutoencoder

    train_config = JacobianSparseAutoencoder._train_config

    def patched(self, device):
        return dataclasses.replace(train_config(self, device), l1_warmup=fraction)

    JacobianSparseAutoencoder._train_config = patched


def sweep(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import numpy as np

    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae._cli_train import load_model
    from sklearn_jsae.hf import mlp_of
    from sklearn_jsae.metrics import fraction_variance_unexplained

    params = _parse_params(args.param)
    recorded = dict(params)
    if args.l1_warmup is not None:
        _patch_l1_warmup(args.l1_warmup)
        recorded["l1_warmup"] = args.l1_warmup
    corpus, texts = _texts(args.split)
    model, tokenizer = load_model(args.model)
    for layer in args.layers:
        held_out = X_all = None
        for count in args.counts:
            for l1 in args.l1:
                row = dict(model=args.model, layer=layer, tokens=count, l1=l1, split=args.split, params=recorded)
                if any(_key(r) == _key(row) for r in _load(args.out)["rows"]):
                    continue
                if held_out is None:
                    X_all, held_out = harvest_split(model, tokenizer, layer, texts, max(args.counts), args.held_out)
                    mlp = mlp_of(model, layer)
                X = X_all[:count]
                # --param random_state=N reruns a row with another seed (its own l1 = 0 baseline).
                fit_params = {"max_iter": max(1, math.ceil(args.token_steps / X.shape[0])), "device": "cpu",
                              "random_state": 0, **params}
                started = time.perf_counter()
                jsae = JacobianSparseAutoencoder(mlp, l1=l1, **fit_params).fit(X)
                seconds = time.perf_counter() - started
                fvu = fraction_variance_unexplained(jsae, held_out)
                factor = jsae.input_sae_.scale_ / jsae.output_sae_.scale_
                gains = np.linalg.norm(jsae.output_sae_.encoder_, axis=1)
                absolute, normalized, unit_gain = _fractions(jsae.jacobian(held_out), factor, gains)
                row.update(tokens=int(X.shape[0]), max_iter=fit_params["max_iter"], corpus=corpus,
                           held_out_tokens=int(held_out.shape[0]), scale_ratio=round(1 / factor, 4),
                           absolute=absolute, normalized=normalized, unit_gain=unit_gain,
                           output_gain_median=round(float(np.median(gains)), 4),
                           fvu_input=round(float(fvu["input"]), 4), fvu_output=round(float(fvu["output"]), 4),
                           dead_input=round(float(jsae.history_[-1]["dead_fraction_input"]), 4),
                           dead_output=round(float(jsae.history_[-1]["dead_fraction_output"]), 4),
                           seconds=round(seconds, 1))
                print(json.dumps(row), flush=True)
                results = _load(args.out)  # another process may have written since
                results["rows"].append(row)
                _save(args.out, results)


def _setting(row):
    """Everything but ``l1`` that changes an ``l1 = 0`` fit (the ramp and form of the penalty do not)."""
    params = {k: v for k, v in row.get("params", {}).items() if k not in ("l1_warmup", "penalty")}
    return (row["model"], row["layer"], row["tokens"], row["max_iter"], row.get("split", "file-order"),
            json.dumps(params, sort_keys=True))


def _baseline(rows, row):
    """The ``l1 = 0`` pair trained like ``row``."""
    for r in rows:
        if r["l1"] == 0 and _setting(r) == _setting(row):
            return r
    return None


def _is_main(row, usual):
    """A row of the table and figure: the defaults, the shuffled split, the common budget."""
    return (row.get("split") == "shuffled" and not row.get("params")
            and row["max_iter"] == usual[row["tokens"]])


def summarise(args):
    rows = [r for path in args.summarise for r in _load(path)["rows"]]
    table = []
    for r in sorted(rows, key=lambda r: (r["model"], r["layer"], r["tokens"], r["max_iter"], r["l1"])):
        base = _baseline(rows, r)
        if base is None or r["l1"] == 0:
            continue
        entry = dict(model=r["model"], layer=r["layer"], tokens=r["tokens"], l1=r["l1"], max_iter=r["max_iter"],
                     split=r.get("split", "file-order"), params=r.get("params", {}),
                     trad_abs=base["absolute"]["0.01"], jsae_abs=r["absolute"]["0.01"],
                     trad_norm=base["normalized"]["0.01"], jsae_norm=r["normalized"]["0.01"],
                     ratio_abs=base["absolute"]["0.01"] / max(r["absolute"]["0.01"], 1e-4),
                     ratio_norm=base["normalized"]["0.01"] / max(r["normalized"]["0.01"], 1e-4),
                     dfvu_input=r["fvu_input"] - base["fvu_input"], dfvu_output=r["fvu_output"] - base["fvu_output"],
                     scale_ratio=r.get("scale_ratio", float("nan")),
                     # unit gain: rows recorded before the column existed have none
                     ratio_unit_gain=(base["unit_gain"]["0.01"] / max(r["unit_gain"]["0.01"], 1e-4)
                                      if "unit_gain" in base and "unit_gain" in r else float("nan")),
                     gains=(base.get("output_gain_median", float("nan")), r.get("output_gain_median", float("nan"))))
        table.append(entry)
    header = ("model", "layer", "tokens", "epochs", "split", "other settings", "l1", "c_y/c_x", "abs trad", "abs jsae", "ratio", "norm trad",
              "norm jsae", "ratio", "ΔFVU_x", "ΔFVU_y", "unit-gain ratio", "gain trad → jsae")
    print(" | ".join(header))
    for e in table:
        if args.l1_default is not None and e["l1"] != args.l1_default:
            continue
        settings = " ".join(f"{k}={_setting_value(v)}" for k, v in e["params"].items()) or "-"
        print(" | ".join([e["model"], str(e["layer"]), f"{e['tokens']:,}", str(e["max_iter"]), e["split"], settings,
                          f"{e['l1']:g}", f"{e['scale_ratio']:.2f}",
                          f"{e['trad_abs']:.1%}", f"{e['jsae_abs']:.1%}", f"{e['ratio_abs']:.1f}x",
                          f"{e['trad_norm']:.1%}", f"{e['jsae_norm']:.1%}", f"{e['ratio_norm']:.1f}x",
                          f"{e['dfvu_input']:+.3f}", f"{e['dfvu_output']:+.3f}", _unknown(f"{e['ratio_unit_gain']:.1f}x"),
                          _unknown("{:.2f} → {:.2f}".format(*e["gains"]))]))
    # The table and the figure show the defaults on the shuffled split at the common budget of each
    # count; experiments (other settings, more epochs, the file-order split) appear only above.
    from collections import Counter

    usual = {n: Counter(r["max_iter"] for r in rows if r["tokens"] == n).most_common(1)[0][0]
             for n in {r["tokens"] for r in rows}}
    if args.rst and args.l1_default is not None:
        with open(args.rst, "w") as f:
            f.write(_rst([e for e in table if _is_main(e, usual)], args.l1_default))
        print(f"wrote {args.rst}")
    if args.figure:
        _figure([r for r in rows if _is_main(r, usual)], args.figure, args.l1_default)


def _setting_value(value):
    """A ``--param`` value as printed: numbers in ``%g``, words (``cuda``, ``unit_gain``) as they are."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _unknown(text):
    """``-`` for a figure the rows do not have (recorded before its column existed)."""
    return "-" if "nan" in text else text


def _rst(table, l1):
    """The chosen l1's rows as a reStructuredText table (for docs/defaults.rst)."""
    columns = ("layer", "training tokens", "c_y/c_x", f"above 0.01, l1 = 0 → {l1:g} (absolute)", "ratio",
               f"above 0.01, l1 = 0 → {l1:g} (normalised)", "ratio", "FVU_x rise", "FVU_y rise")
    lines = []
    for e in table:
        if e["l1"] != l1:
            continue
        name = "MiniLM" if e["model"] == "minilm" else "SmolLM2" if e["model"] == "smollm2" else e["model"]
        lines.append((f"{name} {e['layer']}", f"{e['tokens']:,}", f"{e['scale_ratio']:.2f}",
                      f"{e['trad_abs']:.1%} → {e['jsae_abs']:.1%}", f"{e['ratio_abs']:.1f}x",
                      f"{e['trad_norm']:.1%} → {e['jsae_norm']:.1%}", f"{e['ratio_norm']:.1f}x",
                      f"{e['dfvu_input']:+.3f}", f"{e['dfvu_output']:+.3f}"))
    widths = [max([len(c)] + [len(r[i]) for r in lines]) for i, c in enumerate(columns)]
    rule = "  ".join("=" * w for w in widths)
    out = [rule, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), rule]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in lines]
    return "\n".join([*out, rule, ""])


def _figure(rows, path, l1_default):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(5.5 * len(counts), 4.2), squeeze=False, sharey=True)
    curves = sorted({(r["model"], r["layer"]) for r in rows})
    colours = plt.get_cmap("tab10")
    for ax, count in zip(axes[0], counts):
        for c, (model, layer) in enumerate(curves):
            pts = sorted((r for r in rows if (r["model"], r["layer"], r["tokens"]) == (model, layer, count)),
                         key=lambda r: r["l1"])
            if not pts:
                continue
            base = pts[0] if pts[0]["l1"] == 0 else None
            if base is None:
                continue
            x = [max(r["fvu_input"] - base["fvu_input"], r["fvu_output"] - base["fvu_output"]) for r in pts]
            y = [r["normalized"]["0.01"] for r in pts]
            style = "-o" if model == "minilm" else "--s"
            ax.plot(x, y, style, color=colours(c % 10), label=f"{model} L{layer}", markersize=4)
            if l1_default is not None:
                for r, xi, yi in zip(pts, x, y):
                    if r["l1"] == l1_default:
                        ax.plot([xi], [yi], "k*", markersize=10, zorder=5)
        ax.axvline(0.05, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{count:,} training tokens")
        ax.legend(fontsize=7, ncol=2)
        ax.set_xlabel("FVU rise over the l1 = 0 pair (the larger of the two SAEs)")
    axes[0][0].set_ylabel("held-out active entries with |(c_x/c_y) J| > 0.01")
    fig.suptitle("l1 trade-off: each curve runs l1 = 0 (top) upwards; ★ = the default l1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="'minilm', 'smollm2', an HF folder or a .gguf file")
    parser.add_argument("--layers", type=int, nargs="+", default=[3])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--token-steps", type=int, default=300_000,
                        help="tokens processed per fit (max_iter = this / count, at least 1)")
    parser.add_argument("--split", choices=["shuffled", "file-order"], default="shuffled",
                        help="hold out 40 paragraphs drawn at random (seed 0) or the corpus's first 40")
    parser.add_argument("--param", metavar="NAME=VALUE", nargs="+",
                        help="estimator parameters other than the defaults (e.g. learning_rate=2e-3 max_iter=10 "
                             "device=cuda; fits run on the CPU otherwise)")
    parser.add_argument("--l1-warmup", type=float, default=None,
                        help="fraction of the steps over which l1 ramps up (the trainer's default: 0.05)")
    parser.add_argument("--held-out", type=int, default=2048, help="held-out tokens for the metrics")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/l1_layers.json")
    parser.add_argument("--summarise", metavar="JSON", nargs="+", help="print the table of an earlier sweep and stop")
    parser.add_argument("--l1-default", type=float, default=None, help="with --summarise: the row to show")
    parser.add_argument("--rst", metavar="FILE", help="with --summarise and --l1-default: write an RST table here")
    parser.add_argument("--figure", default=None, help="with --summarise: write the trade-off figure here")
    args = parser.parse_args(argv)
    if args.summarise:
        summarise(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()

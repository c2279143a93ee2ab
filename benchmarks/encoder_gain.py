"""How much of a JSAE's sparser Jacobian is structure, and how much a quieter output encoder?

``J[a, b] = W_enc_y[a] · J_mlp · W_dec_x[b]``: the input decoder's rows have unit norm, but the
output encoder's do not, so the penalty can lower every entry of row ``a`` by shrinking
``|W_enc_y[a]|`` (the latent's gain; its encoder bias keeps its level), at a cost to the output
SAE's reconstruction.  This script fits the ``l1 = 0`` pair and JSAEs on one layer (the held-out
split of ``l1_layers.py``) and reports, on the held-out tokens, the median output-encoder row norm,
the fraction of normalised Jacobian entries above 0.01, and the same fraction with every output
row rescaled to the pair's median gain (``|J[a, b]| / |W_enc_y[a]| · median``): the part of the
sparsity that a change of gain cannot explain::

    python benchmarks/encoder_gain.py --model minilm --layer 2 --tokens 10000 --l1 0 2 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--l1", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from l1_layers import _texts, harvest_split

    from sklearn_jsae import JacobianSparseAutoencoder
    from sklearn_jsae._cli_train import load_model
    from sklearn_jsae.hf import mlp_of
    from sklearn_jsae.metrics import fraction_variance_unexplained

    _, texts = _texts("shuffled")
    model, tokenizer = load_model(args.model)
    X, held_out = harvest_split(model, tokenizer, args.layer, texts, args.tokens)
    mlp = mlp_of(model, args.layer)
    reference_gain = None
    print("l1 | median |W_enc_y row| | FVU_y | normalised |J| > 0.01 | the same at the pair's gain")
    for l1 in sorted(args.l1):
        jsae = JacobianSparseAutoencoder(mlp, l1=l1, max_iter=max(1, math.ceil(300_000 / len(X))), device="cpu",
                                         random_state=0).fit(X)
        gains = np.linalg.norm(jsae.output_sae_.encoder_, axis=1)
        if reference_gain is None:  # the smallest l1, normally the l1 = 0 pair
            reference_gain = float(np.median(gains))
        J = jsae.jacobian(held_out)
        normalised = np.abs(J.data) * (jsae.input_sae_.scale_ / jsae.output_sae_.scale_)
        at_reference_gain = normalised / gains[J.coords[1]] * reference_gain
        fvu = fraction_variance_unexplained(jsae, held_out)["output"]
        print(f"{l1:g} | {np.median(gains):.3f} | {fvu:.3f} | {np.mean(normalised > 0.01):.1%} | "
              f"{np.mean(at_reference_gain > 0.01):.1%}", flush=True)


if __name__ == "__main__":
    main()

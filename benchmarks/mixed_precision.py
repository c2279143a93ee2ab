"""bf16 autocast (``mixed_precision=True``) against float32 on the bundled MiniLM data, on the CPU.

The GPU default (``mixed_precision="auto"``: bf16 on CUDA) rests on this comparison and on the
fast-path pins under autocast in tests/test_fast_paths.py: CPU autocast rounds operands to bf16
as CUDA's does.  Prints held-out FVU of both SAEs, the fraction of active Jacobian entries above
0.01 and the fit time for each setting, interleaved twice.

    python benchmarks/mixed_precision.py
"""

import time
import warnings

from sklearn_jsae import JacobianSparseAutoencoder
from sklearn_jsae.datasets import load_minilm_mlp
from sklearn_jsae.metrics import fraction_variance_unexplained, jacobian_sparsity


def main():
    warnings.simplefilter("ignore")
    data = load_minilm_mlp()
    X, held_out = data.X[:3072], data.X[-1024:]
    for mixed in (False, True, False, True):
        started = time.perf_counter()
        jsae = JacobianSparseAutoencoder(data.mlp, n_components=1024, k=32, max_iter=8, batch_size=256,
                                         random_state=0, device="cpu", mixed_precision=mixed).fit(X)
        seconds = time.perf_counter() - started
        fvu = fraction_variance_unexplained(jsae, held_out)
        above = jacobian_sparsity(jsae, held_out[:512])[0.01]
        print(f"{'bf16 autocast' if mixed else 'float32':>13}: fit {seconds:5.1f} s, FVU input {fvu['input']:.4f} "
              f"output {fvu['output']:.4f}, |J|>0.01 {above:.4f}, last loss {jsae.history_[-1]['loss']:.4f}",
              flush=True)


if __name__ == "__main__":
    main()

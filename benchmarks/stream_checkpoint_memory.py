"""Each rank's peak memory while a data-parallel stream fit writes its checkpoints.

A torchrun job of ``--ranks`` gloo ranks on the CPU streams a tiny GPT-2 of width ``--d`` through
:class:`~sklearn_jsae.hf.ActivationStream` (a shuffle buffer of ``--buffer`` rows per rank, so
``buffer · d · 4`` bytes each) into ``TopKSparseAutoencoder.fit_stream`` with a checkpoint every
2 steps.  Each rank reports its peak RSS (``VmHWM``) over the RSS it had just before the fit:
what filling its buffer (``buffer · d · 4`` bytes, the same for every rank and every version),
training and saving added.

``--code FOLDER`` imports ``sklearn_jsae`` from another checkout (``git worktree add /tmp/old
<commit>``), to compare with the code before rank files: there rank 0 gathered every rank's
buffer into its one file.

Run (about a minute on two cores)::

    python benchmarks/stream_checkpoint_memory.py --ranks 4 --d 512 --buffer 32768
    python benchmarks/stream_checkpoint_memory.py --ranks 4 --d 512 --buffer 32768 --code /tmp/old
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import json, os, sys
import numpy as np, torch, transformers
import torch.distributed as dist

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))

torch.set_num_threads(1)
from sklearn_jsae import TopKSparseAutoencoder
from sklearn_jsae.hf import ActivationStream
d, buffer, folder, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = transformers.GPT2Model(transformers.GPT2Config(n_embd=d, n_layer=2, n_head=4, n_positions=64,
                                                       vocab_size=100)).eval()
ids = np.random.default_rng(0).integers(0, 100, size=(world * (2 * buffer // 63 + 40), 64))
stream = ActivationStream(model, 1, input_ids=ids, batch_size=256, buffer_size=buffer, seed=0,
                          rank=rank, world_size=world)
sae = TopKSparseAutoencoder(n_components=64, k=4, batch_size=512, n_tokens=512 * 8, device="cpu",
                            random_state=0, distributed=True, checkpoint_dir=folder, checkpoint_every=2)
start = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here (Linux: reset VmHWM)
    f.write("5")
sae.fit_stream(stream, n_statistics=256)
json.dump(dict(rank=rank, added_mb=rss("VmHWM:") - start), open(os.path.join(out, f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--buffer", type=int, default=32768)
    parser.add_argument("--code", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        worker = os.path.join(scratch, "worker.py")
        with open(worker, "w", encoding="utf-8") as f:
            f.write(WORKER)
        env = dict(os.environ, PYTHONPATH=args.code, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(args.ranks), worker, str(args.d), str(args.buffer), os.path.join(scratch, "ck"),
                              scratch], env=env, capture_output=True, text=True)
        if job.returncode != 0:
            sys.exit(f"the torchrun job failed (status {job.returncode}):\n{job.stderr[-3000:]}")
        added = [json.load(open(os.path.join(scratch, f"rank{r}.json")))["added_mb"] for r in range(args.ranks)]
        files = sorted(os.listdir(os.path.join(scratch, "ck")))
        sizes = [os.path.getsize(os.path.join(scratch, "ck", name)) / 2**20 for name in files]
    buffer_mb = args.buffer * args.d * 4 / 2**20
    print(f"{args.ranks} ranks, buffer {args.buffer} x {args.d} ({buffer_mb:.0f} MiB each), code {args.code}")
    print("peak RSS added by the fit and its saves, per rank (MB): " + ", ".join(f"{a:.0f}" for a in added))
    print("checkpoint files (MiB): " + ", ".join(f"{name[:22]}...{name[-18:]} {size:.0f}"
                                                  for name, size in zip(files, sizes)))


if __name__ == "__main__":
    main()

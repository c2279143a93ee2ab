"""Write numpy.inv and torch.inv: hand-listed intersphinx inventories for the docs' offline build.

NumPy and PyTorch publish ``objects.inv`` only on their web sites, which the build machines cannot
reach, and no Debian package ships one.  These files list just the names our docs and gallery
mention, with the URLs those names have on the projects' documentation sites (relative to the base
URL given in ``docs/conf.py``).  Rerun after adding a name::

    python docs/_inventories/make_subset_inventories.py

The format is Sphinx's inventory version 2: four header lines, then zlib-compressed lines of
``name domain:role priority uri display-name`` (``$`` in a uri stands for the name, ``-`` for a
display name equal to the name).
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# numpy.org/doc/stable/: one page per function and most classes under reference/generated/.
NUMPY_GENERATED = {
    "py:class": ["numpy.ndarray", "numpy.dtype", "numpy.memmap"],
    "py:function": [
        "numpy.abs", "numpy.allclose", "numpy.arange", "numpy.argmax", "numpy.argsort", "numpy.array",
        "numpy.asarray", "numpy.ascontiguousarray", "numpy.bincount", "numpy.concatenate",
        "numpy.count_nonzero", "numpy.flatnonzero", "numpy.isclose", "numpy.isfinite", "numpy.isin",
        "numpy.linspace", "numpy.load", "numpy.mean", "numpy.median", "numpy.percentile", "numpy.save",
        "numpy.savez", "numpy.sort", "numpy.unique", "numpy.where", "numpy.zeros",
    ],
}
NUMPY_OTHER = [
    ("numpy.float16", "py:attribute", "reference/arrays.scalars.html#$"),
    ("numpy.float32", "py:attribute", "reference/arrays.scalars.html#$"),
    ("numpy.float64", "py:attribute", "reference/arrays.scalars.html#$"),
    ("numpy.int32", "py:attribute", "reference/arrays.scalars.html#$"),
    ("numpy.int64", "py:attribute", "reference/arrays.scalars.html#$"),
    ("numpy.random.Generator", "py:class", "reference/random/generator.html#$"),
    ("numpy.random.default_rng", "py:function", "reference/random/generator.html#$"),
    ("numpy.random.RandomState", "py:class", "reference/random/legacy.html#$"),
]

# docs.pytorch.org/docs/stable/: one page per function and class under generated/.
TORCH_GENERATED = {
    "py:class": [
        "torch.Generator", "torch.nn.GELU", "torch.nn.Linear", "torch.nn.Module", "torch.nn.ReLU",
        "torch.nn.Sequential", "torch.nn.Sigmoid", "torch.nn.SiLU", "torch.nn.Tanh", "torch.no_grad",
    ],
    "py:function": [
        "torch.as_tensor", "torch.cuda.is_available", "torch.from_numpy", "torch.func.jvp",
        "torch.manual_seed", "torch.nn.functional.gelu", "torch.nn.functional.silu", "torch.set_num_threads",
    ],
}
TORCH_OTHER = [
    ("torch.Tensor", "py:class", "tensors.html#$"),
    ("torch.device", "py:class", "tensor_attributes.html#$"),
    ("torch.dtype", "py:class", "tensor_attributes.html#$"),
    ("torch.autocast", "py:class", "amp.html#$"),
]


def write_inventory(path, project, version, entries):
    """Write ``entries`` ((name, "domain:role", uri), ...) as a version-2 inventory at ``path``."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(entries))
    path.write_bytes(header.encode() + zlib.compress(body.encode(), 9))


def main():
    numpy = [(name, role, "reference/generated/$.html#$") for role, names in NUMPY_GENERATED.items()
             for name in names] + NUMPY_OTHER
    torch = [(name, role, "generated/$.html#$") for role, names in TORCH_GENERATED.items()
             for name in names] + TORCH_OTHER
    write_inventory(HERE / "numpy.inv", "NumPy", "stable (hand-listed subset)", numpy)
    write_inventory(HERE / "torch.inv", "PyTorch", "stable (hand-listed subset)", torch)
    print(f"wrote {len(numpy)} NumPy and {len(torch)} PyTorch names")


if __name__ == "__main__":
    main()

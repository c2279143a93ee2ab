"""The gallery, ``examples/plot_*.py``: its layout, and every example run end to end.

The docs build (``make docs``, run by ``.ci/run``) runs each example at full size through
sphinx-gallery.  Here each runs with every SAE fit cut to one epoch, so that a broken example
also fails ``pytest``, in seconds.
"""

import ast
import importlib.util
import os
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("plot_*.py"))
# What each example must print when it runs (its own numbers vary with the seed and the epochs).
PRINTS = {
    "plot_quick_start.py": ["scipy.sparse csr (1024, 512)", "stored entries (k * k = 256)"],
    "plot_jsae_vs_traditional.py": ["JSAE (l1=2)", "traditional (l1=0)", "FVU, output SAE"],
    "plot_l1_sweep.py": ["<- chosen", "search.best_estimator_ is that candidate refitted"],
    "plot_circuit.py": ["output latent", "input latent"],
    "plot_pipeline.py": ["JSAE codes", "balanced accuracy", "coefficient", "fires on"],
    "plot_smollm2.py": ["mlp_of gives a GatedMLP", "and the harvested outputs"],
    "plot_long_run.py": ["packed sequences all", "killed at step 12",
                         "resumed == uninterrupted, bit for bit: True",
                         "loaded model gives the same codes: True", "cfg.json"],
}


def _gallery_order():
    path = ROOT / "docs" / "sphinxext" / "gallery_order.py"
    spec = importlib.util.spec_from_file_location("gallery_order", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ORDER


def test_every_example_exists_and_the_gallery_orders_every_one():
    names = [path.name for path in EXAMPLES]
    assert sorted(names) == sorted(PRINTS)
    assert sorted(_gallery_order()) == sorted(names)
    assert _gallery_order()[0] == "plot_quick_start.py"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_layout(path):
    text = path.read_text()
    title, underline = ast.get_docstring(ast.parse(text)).splitlines()[:2]
    assert title and underline == "=" * len(title), "the docstring opens with a title underlined with ="
    cells = text.split("\n# %%\n")
    assert len(cells) >= 4, "a few # %% cells, each with its text"
    assert cells[-1].startswith("# What to look at:"), "the last cell says what to look at in the figure"
    assert "plt.show()" in text
    # Offline, self-contained: no hub ids, nothing read from the steering folder.
    assert not re.search(r"from_pretrained\(\s*[\"']", text), "from_pretrained takes a local folder only"
    assert "shared" not in text


@pytest.fixture
def one_epoch_fits(monkeypatch):
    """Every SAE fit runs one epoch; torch uses one thread (restored afterwards)."""
    import torch

    from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder

    for cls in (JacobianSparseAutoencoder, TopKSparseAutoencoder):
        original = cls.fit

        def fit(self, X, y=None, _original=original, **kwargs):
            self.set_params(max_iter=1)
            return _original(self, X, y, **kwargs)

        monkeypatch.setattr(cls, "fit", fit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(path, one_epoch_fits, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if path.name == "plot_smollm2.py":
        pytest.importorskip("transformers")
        models = Path(os.environ.get("SKLEARN_JSAE_MODELS", ROOT / ".models"))
        if not (models / "smollm2-135m-instruct" / "model.safetensors").is_file():
            message = "SmolLM2 is not installed: run `bash scripts/install_test_models.sh`"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)
    monkeypatch.chdir(path.parent)  # as sphinx-gallery runs it
    plt.close("all")
    try:
        runpy.run_path(str(path), run_name="__main__")
        figures = [plt.figure(number) for number in plt.get_fignums()]
        assert figures, "the example draws a figure"
        assert all(figure.axes and figure.axes[0].has_data() for figure in figures)
    finally:
        plt.close("all")
    out = capsys.readouterr().out
    for expected in PRINTS[path.name]:
        assert expected in out
    if path.name == "plot_smollm2.py":
        error = float(re.search(r"harvested outputs: (\S+)", out).group(1))
        assert error <= 1e-4


def test_the_real_mlp_check_script_runs_on_an_npz_of_its_format(tmp_path):
    """``scripts/check_real_mlp.py`` reads a user's file, so no example runs it; it had kept an
    import of a function since removed.  Run it on a small file in the format it documents."""
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(0)
    d, d_mlp = 8, 32
    np.savez(tmp_path / "mlp.npz", W_in=rng.normal(size=(d_mlp, d)).astype(np.float32) / 3,
             b_in=np.zeros(d_mlp, np.float32), W_out=rng.normal(size=(d, d_mlp)).astype(np.float32) / 6,
             b_out=np.zeros(d, np.float32), X=rng.normal(size=(500, d)).astype(np.float32))
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_real_mlp.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "mlp.npz"), "--l1", "0", "2",
                             "--n-train", "400", "--n-test", "100", "--max-iter", "30", "--batch-size", "64"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("l1=")]
    assert [line.split()[0] for line in lines] == ["l1=0.0", "l1=2.0"]
    fvu = [float(re.search(r"FVU_x (\S+)", line).group(1)) for line in lines]
    above = [float(re.search(r"\|J\|>0.01 (\S+)", line).group(1)) for line in lines]
    assert all(0 <= value < 1 for value in fvu)
    assert above[1] < above[0]  # the penalty sparsifies the Jacobian (0.44 against 0.89 here)

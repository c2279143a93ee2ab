"""Tests of the report command ``python -m sklearn_jsae evaluate`` (sklearn_jsae._evaluate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sklearn_jsae._evaluate import main

TINY = ["--n-components", "24", "--k", "2", "--max-iter", "1", "--n-train", "300", "--n-test", "64",
        "--linearity-samples", "8", "--intervention-samples", "16"]


def test_synthetic_run_prints_the_table_and_writes_json_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "numbers.json"
    figures = tmp_path / "figures"
    assert main(TINY + ["--synthetic", "--json", str(out), "--figures", str(figures)]) == 0
    text = capsys.readouterr().out
    assert "synthetic MLP" in text
    for row in ("tau = 0.005", "tau = 0.02", "input SAE", "output SAE", "linear", "jumprelu", "agreement",
                "Normalised: fraction of active entries with (c_x/c_y)|J| > tau", "c_y / c_x",
                "  |J| > 0.01", "  (c_x/c_y)|J| > 0.01"):
        assert row in text
    assert "16.5%" in text and "97.7%" in text  # the paper's numbers sit beside ours

    payload = json.loads(out.read_text())
    assert set(payload["models"]) == {"jsae-trained", "traditional-trained", "jsae-random", "traditional-random"}
    for model in payload["models"].values():
        for key in ("sparsity", "sparsity_normalized", "global_sparsity", "global_sparsity_normalized"):
            sparsity = [model[key][t] for t in ("0.005", "0.01", "0.015", "0.02")]
            assert all(0 <= s <= 1 for s in sparsity) and sparsity == sorted(sparsity, reverse=True)
        assert model["jacobian_scale"] > 0
        # the views differ by the factor c_x / c_y, which is not 1 on the synthetic MLP
        assert model["sparsity_normalized"] != model["sparsity"]
        assert sum(model["linearity"].values()) == pytest.approx(1.0)
        assert 0 <= model["intervention"] <= 1 and model["fvu_input"] >= 0
    assert payload["settings"]["k"] == 2 and payload["n_test"] == 64 and payload["n_train"] == 300

    names = sorted(p.name for p in figures.iterdir())
    assert names == ["jacobian_block.png", "jacobian_histogram.png", "linearity_examples.png", "top_edges.png"]
    for path in figures.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _process_state():
    import matplotlib
    import torch

    return (torch.get_num_threads(), matplotlib.get_backend(),
            {key: str(value) for key, value in matplotlib.rcParams.items()})


def test_an_in_process_run_leaves_the_callers_threads_backend_and_rcparams(caller_state, tmp_path, capsys):
    """main(argv) runs in notebooks and tests too: --threads stayed set after it, and the figures
    switched matplotlib to Agg (matplotlib.use, which also rewrites rcParams)."""
    before = _process_state()
    assert main(TINY + ["--synthetic", "--threads", "1", "--figures", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 4
    assert _process_state() == before


def test_the_thread_count_comes_back_when_the_run_fails(caller_state, monkeypatch):
    import torch

    from sklearn_jsae import _evaluate

    def fail(args):
        assert torch.get_num_threads() == 2  # the run itself has --threads
        raise RuntimeError("stopped")

    monkeypatch.setattr(_evaluate, "_load", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        main(TINY + ["--synthetic", "--threads", "2"])
    assert torch.get_num_threads() == 3


def test_bundled_run_uses_the_real_minilm_mlp(capsys):
    assert main(TINY) == 0
    text = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in text and "300 training tokens" in text


def test_bad_options_exit_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--k", "0"])
    assert excinfo.value.code == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    for count in ("0", "-6000"):  # a negative count trained on all but the last tokens
        with pytest.raises(SystemExit) as excinfo:
            main(["--synthetic", "--n-train", count])
        assert excinfo.value.code == 2
        assert f"--n-train must be >= 1 (training tokens), got {count}" in capsys.readouterr().err


@pytest.mark.parametrize("given, shown", [
    (["--l1", "-1"], "argument --l1: The 'l1' parameter of JacobianSparseAutoencoder must be a float in the "
                     "range [0.0, inf). Got -1.0"),
    (["--l1", "nan"], "argument --l1: The 'l1' parameter"),
    (["--k", "9", "--n-components", "8"], "k=9 must be <= n_components=8"),
    (["--random-state", "-1"], "argument --random-state: The 'random_state' parameter of "
                               "JacobianSparseAutoencoder must be an int in the range [0, 4294967295]"),
    (["--verbose", "-1"], "argument --verbose: The 'verbose' parameter"),
    (["--device", "cuda"], "device='cuda' but torch.cuda.is_available() is False on this machine"),
])
def test_options_the_fits_would_refuse_are_usage_errors_before_any_work(no_work, monkeypatch, capsys, given,
                                                                         shown):
    """The estimator's own checks (shared with ``train``), on the options before the data loads."""
    from sklearn_jsae._backend import mlp

    monkeypatch.setattr(mlp, "cuda_device_count", lambda: 0)  # --device cuda is refused on any machine
    with pytest.raises(SystemExit) as excinfo:
        main(["--synthetic", *given])
    assert excinfo.value.code == 2
    assert shown in capsys.readouterr().err


def test_unwritable_output_paths_are_usage_errors_before_any_work(no_work, tmp_path, capsys):
    """A --json or --figures path that cannot be written would stop the command after all four fits."""
    regular = tmp_path / "notes.txt"
    regular.write_text("kept")
    for given, shown in (
        (["--json", str(tmp_path / "absent" / "out.json")],
         f"argument --json: the folder '{tmp_path / 'absent'}' of '{tmp_path / 'absent' / 'out.json'}' does "
         f"not exist; create it first"),
        (["--json", str(tmp_path)], f"argument --json: '{tmp_path}' is a folder; give a file path"),
        (["--figures", str(regular)], f"argument --figures: '{regular}' exists and is not a folder"),
        (["--figures", str(regular / "figures")],
         f"argument --figures: cannot create the folder '{regular / 'figures'}': '{regular}' is a file"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            main(["--synthetic", *given])
        assert excinfo.value.code == 2
        assert shown in capsys.readouterr().err
    assert regular.read_text() == "kept" and not (tmp_path / "absent").exists()


def test_runnable_as_a_module():
    for command in (["-m", "sklearn_jsae._evaluate", "--help"], ["-m", "sklearn_jsae", "evaluate", "--help"]):
        result = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "--figures" in result.stdout and "--max-iter" in result.stdout


def test_json_dash_writes_the_json_alone_on_stdout_and_the_table_on_stderr(tmp_path, monkeypatch, capsys):
    """``--json -`` wrote a file named "-"; now stdout holds the JSON alone (``> report.json``)."""
    monkeypatch.chdir(tmp_path)
    assert main(TINY + ["--synthetic", "--threads", "1", "--json", "-"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["n_train"] == 300
    assert "tau = 0.005" in out.err and "numbers written" not in out.err + out.out
    assert not (tmp_path / "-").exists()


def test_json_to_the_file_stdout_is_redirected_to_holds_the_json(tmp_path):
    """``--json /dev/stdout > file``: open(..., "w") truncated the file while the table's prints went
    on at their old offset (NUL bytes, the table and the JSON mixed)."""
    report = tmp_path / "report.json"
    with report.open("w") as stdout:
        result = subprocess.run([sys.executable, "-m", "sklearn_jsae", "evaluate", *TINY, "--synthetic",
                                 "--threads", "1", "--json", "/dev/stdout"], stdout=stdout, stderr=subprocess.PIPE,
                                text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["n_test"] == 64
    assert "tau = 0.005" in result.stderr


def _full_disk_open(monkeypatch, module):
    """``open`` in ``module`` gives files that write half of what they are given, then raise ENOSPC."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, handle):
            self._handle = handle

        def write(self, text):
            self._handle.write(text[: len(text) // 2])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if "w" in mode else handle

    monkeypatch.setattr(module, "open", full_open, raising=False)


def test_a_full_disk_keeps_the_previous_json_report_and_says_so(tmp_path, monkeypatch, capsys):
    """``--json PATH`` truncated the old report, left cut-off JSON at PATH and a bare OSError traceback."""
    from sklearn_jsae import _evaluate

    report = tmp_path / "report.json"
    report.write_text('{"old": "report, still valid"}')
    _full_disk_open(monkeypatch, _evaluate)
    assert main(TINY + ["--synthetic", "--threads", "1", "--json", str(report)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m sklearn_jsae evaluate: error: --json: ")
    assert repr(str(report)) in lines[0] and "No space left on device" in lines[0]
    assert "previous file" in lines[0] and "intact" in lines[0]
    assert json.loads(report.read_text()) == {"old": "report, still valid"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


def test_json_report_replaces_an_existing_file_whole(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text('{"old": 1}')
    assert main(TINY + ["--synthetic", "--threads", "1", "--json", str(report)]) == 0
    assert "models" in json.loads(report.read_text())
    assert f"numbers written to {report}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

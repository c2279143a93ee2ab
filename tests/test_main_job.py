"""The main job (``python -m sklearn_jsae``, ``make run``): a JSAE against the traditional pair."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sklearn_jsae import _main_job
from sklearn_jsae._estimator import DEFAULT_L1
from sklearn_jsae.__main__ import main

SMALL = ["--n-samples", "256", "--n-test", "128", "--n-components", "32", "--k", "4", "--max-iter", "2",
         "--batch-size", "64", "--threads", "1"]


def _row(out, label):
    """The numbers after ``label`` on the first table row that starts with it (JSAE, traditional)."""
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return [float(value) for value in re.findall(r"\d+\.\d+", line.split(label, 1)[1])]


def test_small_run_prints_both_models_side_by_side_and_saves_the_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "out" / "comparison.png"
    assert main([*SMALL, "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "256 training tokens, 128 held-out tokens" in out
    assert f"JSAE (l1={DEFAULT_L1:g})" in out and "traditional (l1=0)" in out
    densities = [_row(out, f"tau = {tau:g}") for tau in _main_job.THRESHOLDS]
    assert all(len(row) == 2 and all(0 <= v <= 100 for v in row) for row in densities)
    for column in (0, 1):  # a fraction above tau cannot grow with tau
        values = [row[column] for row in densities]
        assert values == sorted(values, reverse=True)
    normalised = out.split("the normalised view", 1)[1]
    assert [_row(normalised, f"tau = {tau:g}") != [] for tau in _main_job.THRESHOLDS] == [True] * 4
    fvu = _row(out, "input SAE")
    assert len(fvu) == 2 and all(0 <= v < 2 for v in fvu)
    assert "The Jacobian penalty cuts the active entries with |J| > 0.01 from" in out
    assert f"figure (|J| histograms and fractions above tau): {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _process_state():
    import matplotlib
    import torch

    return (torch.get_num_threads(), matplotlib.get_backend(),
            {key: str(value) for key, value in matplotlib.rcParams.items()})


def test_an_in_process_run_leaves_the_callers_threads_backend_and_rcparams(caller_state, tmp_path, capsys):
    """main(argv) runs in notebooks and tests too: it left torch on --threads' 1 thread and
    matplotlib switched to Agg (matplotlib.use, which also rewrites rcParams)."""
    before = _process_state()
    assert main([*SMALL, "--max-iter", "1", "--figure", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _process_state() == before


def test_the_thread_count_comes_back_when_the_run_fails(caller_state, monkeypatch):
    import torch

    def fail(*args, **kwargs):
        assert torch.get_num_threads() == 1  # the run itself has --threads
        raise RuntimeError("stopped")

    monkeypatch.setattr(_main_job, "compare", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        main([*SMALL, "--figure", "none"])
    assert torch.get_num_threads() == 3


def test_the_two_models_differ_only_in_l1():
    from sklearn_jsae.datasets import load_minilm_mlp

    data = load_minilm_mlp()
    train, test = _main_job._split(len(data.X), 64, 192, random_state=0)
    assert len(train) == 192 and len(test) == 64 and not np.intersect1d(train, test).size
    results = _main_job.compare(data.X[train], data.X[test], data.mlp, l1=0.7, random_state=3,
                                n_components=16, k=4, max_iter=1, batch_size=64)
    jsae, trad = (results[name]["model"].get_params() for name in ("jsae", "traditional"))
    assert jsae.pop("l1") == 0.7 and trad.pop("l1") == 0.0
    assert jsae == trad
    for name in ("jsae", "traditional"):
        assert set(results[name]["sparsity"]) == set(_main_job.THRESHOLDS)
        assert np.isfinite(results[name]["fvu_input"]) and np.isfinite(results[name]["fvu_output"])


def test_summary_reports_the_traditional_then_the_jsae_density():
    results = {
        "jsae": {"sparsity": {0.01: 0.25}, "fvu_input": 0.20, "fvu_output": 0.15},
        "traditional": {"sparsity": {0.01: 0.75}, "fvu_input": 0.19, "fvu_output": 0.12},
    }
    text = _main_job.summary(results)
    assert "from 75% (traditional) to 25% (JSAE)" in text
    assert "+0.010 (input SAE) and +0.030 (output SAE)" in text


def test_no_figure_when_asked(monkeypatch, capsys):
    monkeypatch.setattr(_main_job, "save_figure", lambda *args, **kwargs: pytest.fail("a figure was saved"))
    assert main([*SMALL, "--n-samples", "128", "--figure", "none"]) == 0
    out = capsys.readouterr().out
    assert "The Jacobian penalty cuts" in out and "figure (" not in out


def test_bad_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--n-samples", "0"])
    assert exit_info.value.code == 2
    assert "--n-samples: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_default_figure_folder_cannot_shadow_the_package():
    # A folder named sklearn_jsae in the temp folder would be imported instead of the package by
    # any script run from there.
    assert "sklearn_jsae" not in Path(_main_job.DEFAULT_FIGURE).parts


def test_module_entry_point_dispatches_to_the_main_job():
    result = subprocess.run([sys.executable, "-m", "sklearn_jsae", "--help"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "traditional SAE pair (l1=0)" in result.stdout
    assert re.search(r"--n-samples N_SAMPLES", result.stdout)


# ------------------------------------------------------------------------------- command-line faults


@pytest.fixture
def no_fit(monkeypatch):
    """A fit fails the test: the checks must come before any work."""
    monkeypatch.setattr(_main_job, "compare", lambda *a, **k: pytest.fail("the fits started"))


@pytest.mark.parametrize("given, shown", [
    (["--k", "64", "--n-components", "32"], "argument --k: k=64 must be <= n_components=32"),
    (["--l1", "-1"], "argument --l1: The 'l1' parameter of JacobianSparseAutoencoder must be a float in the range"),
    (["--verbose", "-1"], "argument --verbose: The 'verbose' parameter"),
    (["--random-state", "-5"], "argument --random-state: The 'random_state' parameter"),
    (["--device", "cuda"], "argument --device: device='cuda' but torch.cuda.is_available() is False"),
])
def test_options_the_fits_would_refuse_are_usage_errors_before_any_work(no_fit, monkeypatch, capsys, given, shown):
    """They ended in a traceback (status 1) after the first lines of output."""
    from sklearn_jsae._backend import mlp

    monkeypatch.setattr(mlp, "cuda_device_count", lambda: 0)  # --device cuda is refused on any machine
    with pytest.raises(SystemExit) as stopped:
        main([*SMALL, *given, "--figure", "none"])
    assert stopped.value.code == 2
    out = capsys.readouterr()
    assert shown in out.err and out.out == ""


def test_figure_paths_that_cannot_be_written_are_usage_errors_before_any_work(no_fit, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    regular = tmp_path / "afile"
    regular.write_text("kept")
    for figure, shown in (
        (tmp_path, (f"argument --figure: '{tmp_path}' is a folder; give a file path, such as "
                    f"'{tmp_path / 'jsae_vs_traditional.png'}'")),
        (regular / "x.png", f"argument --figure: cannot write '{regular / 'x.png'}': '{regular}' is a file"),
        (tmp_path / "x.jpgx", "matplotlib cannot write '.jpgx' files here; end the path in one of"),
        # PGF goes through a TeX program: without one it failed after both fits (none on this machine)
        *([(tmp_path / "x.pgf", "matplotlib cannot write '.pgf' files here")] if not _has_tex() else []),
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*SMALL, "--figure", str(figure)])
        assert stopped.value.code == 2
        assert shown in capsys.readouterr().err
    assert regular.read_text() == "kept" and not (tmp_path.with_suffix(".png")).exists()


def _has_tex():
    import shutil

    import matplotlib

    return shutil.which(str(matplotlib.rcParams["pgf.texsystem"])) is not None


def _fake_results():
    row = {"sparsity": dict.fromkeys(_main_job.THRESHOLDS, 0.5),
           "sparsity_normalized": dict.fromkeys(_main_job.THRESHOLDS, 0.5),
           "fvu_input": 0.1, "fvu_output": 0.1, "dead_input": 0.0, "dead_output": 0.0, "seconds": 1.0}
    return {"jsae": dict(row), "traditional": dict(row)}


def test_a_figure_path_without_a_suffix_is_written_and_printed_as_png(tmp_path, monkeypatch, capsys):
    """matplotlib added .png itself: the run printed PATH and wrote PATH.png."""
    pytest.importorskip("matplotlib")
    saved = []

    def save_figure(results, X_test, path, l1):
        saved.append(path)
        return path

    monkeypatch.setattr(_main_job, "compare", lambda *a, **k: _fake_results())
    monkeypatch.setattr(_main_job, "save_figure", save_figure)
    assert main([*SMALL, "--figure", str(tmp_path / "comparison")]) == 0
    assert saved == [str(tmp_path / "comparison.png")]
    assert f"figure (|J| histograms and fractions above tau): {tmp_path / 'comparison.png'}\n" in capsys.readouterr().out


def test_top_level_help_names_both_commands_and_a_mistyped_command_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m sklearn_jsae train --help" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
    assert main(["evalute"]) == 2
    assert "unknown command 'evalute'; did you mean 'evaluate'?" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_and_goes_on(monkeypatch, capsys):
    """In-process the interrupt goes on after its line (a loop of main() calls stopped only at its end
    when main returned 130)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_main_job, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*SMALL, "--figure", "none"])
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_ctrl_c_ends_the_program_by_sigint_with_one_line():
    """As a program: one line, no traceback, and the process ends by SIGINT (a shell loop over
    commands stops; an exit status of 130 did not stop it)."""
    import signal

    # Unbuffered, and far too long to finish: the interrupt lands in the fits, which start just
    # after the first line ("data: ...") is printed.
    # SIGINT as a terminal's Ctrl-C finds it: a job started in the background by a shell (a CI
    # runner's) ignores SIGINT, and Python then installs no KeyboardInterrupt handler at all.
    process = subprocess.Popen([sys.executable, "-u", "-m", "sklearn_jsae", *SMALL, "--max-iter", "1000000",
                                "--figure", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().startswith(b"data:")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        err = err.decode()
        assert process.returncode == -signal.SIGINT
    finally:
        process.kill()
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``python -m sklearn_jsae ... | head``: a BrokenPipeError traceback, or "Exception ignored"
    at the exit's flush (status 120); now Python's recipe, status 1 and nothing on stderr."""
    tiny = ["--n-samples", "128", "--n-test", "64", "--n-components", "16", "--k", "2", "--max-iter", "1",
            "--batch-size", "64", "--figure", "none"]
    process = subprocess.Popen([sys.executable, "-m", "sklearn_jsae", *tiny], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdout.close()  # the reader is gone before the command writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1
    assert "Error" not in err and "Traceback" not in err

"""What ``python -m sklearn_jsae`` and ``python -m sklearn_jsae evaluate`` leave on disk, however
they end: figures replaced whole or not at all, ``--json`` written through links and into
devices and FIFOs (not over them), nothing else of the user's overwritten, and their temporary
caches removed after a SIGTERM, or by the next run after a SIGKILL.  Each test failed on the code
before it, but the one of a figure's link and format, which guards the atomic writer's own risks."""

import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

from sklearn_jsae import _evaluate
from sklearn_jsae.__main__ import main
from sklearn_jsae._backend import files

MAIN_JOB = ["--n-samples", "256", "--n-test", "128", "--n-components", "32", "--k", "4", "--max-iter", "2",
            "--batch-size", "64", "--threads", "1"]
EVALUATE = ["evaluate", "--synthetic", "--n-components", "24", "--k", "2", "--max-iter", "1", "--n-train", "300",
            "--n-test", "64", "--linearity-samples", "8", "--intervention-samples", "16", "--threads", "1"]


def _full_disk_savefig(monkeypatch):
    """Figures write half of a PNG, then raise ENOSPC, as matplotlib does on a full disk."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def savefig(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)


def test_a_figure_the_main_job_cannot_finish_leaves_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    """savefig wrote over the previous figure: a kill or a full disk left a truncated image, and a
    full disk a traceback after both fits."""
    figure = tmp_path / "comparison.png"
    figure.write_bytes(b"the previous figure")
    _full_disk_savefig(monkeypatch)
    assert main([*MAIN_JOB, "--figure", str(figure)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"python -m sklearn_jsae: error: --figure: cannot write {str(figure)!r} (No space left "
                           f"on device): the previous file there, if any, is intact; free space on its disk, "
                           f"or write elsewhere")
    assert figure.read_bytes() == b"the previous figure"
    assert sorted(os.listdir(tmp_path)) == ["comparison.png"]  # no temporary left beside it


def test_figures_evaluate_cannot_finish_leave_the_previous_ones_whole(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "figures"
    folder.mkdir()
    (folder / "jacobian_histogram.png").write_bytes(b"the previous figure")
    _full_disk_savefig(monkeypatch)
    assert main([*EVALUATE, "--figures", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m sklearn_jsae evaluate: error: --figures: cannot write "
                          f"{str(folder / 'jacobian_histogram.png')!r} (No space left on device): the previous file")
    assert (folder / "jacobian_histogram.png").read_bytes() == b"the previous figure"
    assert os.listdir(folder) == ["jacobian_histogram.png"]


def test_a_figure_is_written_through_a_link_and_in_the_format_of_its_suffix(tmp_path, capsys):
    """A rename over the path would replace the link with a file, and the temporary's suffix
    (``.tmp``) would pick the format, were they not handled."""
    pytest.importorskip("matplotlib")
    target = tmp_path / "figures" / "kept.pdf"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.pdf"
    link.symlink_to(target)
    assert main([*MAIN_JOB, "--figure", str(link)]) == 0
    assert link.is_symlink() and target.read_bytes().startswith(b"%PDF")
    assert f"figure (|J| histograms and fractions above tau): {link}" in capsys.readouterr().out


def _reading(path, into):
    """A thread that reads the FIFO ``path`` to its end into ``into`` (a list)."""
    thread = threading.Thread(target=lambda: into.append(open(path, "rb").read()), daemon=True)
    thread.start()
    return thread


def test_json_goes_into_a_fifo_and_through_a_link_without_replacing_either(tmp_path, capsys):
    """``--json >(jq .)`` (a shell's /dev/fd/N) failed after every fit; a FIFO or a device node was
    replaced by a regular file (as root, ``--json /dev/null`` replaced /dev/null); a link was
    replaced by a file, its target left stale."""
    import json

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received = []
    reader = _reading(fifo, received)
    assert main([*EVALUATE, "--json", str(fifo)]) == 0
    reader.join(timeout=60)
    assert json.loads(received[0])["n_train"] == 300
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    target = tmp_path / "reports" / "report.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    assert main([*EVALUATE, "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["n_test"] == 64
    capsys.readouterr()


def test_a_model_saved_through_a_link_or_into_a_fifo_leaves_them_in_place(tmp_path):
    import warnings

    from sklearn_jsae import TopKSparseAutoencoder, load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = TopKSparseAutoencoder(n_components=8, k=2, max_iter=1, device="cpu", random_state=0).fit(
            np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    target = tmp_path / "models" / "sae.safetensors"
    target.parent.mkdir()
    sae.save(target)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    sae.set_params(k=3).save(link)
    assert link.is_symlink() and load(target).k == 3
    assert sorted(os.listdir(target.parent)) == ["sae.safetensors"]

    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    received = []
    reader = _reading(fifo, received)
    sae.save(fifo)
    reader.join(timeout=60)
    assert received[0] == target.read_bytes() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("given, shown", [
    (["--json", ""], "argument --json: an empty path; give a file path"),
    (["--figures", ""], "argument --figures: an empty path; give a folder path"),
    (["--json", "{model}"], "argument --json: '{model}' holds something other than JSON (it starts "
                            "b'\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00{{\"a\":1}}'), not an earlier report; "
                            "remove it or give another path"),
    (["--json", "{plain}/report.json"], "argument --json: cannot write '{plain}/report.json': '{plain}' is a file, "
                                        "not a folder; give another path"),
    (["--n-test", "0"], "--n-test must be >= 1, got 0"),
])
def test_evaluate_refuses_outputs_it_would_lose_or_destroy_before_any_work(no_work, tmp_path, capsys, given,
                                                                          shown):
    """``--json model.safetensors`` replaced the model by the report; empty paths wrote nothing, silently."""
    model, plain = tmp_path / "model.safetensors", tmp_path / "notes.txt"
    model.write_bytes(b"\x08\0\0\0\0\0\0\0" + b'{"a":1}')  # a safetensors file: its header's length first
    plain.write_text("kept")
    given = [value.format(model=model, plain=plain) for value in given]
    with pytest.raises(SystemExit) as stopped:
        main([*EVALUATE, *given])
    assert stopped.value.code == 2
    assert shown.format(model=model, plain=plain) in capsys.readouterr().err
    assert model.read_bytes().endswith(b'{"a":1}') and plain.read_text() == "kept"


def test_an_earlier_report_or_an_empty_file_is_a_valid_json_output(no_work, tmp_path):
    import argparse

    for text in ('  {"old": "report"}', "[1, 2", ""):
        path = tmp_path / "report.json"
        path.write_text(text)
        assert _evaluate._start_if_not_json(str(path)) is None
    parser = argparse.ArgumentParser(prog="evaluate")
    from sklearn_jsae._cli_train import check_output_file

    check_output_file(parser, "--json", str(tmp_path / "report.json"))  # no SystemExit


def test_the_main_job_refuses_an_empty_figure_path(capsys):
    """``--figure ''`` printed ".png" and wrote ".png.png"."""
    with pytest.raises(SystemExit) as stopped:
        main([*MAIN_JOB, "--figure", ""])
    assert stopped.value.code == 2
    assert "argument --figure: an empty path; give a file path, or 'none' for no figure" in capsys.readouterr().err


def test_a_file_in_a_folder_one_cannot_write_is_refused_unless_it_is_written_in_place(tmp_path, monkeypatch):
    """A regular file is replaced through a temporary in its folder, which must be writable (the old
    check passed a writable file there, and the write failed after every fit); a FIFO or a device
    (``/dev/stdout`` for a user who cannot write in /dev) is written in place."""
    import argparse

    from sklearn_jsae._cli_train import check_output_file

    parser = argparse.ArgumentParser(prog="evaluate")
    regular, fifo = tmp_path / "report.json", tmp_path / "stdout"
    regular.write_text("{}")
    os.mkfifo(fifo)
    real_access = os.access
    folder = str(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != folder and real_access(path, mode))
    check_output_file(parser, "--json", str(fifo))  # no SystemExit
    with pytest.raises(SystemExit):
        check_output_file(parser, "--json", str(regular))
    with pytest.raises(SystemExit):
        check_output_file(parser, "--json", str(tmp_path / "new.json"))


@pytest.mark.parametrize("command", [["-m", "sklearn_jsae", *MAIN_JOB, "--figure", "none"],
                                     ["-m", "sklearn_jsae", *EVALUATE]])
def test_a_sigterm_ends_the_command_by_sigterm_with_its_cache_removed(tmp_path, command):
    """Python's default for SIGTERM ended the process with its temporary cache left behind (45 MB
    for evaluate, never removed)."""
    command = [arg if arg != "1" or command[i - 1] != "--max-iter" else "1000000" for i, arg in enumerate(command)]
    process = subprocess.Popen([sys.executable, "-u", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    try:
        assert process.stdout.readline().startswith(b"data:")
        deadline = time.monotonic() + 120
        while not any(name.startswith("jsae_") for name in os.listdir(tmp_path)):  # the fits have started
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        assert process.returncode == -signal.SIGTERM, err.decode()
    finally:
        process.kill()
    assert err.decode().strip().splitlines()[-1] == "stopped by SIGTERM" and b"Traceback" not in err
    assert not [name for name in os.listdir(tmp_path) if name.startswith("jsae_")]


def test_a_cache_a_kill_left_behind_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """A SIGKILL runs no cleanup: every killed run left its cache folder in /tmp for good."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead, alive = f"{files.HOST}-{finished.pid}.", f"{files.HOST}-{os.getpid()}."
    names = {"dead": f"jsae_main_{dead}ab12cd34", "alive": f"jsae_main_{alive}ab12cd34",
             "old": "jsae_main_ab12cd34", "new": "jsae_main_ef56gh78", "other_kind": f"jsae_evaluate_{dead}ab12cd34",
             "not_ours": f"jsae_main_{dead}ab12cd34.keep.d"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cached.npy").write_bytes(b"x")
    os.utime(tmp_path / names["old"], (time.time() - 2 * files.STALE_SECONDS,) * 2)
    (tmp_path / "jsae_main_a_file").write_text("a file, not a cache")
    with files.cache_folder("main") as folder:
        assert os.path.basename(folder).startswith(f"jsae_main_{alive}") and os.path.isdir(folder)
    assert not os.path.exists(folder)
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left and names["old"] not in left
    assert {names[key] for key in ("alive", "new", "other_kind", "not_ours")} | {"jsae_main_a_file"} <= left


def test_evaluate_run_as_its_own_module_ends_quietly_when_its_reader_stops():
    """``python -m sklearn_jsae._evaluate ... | head`` (its docstring names that entry point) ended in
    a BrokenPipeError traceback: it bypassed the package's own handling."""
    process = subprocess.Popen([sys.executable, "-m", "sklearn_jsae._evaluate", *EVALUATE[1:]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1
    assert "Error" not in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_device_that_refuses_the_write_is_named_and_left_a_device(tmp_path, capsys):
    """``/dev/full`` (every write: ENOSPC) is written in place, as a FIFO is: the error names it and
    says that it was written in place."""
    from sklearn_jsae import TopKSparseAutoencoder

    sae = TopKSparseAutoencoder(n_components=8, k=2, max_iter=1, device="cpu", random_state=0)
    with pytest.warns(Warning):
        sae.fit(np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    with pytest.raises(OSError, match=r"cannot write '/dev/full' \(No space left on device\): it is a character "
                                      r"device, written in place, and the write did not complete") as info:
        sae.save("/dev/full")
    assert info.value.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_figure_folder_that_cannot_be_made_is_named(tmp_path, monkeypatch, capsys):
    """os.makedirs's own error (the disk full as the figure's folder is made) names no path: the
    line says which figure could not be written."""
    pytest.importorskip("matplotlib")
    figure = tmp_path / "new" / "comparison.png"

    real_makedirs = os.makedirs

    def full(path, *args, **kwargs):  # (the cache's folder is made as usual)
        if os.fspath(path) == str(figure.parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", full)
    assert main([*MAIN_JOB, "--figure", str(figure)]) == 1
    assert capsys.readouterr().err.strip() == (f"python -m sklearn_jsae: error: --figure: cannot write "
                                               f"{str(figure)!r} (No space left on device)")


def test_figures_evaluate_cannot_write_for_a_reason_naming_no_file_name_the_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "figures"
    folder.mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_evaluate, "_figures", full)
    assert main([*EVALUATE, "--figures", str(folder)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m sklearn_jsae evaluate: error: --figures: cannot write in {str(folder)!r} (No space left on device)")


def test_an_output_file_check_refuses_an_empty_path_and_a_device_it_cannot_write(tmp_path, monkeypatch, capsys):
    import argparse

    from sklearn_jsae._cli_train import check_output_file

    parser = argparse.ArgumentParser(prog="evaluate")
    with pytest.raises(SystemExit):
        check_output_file(parser, "--json", "")
    assert "argument --json: an empty path; give a file path" in capsys.readouterr().err
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(fifo) and real_access(path, mode))
    with pytest.raises(SystemExit):  # (root may write anything: the refusal is what access() says)
        check_output_file(parser, "--json", str(fifo))
    assert f"argument --json: cannot write {str(fifo)!r} (permission denied); give a writable path" in (
        capsys.readouterr().err)

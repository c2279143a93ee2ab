"""Texts packed into full sequences: concatenated, separated, cut to ``max_length`` tokens.

Truncating each text to ``max_length`` tokens (one text, one sequence) drops every token of a
long text past the first ``max_length``: on a corpus of documents (OpenWebText, the Pile) most
of them, and every kept token sits near a document's start.  Packing, as SAELens' activation
store and sparsify's ``chunk_and_tokenize`` do, reads every token once instead:

    stream  = tokens(text_0) + [sep] + tokens(text_1) + [sep] + tokens(text_2) ...   (no special tokens)
    seq_i   = prefix + stream[i·b : (i+1)·b] + suffix,   b = max_length - len(prefix) - len(suffix)

``sep`` is the tokenizer's EOS token (its SEP token when it has no EOS, as BERT's; none when it has
neither), left out before a text that starts a sequence (as SAELens'
``concat_and_batch_sequences`` does, which equals this packing for a tokenizer that adds no
special tokens, pinned by a test); an empty text adds nothing.  ``prefix`` and ``suffix`` are the special tokens the tokenizer itself puts around one
text (BERT: ``[CLS]`` / ``[SEP]``, LLaMA: ``<s>`` / nothing, GPT-2: nothing), so every sequence is
what the model sees in training.  Every sequence has ``max_length`` tokens but the last, which
holds what is left.  A token attends to the tokens of earlier texts in its sequence, as in
pre-training on packed data.

The position is ``(texts_done, carry)``: the texts tokenised so far and the tokens of theirs not
yet in a sequence.  It is exact after every sequence handed out, so a stream resumes by skipping
``texts_done`` texts unread by the tokenizer and starting from ``carry``.
"""

from __future__ import annotations

import itertools

import numpy as np

# Texts tokenised per call of a fast tokenizer (it encodes a batch in parallel); also bounds the
# carried tokens (and a checkpoint's copy of them) to about this many texts.
TEXTS_PER_CALL = 16


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """``(prefix, suffix)``: the special token ids ``tokenizer`` adds before and after one text.

    Read from the tokenizer's own output (``add_special_tokens`` on and off, on a probe text) rather
    than from its class, so any post-processor (a BERT template, a LLaMA BOS, none) is honoured.
    """
    probe = "packing probe"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"cannot pack texts with {type(tokenizer).__name__}: with special tokens it encodes "
                     f"{probe!r} as {full}, which does not contain its encoding without them, {plain}. "
                     f"Pass pack=False (one text per sequence).")


def separator_ids(tokenizer) -> list[int]:
    """The token between two packed texts: EOS, else SEP, else none."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


class TextPacker:
    """Packs texts into sequences of ``max_length`` tokens, keeping a resumable position.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    max_length : int
        Tokens per sequence, the tokenizer's special tokens included.

    Attributes
    ----------
    texts_done : int
        Texts read from the input so far.
    carry : list of int
        Their tokens (separators included) not yet handed out in a sequence.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.prefix, self.suffix = special_wrapping(tokenizer)
        self.separator = separator_ids(tokenizer)
        self.body = max_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text in a packed sequence: the "
                             f"tokenizer adds {len(self.prefix) + len(self.suffix)} special tokens to each. "
                             f"Raise max_length.")
        self.texts_done = 0
        self._tokens: list[int] = []  # carry = _tokens[_start:]: a sequence is cut by moving _start,
        self._start = 0  # not by copying the rest (a book-long text would make that quadratic)

    @property
    def carry(self) -> list[int]:
        return self._tokens[self._start :]

    def sequences(self, texts):
        """Yield packed sequences (lists of token ids) from ``texts``, which must start at text
        ``texts_done`` of the input (the caller skips the ones already read)."""
        from ._harvest import _not_a_text  # _harvest imports this module

        texts = iter(texts)
        exhausted = False
        while True:
            while len(self._tokens) - self._start < self.body and not exhausted:
                batch = list(itertools.islice(texts, TEXTS_PER_CALL))
                exhausted = len(batch) < TEXTS_PER_CALL
                for text in batch:
                    if not isinstance(text, str):
                        raise _not_a_text(text)
                if batch:
                    # verbose=False: a long text exceeds the model's length, which is the point here.
                    encoded = self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
                    for ids in encoded:
                        self.texts_done += 1
                        if not ids:
                            continue
                        # Between two texts of one sequence: a text that starts a sequence follows
                        # its special tokens (the emitted tokens are whole bodies, so the stream's
                        # position in its sequence is len(carry) mod body).
                        if (len(self._tokens) - self._start) % self.body:
                            self._tokens.extend(self.separator)
                        self._tokens.extend(int(i) for i in ids)
            if self._start == len(self._tokens):
                return
            body = self._tokens[self._start : self._start + self.body]
            self._start += len(body)
            if self._start > len(self._tokens) // 2:  # drop the handed-out tokens, amortised O(1)
                del self._tokens[: self._start]
                self._start = 0
            yield self.prefix + body + self.suffix

    def state(self) -> dict:
        return dict(texts_done=self.texts_done, carry=np.asarray(self.carry, dtype=np.int64))

    def load_state(self, texts_done: int, carry) -> None:
        self.texts_done = int(texts_done)
        self._tokens, self._start = [int(i) for i in np.asarray(carry).reshape(-1)], 0

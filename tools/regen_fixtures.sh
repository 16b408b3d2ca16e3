#!/usr/bin/env bash
# Regenerate every fixture under tests/fixtures/ from the REAL torch / transformers / accelerate.
# Usage: tools/regen_fixtures.sh   (uses $STOWAGE_PY, else /opt/stowage-tools-venv/bin/python,
# else python3). Deterministic: PYTHONHASHSEED=0 fixes accelerate's set-ordered outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${STOWAGE_PY:-}"
if [[ -z "$PY" ]]; then
  if [[ -x /opt/stowage-tools-venv/bin/python ]]; then PY=/opt/stowage-tools-venv/bin/python; else PY=python3; fi
fi
export PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
echo "using $PY"
rm -rf tests/fixtures/accelerate tests/fixtures/llama   # wholly generated; module_trees/ is overwritten
"$PY" tools/record_versions.py
"$PY" tools/gen_accelerate_cases.py
"$PY" tools/gen_llama_fixtures.py
# Other fixture generators of the project (bitsandbytes layouts, checkpoint files), when present.
# Order matters: the tiny models feed the load and quantized fixtures.
for gen in tools/gen_bnb_fixtures.py tools/gen_checkpoint_fixtures.py tools/gen_tiny_models.py \
    tools/gen_load_fixtures.py tools/gen_quantized_checkpoint_fixtures.py \
    tools/gen_quantized_forward_fixtures.py tools/gen_quantized_plan_fixtures.py; do
  if [[ -f "$gen" ]]; then "$PY" "$gen"; fi
done
echo "fixtures regenerated"

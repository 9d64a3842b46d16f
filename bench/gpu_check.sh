#!/usr/bin/env bash
# Issue 13, part 4: the 2.5B Nucleotide Transformer at full size on one large NVIDIA GPU, offline, in under 8 minutes.
# Builds the random full-size checkpoint in the hub cache layout, measures training tokens/s and peak CUDA memory
# (batch {8, 32} x {128, 330, 1000} tokens, bf16 autocast, checkpointing on/off, fp32 and bf16 base), fine-tunes one
# fold with LoRA for a few hundred steps, then (when Ray is installed and time is left) runs the production path
# (bench/full_scale.py --device cuda). Writes bench/results/gpu_check.json, and a copy to $OUT when that is set.
#
#   bench/gpu_check.sh              # on the GPU machine (exit 3 with a message when torch sees no GPU)
#   bench/gpu_check.sh --dry-run    # anywhere: the same code on the tiny model on the CPU, to check the script
#
# Python: $PYTHON, else .venv/bin/python, else python3. It needs torch (with CUDA), transformers, peft, numpy,
# pandas, pyarrow, scikit-learn, scipy, matplotlib, pyyaml, safetensors and biopython; idengine itself is used from
# this checkout (PYTHONPATH). Wheels in .whl/ (see the device README) are installed to /tmp/site first, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "peft": "peft", "numpy": "numpy", "pandas": "pandas",
        "pyarrow": "pyarrow", "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib",
        "yaml": "pyyaml", "safetensors": "safetensors", "Bio": "biopython", "psutil": "psutil"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_check: python packages missing for $PY: $missing (carry them as wheels in .whl/, see the header)" >&2
    exit 4
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    out=${GPU_CHECK_OUT:-/tmp/gpu_check_dry_run.json}
    # small shapes: a loaded 2-core CPU takes ~1 min per tiny step at 32 x 1000; every part still runs
    "$PY" bench/gpu_check.py --dry-run --work /tmp/idengine-gpu-check-dry --out "$out" --steps 1 \
        --batches 2 8 --lengths 16 64 --finetune-steps 40 --no-pipeline "$@"
else
    out=${GPU_CHECK_OUT:-bench/results/gpu_check.json}
    "$PY" bench/gpu_check.py --out "$out" "$@"
fi
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "$out" "$OUT/"; fi

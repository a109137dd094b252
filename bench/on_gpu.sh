#!/usr/bin/env bash
# The GPU checks, in one go, each step with its own time limit and its own log (a failed step does not stop the
# others). Run from the repository root on a machine with a CUDA GPU and PyTorch + transformers installed:
#     bash bench/on_gpu.sh [OUT_DIR] [tiny]   # logs and JSON lines land in OUT_DIR (default: gpu_out);
#                                             # "tiny": only the tiny model's checks (a minute or two)
# Steps: the tiny model on the GPU (sample.py: speech, a picture question, streaming; a --quick training run with
# bf16 autocast), the real-size load (bench/real_size.py, 7B), the streaming benchmark at 7B, and the comparison
# with transformers at 7B widths and 4 layers (both models fp32 in one GPU's memory).
set -u
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {   # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n 4 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ONLY=${2:-all}
step tiny_say 40 python3 sample.py --device cuda --text "three seven one" --voice slt --out /tmp/tiny_say.wav
if [ "$ONLY" != tiny ]; then
  step real_size_7b 170 python3 bench/real_size.py --preset qwen2_5_omni_7b --dir /tmp/omni7b
  rm -rf /tmp/omni7b
  step streaming_7b 150 python3 bench/streaming.py --preset qwen2_5_omni_7b --repeats 2 --codes 100
  step vs_transformers_7b 110 python3 bench/vs_transformers.py --preset qwen2_5_omni_7b --layers 4 --repeats 3
fi
step tiny_image 30 python3 sample.py --device cuda --image tiny_data/images/test-0000.png --prompt "what colour is the shape?" --speak --stream --out /tmp/tiny_image.wav
step tiny_av 40 bash -c 'python3 sample.py --device cuda --audio tiny_data/speech/awb-0001.flac --speak --out /tmp/a.wav && python3 sample.py --device cuda --video tiny_data/video/test-0000.npz --prompt "what colour was the shape when the voice said now?"'
step train_quick 100 python3 train_tiny.py --quick --dpo --device cuda --out /tmp/quick_run
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl" 2>/dev/null
echo "== done"

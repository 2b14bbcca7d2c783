#!/bin/bash
# GPU smoke check (about 1 minute on one H100/H200): the resnet20 part of --quick on CUDA (every resnet
# method, standard and interspace), then the CLI chain: train on CUDA, pack, eval on CUDA and on the CPU
# (the same accuracy), ONNX export, --precision bf16/fp16 training on CUDA (frozen entries exact), and the
# engines' step-time table on CUDA (bench_engine.py --quick --device cuda). Logs go to $OUT (default: a new
# temporary directory).
#     bash examples/reproduce/gpu_smoke.sh
# Data: set COMPRESS_DATA to a folder holding fashion-mnist/ where /usr/share/datasets has none.
set -u
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 examples/reproduce/sweep.py --quick --part resnet --device cuda --jobs 7 --results "$WORK/q" --out "$WORK/q" \
  > "$OUT/resnet_quick.log" 2>&1; echo "resnet quick on cuda rc=$?"; grep -E "^\[|FAILED" "$OUT/resnet_quick.log"
python3 -m cli.main train --model lenet5 --data fashion-mnist --method freezenet --density 0.0064 --epochs 1 \
  --subset 5000 --device cuda --interspace --out "$WORK/cli" 2>&1 | tail -2; echo "train rc=${PIPESTATUS[0]}"
python3 -m cli.main pack "$WORK/cli" -o "$WORK/cli.cpk" 2>&1 | tail -3
python3 -m cli.main eval "$WORK/cli.cpk" --device cuda 2>&1 | tail -2; echo "eval cuda rc=${PIPESTATUS[0]}"
python3 -m cli.main eval "$WORK/cli.cpk" --device cpu 2>&1 | tail -2; echo "eval cpu rc=${PIPESTATUS[0]}"
python3 -m cli.main export "$WORK/cli.cpk" -o "$WORK/cli.onnx" 2>&1 | tail -2; echo "export rc=${PIPESTATUS[0]}"
for precision in bf16 fp16; do  # mixed precision on CUDA: float32 weights, untrained entries exact
  python3 -m cli.main train --model resnet20 --data fashion-mnist --subset 2000 --method freezenet --density 0.05 \
    --epochs 1 --device cuda --precision $precision --quiet --out "$WORK/amp-$precision" 2>&1 | tail -1
  python3 - "$WORK/amp-$precision" <<'PY'
import sys, torch, compress
from safetensors.torch import load_file
from formats.models import build_model
run = sys.argv[1]
weights, masks = load_file(f"{run}/model.safetensors"), load_file(f"{run}/masks.safetensors")
initial = compress.initialise(build_model("resnet20", (1, 28, 28), 10), 0).state_dict()
exact = all(torch.equal(weights[n][~m.bool()], initial[n][~m.bool()]) for n, m in masks.items())
floats = all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
print(f"{run}: float32 weights {floats}, frozen entries exact {exact}")
PY
done
python3 examples/benchmarks/bench_engine.py --quick --device cuda > "$OUT/engine.log" 2>&1  # issue 19 on the GPU
echo "bench_engine on cuda rc=$?"; grep -E "^(PASS|FAIL)|^  lenet" "$OUT/engine.log"
echo "logs in $OUT"

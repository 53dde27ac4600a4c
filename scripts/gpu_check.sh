#!/bin/sh
# `make gpu-check`: everything lorakit checks on a CUDA GPU, in one call of under 8 minutes (a lent GPU machine
# through the `device` tool: `make gpu-prep` here first, then run `make gpu-check` there with carry [".gpu"]).
# There, python3 holds torch with CUDA, transformers, peft and pytest; .gpu/site adds bitsandbytes (CUDA 13 build).
# What it prints goes into benchmarks/RESULTS.md. Output also under $OUT (or /tmp/gpu-check) when set.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 2
status=0
echo "== pytest -m gpu"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
echo "== a tiny model trained with --device cuda: bf16 autocast, then NF4 (QLoRA)"
$PY -c "from pathlib import Path; from tiny_run import make_tiny; make_tiny(Path('$OUT/tiny'))" || exit 1
for extra in "--precision bf16" "--precision bf16 --quantize nf4 --qera-rank 0"; do
  $PY -m lorakit train --model "$OUT/tiny/model" --data "$OUT/tiny/data.jsonl" --device cuda $extra --steps 30 \
    --batch-size 8 --test-size 20 --val-size 8 --eval-every 0 --out "$OUT/run" --overwrite 2>&1 | tail -n 4 || status=1
done
echo "== benchmarks/longctx.py --device cuda"
$PY -m benchmarks.longctx --device cuda --lengths 512,2048,8192 2>&1 | tail -n 40 || status=1
exit $status

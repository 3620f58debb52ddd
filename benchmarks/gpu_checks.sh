#!/usr/bin/env bash
# The GPU measurements of this project in one run (one H100/H200, a few minutes), from the repo root:
#
#     OUT=runs/gpu bash benchmarks/gpu_checks.sh [--with-demo-long]
#
# 1. bf16 training step of cloc-vit-b-16 @224, CLOC vs its CLIP baseline at equal batch (256);
# 2. region throughput of cloc-vit-l-14-336 in bf16 (image pass vs Prompter vs crop-and-encode);
# 3. the llava-1.5 geometry in bf16, forward + backward: CLOC ViT-L/14-336 tower vs a CLIP tower of the
#    same size in LlavaForConditionalGeneration (1024 -> 4096 mlp2x_gelu projector, 2-layer Llama 4096 wide),
#    and CLOCLlava with 16 <region> prompts vs none;
# 4. with --with-demo-long: `make demo-long`'s experiment (python -m cloc_demo.demo --preset long) on the
#    GPU, whose numbers match the CPU run's up to float non-determinism, in a fraction of the time.
#
# Uses the python3 that holds torch (CUDA build); the project is put on PYTHONPATH, nothing is installed
# except wheels found in .whl/ (e.g. the transformers version this project pins, where the machine's
# differs).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

echo "== train step: cloc-vit-b-16, batch 256, bf16 autocast =="
timeout 240 python3 benchmarks/train_step.py --arch cloc-vit-b-16 --batch-size 256 --device cuda --dtype bf16 \
    --json "$OUT/train_step_b16_bf16_cuda.json" 2>&1 | tee "$OUT/train_step_b16_bf16_cuda.txt"

echo "== region throughput: cloc-vit-l-14-336, bf16 =="
timeout 200 python3 benchmarks/region_throughput.py --arch cloc-vit-l-14-336 --device cuda --dtype bf16 \
    --json "$OUT/region_throughput_l14_336_bf16_cuda.json" 2>&1 | tee "$OUT/region_throughput_l14_336_bf16_cuda.txt"

echo "== llava-1.5 geometry: l14-336 tower, 4096-wide LM, bf16 autocast, forward + backward =="
timeout 180 python3 benchmarks/llava_regions.py --vision l14-336 --device cuda --dtype bf16 --train \
    --lm-width 4096 --lm-layers 2 --json "$OUT/llava_regions_l14_336_bf16_cuda_train.json" 2>&1 \
    | tee "$OUT/llava_regions_l14_336_bf16_cuda_train.txt"

if [[ "${1:-}" == "--with-demo-long" ]]; then
    echo "== demo-long on the GPU =="
    rm -rf /tmp/demo-long
    timeout "${DEMO_TIMEOUT:-420}" python3 -m cloc_demo.demo --preset long --out /tmp/demo-long --num-workers 6 \
        > "$OUT/demo_long.log" 2>&1
    echo "demo-long exit $?"
    tail -c 4000 "$OUT/demo_long.log" | tr '\r' '\n' | grep -v "it/s" | tail -40
    for f in report.md report.json learning_curves.png; do
        [[ -f /tmp/demo-long/$f ]] && cp "/tmp/demo-long/$f" "$OUT/demo_long_$f"
    done
    # learning curves as they were written, also when the run did not finish
    for run in cloc clip; do
        [[ -f /tmp/demo-long/$run/eval_log.jsonl ]] && cp "/tmp/demo-long/$run/eval_log.jsonl" "$OUT/demo_long_${run}_eval_log.jsonl"
    done
fi
exit 0

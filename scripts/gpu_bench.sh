#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, then the test suite on CUDA: about 11 minutes on one H100
# (SUITE=0 leaves the suite out: within 10).
#
#   OUT=/some/folder bash scripts/gpu_bench.sh [extra scripts/gpu_bench.py options]
#   SUITE=0 bash scripts/gpu_bench.sh     # within a 600 s call: GPU tests (<= 150 s) and steps (380 s)
#   SUITE=0 BUDGET=200 CUDA_TESTS="graph or values" bash scripts/gpu_bench.sh --steps big-training-graph
#
# Run from the repository root. First the GPU-only tests (tests/unit/test_cuda.py and
# tests/unit/test_fused_merging.py), then the steps of scripts/gpu_bench.py, most wanted first (see its
# plan()): ViT-B/16, 12 frames, bf16, batch 32: the fused Triton merge kernels against the tensor
# operations (inference as CUDA graphs, matching and merging alone in several implementations
# (scripts/bench_merging.py), training eager and as graphs, a profile), inference as CUDA graphs with
# the baselines in each size-attention form (bias, channel, flex, values), training steps (batch 32;
# eager, with the video encoder as CUDA graphs, and at batch 64), compiled none and tempme
# (reduce-overhead, the form the graph steps found fastest; compiling tempme took about 150 s),
# profiles of tempme's inference and training, training with flex, the same profiles of merge-free,
# batch 128, then eager inference with timm's ViT, ViT-B/32, attention kernels forced, compiled
# baselines and training, a profile of compiled tempme. In session 4 the steps took 12-35 s
# each, except compiling. Each step has its own time limit and all share BUDGET seconds (default
# 380), so nothing can hang past that. Last, the whole test suite (at most 150 s; SUITE=0 skips it),
# whose training and evaluation tests then run on CUDA.
# $OUT/bench.json holds every step's results (rewritten as each step ends), $OUT/bench.log the
# output. --steps a,b runs some steps only.
set -u
OUT=${OUT:-runs/gpu_bench}
BUDGET=${BUDGET:-380}
PYTHON=${PYTHON:-python3}

run() {
    export PYTHONUNBUFFERED=1
    # The GPU machine has torch but no network: pip can fetch neither the pinned torch==2.13.0 nor
    # anything else, so the package runs from src/ rather than being installed. Of its imports, ftfy
    # (with wcwidth) and PyAV are missing there: they travel as wheels in .whl/ (docs/benchmarks.md).
    if ! "$PYTHON" -c "import ftfy, av" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            || { echo "ftfy or av is missing and .whl/ does not provide it"; return 1; }
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PYTHON" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    # The GPU-only tests (CUDA graphs, half precision, FlexAttention, the fused merge kernels) first. They took 30 s before the
    # FlexAttention tests, which compile its kernels (forward and backward) on top.
    # CUDA_TESTS: a pytest -k expression, such as "graph or values", for some of them only.
    timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_fused_merging.py \
        ${CUDA_TESTS:+-k "$CUDA_TESTS"}
    "$PYTHON" scripts/gpu_bench.py --out "$OUT" --budget "$BUDGET" "$@"
    local status=$?
    # Last, the whole suite on this machine: training and evaluation (device "auto") then run on CUDA.
    if [ "${SUITE:-1}" != 0 ]; then
        timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider
    fi
    date -u
    return $status
}

mkdir -p "$OUT"
run "$@" 2>&1 | tee "$OUT/bench.log"
exit "${PIPESTATUS[0]}"

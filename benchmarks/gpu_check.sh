#!/usr/bin/env bash
# The GPU checks of the device data path, as one bounded call on a lent GPU machine (about 8 minutes):
#   make gpu-deps                                  # here: the few pure-Python packages that machine lacks
#   device run (carry .gpu-deps): bash benchmarks/gpu_check.sh
# 1. what the machine is: GPU, versions, `ulimit -n`, /dev/shm; 2. the cuda-marked tests (nvJPEG, the side stream,
# the batched geometry against the CPU); 3. bench_train on CUDA: reference, --decode cpu and --decode device for
# ResNet-50 and ResNet-18, the model alone on a synthetic batch with and without torch.compile (the ceiling), host
# syncs per step under torch's sync debug mode, the device's wait for input and the step's phases, peak memory.
# Every step runs under `timeout`, so a hang costs its own limit, not the whole call; results land in $OUT.
# A dry run on a CPU box, small: DEVICE=cpu MODELS=resnet18 BATCH=8 STEPS=8 EVAL_STEPS=6 TRAIN_PER_CLASS=16 WORKERS=1
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-out}"
mkdir -p "$out"
status=0

step() {  # step LIMIT_S NAME COMMAND...: run one check under its time limit, its output into $out/NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tail -"${TAIL:-25}"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)')"; status=1; }
}

{
    nvidia-smi -L
    echo "ulimit -n: $(ulimit -n)"
    df -h /dev/shm | tail -1
    nproc
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$out/machine.txt"
step "${TESTS_LIMIT_S:-180}" cuda_tests python3 -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_device_decode.py tests/test_device_inputs.py tests/test_batched_geometry.py
TAIL=16 step "${BENCH_LIMIT_S:-420}" bench_train python3 -m benchmarks.bench_train --device "${DEVICE:-cuda}" \
    --model "${MODELS:-resnet50,resnet18}" --decode cpu,device --batch-size "${BATCH:-256}" --workers "${WORKERS:-14}" \
    --steps "${STEPS:-80}" --eval-steps "${EVAL_STEPS:-20}" --classes 10 --train-per-class "${TRAIN_PER_CLASS:-1000}" \
    --val-per-class 100 --ceiling --sync-debug --out "$out"
exit $status

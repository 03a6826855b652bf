#!/usr/bin/env bash
# The GPU checks of the device data path (issue 9), as one call on a lent GPU machine:
#   make gpu-deps                          # here: the pure-Python packages that machine lacks, into .gpu-deps/
#   device run (carry .gpu-deps): bash benchmarks/gpu_check.sh
# 1. the cuda-marked tests (nvJPEG against the PIL path); 2. bench_train on CUDA: reference, --decode cpu and
# --decode device for ResNet-50 and ResNet-18 on ImageNet-like synthetic JPEGs. Results under $OUT (or bench-out/).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench-out}"
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_device_decode.py 2>&1 | tail -5 | tee "$out/cuda_tests.txt"
python3 -m benchmarks.bench_train --device cuda --model resnet50,resnet18 --decode cpu,device \
    --batch-size 256 --workers "${WORKERS:-14}" --steps "${STEPS:-60}" --eval-steps "${EVAL_STEPS:-20}" \
    --classes 10 --train-per-class 400 --val-per-class 100 --out "$out" 2>&1 | tail -12

#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call on a lent GPU (the `device` tool), each
# command's output kept under $OUT (or ./gpu_out). Run from the repository root:
#   bash bench/gpu_check.sh
# Needs torch with CUDA; pydantic may be carried as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
run() {  # name, command...: its output to $OUT/name.txt, its seconds to the log
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.txt"
}
cd bench
run certify_cifar python3 certify_speed.py --archs cifar_resnet20 cifar_resnet110
run train_cifar python3 train_speed.py --archs cifar_resnet20 cifar_resnet110 --n 16 --batch 256 --n-prime 128 --steps 4
run certify_resnet50 python3 certify_speed.py --archs resnet50 --size 224 --n 20000 --batch 400
run train_profile python3 train_speed.py --methods sodm --profile --archs cifar_resnet110 --n 16 --batch 256 --steps 2

#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call on a lent GPU (the `device` tool), each
# command's output kept under $OUT (or ./gpu_out). Run from the repository root:
#   bash bench/gpu_check.sh            # certification at the hardware's limit (about 9 minutes)
#   bash bench/gpu_check.sh all        # the 2026-11-30 set: certification and training speeds
# Needs torch with CUDA; pydantic may be carried as wheels in .whl/ (installed to /tmp/site).
# The certification set also needs gpu_in/ (carried; ignored by git), made here with
#   mkdir -p gpu_in/cifar10/train && cp -r ../shared/data/cifar10-jpeg/test gpu_in/cifar10/ \
#     && cp experiments/out-adaptive/gaussian20/checkpoint.pt gpu_in/resnet20.pt   # 8.8 + 2.2 MiB
# (a CIFAR-10 ResNet-20 trained by sodm.train; any sodm CIFAR-10 checkpoint does).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=$(realpath -m "${OUT:-gpu_out}")  # absolute: the commands run in bench/
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
if [ "${1:-certify}" = certify ]; then
    # samples/s of every path (fp32/bf16/fp16; folded, padded to 8 channels, compiled) at two batches
    run paths_r110_b1000 timeout 120 python3 certify_speed.py --archs cifar_resnet110 --n 100000 --batch 1000 --extra --repeats 2
    run paths_r110_b4000 timeout 110 python3 certify_speed.py --archs cifar_resnet110 --n 100000 --batch 4000 --repeats 2
    run paths_r110_autotune timeout 90 python3 certify_speed.py --archs cifar_resnet110 --n 100000 --batch 4000 --extra --dtypes bf16 --compile-modes max-autotune --repeats 2
    # certificates of each path against fp32 eager on 100 real test images at N = 100,000
    run agreement timeout 130 python3 path_agreement.py --checkpoint ../gpu_in/resnet20.pt --data-dir ../gpu_in/cifar10 --out "$OUT/agree" --n 100000 --skip 100 --max 100 --batch 4000 --paths fp32 fp32-compile bf16 bf16-compile fp16
    # the 500-image subset (every 20th test image) at N = 100,000: adaptive (goal: <= 45 s)
    run adaptive500 timeout 70 python3 adaptive_certify.py --checkpoint ../gpu_in/resnet20.pt --data-dir ../gpu_in/cifar10 --out "$OUT/adaptive" --n 100000 --skip 20 --max 500 --only-adaptive
    exit 0
fi
run certify_cifar python3 certify_speed.py --archs cifar_resnet20 cifar_resnet110
run train_cifar python3 train_speed.py --archs cifar_resnet20 cifar_resnet110 --n 16 --batch 256 --n-prime 128 --steps 4
run certify_resnet50 python3 certify_speed.py --archs resnet50 --size 224 --n 20000 --batch 400
run train_profile python3 train_speed.py --methods sodm --profile --archs cifar_resnet110 --n 16 --batch 256 --steps 2

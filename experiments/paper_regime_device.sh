#!/usr/bin/env bash
# One device call of the paper-regime campaign (experiments/paper_regime.py), from the repository
# root of the device's copy of the working tree:
#   bash experiments/paper_regime_device.sh          (the `run` tool: timeout_s 540)
# It needs, carried: experiments/data/cifar10-jpeg.npz (the data pack), experiments/out-paper-carry
# (the state, from `paper_regime.py export --minimal`; empty or absent the first time) and .whl
# (pydantic for the device's Python 3.12: its image has torch, scipy, statsmodels, matplotlib but
# no pydantic). It brings back under $OUT the campaign's state as state-*.tar (at most 7) and
# call.log; `paper_regime.py import <files_at> --out experiments/out-paper` takes them in.
# The campaign stops cleanly before BUDGET seconds (default 440); if it overruns by 40 s it is
# killed (losing at most the epoch or image in flight) and the state is exported all the same.
# DATA, CARRY, STATE and RUN_ARGS (--tiny) change what it runs on: a dry run on a CPU, say.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-paper_out}
BUDGET=${BUDGET:-440}
DATA=${DATA:-experiments/data/cifar10-jpeg.npz}
CARRY=${CARRY:-experiments/out-paper-carry}
STATE=${STATE:-experiments/out-paper}
RUN_ARGS=${RUN_ARGS:-}
mkdir -p "$OUT"
log() { "$@" 2>&1 | tee -a "$OUT/call.log"; }
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
log python3 -c "import torch, pydantic, scipy, statsmodels, matplotlib, PIL, torchvision; print('torch', torch.__version__, 'pydantic', pydantic.VERSION)" || exit 1
mkdir -p "$CARRY"
log python3 experiments/paper_regime.py import "$CARRY" --out "$STATE" || exit 1
log timeout -s KILL $((BUDGET + 40)) python3 experiments/paper_regime.py run \
    --data "$DATA" --out "$STATE" --budget-s "$BUDGET" $RUN_ARGS
echo "run: exit $?" | tee -a "$OUT/call.log"
log python3 experiments/paper_regime.py export --out "$STATE" --to "$OUT" --max-files 7
log python3 experiments/paper_regime.py status --out "$STATE"

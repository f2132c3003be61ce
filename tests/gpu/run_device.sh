#!/usr/bin/env bash
# The GPU host's checks in one call (device time is short): on a CUDA host without network, Ray or
# MLflow, from the project root with the offline bundle .gpu/ beside it:
#   ../shared/gpu/make-bundle.sh && tests/gpu/bundle_extras.sh     # here, where a registry is reachable
#   OUT=/some/folder tests/gpu/run_device.sh [STEP ...]             # there (default: every step)
# Unpacks the bundle, then runs tests/gpu/check_cuda.py (CPU/GPU parity, AMP, checkpoints) and the
# GPU benchmarks against plain PyTorch (encode 1 M records on the actor pool, in this process and as
# whole processes; train fp32 and bf16). Each step has its
# own time limit and log; a failed step does not stop the next. Exit status: the number of failed steps.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl 2>/dev/null
tar -xJf .gpu/ray-slim.tar.xz -C /tmp/site && tar -xJf .gpu/mlflow-slim.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 VAEPIPE_MNIST=$PWD/.gpu/mnist_8k.npz \
  RAY_TRAIN_V2_ENABLED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ASYNC_LOGGING=false
nvidia-smi -L; nproc
python3 -c "import torch, pyarrow, ray, mlflow; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'pyarrow', pyarrow.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tail -3
failed=0
step() {   # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"; grep -v "^\s*$" "$OUT/$name.log" | tail -n 14
  [ $rc -eq 0 ] || failed=$((failed + 1))
}
W=/tmp/vaepipe-gpu
STEPS=${*:-check_cuda bench_encode bench_encode_local bench_encode_whole bench_train bench_train_bf16}
for s in $STEPS; do case $s in
  check_cuda) step $s 120 python3 tests/gpu/check_cuda.py --json "$OUT/$s.json" ;;
  bench_encode) step $s 170 python3 -m jobs.cli bench encode --device cuda --records 1000000 --workdir $W \
    --json "$OUT/$s.json" ;;
  bench_encode_local) step $s 150 python3 -m jobs.cli bench encode --device cuda --executor local --records 1000000 \
    --workdir $W --json "$OUT/$s.json" ;;
  bench_encode_whole) step $s 240 python3 -m jobs.cli bench encode --whole-process --device cuda --records 1000000 \
    --repeats 1 --workdir $W --json "$OUT/$s.json" ;;
  bench_train) step $s 130 python3 -m jobs.cli bench train --device cuda --records 262144 --batch-size 1024 \
    --epochs 3 --workdir $W --json "$OUT/$s.json" ;;
  bench_train_bf16) step $s 130 python3 -m jobs.cli bench train --device cuda --amp bf16 --records 262144 \
    --batch-size 1024 --epochs 3 --workdir $W --json "$OUT/$s.json" ;;
  *) echo "run_device: unknown step $s" >&2; failed=$((failed + 1)) ;;
esac; done
exit $failed

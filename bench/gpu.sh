#!/usr/bin/env bash
# The GPU benchmarks, one device call per wheel bundle. The lent GPU box has torch, transformers,
# pyarrow and numpy but no ray, deepspeed or bitsandbytes and no network, and one call carries at most
# 64 MiB (one bundle of ../shared/device/pack-wheels.sh). Here, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   ../shared/device/pack-wheels.sh train     # then a device call with carry [".whl"]:  bench/gpu.sh train
#   ../shared/device/pack-wheels.sh quant     #                                             bench/gpu.sh quant
#   ../shared/device/pack-wheels.sh serve     #                                             bench/gpu.sh serve
#
#   train: bench/train_step.py (stage-1 step: naive vs Ray Train + DeepSpeed job, cached features,
#          length bucketing) and bench/caption.py (engine vs HF generate at batch 1-256)
#   quant: bench/quantize.py (bf16 vs int8wo vs bitsandbytes LLM.int8 / NF4)
#   serve: bench/serve.py (Serve replica, 1/8/32 streams vs HF generate)
#
# Each bench runs under its own timeout (seconds: TRAIN_STEP_S, CAPTION_S, QUANTIZE_S, SERVE_S) so a
# call ends inside the device's 10-minute limit (train: 320 + 210 s, plus ~30 s of wheel install and
# imports, plus up to 15 s per bench to die), and a bench that fails does not stop the next one; its
# own arguments come from TRAIN_STEP_ARGS, CAPTION_ARGS, QUANTIZE_ARGS, SERVE_ARGS (the tests: small sizes).
# Tables, JSON and logs go to $OUT (or bench/results when $OUT is unset); the last lines printed are
# the tables and each bench's exit status. Each bench rewrites its table after every row, so one that
# times out still leaves (and prints here) the rows it finished, marked partial. Arguments after the
# call's name go to each of its benches.
# The GPU image has no boto3 or moto, so the train_step and caption jobs read local files there
# (their --storage auto). On a machine without a GPU the benches run their CPU variants (tiny preset):
# CI runs each call that way (tests/test_train.py, tests/test_quantize.py, tests/test_serving.py)
# with only the modules the GPU box has in each call
# (tests/gpu_image/sitecustomize.py hides the rest), which keeps this script working.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: bench/gpu.sh train|quant|serve [bench arguments]}
shift
extra=("$@")  # passed to every bench of the call (e.g. --preset tiny)
case "$what" in train|quant|serve) ;; *) echo "usage: bench/gpu.sh train|quant|serve [bench arguments]" >&2; exit 2 ;; esac
out=${OUT:-bench/results}
mkdir -p "$out"

wheels=${WHEELS-.whl}  # the carried bundle; WHEELS= (empty) skips it (the tests: this box's own packages)
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package without installing it (Ray's workers inherit the variable); unbuffered logs
export PYTHONPATH=$PWD/platform${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
python_ok() { $PY -c "import minigpt4, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; }
python_ok || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

status=()
bench() {  # bench NAME SECONDS ARGS SCRIPT: one bench, its own timeout, arguments and log
  local name=$1 limit=$2 own=$3 script=$4
  echo "=== $name (timeout ${limit}s) ==="
  local t0=$SECONDS
  # shellcheck disable=SC2086  # $own: the bench's own arguments, split on spaces
  timeout --kill-after=15 "$limit" $PY "$script" $own ${extra[@]+"${extra[@]}"} --out "$out" >"$out/$name.log" 2>&1
  local rc=$?
  status+=("$name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (timed out)')")
  [ $rc = 0 ] || tail -n 40 "$out/$name.log"  # the table comes below; a failure shows its log's end
  # a bench killed at its timeout may leave its local Ray cluster (and a worker's GPU memory) behind
  [ $rc = 0 ] || timeout 60 $PY -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
}

case "$what" in
  train)
    bench train_step "${TRAIN_STEP_S:-320}" "${TRAIN_STEP_ARGS:-}" bench/train_step.py
    bench caption "${CAPTION_S:-210}" "${CAPTION_ARGS:-}" bench/caption.py ;;
  quant)
    bench quantize "${QUANTIZE_S:-480}" "${QUANTIZE_ARGS:-}" bench/quantize.py ;;
  serve)
    bench serve "${SERVE_S:-480}" "${SERVE_ARGS:-}" bench/serve.py ;;
esac
echo "=== tables ==="
for md in "$out"/*.md; do [ -e "$md" ] && { echo "--- $md"; cat "$md"; }; done
printf '%s\n' "${status[@]}"

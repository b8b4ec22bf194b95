#!/usr/bin/env bash
# One GPU lease for #13 (a 15-minute one: about 6 minutes of training): the GPU benchmark rows,
# then two generalist runs side by side on the one GPU, each for a fixed time:
#   w32: configs/generalist_gpu.yaml      (the shipped 32-feature network, continued)
#   w64: configs/generalist_gpu_w64.yaml  (the published 64-feature width, from scratch)
# Run from the repository root on the GPU machine:
#   OUT=<results folder> bash benchmarks/gpu_campaign.sh
# Settings (environment): TRAIN_TIME (per run, default 5 min 30 s), BENCH_LIMIT (seconds for
# gpu_speed.py, 0 skips it), RUNS ("w32 w64", or one of them), FIT_ARGS (more fit options for
# every run, e.g. --model.init_weights W --data.num_workers 14).
# What it needs beside the code, in $DEV (default .dev, ignored by git; built on a machine with
# the packages and internet):
#   $DEV/wheels/*.whl        Python packages the GPU image lacks (monai, nibabel, jsonargparse and
#                            its signature extras), installed into /tmp/site; none: all present
#   $DEV/corpora.tgz         megaseg_work/corpus_pkg6 and corpus_heads (see the configs' headers):
#                            tar czf $DEV/corpora.tgz -C megaseg_work corpus_pkg6 corpus_heads
#   $DEV/label_maps/         $MEGASEG_LABEL_MAPS with mni152+spm12_128.npy (written by any run of
#                            the config with MEGASEG_LABEL_MAPS set: no nilearn or spm-runtime there)
# Writes to $OUT (at most 8 files, so a lease's size limits are kept): log.txt, gpu_speed.md,
# and per run <run>.safetensors + <run>.json (the EMA weights: the latest export while the run
# goes, its final export at the end) and <run>_metrics.csv (loss curve, episodes/s, GPU memory).
set -u
OUT=${OUT:-runs/gpu_campaign}
DEV=${DEV:-.dev}
TRAIN_TIME=${TRAIN_TIME:-00:00:05:30}  # per run, both at once
BENCH_LIMIT=${BENCH_LIMIT:-120}  # seconds for gpu_speed.py; 0: skip it
RUNS=${RUNS:-w32 w64}  # which of the two runs
# FIT_ARGS: more `megaseg fit` options for both runs (a CPU dry run: --trainer.accelerator cpu ...)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
say() { echo "[gpu_campaign +$(($(date +%s) - t0))s] $*"; }

if compgen -G "$DEV/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$DEV"/wheels/*.whl || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f "$DEV/corpora.tgz" ]; then
  mkdir -p megaseg_work && tar xzf "$DEV/corpora.tgz" -C megaseg_work || { say "untar failed"; exit 1; }
fi
export MEGASEG_LABEL_MAPS=$PWD/$DEV/label_maps
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc
python3 -c "import torch, pytorch_lightning, monai, jsonargparse; print('torch', torch.__version__, \
'lightning', pytorch_lightning.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())" \
  || { say "imports failed"; exit 1; }

if [ "$BENCH_LIMIT" -gt 0 ]; then
  say "gpu_speed.py (limit ${BENCH_LIMIT}s)"
  timeout "$BENCH_LIMIT" python3 benchmarks/gpu_speed.py --out "$OUT/gpu_speed.md" || say "gpu_speed.py stopped: $?"
fi

nvidia-smi dmon -s um -d 10 > /tmp/dmon.txt 2>&1 &
dmon=$!
declare -A pids started retried
launch() {  # launch RUN [more fit options]
  local run=$1
  shift
  local configs=(--config configs/generalist_gpu.yaml)
  [ "$run" = w64 ] && configs+=(--config configs/generalist_gpu_w64.yaml)
  OMP_NUM_THREADS=1 python3 -m megaseg.cli fit "${configs[@]}" --trainer.max_time "$TRAIN_TIME" \
    --trainer.default_root_dir "/tmp/runs/$run" ${FIT_ARGS:-} "$@" >> "/tmp/$run.log" 2>&1 &
  pids[$run]=$!
  started[$run]=$(date +%s)
  say "started $run (pid ${pids[$run]}, max_time $TRAIN_TIME) $*"
}
# DataLoader workers hand batches over through /dev/shm: say so when it looks too small (the
# script changes nothing on the machine; the lent H200 had 128 GiB)
shm_kib=$(df -k --output=size /dev/shm 2> /dev/null | tail -1)
if [ "${shm_kib:-0}" -lt 8388608 ]; then
  say "warning: /dev/shm is under 8 GiB; 14 workers' batches may not fit (lower FIT_ARGS --data.num_workers)"
fi
df -h /dev/shm | tail -1
for run in $RUNS; do
  launch $run
done

copy_latest() {  # the newest export of each run, so a lease that ends early still returns weights
  for run in $RUNS; do
    for name in final last; do
      src=/tmp/runs/$run/export/$name
      if [ -f "$src.safetensors" ] && [ "$src.safetensors" -nt "$OUT/$run.safetensors" ]; then
        cp "$src.json" "/tmp/$run.json.part" && cp "$src.safetensors" "/tmp/$run.st.part" \
          && mv /tmp/$run.json.part "$OUT/$run.json" && mv /tmp/$run.st.part "$OUT/$run.safetensors"
        break
      fi
    done
  done
}
running() {
  for run in $RUNS; do kill -0 "${pids[$run]}" 2> /dev/null && return 0; done
  return 1
}
while running; do
  sleep 10
  for run in $RUNS; do  # a run that fails at once (bf16 on this stack?) gets one fp32 retry
    if [ -z "${retried[$run]:-}" ] && ! kill -0 "${pids[$run]}" 2> /dev/null; then
      wait "${pids[$run]}"
      rc=$?
      retried[$run]=1
      say "$run exited with $rc"
      if [ "$rc" != 0 ] && [ $(($(date +%s) - ${started[$run]})) -lt 120 ]; then
        tail -n 15 "/tmp/$run.log"
        launch "$run" --trainer.precision 32-true
      fi
    fi
  done
  copy_latest
  say "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>&1)"
done
for run in $RUNS; do
  wait "${pids[$run]}"
  say "$run exited with $?"
done
kill "$dmon" 2> /dev/null
copy_latest
for run in $RUNS; do
  csv=$(ls -t /tmp/runs/$run/lightning_logs/*/metrics.csv 2> /dev/null | head -1)
  [ -n "$csv" ] && cp "$csv" "$OUT/${run}_metrics.csv"
  echo "===== $run log (last 40 lines)"
  tail -n 40 "/tmp/$run.log"
done
echo "===== nvidia-smi dmon (every 10 s)"
cat /tmp/dmon.txt
say "done"

#!/usr/bin/env bash
# One GPU lease (a 15-minute one: about 6 minutes of training). Issue #21's campaign, the
# default: the input pipeline and compiled steps on the GPU --
#   1. the synthetic v2 store that configs/generalist_gpu.yaml reads (written here once, on all
#      cores: ~17 CPU-minutes for 1,000 tasks x 100 subjects; kept when it is already there);
#   2. benchmarks/input_speed.py (loader CPU per episode, pinning included) and
#      benchmarks/compile_buckets.py at the generalist sizes (compile on/off, graphs), into log.txt;
#   3. the timed generalist runs one after another, each TRAIN_TIME:
#        w32:  configs/generalist_gpu.yaml (the shipped 32-feature network, continued)
#        w32c: the same with --model.compile true (six support-size buckets: six graphs)
#      (RUNS may also name w64: + configs/generalist_gpu_w64.yaml, the published width, from
#      scratch; PARALLEL=1 runs them side by side as #13's campaign did);
#   4. per run: episodes/s (perf/episodes_per_s), GPU busy % (nvidia-smi dmon's sm %, mean over
#      the run), peak memory, the loss curve (<run>_metrics.csv), and a summary table at the end.
# Run from the repository root on the GPU machine:
#   OUT=<results folder> bash benchmarks/gpu_campaign.sh
# A CPU dry run (every step, tiny; synthetic tasks only where megaseg_work lacks the corpora;
# 2.5-4.5 min on 2 cores): DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_campaign.sh
# Settings (environment): TRAIN_TIME (per run, default 2 min 30 s), RUNS (default "w32 w32c"),
# PARALLEL (0), BENCH_LIMIT (seconds for gpu_speed.py, 0 skips it; default 0), INPUT_LIMIT
# (seconds for input_speed.py + compile_buckets.py, default 150, 300 in a dry run, 0 skips them), SYNTH_STORE
# (megaseg_work/synth_v2), SYNTH_TASKS (1000), FIT_ARGS (more fit options for every run, e.g.
# --model.init_weights W --data.num_workers 8).
# What it needs beside the code, in $DEV (default .dev, ignored by git; built on a machine with
# the packages and internet):
#   $DEV/wheels/*.whl        Python packages the GPU image lacks (monai, nibabel, jsonargparse and
#                            its signature extras), installed into /tmp/site; none: all present
#   $DEV/corpora.tgz         megaseg_work/corpus_pkg6 and corpus_heads (see the configs' headers):
#                            tar czf $DEV/corpora.tgz -C megaseg_work corpus_pkg6 corpus_heads
#   $DEV/label_maps/         $MEGASEG_LABEL_MAPS with mni152+spm12_128.npy (written by any run of
#                            the config with MEGASEG_LABEL_MAPS set: no nilearn or spm-runtime there)
# Writes to $OUT (at most 8 files, so a lease's size limits are kept): log.txt (benchmark tables
# and the summary included), gpu_speed.md (when run), and per run <run>_metrics.csv (loss curve,
# episodes/s, GPU memory) and, for the first two runs, <run>.safetensors + <run>.json (the EMA
# weights: the latest export while the run goes, its final export at the end).
set -u
OUT=${OUT:-runs/gpu_campaign}
DEV=${DEV:-.dev}
TRAIN_TIME=${TRAIN_TIME:-00:00:02:30}  # per run
BENCH_LIMIT=${BENCH_LIMIT:-0}  # seconds for gpu_speed.py; 0: skip it
DRY_RUN=${DRY_RUN:-0}
INPUT_DEFAULT=150
[ "$DRY_RUN" = 1 ] && INPUT_DEFAULT=300  # the CPU compiler: ~35-75 s per compiled mode
INPUT_LIMIT=${INPUT_LIMIT:-$INPUT_DEFAULT}  # seconds for input_speed.py + compile_buckets.py; 0: skip them
RUNS=${RUNS:-w32 w32c}  # w32, w32c (compiled), w64
PARALLEL=${PARALLEL:-0}  # 1: all runs at once on the one GPU (#13's campaign)
SYNTH_STORE=${SYNTH_STORE:-megaseg_work/synth_v2}
SYNTH_TASKS=${SYNTH_TASKS:-1000}
# FIT_ARGS: more `megaseg fit` options for every run
if [ "$DRY_RUN" = 1 ]; then  # the whole campaign, tiny, on the CPU: checks the script, not speed
  TRAIN_TIME=00:00:00:40
  SYNTH_TASKS=4
  SYNTH_STORE=/tmp/gpu_campaign_dry_store
  FIT_ARGS="--trainer.accelerator cpu --trainer.precision 32-true --data.resolution 64 \
--data.synthetic_tasks $SYNTH_TASKS --data.synthetic_store $SYNTH_STORE \
--data.synthetic_real_maps mni152 --data.synthetic_config {\"num_subjects\":8} \
--data.batch_size 2 --data.support_size [2,8] --data.num_workers 1 --data.val_batches 1 \
--model.init_weights null --model.model_kwargs {\"encoder_widths\":[8,8,8,8]} ${FIT_ARGS:-}"
fi
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
# A CPU dry run without the GPU run's corpora (they come in $DEV/corpora.tgz): synthetic tasks
# only, so the rest of the campaign is still checked
DRY_DATA=""
if [ "$DRY_RUN" = 1 ] && { [ ! -f megaseg_work/corpus_pkg6/manifest.json ] \
  || [ ! -f megaseg_work/corpus_heads/manifest.json ]; }; then
  say "dry run: no megaseg_work/corpus_pkg6 or corpus_heads here: synthetic tasks only"
  DRY_DATA=",corpora=[],synthetic_ratio=1.0,protocol=null"
  FIT_ARGS="$FIT_ARGS --data.corpora [] --data.synthetic_ratio 1.0 --data.protocol null"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || say "no nvidia-smi"
nproc
python3 -c "import torch, pytorch_lightning, monai, jsonargparse; print('torch', torch.__version__, \
'lightning', pytorch_lightning.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())" \
  || { say "imports failed"; exit 1; }

if [ ! -f "$SYNTH_STORE/manifest.json" ]; then
  res=128 subjects=100 maps=mni152+spm12
  [ "$DRY_RUN" = 1 ] && res=64 subjects=8 maps=mni152
  say "writing the synthetic store $SYNTH_STORE ($SYNTH_TASKS tasks x $subjects subjects, $(nproc) workers)"
  python3 -m data_prep synth --version 2 --tasks "$SYNTH_TASKS" --subjects $subjects --label-maps $maps \
    --resolutions $res --store "$SYNTH_STORE" --workers "$(nproc)" --no-progress | tail -n 3 \
    || { say "prep synth failed"; exit 1; }
  say "store written"
fi
du -sh "$SYNTH_STORE"

if [ "$INPUT_LIMIT" -gt 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    recipe=(--recipe "generalist=configs/generalist_gpu.yaml,resolution=64,synthetic_tasks=$SYNTH_TASKS,synthetic_store=$SYNTH_STORE,synthetic_real_maps=mni152$DRY_DATA" --batches 4)
    # the CPU compiler takes most of the time: tiny sizes, two support sizes per draw
    sizes=(--device cpu --resolution 16 --width 4 --batch 1 --support 2 4 --steps 4 --modes eager compiled)
  else
    recipe=()
    sizes=(--device cuda --resolution 128 --width 32 --batch 16 --support 2 64 --steps 24)
  fi
  say "input_speed.py (limit $((INPUT_LIMIT / 3))s)"
  OMP_NUM_THREADS=1 timeout $((INPUT_LIMIT / 3)) python3 benchmarks/input_speed.py "${recipe[@]}" \
    || say "input_speed.py stopped: $?"
  say "compile_buckets.py (limit $((INPUT_LIMIT * 2 / 3))s)"
  timeout $((INPUT_LIMIT * 2 / 3)) python3 benchmarks/compile_buckets.py "${sizes[@]}" \
    || say "compile_buckets.py stopped: $?"
fi

if [ "$BENCH_LIMIT" -gt 0 ]; then
  say "gpu_speed.py (limit ${BENCH_LIMIT}s)"
  timeout "$BENCH_LIMIT" python3 benchmarks/gpu_speed.py --out "$OUT/gpu_speed.md" || say "gpu_speed.py stopped: $?"
fi

declare -A pids started retried dmons
launch() {  # launch RUN [more fit options]
  local run=$1
  shift
  local configs=(--config configs/generalist_gpu.yaml) extra=()
  [ "$run" = w64 ] && configs+=(--config configs/generalist_gpu_w64.yaml)
  [ "$run" = w32c ] && extra=(--model.compile true)
  # sm %, memory every 5 s while the run goes: its GPU busy % (a run alone on the GPU)
  nvidia-smi dmon -s um -d 5 > "/tmp/dmon_$run.txt" 2>&1 &
  dmons[$run]=$!
  # shellcheck disable=SC2086  # FIT_ARGS is a list of options
  OMP_NUM_THREADS=1 python3 -m megaseg.cli fit "${configs[@]}" --trainer.max_time "$TRAIN_TIME" \
    --trainer.default_root_dir "/tmp/runs/$run" "${extra[@]}" ${FIT_ARGS:-} "$@" >> "/tmp/$run.log" 2>&1 &
  pids[$run]=$!
  started[$run]=$(date +%s)
  say "started $run (pid ${pids[$run]}, max_time $TRAIN_TIME) ${extra[*]} $*"
}
# DataLoader workers hand batches over through /dev/shm: say so when it looks too small (the
# script changes nothing on the machine; the lent H200 had 128 GiB)
shm_kib=$(df -k --output=size /dev/shm 2> /dev/null | tail -1)
if [ "${shm_kib:-0}" -lt 8388608 ]; then
  say "warning: /dev/shm is under 8 GiB; 14 workers' batches may not fit (lower FIT_ARGS --data.num_workers)"
fi
df -h /dev/shm | tail -1
copy_latest() {  # the newest export of the first two runs, so a lease that ends early still returns weights
  for run in $(echo $RUNS | cut -d' ' -f1-2); do
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
  for run in "$@"; do kill -0 "${pids[$run]}" 2> /dev/null && return 0; done
  return 1
}
watch_runs() {  # watch_runs RUN...: until they end; one that fails at once gets one fp32 retry
  while running "$@"; do
  sleep 10
  for run in "$@"; do  # a run that fails at once (bf16 on this stack?) gets one fp32 retry
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
  for run in "$@"; do
    wait "${pids[$run]}"
    say "$run exited with $?"
    kill "${dmons[$run]}" 2> /dev/null
  done
}
if [ "$PARALLEL" = 1 ]; then
  for run in $RUNS; do launch $run; done
  watch_runs $RUNS
else
  for run in $RUNS; do
    launch $run
    watch_runs $run
  done
fi
copy_latest
for run in $RUNS; do
  csv=$(ls -t /tmp/runs/$run/lightning_logs/*/metrics.csv 2> /dev/null | head -1)
  [ -n "$csv" ] && cp "$csv" "$OUT/${run}_metrics.csv"
  echo "===== $run log (last 40 lines)"
  tail -n 40 "/tmp/$run.log"
done
for run in $RUNS; do
  echo "===== $run: nvidia-smi dmon (every 5 s)"
  cat "/tmp/dmon_$run.txt"
done
echo "===== summary"
python3 benchmarks/campaign_summary.py --runs $RUNS --metrics /tmp/runs --dmon /tmp --parallel "$PARALLEL" \
  || say "summary failed"
say "done"

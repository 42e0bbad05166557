#!/usr/bin/env bash
# The GPU checks of the speed work, as one script (a CUDA GPU and `pip install -e ".[bench]"`):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # about 8 minutes on an H100
#
# 1. ddpm_cifar10 at batch 128 in 16-mixed and bf16-mixed, eager and compiled: img/s, MFU.
# 2. benchmarks/throughput.py (all three models, ours and diffusers) in 16-mixed.
# 3. A 2-minute 16-mixed training run of experiment=cifar10_ddpm on fabricated CIFAR-10
#    data: the loss must fall and stay finite.
# Everything printed is also written under OUT_DIR (default: gpu_check/).
# PRECISIONS, MODELS, BATCH, STEPS, COMPILE, RUN_TIME, PER_BATCH and TRAIN_ARGS override the defaults; to try the
# script on a CPU: PRECISIONS=bf16-mixed MODELS=tiny BATCH=2 STEPS=1 COMPILE=no
# RUN_TIME=00:00:00:40 PER_BATCH=100 TRAIN_ARGS="model=tiny data.batch_size=32"
# bash benchmarks/gpu_check.sh /tmp/check
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
precisions=${PRECISIONS:-16-mixed bf16-mixed}
models=${MODELS:-tiny small ddpm_cifar10}
run_time=${RUN_TIME:-00:00:02:00}
batch=${BATCH:-128}
steps=${STEPS:-20}
compile_flags=("" "--compile")
[ "${COMPILE:-yes}" = no ] && compile_flags=("")
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$out/device.txt"

for precision in $precisions; do
    for compile in "${compile_flags[@]}"; do
        # shellcheck disable=SC2086
        python benchmarks/throughput.py --models ddpm_cifar10 --batch-size "$batch" \
            --steps "$steps" --warmup 1 --precision "$precision" $compile --no-diffusers
    done
done 2>&1 | grep -v Warning | tee "$out/cifar10_batch128.txt"

first_precision=${precisions%% *}
# shellcheck disable=SC2086
python benchmarks/throughput.py --models $models --precision "$first_precision" --steps "$steps" \
    2>&1 | grep -v Warning | tee "$out/throughput.txt"

python -c "from pathlib import Path; from tests.fabricate import write_cifar10; \
write_cifar10(Path('$out/data'), per_batch=${PER_BATCH:-2000})"
python train.py experiment=cifar10_ddpm "precision=$first_precision" "paths.data_dir=$out/data" \
    trainer.max_steps=-1 "+trainer.max_time=$run_time" trainer.log_every_n_steps=10 \
    trainer.val_check_interval=100000 eval=null logger=csv callbacks.sample_grid=null \
    "hydra.run.dir=$out/run" +trainer.enable_progress_bar=false ${TRAIN_ARGS:-} 2>&1 | tail -n 3
python - "$out/run/csv/metrics.csv" <<'EOF' | tee "$out/run_loss.txt"
import csv, math, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/loss")]
losses = [float(r["train/loss"]) for r in rows]
steps = int(rows[-1]["step"]) if rows else 0
head, tail = losses[:5], losses[-5:]
print(f"{steps} steps logged; mean loss of the first 5 logs {sum(head) / len(head):.4f}, "
      f"of the last 5 {sum(tail) / len(tail):.4f}")
assert all(math.isfinite(v) for v in losses), "non-finite loss"
assert sum(tail) < sum(head), "the loss did not fall"
print("loss fell and stayed finite")
EOF

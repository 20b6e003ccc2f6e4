#!/usr/bin/env bash
# Every GPU check the issues name, in one go, for a session that has a GPU machine:
#   bash bench/gpu_check.sh            (results land in bench/results/, a log in bench/results/gpu_check.log)
# bf16 correctness tests (pytest -m gpu), kernel speed vs eager and torch.compile, model step
# figures, loader throughput, training-step MFU, and a short profiled training run.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
log=bench/results/gpu_check.log
: > "$log"
run() { echo "=== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"; }

run python -m ivfast.info
run python -m pytest -m gpu -q -rs
run python bench/bench_diffusion_mlp.py
run python bench/bench_tokens.py
run python bench/bench_models.py --preset stage1_vitb --batch 16 8
run python bench/bench_models.py --preset stage2_vitb --batch 8 4
run python bench/bench_train_step.py
run python bench/bench_loader.py
# a short real training run on generated clips, profiled over steps 5..8 (torch.profiler trace
# and top ops in runs/gpu_check/profile/ when nsys is not attached)
run python -m ivfast.data.synth runs/gpu_check/clips --num 64 --codec h264 --frames 48 --size 340x256 \
    --list runs/gpu_check/clips/train.csv
run python -m ivfast.train --config stage1_vitb data.train_list=runs/gpu_check/clips/train.csv \
    model.teacher.init_from=random model.predictor.init_from= optim.batch_per_gpu=8 optim.global_batch=8 \
    runtime.max_steps=10 runtime.log_every=1 runtime.output_dir=runs/gpu_check/s1 --profile-steps 5:8

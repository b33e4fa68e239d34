#!/usr/bin/env bash
# Quickstart: build shards from the bundled FineWeb sample (once), then train and score a tiny model on CPU.
# Every knob can still be overridden from the environment, e.g. `ITERATIONS=50 ./quickstart.sh`.
set -euo pipefail
cd "$(dirname "$0")"
data=data/datasets/sample_sp1024
if [ ! -d "$data" ]; then  # built under a temporary name, so an interrupted build is never mistaken for a finished one
    rm -rf "$data.partial"
    python3 data/build_shards.py --input data/sample/fineweb_sample.jsonl \
        --tokenizer data/sample/fineweb_1024_bpe.model --output-dir "$data.partial" --num-val-docs 100
    mv "$data.partial" "$data"
fi
export DATA_PATH="$data" TOKENIZER_PATH=data/sample/fineweb_1024_bpe.model
: "${DEVICE:=cpu}" "${NUM_LAYERS:=4}" "${MODEL_DIM:=128}" "${NUM_HEADS:=4}" "${NUM_KV_HEADS:=2}"
: "${TRAIN_SEQ_LEN:=256}" "${TRAIN_BATCH_TOKENS:=16384}" "${VAL_BATCH_SIZE:=65536}" "${ITERATIONS:=90}"
: "${WARMDOWN_ITERS:=30}" "${WARMUP_STEPS:=0}" "${VAL_LOSS_EVERY:=50}" "${TRAIN_LOG_EVERY:=25}"
: "${MAX_WALLCLOCK_SECONDS:=0}" "${VE_LAYERS:=2,3}" "${MUON_MOMENTUM_WARMUP_STEPS:=20}"
: "${GPTQ_CALIB_TOKENS:=32768}" "${FP16_MAX_NUMEL:=4096}"  # at d=128 the matrices are small: quantize them too
export DEVICE NUM_LAYERS MODEL_DIM NUM_HEADS NUM_KV_HEADS TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS VAL_BATCH_SIZE ITERATIONS \
    WARMDOWN_ITERS WARMUP_STEPS VAL_LOSS_EVERY TRAIN_LOG_EVERY MAX_WALLCLOCK_SECONDS VE_LAYERS MUON_MOMENTUM_WARMUP_STEPS \
    GPTQ_CALIB_TOKENS FP16_MAX_NUMEL
exec python3 train_gpt.py

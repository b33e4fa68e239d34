#!/usr/bin/env bash
# Quickstart: build shards from the bundled FineWeb sample (once per variant; its first 50 documents are the
# validation split, half the benchmarks' 100, for half the evaluation time), then train and score a tiny model
# on CPU. VARIANT picks the data: caseops (default: SP8192 on case-transformed text, scored on the original
# bytes through the byte sidecar), sp1024 (the official tokenizer) or sp8192 (byte fallback).
# The configuration is configs/quickstart.env; every knob can still be overridden from the environment, e.g.
# `ITERATIONS=50 ./quickstart.sh`, and so can DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE.
set -euo pipefail
cd "$(dirname "$0")"
variant="${VARIANT:-caseops}"
flags=()
case "$variant" in
    sp1024) tokenizer=data/sample/fineweb_1024_bpe.model vocab=1024 ;;
    sp8192) tokenizer=data/sample/fineweb_8192_bpe.model vocab=8192 ;;
    caseops) tokenizer=data/sample/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model vocab=8192
             flags=(--caseops) ;;
    *) echo "quickstart.sh: VARIANT=$variant: expected sp1024, sp8192 or caseops" >&2; exit 2 ;;
esac
data=data/datasets/quickstart_$variant
if [ ! -d "$data" ]; then  # built under a temporary name, so an interrupted build is never mistaken for a finished one
    rm -rf "$data.partial"
    python3 data/build_shards.py --input data/sample/fineweb_sample.jsonl --tokenizer "$tokenizer" \
        --output-dir "$data.partial" --num-val-docs 50 --allow-small-val ${flags[@]+"${flags[@]}"}
    mv "$data.partial" "$data"
fi
export DATA_PATH="${DATA_PATH:-$data}" TOKENIZER_PATH="${TOKENIZER_PATH:-$tokenizer}" VOCAB_SIZE="${VOCAB_SIZE:-$vocab}"
while IFS='=' read -r k v || [ -n "$k" ]; do  # a value set (non-empty) in the environment wins over the file's
    [[ -z "$k" || "$k" == \#* ]] && continue
    [ -n "${!k:-}" ] || export "$k=$v"
done < configs/quickstart.env
exec python3 train_gpt.py

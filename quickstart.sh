#!/usr/bin/env bash
# Quickstart: build shards from the bundled FineWeb sample (once), then train and score a tiny model on CPU.
# The configuration is configs/quickstart.env; every knob can still be overridden from the environment, e.g.
# `ITERATIONS=50 ./quickstart.sh`, and so can DATA_PATH and TOKENIZER_PATH.
set -euo pipefail
cd "$(dirname "$0")"
data=data/datasets/sample_sp1024
if [ ! -d "$data" ]; then  # built under a temporary name, so an interrupted build is never mistaken for a finished one
    rm -rf "$data.partial"
    python3 data/build_shards.py --input data/sample/fineweb_sample.jsonl \
        --tokenizer data/sample/fineweb_1024_bpe.model --output-dir "$data.partial" --num-val-docs 100
    mv "$data.partial" "$data"
fi
export DATA_PATH="${DATA_PATH:-$data}" TOKENIZER_PATH="${TOKENIZER_PATH:-data/sample/fineweb_1024_bpe.model}"
while IFS='=' read -r k v || [ -n "$k" ]; do  # a value set (non-empty) in the environment wins over the file's
    [[ -z "$k" || "$k" == \#* ]] && continue
    [ -n "${!k:-}" ] || export "$k=$v"
done < configs/quickstart.env
exec python3 train_gpt.py

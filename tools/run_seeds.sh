#!/usr/bin/env bash
# Run the same training command once per seed, in sequence, each with its own log, summary and artifact:
#   SEEDS="1337 42 2025" NAME=myrun tools/run_seeds.sh torchrun --standalone --nproc_per_node=8 train_gpt.py
# Every other knob comes from the environment, identical for all seeds. Seed s writes logs/<NAME>_seed<s>.txt,
# logs/<NAME>_seed<s>.json and its artifact logs/<NAME>_seed<s>.ptz (final_model.ptz is a copy of the last one's).
# A run that fails stops the sequence. Then: python3 tools/make_record.py ... logs/<NAME>_seed*.json
set -euo pipefail
: "${SEEDS:=1337 42 2025}" "${NAME:=run}"
if [ $# -eq 0 ]; then
    echo "usage: SEEDS=\"1337 42 2025\" NAME=<name> $0 <command that runs train_gpt.py>" >&2
    exit 2
fi
for seed in $SEEDS; do
    id="${NAME}_seed${seed}"
    if [ -e "logs/${id}.json" ]; then
        echo "$0: logs/${id}.json exists; choose another NAME or move it away" >&2
        exit 2
    fi
    SEED="$seed" RUN_ID="$id" "$@"
    grep -h "^final_int8_zlib_roundtrip_exact" "logs/${id}.txt"
done

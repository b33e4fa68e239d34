#!/usr/bin/env bash
# Run the same training command once per seed, in sequence, each with its own log, summary and artifact:
#   SEEDS="1337 42 2025" NAME=myrun tools/run_seeds.sh torchrun --standalone --nproc_per_node=8 train_gpt_packed.py
# A command that runs <stem>_packed.py runs it fresh from <stem>.py beside it: tools/pack.py packs it (atomically)
# once, before the first seed, so every seed runs the same, current code, and the cap counts the packed file.
# Every other knob comes from the environment, identical for all seeds. Seed s writes logs/<NAME>_seed<s>.txt,
# logs/<NAME>_seed<s>.json and its artifact logs/<NAME>_seed<s>.ptz (final_model.ptz is a copy of the last one's).
# A run that fails stops the sequence. Then: python3 tools/make_record.py ... logs/<NAME>_seed*.json
set -euo pipefail
: "${SEEDS:=1337 42 2025}" "${NAME:=run}"
if [ $# -eq 0 ]; then
    echo "usage: SEEDS=\"1337 42 2025\" NAME=<name> $0 <command that runs train_gpt_packed.py>" >&2
    exit 2
fi
for seed in $SEEDS; do  # before anything is packed or run
    if [ -e "logs/${NAME}_seed${seed}.json" ]; then
        echo "$0: logs/${NAME}_seed${seed}.json exists; choose another NAME or move it away" >&2
        exit 2
    fi
done
for arg in "$@"; do
    if [[ "$arg" == *_packed.py && -f "${arg%_packed.py}.py" ]]; then
        python3 "$(dirname "$0")/pack.py" "${arg%_packed.py}.py" -o "$arg"
    elif [[ "$(basename -- "$arg")" == train_gpt.py ]]; then
        echo "$0: note: $arg runs unpacked, all its bytes count toward the cap; run ${arg%.py}_packed.py instead" >&2
    fi
done
for seed in $SEEDS; do
    id="${NAME}_seed${seed}"
    SEED="$seed" RUN_ID="$id" "$@"
    grep -h "^final_int8_zlib_roundtrip_exact" "logs/${id}.txt"
done

#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md, one named group at a time, on a single-GPU machine:
#     bash bench/gpu_run.sh OUTDIR GROUP...        (groups: smoke headline modalities scaling memory verify)
# Each run writes OUTDIR/NAME.json (the d2v2-bench row) and appends its table to OUTDIR/log.txt.
# A run is cut at $T seconds (default 240) so one bad configuration cannot eat the session.
set -u
OUT=$1; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt

bench() {  # bench NAME PRESET [d2v2-bench args / overrides...]
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "${T:-240}" python3 -m d2v2_scale.bench --json "$OUT/$name.json" "$@" >"$OUT/$name.out" 2>&1
    local rc=$?
    grep -E "^(\||d2v2-bench|  )" "$OUT/$name.out" | tee -a "$LOG"
    [ $rc -eq 0 ] || { echo "   rc=$rc; last lines:" | tee -a "$LOG"; grep -v "^\s*$" "$OUT/$name.out" | tail -6 | tee -a "$LOG"; }
}

for group in "$@"; do
    case $group in
    smoke)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
        python3 -c "import torch, deepspeed, megatron.core as m; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'megatron-core', m.__version__)" 2>&1 | tail -1 | tee -a "$LOG"
        bench smoke --preset image-tiny --steps 5 --warmup 2
        ;;
    headline)
        bench il_z1 --preset image-large --steps 10 --warmup 3 --profile "$OUT/il_z1.prof.txt" parallel.zero_stage=1
        bench il_z3 --preset image-large --steps 10 --warmup 3
        bench il_z3_nb --preset image-large --steps 10 --warmup 3 --no-breakdown
        bench ib_z3 --preset image-base --steps 10 --warmup 3
        ;;
    modalities)
        bench ab_z3 --preset audio-base --steps 10 --warmup 3
        bench tb_z3 --preset text-base --steps 10 --warmup 3
        ;;
    scaling)  # MFU against the per-GPU batch: the step's host work is about fixed, the GPU work grows with B
        bench il_z1_b32_nb --preset image-large --steps 8 --warmup 3 --no-breakdown parallel.zero_stage=1 data.batch_size=32
        bench il_z1_b32_c_nb --preset image-large --steps 8 --warmup 5 --no-breakdown --compile parallel.zero_stage=1 data.batch_size=32
        bench il_z3_b32 --preset image-large --steps 8 --warmup 3 data.batch_size=32
        ;;
    memory)  # two batch sizes per setting: peak memory is affine in B, so they give the largest B
        for b in 8 32; do bench il_none_b$b --preset image-large --steps 3 --warmup 1 --no-breakdown data.batch_size=$b; done
        for b in 32 128; do bench il_full_b$b --preset image-large --steps 3 --warmup 1 --no-breakdown data.batch_size=$b model.activation_checkpointing=full; done
        for b in 8 32; do bench ih_none_b$b --preset image-huge --steps 3 --warmup 1 --no-breakdown data.batch_size=$b; done
        for b in 32 128; do bench ih_full_b$b --preset image-huge --steps 3 --warmup 1 --no-breakdown data.batch_size=$b model.activation_checkpointing=full; done
        ;;
    verify)  # the largest batches predicted from the memory group, given as NAME:PRESET:ACT:B
        for spec in ${VERIFY:-}; do IFS=: read -r n p a b <<<"$spec"
            bench "$n" --preset "$p" --steps 3 --warmup 1 --no-breakdown data.batch_size="$b" model.activation_checkpointing="$a"; done
        ;;
    *) echo "unknown group $group" | tee -a "$LOG" ;;
    esac
done
for f in "$OUT"/*.trace.json; do [ -e "$f" ] && gzip -f "$f"; done

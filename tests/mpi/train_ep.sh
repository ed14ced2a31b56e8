#!/bin/sh
# `mpirun -np P moe train --ep` as a user meets it: the loss trajectory of
# one process at P = 2 and 4 (topk, the DeepSeek-V3 router with its global
# bias update, gshard), checkpoints that one process loads, resharding
# 1 -> 2 -> 4 -> 1 with the optimizer state, a resume that is bit-identical
# for the same P, a rank killed mid-run (the job ends, the last checkpoint
# loads and resumes), and E not divisible by P. Prints "train --ep: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
. tests/lib.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mp() { np=$1; shift; timeout 300 mpirun --oversubscribe -np "$np" "$moe" "$@"; }
small="--corpus tasks --batch 4 --context 16 --dim 32 --heads 2 --blocks 2 --hidden 32 --quiet"

# the train and validation losses of two log.tsv files agree within 1e-4
same_losses() {
    awk -F'\t' 'NR == FNR { if (FNR > 1) { t[$1] = $3; v[$1] = $4 }; next }
        FNR > 1 { n++; if (!($1 in t)) bad = 1;
                  d = $3 - t[$1]; if (d < 0) d = -d; if (d > 1e-4) bad = 1;
                  if ($4 != "" || v[$1] != "") { d = $4 - v[$1]; if (d < 0) d = -d; if (d > 1e-4) bad = 1 } }
        END { exit (bad || n == 0) }' "$1" "$2"
}

# hierarchical for 100 steps: after ~150 a rounding-level difference of the summed gradients
# flips a routing decision of its random second-expert policy (README, Expert parallelism)
for cfg in "--layer topk --router topk" "--layer topk --router deepseek_v3 --shared 1" "--layer gshard --group 16" \
    "--layer hierarchical --experts 4 --group 16 --steps 100"; do
    tag=$(echo "$cfg" | tr -c 'a-z0-9' '_')
    "$moe" train --steps 200 $cfg $small --eval-every 100 --threads 1 --out "$tmp/one$tag" >"$tmp/out" 2>&1 ||
        bad "one process $cfg: $(tail -n 3 "$tmp/out")"
    for np in 2 4; do
        if mp $np train --ep --steps 200 $cfg $small --eval-every 100 --out "$tmp/ep$np$tag" >"$tmp/out" 2>&1 &&
            same_losses "$tmp/one$tag/log.tsv" "$tmp/ep$np$tag/log.tsv"; then ok; else
            bad "P=$np $cfg: losses differ from one process: $(cat "$tmp/ep$np$tag/log.tsv" "$tmp/out" | tail -n 6)"
        fi
    done
done
# the P=4 checkpoint is the one-process file: same tensors, loads in eval and inspect
t4="$tmp/ep4__layer_topk___router_topk_"
expect 0 "validation" "$moe" eval "$t4/checkpoint.safetensors"
"$moe" inspect "$t4/checkpoint.safetensors" | sed 1d >"$tmp/i4" 2>&1
"$moe" inspect "$tmp/one__layer_topk___router_topk_/checkpoint.safetensors" | sed 1d >"$tmp/i1" 2>&1
if grep -q "experts.7.net.0.weight" "$tmp/i4" && cmp -s "$tmp/i1" "$tmp/i4"; then ok; else
    bad "the P=4 checkpoint's tensors differ from one process's: $(diff "$tmp/i1" "$tmp/i4" | head -n 5)"
fi

# resharding with the optimizer state: 1 -> 2 -> 4 -> 1 gives one process's losses
# (a router without a balance loss: the topk layer's group is each rank's tokens, see moe_mpi.h)
r="--layer topk --router deepseek_v3 $small --steps 80 --eval-every 20"
"$moe" train $r --threads 1 --out "$tmp/straight" >/dev/null 2>&1
"$moe" train $r --threads 1 --stop-at 20 --out "$tmp/re" >/dev/null 2>&1
mp 2 train --ep --resume "$tmp/re/checkpoint.safetensors" --stop-at 40 --quiet --out "$tmp/re" >/dev/null 2>&1
mp 4 train --ep --resume "$tmp/re/checkpoint.safetensors" --stop-at 60 --quiet --out "$tmp/re" >/dev/null 2>&1
cp -r "$tmp/re" "$tmp/re2" # the P = 4 checkpoint, resumed at P = 1 here and at P = 2 below
"$moe" train --resume "$tmp/re/checkpoint.safetensors" --threads 1 --quiet --out "$tmp/re" >"$tmp/out" 2>&1
if same_losses "$tmp/straight/log.tsv" "$tmp/re/log.tsv" && [ "$(wc -l <"$tmp/re/log.tsv")" -eq 6 ]; then ok; else
    bad "resharded 1 -> 2 -> 4 -> 1: $(cat "$tmp/straight/log.tsv" "$tmp/re/log.tsv" "$tmp/out" | tail -n 12)"
fi
mp 2 train --ep --resume "$tmp/re2/checkpoint.safetensors" --quiet --out "$tmp/re2" >"$tmp/out" 2>&1
if same_losses "$tmp/straight/log.tsv" "$tmp/re2/log.tsv" && [ "$(wc -l <"$tmp/re2/log.tsv")" -eq 6 ]; then ok; else
    bad "the P=4 checkpoint resumed at P=2: $(cat "$tmp/re2/log.tsv" "$tmp/out" | tail -n 8)"
fi

# the same P resumes bit for bit
mp 2 train --ep $small --steps 40 --eval-every 20 --out "$tmp/b1" >/dev/null 2>&1
mp 2 train --ep $small --steps 40 --eval-every 20 --stop-at 20 --out "$tmp/b2" >/dev/null 2>&1
mp 2 train --ep --resume "$tmp/b2/checkpoint.safetensors" --quiet --out "$tmp/b2" >/dev/null 2>&1
if cmp -s "$tmp/b1/checkpoint.safetensors" "$tmp/b2/checkpoint.safetensors"; then ok; else
    bad "P=2: 20 steps + resume + 20 steps differs from 40 steps"
fi

# a rank killed mid-run: the job ends, the last checkpoint loads and resumes
mpirun --oversubscribe -np 2 "$moe" train --ep $small --steps 100000 --eval-every 25 --out "$tmp/k" \
    >"$tmp/kill.log" 2>&1 &
job=$!
i=0
while [ ! -s "$tmp/k/checkpoint.safetensors" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
sleep 0.5
victim=$(pgrep -f "moe train --ep" | while read -r p; do [ "$p" != "$job" ] && echo "$p"; done | tail -n 1)
[ -n "$victim" ] && kill -9 "$victim"
i=0
while kill -0 $job 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $job 2>/dev/null; then
    kill -9 $job 2>/dev/null
    bad "mpirun did not end after a rank was killed"
else
    wait $job
    rc=$?
    if [ "$rc" -ne 0 ]; then ok; else bad "mpirun exited 0 after a rank was killed"; fi
fi
expect 0 "validation" "$moe" eval "$tmp/k/checkpoint.safetensors"
step=$("$moe" inspect "$tmp/k/checkpoint.safetensors" | sed -n 's/.*step \([0-9]*\).*/\1/p' | head -n 1)
if mp 2 train --ep --resume "$tmp/k/checkpoint.safetensors" --stop-at $((step + 10)) --quiet --out "$tmp/k" \
    >"$tmp/out" 2>&1; then ok; else bad "resume after the kill (step $step): $(tail -n 5 "$tmp/out")"; fi

# E not divisible by P
if mp 3 train --ep $small --steps 5 --out "$tmp/e3" >"$tmp/out" 2>&1; then bad "E=8 on 3 ranks ran"; else
    if grep -q "not divisible by the 3 ranks" "$tmp/out"; then ok; else bad "E=8 on 3 ranks: $(tail -n 3 "$tmp/out")"; fi
fi

echo "train --ep: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

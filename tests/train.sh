#!/bin/sh
# `moe train` and its checkpoints as a user meets them: resume gives the same
# bits as an uninterrupted run (topk, and gshard whose `random` policy draws
# from the layers' RNG), a run killed with SIGKILL while writing checkpoints
# always leaves a loadable one, --help on sample/eval/inspect, and clear
# errors for missing or empty data, bad flags and bad checkpoints.
# Prints "train: N passed, N failed".
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh

small="--corpus tasks --dim 16 --hidden 16 --heads 2 --blocks 2 --context 32 --batch 4 --threads 2 --quiet"

# ---- resume: 20 steps + resume + 20 steps == 40 steps, bit for bit
# (and the routers: Switch's jitter draws from the RNG, DeepSeek-V3's selection
# bias is state saved in the checkpoint, expert choice with a gated shared expert)
for layer in topk gshard switch deepseek ec bf16; do
    extra="--layer $layer"
    [ "$layer" = bf16 ] && extra="--bf16 --expert swiglu" # mixed precision is kept by the checkpoint
    [ "$layer" = gshard ] && extra="--layer gshard --group 32 --experts 4"
    [ "$layer" = switch ] && extra="--router switch --capacity 1.0"
    [ "$layer" = deepseek ] && extra="--router deepseek_v3 --groups 4 --topk-groups 2 --shared 1 --bias-rate 0.01"
    [ "$layer" = ec ] && extra="--router expert_choice --shared 1 --shared-gate"
    expect 0 "files:" "$moe" train $small $extra --steps 40 --eval-every 10 --out "$tmp/a_$layer"
    expect 0 "files:" "$moe" train $small $extra --steps 40 --eval-every 10 --stop-at 20 \
        --out "$tmp/b_$layer"
    expect 0 "^step  *20$" "$moe" inspect "$tmp/b_$layer/checkpoint.safetensors"
    expect 0 "trained steps 21..40" "$moe" train --resume "$tmp/b_$layer/checkpoint.safetensors" --threads 2 \
        --quiet --out "$tmp/b_$layer"
    if cmp -s "$tmp/a_$layer/checkpoint.safetensors" "$tmp/b_$layer/checkpoint.safetensors"; then ok; else
        bad "$layer: 20 steps + resume + 20 steps differs from 40 steps"
    fi
done
# a different seed gives different bits (the comparison above can fail)
expect 0 "files:" "$moe" train $small --steps 40 --eval-every 10 --seed 2 --out "$tmp/c"
if cmp -s "$tmp/a_topk/checkpoint.safetensors" "$tmp/c/checkpoint.safetensors"; then
    bad "seeds 1 and 2 gave the same checkpoint"
else ok; fi

expect 0 "blocks.1.moe.gate.e_score_correction_bias" "$moe" inspect "$tmp/a_deepseek/checkpoint.safetensors"
expect 0 "bits/byte" "$moe" eval "$tmp/a_deepseek/checkpoint.safetensors" --threads 2
expect 0 "C:moe=" "$moe" sample "$tmp/a_ec/checkpoint.safetensors" --length 10 --temperature 0
# 1 and 2 threads train to the same bits: the checkpoint files are byte-identical
for extra in "" "--router deepseek_v3 --shared 1" "--layer gshard --group 32 --experts 4" \
    "--layer soft_dynamic --group 32"; do
    for th in 1 2; do
        "$moe" train $small $extra --steps 30 --eval-every 10 --threads $th --out "$tmp/th$th" >/dev/null 2>&1
    done
    if cmp -s "$tmp/th1/checkpoint.safetensors" "$tmp/th2/checkpoint.safetensors"; then ok; else
        bad "1 and 2 threads trained different bits (${extra:-topk})"
    fi
done
# a step with a non-finite gradient (MOE_FAULT_NAN_STEPS poisons one) is skipped, counted and
# reported, and changes nothing: NaN at step 20 leaves every tensor as 19 steps do
expect 0 "skipped 2 steps with a non-finite" env MOE_FAULT_NAN_STEPS=5,7 "$moe" train $small --steps 20 \
    --eval-every 10 --out "$tmp/nan"
expect 0 "step 20: gradient of 'emb.weight' element 0 is not finite" env MOE_FAULT_NAN_STEPS=20 "$moe" train $small \
    --steps 20 --eval-every 10 --out "$tmp/nan20"
expect 0 "files:" "$moe" train $small --steps 20 --eval-every 10 --stop-at 19 --out "$tmp/stop19"
if /usr/bin/python3 - "$tmp/nan20/checkpoint.safetensors" "$tmp/stop19/checkpoint.safetensors" <<'PY'
import sys
sys.path.insert(0, "tests/parity")
import stio
a, b = stio.load(sys.argv[1]), stio.load(sys.argv[2])
sys.exit(0 if a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a) else 1)
PY
then ok; else bad "a skipped step 20 changed the parameters or optimizer state"; fi
expect 1 "50 steps in a row had a non-finite loss or gradients" env MOE_FAULT_NAN_STEPS="$(seq -s, 1 60)" \
    "$moe" train $small --steps 60 --eval-every 30 --out "$tmp/nanall"
# a flipped byte in a checkpoint's tensor data is refused, not trained on
cp "$tmp/a_topk/checkpoint.safetensors" "$tmp/flip.safetensors"
size=$(wc -c <"$tmp/flip.safetensors")
printf '\377' | dd of="$tmp/flip.safetensors" bs=1 seek=$((size - 1000)) conv=notrunc 2>/dev/null
expect 1 "checksum mismatch" "$moe" eval "$tmp/flip.safetensors" --threads 2
expect 1 "checksum mismatch" "$moe" train --resume "$tmp/flip.safetensors" --out "$tmp/flip"
# router flags: clear errors
expect 2 "unknown router \"bogus\"" "$moe" train --router bogus --steps 2 --out "$tmp/e"
expect 2 "are for --layer topk" "$moe" train --layer gshard --router switch --steps 2 --out "$tmp/e"
expect 2 "expected topk_softmax, softmax or sigmoid" "$moe" train --score max --steps 2 --out "$tmp/e"
expect 1 "num_groups = 3 must divide num_experts = 8" "$moe" train --groups 3 --steps 2 --out "$tmp/e"
expect 1 "expert choice is balanced" "$moe" train --router expert_choice --balance 0.1 --steps 2 --out "$tmp/e"

# ---- SIGKILL while checkpoints are being written: the last one stays loadable
for delay in 0.05 0.2 0.4 0.7 1.0; do
    rm -rf "$tmp/k"
    "$moe" train --corpus tasks --dim 128 --hidden 256 --context 64 --batch 4 --steps 100000 --eval-every 1 --quiet \
        --threads 2 \
        --out "$tmp/k" >/dev/null 2>&1 &
    pid=$!
    n=0 # wait for the first checkpoint, then kill while the next ones are written
    while [ ! -f "$tmp/k/checkpoint.safetensors" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    sleep $delay
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    expect 0 "format       libmoe-lm" "$moe" inspect "$tmp/k/checkpoint.safetensors"
    expect 0 "bits/byte" "$moe" eval "$tmp/k/checkpoint.safetensors" --threads 2
done

# ---- the subcommands' help and errors
for c in sample eval inspect; do
    expect 0 "usage: moe $c" "$moe" $c --help
    expect 2 "which checkpoint" "$moe" $c
    expect 1 "cannot open\|No such file" "$moe" $c "$tmp/missing.safetensors"
done
expect 2 "unknown option '--bogus'" "$moe" sample "$tmp/a_topk/checkpoint.safetensors" --bogus
expect 2 "expected a number" "$moe" sample "$tmp/a_topk/checkpoint.safetensors" --temperature hot
expect 0 "C:moe=" "$moe" sample "$tmp/a_topk/checkpoint.safetensors" --length 20 --temperature 0
expect 0 "emb.weight" "$moe" inspect "$tmp/a_topk/checkpoint.safetensors"
expect 1 "cannot open" "$moe" train --data "$tmp/nope.txt" --steps 2 --out "$tmp/e"
: >"$tmp/empty.txt"
expect 1 "has 0 bytes" "$moe" train --data "$tmp/empty.txt" --steps 2 --out "$tmp/e"
expect 2 "expected an integer" "$moe" train --batch lots
expect 2 "not a multiple of --group" "$moe" train --layer gshard --context 100 --group 64
expect 2 "must split into --heads 3" "$moe" train --dim 128 --heads 3
expect 2 "expected fortunes or tasks" "$moe" train --corpus bogus
expect 2 "expected topk, gshard" "$moe" train --layer nope
# a layer's weights file is not a checkpoint; a truncated checkpoint is refused
head -c 100 "$tmp/a_topk/checkpoint.safetensors" >"$tmp/trunc.safetensors"
expect 1 "MOE_ERR_FORMAT\|truncated\|past the end\|length" "$moe" eval "$tmp/trunc.safetensors"
# a valid safetensors file without the checkpoint metadata (header: one F32 tensor)
h='{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
printf "\\$(printf %o ${#h})\\0\\0\\0\\0\\0\\0\\0%s\\0\\0\\0\\0" "$h" >"$tmp/plain.safetensors"
expect 1 "not a moe train checkpoint" "$moe" train --resume "$tmp/plain.safetensors" --out "$tmp/e"
cp "$tmp/a_topk/checkpoint.safetensors" "$tmp/mis.safetensors"
# flip "dim":16 to "dim":20 in the config metadata: the tensors no longer match
sed -i 's/\\"dim\\":16,/\\"dim\\":20,/' "$tmp/mis.safetensors"
expect 1 "emb.weight" "$moe" eval "$tmp/mis.safetensors"
# a config edited smaller than its tensors is refused, not loaded onto a prefix of them
cp "$tmp/a_topk/checkpoint.safetensors" "$tmp/small.safetensors"
sed -i 's/\\"hidden_dim\\":16,/\\"hidden_dim\\":12,/' "$tmp/small.safetensors"
expect 1 "has shape" "$moe" eval "$tmp/small.safetensors"
# --resume keeps the checkpoint's settings; a finished run has nothing to train
expect 2 "--lr cannot change them" "$moe" train --resume "$tmp/a_topk/checkpoint.safetensors" --lr 1e-3 --out "$tmp/e"
expect 0 "nothing to train" "$moe" train --resume "$tmp/a_topk/checkpoint.safetensors" --out "$tmp/e"
expect 2 "--top-k is for --layer topk" "$moe" train --layer gshard --top-k 3 --out "$tmp/e"
expect 0 "gshard mixes the tokens of a group" "$moe" train $small --layer gshard --group 8 --steps 2 --out "$tmp/e"
head -c 150 README.md >"$tmp/tiny.txt"
expect 1 "shorter than one sequence" "$moe" eval "$tmp/a_topk/checkpoint.safetensors" --data "$tmp/tiny.txt"
expect 1 "is a directory" "$moe" train --data "$tmp" --out "$tmp/e"
expect 2 "give one" "$moe" train --data "$tmp/tiny.txt" --corpus tasks --out "$tmp/e"
cp "$tmp/a_topk/checkpoint.safetensors" "$tmp/heads.safetensors" # 16 does not split into 3 heads
sed -i 's/\\"heads\\":2,/\\"heads\\":3,/' "$tmp/heads.safetensors"
expect 1 "model config is invalid: --dim 16 must split into --heads 3" "$moe" sample "$tmp/heads.safetensors"

# ---- sampling with the key/value cache: greedy is deterministic, top-k and temperature
"$moe" sample "$tmp/a_topk/checkpoint.safetensors" --prompt "C:abc=" --length 300 --temperature 0 >"$tmp/s1" 2>&1
"$moe" sample "$tmp/a_topk/checkpoint.safetensors" --prompt "C:abc=" --length 300 --temperature 0 >"$tmp/s2" 2>&1
if [ "$(wc -c <"$tmp/s1")" -gt 300 ] && cmp -s "$tmp/s1" "$tmp/s2"; then ok; else
    bad "greedy sampling past the context (300 bytes, context 32) is not deterministic or too short"
fi
expect 0 "R:expert=" "$moe" sample "$tmp/a_topk/checkpoint.safetensors" --top-k 5 --temperature 1.5 --seed 3
expect 2 "--top-k" "$moe" sample "$tmp/a_topk/checkpoint.safetensors" --top-k 999
expect 0 "bits/byte" "$moe" eval "$tmp/a_topk/checkpoint.safetensors" --dump "$tmp/dump.safetensors"
expect 0 "logits  *F32  *4 x 32 x 256" "$moe" inspect "$tmp/dump.safetensors"

# ---- the fortunes corpus (tools/deps.sh test installs it): per-language bits per byte and
# the language x expert table; without the packages, the command that installs them
expect 0 "routing, block 1: share of each language" "$moe" train $small --corpus fortunes --steps 10 \
    --eval-every 10 --out "$tmp/fort"
expect 0 "^  ru " "$moe" eval "$tmp/fort/checkpoint.safetensors" --max-bytes 2048
expect 0 "<zh> " "$moe" sample "$tmp/fort/checkpoint.safetensors" --length 20
expect 1 "apt-get install fortunes" env MOE_FORTUNES_DIR="$tmp/nowhere" "$moe" train --steps 2 --out "$tmp/e"

# ---- --data FILE trains on a text, and --dense runs
awk 'BEGIN { for (i = 0; i < 400; i++) print "the quick brown fox jumps over the lazy dog " i }' >"$tmp/t.txt"
expect 0 "bits/byte" "$moe" train ${small#--corpus tasks } --data "$tmp/t.txt" --steps 30 --eval-every 30 --out "$tmp/f"
expect 0 "dense FFN" "$moe" train $small --dense --steps 10 --eval-every 10 --out "$tmp/g" --quiet
expect 0 "routing, block 0" "$moe" train $small --layer soft_dynamic --group 16 --steps 10 --eval-every 10 \
    --out "$tmp/s"

echo "train: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

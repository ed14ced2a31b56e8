#!/bin/sh
# One binary for every x86-64 CPU (README "Every CPU"): the default build's
# `moe` and kernel tests run under qemu-user emulating older CPUs with no
# SIGILL, choosing the level each CPU has:
#   -cpu Nehalem  x86-64-v2: SSE4.2, no AVX  -> level baseline
#   -cpu max      QEMU's TCG: AVX2 + FMA, no AVX-512 -> level avx2
# fp32 and --bf16 forward+backward (moe bench, a small shape), and the
# kernel test (every level the emulated CPU has against generic). Short: qemu
# runs these 100-1000x slower than the CPU.
cd "$(dirname "$0")/.."
. tests/lib.sh
q=$(command -v qemu-x86_64-static || command -v qemu-x86_64)
if [ "$(uname -m)" != x86_64 ]; then
    echo "portable: not an x86-64 machine: nothing to emulate here"
    echo "0 passed, 0 failed"
    exit 0
fi
if [ -z "$q" ]; then
    bad "qemu-x86_64-static not found (tools/deps.sh test installs qemu-user-static)"
    echo "$pass passed, $fail failed"
    exit 1
fi
small="--tokens 64 --dim 32 --hidden 64 --experts 4 --iters 1"
for cpu in Nehalem:baseline max:avx2; do
    model=${cpu%%:*} level=${cpu##*:}
    expect 0 "running:   $level" "$q" -cpu "$model" "$moe" cpu
    expect 0 "topk" "$q" -cpu "$model" "$moe" bench $small
    expect 0 "topk" "$q" -cpu "$model" "$moe" bench $small --bf16
    expect 0 "gshard" "$q" -cpu "$model" "$moe" bench $small --layer gshard --bf16
    expect 0 "test_kernels: [0-9]* passed, 0 failed" "$q" -cpu "$model" build/tests/test_kernels
done
echo "portable (qemu -cpu Nehalem, -cpu max): $pass passed, $fail failed"
[ "$fail" -eq 0 ]

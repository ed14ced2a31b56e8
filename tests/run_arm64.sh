#!/bin/sh
# The C tests cross-built for arm64 (make test-arm64: build-arm64/tests/test_*),
# run under qemu-aarch64-static at both kernel levels of arm64: baseline
# (MOE_MAX_CPU_ISA=baseline: the generic kernels) and the default (neon:
# src/kernels/arm_neon, whose results test_kernels compares bit for bit with
# generic's). One ok/FAIL line per program and level, then one line
# "N passed, N failed": the sum of the programs' own summaries
# (tests/runlib.sh, as tests/run.sh counts them).
#
# Under emulation the programs run about 10x slower, so every program runs
# with MOE_TEST_QUICK=1: those with a quick mode (the same checks on fewer
# steps) take it and print a line that says so, shown here as "shortened"
# on the program's line. MOE_REQUIRE_FORTUNES passes through.
set -u
cd "$(dirname "$0")/.."
root=$(pwd)
sysroot=${SYSROOT:-build-arm64/sysroot}
case $sysroot in /*) ;; *) sysroot=$root/$sysroot ;; esac
# -L: the cross toolchain's loader and libc. Its libc must come before the
# multiarch /lib/aarch64-linux-gnu that /etc/ld.so.cache lists (libcjson1:arm64
# pulls libc6:arm64 in there): a libc of another build than the loader's hangs
# in the first pthread_create. cJSON is found through ld.so.cache, oneDNN in
# the sysroot (tools/deps.sh arm64).
prefix=/usr/aarch64-linux-gnu
libs=$prefix/lib:$sysroot/usr/lib/aarch64-linux-gnu
# OpenMP threads that spin while they wait each take a host core to emulate
# the spin: sleeping instead made test_soak 6x faster here (285 s -> 48 s
# in full on 2 busy cores), test_layers 1.4x
export OMP_WAIT_POLICY=passive
export MOE_TEST_QUICK=1
echo "arm64: $(qemu-aarch64-static --version | head -n 1), MOE_TEST_QUICK=1"

# test_faults and test_router write scratch files into ./build: a directory
# of our own, so a native `make test` running beside this one is not disturbed
mkdir -p build-arm64/run/build
cd build-arm64/run
. "$root/tests/runlib.sh"

n=0
for level in baseline neon; do
    lt0=$(date +%s)
    # neon is the default (the CPU's best level); baseline is a cap
    cap=""
    [ "$level" = baseline ] && cap=baseline
    for t in "$root"/build-arm64/tests/test_*; do
        [ -x "$t" ] || continue
        n=$((n + 1))
        run "arm64 $level $(basename "$t")" env MOE_MAX_CPU_ISA=$cap LD_LIBRARY_PATH="$libs" \
            qemu-aarch64-static -L "$prefix" "$t"
        # the level really ran: else both passes could test the same kernels
        if [ "$(basename "$t")" = test_kernels ] && ! grep -q "^kernel level: $level " "$log"; then
            echo "FAIL arm64 $level: test_kernels ran at another level: $(grep -m 1 '^kernel level' "$log")"
            fail=$((fail + 1))
        fi
    done
    echo "arm64 $level: $(($(date +%s) - lt0)) s"
done
if [ "$n" -eq 0 ]; then
    echo "FAIL arm64: no test programs in build-arm64/tests (make test-arm64 builds them)"
    fail=$((fail + 1))
fi
if [ "$skip" -ne 0 ]; then echo "$pass passed, $fail failed, $skip skipped"; else echo "$pass passed, $fail failed"; fi
[ "$fail" -eq 0 ]

#!/bin/sh
# Check (and, as root with apt-get, install) the system packages libmoe needs.
#   tools/deps.sh build   oneDNN (GEMMs), cJSON headers/libraries and OpenMPI
#                         (libopenmpi-dev, openmpi-bin: expert parallelism, `--ep`)
#   tools/deps.sh test    the above plus Debian's python3-torch for parity tests,
#                         pkg-config and cmake for the install test, and qemu-user-static
#                         (tests/portable.sh runs the tool on emulated older CPUs)
#   tools/deps.sh fuzz    clang and libFuzzer (make fuzz)
#   tools/deps.sh valgrind  valgrind (make test-valgrind)
#   tools/deps.sh corpus  only Debian's fortune-cookie files, the multilingual corpus of
#                         `moe train --corpus fortunes` (English, German, Spanish, Italian,
#                         Russian, Chinese, Polish, Czech); `test` installs them too
# Without root or apt-get, or when apt-get fails, it stops with the exact command to run.
set -eu
what=${1:-build}
missing=""

if [ "$what" != corpus ]; then
    [ -f /usr/include/oneapi/dnnl/dnnl.h ] && \
    [ -f /usr/lib/x86_64-linux-gnu/libdnnl.so ] || missing="$missing libdnnl-dev"
    [ -f /usr/include/cjson/cJSON.h ] || missing="$missing libcjson-dev"
    if [ "${MPI:-}" != 0 ]; then # make MPI=0 builds without it
        command -v mpicc >/dev/null 2>&1 || missing="$missing libopenmpi-dev"
        command -v mpirun >/dev/null 2>&1 || missing="$missing openmpi-bin"
    fi
fi
if [ "$what" = corpus ] || [ "$what" = test ]; then
    # one file or directory each package ships (fortunes pulls in fortunes-min)
    f=/usr/share/games/fortunes
    [ -f $f/computers ] && [ -f $f/fortunes ] || missing="$missing fortunes"
    [ -d $f/de ] || missing="$missing fortunes-de"
    [ -d $f/es ] || missing="$missing fortunes-es"
    [ -d $f/it ] || missing="$missing fortunes-it"
    [ -d $f/ru ] || missing="$missing fortunes-ru"
    [ -f $f/chinese ] || missing="$missing fortunes-zh"
    [ -d $f/pl ] || missing="$missing fortunes-pl"
    [ -d $f/cs ] || missing="$missing fortunes-cs"
fi
if [ "$what" = test ]; then
    /usr/bin/python3 -c "import torch, numpy" >/dev/null 2>&1 || missing="$missing python3-torch python3-numpy"
    # the install test: a pkg-config build and a CMake project against the installed libmoe
    command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
    command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
    # ... and `pip install ./python`
    /usr/bin/python3 -m pip --version >/dev/null 2>&1 || missing="$missing python3-pip"
    /usr/bin/python3 -c "import setuptools" >/dev/null 2>&1 || missing="$missing python3-setuptools"
    # tests/portable.sh: the tool under qemu-user emulating older x86-64 CPUs
    if [ "$(uname -m)" = x86_64 ]; then
        command -v qemu-x86_64-static >/dev/null 2>&1 || missing="$missing qemu-user-static"
    fi
fi
if [ "$what" = valgrind ]; then
    command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
fi
if [ "$what" = fuzz ]; then # clang with libFuzzer and its sanitizer runtimes
    command -v clang >/dev/null 2>&1 || missing="$missing clang"
    ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 ||
        missing="$missing libclang-rt-dev"
fi
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps: installing$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if apt-get update -qq >&2 && apt-get install -y -qq $missing >&2; then
        exit 0
    fi
    echo "deps: apt-get failed" >&2
fi
echo "deps: missing system packages:$missing" >&2
echo "deps: run:  sudo apt-get update && sudo apt-get install -y$missing" >&2
exit 1

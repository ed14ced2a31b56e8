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
#   tools/deps.sh arm64 [SYSROOT]  make test-arm64: the cross compiler
#                         (crossbuild-essential-arm64), qemu-aarch64-static
#                         (qemu-user-static) and the arm64 cJSON (libcjson-dev:arm64,
#                         after dpkg --add-architecture arm64); then Debian's arm64
#                         oneDNN unpacked into SYSROOT (default build-arm64/sysroot),
#                         not installed: libdnnl-dev:arm64 conflicts with the amd64 one
# Without root or apt-get, or when apt-get fails, it stops with the exact command to run.
set -eu
what=${1:-build}
missing=""
add_arch="" # arm64: dpkg must know the architecture before apt can see :arm64 packages

if [ "$what" != corpus ] && [ "$what" != arm64 ]; then
    [ -f /usr/include/oneapi/dnnl/dnnl.h ] && \
    ls /usr/lib/*/libdnnl.so >/dev/null 2>&1 || missing="$missing libdnnl-dev" # the host's multiarch dir
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
    ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-"$(uname -m)".a >/dev/null 2>&1 ||
        missing="$missing libclang-rt-dev"
fi
if [ "$what" = arm64 ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing crossbuild-essential-arm64"
    command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$missing qemu-user-static"
    [ -f /usr/include/cjson/cJSON.h ] && [ -f /usr/lib/aarch64-linux-gnu/libcjson.so ] ||
        missing="$missing libcjson-dev:arm64"
    if [ "$(dpkg --print-architecture 2>/dev/null)" != arm64 ] &&
        ! dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64; then
        add_arch=1
    fi
fi

if [ -n "$missing$add_arch" ]; then
    ok=""
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "deps: installing$missing${add_arch:+ (adding the arm64 architecture)}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        if { [ -z "$add_arch" ] || dpkg --add-architecture arm64; } && apt-get update -qq >&2 &&
            { [ -z "$missing" ] || apt-get install -y -qq $missing >&2; }; then
            ok=1
        else
            echo "deps: apt-get failed" >&2
        fi
    fi
    if [ -z "$ok" ]; then
        echo "deps: missing system packages:$missing${add_arch:+ (and the arm64 architecture)}" >&2
        echo "deps: run:  ${add_arch:+sudo dpkg --add-architecture arm64 && }sudo apt-get update${missing:+ && sudo apt-get install -y$missing}" >&2
        exit 1
    fi
fi
[ "$what" = arm64 ] || exit 0

# The arm64 oneDNN, unpacked (not installed) into the sysroot the cross build
# compiles and links against (-I/-L) and qemu loads it from
# (LD_LIBRARY_PATH): once, then cached. The library package's name is
# libdnnl-dev's dependency (libdnnl2 in bookworm).
sysroot=${2:-build-arm64/sysroot}
case $sysroot in /*) ;; *) sysroot=$(pwd)/$sysroot ;; esac
if [ -f "$sysroot/usr/include/oneapi/dnnl/dnnl.h" ] && [ -f "$sysroot/usr/lib/aarch64-linux-gnu/libdnnl.so" ]; then
    exit 0
fi
lib=$(apt-cache depends libdnnl-dev:arm64 2>/dev/null | sed -n 's/^ *Depends: \(libdnnl[0-9]*\):arm64$/\1/p' | head -n 1)
lib=${lib:-libdnnl2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$sysroot.part"' EXIT
fetch() { # download both packages and unpack them into $sysroot.part
    # (as root apt hands a download to its _apt user, who cannot write to mktemp's directory)
    (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "libdnnl-dev:arm64" "$lib:arm64" >&2) || return 1
    rm -rf "$sysroot.part" && mkdir -p "$sysroot.part" || return 1
    for d in "$tmp"/*.deb; do dpkg -x "$d" "$sysroot.part" || return 1; done
}
echo "deps: unpacking libdnnl-dev:arm64 and $lib:arm64 into $sysroot" >&2
if fetch; then # complete or not there at all: the check above never sees half a sysroot
    rm -rf "$sysroot" && mv "$sysroot.part" "$sysroot" && exit 0
fi
echo "deps: could not fetch the arm64 oneDNN" >&2
echo "deps: run:  mkdir -p $sysroot && cd \$(mktemp -d) && apt-get download libdnnl-dev:arm64 $lib:arm64 &&" \
     "for d in *.deb; do dpkg -x \$d $sysroot; done" >&2
exit 1

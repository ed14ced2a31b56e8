#!/bin/sh
# `make install` into a temporary prefix, then the installed libmoe used as a
# user would: a C program built with pkg-config, a CMake project with
# find_package(libmoe), the soname, the exported symbols (the public API
# only), the tool and its man page, the Python package from the prefix, and
# `make uninstall`. Prints "install: N passed, N failed".
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh
p="$tmp/prefix"
if make --no-print-directory install PREFIX="$p" PYDIR="$p/python" >"$tmp/install.log" 2>&1; then ok; else
    bad "make install: $(tail -n 5 "$tmp/install.log")"
fi

# the soname, and only the public API exported (MOE_API in moe.h)
so=$(readelf -d "$p/lib/libmoe.so.0.1.0" 2>/dev/null | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
if [ "$so" = "libmoe.so.0" ] && [ "$(readlink "$p/lib/libmoe.so")" = "libmoe.so.0" ]; then ok; else
    bad "soname '$so' or links wrong"
fi
nm -D --defined-only "$p/lib/libmoe.so" | awk '$2 ~ /^[TDBR]$/ { print $3 }' | sort >"$tmp/syms"
public=$(grep -ho 'moe_[a-z0-9_]*(' include/moe.h | tr -d '(' | sort -u)
extra=$(grep -v -x -F "$public" "$tmp/syms" | grep -v '^_' | head -n 5)
missing=$(echo "$public" | grep -v -x -F -f "$tmp/syms" | head -n 5)
if [ -z "$extra" ] && [ -z "$missing" ]; then ok; else
    bad "exported symbols: not public: [$extra]; public but not exported: [$missing]"
fi

# a C program through pkg-config, run against the installed library
cat >"$tmp/use.c" <<'C'
#include <moe.h>
#include <stdio.h>
int main(void) {
    moe_config c;
    moe_config_init(&c, MOE_LAYER_TOPK);
    moe_layer *l;
    if (moe_layer_create(&l, &c) != MOE_OK) return 1;
    float x[2 * 64] = {0}, y[2 * 64];
    x[3] = 1.0f;
    moe_status st = moe_layer_forward(l, y, NULL, x, 2, MOE_EVAL | MOE_NO_GRAD);
    printf("libmoe %s: %s, %d parameters\n", MOE_VERSION, moe_status_str(st), moe_layer_num_params(l));
    moe_layer_free(l);
    return st != MOE_OK;
}
C
if PKG_CONFIG_PATH="$p/lib/pkgconfig" cc -o "$tmp/use" "$tmp/use.c" \
        $(PKG_CONFIG_PATH="$p/lib/pkgconfig" pkg-config --cflags --libs moe) 2>"$tmp/cc.log" &&
    LD_LIBRARY_PATH="$p/lib" "$tmp/use" | grep -q "libmoe 0.1.0: MOE_OK, 18 parameters"; then ok; else
    bad "pkg-config build: $(cat "$tmp/cc.log" | head -n 5)"
fi
expect 0 "0.1.0" env PKG_CONFIG_PATH="$p/lib/pkgconfig" pkg-config --modversion moe

# a CMake project: find_package(libmoe 0.1), and 1.0 is refused
mkdir -p "$tmp/cm" "$tmp/cm2"
cp "$tmp/use.c" "$tmp/cm/use.c"
cat >"$tmp/cm/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.13)
project(use_libmoe C)
find_package(libmoe 0.1 REQUIRED)
add_executable(use use.c)
target_link_libraries(use libmoe::moe)
CM
if (cd "$tmp/cm2" && cmake -S "$tmp/cm" -B . -DCMAKE_PREFIX_PATH="$p" >"$tmp/cmake.log" 2>&1 &&
        cmake --build . >>"$tmp/cmake.log" 2>&1) && LD_LIBRARY_PATH="$p/lib" "$tmp/cm2/use" | grep -q MOE_OK; then
    ok; else bad "cmake find_package(libmoe): $(tail -n 8 "$tmp/cmake.log")"; fi
sed -i 's/find_package(libmoe 0.1 REQUIRED)/find_package(libmoe 1.0 REQUIRED)/' "$tmp/cm/CMakeLists.txt"
if cmake -S "$tmp/cm" -B "$tmp/cm3" -DCMAKE_PREFIX_PATH="$p" >"$tmp/cmake2.log" 2>&1; then
    bad "find_package(libmoe 1.0) accepted version 0.1.0"
else ok; fi

# the tool and its man page
expect 0 "moe 0.1.0" "$p/bin/moe" version
if man -l "$p/share/man/man1/moe.1" 2>/dev/null | grep -q "Mixture-of-Experts"; then ok; else
    if grep -q '^.SH NAME' "$p/share/man/man1/moe.1"; then ok; else bad "man page"; fi
fi

# the Python package from the prefix loads the installed library
if [ -d python/libmoe ]; then
    if PYTHONPATH="$p/python" /usr/bin/python3 -c "
import libmoe, sys
assert '$p' in libmoe.library_path, libmoe.library_path
import libmoe.torch; print('python ok', libmoe.library_path)" >"$tmp/py.log" 2>&1; then ok; else bad "python from the prefix: $(cat "$tmp/py.log")"; fi
fi

# pip install ./python (pure Python), then the installed library through LIBMOE_LIBRARY
if [ -d python/libmoe ]; then
    if /usr/bin/python3 -m pip install -q --no-deps --no-build-isolation --target "$tmp/pip" ./python \
            >"$tmp/pip.log" 2>&1 &&
        (cd "$tmp" && LIBMOE_LIBRARY="$p/lib/libmoe.so.0" PYTHONPATH="$tmp/pip" /usr/bin/python3 -c "
import libmoe, libmoe.torch as lt, torch
assert libmoe.__file__.startswith('$tmp/pip'), libmoe.__file__
y = lt.SimpleMoE(4, 8, 16, 2)(torch.randn(3, 8))
print('pip ok', tuple(y.shape))") >>"$tmp/pip.log" 2>&1 && grep -q "pip ok (3, 8)" "$tmp/pip.log"; then ok; else
        bad "pip install ./python: $(tail -n 5 "$tmp/pip.log")"
    fi
fi

# uninstall leaves nothing behind
make --no-print-directory uninstall PREFIX="$p" PYDIR="$p/python" >/dev/null 2>&1
left=$(find "$p" -type f -o -type l | head -n 5)
if [ -z "$left" ]; then ok; else bad "make uninstall left: $left"; fi

echo "install: $pass passed, $fail failed"
[ "$fail" -eq 0 ]

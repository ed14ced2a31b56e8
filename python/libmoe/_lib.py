"""ctypes bindings of libmoe's C API (include/moe.h): the library, its structs, argtypes.

The library is found, in order, at $LIBMOE_LIBRARY (a path), at the libmoe.so.0 `make install`
installed with this package (_install.py), at build/libmoe.so of the
checkout this package lives in (python/libmoe/../../build/libmoe.so), then as an
installed library (ctypes.util.find_library("moe"), else "libmoe.so.0"). ctypes.CDLL
releases the GIL for the length of every call.
"""
import ctypes
import ctypes.util
import os

c_float_p = ctypes.POINTER(ctypes.c_float)
c_uint8_p = ctypes.POINTER(ctypes.c_uint8)
c_int64_p = ctypes.POINTER(ctypes.c_int64)

# moe_status values (include/moe.h)
MOE_OK = 0

# forward flags
MOE_EVAL = 0
MOE_TRAIN = 1
MOE_NO_GRAD = 2

# Bytes handed to moe_config_from_json: far more than sizeof(moe_config), so the
# struct never has to be mirrored here.
CONFIG_BYTES = 4096


class moe_param(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("ndim", ctypes.c_int), ("shape", ctypes.c_int64 * 4),
                ("numel", ctypes.c_int64), ("data", c_float_p), ("grad", c_float_p)]


class moe_stats(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_int64), ("assignments", ctypes.c_int64), ("dropped", ctypes.c_int64),
                ("second_candidates", ctypes.c_int64), ("second_kept", ctypes.c_int64),
                ("n_experts", ctypes.c_int), ("expert_counts", c_int64_p), ("top_k", ctypes.c_int),
                ("capacity", ctypes.c_int64), ("balance_loss", ctypes.c_double),
                ("z_loss", ctypes.c_double), ("expert_bias", c_float_p)]


def _candidates():
    env = os.environ.get("LIBMOE_LIBRARY")
    if env:
        return [env], True
    out = []
    try:  # written by `make install`: the libmoe.so.0 installed with this package
        from ._install import LIBRARY
        out.append(LIBRARY)
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    out.append(os.path.normpath(os.path.join(here, "..", "..", "build", "libmoe.so")))
    found = ctypes.util.find_library("moe")
    if found:
        out.append(found)
    out.append("libmoe.so.0")
    return out, False


def _load():
    cands, forced = _candidates()
    errors = []
    for path in cands:
        if "/" in path and not os.path.exists(path):
            errors.append(f"{path}: no such file")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            errors.append(f"{path}: {e}")
            if forced:
                break
    raise ImportError("libmoe: cannot load the C library (run `make` in the repository, or set "
                      "LIBMOE_LIBRARY to the path of libmoe.so); tried: " + "; ".join(errors))


lib, lib_path = _load()

_P = ctypes.c_void_p   # moe_layer * (opaque)
_S = ctypes.c_int      # moe_status
_SIGS = {
    "moe_status_str": (ctypes.c_char_p, [ctypes.c_int]),
    "moe_last_error": (ctypes.c_char_p, []),
    "moe_set_num_threads": (ctypes.c_int, [ctypes.c_int]),
    "moe_cpu_isa": (ctypes.c_int, []),
    "moe_cpu_isa_max": (ctypes.c_int, []),
    "moe_isa_name": (ctypes.c_char_p, [ctypes.c_int]),
    "moe_cpu_model": (ctypes.c_char_p, []),
    "moe_cpu_notes": (ctypes.c_char_p, []),
    "moe_config_from_json": (_S, [ctypes.c_void_p, ctypes.c_char_p]),
    "moe_layer_create": (_S, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]),
    "moe_layer_free": (None, [_P]),
    "moe_layer_input_dim": (ctypes.c_int64, [_P]),
    "moe_layer_output_dim": (ctypes.c_int64, [_P]),
    "moe_layer_has_aux_loss": (ctypes.c_int, [_P]),
    "moe_layer_num_params": (ctypes.c_int, [_P]),
    "moe_layer_param": (ctypes.POINTER(moe_param), [_P, ctypes.c_int]),
    "moe_layer_num_buffers": (ctypes.c_int, [_P]),
    "moe_layer_buffer": (ctypes.POINTER(moe_param), [_P, ctypes.c_int]),
    "moe_layer_zero_grad": (None, [_P]),
    "moe_layer_params_changed": (None, [_P]),
    "moe_layer_forward_masked": (_S, [_P, c_float_p, c_float_p, c_float_p, c_uint8_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int]),
    "moe_layer_forward_image": (_S, [_P, c_float_p, c_float_p, c_float_p, c_uint8_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]),
    "moe_layer_backward": (_S, [_P, c_float_p, c_float_p, ctypes.c_float]),
    "moe_layer_update_bias": (_S, [_P]),
    "moe_layer_stats": (_S, [_P, ctypes.POINTER(moe_stats)]),
    "moe_layer_rng_position": (ctypes.c_uint64, [_P]),
    "moe_layer_set_rng_position": (None, [_P, ctypes.c_uint64]),
    "moe_layer_load": (_S, [_P, ctypes.c_char_p]),
    "moe_layer_save": (_S, [_P, ctypes.c_char_p]),
}
for _name, (_res, _args) in _SIGS.items():
    _f = getattr(lib, _name)
    _f.restype, _f.argtypes = _res, _args


def status_name(st):
    return lib.moe_status_str(st).decode()


def last_error():
    return lib.moe_last_error().decode(errors="replace")

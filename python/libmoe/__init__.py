"""libmoe from Python: ctypes bindings of the C library (numpy API here, PyTorch
modules in libmoe.torch).

    import numpy as np, libmoe
    layer = libmoe.Layer({"type": "topk", "num_experts": 4, "input_dim": 16,
                          "hidden_dim": 32, "top_k": 2})
    y, aux = layer.forward(np.random.randn(10, 16).astype(np.float32))
    dx = layer.backward(np.ones_like(y))      # parameter grads accumulate into layer.grads
    layer.params["gate.weight"] -= 0.1 * layer.grads["gate.weight"]   # in place, C memory

Layer.params / .grads / .buffers are numpy views of the layer's own memory (no
copies); they keep the layer alive. Errors of the C library raise MoEError, whose
text is moe_last_error()'s message.
"""
import ctypes
import json
import os

import numpy as np

from . import _lib
from ._lib import MOE_EVAL, MOE_NO_GRAD, MOE_TRAIN, lib

__all__ = ["Layer", "MoEError", "MOE_EVAL", "MOE_TRAIN", "MOE_NO_GRAD", "set_num_threads", "library_path", "cpu"]
__version__ = "0.1.0"

library_path = _lib.lib_path  # the path of the libmoe.so this package loaded


class MoEError(RuntimeError):
    """An error of the C library: .status ("MOE_ERR_SHAPE", ...) and .message (its text)."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _check(st, what=""):
    if st != _lib.MOE_OK:
        msg = _lib.last_error()
        raise MoEError(_lib.status_name(st), f"{what}: {msg}" if what else msg)


def cpu():
    """The CPU kernel level of this process (README "Every CPU"): a dict with
    "isa" (the level in use, e.g. "avx2"; MOE_MAX_CPU_ISA caps it), "isa_max"
    (the CPU's best), "model" and "notes" (the library's fallbacks, one line each)."""
    return {"isa": lib.moe_isa_name(lib.moe_cpu_isa()).decode(),
            "isa_max": lib.moe_isa_name(lib.moe_cpu_isa_max()).decode(),
            "model": lib.moe_cpu_model().decode(errors="replace"),
            "notes": [n for n in lib.moe_cpu_notes().decode(errors="replace").split("\n") if n]}


def set_num_threads(n):
    """Threads of libmoe's OpenMP regions, its GEMMs included (n <= 0: all cores); returns the count."""
    return lib.moe_set_num_threads(int(n))


class _Memory:
    """numpy exporter of n float32 at a C address; keeps `owner` (the Layer) alive."""

    def __init__(self, addr, shape, owner):
        self.owner = owner
        self.__array_interface__ = {"data": (addr, False), "shape": tuple(shape), "typestr": "<f4",
                                    "version": 3}


def _f32p(addr):
    return ctypes.cast(addr, _lib.c_float_p) if addr else None


class Layer:
    """One libmoe layer, created from a config dict (or JSON text) as `moe forward` takes it
    (README "`moe forward`", moe_config_from_json).

    Shapes: x (T, D) is one group of T tokens (groups=B splits it into B equal groups);
    (B, N, D) is B groups of N tokens; images (B, D, h, w) (soft layers) are B groups of
    h*w tokens. y has the same layout with the output width. mask (B, N) (or (B, h, w))
    marks real tokens (soft layers only)."""

    def __init__(self, config):
        text = config if isinstance(config, str) else json.dumps(config)
        self.config = json.loads(text)
        cfg = ctypes.create_string_buffer(_lib.CONFIG_BYTES)
        _check(lib.moe_config_from_json(cfg, text.encode()), "config")
        h = ctypes.c_void_p()
        _check(lib.moe_layer_create(ctypes.byref(h), cfg), "create")
        self._h = h
        self.input_dim = int(lib.moe_layer_input_dim(h))
        self.output_dim = int(lib.moe_layer_output_dim(h))
        self.has_aux_loss = bool(lib.moe_layer_has_aux_loss(h))
        self.params, self.grads, self.buffers = {}, {}, {}
        self.param_names = []
        for i in range(lib.moe_layer_num_params(h)):
            p = lib.moe_layer_param(h, i).contents
            name, shape = p.name.decode(), tuple(p.shape[:p.ndim])
            self.param_names.append(name)
            self.params[name] = np.asarray(_Memory(ctypes.addressof(p.data.contents), shape, self))
            self.grads[name] = np.asarray(_Memory(ctypes.addressof(p.grad.contents), shape, self))
        for i in range(lib.moe_layer_num_buffers(h)):
            p = lib.moe_layer_buffer(h, i).contents
            self.buffers[p.name.decode()] = np.asarray(
                _Memory(ctypes.addressof(p.data.contents), tuple(p.shape[:p.ndim]), self))
        self.forward_count = 0   # forwards attempted (a backward belongs to the latest one)
        self._last = None        # (x shape, y shape) of the latest successful forward

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None and h.value:
            lib.moe_layer_free(h)
            self._h = None

    # ------------------------------------------------------------ raw calls
    def layout(self, shape, groups=None, image=False):
        """(kind, dims, y shape) of an input shape: ("seq", (B, N)) or ("image", (B, h, w))."""
        shape = tuple(int(s) for s in shape)
        if image or len(shape) == 4:
            if len(shape) != 4:
                raise MoEError("MOE_ERR_SHAPE", f"image x must be (B, D, h, w), got {shape}")
            b, d, h, w = shape
            self._check_width(d, shape, "(B, D, h, w)")
            return "image", (b, h, w), (b, self.output_dim, h, w)
        if len(shape) == 3:
            b, n, d = shape
            if groups is not None and groups != b:
                raise MoEError("MOE_ERR_ARG", f"groups = {groups} but x is (B, N, D) = {shape}")
            self._check_width(d, shape, "(B, N, D)")
            return "seq", (b, n), (b, n, self.output_dim)
        if len(shape) == 2:
            t, d = shape
            self._check_width(d, shape, "(T, D)")
            b = 1 if groups is None else int(groups)
            if b < 1 or t % b:
                raise MoEError("MOE_ERR_SHAPE", f"x has T = {t} rows, not a multiple of groups = {b}")
            return "seq", (b, t // b), (t, self.output_dim)
        raise MoEError("MOE_ERR_SHAPE", f"x must be (T, D), (B, N, D) or (B, D, h, w), got {shape}")

    def _check_width(self, d, shape, form):
        if d != self.input_dim:
            raise MoEError("MOE_ERR_SHAPE", f"x {form} has shape {shape}: D = {d}, the layer's input "
                                            f"width is {self.input_dim}")

    def forward_raw(self, y_addr, x_addr, mask_addr, kind, dims, flags, shapes=None):
        """Forward on raw float32 addresses (libmoe.torch uses this); shapes: (x shape, y shape)
        for a later numpy backward. Returns the aux loss."""
        aux = ctypes.c_float(0.0)
        self.forward_count += 1
        self._last = None
        if self.config.get("bf16"):  # numpy/torch may have written the parameters: fresh bf16 copies
            lib.moe_layer_params_changed(self._h)
        m = ctypes.cast(mask_addr, _lib.c_uint8_p) if mask_addr else None
        if kind == "image":
            st = lib.moe_layer_forward_image(self._h, _f32p(y_addr), ctypes.byref(aux), _f32p(x_addr), m,
                                             dims[0], dims[1], dims[2], flags)
        else:
            st = lib.moe_layer_forward_masked(self._h, _f32p(y_addr), ctypes.byref(aux), _f32p(x_addr), m,
                                              dims[0], dims[1], flags)
        _check(st, "forward")
        self._last = shapes
        return float(aux.value)

    def backward_raw(self, dx_addr, dy_addr, daux):
        _check(lib.moe_layer_backward(self._h, _f32p(dx_addr), _f32p(dy_addr), float(daux)), "backward")

    # ------------------------------------------------------------ numpy API
    def forward(self, x, train=True, grad=True, mask=None, groups=None):
        """y, aux = forward(x): train/eval mode, grad=False is MOE_NO_GRAD (no backward may follow)."""
        x = np.asarray(x)
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        kind, dims, yshape = self.layout(x.shape, groups)
        maddr = 0
        if mask is not None:
            mask = np.asarray(mask)
            want = dims[0] * (dims[1] if kind == "seq" else dims[1] * dims[2])
            if mask.size != want or mask.shape[0] != dims[0]:
                raise MoEError("MOE_ERR_SHAPE", f"mask has shape {mask.shape}, expected ({dims[0]}, "
                                                f"{want // max(dims[0], 1)}) for x {x.shape}")
            mask = np.ascontiguousarray(mask != 0, dtype=np.uint8)
            maddr = mask.ctypes.data
        y = np.empty(yshape, dtype=np.float32)
        flags = (MOE_TRAIN if train else MOE_EVAL) | (0 if grad else MOE_NO_GRAD)
        aux = self.forward_raw(y.ctypes.data, x.ctypes.data, maddr, kind, dims, flags, (x.shape, y.shape))
        return y, aux

    def backward(self, dy, daux=1.0):
        """dx of the latest forward; parameter gradients accumulate (+=) into .grads."""
        if self._last is None:
            raise MoEError("MOE_ERR_STATE", "backward: no successful forward of this layer to differentiate")
        xshape, yshape = self._last
        dy = np.ascontiguousarray(dy, dtype=np.float32)
        if dy.shape != yshape:
            raise MoEError("MOE_ERR_SHAPE", f"dy has shape {dy.shape}, the forward's y is {yshape}")
        dx = np.empty(xshape, dtype=np.float32)
        self.backward_raw(dx.ctypes.data, dy.ctypes.data, daux)
        return dx

    def grad_tensors(self):
        """{name: torch tensor over the C gradient memory} (cached; libmoe.torch)."""
        if getattr(self, "_grad_tensors", None) is None:
            import torch
            self._grad_tensors = {n: torch.from_numpy(g) for n, g in self.grads.items()}
        return self._grad_tensors

    def zero_grad(self):
        lib.moe_layer_zero_grad(self._h)

    def update_bias(self):
        """DeepSeek-V3 selection-bias update (moe_layer_update_bias); call after an optimizer step."""
        _check(lib.moe_layer_update_bias(self._h), "update_bias")

    def load(self, path):
        """Load weights from safetensors (checked before anything is copied)."""
        _check(lib.moe_layer_load(self._h, os.fsencode(path)), "load")

    def save(self, path):
        _check(lib.moe_layer_save(self._h, os.fsencode(path)), "save")

    @property
    def rng_position(self):
        return int(lib.moe_layer_rng_position(self._h))

    @rng_position.setter
    def rng_position(self, pos):
        lib.moe_layer_set_rng_position(self._h, int(pos))

    def stats(self):
        """Routing statistics of the latest forward (moe_layer_stats) as a dict."""
        s = _lib.moe_stats()
        _check(lib.moe_layer_stats(self._h, ctypes.byref(s)), "stats")
        n = s.n_experts
        counts = np.array(s.expert_counts[:n], dtype=np.int64) if n and s.expert_counts else np.zeros(0, np.int64)
        out = dict(tokens=s.tokens, assignments=s.assignments, dropped=s.dropped,
                   second_candidates=s.second_candidates, second_kept=s.second_kept,
                   expert_counts=counts, top_k=s.top_k, capacity=s.capacity,
                   balance_loss=s.balance_loss, z_loss=s.z_loss)
        if s.expert_bias:
            out["expert_bias"] = np.array(s.expert_bias[:n], dtype=np.float32)
        return out

"""The packed-weight CPU matmul kernel (``packed_matmul.cc``) as a JAX operation.

:func:`packed_matmul` ``(x [M, K], data [N, R], scale, fmt) -> y [M, N]`` calls the C++ handler
through ``jax.ffi.ffi_call`` (CPU only). The library is built on first use (or by ``make setup``)
by :mod:`specjax.kernels.cpu_matmul.build` and registered once per process. The pure-JAX
reference of the same product is :func:`specjax.packed.dequantize` followed by ``jnp.dot``.

Under ``vmap`` the batched ``x`` is handed to the handler with its batch axes in front (the
handler flattens every leading axis into ``M``); a batched weight is refused by the handler.
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np

from specjax.kernels.cpu_matmul.build import KernelBuildError, library_path

TARGET = "specjax_packed_matmul"
_lock = threading.Lock()
_library = None


def ensure_registered() -> ctypes.CDLL:
    """Builds (if needed), loads and registers the kernel; returns the loaded library.

    Raises:
      KernelBuildError: no C++ compiler, or the build failed (the message says what to do).
    """
    global _library
    with _lock:
        if _library is None:
            lib = ctypes.CDLL(library_path())
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SpecjaxPackedMatmul),
                                        platform="cpu")
            lib.SpecjaxPackedMatmulPath.restype = ctypes.c_int
            _library = lib
    return _library


# Instruction-set paths of the kernel, slowest first (a call's ``isa`` caps the path).
ISAS = ("portable", "avx2", "avx512")


def code_path() -> str:
    """The best instruction-set path of the kernel on this CPU: ``"avx512"`` (AVX-512 F / BW /
    VL / DQ), ``"avx2"`` (AVX2 + FMA + F16C) or ``"portable"``."""
    return ISAS[ensure_registered().SpecjaxPackedMatmulPath() - 1]


def available_isas() -> tuple:
    """Every path this CPU can run, slowest first (what the tests compare)."""
    return ISAS[:ISAS.index(code_path()) + 1]


def packed_matmul(x: jax.Array, data: jax.Array, scale: jax.Array, fmt: str, *,
                  max_threads: int = 0, portable: bool = False, isa: str = "auto",
                  act8: bool = False, layer=None) -> jax.Array:
    """``y [M, N] = x [M, K] @ W^T`` for W's rows ``data [N, R]`` in format ``fmt``, or for
    layer ``layer`` of a stack ``data [L, N, R]`` (read in place: no copy of the layer).

    Args:
      x: float32 ``[M, K]``.
      data: uint8 ``[N, R]`` or ``[L, N, R]``; scale: float32 ``[(L,) N]`` for ``i8``, else
        ``[(L,) 1]``.
      layer: with a stack, the layer's index (``int32``, traced or static); the handler
        refuses one outside ``[0, L)``.
      fmt: a key of :data:`specjax.packed.FORMATS`.
      max_threads: at most this many threads (0: the CPU client's intra-op pool size).
      portable: take the portable code path (the same as ``isa="portable"``).
      isa: ``"auto"`` (the best path of this CPU) or a cap: ``"portable"``, ``"avx2"``,
        ``"avx512"`` (a path the CPU lacks falls back to the best it has).
      act8: quantise ``x`` to 8 bits per 32-value block first and multiply integers
        (``q8_0``, ``q4_0``, ``q4_1`` only; :func:`specjax.packed.quantize_activations` is the
        reference of the quantisation).
    """
    from specjax.packed import A8_FORMATS, FORMATS, row_bytes
    ensure_registered()
    m, k = x.shape
    n, r = data.shape[-2:]
    if (data.ndim == 3) != (layer is not None) or data.ndim not in (2, 3):
        raise ValueError(f"give a weight data [N, R], or a stack [L, N, R] with its layer; got "
                         f"data {data.shape} and layer {'given' if layer is not None else None}")
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    if isa != "auto" and isa not in ISAS:
        raise ValueError(f"isa must be auto or one of {', '.join(ISAS)}, got {isa!r}")
    level = 1 if portable else (0 if isa == "auto" else ISAS.index(isa) + 1)
    if act8 and fmt not in A8_FORMATS:
        raise ValueError(f"8-bit activations take {', '.join(A8_FORMATS)} weights, not {fmt}")
    if r != row_bytes(fmt, k):
        raise ValueError(f"{fmt} rows of {k} values take {row_bytes(fmt, k)} bytes, W has {r}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="expand_dims")
    return call(x.astype(jnp.float32), data, scale.astype(jnp.float32), index,
                fmt=np.int64(FORMATS[fmt][0]), k=np.int64(k), n=np.int64(n),
                num_layers=np.int64(data.shape[0] if data.ndim == 3 else 1),
                max_threads=np.int64(max_threads), isa=np.int64(level),
                act8=np.int64(bool(act8)))


__all__ = ["ISAS", "KernelBuildError", "available_isas", "code_path", "ensure_registered",
           "packed_matmul", "TARGET"]

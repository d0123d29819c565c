"""CPU kernels for a decode step, built on first use: matmuls over float (16-bit or float32) and packed
weights for a few rows (`cpu_matmul.cc`), and the KV cache write with the attention of a
few tokens over the cache (`cpu_attention.cc`).

XLA's CPU backend computes a bfloat16 dot through a float32 copy of the weight and cannot fuse
unpacking into a dot, so on a CPU a 16-bit or 4-bit decode step was slower than a float32 one. The
kernels read each weight once and accumulate in float32. They are compiled with the machine's C++
compiler (`$CXX`, else `g++`, `-O3 -march=native`) into the cache folder (`pyllama_jax.cache`) the
first time a CPU program needs them; without a compiler, or with `PYLLAMA_CPU_KERNELS=0`, everything
runs through XLA as before (with one warning for the first case).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pyllama_jax.cache import cache_dir

MAX_ROWS = 16  # more rows (a prefill) are compute-bound: XLA's dot is the better program there
FOLDER = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(FOLDER, name) for name in ("cpu_matmul.cc", "cpu_attention.cc"))
HEADERS = (os.path.join(FOLDER, "cpu_common.h"),)
TARGETS = ("pyllama_cpu_dense_matmul", "pyllama_cpu_packed_matmul", "pyllama_cpu_decode_attention")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build() -> str:
    """Path of the compiled library, compiled now unless the cache holds it (temp name, then rename)."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-mprefer-vector-width=512",
               "-I", jax.ffi.include_dir()]
    text = b"".join(open(path, "rb").read() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join(command).encode() + jax.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    folder = cache_dir("kernels")
    path = os.path.join(folder, f"cpu_kernels-{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([*command, *SOURCES, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} {' '.join(SOURCES)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.cache
def _registered() -> bool:
    """Build, load and register the kernels once per process; False (with a warning) if they cannot be."""
    try:
        library = ctypes.cdll.LoadLibrary(_build())
    except (OSError, RuntimeError) as e:
        warnings.warn(f"pyllama_jax: the CPU matmul kernels are not available, so 16-bit and quantized decoding "
                      f"runs through XLA (slower): {e}", RuntimeWarning, stacklevel=3)
        return False
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


def applies(x: jax.Array, w_dtype: jnp.dtype | None = None) -> bool:
    """Whether `x[..., K] @ W` runs here: a CPU program, at most MAX_ROWS rows, not partitioned over a
    mesh, kernels not switched off; float weights (16-bit or float32) if `w_dtype` is given, packed
    weights otherwise."""
    rows = int(np.prod(x.shape[:-1]))
    if w_dtype is not None and jnp.dtype(w_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return False
    return rows <= MAX_ROWS and _here()


def _here() -> bool:
    """A CPU program, not partitioned over a mesh, kernels built and not switched off."""
    if jax.default_backend() != "cpu" or os.environ.get("PYLLAMA_CPU_KERNELS") == "0":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return (mesh.empty or mesh.size == 1) and _registered()


def _require() -> None:
    if not _registered():
        raise RuntimeError("the CPU matmul kernels could not be built (see the warning above)")


def _rows(x: jax.Array, pad_to: int = 0) -> jax.Array:
    """`x[..., K]` as float32 rows `[R, K]`, zero rows appended up to a power of two (the kernels' row
    counts) and zero columns up to `pad_to`."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    r = rows.shape[0]
    return jnp.pad(rows, ((0, (1 << (r - 1).bit_length()) - r), (0, max(pad_to - rows.shape[1], 0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """Float32 `x[..., K] @ w[K, N]` (or `@ w.T` for `w[N, K]` when `transposed`), w bfloat16, float16
    or float32."""
    _require()
    n, rows = w.shape[0 if transposed else 1], _rows(x)
    y = jax.ffi.ffi_call(TARGETS[0], jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))(
        rows, w, transposed=transposed)
    return y[:int(np.prod(x.shape[:-1]))].reshape(*x.shape[:-1], n)


def _dense_fwd(x, w, transposed):
    return dense_matmul(x, w, transposed), (x, w)


def _dense_bwd(transposed, res, dy):
    x, w = res
    wf = w.astype(jnp.float32)
    dw = jnp.einsum("...k,...n->nk" if transposed else "...k,...n->kn", x.astype(jnp.float32), dy)
    return jnp.dot(dy, wf if transposed else wf.T).astype(x.dtype), dw.astype(w.dtype)


dense_matmul.defvjp(_dense_fwd, _dense_bwd)


def packed_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, qzeros: jax.Array, g_idx: jax.Array,
                  bits: int, groupsize: int) -> jax.Array:
    """Float32 `x[..., K] @ W` for GPTQ's packed `W` (see `pyllama_jax.model.packing`; not differentiable:
    `model.qlinear` gives it a backward pass)."""
    _require()
    k, n = g_idx.shape[0], scales.shape[1]
    per = 32 if bits == 3 else 32 // bits
    padded = scales.shape[0] * groupsize if groupsize > 0 else -(-k // per) * per
    rows = _rows(x, padded)  # whole groups of whole packing periods
    call = jax.ffi.ffi_call(TARGETS[1], jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))
    y = call(rows, qweight, scales, qzeros, g_idx, bits=np.int64(bits), group_size=np.int64(groupsize))
    return y[:int(np.prod(x.shape[:-1]))].reshape(*x.shape[:-1], n)


def attention_applies(q: jax.Array, cache: tuple[jax.Array, ...]) -> bool:
    """Whether `decode_attention` runs here: a CPU program, at most MAX_ROWS new tokens per row, a
    float cache (`(k, v)`, not int8's four arrays), not partitioned over a mesh, kernels not switched off."""
    return (q.shape[1] <= MAX_ROWS and len(cache) == 2
            and jnp.dtype(cache[0].dtype) in (jnp.float32, jnp.bfloat16, jnp.float16) and _here())


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: tuple[jax.Array, jax.Array],
                     positions: jax.Array, window: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Store the new keys and values `k`/`v` `[b, t, kv_heads, head_dim]` at `positions[b, t]` of the
    cache `(k, v)` `[b' >= b, slots, kv_heads, head_dim]` in place (positions outside the slots are
    dropped, as `kv_cache.write` drops them), then the float32 attention `[b, t, heads, head_dim]` of
    the queries `q` over the cache's first `window` slots: a query sees the slots up to its own
    position (Llama's mask with a cache). Returns it and the updated cache. Not differentiable."""
    _require()
    k_cache, v_cache = cache
    call = jax.ffi.ffi_call(TARGETS[2], (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                         jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                                         jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
                            input_output_aliases={3: 1, 4: 2})
    out, k_cache, v_cache = call(q.astype(jnp.float32), k.astype(k_cache.dtype), v.astype(v_cache.dtype),
                                 k_cache, v_cache, positions.astype(jnp.int32),
                                 scale=np.float32(q.shape[-1] ** -0.5), window=np.int64(window))
    return out, (k_cache, v_cache)

// Matmuls for a few rows (decode) on the CPU that read 16-bit or int-packed weights directly.
//
// XLA's CPU backend computes a 16-bit dot through a float32 copy of the weight and cannot fuse
// unpacking into a dot, so a bfloat16 or 4-bit decode step reads more bytes than a float32 one.
// These kernels stream each weight once, convert it in registers and accumulate in float32:
//   y[m, n] = sum_k x[m, k] * W[k, n]   (x: float32 [M, K], W: [K, N], y: float32 [M, N])
// W is a float array (f16/bf16/f32; for float32 the kernels' tiles stream the weights faster than
// XLA's dot), or GPTQ's packed layout (see quant/packing.py):
//   qweight int32 [K*bits/32, N], scales [G, N], qzeros int32 [G, N*bits/32] (zero - 1), g_idx [K].
// Columns are split into blocks handed out to XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace pyllama;

// Columns per tile for M rows (a packed tile's accumulators and partial sums, 2 x M x cols floats,
// take 32 KiB). For up to 4 rows, tiles are as wide as that and one 128-row group deep: they read
// longer runs of each weight row, which the prefetcher streams better (SmolLM2's 30 layers at one
// row: 4-bit 7.3 -> 6.1 ms, 8-bit 10.4 -> 7.3 ms, bf16 13-17 -> 11 ms against 512 x 256 tiles).
// At 8 rows and more, tiles of 512 x 256 were faster.
template <int M>
constexpr int tile_cols() { return M <= 1 ? 4096 : M <= 2 ? 2048 : M <= 4 ? 1024 : 512; }
template <int M>
constexpr int tile_rows() { return M <= 4 ? 128 : 256; }  // weight rows per tile: the tiles of one column
                                                         // range add up afterwards

// tile_cols<M>() columns, narrowed until there are two tiles per thread.
template <int M>
int64_t shared_cols(int64_t N, int64_t chunks, ffi::ThreadPool& pool) {
  int64_t cols = tile_cols<M>();
  while (cols > 64 && (N + cols - 1) / cols * chunks < 2 * pool.num_threads()) cols /= 2;
  return cols;
}
constexpr int64_t kSerialSums = 1 << 16;  // partial sums added on the calling thread up to this many

// Calls f with the row count as a compile-time constant: 1, 2, 4, 8 or 16 (the caller pads to one;
// cpu.py: MAX_ROWS).
template <typename F>
void by_rows(int64_t rows, F f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

inline bool valid_rows(int64_t rows) { return rows == 1 || rows == 2 || rows == 4 || rows == 8 || rows == 16; }

// Value `i` of a packed bit stream along a row of `stride`-spaced int32 words (GPTQ's layout).
inline uint32_t stream_value(const uint32_t* words, int64_t stride, int64_t i, int bits) {
  int64_t bit = i * bits, w = bit / 32, s = bit % 32;
  uint64_t lo = words[w * stride];
  if (s + bits > 32) lo |= uint64_t(words[(w + 1) * stride]) << 32;
  return uint32_t(lo >> s) & ((1u << bits) - 1);
}

// Runs tile(n0, nb, chunk, out) over every (column range, row chunk) of an [M, N] output. A tile
// writes its M x nb sums into `out` (y itself when there is one row chunk, else that chunk's
// partial sums, which are then added into y). Tiles keep each weight row's reads within a page.
template <typename Tile>
void tiled(ffi::ThreadPool& pool, int64_t M, int64_t N, int64_t cols, int64_t chunks, float* y, Tile tile) {
  const int64_t ranges = (N + cols - 1) / cols;
  std::vector<float> partial(chunks > 1 ? chunks * M * N : 0);
  parallel_for(pool, ranges * chunks, [&](int64_t i) {
    const int64_t n0 = i % ranges * cols, chunk = i / ranges;
    tile(n0, std::min(cols, N - n0), chunk, chunks > 1 ? partial.data() + chunk * M * N : y);
  });
  if (chunks == 1) return;
  const auto add = [&](int64_t r) {
    const int64_t n0 = r * cols, n1 = std::min(N, n0 + cols);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        float s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[(c * M + m) * N + n];
        y[m * N + n] = s;
      }
  };
  if (chunks * M * N <= kSerialSums) {  // a decode step's small layers: cheaper than waking the pool
    for (int64_t r = 0; r < ranges; ++r) add(r);
  } else {
    parallel_for(pool, ranges, add);
  }
}

// Weight rows [k0, k1) of W[K, N], four at a time, along columns [n0, n0 + nb).
template <int M, typename Load>
void dense_tile(const float* x, int64_t K, int64_t N, int64_t n0, int64_t nb, int64_t k0, int64_t k1, float* out,
                Load load) {
  float acc[M][tile_cols<M>()];
  for (int m = 0; m < M; ++m) std::fill(acc[m], acc[m] + nb, 0.f);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const int64_t r = k * N + n0;
    for (int64_t n = 0; n < nb; ++n) {
      const float w0 = load(r + n), w1 = load(r + N + n), w2 = load(r + 2 * N + n), w3 = load(r + 3 * N + n);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        acc[m][n] += xm[0] * w0 + xm[1] * w1 + xm[2] * w2 + xm[3] * w3;
      }
    }
  }
  for (; k < k1; ++k)
    for (int64_t n = 0; n < nb; ++n) {
      const float w0 = load(k * N + n0 + n);
      for (int m = 0; m < M; ++m) acc[m][n] += x[m * K + k] * w0;
    }
  for (int m = 0; m < M; ++m) std::memcpy(out + m * N + n0, acc[m], nb * sizeof(float));
}

// Outputs [n0, n0 + nb) of x @ W^T for W^T stored [N, K] (a tied head is the embedding [vocab, dim]):
// each output's weights are one contiguous row, read kLanes at a time into one vector per row of x.
// The vectors are the machine's width: GCC splits wider ones into scalar code (on an AVX2 CPU,
// 16-lane vectors made the SmolLM2 bf16 head 6x slower than 8-lane ones).
#ifdef __AVX512F__
#define PYLLAMA_LANES 16
#else
#define PYLLAMA_LANES 8
#endif
constexpr int kLanes = PYLLAMA_LANES;
typedef float f32xL __attribute__((vector_size(PYLLAMA_LANES * 4)));
typedef uint16_t u16xL __attribute__((vector_size(PYLLAMA_LANES * 2)));
typedef uint32_t u32xL __attribute__((vector_size(PYLLAMA_LANES * 4)));
typedef _Float16 f16xL __attribute__((vector_size(PYLLAMA_LANES * 2)));

// kLanes weights from p as float32: bfloat16 (`uint16_t`, BF16), float16 (`uint16_t`) or float32.
template <bool BF16>
inline f32xL load_lanes(const uint16_t* p) {
  if constexpr (BF16) {
    u16xL h;
    std::memcpy(&h, p, sizeof(h));
    const u32xL u = __builtin_convertvector(h, u32xL) << 16;
    f32xL f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    f16xL h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, f32xL);
  }
}

template <bool BF16>
inline f32xL load_lanes(const float* p) {
  f32xL f;
  std::memcpy(&f, p, sizeof(f));
  return f;
}

template <bool BF16>
inline float load_one(const uint16_t* p) { return BF16 ? bf16_to_f32(*p) : f16_to_f32(*p); }

template <bool BF16>
inline float load_one(const float* p) { return *p; }

template <int M, bool BF16, typename W>
void dense_tile_t(const float* x, int64_t K, int64_t N, int64_t n0, int64_t nb, float* out, const W* w) {
  for (int64_t n = n0; n < n0 + nb; ++n) {
    const W* row = w + n * K;
    f32xL acc[M] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const f32xL wv = load_lanes<BF16>(row + k);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        f32xL xv;
        std::memcpy(&xv, x + m * K + k, sizeof(xv));
        acc[m] += xv * wv;
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = 0;
      for (int l = 0; l < kLanes; ++l) s += acc[m][l];
      for (int64_t j = k; j < K; ++j) s += x[m * K + j] * load_one<BF16>(row + j);
      out[m * N + n] = s;
    }
  }
}

ffi::Error DenseMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                       ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[transposed ? 0 : 1];
  if (!valid_rows(M)) return ffi::Error::InvalidArgument("cpu_dense_matmul: rows must be 1, 2, 4, 8 or 16");
  const auto t = w.element_type();
  if (t != ffi::DataType::BF16 && t != ffi::DataType::F16 && t != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("cpu_dense_matmul: weights must be bfloat16, float16 or float32");
  const uint16_t* wp = static_cast<const uint16_t*>(w.untyped_data());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const auto bf16 = [wp](int64_t i) { return bf16_to_f32(wp[i]); };
  const auto f16 = [wp](int64_t i) { return f16_to_f32(wp[i]); };
  by_rows(M, [&](auto r) {
    constexpr int R = decltype(r)::value;
    const int64_t chunks = transposed ? 1 : (K + tile_rows<R>() - 1) / tile_rows<R>();
    const int64_t rows = ((K + chunks - 1) / chunks + 3) / 4 * 4;
    const int64_t cols = transposed ? 64 : shared_cols<R>(N, chunks, pool);
    tiled(pool, M, N, cols, chunks, yp, [&](int64_t n0, int64_t nb, int64_t c, float* out) {
      const int64_t k0 = c * rows, k1 = std::min(K, k0 + rows);
      if (transposed && t == ffi::DataType::F32)
        return dense_tile_t<R, false>(xp, K, N, n0, nb, out, static_cast<const float*>(w.untyped_data()));
      if (transposed && t == ffi::DataType::BF16) return dense_tile_t<R, true>(xp, K, N, n0, nb, out, wp);
      if (transposed) return dense_tile_t<R, false>(xp, K, N, n0, nb, out, wp);
      if (t == ffi::DataType::F32) {
        const float* wf = static_cast<const float*>(w.untyped_data());
        return dense_tile<R>(xp, K, N, n0, nb, k0, k1, out, [wf](int64_t i) { return wf[i]; });
      }
      if (t == ffi::DataType::BF16) return dense_tile<R>(xp, K, N, n0, nb, k0, k1, out, bf16);
      dense_tile<R>(xp, K, N, n0, nb, k0, k1, out, f16);
    });
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(pyllama_cpu_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

struct Packed {
  const uint32_t* qweight;
  const void* scales;
  ffi::DataType scale_type;
  const uint32_t* qzeros;
  const int32_t* g_idx;
  int64_t K, N, groups, group_size, zero_words;
  int64_t stored_periods;  // whole packing periods in qweight
};

// Groups [g0, g1) along columns [n0, n0 + nb) of a packed weight whose groups are contiguous runs of
// group_size rows (g_idx[k] == k / group_size), group_size a multiple of the packing period: each
// weight is unpacked once, summed per group, then scaled: y += s * (sum_k x q - zero * sum_k x).
template <int BITS, int M>
void packed_tile(const float* x, int64_t Kx, const Packed& p, int64_t n0, int64_t nb, int64_t g0, int64_t g1,
                 float* out) {
  constexpr int PER = BITS == 3 ? 32 : 32 / BITS, WORDS = BITS == 3 ? 3 : 1;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  constexpr int COLS = tile_cols<M>();
  float acc[M][COLS], part[M][COLS];
  for (int m = 0; m < M; ++m) std::fill(acc[m], acc[m] + nb, 0.f);
  const int64_t N = p.N, periods = p.group_size / PER;
  for (int64_t g = g0; g < g1; ++g) {
    float xs[M] = {};
    for (int m = 0; m < M; ++m) std::fill(part[m], part[m] + nb, 0.f);
    for (int64_t q = 0; q < std::min(periods, p.stored_periods - g * periods); ++q) {
      const int64_t k0 = (g * periods + q) * PER;
      const uint32_t* __restrict words = p.qweight + (g * periods + q) * WORDS * N + n0;
      // A value that does not straddle words is read in place, as q * 2^shift (exact in float32),
      // against x scaled by 2^-shift: one AND and one conversion per weight, no shift.
      float xv[M][PER];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < PER; ++j) {
          const int shift = j * BITS % 32;
          const float xj = x[m * Kx + k0 + j];
          xs[m] += xj;
          xv[m][j] = shift + BITS > 32 ? xj : xj * (1.0f / float(1u << shift));
        }
      for (int64_t n = 0; n < nb; ++n) {
        uint32_t w[WORDS];
#pragma GCC unroll 3
        for (int i = 0; i < WORDS; ++i) w[i] = words[i * N + n];
        float s[M] = {};
#pragma GCC unroll 32
        for (int j = 0; j < PER; ++j) {
          const int word = j * BITS / 32, shift = j * BITS % 32;
          const float v = shift + BITS > 32 ? float(((w[word] >> shift) | (w[word + 1] << (32 - shift))) & MASK)
                                            : float(w[word] & (MASK << shift));
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) s[m] += xv[m][j] * v;
        }
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) part[m][n] += s[m];
      }
    }
    float scale[COLS], zero[COLS + PER];
    to_f32_row(p.scales, p.scale_type, g * N + n0, nb, scale);
    const int64_t w0 = n0 / PER * WORDS;  // n0: a multiple of PER
    const uint32_t* zrow = p.qzeros + g * p.zero_words;
    const auto zword = [&](int64_t i) { return w0 + i < p.zero_words ? zrow[w0 + i] : 0u; };
    for (int64_t i = 0; i * PER < nb; ++i)
#pragma GCC unroll 32
      for (int j = 0; j < PER; ++j) {
        const int word = j * BITS / 32, shift = j * BITS % 32;
        uint32_t u = zword(i * WORDS + word) >> shift;
        if (shift + BITS > 32) u |= zword(i * WORDS + word + 1) << (32 - shift);
        zero[i * PER + j] = float((u + 1) & MASK);  // stored zero - 1
      }
    for (int m = 0; m < M; ++m)
      for (int64_t n = 0; n < nb; ++n) acc[m][n] += scale[n] * (part[m][n] - zero[n] * xs[m]);
  }
  for (int m = 0; m < M; ++m) std::memcpy(out + m * N + n0, acc[m], nb * sizeof(float));
}

// Any g_idx (act-order), any group size: per input row, its group's scale and zero.
void packed_tile_any(const float* x, int64_t M, int64_t Kx, int bits, const Packed& p, int64_t n0, int64_t nb,
                     float* out) {
  const uint32_t mask = (1u << bits) - 1;
  std::vector<float> acc(M * nb);
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t g = p.g_idx[k];
    const uint32_t* zrow = p.qzeros + g * p.zero_words;
    for (int64_t n = 0; n < nb; ++n) {
      const float q = float(stream_value(p.qweight + n0 + n, p.N, k, bits));
      const float z = float((stream_value(zrow, 1, n0 + n, bits) + 1) & mask);
      const float wv = to_f32(p.scales, p.scale_type, g * p.N + n0 + n) * (q - z);
      for (int64_t m = 0; m < M; ++m) acc[m * nb + n] += x[m * Kx + k] * wv;
    }
  }
  for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * p.N + n0, acc.data() + m * nb, nb * sizeof(float));
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> qweight,
                        ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> qzeros, ffi::Buffer<ffi::S32> g_idx,
                        ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size) {
  const int64_t M = x.dimensions()[0], Kx = x.dimensions()[1];
  Packed p{reinterpret_cast<const uint32_t*>(qweight.typed_data()), scales.untyped_data(), scales.element_type(),
           reinterpret_cast<const uint32_t*>(qzeros.typed_data()), g_idx.typed_data(), g_idx.dimensions()[0],
           scales.dimensions()[1], scales.dimensions()[0], group_size, qzeros.dimensions()[1],
           qweight.dimensions()[0] / (bits == 3 ? 3 : 1)};
  if (!valid_rows(M)) return ffi::Error::InvalidArgument("cpu_packed_matmul: rows must be 1, 2, 4, 8 or 16");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    return ffi::Error::InvalidArgument("cpu_packed_matmul: bits must be 2, 3, 4 or 8");
  const int64_t per = bits == 3 ? 32 : 32 / bits;
  if (p.group_size <= 0) p.group_size = Kx;  // one group per column; x is padded to whole periods
  // The fast path reads whole periods of whole groups; x is zero-padded to them by the caller, and
  // the periods past the last stored word (a last, partial group) are skipped below.
  bool contiguous = p.group_size % per == 0 && p.groups * p.group_size == Kx && Kx >= p.K &&
                    p.stored_periods * per >= p.K;
  for (int64_t k = 0; contiguous && k < p.K; ++k) contiguous = p.g_idx[k] == k / p.group_size;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  if (!contiguous) {
    tiled(pool, M, p.N, 64, 1, yp, [&](int64_t n0, int64_t nb, int64_t, float* out) {
      packed_tile_any(xp, M, Kx, int(bits), p, n0, nb, out);
    });
    return ffi::Error::Success();
  }
  by_rows(M, [&](auto r) {
    constexpr int R = decltype(r)::value;
    const int64_t per_chunk = std::max<int64_t>(1, tile_rows<R>() / p.group_size);
    const int64_t chunks = (p.groups + per_chunk - 1) / per_chunk;
    tiled(pool, M, p.N, shared_cols<R>(p.N, chunks, pool), chunks, yp, [&](int64_t n0, int64_t nb, int64_t c, float* out) {
      const int64_t g0 = c * per_chunk, g1 = std::min(p.groups, g0 + per_chunk);
      switch (bits) {
        case 2: return packed_tile<2, R>(xp, Kx, p, n0, nb, g0, g1, out);
        case 3: return packed_tile<3, R>(xp, Kx, p, n0, nb, g0, g1, out);
        case 4: return packed_tile<4, R>(xp, Kx, p, n0, nb, g0, g1, out);
        default: return packed_tile<8, R>(xp, Kx, p, n0, nb, g0, g1, out);
      }
    });
  });
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(pyllama_cpu_packed_matmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"));

}  // namespace

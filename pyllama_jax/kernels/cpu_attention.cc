// Attention of a few new tokens (decode) over a KV cache on the CPU, reading the cache in place.
//
// XLA's CPU backend computes GQA attention over a cache stored [batch, slots, kv_heads, head_dim]
// as two batched dots with copies of the keys and values transposed for them, and a softmax of
// several passes: at batch 8 and 256 slots, 0.7 ms a layer for 1.5 MiB of cache. This kernel reads
// each key and value row once:
//   out[b, t, h] = sum_s p[s] v[b, s, h / G],  p = softmax_s(q[b, t, h] . k[b, s, h / G] * scale)
// over the slots s <= positions[b, t] (a query sees the cache up to its own position; one that sees
// none attends to every slot equally, as a softmax of equal masked scores does). q: float32
// [B, T, H, D]; k, v: float32, bfloat16 or float16 [B, S, KV, D]; out: float32 [B, T, H, D].
// Each (batch row, kv head) is one task on XLA's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace pyllama;

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("cpu_decode_attention: q, k and v must be [batch, len, heads, head_dim]");
  const int64_t B = qd[0], T = qd[1], H = qd[2], D = qd[3], S = kd[1], KV = kd[2];
  if (kd[0] != B || kd[3] != D || H % KV != 0 || k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("cpu_decode_attention: q, k and v do not agree in batch, heads or head_dim");
  const auto t = k.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16 && t != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("cpu_decode_attention: the cache must be float32, bfloat16 or float16");
  const int64_t G = H / KV, Q = T * G;  // queries that share one kv head
  const float* qp = q.typed_data();
  const int32_t* pos = positions.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, B * KV, [&](int64_t task) {
    const int64_t b = task / KV, kv = task % KV;
    std::vector<float> scores(Q * S), row(D), acc(Q * D, 0.f);
    std::vector<int64_t> seen(Q);
    int64_t longest = 0;
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t p = pos[b * T + i / G];
      seen[i] = p < 0 ? 0 : std::min<int64_t>(p + 1, S);
      longest = std::max(longest, seen[i] ? seen[i] : S);
    }
    const auto query = [&](int64_t i) { return qp + ((b * T + i / G) * H + kv * G + i % G) * D; };
    for (int64_t s = 0; s < longest; ++s) {  // scores: each key row read once for every query
      to_f32_row(k.untyped_data(), t, ((b * S + s) * KV + kv) * D, D, row.data());
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = query(i);
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * row[d];
        scores[i * S + s] = dot * scale;
      }
    }
    for (int64_t i = 0; i < Q; ++i) {  // softmax over the slots each query sees
      float* si = scores.data() + i * S;
      const int64_t n = seen[i] ? seen[i] : S;
      if (!seen[i]) std::fill(si, si + n, 0.f);
      const float top = *std::max_element(si, si + n);
      float sum = 0.f;
      for (int64_t s = 0; s < n; ++s) sum += (si[s] = std::exp(si[s] - top));
      for (int64_t s = 0; s < n; ++s) si[s] /= sum;
      std::fill(si + n, si + S, 0.f);
    }
    for (int64_t s = 0; s < longest; ++s) {  // outputs: each value row read once for every query
      to_f32_row(v.untyped_data(), t, ((b * S + s) * KV + kv) * D, D, row.data());
      for (int64_t i = 0; i < Q; ++i) {
        const float p = scores[i * S + s];
        float* ai = acc.data() + i * D;
        for (int64_t d = 0; d < D; ++d) ai[d] += p * row[d];
      }
    }
    for (int64_t i = 0; i < Q; ++i)
      std::copy(acc.data() + i * D, acc.data() + (i + 1) * D, op + ((b * T + i / G) * H + kv * G + i % G) * D);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(pyllama_cpu_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

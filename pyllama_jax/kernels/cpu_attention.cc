// A decode step's KV cache write and attention on the CPU, in one call that updates the cache in place.
//
// XLA's CPU backend computes GQA attention over a cache stored [batch, slots, kv_heads, head_dim]
// as two batched dots with copies of the keys and values transposed for them, and a softmax of
// several passes (at batch 8 and 256 slots, 0.7 ms a layer for 1.5 MiB of cache); and it writes
// each row's new keys and values through a slice, a select and an update of their own (a dozen
// small programs a layer at batch 8, about 10 us each). This kernel first stores
//   cache[b, positions[b, t]] = new[b, t]   (positions outside [0, slots) are dropped)
// then reads each key and value row once:
//   out[b, t, h] = sum_s p[s] v[b, s, h / G],  p = softmax_s(q[b, t, h] . k[b, s, h / G] * scale)
// over the slots s <= positions[b, t] of the first `window` (a query sees the cache up to its own
// position; one that sees none attends to every slot equally, as a softmax of equal masked scores
// does). q: float32 [B, T, H, D]; new_k, new_v: [B, T, KV, D] in the cache's dtype; k, v: the
// cache, float32, bfloat16 or float16 [B', S, KV, D] with B' >= B rows (the rows past B are left as
// they are), returned updated (XLA aliases them to the results); out: float32 [B, T, H, D].
// Each (batch row, kv head) is one task on XLA's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace pyllama;

// k_in and v_in are the cache's arrays as they come in: XLA aliases them to the results k and v,
// through which the kernel reads and writes them.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer new_k,
                           ffi::AnyBuffer new_v, ffi::AnyBuffer /*k_in*/, ffi::AnyBuffer /*v_in*/,
                           ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                           ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v, float scale,
                           int64_t window) {
  const auto qd = q.dimensions(), kd = k->dimensions(), nd = new_k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || nd.size() != 4 || v->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("cpu_decode_attention: q, new keys and the cache must be 4-D");
  const int64_t B = qd[0], T = qd[1], H = qd[2], D = qd[3], S = kd[1], KV = kd[2];
  if (kd[0] < B || kd[3] != D || H % KV != 0 || nd[0] != B || nd[1] != T || nd[2] != KV || nd[3] != D ||
      window < 1 || window > S)
    return ffi::Error::InvalidArgument("cpu_decode_attention: q, new keys and the cache do not agree in shape");
  const auto t = k->element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16 && t != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("cpu_decode_attention: the cache must be float32, bfloat16 or float16");
  if (new_k.element_type() != t || new_v.element_type() != t || v->element_type() != t)
    return ffi::Error::InvalidArgument("cpu_decode_attention: new keys and values must have the cache's dtype");
  const int32_t* pos = positions.typed_data();
  const size_t row_bytes = KV * D * (t == ffi::DataType::F32 ? 4 : 2);
  for (int64_t b = 0; b < B; ++b)  // the write: one contiguous row of every kv head per token
    for (int64_t i = 0; i < T; ++i) {
      const int64_t p = pos[b * T + i];
      if (p < 0 || p >= S) continue;
      const size_t to = (b * S + p) * row_bytes, from = (b * T + i) * row_bytes;
      std::memcpy(static_cast<char*>(k->untyped_data()) + to, static_cast<const char*>(new_k.untyped_data()) + from, row_bytes);
      std::memcpy(static_cast<char*>(v->untyped_data()) + to, static_cast<const char*>(new_v.untyped_data()) + from, row_bytes);
    }
  const void* kp = k->untyped_data();
  const void* vp = v->untyped_data();
  const int64_t G = H / KV, Q = T * G;  // queries that share one kv head
  const float* qp = q.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, B * KV, [&](int64_t task) {
    const int64_t b = task / KV, kv = task % KV;
    std::vector<float> scores(Q * window), row(D), acc(Q * D, 0.f);
    std::vector<int64_t> seen(Q);
    int64_t longest = 0;
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t p = pos[b * T + i / G];
      seen[i] = p < 0 ? 0 : std::min<int64_t>(p + 1, window);
      longest = std::max(longest, seen[i] ? seen[i] : window);
    }
    const auto query = [&](int64_t i) { return qp + ((b * T + i / G) * H + kv * G + i % G) * D; };
    for (int64_t s = 0; s < longest; ++s) {  // scores: each key row read once for every query
      to_f32_row(kp, t, ((b * S + s) * KV + kv) * D, D, row.data());
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = query(i);
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * row[d];
        scores[i * window + s] = dot * scale;
      }
    }
    for (int64_t i = 0; i < Q; ++i) {  // softmax over the slots each query sees
      float* si = scores.data() + i * window;
      const int64_t n = seen[i] ? seen[i] : window;
      if (!seen[i]) std::fill(si, si + n, 0.f);
      const float top = *std::max_element(si, si + n);
      float sum = 0.f;
      for (int64_t s = 0; s < n; ++s) sum += (si[s] = std::exp(si[s] - top));
      for (int64_t s = 0; s < n; ++s) si[s] /= sum;
      std::fill(si + n, si + window, 0.f);
    }
    for (int64_t s = 0; s < longest; ++s) {  // outputs: each value row read once for every query
      to_f32_row(vp, t, ((b * S + s) * KV + kv) * D, D, row.data());
      for (int64_t i = 0; i < Q; ++i) {
        const float p = scores[i * window + s];
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

// Helpers shared by the CPU kernels (cpu_matmul.cc, cpu_attention.cc): 16-bit floats read as
// float32, and a parallel loop over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace pyllama {

namespace ffi = xla::ffi;

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) { return static_cast<float>(*reinterpret_cast<const _Float16*>(&h)); }

inline float to_f32(const void* p, ffi::DataType t, int64_t i) {
  switch (t) {
    case ffi::DataType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case ffi::DataType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Values [i, i + n) of a float32/float16/bfloat16 array as float32.
inline void to_f32_row(const void* p, ffi::DataType t, int64_t i, int64_t n, float* out) {
  const uint16_t* h = static_cast<const uint16_t*>(p) + i;
  if (t == ffi::DataType::BF16)
    for (int64_t k = 0; k < n; ++k) out[k] = bf16_to_f32(h[k]);
  else if (t == ffi::DataType::F16)
    for (int64_t k = 0; k < n; ++k) out[k] = f16_to_f32(h[k]);
  else
    std::memcpy(out, static_cast<const float*>(p) + i, n * sizeof(float));
}

// Runs work(i) for i in [0, total) on the calling thread and the pool's. The caller drains the
// items itself and waits only for items a pool thread has started, so it never waits on a task
// that the pool has not scheduled yet (no deadlock when the caller is a pool thread).
struct Job {
  std::function<void(int64_t)> work;
  int64_t total;
  std::atomic<int64_t> next{0}, done{0};
  void drain() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      work(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void parallel_for(ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> work) {
  auto job = std::make_shared<Job>();
  job->work = std::move(work);
  job->total = total;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->drain(); });
  job->drain();
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace pyllama

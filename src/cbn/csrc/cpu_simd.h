// A kernel's inner loops compiled for the CPU that runs them.
//
// The extension is built for the baseline of its target (x86-64: SSE2), so that one build runs on
// every CPU of that architecture; ATen's own kernels choose AVX2 or AVX-512 at run time. The fused
// loops here are float sums and products over rows that stay in cache at batch 1-2, where the
// vector width, not memory, bounds them: simd::run(loop, args...) calls loop(args...) through a
// copy compiled with AVX2 and FMA (every call inside it inlined into that copy) when the CPU has
// both, else the baseline copy. Both copies compute the same sums in the same order; FMA rounds a
// product and a sum once instead of twice, so the two agree to float rounding, not bit for bit
// (within one process every call takes the same copy). CBN_KERNELS_SIMD=baseline in the
// environment keeps the baseline copy. simd::parallel_for(n, grain, loop) splits [0, n) over ATen's
// threads and runs loop(begin, end) on each part through simd::run.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace cbn {
namespace simd {

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__AVX2__)

inline bool use_avx2() {
  static const bool chosen = [] {
    const char* setting = std::getenv("CBN_KERNELS_SIMD");
    if (setting != nullptr && std::strcmp(setting, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return chosen;
}

template <typename Loop, typename... Args>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Loop& loop, Args... args) {
  loop(args...);
}

template <typename Loop, typename... Args>
inline void run(const Loop& loop, Args... args) {
  if (use_avx2()) {
    run_avx2(loop, args...);
  } else {
    loop(args...);
  }
}

inline const char* instruction_set() { return use_avx2() ? "avx2" : "baseline"; }

#else

template <typename Loop, typename... Args>
inline void run(const Loop& loop, Args... args) {
  loop(args...);
}

inline const char* instruction_set() { return "build"; }

#endif

template <typename Loop>
inline void parallel_for(int64_t size, int64_t grain, const Loop& loop) {
  at::parallel_for(0, size, grain, [&](int64_t begin, int64_t end) { run(loop, begin, end); });
}

}  // namespace simd
}  // namespace cbn

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
//
// simd::dot(a, b, n) and simd::dot_with_shift(a, b, s, n) (sum a[j] (b[j] + s)) are the dot
// products of those loops: four independent 32-byte vectors of partial sums (one AVX register each
// in the AVX2 copy, two SSE registers in the baseline copy), because a sum kept in one or two
// registers waits on the latency of each addition and reads a window row at a fraction of the
// memory's bandwidth. The partial sums are folded in a fixed order: a product's result depends on
// its operands and n only (not on the call, the thread or the other products of a loop).
// simd::dots(a, b, n, count, out) gives dot(a[t], b, n) for count rows a[t], bit for bit, reading
// up to four rows side by side: one row after the other, dot products over rows that are not in
// cache wait on one memory stream at a time (resnet18's window, 3 entries: 12 GB/s one after the
// other, 15 GB/s side by side, where one thread reads 25 GB/s; benchmarks.window_passes).
// simd::dots_shared(a, count, b, b_stride, rows, n, out) gives the same dot products of up to
// kMostRows rows of b with the count rows a[t], each chunk of the a rows read once for all rows of
// b (a layer's shared mean patches against a block of weight rows).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// The most rows of b that simd::dots_shared takes in one call.
constexpr int64_t kMostRows = 16;

#if defined(__GNUC__) || defined(__clang__)

// Lanes<scalar_t>::type: a 32-byte vector of scalar_t (GCC and Clang vector extensions), with
// load and fold (the sum of its lanes, pairwise in a fixed order).
// (vector_size on a template-dependent type is ignored by GCC: one typedef per scalar type.)
template <typename scalar_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename scalar_t>
struct Lanes {
  using type = typename VectorOf<scalar_t>::type;
  static constexpr int width = sizeof(type) / sizeof(scalar_t);
  static_assert(width > 1, "a vector of several lanes");
  static inline type load(const scalar_t* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline scalar_t fold(const type& v) {
    scalar_t lanes[width];
    __builtin_memcpy(lanes, &v, sizeof(v));
    for (int half = width / 2; half > 0; half /= 2) {
      for (int k = 0; k < half; ++k) lanes[k] += lanes[k + half];
    }
    return lanes[0];
  }
};

namespace detail {

template <bool kShifted, typename scalar_t>
inline scalar_t lane_dot(const scalar_t* a, const scalar_t* b, scalar_t shift, int64_t n) {
  using L = Lanes<scalar_t>;
  using V = typename L::type;
  constexpr int W = L::width;
  const V shifts = V{} + shift;
  const auto term = [&](int64_t j) -> V {
    return kShifted ? L::load(a + j) * (L::load(b + j) + shifts) : L::load(a + j) * L::load(b + j);
  };
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    s0 += term(j);
    s1 += term(j + W);
    s2 += term(j + 2 * W);
    s3 += term(j + 3 * W);
  }
  for (; j + W <= n; j += W) s0 += term(j);
  scalar_t tail = 0;
  for (; j < n; ++j) tail += a[j] * (kShifted ? b[j] + shift : b[j]);
  return L::fold((s0 + s1) + (s2 + s3)) + tail;
}

// lane_dot<false>(a[t], b, n) for t < kCount, the a[t] read side by side: the same partial sums,
// each fed the same products in the same order, folded the same way.
template <int kCount, typename scalar_t>
inline void lane_dots(const scalar_t* const* a, const scalar_t* b, int64_t n, scalar_t* out) {
  using L = Lanes<scalar_t>;
  using V = typename L::type;
  constexpr int W = L::width;
  V s[kCount][4] = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    for (int k = 0; k < 4; ++k) {  // (one vector of b live at a time: the sums stay in registers)
      const V bk = L::load(b + j + k * W);
      for (int t = 0; t < kCount; ++t) s[t][k] += L::load(a[t] + j + k * W) * bk;
    }
  }
  const int64_t vectors_end = j;
  for (int t = 0; t < kCount; ++t) {
    int64_t i = vectors_end;
    for (; i + W <= n; i += W) s[t][0] += L::load(a[t] + i) * L::load(b + i);
    scalar_t tail = 0;
    for (; i < n; ++i) tail += a[t][i] * b[i];
    out[t] = L::fold((s[t][0] + s[t][1]) + (s[t][2] + s[t][3])) + tail;
  }
}

// lane_dots<kCount>(a, b + r b_stride, n, out + r kCount) for every row r < rows (rows <= kMostRows),
// bit for bit: the same partial sums fed the same products in the same order, only the rows of b
// taken in turn over chunks of kChunk values of the shared a[t], so that a chunk of the a rows
// stays in the L1 cache for every row of b (the rows of b in the L2 cache: just read by another
// pass) instead of being read from the L2 cache once per row of b.
template <int kCount, typename scalar_t>
inline void lane_dots_shared(const scalar_t* const* a, const scalar_t* b, int64_t b_stride, int64_t rows, int64_t n,
                             scalar_t* out) {
  using L = Lanes<scalar_t>;
  using V = typename L::type;
  constexpr int W = L::width;
  constexpr int64_t kChunk = 128 * W;  // 4 KiB of each a row
  V sums[kMostRows][kCount][4] = {};
  const int64_t vectors_end = n / (4 * W) * (4 * W);
  for (int64_t chunk = 0; chunk < vectors_end; chunk += kChunk) {
    const int64_t chunk_end = chunk + kChunk < vectors_end ? chunk + kChunk : vectors_end;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = b + r * b_stride;
      V s[kCount][4];
      __builtin_memcpy(s, sums[r], sizeof(s));
      for (int64_t j = chunk; j < chunk_end; j += 4 * W) {
        for (int k = 0; k < 4; ++k) {
          const V bk = L::load(row + j + k * W);
          for (int t = 0; t < kCount; ++t) s[t][k] += L::load(a[t] + j + k * W) * bk;
        }
      }
      __builtin_memcpy(sums[r], s, sizeof(s));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = b + r * b_stride;
    for (int t = 0; t < kCount; ++t) {
      V* s = sums[r][t];
      int64_t i = vectors_end;
      for (; i + W <= n; i += W) s[0] += L::load(a[t] + i) * L::load(row + i);
      scalar_t tail = 0;
      for (; i < n; ++i) tail += a[t][i] * row[i];
      out[r * kCount + t] = L::fold((s[0] + s[1]) + (s[2] + s[3])) + tail;
    }
  }
}

// out[t] = sum over images i and j < n of a[i a_step + j] b[i b_step + j + offsets[t]], t < kTaps
// (n a multiple of the vector width): the sums of one weight-gradient row of a stride-1
// convolution, a the output row, b the padded input plane, one offset per kernel tap. One vector
// of a live at a time against kTaps partial sums (kTaps <= 9: the sums and a stay in registers);
// eight sums are folded at once by transposing lanes, as a row of a 7x7 plane has only a few
// vectors and one fold per sum would cost as much as its products.
template <int kTaps>
inline void lane_shifted_dots(const float* a, const float* b, const int64_t* offsets, int64_t n, int64_t images,
                              int64_t a_step, int64_t b_step, float* out) {
  using L = Lanes<float>;
  using V = L::type;
  constexpr int W = L::width;
  V s[kTaps] = {};
  for (int64_t i = 0; i < images; ++i) {
    const float* ai = a + i * a_step;
    const float* bi = b + i * b_step;
    for (int64_t j = 0; j < n; j += W) {
      const V aj = L::load(ai + j);
      for (int t = 0; t < kTaps; ++t) s[t] += aj * L::load(bi + j + offsets[t]);
    }
  }
  int t = 0;
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  for (; t + 8 <= kTaps; t += 8) {
    const auto pairs = [](const V& x, const V& y) {
      return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    };
    const auto quads = [](const V& x, const V& y) {
      return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    };
    const V low = quads(pairs(s[t], s[t + 1]), pairs(s[t + 2], s[t + 3]));
    const V high = quads(pairs(s[t + 4], s[t + 5]), pairs(s[t + 6], s[t + 7]));
    const V sums = __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
    __builtin_memcpy(out + t, &sums, sizeof(sums));
  }
#endif
  for (; t < kTaps; ++t) out[t] = L::fold(s[t]);
}

// out[t * 8 + l] = sum over images i, rows h < height, columns w < width of
// a[i a_image + h width + w] b[i b_image + h b_row + w step + offsets[t] + l], l < 8, t < kTaps: eight
// weight-gradient values of adjacent input channels at once (b in channels-last order, `step`
// values per position), one broadcast value of a per position, no fold.
template <int kTaps>
inline void lane_channel_taps(const float* a, const float* b, const int64_t* offsets, int64_t images, int64_t height,
                              int64_t width, int64_t a_image, int64_t b_image, int64_t b_row, int64_t step,
                              float* out) {
  using L = Lanes<float>;
  using V = L::type;
  V s[kTaps] = {};
  for (int64_t i = 0; i < images; ++i) {
    for (int64_t h = 0; h < height; ++h) {
      const float* ah = a + i * a_image + h * width;
      const float* bh = b + i * b_image + h * b_row;
      for (int64_t w = 0; w < width; ++w) {
        const float value = ah[w];
        const V aw = {value, value, value, value, value, value, value, value};
        const float* bw = bh + w * step;
        for (int t = 0; t < kTaps; ++t) s[t] += aw * L::load(bw + offsets[t]);
      }
    }
  }
  __builtin_memcpy(out, s, sizeof(s));
}

}  // namespace detail

#else

namespace detail {

template <bool kShifted, typename scalar_t>
inline scalar_t lane_dot(const scalar_t* a, const scalar_t* b, scalar_t shift, int64_t n) {
  constexpr int kLanes = 16;
  scalar_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += a[j + k] * (kShifted ? b[j + k] + shift : b[j + k]);
  }
  scalar_t tail = 0;
  for (; j < n; ++j) tail += a[j] * (kShifted ? b[j] + shift : b[j]);
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int k = 0; k < half; ++k) lanes[k] += lanes[k + half];
  }
  return lanes[0] + tail;
}

template <int kCount, typename scalar_t>
inline void lane_dots(const scalar_t* const* a, const scalar_t* b, int64_t n, scalar_t* out) {
  for (int t = 0; t < kCount; ++t) out[t] = lane_dot<false>(a[t], b, scalar_t(0), n);
}

template <int kCount, typename scalar_t>
inline void lane_dots_shared(const scalar_t* const* a, const scalar_t* b, int64_t b_stride, int64_t rows, int64_t n,
                             scalar_t* out) {
  for (int64_t r = 0; r < rows; ++r) lane_dots<kCount>(a, b + r * b_stride, n, out + r * kCount);
}

template <int kTaps>
inline void lane_shifted_dots(const float* a, const float* b, const int64_t* offsets, int64_t n, int64_t images,
                              int64_t a_step, int64_t b_step, float* out) {
  for (int t = 0; t < kTaps; ++t) {
    float total = 0;
    for (int64_t i = 0; i < images; ++i) total += lane_dot<false>(a + i * a_step, b + i * b_step + offsets[t], 0.0f, n);
    out[t] = total;
  }
}

template <int kTaps>
inline void lane_channel_taps(const float* a, const float* b, const int64_t* offsets, int64_t images, int64_t height,
                              int64_t width, int64_t a_image, int64_t b_image, int64_t b_row, int64_t step,
                              float* out) {
  for (int t = 0; t < kTaps; ++t) {
    for (int l = 0; l < 8; ++l) {
      float total = 0;
      for (int64_t i = 0; i < images; ++i) {
        for (int64_t h = 0; h < height; ++h) {
          for (int64_t w = 0; w < width; ++w) {
            total += a[i * a_image + h * width + w] * b[i * b_image + h * b_row + w * step + offsets[t] + l];
          }
        }
      }
      out[t * 8 + l] = total;
    }
  }
}

}  // namespace detail

#endif

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  return detail::lane_dot<false>(a, b, scalar_t(0), n);
}

// loop(first, std::integral_constant<int, N>{}) for each block of at most 4 of `count` rows, N its
// size and first its first row: the rows of a block are read side by side, their sums in registers.
template <typename Loop>
inline void in_row_blocks(int64_t count, const Loop& loop) {
  for (int64_t first = 0; first < count; first += 4) {
    switch (count - first < 4 ? count - first : 4) {
      case 4: loop(first, std::integral_constant<int, 4>{}); break;
      case 3: loop(first, std::integral_constant<int, 3>{}); break;
      case 2: loop(first, std::integral_constant<int, 2>{}); break;
      case 1: loop(first, std::integral_constant<int, 1>{}); break;
      default: break;
    }
  }
}

// out[t] = dot(a[t], b, n) for t < count, bit for bit, up to four rows read side by side.
template <typename scalar_t>
inline void dots(const scalar_t* const* a, const scalar_t* b, int64_t n, int64_t count, scalar_t* out) {
  in_row_blocks(count, [&](int64_t first, auto width) {
    detail::lane_dots<decltype(width)::value>(a + first, b, n, out + first);
  });
}

// out[r count + t] = dot(a[t], b + r b_stride, n) for t < count and r < rows <= kMostRows, bit for
// bit: the dot products of many rows of b (a block of weight rows) with the same few rows a[t]
// (a layer's shared mean patches), each chunk of the a rows read once for all rows of b.
template <typename scalar_t>
inline void dots_shared(const scalar_t* const* a, int64_t count, const scalar_t* b, int64_t b_stride, int64_t rows,
                        int64_t n, scalar_t* out) {
  in_row_blocks(count, [&](int64_t first, auto width) {
    constexpr int kWidth = decltype(width)::value;
    scalar_t part[kMostRows * kWidth];
    detail::lane_dots_shared<kWidth>(a + first, b, b_stride, rows, n, part);
    for (int64_t r = 0; r < rows; ++r) {
      for (int u = 0; u < kWidth; ++u) out[r * count + first + u] = part[r * kWidth + u];
    }
  });
}

// loop(first, std::integral_constant<int, N>{}) for each block of at most 9 of `taps` kernel taps, N its
// size and first its first tap: the tap loops are compiled for each count (their sums in registers).
template <typename Loop>
inline void in_tap_blocks(int64_t taps, const Loop& loop) {
  for (int64_t first = 0; first < taps; first += 9) {
    switch (taps - first < 9 ? taps - first : 9) {
      case 9: loop(first, std::integral_constant<int, 9>{}); break;
      case 8: loop(first, std::integral_constant<int, 8>{}); break;
      case 7: loop(first, std::integral_constant<int, 7>{}); break;
      case 6: loop(first, std::integral_constant<int, 6>{}); break;
      case 5: loop(first, std::integral_constant<int, 5>{}); break;
      case 4: loop(first, std::integral_constant<int, 4>{}); break;
      case 3: loop(first, std::integral_constant<int, 3>{}); break;
      case 2: loop(first, std::integral_constant<int, 2>{}); break;
      case 1: loop(first, std::integral_constant<int, 1>{}); break;
      default: break;
    }
  }
}

// out[t] = sum_i sum_{j<n} a[i a_step + j] b[i b_step + j + offsets[t]] for t < taps: float rows, n a
// multiple of 8, every b index read within the caller's buffer (detail::lane_shifted_dots).
inline void shifted_dots(const float* a, const float* b, const int64_t* offsets, int64_t taps, int64_t n,
                         int64_t images, int64_t a_step, int64_t b_step, float* out) {
  in_tap_blocks(taps, [&](int64_t first, auto count) {
    detail::lane_shifted_dots<decltype(count)::value>(a, b, offsets + first, n, images, a_step, b_step, out + first);
  });
}

// detail::lane_channel_taps for any number of taps: out holds 8 values per tap.
inline void channel_taps(const float* a, const float* b, const int64_t* offsets, int64_t taps, int64_t images,
                         int64_t height, int64_t width, int64_t a_image, int64_t b_image, int64_t b_row, int64_t step,
                         float* out) {
  in_tap_blocks(taps, [&](int64_t first, auto count) {
    detail::lane_channel_taps<decltype(count)::value>(a, b, offsets + first, images, height, width, a_image, b_image,
                                                      b_row, step, out + 8 * first);
  });
}

template <typename scalar_t>
inline scalar_t dot_with_shift(const scalar_t* a, const scalar_t* b, scalar_t shift, int64_t n) {
  return detail::lane_dot<true>(a, b, shift, n);
}

template <typename Loop>
inline void parallel_for(int64_t size, int64_t grain, const Loop& loop) {
  at::parallel_for(0, size, grain, [&](int64_t begin, int64_t end) { run(loop, begin, end); });
}

}  // namespace simd
}  // namespace cbn

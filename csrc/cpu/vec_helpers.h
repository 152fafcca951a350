// Vector helpers shared by the CPU kernels (csrc/cpu/*.cpp): rows of fp32 / fp16 / bf16 moved as fp32 two
// vectors at a time, a dot product, and the fence after non-temporal stores.
//
// Every csrc/cpu/*.cpp is compiled once per instruction set, each build into its own module (setup.py), and
// Vectorized<float> is as wide as that instruction set. So everything here sits in an anonymous namespace:
// each translation unit gets its own copy, compiled with its own flags, and no symbol of one build can ever
// stand in for another's.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>

namespace ctxkern {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kStep = 2 * kVec;  // one Vectorized<T> of fp16/bf16 widens to two of fp32

// Outputs at least this large are written with non-temporal stores where their layout allows: they could not
// stay in the caches anyway, and such stores skip reading every line in before overwriting it.
constexpr int64_t kStreamBytes = 8 << 20;

// p[0, kStep) as two fp32 vectors.
template <typename T>
inline void load2(const T* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVec);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// p[0, kStep) = (a, b) rounded to T. With `stream`, non-temporal stores: p must be sizeof(Vec)-aligned, and the
// thread calls fence_streaming_stores before its parallel region ends. The portable build ignores `stream`.
template <typename T>
inline void store2(T* p, const Vec& a, const Vec& b, bool stream = false) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + kVec, b);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<T>(a, b));
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + kVec, b);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(a, b));
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kVec);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// One load of T as fp32 vectors: one Vec of float, two of a 16-bit type (its Vectorized<T> widens to two). Loops
// that step by kLanes<T> * kVec units keep a float call's live vectors half as many as two at a time would.
template <typename T>
constexpr int kLanes = std::is_same_v<T, float> ? 1 : 2;
template <typename T>
using Lanes = std::array<Vec, kLanes<T>>;

template <typename T>
inline Lanes<T> load_lanes(const T* p) {
  if constexpr (kLanes<T> == 1) {
    return {Vec::loadu(p)};
  } else {
    Lanes<T> v;
    load2(p, v[0], v[1]);
    return v;
  }
}

template <typename T>
inline void store_lanes(T* p, const Lanes<T>& v) {
  if constexpr (kLanes<T> == 1) {
    v[0].store(p);
  } else {
    store2(p, v[0], v[1]);
  }
}

inline void fence_streaming_stores(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // orders this thread's non-temporal stores before the parallel region ends
#endif
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc);
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

}  // namespace
}  // namespace ctxkern

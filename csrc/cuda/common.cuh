// Helpers shared by the ctxkern CUDA kernels: fp32 conversion of the storage types, vectorized loads and
// stores, warp / block sums, and the host-side dispatch of a DType onto template kernels. Torch-free, like
// every file in csrc/cuda except bindings.cpp.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace ctxkern {
namespace cuda {

constexpr int kWarpSize = 32;

// A compile-time int for host-side dispatch onto template kernels (std::integral_constant without <type_traits>).
template <int V>
struct IntConst {
  static constexpr int value = V;
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the storage type of dtype (float, __half or __nv_bfloat16) and returns its result.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      return f(TypeTag<float>{});
    case DType::F16:
      return f(TypeTag<__half>{});
    case DType::BF16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Whether p allows 16-byte vector accesses; nullptr (an absent operand) does.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// fp16 and bf16 are storage formats only: every value goes through fp32 before any arithmetic.
// Explicit intrinsics, because torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements moved by one memory instruction: the alignment lets nvcc emit a single
// sizeof(T) * VEC byte access (16 bytes for the vector paths), which is only legal at an address that is
// a multiple of it. Callers choose VEC > 1 only after checking pointers and strides on the host.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Loads p[0..VEC) as floats; p must be aligned to sizeof(T) * VEC.
template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pack.v[j]);
}

// Rounds in[0..VEC) to T and stores them at p; p must be aligned to sizeof(T) * VEC.
template <typename T, int VEC>
__device__ __forceinline__ void store_float(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Sum over the 32 lanes of a warp; all lanes must call it. The xor butterfly adds the same two partial
// sums on both partner lanes at every step, so every lane ends with a bitwise-identical total: a row
// statistic computed this way is the same number in every thread that later uses it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of THREADS threads; every thread gets the total, all threads must call it.
// scratch: THREADS / 32 floats of shared memory. The leading barrier lets the caller use the same
// scratch for back-to-back sums: nobody overwrites it until every thread has read the previous total.
// Every thread adds the per-warp sums in the same order, so all threads get the same bits.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(THREADS % kWarpSize == 0, "block_sum needs whole warps");
  constexpr int kWarps = THREADS / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Two sums at once for the price of one pair of barriers; same contract as block_sum.
template <int THREADS>
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* scratch) {
  static_assert(THREADS % kWarpSize == 0, "block_sum2 needs whole warps");
  constexpr int kWarps = THREADS / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    total.x += scratch[w].x;
    total.y += scratch[w].y;
  }
  return total;
}

}  // namespace cuda
}  // namespace ctxkern

// LSTM cell forward and backward (torch's gate order i, f, g, o; optional clamp of the cell to +-clip), fp32
// arithmetic for every storage dtype. The op is elementwise per cell unit and memory-bound: one pass, every
// operand read or written once, 16-byte accesses where the layout allows.
//
// Forward: each thread owns VEC consecutive units (columns j .. j+VEC) of one row and all four gates of each:
// it loads input_gates and hidden_gates at columns k*H + j (k = 0..3), bias and c, and writes h and c_new.
// Consecutive threads own consecutive column groups, so each of the eleven access streams is coalesced.
// Backward: each thread owns the same VEC units over a chunk of kBwdRows rows, recomputes the activations
// (nothing was saved), writes dgates and dc, and keeps the dbias column sums of its rows in registers; they go
// to one fp32 workspace row per chunk, which a second kernel sums over chunks in a fixed order: deterministic,
// no atomics. Both kernels use grid-stride loops, so any B * H fits the grid.
// The layer operators (csrc/lstm_layer_loop.h) call the same kernels on pre-activations: hidden_gates and bias
// null, the cell state updated in place (c_new == c, dc == dc_new: each thread reads its units before writing
// them, so those pointer pairs are not __restrict__), and the backward writing the forward's h again.
#include "lstm_cell.h"

#include "common.cuh"

namespace ctxkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBwdRows = 4;          // rows per backward thread: enough threads for B = 64, few partial rows
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float clamp_to(float x, float bound) { return fminf(fmaxf(x, -bound), bound); }

struct Activations {
  float i, f, g, o, c_raw, tanh_c;  // sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), unclamped cell, tanh(c_new)
};

__device__ __forceinline__ Activations activate(float pre_i, float pre_f, float pre_g, float pre_o, float c,
                                                float clip) {
  Activations a;
  a.i = sigmoid(pre_i);
  a.f = sigmoid(pre_f);
  a.g = tanhf(pre_g);
  a.o = sigmoid(pre_o);
  a.c_raw = a.f * c + a.i * a.g;
  a.tanh_c = tanhf(clamp_to(a.c_raw, clip));
  return a;
}

// Pre-activations of the four gates for the VEC units from column j of one row: pre[k][v] for gate k.
// hg_row and bias may be null (no term).
template <typename T, int VEC>
__device__ __forceinline__ void load_pre(const T* __restrict__ ig_row,  // (4H,)
                                         const T* __restrict__ hg_row,  // (4H,) or nullptr
                                         const T* __restrict__ bias,    // (4H,) or nullptr
                                         int64_t H, int64_t j, float (&pre)[4][VEC]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float a[VEC], b[VEC];
    load_float<T, VEC>(ig_row + k * H + j, a);
#pragma unroll
    for (int v = 0; v < VEC; ++v) pre[k][v] = a[v];
    if (hg_row != nullptr) {
      load_float<T, VEC>(hg_row + k * H + j, b);
#pragma unroll
      for (int v = 0; v < VEC; ++v) pre[k][v] += b[v];
    }
    if (bias != nullptr) {
      load_float<T, VEC>(bias + k * H + j, a);
#pragma unroll
      for (int v = 0; v < VEC; ++v) pre[k][v] += a[v];
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_fwd_kernel(const T* __restrict__ ig,    // (B, 4H), row stride ig_stride
                         int64_t ig_stride,
                         const T* __restrict__ hg,    // (B, 4H), row stride hg_stride
                         int64_t hg_stride,
                         const T* c,                  // (B, H), row stride c_stride
                         int64_t c_stride,
                         const T* __restrict__ bias,  // (4H,) or nullptr
                         T* __restrict__ h,           // (B, H) contiguous
                         T* c_new,                    // (B, H) contiguous, may be c itself
                         int64_t B, int64_t H, float clip) {
  const int64_t groups_per_row = H / VEC;
  const int64_t total = B * groups_per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = g / groups_per_row, j = (g % groups_per_row) * VEC;
    float pre[4][VEC], cv[VEC], h_out[VEC], c_out[VEC];
    load_pre<T, VEC>(ig + b * ig_stride, hg == nullptr ? nullptr : hg + b * hg_stride, bias, H, j, pre);
    load_float<T, VEC>(c + b * c_stride + j, cv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const Activations a = activate(pre[0][v], pre[1][v], pre[2][v], pre[3][v], cv[v], clip);
      h_out[v] = a.o * a.tanh_c;
      c_out[v] = clamp_to(a.c_raw, clip);
    }
    store_float<T, VEC>(h + b * H + j, h_out);
    store_float<T, VEC>(c_new + b * H + j, c_out);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_bwd_kernel(const T* __restrict__ dh,      // (B, H), row stride dh_stride
                         int64_t dh_stride,
                         const T* dc_new,               // (B, H), row stride dcn_stride
                         int64_t dcn_stride,
                         const T* __restrict__ ig,      // (B, 4H), row stride ig_stride
                         int64_t ig_stride,
                         const T* __restrict__ hg,      // (B, 4H), row stride hg_stride
                         int64_t hg_stride,
                         const T* __restrict__ c,       // (B, H), row stride c_stride
                         int64_t c_stride,
                         const T* __restrict__ bias,    // (4H,) or nullptr
                         T* __restrict__ dgates,        // (B, 4H) contiguous
                         T* dc,                         // (B, H) contiguous, may be dc_new itself
                         T* __restrict__ h,             // (B, H) contiguous: the forward's h again, or nullptr
                         float* __restrict__ partial,   // (ceil(B / kBwdRows), 4H), or nullptr without bias
                         int64_t B, int64_t H, float clip) {
  const int64_t groups_per_row = H / VEC;
  const int64_t chunks = (B + kBwdRows - 1) / kBwdRows;
  const int64_t total = chunks * groups_per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t chunk = g / groups_per_row, j = (g % groups_per_row) * VEC;
    float dbias_sum[4][VEC] = {};
    const int64_t row_end = min(B, (chunk + 1) * kBwdRows);
    for (int64_t b = chunk * kBwdRows; b < row_end; ++b) {
      float pre[4][VEC], cv[VEC], dhv[VEC], dcnv[VEC], dg[4][VEC], dcv[VEC], hv[VEC];
      load_pre<T, VEC>(ig + b * ig_stride, hg == nullptr ? nullptr : hg + b * hg_stride, bias, H, j, pre);
      load_float<T, VEC>(c + b * c_stride + j, cv);
      load_float<T, VEC>(dh + b * dh_stride + j, dhv);
      load_float<T, VEC>(dc_new + b * dcn_stride + j, dcnv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const Activations a = activate(pre[0][v], pre[1][v], pre[2][v], pre[3][v], cv[v], clip);
        const float dc_clamped = dcnv[v] + dhv[v] * a.o * (1.f - a.tanh_c * a.tanh_c);
        // torch.clamp's gradient passes where -clip <= c_raw <= clip, the bounds included.
        const float dc_raw = fabsf(a.c_raw) <= clip ? dc_clamped : 0.f;
        dg[0][v] = dc_raw * a.g * a.i * (1.f - a.i);
        dg[1][v] = dc_raw * cv[v] * a.f * (1.f - a.f);
        dg[2][v] = dc_raw * a.i * (1.f - a.g * a.g);
        dg[3][v] = dhv[v] * a.tanh_c * a.o * (1.f - a.o);
        dcv[v] = dc_raw * a.f;
        hv[v] = a.o * a.tanh_c;
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        store_float<T, VEC>(dgates + b * 4 * H + k * H + j, dg[k]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) dbias_sum[k][v] += dg[k][v];
      }
      store_float<T, VEC>(dc + b * H + j, dcv);
      if (h != nullptr) store_float<T, VEC>(h + b * H + j, hv);
    }
    if (partial != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) partial[chunk * 4 * H + k * H + j + v] = dbias_sum[k][v];
      }
    }
  }
}

// Each thread owns one of the 4H columns and sums its chunks' partials in chunk order; consecutive threads
// read consecutive columns, so each partial row is one coalesced sweep.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_dbias_kernel(const float* __restrict__ partial,  // (chunks, 4H)
                           T* __restrict__ dbias,              // (4H,)
                           int64_t chunks, int64_t width) {
  for (int64_t col = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; col < width;
       col += static_cast<int64_t>(gridDim.x) * kThreads) {
    float total = 0.f;
    for (int64_t ch = 0; ch < chunks; ++ch) total += partial[ch * width + col];
    dbias[col] = from_float<T>(total);
  }
}

unsigned grid_for(int64_t threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, (threads + kThreads - 1) / kThreads)));
}

// The 16-byte path needs whole vectors in H and in every row stride, and 16-byte aligned base pointers.
template <typename T>
bool can_vectorize(int64_t H, std::initializer_list<int64_t> strides, std::initializer_list<const void*> ptrs) {
  constexpr int64_t vec = 16 / sizeof(T);
  if (H % vec != 0) return false;
  for (int64_t s : strides) {
    if (s % vec != 0) return false;
  }
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// Runs launch(IntConst<VEC>) with VEC = 16 / sizeof(T) when `vector`, else VEC = 1.
template <typename T, typename Launch>
void with_vec(bool vector, Launch launch) {
  if (vector) {
    launch(IntConst<16 / sizeof(T)>{});
  } else {
    launch(IntConst<1>{});
  }
}

template <typename T>
void fwd(const void* ig, int64_t ig_stride, const void* hg, int64_t hg_stride, const void* c, int64_t c_stride,
         const void* bias, void* h, void* c_new, int64_t B, int64_t H, float clip, cudaStream_t stream) {
  const bool vector = can_vectorize<T>(H, {ig_stride, hg_stride, c_stride}, {ig, hg, c, bias, h, c_new});
  with_vec<T>(vector, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    lstm_cell_fwd_kernel<T, VEC><<<grid_for(B * H / VEC), kThreads, 0, stream>>>(
        static_cast<const T*>(ig), ig_stride, static_cast<const T*>(hg), hg_stride, static_cast<const T*>(c),
        c_stride, static_cast<const T*>(bias), static_cast<T*>(h), static_cast<T*>(c_new), B, H, clip);
  });
}

template <typename T>
void bwd(const void* dh, int64_t dh_stride, const void* dc_new, int64_t dcn_stride, const void* ig, int64_t ig_stride,
         const void* hg, int64_t hg_stride, const void* c, int64_t c_stride, const void* bias, void* dgates, void* dc,
         void* h, void* dbias, float* workspace, int64_t B, int64_t H, float clip, cudaStream_t stream) {
  const bool vector = can_vectorize<T>(H, {dh_stride, dcn_stride, ig_stride, hg_stride, c_stride},
                                       {dh, dc_new, ig, hg, c, bias, dgates, dc, h});
  const int64_t chunks = lstm_cell_bwd_workspace_rows(B);
  float* partial = dbias != nullptr ? workspace : nullptr;
  with_vec<T>(vector, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    lstm_cell_bwd_kernel<T, VEC><<<grid_for(chunks * H / VEC), kThreads, 0, stream>>>(
        static_cast<const T*>(dh), dh_stride, static_cast<const T*>(dc_new), dcn_stride, static_cast<const T*>(ig),
        ig_stride, static_cast<const T*>(hg), hg_stride, static_cast<const T*>(c), c_stride,
        static_cast<const T*>(bias), static_cast<T*>(dgates), static_cast<T*>(dc), static_cast<T*>(h), partial, B, H,
        clip);
  });
  if (partial != nullptr) {
    lstm_cell_dbias_kernel<T><<<grid_for(4 * H), kThreads, 0, stream>>>(partial, static_cast<T*>(dbias), chunks,
                                                                         4 * H);
  }
}

}  // namespace

int64_t lstm_cell_bwd_workspace_rows(int64_t B) { return (B + kBwdRows - 1) / kBwdRows; }

cudaError_t lstm_cell_fwd_launch(DType dtype, const void* input_gates, int64_t ig_stride, const void* hidden_gates,
                                 int64_t hg_stride, const void* c, int64_t c_stride, const void* bias, void* h,
                                 void* c_new, int64_t B, int64_t H, float clip, cudaStream_t stream) {
  if (B == 0 || H == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    fwd<typename decltype(tag)::type>(input_gates, ig_stride, hidden_gates, hg_stride, c, c_stride, bias, h, c_new, B,
                                      H, clip, stream);
    return cudaGetLastError();
  });
}

cudaError_t lstm_cell_bwd_launch(DType dtype, const void* dh, int64_t dh_stride, const void* dc_new,
                                 int64_t dc_new_stride, const void* input_gates, int64_t ig_stride,
                                 const void* hidden_gates, int64_t hg_stride, const void* c, int64_t c_stride,
                                 const void* bias, void* dgates, void* dc, void* h, void* dbias, float* workspace,
                                 int64_t B, int64_t H, float clip, cudaStream_t stream) {
  if (B == 0 || H == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    bwd<typename decltype(tag)::type>(dh, dh_stride, dc_new, dc_new_stride, input_gates, ig_stride, hidden_gates,
                                      hg_stride, c, c_stride, bias, dgates, dc, h, dbias, workspace, B, H, clip,
                                      stream);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace ctxkern

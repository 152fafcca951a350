// One LSTM layer and direction over packed rows on the CPU: lstm_layer_fwd (inference), lstm_layer_fwd_train
// and lstm_layer_bwd. The time loop is csrc/lstm_layer_loop.h's; this file supplies its cell policy, the
// fused cell kernels of lstm_cell_kernels.h run on one step's rows (fp32 / fp16 / bf16), a scalar float64
// cell so that float64 gradient tests exercise the same loop, and MKL's packed GEMM for the fixed weights.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "../lstm_layer_loop.h"
#include "lstm_cell_kernels.h"

namespace ctxkern {
namespace {

#define CTXKERN_DISPATCH_LSTM_LAYER_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

// The float64 cell, one unit at a time with the same templated math (activate, cell_backward) in double.
void forward_double(const at::Tensor& gates, const at::Tensor& hidden_gates, const at::Tensor& bias,
                    const at::Tensor& c, const at::Tensor& h, double clip) {
  const int64_t n = c.size(0), H = c.size(1), gs = gates.stride(0);
  const int64_t hgs = hidden_gates.defined() ? hidden_gates.stride(0) : 0;
  const double* g = gates.const_data_ptr<double>();
  const double* hg = hidden_gates.defined() ? hidden_gates.const_data_ptr<double>() : nullptr;
  const double* bp = bias.defined() ? bias.const_data_ptr<double>() : nullptr;
  double* cp = c.data_ptr<double>();
  double* hp = h.data_ptr<double>();
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      std::array<double, 4> pre;
      for (int k = 0; k < 4; ++k) {
        pre[k] = g[b * gs + k * H + j] + (hg ? hg[b * hgs + k * H + j] : 0.0) + (bp ? bp[k * H + j] : 0.0);
      }
      const Activations<double> a = activate(pre, cp[b * H + j], clip);
      hp[b * H + j] = a.o * a.tanh_c;
      cp[b * H + j] = clamp_to(a.c_raw, clip);
    }
  }
}

void backward_double(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& dh, const at::Tensor& dc,
                     const at::Tensor& dgates, const at::Tensor& h, double clip) {
  const int64_t n = dc.size(0), H = dc.size(1), gs = gates.stride(0), dhs = dh.stride(0);
  const double* g = gates.const_data_ptr<double>();
  const double* cp = c_prev.const_data_ptr<double>();
  const double* dhp = dh.const_data_ptr<double>();
  double* dcp = dc.data_ptr<double>();
  double* dgp = dgates.data_ptr<double>();
  double* hp = h.defined() ? h.data_ptr<double>() : nullptr;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      const std::array<double, 4> pre{g[b * gs + j], g[b * gs + H + j], g[b * gs + 2 * H + j], g[b * gs + 3 * H + j]};
      const double c = cp[b * H + j];
      const Activations<double> a = activate(pre, c, clip);
      std::array<double, 4> dg;
      double dc_prev;
      cell_backward(a, c, dhp[b * dhs + j], dcp[b * H + j], clip, dg, dc_prev);
      for (int k = 0; k < 4; ++k) dgp[b * 4 * H + k * H + j] = dg[k];
      dcp[b * H + j] = dc_prev;
      if (hp) hp[b * H + j] = a.o * a.tanh_c;
    }
  }
}

// MKL's packed GEMM, which torch's own MKL exports (libtorch_cpu): the fixed weight is packed once per call,
// and each step's product reads the packed copy instead of repacking the weight, a gain of up to ~20% at the
// recurrence's few rows (16 x 512 @ 512 x 2048). The packing is for the call's largest row count: MKL lays the
// packed copy out for the m it is given, and one packed for m = 1 made the products of 16 rows 1.46x slower
// (16 x 512 @ 512 x 2048: 258 against 177 us a step, two threads; 32 x 256 @ 256 x 1024: 1.28x). Weak
// references: without these symbols (a torch built without MKL) they are null and the products go through
// ATen. LP64 signatures (MKL_INT = int; the enums are ints).
extern "C" {
__attribute__((weak)) size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
__attribute__((weak)) void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                            const float* src, int ld, float* dest);
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int threads);  // returns the previous setting (0: global)
__attribute__((weak)) void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k,
                                               const float* a, int lda, const float* b, int ldb, float beta, float* c,
                                               int ldc);
}
// CBLAS_LAYOUT, CBLAS_TRANSPOSE, CBLAS_STORAGE and CBLAS_IDENTIFIER values.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

// A product smaller than this many multiply-adds runs on the calling thread alone: MKL's threads cost more than
// they save there (1 x 128 @ 128 x 512, the recurrence of a batch of one: MKL's GEMV spent more time in
// OpenMP's fork and join than in the product).
constexpr int64_t kThreadedMacs = int64_t{1} << 18;

// MKL on one thread for the scope when `single` (and MKL can be told), its previous setting restored after.
class OneMklThreadIf {
 public:
  explicit OneMklThreadIf(bool single) : set_(single && MKL_Set_Num_Threads_Local) {
    if (set_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~OneMklThreadIf() {
    if (set_) MKL_Set_Num_Threads_Local(previous_);
  }
  OneMklThreadIf(const OneMklThreadIf&) = delete;
  OneMklThreadIf& operator=(const OneMklThreadIf&) = delete;

 private:
  bool set_;
  int previous_ = 0;
};

// out (cols,) = a (k,) @ w (+ out when accumulating), w (k, cols) either row-major (sums of a[r] w[r, :]) or the
// transposed view of a row-major (cols, k) weight (a dot product per output); a fixed order per output, so the
// result is deterministic. Products of one row a step (a batch of one) run here: MKL would pack the weight for
// as long as 20 steps' products take at H = 128, then run a matrix-vector product on the packed copy anyway.
void one_row_product(const float* a, const at::Tensor& w, bool transposed, float* out, bool accumulate) {
  const int64_t k = w.size(0), cols = w.size(1);
  const float* wp = w.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(kVec, kThreadedMacs / std::max<int64_t>(1, k));  // outputs a task
  at::parallel_for(0, cols, grain, [&](int64_t c0, int64_t c1) {
    if (transposed) {
      int64_t c = c0;
      for (; c + 4 <= c1; c += 4) {  // four dot products at once: independent chains, each load of a shared
        std::array<Vec, 4> acc{Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
        int64_t j = 0;
        for (; j + kVec <= k; j += kVec) {
          const Vec av = Vec::loadu(a + j);
          for (int u = 0; u < 4; ++u) acc[u] = at::vec::fmadd(av, Vec::loadu(wp + (c + u) * k + j), acc[u]);
        }
        for (int u = 0; u < 4; ++u) {
          float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc[u]);
          for (int64_t t = j; t < k; ++t) sum += a[t] * wp[(c + u) * k + t];
          out[c + u] = (accumulate ? out[c + u] : 0.f) + sum;
        }
      }
      for (; c < c1; ++c) out[c] = (accumulate ? out[c] : 0.f) + dot(a, wp + c * k, k);
      return;
    }
    constexpr int64_t kBlock = 8;  // vectors of outputs summed in registers over all k rows
    int64_t c = c0;
    for (; c + kVec <= c1; c += kBlock * kVec) {
      const int64_t vectors = std::min<int64_t>(kBlock, (c1 - c) / kVec);
      std::array<Vec, kBlock> acc;
      for (int64_t u = 0; u < vectors; ++u) acc[u] = accumulate ? Vec::loadu(out + c + u * kVec) : Vec(0.f);
      for (int64_t r = 0; r < k; ++r) {
        const Vec ar(a[r]);
        const float* row = wp + r * cols + c;
        for (int64_t u = 0; u < vectors; ++u) acc[u] = at::vec::fmadd(ar, Vec::loadu(row + u * kVec), acc[u]);
      }
      for (int64_t u = 0; u < vectors; ++u) acc[u].store(out + c + u * kVec);
      if (vectors < kBlock) {
        c += vectors * kVec;
        break;
      }
    }
    for (; c < c1; ++c) {
      float sum = accumulate ? out[c] : 0.f;
      for (int64_t r = 0; r < k; ++r) sum += a[r] * wp[r * cols + c];
      out[c] = sum;
    }
  });
}

// The Product of csrc/lstm_layer_loop.h: MKL's packed GEMM for float32, ATen's otherwise. MKL packs w (k, cols)
// from either layout, row-major or the transposed view of a row-major (cols, k) weight, so no transposed copy
// of the weight is made first.
class CpuProduct {
 public:
  CpuProduct(const at::Tensor& w, int64_t rows) : k_(w.size(0)), cols_(w.size(1)) {
    const bool mkl = cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
    const bool row_major = w.stride(1) == 1 && w.stride(0) == cols_;
    const bool transposed = w.stride(0) == 1 && w.stride(1) == k_;
    if (rows == 1 && w.scalar_type() == at::kFloat && (row_major || transposed)) {
      one_row_ = w;
      transposed_ = transposed && !row_major;
      return;
    }
    if (!mkl || w.scalar_type() != at::kFloat || !(row_major || transposed) || k_ == 0 || cols_ == 0 ||
        rows == 0 || k_ > INT32_MAX || cols_ > INT32_MAX || rows > INT32_MAX) {
      aten_.emplace(w, rows);
      return;
    }
    const int m = static_cast<int>(rows);
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, m, cols_, k_);
    packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, w.options());
    cblas_sgemm_pack(kRowMajor, kBMatrix, row_major ? kNoTrans : kTrans, m, cols_, k_, 1.f,
                     w.const_data_ptr<float>(), row_major ? cols_ : k_, packed_.data_ptr<float>());
  }

  void operator()(at::Tensor out, const at::Tensor& a, bool accumulate) const {
    const int64_t n = a.size(0);
    if (one_row_.defined() && n == 1 && a.stride(1) == 1 && out.stride(1) == 1) {
      return one_row_product(a.const_data_ptr<float>(), one_row_, transposed_, out.data_ptr<float>(), accumulate);
    }
    const OneMklThreadIf single(n * k_ * cols_ < kThreadedMacs);
    if (one_row_.defined()) return AtenProduct(one_row_, n)(std::move(out), a, accumulate);  // other operands
    if (aten_) return (*aten_)(std::move(out), a, accumulate);
    TORCH_INTERNAL_ASSERT(n <= INT32_MAX && a.stride(1) == 1 && out.stride(1) == 1, "CpuProduct: bad operands");
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, n, cols_, k_, a.const_data_ptr<float>(), a.stride(0),
                        packed_.const_data_ptr<float>(), cols_, accumulate ? 1.f : 0.f, out.data_ptr<float>(),
                        out.stride(0));
  }

 private:
  int64_t k_, cols_;
  at::Tensor one_row_;               // w itself, for products of one row (one_row_product)
  bool transposed_ = false;          // one_row_ is a transposed view
  std::optional<AtenProduct> aten_;  // the fallback, when MKL does not serve w
  at::Tensor packed_;                // MKL's packed copy of w, or undefined
};

// A step's cell is split between threads from this many units (see forward in lstm_cell_kernels.h).
constexpr int64_t kUnitsPerTask = 4096;

// The cell policy of csrc/lstm_layer_loop.h for the CPU.
struct CpuCell {
  using Product = CpuProduct;

  static void forward(const at::Tensor& gates, const at::Tensor& hidden_gates, const at::Tensor& bias,
                      const at::Tensor& c, const at::Tensor& h, double clip) {
    if (c.scalar_type() == at::kDouble) return forward_double(gates, hidden_gates, bias, c, h, clip);
    CTXKERN_DISPATCH_FLOAT_TYPES(c.scalar_type(), "lstm_layer_cell_fwd_cpu", [&] {
      const bool hg = hidden_gates.defined();
      const CellArgs<scalar_t> a{gates.const_data_ptr<scalar_t>(),
                                 hg ? hidden_gates.const_data_ptr<scalar_t>() : nullptr,
                                 c.const_data_ptr<scalar_t>(),
                                 bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                 gates.stride(0),
                                 hg ? hidden_gates.stride(0) : 0,
                                 c.stride(0),
                                 c.size(1),
                                 static_cast<float>(clip)};
      ctxkern::forward<scalar_t>(a, c.size(0), h.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), kUnitsPerTask);
    });
  }

  static void backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& dh, const at::Tensor& dc,
                       const at::Tensor& dgates, const at::Tensor& h, double clip) {
    if (dc.scalar_type() == at::kDouble) return backward_double(gates, c_prev, dh, dc, dgates, h, clip);
    CTXKERN_DISPATCH_FLOAT_TYPES(dc.scalar_type(), "lstm_layer_cell_bwd_cpu", [&] {
      const CellArgs<scalar_t> a{gates.const_data_ptr<scalar_t>(), nullptr, c_prev.const_data_ptr<scalar_t>(),
                                 nullptr, gates.stride(0), 0, c_prev.stride(0), dc.size(1), static_cast<float>(clip)};
      ctxkern::backward<scalar_t>(a, dc.size(0), dh.const_data_ptr<scalar_t>(), dh.stride(0),
                                  dc.const_data_ptr<scalar_t>(), dc.stride(0), dgates.data_ptr<scalar_t>(),
                                  dc.data_ptr<scalar_t>(), nullptr, h.defined() ? h.data_ptr<scalar_t>() : nullptr,
                                  kUnitsPerTask);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& bias,
    std::optional<double> cell_clip, std::optional<double> proj_clip, bool reverse) {
  LstmLayerForward r = lstm_layer_forward<CpuCell>(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip,
                                                   proj_clip, reverse, /*train=*/false, at::kCPU);
  return {r.out, r.h_n, r.c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_fwd_train_cpu(const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0,
                         const at::Tensor& c0, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& bias, std::optional<double> cell_clip,
                         std::optional<double> proj_clip, bool reverse) {
  LstmLayerForward r = lstm_layer_forward<CpuCell>(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip,
                                                   proj_clip, reverse, /*train=*/true, at::kCPU);
  return {r.out, r.h_n, r.c_n, r.gates, r.c_prev, r.h_prev, r.proj_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& gates,
    const at::Tensor& c_prev, const at::Tensor& h_prev, const at::Tensor& proj_raw, at::IntArrayRef batch_sizes,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool has_bias, std::optional<double> cell_clip,
    std::optional<double> proj_clip, bool reverse) {
  return lstm_layer_backward<CpuCell>(dout, dh_n, dc_n, gates, c_prev, h_prev, proj_raw, batch_sizes, w_hh, w_hr,
                                      has_bias, cell_clip, proj_clip, reverse, at::kCPU);
}

}  // namespace

TORCH_LIBRARY_IMPL(ctxkern, CPU, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_fwd_train", &lstm_layer_fwd_train_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace ctxkern

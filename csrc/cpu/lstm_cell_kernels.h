// The LSTM cell's math and its row kernels on the CPU, shared by the cell operators (lstm_cell.cpp) and the
// layer's time loop (lstm_layer.cpp).
//
// One cell unit (row b, column j < H) reads its four gate pre-activations at columns j, H + j, 2H + j and
// 3H + j of input_gates and hidden_gates, plus c[b, j]; everything stays in registers from the loads to h and
// c_new, so each operand crosses memory once. Vector lanes hold consecutive units j.
// Work split: the forward runs at::parallel_for over (row, block of kColBlock columns) tiles. The backward
// runs it over (wider, kBwdColBlock) column blocks only, one thread owning a block for every row: dbias (the
// sum of dgates over the batch) then accumulates in that thread's fp32 registers in row order, deterministic
// and without a second pass or partials. Nothing is saved by the forward: the backward recomputes the
// activations from the pre-activations, which it must read anyway, instead of the forward writing and the
// backward reading a (B, 4H) tensor of activations. The same templated cell math serves the vector and the scalar tail loops.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "../lstm_cell_checks.h"
#include "vec_helpers.h"

namespace ctxkern {
namespace {

constexpr int64_t kColBlock = 4 * kStep;
// The backward walks each column block down all the rows: blocks four times as wide give each row's operand
// reads runs of 1-2 KB rather than 256 B at a stride of a whole row, which the prefetcher follows. Measured at
// (64, 4096) on one thread (AVX-512): 1.8 ms instead of 3.6 ms.
constexpr int64_t kBwdColBlock = 16 * kStep;
static_assert(kColBlock % kStep == 0 && kBwdColBlock % kStep == 0, "a column block is whole loads of any type");

// exp(x) and 1 / d inlined into the cell loops. Sleef's exp is an out-of-line call, which spills the cell's
// live registers around each of its five calls; a vector division is slower than the reciprocal estimate plus
// Newton steps (relative error about 2^-23 after them). Together, the (64, 4096) cell backward (AVX-512, builds
// alternating): one thread 1.65-1.81 -> 0.94-1.28 ms, two threads 0.90-1.15 -> 0.57-0.69 ms.
// exp(x) = 2^t with t = x log2(e) = n + f, n = floor(t): a degree-6 polynomial (fitted to 2^f on [0, 1) by
// reweighted least squares, 1.4 ulp), times 2^n. Rounding t costs a relative error of about |t| 2^-24 in exp(x), which the cell's sigmoid and tanh
// multiply by e / (1 + e)^2 <= e^-|x|. Measured over [-100, 100] (test_lstm_cell.py): sigmoid within 9e-8 and
// tanh within 1.1e-7 of float64, where PyTorch's float32 functions give 9e-8 and 3e-8.
// t is clamped to [-126, 126.9], so 2^n is a normal float and e + 1 stays finite for the reciprocal; the
// cell's 1 / (1 + e) and 1 - 2 / (e + 1) map the clamped values to the same floats (0 or +-1 within 1e-37).
// NaN propagates: min and max return their second operand when one is NaN.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline Vec exp2_of_fraction(const Vec& f) {  // 2^f, f in [0, 1)
  Vec p = at::vec::fmadd(Vec(2.161380689e-4f), f, Vec(1.246737665e-3f));
  p = at::vec::fmadd(p, f, Vec(9.675532579e-3f));
  p = at::vec::fmadd(p, f, Vec(5.548521876e-2f));
  p = at::vec::fmadd(p, f, Vec(2.402293235e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931470633e-1f));
  return at::vec::fmadd(p, f, Vec(1.f));
}

// exp(k x), k folded into the multiplication by log2(e).
inline Vec exp_scaled(const Vec& x, float k) {
  const float k_log2e = k * 1.44269504088896341f;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-126.f),
                                 _mm512_min_ps(_mm512_set1_ps(126.9f), _mm512_mul_ps(x, _mm512_set1_ps(k_log2e))));
  // vreduceps: f = t - floor(t) in one instruction; vscalefps multiplies by 2^floor(t).
  return _mm512_scalef_ps(exp2_of_fraction(_mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)), t);
#else
  const __m256 t = _mm256_max_ps(_mm256_set1_ps(-126.f),
                                 _mm256_min_ps(_mm256_set1_ps(126.9f), _mm256_mul_ps(x, _mm256_set1_ps(k_log2e))));
  const __m256 n = _mm256_floor_ps(t);
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return exp2_of_fraction(_mm256_sub_ps(t, n)) * Vec(_mm256_castsi256_ps(two_to_n));
#endif
}

// 1 / d for the finite d >= 1 of the cell's activations.
inline Vec cell_reciprocal(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec r = _mm512_rcp14_ps(d);
  return at::vec::fmadd(r, at::vec::fnmadd(d, r, Vec(1.f)), r);
#else
  Vec r = _mm256_rcp_ps(d);  // 12 bits: two Newton steps
  r = at::vec::fmadd(r, at::vec::fnmadd(d, r, Vec(1.f)), r);
  return at::vec::fmadd(r, at::vec::fnmadd(d, r, Vec(1.f)), r);
#endif
}
#else
inline Vec exp_scaled(const Vec& x, float k) { return (x * Vec(k)).exp(); }
inline Vec cell_reciprocal(const Vec& d) { return Vec(1.f) / d; }
#endif

// The cell math on a Vec of units or on one float, same formulas for both. Five transcendentals per unit are
// most of the cell's arithmetic, so all of them are one exp (above): tanh(x) = 1 - 2 / (exp(2x) + 1) is exact
// at both saturations and its error is absolute (about 1e-7 near 0, where a relative one would be larger); the
// fp32 tolerances of the tests, and what consumes h and c, are absolute at that scale.
inline Vec sigmoid(const Vec& x) { return cell_reciprocal(Vec(1.f) + exp_scaled(x, -1.f)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
// tanh of |x|, then x's sign: 2 / (e + 1) <= 1 is then rounded at most at 1's ulp, not 2's.
inline Vec tanh_of(const Vec& x) {
  const Vec sign = x & Vec(-0.f);
  const Vec t = at::vec::fnmadd(Vec(2.f), cell_reciprocal(exp_scaled(x.abs(), 2.f) + Vec(1.f)), Vec(1.f));
  return t | sign;
}
inline float tanh_of(float x) { return std::tanh(x); }
inline Vec clamp_to(const Vec& x, const Vec& bound) { return at::vec::clamp(x, bound.neg(), bound); }
inline float clamp_to(float x, float bound) { return std::min(std::max(x, -bound), bound); }
// d where |x| <= bound, else 0: torch.clamp's gradient, which passes at the bounds themselves.
inline Vec pass_within(const Vec& d, const Vec& x, const Vec& bound) {
  return Vec::blendv(Vec(0.f), d, x.abs() <= bound);
}
inline float pass_within(float d, float x, float bound) { return std::abs(x) <= bound ? d : 0.f; }
// float64, for the layer operators' scalar path (gradient tests in float64): the libm functions.
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_of(double x) { return std::tanh(x); }
inline double clamp_to(double x, double bound) { return std::min(std::max(x, -bound), bound); }
inline double pass_within(double d, double x, double bound) { return std::abs(x) <= bound ? d : 0.0; }

// Activations of one set of units: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), the unclamped cell
// c_raw = sigmoid(f) * c + sigmoid(i) * tanh(g) and tanh(clamp(c_raw)).
template <typename V>
struct Activations {
  V i, f, g, o, c_raw, tanh_c;
};

template <typename V>
inline Activations<V> activate(const std::array<V, 4>& pre, const V& c, const V& clip) {
  Activations<V> a;
  a.i = sigmoid(pre[0]);
  a.f = sigmoid(pre[1]);
  a.g = tanh_of(pre[2]);
  a.o = sigmoid(pre[3]);
  a.c_raw = a.f * c + a.i * a.g;
  a.tanh_c = tanh_of(clamp_to(a.c_raw, clip));
  return a;
}

// Gradients of one set of units: dgates[0..4) (for i, f, g, o) and dc, given dh, dc_new.
template <typename V>
inline void cell_backward(const Activations<V>& a, const V& c, const V& dh, const V& dc_new, const V& clip,
                          std::array<V, 4>& dgates, V& dc) {
  const V one(1.f);
  const V dc_clamped = dc_new + dh * a.o * (one - a.tanh_c * a.tanh_c);
  const V dc_raw = pass_within(dc_clamped, a.c_raw, clip);
  dgates[0] = dc_raw * a.g * a.i * (one - a.i);
  dgates[1] = dc_raw * c * a.f * (one - a.f);
  dgates[2] = dc_raw * a.i * (one - a.g * a.g);
  dgates[3] = dh * a.tanh_c * a.o * (one - a.o);
  dc = dc_raw * a.f;
}

// Raw pointers and row strides (in elements) of one call; every (B, 4H) / (B, H) operand has a contiguous
// last dim. Gate k of unit j of row b is at column k * H + j.
template <typename T>
struct CellArgs {
  const T* input_gates;   // (B, 4H), row stride ig_stride
  const T* hidden_gates;  // (B, 4H), row stride hg_stride, or null when input_gates holds the whole sum
  const T* c;             // (B, H), row stride c_stride
  const T* bias;          // (4H,) or null
  int64_t ig_stride, hg_stride, c_stride, H;
  float clip;             // +inf when there is no clip

  // Pre-activations of gates i, f, g, o for the kLanes<T> * kVec units from column j of row b: pre[lane][gate].
  std::array<std::array<Vec, 4>, kLanes<T>> load_pre(int64_t b, int64_t j) const {
    std::array<std::array<Vec, 4>, kLanes<T>> pre;
    for (int k = 0; k < 4; ++k) {
      Lanes<T> x = load_lanes(input_gates + b * ig_stride + k * H + j);
      if (hidden_gates) {
        const Lanes<T> y = load_lanes(hidden_gates + b * hg_stride + k * H + j);
        for (int n = 0; n < kLanes<T>; ++n) x[n] = x[n] + y[n];
      }
      if (bias) {
        const Lanes<T> y = load_lanes(bias + k * H + j);
        for (int n = 0; n < kLanes<T>; ++n) x[n] = x[n] + y[n];
      }
      for (int n = 0; n < kLanes<T>; ++n) pre[n][k] = x[n];
    }
    return pre;
  }

  std::array<float, 4> load_pre_scalar(int64_t b, int64_t j) const {
    std::array<float, 4> pre;
    for (int k = 0; k < 4; ++k) {
      pre[k] = static_cast<float>(input_gates[b * ig_stride + k * H + j]) +
               (hidden_gates ? static_cast<float>(hidden_gates[b * hg_stride + k * H + j]) : 0.f) +
               (bias ? static_cast<float>(bias[k * H + j]) : 0.f);
    }
    return pre;
  }
};

template <typename T>
CellArgs<T> cell_args(const at::Tensor& ig, const at::Tensor& hg, const at::Tensor& c,
                      const std::optional<at::Tensor>& bias, std::optional<double> cell_clip) {
  return {ig.const_data_ptr<T>(), hg.const_data_ptr<T>(), c.const_data_ptr<T>(),
          bias ? bias->const_data_ptr<T>() : nullptr, ig.stride(0), hg.stride(0), c.stride(0), c.size(1),
          clip_bound(cell_clip)};
}

// units_per_task: the least work worth a thread of its own. 16K units for a call on its own (waking a sleeping
// thread costs more than a smaller cell); the LSTM layer's loop, whose threads are awake between the steps'
// products, splits from 4K (a (16, 512) step in two halves).
template <typename T>
void forward(const CellArgs<T>& a, int64_t B, T* h, T* c_new,  // h, c_new: (B, H) contiguous
             int64_t units_per_task = 16384) {
  const int64_t H = a.H;
  const int64_t blocks = (H + kColBlock - 1) / kColBlock;
  const Vec clip(a.clip);
  const int64_t grain = std::max<int64_t>(1, units_per_task / std::min(H, kColBlock));
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / blocks, j0 = (tile % blocks) * kColBlock, j1 = std::min(H, j0 + kColBlock);
      const T* c_row = a.c + b * a.c_stride;
      int64_t j = j0;
      for (; j + kLanes<T> * kVec <= j1; j += kLanes<T> * kVec) {
        const auto pre = a.load_pre(b, j);
        const Lanes<T> cv = load_lanes(c_row + j);
        Lanes<T> hv, cnv;
        for (int n = 0; n < kLanes<T>; ++n) {
          const Activations<Vec> act = activate(pre[n], cv[n], clip);
          hv[n] = act.o * act.tanh_c;
          cnv[n] = clamp_to(act.c_raw, clip);
        }
        store_lanes(h + b * H + j, hv);
        store_lanes(c_new + b * H + j, cnv);
      }
      for (; j < j1; ++j) {
        const Activations<float> s = activate(a.load_pre_scalar(b, j), static_cast<float>(c_row[j]), a.clip);
        h[b * H + j] = static_cast<T>(s.o * s.tanh_c);
        c_new[b * H + j] = static_cast<T>(clamp_to(s.c_raw, a.clip));
      }
    }
  });
}

// A tile is one column block of every row when dbias is summed (in row order, see above), else of one row: the
// LSTM layer's loop sums dbias itself, and its steps' few rows and H of one or two blocks then still split.
// units_per_task as in forward.
template <typename T>
void backward(const CellArgs<T>& a, int64_t B, const T* dh, int64_t dh_stride,  // dh: (B, H)
              const T* dc_new, int64_t dc_new_stride,                           // dc_new: (B, H)
              T* dgates, T* dc, T* dbias,  // dgates (B, 4H), dc (B, H) contiguous; dbias (4H,) or null
              T* h_out = nullptr,          // (B, H) contiguous: the forward's h again, or null
              int64_t units_per_task = 16384) {
  const int64_t H = a.H;
  const int64_t blocks = (H + kBwdColBlock - 1) / kBwdColBlock;
  const int64_t tile_rows = dbias ? B : 1, row_tiles = (B + tile_rows - 1) / tile_rows;
  const Vec clip(a.clip);
  const int64_t tile_units = std::max<int64_t>(1, tile_rows * std::min(H, kBwdColBlock));
  const int64_t grain = std::max<int64_t>(1, units_per_task / tile_units);
  at::parallel_for(0, blocks * row_tiles, grain, [&](int64_t begin, int64_t end) {
    std::array<float, 4 * kBwdColBlock> dbias_acc;  // gate k, column j0 + u at k * kBwdColBlock + u
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t blk = tile / row_tiles, b0 = (tile % row_tiles) * tile_rows, b1 = std::min(B, b0 + tile_rows);
      const int64_t j0 = blk * kBwdColBlock, j1 = std::min(H, j0 + kBwdColBlock);
      dbias_acc.fill(0.f);
      for (int64_t b = b0; b < b1; ++b) {
        const T* c_row = a.c + b * a.c_stride;
        const T* dh_row = dh + b * dh_stride;
        const T* dcn_row = dc_new + b * dc_new_stride;
        int64_t j = j0;
        for (; j + kLanes<T> * kVec <= j1; j += kLanes<T> * kVec) {
          const auto pre = a.load_pre(b, j);
          const Lanes<T> cv = load_lanes(c_row + j), dhv = load_lanes(dh_row + j), dcnv = load_lanes(dcn_row + j);
          std::array<Lanes<T>, 4> dg;
          Lanes<T> dcv, hv;
          for (int n = 0; n < kLanes<T>; ++n) {
            const Activations<Vec> act = activate(pre[n], cv[n], clip);
            std::array<Vec, 4> dg_n;
            cell_backward(act, cv[n], dhv[n], dcnv[n], clip, dg_n, dcv[n]);
            hv[n] = act.o * act.tanh_c;
            for (int k = 0; k < 4; ++k) {
              dg[k][n] = dg_n[k];
              float* acc = dbias_acc.data() + k * kBwdColBlock + (j - j0) + n * kVec;
              (Vec::loadu(acc) + dg_n[k]).store(acc);
            }
          }
          if (h_out) store_lanes(h_out + b * H + j, hv);
          for (int k = 0; k < 4; ++k) store_lanes(dgates + b * 4 * H + k * H + j, dg[k]);
          store_lanes(dc + b * H + j, dcv);
        }
        for (; j < j1; ++j) {
          const float cs = static_cast<float>(c_row[j]);
          std::array<float, 4> dg;
          float dcs;
          const Activations<float> act = activate(a.load_pre_scalar(b, j), cs, a.clip);
          cell_backward(act, cs, static_cast<float>(dh_row[j]), static_cast<float>(dcn_row[j]), a.clip, dg, dcs);
          if (h_out) h_out[b * H + j] = static_cast<T>(act.o * act.tanh_c);
          for (int k = 0; k < 4; ++k) {
            dgates[b * 4 * H + k * H + j] = static_cast<T>(dg[k]);
            dbias_acc[k * kBwdColBlock + (j - j0)] += dg[k];
          }
          dc[b * H + j] = static_cast<T>(dcs);
        }
      }
      if (dbias) {
        for (int k = 0; k < 4; ++k) {
          for (int64_t j = j0; j < j1; ++j) {
            dbias[k * H + j] = static_cast<T>(dbias_acc[k * kBwdColBlock + (j - j0)]);
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace ctxkern

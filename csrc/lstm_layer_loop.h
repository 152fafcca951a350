// The time loop of one LSTM layer in one direction (schemas lstm_layer_fwd, lstm_layer_fwd_train and
// lstm_layer_bwd in csrc/ops.cpp), written once for every device: the products are ATen calls (at::mm_out,
// addmm_, on row views of preallocated buffers, so no step allocates), and the device supplies only its
// cell through a policy class:
//
//   struct Cell {
//     // c_new = clamp(sigmoid(f) * c + sigmoid(i) * tanh(g), +-clip), h = sigmoid(o) * tanh(c_new), from the
//     // pre-activations gates + hidden_gates + bias: gates (n, 4H) (row stride free, last dim contiguous),
//     // hidden_gates (n, 4H) contiguous and bias (4H,) each undefined when not to be added; c (n, H)
//     // contiguous holds c on entry and c_new on return; h (n, H) contiguous is written.
//     static void forward(const at::Tensor& gates, const at::Tensor& hidden_gates, const at::Tensor& bias,
//                         const at::Tensor& c, const at::Tensor& h, double clip);
//     // The cell's backward from the same pre-activations and c_prev (n, H): dh (n, H) in; dc (n, H) holds
//     // dc_new on entry and dc_prev on return; dgates (n, 4H) written; h (n, H) written with the forward's
//     // h again when defined (the projection's weight gradient needs it), skipped when undefined.
//     // The activations are recomputed from gates in the same pass: nothing else was saved.
//     static void backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& dh,
//                          const at::Tensor& dc, const at::Tensor& dgates, const at::Tensor& h, double clip);
//   };
//   clip (a double, so that float64 clamps at the exact bound) is +inf when there is none (clamp and mask are
//   then no-ops); all tensors share one dtype and device.
//     // The products by a matrix fixed for the whole loop (the recurrent and the projection weights, in the
//     // forward and the backward): Product(w, rows) may prepare w (k, cols) (any strides; a transposed view
//     // when the product is by a weight's transpose) once for products of at most `rows` rows, e.g. pack it,
//     // then
//     // product(out, a, accumulate) sets out (n, cols) = a (n, k) @ w, or adds it with accumulate; a and out
//     // have contiguous last dims. AtenProduct below (ATen's addmm_ / mm_out) serves any device.
//     using Product = AtenProduct;
//
// Packed rows: step t owns rows [offsets[t], offsets[t] + batch_sizes[t]) of the (N, .) tensors, its
// batch_sizes[t] sequences being a prefix of the batch (non-increasing sizes), so the state of step t is rows
// [0, n) of the (B, .) state buffers; rows n.. keep theirs (sequences finished, or in reverse not yet begun).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace ctxkern {

// Where each step's rows start, and the order the forward visits the steps in.
struct LstmSteps {
  std::vector<int64_t> sizes, offsets;  // offsets has one more entry: the total N
  bool reverse;

  LstmSteps(at::IntArrayRef batch_sizes, bool reverse_) : sizes(batch_sizes.vec()), offsets(1, 0), reverse(reverse_) {
    for (int64_t n : sizes) offsets.push_back(offsets.back() + n);
  }
  int64_t count() const { return static_cast<int64_t>(sizes.size()); }
  int64_t at_visit(int64_t k) const { return reverse ? count() - 1 - k : k; }  // the step visited k-th
  int64_t most_rows() const { return sizes.empty() ? 0 : *std::max_element(sizes.begin(), sizes.end()); }
};

// out (n, cols) = a (n, k) @ w (+ out when accumulating) through ATen; w (k, cols) as the caller gives it.
class AtenProduct {
 public:
  AtenProduct(const at::Tensor& w, int64_t /*rows*/) : w_(w.contiguous()) {}
  void operator()(at::Tensor out, const at::Tensor& a, bool accumulate) const {
    if (accumulate) {
      out.addmm_(a, w_);
    } else {
      at::mm_out(out, a, w_);
    }
  }

 private:
  at::Tensor w_;
};

// Rows [row, row + n) of a tensor as a view: t.narrow(0, row, n) without the dispatcher. A narrow goes through
// slice and as_strided at a few hundred nanoseconds each, and a step takes up to a dozen of them, which at B = 1
// is a sizeable share of the step. The view shares t's storage, strides and dispatch keys; it is the loop's own
// temporary (no autograd sees it), so it needs neither a view's autograd metadata nor its version counter.
inline at::Tensor rows_of(const at::Tensor& t, int64_t row, int64_t n) {
  auto view = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()), t.key_set(),
                                                   t.dtype());
  at::DimVector sizes(t.sizes());
  sizes[0] = n;
  view->set_sizes_and_strides(sizes, t.strides(), t.storage_offset() + row * t.stride(0));
  return at::Tensor(std::move(view));
}

inline double lstm_clip_bound(std::optional<double> clip) { return clip ? *clip : INFINITY; }

// dst.add_(src) for the loop's row blocks (same shape and dtype): a plain loop on contiguous float32 or float64
// CPU tensors, for the reason copy_rows gives.
inline void add_rows(at::Tensor& dst, const at::Tensor& src) {
  const bool plain = dst.is_cpu() && src.is_cpu() && dst.is_contiguous() && src.is_contiguous();
  if (!plain || (dst.scalar_type() != at::kFloat && dst.scalar_type() != at::kDouble)) {
    dst.add_(src);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "lstm_layer add_rows", [&] {
    scalar_t* d = dst.data_ptr<scalar_t>();
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = dst.numel(); i < n; ++i) d[i] += s[i];
  });
}

// dst.copy_(src) for the loop's row blocks (same shape and dtype): a memcpy when both are contiguous on the CPU,
// since copy_'s TensorIterator costs a few microseconds a call, as much as a whole step of a small layer.
inline void copy_rows(at::Tensor& dst, const at::Tensor& src) {
  if (dst.is_cpu() && src.is_cpu() && dst.is_contiguous() && src.is_contiguous()) {
    std::memcpy(dst.data_ptr(), src.const_data_ptr(), src.nbytes());
  } else {
    dst.copy_(src);
  }
}

// ---------------------------------------------------------------------------------------------- checks
// Direct calls of the operators raise with the argument's name; ctxkern/nn.py validates before them.

// t: like's dtype and device (like is the (N, 4H) operand, named like_name), and this shape.
inline void check_lstm_layer_tensor(const at::Tensor& t, const at::Tensor& like, const char* like_name,
                                    at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), name, " must have ", like_name,
              "'s dtype ", like.scalar_type(), " and device ", like.device(), ", got ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Returns (H, P). Checks the arguments the three operators share; `gates_name` is the (N, 4H) tensor's name.
inline std::pair<int64_t, int64_t> check_lstm_layer_common(
    const at::Tensor& gates, const char* gates_name, at::IntArrayRef batch_sizes, int64_t B, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, std::optional<double> cell_clip, std::optional<double> proj_clip,
    at::DeviceType device) {
  TORCH_CHECK(gates.device().type() == device, gates_name, " must be a ", device, " tensor, got ", gates.device());
  const auto dt = gates.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, gates_name,
              " must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(gates.dim() == 2 && gates.size(1) % 4 == 0 && (gates.size(1) <= 1 || gates.stride(1) == 1),
              gates_name, " must be (N, 4H) with a contiguous last dim, got shape ", gates.sizes());
  const int64_t H = gates.size(1) / 4, P = w_hr ? w_hr->size(0) : H;
  int64_t rows = 0, previous = B;
  for (int64_t n : batch_sizes) {
    TORCH_CHECK(n >= 0 && n <= previous, "batch_sizes must be non-increasing and at most the batch ", B, ", got ",
                batch_sizes);
    previous = n;
    rows += n;
  }
  TORCH_CHECK(rows == gates.size(0), "batch_sizes must sum to ", gates_name, "'s rows ", gates.size(0), ", got ", rows);
  if (w_hr) {
    TORCH_CHECK(w_hr->dim() == 2, "w_hr must be 2-D (P, H), got shape ", w_hr->sizes());
    check_lstm_layer_tensor(*w_hr, gates, gates_name, {P, H}, "w_hr");
  }
  check_lstm_layer_tensor(w_hh, gates, gates_name, {4 * H, P}, "w_hh");
  TORCH_CHECK(!cell_clip || *cell_clip >= 0.0, "cell_clip must be >= 0 (or None), got ", cell_clip.value_or(0));
  TORCH_CHECK(!proj_clip || *proj_clip >= 0.0, "proj_clip must be >= 0 (or None), got ", proj_clip.value_or(0));
  TORCH_CHECK(!proj_clip || w_hr, "proj_clip clamps the projection, so it needs w_hr");
  return {H, P};
}

inline std::pair<int64_t, int64_t> check_lstm_layer_fwd_args(
    const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& bias,
    std::optional<double> cell_clip, std::optional<double> proj_clip, at::DeviceType device) {
  TORCH_CHECK(h0.dim() == 2, "h0 must be 2-D (B, P), got shape ", h0.sizes());
  const int64_t B = h0.size(0);
  const auto [H, P] = check_lstm_layer_common(gates_in, "gates_in", batch_sizes, B, w_hh, w_hr, cell_clip, proj_clip,
                                              device);
  check_lstm_layer_tensor(h0, gates_in, "gates_in", {B, P}, "h0");
  check_lstm_layer_tensor(c0, gates_in, "gates_in", {B, H}, "c0");
  if (bias) check_lstm_layer_tensor(*bias, gates_in, "gates_in", {4 * H}, "bias");
  return {H, P};
}

// --------------------------------------------------------------------------------------------- forward

struct LstmLayerForward {
  at::Tensor out, h_n, c_n;              // (N, P), (B, P), (B, H)
  at::Tensor gates, c_prev, h_prev, proj_raw;  // training only (see lstm_layer_fwd_train's schema)
};

// train=false: lstm_layer_fwd (only out, h_n, c_n are defined); train=true: lstm_layer_fwd_train.
template <class Cell>
LstmLayerForward lstm_layer_forward(const at::Tensor& gates_in, at::IntArrayRef batch_sizes, const at::Tensor& h0,
                                    const at::Tensor& c0, const at::Tensor& w_hh,
                                    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& bias,
                                    std::optional<double> cell_clip, std::optional<double> proj_clip, bool reverse,
                                    bool train, at::DeviceType device) {
  // The loop's own ATen calls (products, clamps, fills) skip autograd's kernels: nothing in here is
  // differentiated, and at a small layer's step of a few microseconds that tracking cost as much as the work.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [H, P] = check_lstm_layer_fwd_args(gates_in, batch_sizes, h0, c0, w_hh, w_hr, bias, cell_clip,
                                                proj_clip, device);
  const int64_t B = h0.size(0), N = gates_in.size(0);
  const LstmSteps steps(batch_sizes, reverse);
  const double clip = lstm_clip_bound(cell_clip);
  LstmLayerForward r;
  r.out = at::empty({N, P}, h0.options());
  r.h_n = h0.clone(at::MemoryFormat::Contiguous);  // (B, P) the state, updated step by step; h_n at the end
  r.c_n = c0.clone(at::MemoryFormat::Contiguous);  // (B, H) likewise, the cell writing it in place
  // Training keeps the pre-activations: they start as gates_in + bias and each step adds its h W_hh^T in place
  // (beta = 1). Inference keeps none: each step's h W_hh^T goes to one step's scratch rows, and the cell sums
  // gates_in + that + bias as it reads them (no (N, 4H) copy of gates_in is written and read again).
  at::Tensor hidden_gates, cell_bias;  // inference: (B, 4H) one step's h W_hh^T; the bias, contiguous
  if (train) {
    r.gates = bias ? at::add(gates_in, *bias) : gates_in.clone(at::MemoryFormat::Contiguous);  // (N, 4H)
    r.c_prev = at::empty({N, H}, c0.options());
    r.h_prev = at::empty({N, P}, h0.options());
    r.proj_raw = at::empty({proj_clip ? N : 0, P}, h0.options());
  } else {
    hidden_gates = at::empty({B, 4 * H}, h0.options());
    if (bias) cell_bias = bias->contiguous();
  }
  at::Tensor h_cell = w_hr ? at::empty({B, H}, c0.options()) : at::Tensor();  // (B, H) before the projection
  // The products by the weights' transposes: AtenProduct makes each a contiguous copy, so that h (n, P) @ w_hh^T
  // (P, 4H) reads its right operand row by row (BLAS "NN"), which MKL runs at small n up to 2.5x faster than
  // the transposed view ("NT"); MKL's packing reads the transposed view itself.
  using Product = typename Cell::Product;
  const int64_t rows = steps.most_rows();
  const Product recurrent(w_hh.t(), rows);                                              // (P, 4H)
  const std::optional<Product> projection = w_hr ? std::optional<Product>(std::in_place, w_hr->t(), rows)
                                                 : std::nullopt;

  for (int64_t k = 0; k < steps.count(); ++k) {
    const int64_t t = steps.at_visit(k), n = steps.sizes[t], row = steps.offsets[t];
    if (n == 0) continue;
    at::Tensor h = rows_of(r.h_n, 0, n), c = rows_of(r.c_n, 0, n);
    at::Tensor out_rows = rows_of(r.out, row, n);                  // (n, P)
    at::Tensor cell_h = w_hr ? rows_of(h_cell, 0, n) : out_rows;  // (n, H)
    if (train) {
      at::Tensor h_prev = rows_of(r.h_prev, row, n), c_prev = rows_of(r.c_prev, row, n);
      copy_rows(h_prev, h);
      copy_rows(c_prev, c);
      at::Tensor g = rows_of(r.gates, row, n);  // (n, 4H)
      recurrent(g, h, /*accumulate=*/true);
      Cell::forward(g, at::Tensor(), at::Tensor(), c, cell_h, clip);
    } else {
      at::Tensor hg = rows_of(hidden_gates, 0, n);
      recurrent(hg, h, /*accumulate=*/false);
      Cell::forward(rows_of(gates_in, row, n), hg, cell_bias, c, cell_h, clip);
    }
    if (w_hr) {
      at::Tensor raw = train && proj_clip ? rows_of(r.proj_raw, row, n) : out_rows;
      (*projection)(raw, cell_h, /*accumulate=*/false);
      if (proj_clip) at::clamp_out(out_rows, raw, -*proj_clip, *proj_clip);
    }
    copy_rows(h, out_rows);
  }
  return r;
}

// -------------------------------------------------------------------------------------------- backward

// -> dgates_in, dh0, dc0, dw_hh, dw_hr, dbias as lstm_layer_bwd's schema says.
template <class Cell>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward(
    const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& gates,
    const at::Tensor& c_prev, const at::Tensor& h_prev, const at::Tensor& proj_raw, at::IntArrayRef batch_sizes,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, bool has_bias, std::optional<double> cell_clip,
    std::optional<double> proj_clip, bool reverse, at::DeviceType device) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in lstm_layer_forward
  TORCH_CHECK(dh_n.dim() == 2, "dh_n must be 2-D (B, P), got shape ", dh_n.sizes());
  const int64_t B = dh_n.size(0), N = gates.size(0);
  const auto [H, P] = check_lstm_layer_common(gates, "gates", batch_sizes, B, w_hh, w_hr, cell_clip, proj_clip,
                                              device);
  check_lstm_layer_tensor(dout, gates, "gates", {N, P}, "dout");
  check_lstm_layer_tensor(dh_n, gates, "gates", {B, P}, "dh_n");
  check_lstm_layer_tensor(dc_n, gates, "gates", {B, H}, "dc_n");
  check_lstm_layer_tensor(c_prev, gates, "gates", {N, H}, "c_prev");
  check_lstm_layer_tensor(h_prev, gates, "gates", {N, P}, "h_prev");
  check_lstm_layer_tensor(proj_raw, gates, "gates", {proj_clip ? N : 0, P}, "proj_raw");
  TORCH_CHECK(gates.is_contiguous() && c_prev.is_contiguous(), "gates and c_prev must be contiguous");
  const LstmSteps steps(batch_sizes, reverse);
  const double clip = lstm_clip_bound(cell_clip);

  at::Tensor dh = dh_n.clone(at::MemoryFormat::Contiguous);  // (B, P) the gradient of the state h; dh0 at the end
  at::Tensor dc = dc_n.clone(at::MemoryFormat::Contiguous);  // (B, H) likewise for c
  at::Tensor dgates = at::empty({N, 4 * H}, gates.options());
  // With a projection: each step's gradient of the projected h (N, P), the cell's h recomputed (N, H), and
  // the gradient of the cell's h of one step (B, H).
  at::Tensor dproj = w_hr ? at::empty({N, P}, gates.options()) : at::Tensor();
  at::Tensor h_cell = w_hr ? at::empty({N, H}, gates.options()) : at::Tensor();
  at::Tensor dh_cell = w_hr ? at::empty({B, H}, gates.options()) : at::Tensor();

  using Product = typename Cell::Product;
  const int64_t rows = steps.most_rows();
  const Product recurrent(w_hh, rows);                                                   // (4H, P)
  const std::optional<Product> projection = w_hr ? std::optional<Product>(std::in_place, *w_hr, rows)
                                                 : std::nullopt;
  for (int64_t k = steps.count() - 1; k >= 0; --k) {
    const int64_t t = steps.at_visit(k), n = steps.sizes[t], row = steps.offsets[t];
    if (n == 0) continue;
    at::Tensor dy = rows_of(dh, 0, n);  // (n, P): the gradient of this step's output h, out's and the state's
    add_rows(dy, rows_of(dout, row, n));
    if (proj_clip) dy.masked_fill_(rows_of(proj_raw, row, n).abs() > *proj_clip, 0);  // torch.clamp's gradient
    at::Tensor dcell = dy;  // (n, H): the gradient of the cell's h
    if (w_hr) {
      at::Tensor dproj_rows = rows_of(dproj, row, n);
      copy_rows(dproj_rows, dy);
      dcell = rows_of(dh_cell, 0, n);
      (*projection)(dcell, dy, /*accumulate=*/false);
    }
    at::Tensor dg = rows_of(dgates, row, n);
    Cell::backward(rows_of(gates, row, n), rows_of(c_prev, row, n), dcell, rows_of(dc, 0, n), dg,
                   w_hr ? rows_of(h_cell, row, n) : at::Tensor(), clip);
    recurrent(dy, dg, /*accumulate=*/false);  // dh_prev: (n, 4H) @ (4H, P), overwriting dy, consumed above
  }
  // The weight gradients: one product over all N rows each, in a fixed order.
  at::Tensor dw_hh = at::mm(dgates.t(), h_prev);                                    // (4H, P)
  at::Tensor dw_hr = w_hr ? at::mm(dproj.t(), h_cell) : at::empty({0}, gates.options());  // (P, H)
  at::Tensor dbias = has_bias ? dgates.sum(0) : at::empty({0}, gates.options());     // (4H,)
  return {dgates, dh, dc, dw_hh, dw_hr, dbias};
}

}  // namespace ctxkern

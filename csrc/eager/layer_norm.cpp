// The eager entry of ops.layer_norm for the C++ backends (cpu, cuda): the argument checks, the operator call
// and, when a gradient is needed, a C++ autograd node, with no Python in between.
//
// Why: at small shapes a Python op boundary costs more than the kernel. ops.layer_norm's Python path (checks,
// backend choice, a boxed redispatch, a Python autograd.Function whose backward runs Python too) spent
// about 6 us per forward and 10-15 us per backward more than torch's C++ layer_norm on (64, 384), where the
// kernels themselves are as fast as torch's. This entry does only the plain case: exact tensors (or
// Parameters) of one float dtype on one device the backend serves, no torch dispatch mode, functorch
// transform or JIT trace active. For anything else it returns None and ops.layer_norm takes its Python path,
// which holds the one set of error messages and every special mode (ctxkern/ops/_autograd_modes.py).
// The operators are still called through the dispatcher (below autograd), so the profiler records them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "eager.h"

namespace ctxkern {
namespace eager {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// (..., N) -> (M, N) with a contiguous last dim (the operators' layout), a view where the strides allow.
Tensor as_rows(const Tensor& t) {
  Tensor rows = t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
  return rows.size(1) <= 1 || rows.stride(1) == 1 ? rows : rows.contiguous();
}

// An operator's (M, N) output in the shape of `like` (..., N); no view op for 2-D, the common case.
Tensor shaped_like(const Tensor& rows, const Tensor& like) {
  return like.dim() == 2 ? rows : rows.view(like.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_fwd(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                                    const Tensor& bias, double eps, bool prenorm) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ctxkern::layer_norm_fwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                            const std::optional<Tensor>&,
                                                            const std::optional<Tensor>&, double, bool)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, opt(residual), opt(weight), opt(bias), eps, prenorm);
}

std::tuple<Tensor, Tensor, Tensor> call_bwd(const Tensor& dy, const Tensor& x, const Tensor& residual,
                                            const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                            bool has_bias, const Tensor& dsum) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ctxkern::layer_norm_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                    const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                                    bool, const std::optional<Tensor>&)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(dy, x, opt(residual), opt(weight), mean, rstd, has_bias, opt(dsum));
}

// The Python function that computes the backward as a differentiable graph (create_graph=True: double
// backward, gradient penalties), set once by ctxkern/ops/layer_norm.py. Never freed: it must outlive every
// graph, and a static py::object would be destroyed after the interpreter.
py::object* differentiable_backward = new py::object();

// y = LayerNorm(x + residual) [, x + residual] with x, residual (..., N); residual, weight and bias may be
// undefined (passed as optionals: autograd records no input for an absent one). The operators see (M, N) rows;
// the outputs and gradients have the inputs' shapes.
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& residual_opt,
                               const std::optional<Tensor>& weight_opt, const std::optional<Tensor>& bias_opt,
                               double eps, bool prenorm) {
    const Tensor residual = residual_opt.value_or(Tensor()), weight = weight_opt.value_or(Tensor()),
                 bias = bias_opt.value_or(Tensor());
    auto [y, mean, rstd, sum] = call_fwd(as_rows(x), residual.defined() ? as_rows(residual) : residual, weight, bias,
                                         eps, prenorm);
    ctx->save_for_backward({x, residual, weight, mean, rstd});
    ctx->saved_data["has_bias"] = bias.defined();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["prenorm"] = prenorm;
    // An output that takes no part in the loss gets an undefined gradient rather than a tensor of zeros.
    ctx->set_materialize_grads(false);
    if (prenorm) return {shaped_like(y, x), shaped_like(sum, x)};
    return {shaped_like(y, x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &residual = saved[1], &weight = saved[2], &mean = saved[3], &rstd = saved[4];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool prenorm = ctx->saved_data["prenorm"].toBool();
    const Tensor& dy = grads[0];
    const Tensor dsum = prenorm ? grads[1] : Tensor();
    Tensor dx, dres, dweight, dbias;
    if (at::GradMode::is_enabled()) {
      // create_graph: the kernels' backward is not differentiable; the reference's is (as the Python path does).
      const py::gil_scoped_acquire gil;
      TORCH_CHECK(differentiable_backward->ptr() != nullptr && !differentiable_backward->is_none(),
                  "ctxkern: layer_norm's differentiable backward is not registered");
      auto none_or = [](const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
      const py::tuple out = (*differentiable_backward)(x, none_or(residual), none_or(weight), has_bias,
                                                       ctx->saved_data["eps"].toDouble(), none_or(dy), none_or(dsum));
      auto tensor_or_undefined = [](const py::handle h) { return h.is_none() ? Tensor() : h.cast<Tensor>(); };
      dx = tensor_or_undefined(out[0]);
      dres = tensor_or_undefined(out[1]);
      dweight = tensor_or_undefined(out[2]);
      dbias = tensor_or_undefined(out[3]);
    } else if (!dy.defined()) {
      // Only the prenorm sum reaches the loss: its gradient goes to x and residual unchanged.
      dx = dsum;
      dres = residual.defined() ? dsum : Tensor();
    } else {
      auto [dx_rows, dw, db] = call_bwd(as_rows(dy), as_rows(x), residual.defined() ? as_rows(residual) : residual,
                                        weight, mean, rstd, has_bias, dsum.defined() ? as_rows(dsum) : dsum);
      dx = shaped_like(dx_rows, x);
      dres = residual.defined() ? dx : Tensor();
      dweight = weight.defined() ? dw : Tensor();
      dbias = has_bias ? db : Tensor();
    }
    return {dx, dres, dweight, dbias, Tensor(), Tensor()};
  }
};

PyTypeObject* parameter_type() {
  static PyTypeObject* type = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("torch.nn.parameter").attr("Parameter")).release().ptr());
  return type;
}

// obj as a tensor when it is a plain torch.Tensor or an nn.Parameter (whose __torch_function__ is torch's
// own), an undefined tensor for None, std::nullopt for anything else (a subclass, a wrong type).
std::optional<Tensor> plain_tensor(py::handle obj) {
  if (obj.is_none()) return Tensor();
  PyObject* p = obj.ptr();
  if (!THPVariable_CheckExact(p) && Py_TYPE(p) != parameter_type()) return std::nullopt;
  return THPVariable_Unpack(p);
}

// Wrapper and mode keys under which a tensor is not what the kernels read: Python subclasses' and
// functorch's wrappers, functionalization.
const c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                        c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                        c10::DispatchKey::Functionalize});

bool plain_like(const Tensor& t, const Tensor& x) {
  return t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.layout() == at::kStrided &&
         !t.key_set().has_any(kWrapperKeys);
}

bool no_mode_active() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !torch::jit::tracer::isTracing() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// devices: bit 0 the backend serves CPU tensors here, bit 1 CUDA tensors.
py::object layer_norm(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle residual_obj,
                      py::handle eps_obj, py::handle prenorm_obj, int devices) {
  const auto x = plain_tensor(x_obj), weight = plain_tensor(weight_obj), bias = plain_tensor(bias_obj),
             residual = plain_tensor(residual_obj);
  if (!x || !weight || !bias || !residual || !x->defined()) return py::none();
  if (!(PyFloat_Check(eps_obj.ptr()) || PyLong_Check(eps_obj.ptr())) || !PyBool_Check(prenorm_obj.ptr())) {
    return py::none();
  }
  const double eps = eps_obj.cast<double>();
  const bool prenorm = prenorm_obj.ptr() == Py_True;
  const auto dtype = x->scalar_type();
  const int device_bit = x->is_cpu() ? 1 : x->is_cuda() ? 2 : 0;
  if ((devices & device_bit) == 0 || !(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) ||
      !plain_like(*x, *x) || x->dim() == 0 || x->numel() == 0) {
    return py::none();
  }
  const int64_t n = x->size(-1);
  auto vector_ok = [&](const Tensor& t) {
    return !t.defined() || (plain_like(t, *x) && t.dim() == 1 && t.size(0) == n && t.is_contiguous());
  };
  if (!vector_ok(*weight) || !vector_ok(*bias) || (prenorm && !residual->defined()) ||
      (residual->defined() && !(plain_like(*residual, *x) && residual->sizes() == x->sizes())) ||
      !(eps >= 0.0 && eps <= std::numeric_limits<float>::max()) || !no_mode_active()) {
    return py::none();
  }

  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x->requires_grad() || (weight->defined() && weight->requires_grad()) ||
                           (bias->defined() && bias->requires_grad()) ||
                           (residual->defined() && residual->requires_grad()));
  variable_list out;
  {
    const py::gil_scoped_release no_gil;
    if (needs_grad) {
      out = LayerNormFunction::apply(*x, opt(*residual), opt(*weight), opt(*bias), eps, prenorm);
    } else {
      auto [y, mean, rstd, sum] = call_fwd(as_rows(*x), residual->defined() ? as_rows(*residual) : *residual,
                                           *weight, *bias, eps, prenorm);
      out = prenorm ? variable_list{shaped_like(y, *x), shaped_like(sum, *x)} : variable_list{shaped_like(y, *x)};
    }
  }
  if (prenorm) return py::make_tuple(out[0], out[1]);
  return py::cast(out[0]);
}

}  // namespace

void bind_layer_norm(py::module_& m) {
  m.def("layer_norm_eager", &layer_norm,
        "ops.layer_norm's eager fast path for the C++ backends: the outputs, or None when the call is not the "
        "plain case (ops.layer_norm then takes its Python path)");
  m.def(
      "set_layer_norm_differentiable_backward", [](py::object fn) { *differentiable_backward = std::move(fn); },
      "fn(x, residual, weight, has_bias, eps, dy, dsum) -> (dx, dresidual, dweight, dbias) as a differentiable graph");
}

}  // namespace eager
}  // namespace ctxkern

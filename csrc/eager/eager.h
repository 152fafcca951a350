// Eager entries of the public ops for the C++ backends, in ctxkern._C (see csrc/eager/<op>.cpp).
#pragma once
#include <torch/extension.h>

namespace ctxkern {
namespace eager {

void bind_layer_norm(pybind11::module_& m);

}  // namespace eager
}  // namespace ctxkern

// Storage dtype tag shared by the torch-free CUDA launchers (csrc/cuda/*.h) and the glue that picks it.
#pragma once

namespace ctxkern {
namespace cuda {

// Storage dtype of the tensor operands of an op; statistics and workspaces are always fp32.
enum class DType { F32, F16, BF16 };

}  // namespace cuda
}  // namespace ctxkern

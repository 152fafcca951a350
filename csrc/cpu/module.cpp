// The Python module of one build of the CPU kernels (ctxkern._cpu_avx512, _cpu_avx2 or _cpu_default).
// Importing it runs the TORCH_LIBRARY_IMPL(ctxkern, CPU) registrations of csrc/cpu/*.cpp; ctxkern/_dispatch.py
// imports exactly one, the widest the CPU runs.
#include <torch/extension.h>

#define CTXKERN_STRINGIFY_(x) #x
#define CTXKERN_STRINGIFY(x) CTXKERN_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.attr("capability") = CTXKERN_STRINGIFY(CTXKERN_CPU_CAPABILITY_NAME); }

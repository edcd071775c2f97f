// fastmix op schemas: one place that lists every operator the extensions implement.
// Implementations: csrc/cpu/*.cpp (registered by csrc/cpu/dispatch.cpp, TORCH_LIBRARY_IMPL(fastmix, CPU), for the
// CPU's instruction set) and csrc/cuda/*.cu (CUDA).
// Python registers the fake (meta) kernels and autograd formulas (fastmix/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

// fastmix._C.cpu_capability() -> "avx512" | "avx2" | "default"; RuntimeError when FASTMIX_CPU_CAPABILITY names
// one this CPU cannot run (csrc/cpu/dispatch.cpp).
PyObject* py_cpu_capability(PyObject*, PyObject*) {
  std::string error;
  const char* name = fastmix::cpu_capability(&error);
  if (name == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return PyUnicode_FromString(name);
}

// fastmix._C.cpu_capabilities() -> [(name, usable here)], every capability compiled in, best first.
PyObject* py_cpu_capabilities(PyObject*, PyObject*) {
  const auto caps = fastmix::cpu_capabilities();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(caps.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < caps.size(); ++i) {
    PyObject* item = Py_BuildValue("(sO)", caps[i].first.c_str(), caps[i].second ? Py_True : Py_False);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

PyMethodDef methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS, "The instruction set the CPU kernels run with in this process."},
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS, "[(name, usable here)] for every compiled capability."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import fastmix._C` loads this shared object, which runs the static TORCH_LIBRARY initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastmix C++ ops (torch.ops.fastmix)", -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmix, m) {
  // Orthonormal block DCT-II (inverse=false) or DCT-III (inverse=true) over the last two dims.
  m.def("block_dct(Tensor x, int block, bool inverse) -> Tensor");
  // Fused mix: every output block is  A_I @ sum_t w_t X_t[r_I:r_I+R, s_J:s_J+R] @ B_J^T  (or per-frequency
  // weights applied after the transform), masked by `pos` (output slot per channel id, -1 = removed),
  // signed by the counter hash of `seed` when use_seed, written as channels or (pixels=True, plain DCT
  // geometry only) as the block inverse. row_mat (Hb, 8, R), row_start (Hb), col_mat (Wb, 8, R'), col_start (Wb).
  m.def(
      "mix_fwd(Tensor x, Tensor index, Tensor weight, Tensor pos, int n_kept, SymInt seed, bool use_seed, "
      "bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start, "
      "ScalarType? out_dtype, Tensor? noise_scale=None, Tensor? noise_table=None, SymInt noise_seed=0) -> Tensor");
  // Noise (when noise_table is given): every output coefficient gets noise_table[h >> (32 - B)] * noise_scale[channel]
  // added after the sign flip, h the counter hash of noise_seed (csrc/noise.h, fastmix/ops/noise.py); noise_scale is
  // float32 (C*64,), noise_table float32 (2^B,). An additive constant: mix_bwd does not see it.
  // seed is a SymInt so that torch.compile keeps it symbolic: a fresh seed per step (HybridMask) must not
  // recompile the graph. Kernels receive it as a plain int64.
  // Gradients of mix_fwd in x (deterministic: gathered through an inverse index, no atomics) and in weight.
  // Returns empty tensors for the gradients not asked for.
  m.def(
      "mix_bwd(Tensor grad, Tensor x, Tensor index, Tensor weight, Tensor pos, SymInt seed, bool use_seed, "
      "bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start, "
      "bool need_x, bool need_w) -> (Tensor, Tensor)");
}

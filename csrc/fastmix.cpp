// fastmix op schemas: one place that lists every operator the extensions implement.
// Implementations: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastmix, CPU)) and csrc/cuda/*.cu (CUDA).
// Python registers the fake (meta) kernels and autograd formulas (fastmix/ops/*.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fastmix._C` loads this shared object, which runs the static TORCH_LIBRARY initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastmix C++ ops (torch.ops.fastmix)", -1, nullptr};
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
      "ScalarType? out_dtype) -> Tensor");
  // seed is a SymInt so that torch.compile keeps it symbolic: a fresh seed per step (HybridMask) must not
  // recompile the graph. Kernels receive it as a plain int64.
  // Gradients of mix_fwd in x (deterministic: gathered through an inverse index, no atomics) and in weight.
  // Returns empty tensors for the gradients not asked for.
  m.def(
      "mix_bwd(Tensor grad, Tensor x, Tensor index, Tensor weight, Tensor pos, SymInt seed, bool use_seed, "
      "bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start, "
      "bool need_x, bool need_w) -> (Tensor, Tensor)");
}

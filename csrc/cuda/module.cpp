// `import fastmix._C_cuda` loads the CUDA kernels, whose static TORCH_LIBRARY_IMPL(fastmix, CUDA)
// initialisers register them for the schemas of fastmix._C (csrc/fastmix.cpp), which loads first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "fastmix CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Entry point of the compiled extension prong_ext._C.
//
// Loading this module registers the C++ ops of the `prong_ext` torch.library namespace
// (their TORCH_LIBRARY blocks live beside this file) and exposes a few build facts to Python.
#include <Python.h>

#ifndef PRONG_EXT_WITH_CUDA
#define PRONG_EXT_WITH_CUDA 0
#endif

static PyObject* cuda_built(PyObject*, PyObject*) {
  if (PRONG_EXT_WITH_CUDA) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the extension was compiled with CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "prong_ext compiled ops", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

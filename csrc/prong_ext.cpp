// Entry point of the compiled extension prong_ext._C.
//
// Loading this module defines the `prong_ext` torch.library namespace (the only TORCH_LIBRARY
// block for it; Python code adds to it with fragments), whose CPU and CUDA kernels are registered
// beside this file (eigh_cpu.cpp, cuda/eigh_cuda.cpp), and exposes a few build facts to Python.
// Import torch before this module: it links against libtorch.
#include <Python.h>

#include <torch/library.h>

#include "eigh_common.h"

#ifndef PRONG_EXT_WITH_CUDA
#define PRONG_EXT_WITH_CUDA 0
#endif

TORCH_LIBRARY(prong_ext, m) {
  m.def("batched_eigh(Tensor[] mats) -> (Tensor[] eigenvalues, Tensor[] eigenvectors, Tensor info)");
  m.def("whitening(Tensor[] covs, float eps, str kind) -> (Tensor[] U, Tensor[] U_inv)");
}

static PyObject* cuda_built(PyObject*, PyObject*) {
  if (PRONG_EXT_WITH_CUDA) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

// (build version, run-time version, batched syev usable) of cuSOLVER, or None without CUDA.
static PyObject* cusolver_info(PyObject*, PyObject*) {
#if PRONG_EXT_WITH_CUDA
  try {
    return Py_BuildValue("(iiO)", prong_ext::cusolver_build_version(),
                         prong_ext::cusolver_runtime_version(),
                         prong_ext::xsyev_batched_available() ? Py_True : Py_False);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
#else
  Py_RETURN_NONE;
#endif
}

// batch_chunk(n, batch, max_elements=-1): matrices per batched cuSOLVER call (eigh_common.h);
// max_elements < 0 takes the limit in use (INT32_MAX, or the test hook's).
static PyObject* batch_chunk(PyObject*, PyObject* args) {
  long long n = 0, batch = 0, max_elements = -1;
  if (!PyArg_ParseTuple(args, "LL|L", &n, &batch, &max_elements)) return nullptr;
  try {
    const int64_t limit = max_elements < 0 ? prong_ext::batch_max_elements() : max_elements;
    return PyLong_FromLongLong(prong_ext::batch_chunk(n, batch, limit));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

static PyMethodDef methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "True when the extension was compiled with CUDA kernels."},
    {"cusolver_info", cusolver_info, METH_NOARGS,
     "(cuSOLVER version at build time, at run time, cusolverDnXsyevBatched usable), or None "
     "without CUDA. Versions read major*1000 + minor*100 + patch."},
    {"batch_chunk", batch_chunk, METH_VARARGS,
     "batch_chunk(n, batch, max_elements=-1): matrices of size n per batched cuSOLVER call, so "
     "that n * n * count <= max_elements (INT32_MAX, or PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS, when "
     "negative); 0 when one matrix is larger."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "prong_ext compiled ops", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

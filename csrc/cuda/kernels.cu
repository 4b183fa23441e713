// Kernels declared in kernels.h. Grid: x strides over a matrix's elements, y picks the matrix.
#include "kernels.h"

#include <algorithm>

namespace prong_ext::cuda {
namespace {

constexpr int kThreads = 256;

dim3 grid_for(int64_t elems, int count) {
  const int64_t blocks = std::min<int64_t>((elems + kThreads - 1) / kThreads, 4096);
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), static_cast<unsigned>(count));
}

template <typename T>
__global__ void unstack_kernel(const T* __restrict__ src, PtrPack<T> dst, int64_t rows,
                               int64_t cols, bool transpose) {
  const int64_t elems = rows * cols;
  const T* s = src + static_cast<int64_t>(blockIdx.y) * elems;
  T* d = dst.p[blockIdx.y];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elems;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, j = e - i * cols;
    d[e] = transpose ? s[j * rows + i] : s[e];
  }
}

template <typename T>
__global__ void whiten_scale_kernel(const T* __restrict__ m, const T* __restrict__ lam, T eps,
                                    int64_t n, bool pca, PtrPack<T> out_a, PtrPack<T> out_b) {
  const int64_t elems = n * n;
  const T* mb = m + static_cast<int64_t>(blockIdx.y) * elems;  // mb[k * n + i] = Q[i][k]
  const T* lb = lam + static_cast<int64_t>(blockIdx.y) * n;
  T* a = out_a.p[blockIdx.y];
  T* b = out_b.p[blockIdx.y];
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elems;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    const T l_j = max(lb[j], T(0)) + eps;
    const T q_ij = mb[j * n + i];
    if (pca) {
      a[e] = mb[e] * rsqrt(max(lb[i], T(0)) + eps);  // s_i Q[j][i]
    } else {
      a[e] = q_ij * rsqrt(l_j);  // Q[i][j] s_j
    }
    b[e] = q_ij * sqrt(l_j);  // Q[i][j] r_j
  }
}

}  // namespace

template <typename T>
cudaError_t launch_unstack(const T* src, const PtrPack<T>& dst, int count, int64_t rows,
                           int64_t cols, bool transpose, cudaStream_t stream) {
  if (count <= 0 || rows * cols == 0) return cudaSuccess;
  unstack_kernel<T><<<grid_for(rows * cols, count), kThreads, 0, stream>>>(src, dst, rows, cols,
                                                                             transpose);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_whiten_scale(const T* m, const T* lam, T eps, int count, int64_t n, bool pca,
                                const PtrPack<T>& out_a, const PtrPack<T>& out_b,
                                cudaStream_t stream) {
  if (count <= 0 || n == 0) return cudaSuccess;
  whiten_scale_kernel<T><<<grid_for(n * n, count), kThreads, 0, stream>>>(m, lam, eps, n, pca,
                                                                           out_a, out_b);
  return cudaGetLastError();
}

template cudaError_t launch_unstack<float>(const float*, const PtrPack<float>&, int, int64_t,
                                           int64_t, bool, cudaStream_t);
template cudaError_t launch_unstack<double>(const double*, const PtrPack<double>&, int, int64_t,
                                            int64_t, bool, cudaStream_t);
template cudaError_t launch_whiten_scale<float>(const float*, const float*, float, int, int64_t,
                                                bool, const PtrPack<float>&,
                                                const PtrPack<float>&, cudaStream_t);
template cudaError_t launch_whiten_scale<double>(const double*, const double*, double, int,
                                                 int64_t, bool, const PtrPack<double>&,
                                                 const PtrPack<double>&, cudaStream_t);

}  // namespace prong_ext::cuda

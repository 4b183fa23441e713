// Small CUDA kernels of the batched eigh / whitening ops (kernels.cu), free of torch headers so
// that nvcc compiles them quickly. Each launcher covers up to kMaxPtrs matrices of one size group
// (one launch, blockIdx.y = matrix) and returns cudaGetLastError() for the caller to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prong_ext::cuda {

constexpr int kMaxPtrs = 64;

// Output pointers of one launch, passed by value as a kernel argument (no device-side table).
template <typename T>
struct PtrPack {
  T* p[kMaxPtrs];
};

// dst.p[b] (rows, cols) row-major <- src[b] (rows, cols), or src[b]^T when `transpose`
// (src[b] then holds (cols, rows)). src: (count, rows, cols) contiguous.
template <typename T>
cudaError_t launch_unstack(const T* src, const PtrPack<T>& dst, int count, int64_t rows,
                           int64_t cols, bool transpose, cudaStream_t stream);

// Diagonal scaling of the whitening transforms for `count` matrices of size n.
//   m:   (count, n, n) contiguous, m[b] = Q_b^T (eigenvectors as rows: cuSOLVER's column-major Q)
//   lam: (count, n) eigenvalues; with l = max(lam, 0) + eps, s = l^-1/2, r = l^1/2:
//   out_a.p[b][i][j] = pca ? s_i Q[j][i] : Q[i][j] s_j     (diag(s) Q^T, or Q diag(s))
//   out_b.p[b][i][j] = Q[i][j] r_j                           (Q diag(r))
template <typename T>
cudaError_t launch_whiten_scale(const T* m, const T* lam, T eps, int count, int64_t n, bool pca,
                                const PtrPack<T>& out_a, const PtrPack<T>& out_b,
                                cudaStream_t stream);

}  // namespace prong_ext::cuda

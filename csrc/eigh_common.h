// Shared pieces of the batched eigh / whitening ops: argument checks, error messages and the
// declarations of the per-device kernels registered in eigh_cpu.cpp and cuda/eigh_cuda.cpp.
//
// Contract of both ops (see docs/algorithm.md, "New whitening coefficients"):
//   batched_eigh(Tensor[] mats) -> (Tensor[] eigenvalues, Tensor[] eigenvectors, Tensor info)
//     mats[i]: (n_i, n_i) symmetric, float32 or float64, all on one device; only the lower triangle
//     is read (torch.linalg.eigh's UPLO='L'). eigenvalues[i]: (n_i,) ascending; eigenvectors[i]:
//     (n_i, n_i) contiguous, eigenvectors as columns; info: (len(mats),) int32 on the device of the
//     inputs, 0 = converged. A matrix that does not converge is retried in float64, then on the CPU;
//     info is nonzero only when every attempt failed (its eigenpairs are then NaN).
//   whitening(Tensor[] covs, float eps, str kind) -> (Tensor[] U, Tensor[] U_inv)
//     Sigma = Q diag(lam) Q^T, lam clamped >= 0, s = (lam + eps)^-1/2, r = (lam + eps)^1/2:
//       pca: U = diag(s) Q^T          U_inv = Q diag(r)
//       zca: U = Q diag(s) Q^T        U_inv = Q diag(r) Q^T
// Both ops check every matrix for NaN/Inf before any work and raise naming the offending indices;
// outputs are fresh tensors (no output aliases an input or another output), inputs are never written.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace prong_ext {

using EighResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;
using WhiteningResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Validates the matrix list of `op`: non-empty, square 2-D float32/float64 tensors on one device.
inline void check_matrices(at::TensorList mats, const char* op, const char* arg) {
  TORCH_CHECK(!mats.empty(), "prong_ext.", op, ": ", arg, " must hold at least one matrix");
  const auto device = mats[0].device();
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& m = mats[i];
    TORCH_CHECK(m.defined(), "prong_ext.", op, ": ", arg, "[", i, "] is undefined");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1), "prong_ext.", op, ": ", arg, "[", i,
                "] must be a square (n, n) matrix, got shape ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble, "prong_ext.", op,
                ": ", arg, "[", i, "] must be float32 or float64, got ", m.scalar_type());
    TORCH_CHECK(m.device() == device, "prong_ext.", op, ": all of ", arg,
                " must be on one device; ", arg, "[0] is on ", device, ", ", arg, "[", i,
                "] on ", m.device());
  }
}

// Returns true for 'zca', false for 'pca'; raises ValueError for anything else or eps <= 0.
inline bool check_whitening_args(double eps, c10::string_view kind) {
  TORCH_CHECK_VALUE(eps > 0.0, "prong_ext.whitening: eps=", eps,
                    " must be > 0 (it bounds the step multiplier (lam + eps)^-1/2)");
  TORCH_CHECK_VALUE(kind == "pca" || kind == "zca", "prong_ext.whitening: kind='", std::string(kind),
                    "' must be 'pca' or 'zca'");
  return kind == "zca";
}

inline std::string join_indices(const std::vector<int64_t>& idx) {
  std::ostringstream out;
  out << "[";
  for (size_t k = 0; k < idx.size(); ++k) out << (k ? ", " : "") << idx[k];
  out << "]";
  return out.str();
}

// Raises ValueError naming the matrices with NaN/Inf entries (no-op when `bad` is empty).
inline void raise_if_not_finite(const std::vector<int64_t>& bad, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(bad.empty(), "prong_ext.", op, ": NaN or Inf in ", arg, join_indices(bad),
                    " (indices into ", arg, "); nothing was computed");
}

// Raises naming the matrices whose eigendecomposition failed every attempt (whitening only;
// batched_eigh reports them through its info output).
inline void raise_if_failed(const std::vector<int64_t>& failed, const char* op, const char* arg) {
  TORCH_CHECK(failed.empty(), "prong_ext.", op, ": the eigendecomposition of ", arg,
              join_indices(failed),
              " did not converge (also retried in float64 and on the CPU); the matrices are "
              "too ill-conditioned or not symmetric");
}

// Test hook for the retry paths, which real inputs rarely reach: PRONG_EXT_DEBUG_EIGH_FAIL="1,4:all"
// makes matrix 1 report non-convergence on its first attempt (CPU) or on every GPU attempt (CUDA,
// so it ends on the CPU), and matrix 4 on every attempt. Returns 0 (no failure), 1 or 2 (":all").
inline int debug_fail_mode(int64_t index) {
  const char* spec = std::getenv("PRONG_EXT_DEBUG_EIGH_FAIL");
  if (spec == nullptr) return 0;
  std::istringstream in(spec);
  std::string item;
  while (std::getline(in, item, ',')) {
    const bool all = item.size() > 4 && item.compare(item.size() - 4, 4, ":all") == 0;
    try {
      if (std::stoll(all ? item.substr(0, item.size() - 4) : item) == index) return all ? 2 : 1;
    } catch (const std::exception&) {
      TORCH_CHECK(false, "PRONG_EXT_DEBUG_EIGH_FAIL='", spec, "': expected indices like '1,4:all'");
    }
  }
  return 0;
}

// Largest number of matrices per batched cuSOLVER call: cusolverDnXsyevBatched (and the Jacobi
// syevjBatched) address the whole batch with 32-bit ints, so n * lda * count (lda = n) must stay
// <= max_elements, INT32_MAX in use. Returns min(batch, max_elements / n^2): `batch` when n = 0,
// 0 when a single matrix is already larger. A batch is solved in chunks of this many matrices,
// the last one shorter.
inline int64_t batch_chunk(int64_t n, int64_t batch, int64_t max_elements) {
  TORCH_CHECK(n >= 0 && batch >= 0 && max_elements >= 0, "prong_ext: batch_chunk(n=", n,
              ", batch=", batch, ", max_elements=", max_elements, ") takes non-negative sizes");
  if (n == 0) return batch;
  if (n > max_elements / n) return 0;  // n * n > max_elements (and no overflow computing it)
  return std::min(batch, max_elements / (n * n));
}

// The max_elements of batch_chunk: INT32_MAX, or less when the test hook
// PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS=k sets it (so that small batches are split in chunks the way
// batches past 2^31 elements are).
inline int64_t batch_max_elements() {
  constexpr int64_t kInt32Max = 2147483647;
  const char* spec = std::getenv("PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS");
  if (spec == nullptr || spec[0] == '\0') return kInt32Max;
  int64_t value = -1;
  try {
    value = std::stoll(spec);
  } catch (const std::exception&) {
  }
  TORCH_CHECK(value > 0, "PRONG_EXT_DEBUG_BATCH_MAX_ELEMENTS='", spec, "': expected a positive integer");
  return std::min(value, kInt32Max);
}

// CPU kernels (eigh_cpu.cpp).
EighResult batched_eigh_cpu(at::TensorList mats);
WhiteningResult whitening_cpu(at::TensorList covs, double eps, c10::string_view kind);

// CPU eigendecomposition of one matrix with the float64 retry: returns (w, Q, info) in the
// matrix's dtype, Q contiguous; info != 0 when float64 failed too (w and Q are then NaN).
// debug_fail: see debug_fail_mode (1: the first attempt fails, 2: every attempt fails).
std::tuple<at::Tensor, at::Tensor, int> eigh_one_cpu(const at::Tensor& a, int debug_fail = 0);

#if PRONG_EXT_WITH_CUDA
// cuSOLVER facts for Python: version at build time, at run time, and whether the batched
// syev (cusolverDnXsyevBatched) path is compiled in and usable with the loaded library.
int cusolver_build_version();
int cusolver_runtime_version();
bool xsyev_batched_available();
#endif

}  // namespace prong_ext

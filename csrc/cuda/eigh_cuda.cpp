// CUDA kernels of prong_ext::batched_eigh and prong_ext::whitening (contract: eigh_common.h).
//
// The matrices are grouped by (size, dtype) and stacked, one buffer per group; each group is one
// batched cuSOLVER call on the current stream with torch's cuSOLVER handle (one per chunk of
// batch_chunk matrices where n * n * batch would pass INT32_MAX, cuSOLVER's batch addressing):
//   n <= 32: cusolverDn{S,D}syevjBatched (Jacobi)
//   n >  32: cusolverDnXsyevBatched when the cuSOLVER headers and the loaded library have it,
//            else one cusolverDn{S,D}syevd per matrix, spread over a few side streams.
// Before any solver runs, every matrix is checked for NaN/Inf (one host sync); after all groups
// are launched, every info is read (one host sync). A float32 matrix that did not converge is
// solved again in float64, then (as any float64 failure) on the CPU. Workspaces come from torch's
// caching allocator. cuSOLVER works column-major: a row-major matrix read column-major is its
// transpose, so the fill mode UPPER reads the row-major lower triangle (torch's UPLO='L'), and the
// eigenvectors come back as rows: group buffer a[b] = Q_b^T.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>

#include "../eigh_common.h"
#include "kernels.h"

// cusolverDnXsyevBatched appeared in cuSOLVER 11.7.1 (CUDA 12.6 Update 2).
constexpr int kXsyevBatchedMinVersion = 11701;
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
#define PRONG_EXT_HAS_XSYEV_BATCHED 1
#else
#define PRONG_EXT_HAS_XSYEV_BATCHED 0
#endif

namespace prong_ext {
namespace {

constexpr int kSyevjMaxN = 32;  // cusolverDn<t>syevjBatched handles n <= 32
constexpr int kSideLanes = 4;   // side streams of the per-matrix syevd fallback
constexpr cusolverEigMode_t kJobz = CUSOLVER_EIG_MODE_VECTOR;
constexpr cublasFillMode_t kUplo = CUBLAS_FILL_MODE_UPPER;  // = row-major lower triangle

const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cuSOLVER status";
  }
}

#define PRONG_CUSOLVER_CHECK(expr)                                                              \
  do {                                                                                          \
    const cusolverStatus_t status_ = (expr);                                                    \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "prong_ext: ", #expr, " failed with ",     \
                cusolver_status_name(status_), " (", static_cast<int>(status_), ")");           \
  } while (0)

#define PRONG_CUDA_CHECK(expr)                                                                  \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    TORCH_CHECK(err_ == cudaSuccess, "prong_ext: ", #expr, " failed: ", cudaGetErrorName(err_), \
                " (", cudaGetErrorString(err_), ")");                                           \
  } while (0)

bool force_syevd_fallback() {
  const char* v = std::getenv("PRONG_EXT_NO_XSYEV_BATCHED");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// One size/dtype group: stacked matrices and the solver's outputs and resources.
struct Group {
  int64_t n = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> idx;  // positions in the op's matrix list
  at::Tensor a;              // (B, n, n): the matrices; after the solve a[b] = Q_b^T
  at::Tensor w;              // (B, n) eigenvalues, ascending
  at::Tensor info;           // (B,) int32 cuSOLVER infos
  // Kept alive until the infos have been read (the stream has then finished with them).
  std::vector<at::Tensor> workspaces;
  std::vector<std::vector<char>> host_workspaces;  // one per batched call
  std::shared_ptr<void> params;
};

std::vector<Group> make_groups(at::TensorList mats, const std::vector<int64_t>& which,
                               std::optional<at::ScalarType> as) {
  std::map<std::pair<int64_t, int>, size_t> slot;
  std::vector<Group> groups;
  for (int64_t i : which) {
    const at::ScalarType dtype = as.value_or(mats[i].scalar_type());
    const auto key = std::make_pair(mats[i].size(0), static_cast<int>(dtype));
    auto it = slot.find(key);
    if (it == slot.end()) {
      it = slot.emplace(key, groups.size()).first;
      groups.emplace_back();
      groups.back().n = key.first;
      groups.back().dtype = dtype;
    }
    groups[it->second].idx.push_back(i);
  }
  for (Group& g : groups) {
    std::vector<at::Tensor> parts;
    parts.reserve(g.idx.size());
    for (int64_t i : g.idx) parts.push_back(mats[i].to(g.dtype));
    g.a = at::stack(parts);  // a fresh buffer: the inputs are never written
    TORCH_CHECK(g.a.is_contiguous(), "prong_ext: internal error: stacked group is not contiguous");
  }
  return groups;
}

// Raises naming every matrix with NaN/Inf (one host sync for all groups).
void check_finite(const std::vector<Group>& groups, const char* op, const char* arg) {
  std::vector<at::Tensor> flags;
  for (const Group& g : groups) flags.push_back(g.a.isfinite().flatten(1).all(1));
  const at::Tensor ok = at::cat(flags).cpu();
  const bool* ok_ptr = ok.data_ptr<bool>();
  std::vector<int64_t> bad;
  int64_t p = 0;
  for (const Group& g : groups) {
    for (int64_t i : g.idx) {
      if (!ok_ptr[p++]) bad.push_back(i);
    }
  }
  std::sort(bad.begin(), bad.end());
  raise_if_not_finite(bad, op, arg);
}

// ---- cuSOLVER calls -------------------------------------------------------------------------

// The batch goes in chunks of batch_chunk matrices (cuSOLVER's 32-bit batch addressing), one
// buffer query per chunk size; the calls run in order on one stream, so they share a workspace.
template <typename T>
void syevj_batched(cusolverDnHandle_t handle, Group& g) {
  const int n = static_cast<int>(g.n);
  const int64_t batch = g.a.size(0);
  const int64_t chunk = batch_chunk(g.n, batch, batch_max_elements());
  TORCH_CHECK(chunk > 0, "prong_ext: a ", g.n, " x ", g.n, " matrix is too large for syevjBatched");
  syevjInfo_t params = nullptr;
  PRONG_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&params));
  g.params = std::shared_ptr<void>(params, [](void* p) {
    cusolverDnDestroySyevjInfo(static_cast<syevjInfo_t>(p));
  });
  // Defaults: tolerance = machine epsilon, 100 sweeps, eigenvalues sorted ascending.
  int lwork = 0;
  int64_t queried = 0;  // the chunk size lwork was queried for
  at::Tensor work;
  for (int64_t first = 0; first < batch; first += chunk) {
    const int count = static_cast<int>(std::min(chunk, batch - first));
    T* a = g.a.data_ptr<T>() + first * g.n * g.n;
    T* w = g.w.data_ptr<T>() + first * g.n;
    int* info = g.info.data_ptr<int>() + first;
    if (count != queried) {
      if constexpr (std::is_same_v<T, float>) {
        PRONG_CUSOLVER_CHECK(cusolverDnSsyevjBatched_bufferSize(handle, kJobz, kUplo, n, a, n, w,
                                                                &lwork, params, count));
      } else {
        PRONG_CUSOLVER_CHECK(cusolverDnDsyevjBatched_bufferSize(handle, kJobz, kUplo, n, a, n, w,
                                                                &lwork, params, count));
      }
      queried = count;
      if (!work.defined() || work.numel() < lwork) {
        work = at::empty({std::max(lwork, 1)}, g.a.options());
        g.workspaces.push_back(work);
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      PRONG_CUSOLVER_CHECK(cusolverDnSsyevjBatched(handle, kJobz, kUplo, n, a, n, w,
                                                   work.data_ptr<T>(), lwork, info, params, count));
    } else {
      PRONG_CUSOLVER_CHECK(cusolverDnDsyevjBatched(handle, kJobz, kUplo, n, a, n, w,
                                                   work.data_ptr<T>(), lwork, info, params, count));
    }
  }
}

#if PRONG_EXT_HAS_XSYEV_BATCHED
// Launches the batch in chunks of batch_chunk matrices (cuSOLVER's 32-bit batch addressing),
// one buffer query per chunk size, and returns how many matrices it launched from the first:
// fewer than the batch (none, usually) when cuSOLVER declines a chunk in its buffer query (a
// size or type limit of this cuSOLVER version); the caller takes the syevd path for the rest.
int64_t xsyev_batched(cusolverDnHandle_t handle, Group& g) {
  const cudaDataType type = g.dtype == at::kFloat ? CUDA_R_32F : CUDA_R_64F;
  const int64_t n = g.n;
  const int64_t batch = g.a.size(0);
  const int64_t chunk = batch_chunk(n, batch, batch_max_elements());
  if (chunk == 0) {
    TORCH_WARN_ONCE("prong_ext: a ", n, " x ", n, " matrix is too large for cusolverDnXsyevBatched; "
                    "using one syevd per matrix instead");
    return 0;
  }
  cusolverDnParams_t params = nullptr;
  PRONG_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
  g.params = std::shared_ptr<void>(params, [](void* p) {
    cusolverDnDestroyParams(static_cast<cusolverDnParams_t>(p));
  });
  const int64_t item = static_cast<int64_t>(g.a.element_size());
  char* const a0 = static_cast<char*>(g.a.data_ptr());
  char* const w0 = static_cast<char*>(g.w.data_ptr());
  size_t device_bytes = 0, host_bytes = 0;
  int64_t queried = 0;  // the chunk size the buffers were queried for
  at::Tensor work;
  for (int64_t first = 0; first < batch; first += chunk) {
    const int64_t count = std::min(chunk, batch - first);
    void* a = a0 + first * n * n * item;
    void* w = w0 + first * n * item;
    if (count != queried) {
      const cusolverStatus_t query = cusolverDnXsyevBatched_bufferSize(
          handle, params, kJobz, kUplo, n, type, a, n, type, w, type, &device_bytes, &host_bytes,
          count);
      if (query == CUSOLVER_STATUS_INVALID_VALUE || query == CUSOLVER_STATUS_NOT_SUPPORTED) {
        TORCH_WARN_ONCE("prong_ext: cusolverDnXsyevBatched declined n=", n, ", batch=", count,
                        " (", cusolver_status_name(query), "); using one syevd per matrix instead");
        return first;
      }
      PRONG_CUSOLVER_CHECK(query);
      queried = count;
      if (!work.defined() || static_cast<size_t>(work.numel()) < device_bytes) {
        work = at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))},
                         g.a.options().dtype(at::kByte));
        g.workspaces.push_back(work);
      }
    }
    g.host_workspaces.emplace_back(std::max<size_t>(host_bytes, 1));
    PRONG_CUSOLVER_CHECK(cusolverDnXsyevBatched(handle, params, kJobz, kUplo, n, type, a, n, type, w,
                                                type, work.data_ptr(), device_bytes,
                                                g.host_workspaces.back().data(), host_bytes,
                                                g.info.data_ptr<int>() + first, count));
  }
  return batch;
}
#endif

// Side streams with their own cuSOLVER handles (a handle must not run on two streams at once),
// created once per device and kept for the life of the process.
struct SideLane {
  c10::cuda::CUDAStream stream;
  cusolverDnHandle_t handle;
};
std::mutex side_lanes_mutex;

std::vector<SideLane>& side_lanes(c10::DeviceIndex device) {  // caller holds side_lanes_mutex
  static std::map<c10::DeviceIndex, std::vector<SideLane>> lanes;
  auto& v = lanes[device];
  while (v.size() < static_cast<size_t>(kSideLanes)) {
    c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, device);
    cusolverDnHandle_t handle = nullptr;
    PRONG_CUSOLVER_CHECK(cusolverDnCreate(&handle));
    PRONG_CUSOLVER_CHECK(cusolverDnSetStream(handle, stream.stream()));
    v.push_back(SideLane{stream, handle});
  }
  return v;
}

// Fallback for n > 32 without cusolverDnXsyevBatched: one syevd per matrix on side streams,
// ordered after the current stream's work and joined back into it; matrices first.. of the group.
template <typename T>
void syevd_per_matrix(Group& g, int64_t first) {
  const int n = static_cast<int>(g.n);
  const int64_t batch = g.a.size(0);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  std::lock_guard<std::mutex> lock(side_lanes_mutex);
  std::vector<SideLane>& lanes = side_lanes(current.device_index());
  at::cuda::CUDAEvent ready;
  ready.record(current);
  T* a = g.a.data_ptr<T>();
  T* w = g.w.data_ptr<T>();
  int* info = g.info.data_ptr<int>();
  int lwork = 0;
  if constexpr (std::is_same_v<T, float>) {
    PRONG_CUSOLVER_CHECK(cusolverDnSsyevd_bufferSize(lanes[0].handle, kJobz, kUplo, n, a, n, w, &lwork));
  } else {
    PRONG_CUSOLVER_CHECK(cusolverDnDsyevd_bufferSize(lanes[0].handle, kJobz, kUplo, n, a, n, w, &lwork));
  }
  const int64_t used = std::min<int64_t>(batch - first, kSideLanes);
  for (int64_t l = 0; l < used; ++l) {
    ready.block(lanes[l].stream);
    // Allocated on the current stream, which waits for the lane below before it can be reused.
    g.workspaces.push_back(at::empty({std::max(lwork, 1)}, g.a.options()));
  }
  for (int64_t b = first; b < batch; ++b) {
    const int64_t l = (b - first) % kSideLanes;
    const SideLane& lane = lanes[l];
    T* work = g.workspaces[g.workspaces.size() - used + l].template data_ptr<T>();
    if constexpr (std::is_same_v<T, float>) {
      PRONG_CUSOLVER_CHECK(cusolverDnSsyevd(lane.handle, kJobz, kUplo, n, a + b * n * n, n,
                                            w + b * n, work, lwork, info + b));
    } else {
      PRONG_CUSOLVER_CHECK(cusolverDnDsyevd(lane.handle, kJobz, kUplo, n, a + b * n * n, n,
                                            w + b * n, work, lwork, info + b));
    }
  }
  for (int64_t l = 0; l < used; ++l) {
    at::cuda::CUDAEvent done;
    done.record(lanes[l].stream);
    done.block(current);
  }
}

bool use_xsyev_batched() { return xsyev_batched_available() && !force_syevd_fallback(); }

// Launches every group's solver (asynchronously), then reads all infos (one host sync).
// Returns the infos in group order (group 0's matrices first).
std::vector<int> run_groups(std::vector<Group>& groups) {
  cusolverDnHandle_t handle = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  [[maybe_unused]] const bool batched_syev = use_xsyev_batched();
  std::vector<at::Tensor> infos;
  for (Group& g : groups) {
    const int64_t batch = g.a.size(0);
    TORCH_CHECK(g.n <= INT_MAX / std::max<int64_t>(g.n, 1), "prong_ext: matrices of size ", g.n,
                " are too large for cuSOLVER's 32-bit sizes");
    g.w = at::empty({batch, g.n}, g.a.options());
    g.info = at::empty({batch}, g.a.options().dtype(at::kInt));
    if (g.n <= 1) {  // nothing to solve: w = a, Q = [1]
      g.w.copy_(g.a.view({batch, g.n}));
      g.a.fill_(1);
      g.info.zero_();
    } else if (g.n <= kSyevjMaxN) {
      g.dtype == at::kFloat ? syevj_batched<float>(handle, g) : syevj_batched<double>(handle, g);
    } else {
      int64_t done = 0;  // matrices launched by the batched solver
#if PRONG_EXT_HAS_XSYEV_BATCHED
      if (batched_syev) done = xsyev_batched(handle, g);
#endif
      if (done < batch) {
        g.dtype == at::kFloat ? syevd_per_matrix<float>(g, done) : syevd_per_matrix<double>(g, done);
      }
    }
    infos.push_back(g.info);
  }
  const at::Tensor host = at::cat(infos).cpu();
  const int* p = host.data_ptr<int>();
  return std::vector<int>(p, p + host.numel());
}

// Eigendecomposition of every matrix: the groups hold the results (a[b] = Q^T, w[b] ascending).
struct Solved {
  std::vector<Group> groups;
  std::vector<int> info;  // per input matrix; nonzero only when every attempt failed
};

Solved solve(at::TensorList mats, const char* op, const char* arg) {
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<int64_t> all(count);
  std::iota(all.begin(), all.end(), 0);
  Solved s;
  s.groups = make_groups(mats, all, std::nullopt);
  check_finite(s.groups, op, arg);
  s.info.assign(count, 0);
  // where[i] = (group, slot) of input i
  std::vector<std::pair<size_t, int64_t>> where(count);
  for (size_t gi = 0; gi < s.groups.size(); ++gi) {
    for (size_t k = 0; k < s.groups[gi].idx.size(); ++k) where[s.groups[gi].idx[k]] = {gi, k};
  }
  auto record_infos = [&](const std::vector<Group>& groups, const std::vector<int>& infos) {
    size_t p = 0;
    for (const Group& g : groups) {
      for (int64_t i : g.idx) {
        int v = infos[p++];
        if (v == 0 && debug_fail_mode(i) != 0) v = 1;  // test hook: simulated non-convergence
        TORCH_CHECK(v >= 0, "prong_ext.", op, ": cuSOLVER rejected its argument ", -v, " for ",
                    arg, "[", i, "] (n=", g.n, ", ", g.dtype, "); this is a bug in prong_ext");
        s.info[i] = v;
      }
    }
  };
  record_infos(s.groups, run_groups(s.groups));

  // float32 failures: again in float64 on the GPU.
  std::vector<int64_t> retry;
  for (int64_t i = 0; i < count; ++i) {
    if (s.info[i] != 0 && mats[i].scalar_type() == at::kFloat) retry.push_back(i);
  }
  if (!retry.empty()) {
    std::vector<Group> groups64 = make_groups(mats, retry, at::kDouble);
    record_infos(groups64, run_groups(groups64));
    for (const Group& g64 : groups64) {
      for (size_t k = 0; k < g64.idx.size(); ++k) {
        const int64_t i = g64.idx[k];
        if (s.info[i] != 0) continue;
        Group& g = s.groups[where[i].first];
        g.a[where[i].second].copy_(g64.a[k]);
        g.w[where[i].second].copy_(g64.w[k]);
      }
    }
  }
  // Remaining failures: float64 LAPACK on the CPU; NaN where that fails too.
  for (int64_t i = 0; i < count; ++i) {
    if (s.info[i] == 0) continue;
    Group& g = s.groups[where[i].first];
    const int64_t k = where[i].second;
    auto [w, q, status] =
        eigh_one_cpu(mats[i].to(at::kCPU, at::kDouble), debug_fail_mode(i) == 2 ? 2 : 0);
    if (status == 0) {
      g.a[k].copy_(q.mT());
      g.w[k].copy_(w);
      s.info[i] = 0;
    } else {
      g.a[k].fill_(std::numeric_limits<double>::quiet_NaN());
      g.w[k].fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  return s;
}

template <typename T>
void unstack(const at::Tensor& src, const std::vector<at::Tensor>& dst,
             const std::vector<int64_t>& idx, int64_t rows, int64_t cols, bool transpose) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t per = rows * cols;
  for (size_t first = 0; first < idx.size(); first += cuda::kMaxPtrs) {
    const int count = static_cast<int>(std::min<size_t>(cuda::kMaxPtrs, idx.size() - first));
    cuda::PtrPack<T> pack{};
    for (int b = 0; b < count; ++b) pack.p[b] = dst[idx[first + b]].data_ptr<T>();
    PRONG_CUDA_CHECK(cuda::launch_unstack<T>(src.data_ptr<T>() + first * per, pack, count, rows,
                                             cols, transpose, stream));
  }
}

// out_a/out_b: per-matrix destination pointers (or group buffer slices) for each slot of g.
template <typename T>
void whiten_scale(const Group& g, double eps, bool pca, const std::vector<T*>& out_a,
                  const std::vector<T*>& out_b) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = g.n;
  for (size_t first = 0; first < g.idx.size(); first += cuda::kMaxPtrs) {
    const int count = static_cast<int>(std::min<size_t>(cuda::kMaxPtrs, g.idx.size() - first));
    cuda::PtrPack<T> pa{}, pb{};
    for (int b = 0; b < count; ++b) {
      pa.p[b] = out_a[first + b];
      pb.p[b] = out_b[first + b];
    }
    PRONG_CUDA_CHECK(cuda::launch_whiten_scale<T>(g.a.data_ptr<T>() + first * n * n,
                                                  g.w.data_ptr<T>() + first * n,
                                                  static_cast<T>(eps), count, n, pca, pa, pb,
                                                  stream));
  }
}

template <typename T>
std::vector<T*> slices(const at::Tensor& buffer) {  // pointers to buffer[b], b < B
  std::vector<T*> out;
  const int64_t per = buffer[0].numel();
  for (int64_t b = 0; b < buffer.size(0); ++b) out.push_back(buffer.data_ptr<T>() + b * per);
  return out;
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& outs, const std::vector<int64_t>& idx) {
  std::vector<T*> out;
  for (int64_t i : idx) out.push_back(outs[i].data_ptr<T>());
  return out;
}

template <typename T>
void whiten_group(const Group& g, double eps, bool zca, const std::vector<at::Tensor>& u,
                  const std::vector<at::Tensor>& u_inv) {
  if (!zca) {  // U = diag(s) Q^T, U^-1 = Q diag(r): straight into the outputs
    whiten_scale<T>(g, eps, true, pointers<T>(u, g.idx), pointers<T>(u_inv, g.idx));
    return;
  }
  // ZCA: Q diag(s) and Q diag(r), then one batched GEMM each with Q^T (= g.a).
  const at::Tensor qs = at::empty_like(g.a);
  const at::Tensor qr = at::empty_like(g.a);
  whiten_scale<T>(g, eps, false, slices<T>(qs), slices<T>(qr));
  unstack<T>(qs.bmm(g.a), u, g.idx, g.n, g.n, false);
  unstack<T>(qr.bmm(g.a), u_inv, g.idx, g.n, g.n, false);
}

}  // namespace

int cusolver_build_version() { return CUSOLVER_VERSION; }

int cusolver_runtime_version() {
  int version = 0;
  PRONG_CUSOLVER_CHECK(cusolverGetVersion(&version));
  return version;
}

bool xsyev_batched_available() {
  static const bool available =
      PRONG_EXT_HAS_XSYEV_BATCHED && cusolver_runtime_version() >= kXsyevBatchedMinVersion;
  return available;
}

EighResult batched_eigh_cuda(at::TensorList mats) {
  check_matrices(mats, "batched_eigh", "mats");
  const c10::cuda::CUDAGuard guard(mats[0].device());
  Solved s = solve(mats, "batched_eigh", "mats");
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<at::Tensor> evals(count), evecs(count);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = mats[i].size(0);
    evals[i] = at::empty({n}, mats[i].options());
    evecs[i] = at::empty({n, n}, mats[i].options());
  }
  for (const Group& g : s.groups) {
    if (g.n == 0) continue;
    if (g.dtype == at::kFloat) {
      unstack<float>(g.a, evecs, g.idx, g.n, g.n, /*transpose=*/true);  // Q = (Q^T)^T
      unstack<float>(g.w, evals, g.idx, 1, g.n, false);
    } else {
      unstack<double>(g.a, evecs, g.idx, g.n, g.n, true);
      unstack<double>(g.w, evals, g.idx, 1, g.n, false);
    }
  }
  at::Tensor info = at::empty({count}, at::TensorOptions().dtype(at::kInt));
  std::copy(s.info.begin(), s.info.end(), info.data_ptr<int32_t>());
  return {std::move(evals), std::move(evecs), info.to(mats[0].device())};
}

WhiteningResult whitening_cuda(at::TensorList covs, double eps, c10::string_view kind) {
  const bool zca = check_whitening_args(eps, kind);
  check_matrices(covs, "whitening", "covs");
  const c10::cuda::CUDAGuard guard(covs[0].device());
  Solved s = solve(covs, "whitening", "covs");
  std::vector<int64_t> failed;
  for (size_t i = 0; i < s.info.size(); ++i) {
    if (s.info[i] != 0) failed.push_back(static_cast<int64_t>(i));
  }
  raise_if_failed(failed, "whitening", "covs");
  const int64_t count = static_cast<int64_t>(covs.size());
  std::vector<at::Tensor> u(count), u_inv(count);
  for (int64_t i = 0; i < count; ++i) {
    u[i] = at::empty_like(covs[i], at::MemoryFormat::Contiguous);
    u_inv[i] = at::empty_like(covs[i], at::MemoryFormat::Contiguous);
  }
  for (const Group& g : s.groups) {
    if (g.n == 0) continue;
    if (g.dtype == at::kFloat) {
      whiten_group<float>(g, eps, zca, u, u_inv);
    } else {
      whiten_group<double>(g, eps, zca, u, u_inv);
    }
  }
  return {std::move(u), std::move(u_inv)};
}

TORCH_LIBRARY_IMPL(prong_ext, CUDA, m) {
  m.impl("batched_eigh", &batched_eigh_cuda);
  m.impl("whitening", &whitening_cuda);
}

}  // namespace prong_ext

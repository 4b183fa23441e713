// CPU kernels of prong_ext::batched_eigh and prong_ext::whitening: LAPACK through ATen
// (at::linalg_eigh, one call per matrix): matrices of 256 and wider one at a time (LAPACK
// threads each), the smaller ones spread over the intra-op threads, largest first.
// Contract: eigh_common.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linalg_eigh.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>

#include "eigh_common.h"

namespace prong_ext {
namespace {

// Below this much work (sum of n^3 over the matrices) the threads cost more than they save.
constexpr double kParallelMinWork = 1e6;

// Calls fn(i) for every matrix, largest first, pulling from a shared counter so that one large
// matrix does not hold back a thread's whole chunk. One matrix, or little work, runs inline
// (where LAPACK may still use all threads itself).
// Matrices at least this wide run one at a time, LAPACK spreading each over every thread;
// inside at::parallel_for LAPACK runs single-threaded, which loses on a few large matrices.
constexpr int64_t kSerialMinSize = 256;

template <typename F>
void for_each_matrix(at::TensorList mats, const F& fn) {
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return mats[a].size(0) > mats[b].size(0); });
  int64_t first_small = 0;
  while (first_small < count && mats[order[first_small]].size(0) >= kSerialMinSize) {
    fn(order[first_small++]);
  }
  double work = 0;
  for (int64_t k = first_small; k < count; ++k) {
    work += std::pow(static_cast<double>(mats[order[k]].size(0)), 3);
  }
  const int64_t small = count - first_small;
  std::atomic<int64_t> next{first_small};
  const int64_t workers = work < kParallelMinWork
                              ? 1
                              : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), small));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < count; k = next.fetch_add(1)) fn(order[k]);
  });
}

std::vector<int64_t> non_finite_indices(at::TensorList mats) {
  std::vector<int64_t> bad;
  for (size_t i = 0; i < mats.size(); ++i) {
    if (!mats[i].isfinite().all().item<bool>()) bad.push_back(static_cast<int64_t>(i));
  }
  return bad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int> eigh_one_cpu(const at::Tensor& a_in, int debug_fail) {
  const at::Tensor a = a_in.device().is_cpu() ? a_in : a_in.cpu();
  if (debug_fail == 0) {
    try {
      auto [w, q] = at::linalg_eigh(a, "L");
      return {w, q.contiguous(), 0};
    } catch (const c10::Error&) {
      // did not converge: retry in float64 below
    }
  }
  if (a.scalar_type() != at::kDouble && debug_fail < 2) {
    try {
      auto [w, q] = at::linalg_eigh(a.to(at::kDouble), "L");
      return {w.to(a.scalar_type()), q.to(a.scalar_type()).contiguous(), 0};
    } catch (const c10::Error&) {
    }
  }
  const int64_t n = a.size(0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  return {at::full({n}, nan, a.options()), at::full({n, n}, nan, a.options()), 1};
}

EighResult batched_eigh_cpu(at::TensorList mats) {
  check_matrices(mats, "batched_eigh", "mats");
  raise_if_not_finite(non_finite_indices(mats), "batched_eigh", "mats");
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<at::Tensor> evals(count), evecs(count);
  at::Tensor info = at::empty({count}, mats[0].options().dtype(at::kInt));
  int32_t* info_ptr = info.data_ptr<int32_t>();
  for_each_matrix(mats, [&](int64_t i) {
    auto [w, q, status] = eigh_one_cpu(mats[i], debug_fail_mode(i));
    evals[i] = std::move(w);
    evecs[i] = std::move(q);
    info_ptr[i] = status;
  });
  return {std::move(evals), std::move(evecs), std::move(info)};
}

WhiteningResult whitening_cpu(at::TensorList covs, double eps, c10::string_view kind) {
  const bool zca = check_whitening_args(eps, kind);
  check_matrices(covs, "whitening", "covs");
  raise_if_not_finite(non_finite_indices(covs), "whitening", "covs");
  const int64_t count = static_cast<int64_t>(covs.size());
  std::vector<at::Tensor> u(count), u_inv(count);
  std::vector<char> failed(count, 0);
  for_each_matrix(covs, [&](int64_t i) {
    auto [w, q, status] = eigh_one_cpu(covs[i], debug_fail_mode(i));
    if (status != 0) {
      failed[i] = 1;
      return;
    }
    const at::Tensor lam = w.clamp_min(0).add(eps);
    const at::Tensor s = lam.rsqrt();
    const at::Tensor r = lam.sqrt();
    const at::Tensor q_r = q.mul(r.unsqueeze(0));  // Q diag(r)
    if (zca) {
      u[i] = q.mul(s.unsqueeze(0)).matmul(q.mT()).contiguous();
      u_inv[i] = q_r.matmul(q.mT()).contiguous();
    } else {
      u[i] = q.mT().mul(s.unsqueeze(1)).contiguous();  // diag(s) Q^T
      u_inv[i] = q_r.contiguous();
    }
  });
  std::vector<int64_t> failed_idx;
  for (int64_t i = 0; i < count; ++i) {
    if (failed[i]) failed_idx.push_back(i);
  }
  raise_if_failed(failed_idx, "whitening", "covs");
  return {std::move(u), std::move(u_inv)};
}

TORCH_LIBRARY_IMPL(prong_ext, CPU, m) {
  m.impl("batched_eigh", &batched_eigh_cpu);
  m.impl("whitening", &whitening_cpu);
}

}  // namespace prong_ext

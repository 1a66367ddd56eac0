// The only pybind11 file: binds the kernels and reports how the extension was built.
#include <torch/extension.h>
#include <omp.h>

#include <chrono>
#include <memory>

#include "cpu/cpu_dispatch.h"
#include "ops.h"

namespace {

// Progress for the CPU kernels: answers Ctrl-C (the kernel stops between units of work and the
// binding raises KeyboardInterrupt) and passes the work done to `callback` (a Python callable or
// None) at most five times a second. The kernels run without the GIL (other Python threads keep
// running), so the callback takes it for the moment it needs Python.
// The Python object is held through a shared_ptr, so copies of the function (made without the
// GIL) never touch its reference count; the caller keeps the returned function alive, with the
// GIL, until the kernel is done.
patchcore::Progress python_progress(const py::object& callback) {
  auto last = std::make_shared<std::chrono::steady_clock::time_point>();
  auto held = std::make_shared<py::object>(callback);
  return [held, last](int64_t done) -> bool {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) return false;
    const auto now = std::chrono::steady_clock::now();
    if (held->is_none() || now - *last < std::chrono::milliseconds(200)) return true;
    *last = now;
    try {
      (*held)(done);
    } catch (py::error_already_set& error) {
      error.restore();
      return false;
    }
    return true;
  };
}

// Runs a long kernel without the GIL, then re-raises what stopped it early (Ctrl-C, an error in
// the progress callback), if anything did.
template <class Kernel>
auto without_gil(Kernel&& kernel) {
  auto result = [&] {
    py::gil_scoped_release released;
    return kernel();
  }();
  if (PyErr_Occurred()) throw py::error_already_set();
  return result;
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK_VALUE(a.device() == b.device(), what, ": tensors are on different devices");
}

at::Tensor greedy_coreset(const at::Tensor& features, const at::Tensor& initial, int64_t n,
                          const std::string& cuda_kernel, const py::object& progress) {
  TORCH_CHECK_VALUE(cuda_kernel == "cached" || cuda_kernel == "resident",
                    "greedy_coreset: cuda_kernel must be 'cached' or 'resident', got '", cuda_kernel, "'");
  TORCH_CHECK_VALUE(features.dim() == 2 && features.scalar_type() == at::kFloat,
                    "greedy_coreset: features must be a 2-D float32 tensor");
  TORCH_CHECK_VALUE(initial.dim() == 1 && initial.size(0) == features.size(0) &&
                        initial.scalar_type() == at::kFloat,
                    "greedy_coreset: initial distances must be float32 of shape [N]");
  TORCH_CHECK_VALUE(n >= 1 && n <= features.size(0), "greedy_coreset: n must be in [1, N]");
  check_pair(features, initial, "greedy_coreset");
  // A negative (or NaN) start distance would never be raised by an update: the selection could not
  // end correctly. -0.0 becomes +0.0 (as a sign bit it would outrank every distance in a packed key).
  TORCH_CHECK_VALUE(initial.ge(0).all().item<bool>(),
                    "greedy_coreset: initial distances must be non-negative (and not NaN)");
  const at::Tensor start = initial.add(0.0);
  if (features.is_cuda()) {
#ifdef PATCHCORE_WITH_CUDA
    return without_gil([&] {
      return patchcore::greedy_coreset_cuda(
          features, start, n,
          cuda_kernel == "resident" ? patchcore::CoresetKernel::kResident : patchcore::CoresetKernel::kCached);
    });
#else
    TORCH_CHECK(false, "greedy_coreset: this build of patchcore_fast has no CUDA kernels");
#endif
  }
  TORCH_CHECK_VALUE(features.is_cpu(), "greedy_coreset: unsupported device ", features.device());
  const auto report = python_progress(progress);
  return without_gil([&] { return patchcore::greedy_coreset_cpu(features, start, n, report); });
}

std::tuple<at::Tensor, at::Tensor> greedy_coreset_stages(const at::Tensor& features, const at::Tensor& initial,
                                                         int64_t n) {
  TORCH_CHECK_VALUE(features.is_cuda() && features.dim() == 2 && features.scalar_type() == at::kFloat,
                    "greedy_coreset_stages: features must be a 2-D float32 CUDA tensor");
  TORCH_CHECK_VALUE(initial.dim() == 1 && initial.size(0) == features.size(0) && initial.scalar_type() == at::kFloat,
                    "greedy_coreset_stages: initial distances must be float32 of shape [N]");
  TORCH_CHECK_VALUE(n >= 1 && n <= features.size(0), "greedy_coreset_stages: n must be in [1, N]");
  check_pair(features, initial, "greedy_coreset_stages");
#ifdef PATCHCORE_WITH_CUDA
  return patchcore::greedy_coreset_cuda_stages(features, initial, n);
#else
  TORCH_CHECK(false, "greedy_coreset_stages: this build of patchcore_fast has no CUDA kernels");
#endif
}

std::tuple<at::Tensor, at::Tensor> knn(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                       const std::string& cuda_kernel, const py::object& progress) {
  TORCH_CHECK_VALUE(cuda_kernel == "warp16x128" || cuda_kernel == "warp32x64",
                    "knn: cuda_kernel must be 'warp16x128' or 'warp32x64', got '", cuda_kernel, "'");
  TORCH_CHECK_VALUE(queries.dim() == 2 && bank.dim() == 2 && queries.size(1) == bank.size(1),
                    "knn: queries [Q, D] and bank [M, D] must be 2-D with the same D");
  TORCH_CHECK_VALUE(queries.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat,
                    "knn: tensors must be float32");
  TORCH_CHECK_VALUE(k >= 1 && k <= bank.size(0), "knn: k must be in [1, M]");
  check_pair(queries, bank, "knn");
  if (queries.is_cuda()) {
#ifdef PATCHCORE_WITH_CUDA
    TORCH_CHECK_VALUE(k <= patchcore::kCudaKnnMaxK, "knn: the CUDA kernel keeps at most ",
                      patchcore::kCudaKnnMaxK, " neighbours");
    return without_gil([&] { return patchcore::knn_cuda(queries, bank, k, cuda_kernel == "warp32x64" ? 4 : 2); });
#else
    TORCH_CHECK(false, "knn: this build of patchcore_fast has no CUDA kernels");
#endif
  }
  TORCH_CHECK_VALUE(queries.is_cpu(), "knn: unsupported device ", queries.device());
  const auto report = python_progress(progress);
  return without_gil([&] { return patchcore::knn_cpu(queries, bank, k, report); });
}

std::tuple<at::Tensor, at::Tensor, int64_t, int64_t> knn_pruned(const at::Tensor& queries, const at::Tensor& bank,
                                                                int64_t k, const at::Tensor& basis,
                                                                const at::Tensor& bank_screen, double basis_rounding,
                                                                const std::optional<at::Tensor>& bank_extension,
                                                                const py::object& progress) {
  TORCH_CHECK_VALUE(queries.is_cpu() && bank.is_cpu() && basis.is_cpu() && bank_screen.is_cpu(),
                    "knn_pruned: CPU tensors only");
  TORCH_CHECK_VALUE(queries.dim() == 2 && bank.dim() == 2 && queries.size(1) == bank.size(1),
                    "knn_pruned: queries [Q, D] and bank [M, D] must be 2-D with the same D");
  TORCH_CHECK_VALUE(basis.dim() == 2 && basis.size(0) >= 1 && basis.size(1) == bank.size(1),
                    "knn_pruned: basis must be [rank, D]");
  if (bank_extension.has_value()) {
    const at::Tensor& e = *bank_extension;
    TORCH_CHECK_VALUE(e.is_cpu() && e.scalar_type() == at::kFloat, "knn_pruned: bank_extension must be CPU float32");
    TORCH_CHECK_VALUE(bank_screen.dim() == 2 && bank_screen.size(0) == bank.size(0) && bank_screen.size(1) >= 3 &&
                          bank_screen.size(1) < basis.size(0) + 2,
                      "knn_pruned: with an extension, bank_screen must be [M, r1 + 2] with 1 <= r1 < rank");
    TORCH_CHECK_VALUE(e.dim() == 2 && e.size(0) == bank.size(0) && e.size(1) == basis.size(0) + 4 - bank_screen.size(1),
                      "knn_pruned: bank_extension must be [M, rank - r1 + 2]");
  } else {
    TORCH_CHECK_VALUE(bank_screen.dim() == 2 && bank_screen.size(0) == bank.size(0) &&
                          bank_screen.size(1) == basis.size(0) + 2,
                      "knn_pruned: bank_screen must be [M, rank + 2]");
  }
  TORCH_CHECK_VALUE(queries.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat &&
                        basis.scalar_type() == at::kFloat && bank_screen.scalar_type() == at::kFloat,
                    "knn_pruned: tensors must be float32");
  TORCH_CHECK_VALUE(k >= 1 && k <= bank.size(0), "knn_pruned: k must be in [1, M]");
  TORCH_CHECK_VALUE(basis_rounding >= 0 && basis_rounding < 1e-3, "knn_pruned: basis_rounding out of range");
  const auto report = python_progress(progress);
  return without_gil([&] {
    return patchcore::knn_pruned_cpu(queries, bank, k, basis, bank_screen, bank_extension, basis_rounding, report);
  });
}

void check_cpu_float_matrix(const at::Tensor& x, const char* what, const char* name) {
  TORCH_CHECK_VALUE(x.is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat, what, ": ", name,
                    " must be a 2-D float32 CPU tensor");
}

at::Tensor fixed_order_projection(const at::Tensor& features, const at::Tensor& weights) {
  check_cpu_float_matrix(features, "fixed_order_projection", "features");
  check_cpu_float_matrix(weights, "fixed_order_projection", "weights");
  TORCH_CHECK_VALUE(features.size(1) == weights.size(1), "fixed_order_projection: features [N, D], weights [P, D]");
  return without_gil([&] { return patchcore::fixed_order_projection_cpu(features, weights); });
}

at::Tensor mean_distances(const at::Tensor& space, const at::Tensor& centres) {
  check_cpu_float_matrix(space, "mean_distances", "space");
  check_cpu_float_matrix(centres, "mean_distances", "centres");
  TORCH_CHECK_VALUE(space.size(1) == centres.size(1) && centres.size(0) >= 1,
                    "mean_distances: space [N, D], centres [S >= 1, D]");
  return without_gil([&] { return patchcore::mean_distances_cpu(space, centres); });
}

std::unique_ptr<patchcore::CoresetShard> coreset_shard(const at::Tensor& space, const at::Tensor& initial) {
  check_cpu_float_matrix(space, "CoresetShard", "space");
  TORCH_CHECK_VALUE(initial.is_cpu() && initial.scalar_type() == at::kFloat && initial.dim() == 1 &&
                        initial.size(0) == space.size(0),
                    "CoresetShard: initial must be a float32 [N] CPU tensor, one start distance per row");
  return std::make_unique<patchcore::CoresetShard>(space, initial);
}

std::tuple<at::Tensor, at::Tensor> coreset_shard_pass(patchcore::CoresetShard& shard, const at::Tensor& centres) {
  TORCH_CHECK_VALUE(centres.is_cpu() && centres.scalar_type() == at::kFloat && centres.dim() == 2 &&
                        centres.size(1) == shard.dim(),
                    "CoresetShard.pass: centres must be a float32 [b, ", shard.dim(), "] CPU tensor");
  return without_gil([&] { return shard.pass(centres); });
}

std::tuple<at::Tensor, at::Tensor> coreset_shard_pass_gpu(const at::Tensor& space, const at::Tensor& min_distance,
                                                          const at::Tensor& centres) {
  TORCH_CHECK_VALUE(space.is_cuda() && space.dim() == 2 && space.scalar_type() == at::kFloat && space.is_contiguous(),
                    "coreset_shard_pass_cuda: space must be a contiguous float32 [N, D] CUDA tensor");
  TORCH_CHECK_VALUE(min_distance.device() == space.device() && min_distance.scalar_type() == at::kFloat &&
                        min_distance.dim() == 1 && min_distance.size(0) == space.size(0) && min_distance.is_contiguous(),
                    "coreset_shard_pass_cuda: min_distance must be a contiguous float32 [N] tensor on space's device");
  TORCH_CHECK_VALUE(centres.device() == space.device() && centres.scalar_type() == at::kFloat && centres.dim() == 2 &&
                        centres.size(1) == space.size(1),
                    "coreset_shard_pass_cuda: centres must be float32 [b, ", space.size(1), "] on space's device");
#ifdef PATCHCORE_WITH_CUDA
  return without_gil([&] { return patchcore::coreset_shard_pass_cuda(space, min_distance, centres,
                                                                      patchcore::cpu::kCandidates + 1); });
#else
  TORCH_CHECK(false, "coreset_shard_pass_cuda: this build of patchcore_fast has no CUDA kernels");
#endif
}

at::Tensor coreset_pick_batch(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& rows,
                              double bound, int64_t remaining) {
  check_cpu_float_matrix(rows, "coreset_pick_batch", "rows");
  TORCH_CHECK_VALUE(values.is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 1 &&
                        indices.is_cpu() && indices.scalar_type() == at::kLong && indices.dim() == 1 &&
                        values.size(0) == rows.size(0) && indices.size(0) == rows.size(0),
                    "coreset_pick_batch: values float32 [U], indices int64 [U], rows float32 [U, D]");
  TORCH_CHECK_VALUE(remaining >= 0, "coreset_pick_batch: remaining must be >= 0");
  return without_gil([&] { return patchcore::coreset_pick_batch_cpu(values, indices, rows, bound, remaining); });
}

at::Tensor patch_embedding(const std::vector<at::Tensor>& maps, int64_t dim) {
  TORCH_CHECK_VALUE(!maps.empty(), "patch_embedding: no feature maps");
  TORCH_CHECK_VALUE(dim >= 1, "patch_embedding: dim must be >= 1, got ", dim);
  for (size_t l = 0; l < maps.size(); ++l) {
    const at::Tensor& m = maps[l];
    TORCH_CHECK_VALUE(m.dim() == 4 && m.scalar_type() == at::kFloat, "patch_embedding: feature map ", l,
                      " must be a 4-D float32 tensor [B, C, H, W], got ", m.dim(), "-D ", m.scalar_type());
    TORCH_CHECK_VALUE(m.size(0) == maps[0].size(0), "patch_embedding: feature map ", l, " has batch ", m.size(0),
                      ", the first has ", maps[0].size(0));
    TORCH_CHECK_VALUE(m.size(1) >= 1 && m.size(2) >= 1 && m.size(3) >= 1, "patch_embedding: feature map ", l,
                      " is empty: ", m.sizes());
    check_pair(m, maps[0], "patch_embedding");
  }
  if (maps[0].size(0) == 0) return at::zeros({0, dim}, maps[0].options());
  if (maps[0].is_cuda()) {
#ifdef PATCHCORE_WITH_CUDA
    return patchcore::patch_embedding_cuda(maps, dim);
#else
    TORCH_CHECK(false, "patch_embedding: this build of patchcore_fast has no CUDA kernels");
#endif
  }
  TORCH_CHECK_VALUE(maps[0].is_cpu(), "patch_embedding: unsupported device ", maps[0].device());
  return without_gil([&] { return patchcore::patch_embedding_cpu(maps, dim); });
}

py::dict build_info() {
  py::dict info;
#ifdef PATCHCORE_WITH_CUDA
  info["cuda"] = true;
  const int v = patchcore::cuda_runtime_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  info["cuda_max_k"] = patchcore::kCudaKnnMaxK;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_max_k"] = 0;
#endif
  info["openmp_threads"] = omp_get_max_threads();
  // The instruction set the CPU kernels run on now (PATCHCORE_CPU_ISA or the best supported).
  const std::string path = patchcore::cpu::kernels().name;
  info["cpu_isa"] = path;
  py::dict kernels;
  kernels["greedy_coreset"] = path;
  kernels["knn"] = path;
  kernels["patch_embedding"] = path;
  // The pruned search's 8-bit first screen (isa/code_tile.h): 4 products per instruction and lane
  // with AVX512_VNNI (against one multiply-add in float32), 2 with two instructions elsewhere on x86,
  // none in the portable path.
  const bool vnni = path == "avx512" && patchcore::cpu::has_avx512_vnni();
  kernels["knn_pruned_codes"] = vnni ? path + "+vnni" : path;
  info["cpu_kernels"] = kernels;
  info["coded_screen_speedup"] = vnni ? 4.0 : path == "generic" ? 1.0 : 2.0;
  info["cpu_isa_supported"] = patchcore::cpu::supported_isas();
  info["cpu_isa_compiled"] = patchcore::cpu::compiled_isas();
  info["torch_built_against"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "patchcore_fast compiled kernels (CPU, and CUDA when built with it)";
  m.def("greedy_coreset", &greedy_coreset, py::arg("features"), py::arg("initial_distances"), py::arg("n"),
        py::arg("cuda_kernel") = "cached", py::arg("progress") = py::none(),
        "Greedy k-center indices (validated inputs; see patchcore_fast.greedy_coreset). On the CPU, "
        "progress(picks_done) is called at most 5 times a second and Ctrl-C stops the selection.");
  m.def("greedy_coreset_stages", &greedy_coreset_stages, py::arg("features"), py::arg("initial_distances"),
        py::arg("n"),
        "The resident CUDA coreset kernel with each block's clock cycles per step stage (for benchmarks)");
  m.def("knn", &knn, py::arg("queries"), py::arg("bank"), py::arg("k"),
        py::arg("cuda_kernel") = "warp16x128", py::arg("progress") = py::none(),
        "Exact top-k squared L2 (validated inputs; see patchcore_fast.knn). On the CPU, progress(queries_done) "
        "is called at most 5 times a second and Ctrl-C stops the search.");
  m.def("knn_pruned", &knn_pruned, py::arg("queries"), py::arg("bank"), py::arg("k"), py::arg("basis"),
        py::arg("bank_screen"), py::arg("basis_rounding"), py::arg("bank_extension") = py::none(),
        py::arg("progress") = py::none(),
        "Exact top-k as knn on the CPU, skipping bank rows a bound rules out (see patchcore_fast.index.pruned). "
        "Returns (distances, indices, exact distances computed, extension terms screened).");
  m.def("fixed_order_projection", &fixed_order_projection, py::arg("features"), py::arg("weights"),
        "features @ weights.T with every element summed in one fixed order (the same float for a row "
        "whatever the batch, thread count or CPU path)");
  m.def("mean_distances", &mean_distances, py::arg("space"), py::arg("centres"),
        "Each row's mean L2 distance to the centres, in a fixed order");
  py::class_<patchcore::CoresetShard>(m, "CoresetShard",
      "One rank's shard of the distributed greedy coreset: its rows of the selection space and their "
      "running minima (see patchcore_fast.distributed.greedy_coreset)")
      .def(py::init(&coreset_shard), py::arg("space"), py::arg("initial"))
      .def("pass_", &coreset_shard_pass, py::arg("centres"),
           "Lowers the minima by the centres [b, dim]; returns the shard's farthest rows (values, local rows)")
      .def("pin", &patchcore::CoresetShard::pin, py::arg("local_rows"), "Marks picked rows (never picked again)")
      .def_property_readonly("min_distance", &patchcore::CoresetShard::min_distance);
  m.attr("coreset_offered") = patchcore::cpu::kCandidates + 1;  // rows a shard's pass offers at most
  m.def("coreset_shard_pass_cuda", &coreset_shard_pass_gpu, py::arg("space"), py::arg("min_distance"),
        py::arg("centres"),
        "CoresetShard.pass_ for a shard on a GPU: lowers min_distance (in place) by the centres with the CPU "
        "shard's arithmetic; returns its farthest rows (values, local rows) on the device, in the CPU shard's order");
  m.def("coreset_pick_batch", &coreset_pick_batch, py::arg("values"), py::arg("indices"), py::arg("rows"),
        py::arg("bound"), py::arg("remaining"),
        "The next batch of picks from every shard's offers and the bound they put on every other row: "
        "positions into the offers, in pick order");
  m.def("patch_embedding", &patch_embedding, py::arg("maps"), py::arg("dim"),
        "Locally aware patch features [B * H0 * W0, dim] of feature maps [B, C_l, H_l, W_l] (float32, one "
        "device), computed without unfolding neighbourhoods (see patchcore_fast.embedding)");
  m.def("build_info", &build_info, "How this extension was built");
}

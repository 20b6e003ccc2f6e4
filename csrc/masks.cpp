// Mask samplers for the input pipeline: random tube masking and V-JEPA multi-block masking.
//
// Both return, per batch, int32 `ids_keep` [B, K] and `ids_mask` [B, M] with every row sorted,
// K + M = T*H*W and the same K, M in every row, so batched kernels see rectangular tensors.
//
// Randomness is counter-based (SplitMix64 finaliser over key + counter): each draw is a pure
// function of (seed, stream, counter), so results are identical on any machine and match the
// NumPy reference in ivfast/masking.py bit for bit. Keep the two in step when changing either.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kStreamMul = 0xD1B54A32D192ED03ULL;
constexpr uint64_t kStreamAdd = 0x632BE59BD9B4E019ULL;
constexpr uint64_t kBatchStream = ~0ULL;           // stream of draws shared by the whole batch
constexpr uint64_t kTrimCounter = 1ULL << 32;      // counters of the trim draws start here

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
inline uint64_t stream_key(uint64_t seed, uint64_t stream) {
  return mix64(mix64(seed) ^ (stream * kStreamMul + kStreamAdd));
}
inline uint64_t rand_u64(uint64_t key, uint64_t counter) { return mix64(key + (counter + 1) * kGolden); }
inline double uniform(uint64_t key, uint64_t counter) {
  return static_cast<double>(rand_u64(key, counter) >> 11) * 0x1.0p-53;  // [0, 1), exact
}
// Integer in [lo, hi): truncation of a non-negative double is floor, as in the reference.
inline int64_t randint(uint64_t key, uint64_t counter, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(uniform(key, counter) * static_cast<double>(hi - lo));
}

// Indices 0..n-1 ordered by (rand_u64(key, base + i), i): a seeded random permutation.
std::vector<int32_t> random_order(uint64_t key, uint64_t base, int64_t n) {
  std::vector<std::pair<uint64_t, int32_t>> kv(n);
  for (int64_t i = 0; i < n; ++i) kv[i] = {rand_u64(key, base + i), static_cast<int32_t>(i)};
  std::sort(kv.begin(), kv.end());
  std::vector<int32_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = kv[i].second;
  return order;
}

using IdArray = py::array_t<int32_t, py::array::c_style>;

py::tuple to_arrays(const std::vector<int32_t>& keep, const std::vector<int32_t>& mask, int64_t B, int64_t K,
                    int64_t M) {
  IdArray k({B, K}), m({B, M});
  std::copy(keep.begin(), keep.end(), k.mutable_data());
  std::copy(mask.begin(), mask.end(), m.mutable_data());
  return py::make_tuple(k, m);
}

void check_grid(int64_t B, int64_t T, int64_t H, int64_t W) {
  if (B <= 0 || T <= 0 || H <= 0 || W <= 0)
    throw std::invalid_argument("batch size and grid T, H, W must all be positive, got B=" + std::to_string(B) +
                                " T=" + std::to_string(T) + " H=" + std::to_string(H) + " W=" + std::to_string(W));
  if (T * H * W >= (1LL << 31)) throw std::invalid_argument("grid T*H*W must be below 2^31 for int32 ids");
}

// Random tube masking: per sample, int(ratio*H*W) spatial positions are masked in every frame.
py::tuple tube_mask(int64_t B, int64_t T, int64_t H, int64_t W, double ratio, uint64_t seed) {
  check_grid(B, T, H, W);
  if (!(ratio > 0.0 && ratio < 1.0)) throw std::invalid_argument("mask ratio must be in (0, 1)");
  const int64_t S = H * W;
  const int64_t Sm = static_cast<int64_t>(ratio * static_cast<double>(S));
  const int64_t Sk = S - Sm;
  if (Sm == 0 || Sk == 0)
    throw std::invalid_argument("mask ratio leaves no masked or no visible position per frame");
  const int64_t K = T * Sk, M = T * Sm;
  std::vector<int32_t> keep(B * K), mask(B * M);
  {
    py::gil_scoped_release nogil;
    std::vector<char> is_kept(S);
    for (int64_t b = 0; b < B; ++b) {
      const auto order = random_order(stream_key(seed, b), 0, S);
      std::fill(is_kept.begin(), is_kept.end(), 0);
      for (int64_t i = 0; i < Sk; ++i) is_kept[order[i]] = 1;
      int32_t* kp = keep.data() + b * K;
      int32_t* mp = mask.data() + b * M;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < S; ++s) *(is_kept[s] ? kp++ : mp++) = static_cast<int32_t>(t * S + s);
    }
  }
  return to_arrays(keep, mask, B, K, M);
}

// V-JEPA multi-block masking (one mask set). The block size is drawn once per batch from one
// uniform number (as V-JEPA does), block positions per sample; the union of the blocks is
// masked. Rows are cut to a common K (the batch minimum, capped by max_keep): trim "random"
// drops visible ids uniformly at random, "lowest" keeps the lowest ids (V-JEPA's behaviour).
// Dropped visible ids join the masked set, so K + M = N always holds and no position is lost.
py::tuple multiblock_mask(int64_t B, int64_t T, int64_t H, int64_t W, int64_t num_blocks, double smin, double smax,
                          double tmin, double tmax, double armin, double armax, uint64_t seed, int64_t max_keep,
                          const std::string& trim, int64_t min_keep, int64_t max_tries) {
  check_grid(B, T, H, W);
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  if (trim != "random" && trim != "lowest") throw std::invalid_argument("trim must be 'random' or 'lowest'");
  if (min_keep < 1) throw std::invalid_argument("min_keep must be >= 1");
  const int64_t N = T * H * W;

  const double u = uniform(stream_key(seed, kBatchStream), 0);
  const int64_t t = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(T) * (tmin + u * (tmax - tmin))));
  const int64_t s_keep = static_cast<int64_t>(static_cast<double>(H * W) * (smin + u * (smax - smin)));
  const double ar = armin + u * (armax - armin);
  // nearbyint rounds half to even, as Python's round() in the reference.
  const int64_t h = std::min<int64_t>(H, std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(std::sqrt(s_keep * ar)))));
  const int64_t w = std::min<int64_t>(W, std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(std::sqrt(s_keep / ar)))));
  const int64_t tt = std::min<int64_t>(T, t);

  std::vector<std::vector<int32_t>> visible(B);
  std::string error;
  {
    py::gil_scoped_release nogil;
    std::vector<char> masked(N);
    for (int64_t b = 0; b < B && error.empty(); ++b) {
      const uint64_t key = stream_key(seed, b);
      uint64_t c = 0;
      for (int64_t attempt = 0;; ++attempt) {
        if (attempt == max_tries) {
          error = "multi-block masking left fewer than min_keep=" + std::to_string(min_keep) +
                  " visible tokens after " + std::to_string(max_tries) + " tries; use smaller or fewer blocks";
          break;
        }
        std::fill(masked.begin(), masked.end(), 0);
        for (int64_t k = 0; k < num_blocks; ++k) {
          const int64_t top = randint(key, c++, 0, H - h + 1);
          const int64_t left = randint(key, c++, 0, W - w + 1);
          const int64_t start = randint(key, c++, 0, T - tt + 1);
          for (int64_t ti = start; ti < start + tt; ++ti)
            for (int64_t hi = top; hi < top + h; ++hi)
              std::fill_n(masked.begin() + (ti * H + hi) * W + left, w, 1);
        }
        auto& vis = visible[b];
        vis.clear();
        for (int64_t i = 0; i < N; ++i)
          if (!masked[i]) vis.push_back(static_cast<int32_t>(i));
        if (static_cast<int64_t>(vis.size()) >= min_keep) break;
      }
    }
  }
  if (!error.empty()) throw std::runtime_error(error);

  int64_t K = N;
  for (const auto& v : visible) K = std::min<int64_t>(K, v.size());
  if (max_keep > 0) K = std::min(K, max_keep);
  const int64_t M = N - K;
  std::vector<int32_t> keep(B * K), mask(B * M);
  {
    py::gil_scoped_release nogil;
    std::vector<char> is_kept(N);
    for (int64_t b = 0; b < B; ++b) {
      const auto& vis = visible[b];
      const int64_t n = vis.size();
      std::fill(is_kept.begin(), is_kept.end(), 0);
      if (trim == "lowest" || n == K) {
        for (int64_t i = 0; i < K; ++i) is_kept[vis[i]] = 1;
      } else {
        const auto order = random_order(stream_key(seed, b), kTrimCounter, n);
        for (int64_t i = 0; i < K; ++i) is_kept[vis[order[i]]] = 1;
      }
      int32_t* kp = keep.data() + b * K;
      int32_t* mp = mask.data() + b * M;
      for (int64_t i = 0; i < N; ++i) *(is_kept[i] ? kp++ : mp++) = static_cast<int32_t>(i);
    }
  }
  return to_arrays(keep, mask, B, K, M);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ivfast C++ mask samplers (seeded, counter-based, GIL released while sampling)";
  m.def("tube_mask", &tube_mask, py::arg("batch_size"), py::arg("T"), py::arg("H"), py::arg("W"),
        py::arg("ratio"), py::arg("seed"),
        "Random tube masking -> (ids_keep int32 [B, K], ids_mask int32 [B, M]), rows sorted.");
  m.def("multiblock_mask", &multiblock_mask, py::arg("batch_size"), py::arg("T"), py::arg("H"), py::arg("W"),
        py::arg("num_blocks"), py::arg("spatial_min"), py::arg("spatial_max"), py::arg("temporal_min"),
        py::arg("temporal_max"), py::arg("aspect_min"), py::arg("aspect_max"), py::arg("seed"),
        py::arg("max_keep") = 0, py::arg("trim") = "random", py::arg("min_keep") = 1, py::arg("max_tries") = 100,
        "V-JEPA multi-block masking, one mask set -> (ids_keep [B, K], ids_mask [B, M]), rows sorted.");
  m.def("splitmix_u64", [](uint64_t key, uint64_t counter) { return rand_u64(key, counter); },
        "The PRNG's draw for (key, counter); exposed so tests can check the NumPy twin.");
  m.def("stream_key", &stream_key, py::arg("seed"), py::arg("stream"));
}

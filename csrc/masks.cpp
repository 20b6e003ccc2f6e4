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
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kStreamMul = 0xD1B54A32D192ED03ULL;
constexpr uint64_t kStreamAdd = 0x632BE59BD9B4E019ULL;
constexpr uint64_t kBatchStream = ~0ULL;           // stream of draws shared by the whole batch
constexpr uint64_t kTrimCounter = 1ULL << 32;      // counters of the visible-set trim draws start here
constexpr uint64_t kPredCounter = 2ULL << 32;      // counters of the prediction-set trim draws

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

// Selection sampling (Knuth's algorithm S): walking items 0..n-1 in order, item j is taken
// with probability (k - taken) / (n - j). Exactly k of n are taken, every k-subset equally
// likely, in one pass and already in ascending order. Item j uses a 32-bit half of draw
// base + j/2 (high half for even j) and an exact integer test u32 * (n - j) < (k - taken) << 32,
// which needs n < 2^31 (checked with the grid).
struct SelectionSampler {
  uint64_t key, base;
  int64_t n, k, seen = 0, taken = 0;
  uint64_t draw = 0;
  bool next() {
    uint64_t u32;
    if ((seen & 1) == 0) {
      draw = rand_u64(key, base + static_cast<uint64_t>(seen >> 1));
      u32 = draw >> 32;
    } else {
      u32 = draw & 0xFFFFFFFFULL;
    }
    const bool take = u32 * static_cast<uint64_t>(n - seen) < (static_cast<uint64_t>(k - taken) << 32);
    ++seen;
    taken += take;
    return take;
  }
};

// Runs fn(b) for b in [0, B) on up to `threads` threads. Samples are independent and their
// draws depend only on (seed, b), so the result is the same for any thread count.
template <typename Fn>
void parallel_for(int64_t B, int64_t threads, Fn fn) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, B));
  if (threads == 1) {
    for (int64_t b = 0; b < B; ++b) fn(b);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < threads; ++w)
    pool.emplace_back([=, &fn] {
      for (int64_t b = w * B / threads; b < (w + 1) * B / threads; ++b) fn(b);
    });
  for (auto& th : pool) th.join();
}

int64_t default_threads(int64_t B) {
  const int64_t hw = std::max<unsigned>(1, std::thread::hardware_concurrency());
  return B >= 32 ? std::min<int64_t>(hw, 8) : 1;  // threads only pay off on real batches
}

using IdArray = py::array_t<int32_t, py::array::c_style>;

void check_grid(int64_t B, int64_t T, int64_t H, int64_t W) {
  if (B <= 0 || T <= 0 || H <= 0 || W <= 0)
    throw std::invalid_argument("batch size and grid T, H, W must all be positive, got B=" + std::to_string(B) +
                                " T=" + std::to_string(T) + " H=" + std::to_string(H) + " W=" + std::to_string(W));
  if (T * H * W >= (1LL << 31)) throw std::invalid_argument("grid T*H*W must be below 2^31 for int32 ids");
}

// Random tube masking: per sample, int(ratio*H*W) spatial positions are masked in every frame.
py::tuple tube_mask(int64_t B, int64_t T, int64_t H, int64_t W, double ratio, uint64_t seed, int64_t threads) {
  check_grid(B, T, H, W);
  if (!(ratio > 0.0 && ratio < 1.0)) throw std::invalid_argument("mask ratio must be in (0, 1)");
  const int64_t S = H * W;
  const int64_t Sm = static_cast<int64_t>(ratio * static_cast<double>(S));
  const int64_t Sk = S - Sm;
  if (Sm == 0 || Sk == 0)
    throw std::invalid_argument("mask ratio leaves no masked or no visible position per frame");
  const int64_t K = T * Sk, M = T * Sm;
  IdArray keep_arr({B, K}), mask_arr({B, M});
  int32_t* keep = keep_arr.mutable_data();
  int32_t* mask = mask_arr.mutable_data();
  {
    py::gil_scoped_release nogil;
    parallel_for(B, threads > 0 ? threads : default_threads(B), [&](int64_t b) {
      std::vector<char> is_kept(S);
      SelectionSampler pick{stream_key(seed, b), 0, S, Sk};
      for (int64_t s = 0; s < S; ++s) is_kept[s] = pick.next();
      int32_t* kp = keep + b * K;
      int32_t* mp = mask + b * M;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t s = 0; s < S; ++s) *(is_kept[s] ? kp++ : mp++) = static_cast<int32_t>(t * S + s);
    });
  }
  return py::make_tuple(keep_arr, mask_arr);
}

// V-JEPA multi-block masking (one mask set). The block size is drawn once per batch, temporal
// scale, spatial scale and aspect ratio from three independent uniforms (counters 0, 1, 2; as
// V-JEPA and the released jepa_mask.py do), block positions per sample; the union of the blocks is
// masked. Rows are cut to a common K (the batch minimum, capped by max_keep): trim "random"
// drops visible ids uniformly at random, "lowest" keeps the lowest ids (V-JEPA's behaviour).
// Returns ids_keep [B, K]; ids_mask [B, N - K], every id not kept (dropped visible ids
// included: what the predictor fills with mask tokens); and ids_pred [B, P], the block-masked
// ids cut to the batch minimum the same way (what V-JEPA predicts; the released code predicts
// every id not kept, i.e. ids_mask).
py::tuple multiblock_mask(int64_t B, int64_t T, int64_t H, int64_t W, int64_t num_blocks, double smin, double smax,
                          double tmin, double tmax, double armin, double armax, uint64_t seed, int64_t max_keep,
                          const std::string& trim, int64_t min_keep, int64_t max_tries, int64_t threads) {
  check_grid(B, T, H, W);
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  if (trim != "random" && trim != "lowest") throw std::invalid_argument("trim must be 'random' or 'lowest'");
  if (min_keep < 1) throw std::invalid_argument("min_keep must be >= 1");
  const int64_t N = T * H * W;

  const uint64_t bkey = stream_key(seed, kBatchStream);
  const double ut = uniform(bkey, 0), us = uniform(bkey, 1), ua = uniform(bkey, 2);
  const int64_t t = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(T) * (tmin + ut * (tmax - tmin))));
  const int64_t s_keep = static_cast<int64_t>(static_cast<double>(H * W) * (smin + us * (smax - smin)));
  const double ar = armin + ua * (armax - armin);
  // nearbyint rounds half to even, as Python's round() in the reference.
  const int64_t h = std::min<int64_t>(H, std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(std::sqrt(s_keep * ar)))));
  const int64_t w = std::min<int64_t>(W, std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(std::sqrt(s_keep / ar)))));
  const int64_t tt = std::min<int64_t>(T, t);

  if (threads <= 0) threads = default_threads(B);
  // Blocks spanning every frame (V-JEPA's default) mask the same spatial set in each frame:
  // then only the H x W plane is stored and counted. Otherwise the whole T x H x W volume.
  const bool plane = tt == T;
  const int64_t S = H * W, V = plane ? S : N;
  std::vector<char> masked(B * V);  // per sample: 1 = inside a block; written in full below
  std::vector<int64_t> visible(B, 0);
  std::vector<char> failed(B, 0);
  {
    py::gil_scoped_release nogil;
    parallel_for(B, threads, [&](int64_t b) {
      char* vol = masked.data() + b * V;
      const uint64_t key = stream_key(seed, b);
      uint64_t c = 0;
      for (int64_t attempt = 0;; ++attempt) {
        if (attempt == max_tries) {
          failed[b] = 1;
          return;
        }
        std::fill_n(vol, V, 0);
        for (int64_t k = 0; k < num_blocks; ++k) {
          const int64_t top = randint(key, c++, 0, H - h + 1);
          const int64_t left = randint(key, c++, 0, W - w + 1);
          const int64_t start = randint(key, c++, 0, T - tt + 1);
          for (int64_t ti = plane ? 0 : start; ti < (plane ? 1 : start + tt); ++ti)
            for (int64_t hi = top; hi < top + h; ++hi) std::fill_n(vol + (ti * H + hi) * W + left, w, 1);
        }
        int64_t n = 0;
        for (int64_t i = 0; i < V; ++i) n += !vol[i];
        visible[b] = plane ? n * T : n;
        if (visible[b] >= min_keep) return;
      }
    });
  }
  for (int64_t b = 0; b < B; ++b)
    if (failed[b])
      throw std::runtime_error("multi-block masking left fewer than min_keep=" + std::to_string(min_keep) +
                               " visible tokens after " + std::to_string(max_tries) +
                               " tries; use smaller or fewer blocks");

  int64_t K = *std::min_element(visible.begin(), visible.end());
  if (max_keep > 0) K = std::min(K, max_keep);
  const int64_t M = N - K;
  int64_t P = N;  // prediction set: block-masked ids, cut to the batch minimum
  for (int64_t b = 0; b < B; ++b) P = std::min(P, N - visible[b]);
  const bool lowest = trim == "lowest";
  IdArray keep_arr({B, K}), mask_arr({B, M}), pred_arr({B, P});
  int32_t* keep = keep_arr.mutable_data();
  int32_t* mask = mask_arr.mutable_data();
  int32_t* pred = pred_arr.mutable_data();
  {
    py::gil_scoped_release nogil;
    parallel_for(B, threads, [&](int64_t b) {
      const char* vol = masked.data() + b * V;
      const int64_t n = visible[b], nm = N - n;
      const bool all_visible_kept = lowest || n == K;
      const bool all_masked_predicted = lowest || nm == P;
      SelectionSampler pick{stream_key(seed, b), kTrimCounter, n, K};
      SelectionSampler pick_pred{stream_key(seed, b), kPredCounter, nm, P};
      int32_t* kp = keep + b * K;
      int32_t* mp = mask + b * M;
      int32_t* pp = pred + b * P;
      int64_t j = 0, q = 0;  // visible / block-masked ids seen so far
      for (int64_t t = 0; t < T; ++t) {
        const char* row = plane ? vol : vol + t * S;
        for (int64_t s = 0; s < S; ++s) {
          const bool vis = !row[s];
          bool kept;
          if (all_visible_kept) {
            kept = vis & (j < K);
            j += vis;
          } else {
            kept = vis && pick.next();
          }
          // Pointer select instead of a branch: the keep/mask pattern is random.
          int32_t*& dst = kept ? kp : mp;
          *dst++ = static_cast<int32_t>(t * S + s);
          if (!vis) {
            const bool predicted = all_masked_predicted ? q < P : pick_pred.next();
            ++q;
            if (predicted) *pp++ = static_cast<int32_t>(t * S + s);
          }
        }
      }
    });
  }
  return py::make_tuple(keep_arr, mask_arr, pred_arr);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ivfast C++ mask samplers (seeded, counter-based, GIL released while sampling)";
  m.def("tube_mask", &tube_mask, py::arg("batch_size"), py::arg("T"), py::arg("H"), py::arg("W"),
        py::arg("ratio"), py::arg("seed"), py::arg("threads") = 0,
        "Random tube masking -> (ids_keep int32 [B, K], ids_mask int32 [B, M]), rows sorted.");
  m.def("multiblock_mask", &multiblock_mask, py::arg("batch_size"), py::arg("T"), py::arg("H"), py::arg("W"),
        py::arg("num_blocks"), py::arg("spatial_min"), py::arg("spatial_max"), py::arg("temporal_min"),
        py::arg("temporal_max"), py::arg("aspect_min"), py::arg("aspect_max"), py::arg("seed"),
        py::arg("max_keep") = 0, py::arg("trim") = "random", py::arg("min_keep") = 1, py::arg("max_tries") = 100,
        py::arg("threads") = 0,
        "V-JEPA multi-block masking, one mask set -> (ids_keep [B, K], ids_mask [B, N-K], ids_pred [B, P]), "
        "rows sorted.");
  m.def("splitmix_u64", [](uint64_t key, uint64_t counter) { return rand_u64(key, counter); },
        "The PRNG's draw for (key, counter); exposed so tests can check the NumPy twin.");
  m.def("stream_key", &stream_key, py::arg("seed"), py::arg("stream"));
}

// Decode attention for a CPU, computed in fp32 over an fp32 or bf16 cache, q and the output
// in the model's dtype (a bf16 row is widened on the way in and its output rounded once on
// the way out, as SDPA's is): each sequence's one new token attends over its pages of the
// KV cache, read where they lie. The torch path copies every sequence's pages into a
// [B, max_len] buffer (index_select), builds a [B, max_len] mask and runs SDPA: the K/V
// bytes cross memory three times, and fixed costs dwarf the work at decode sizes (a few
// heads x a few hundred keys). Here a task is one (sequence, KV head): the positions it sees
// (its length, its sliding window; never the padding) go in tiles of 16, whose K rows, then
// V rows, come from memory once (a bf16 tile widened once) and serve every query head of
// the group from L1 (and of up to 8 rows of a prompt's slice, over one page table). A
// tile's rows lie in scattered pages, which the hardware prefetcher does not follow, so the
// rows of the tile two ahead are prefetched: without that every tile waited out its misses
// (SmolLM2 shapes, 8 sequences x ~170 keys, 30 layers: bf16 4.8 -> 3.0 ms, fp32 3.9 -> 2.8).
// Softmax is exact, in two passes: the scores to a scratch row, then e^(score - max) (a
// vector polynomial within about 1 ulp of expf) weighting the V rows, divided by their sum
// at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using loraxd_vec::exp_nonpositive;
using loraxd_vec::load;
using loraxd_vec::splat;
using loraxd_vec::store;
using loraxd_vec::v16;
using loraxd_vec::vi16;
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;  // also the positions of a tile: one vector of scores
// multiply-adds a thread should get before a fork pays: below this a call runs on one
constexpr int64_t kMinWorkPerThread = 1 << 16;
constexpr int64_t kMaxRunRows = 8;  // a slice's rows that share their tiles' reads


inline float hsum(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
  b += __builtin_shufflevector(b, b, 1, 0, 3, 2);
  return b[0];
}

inline float hmax(v16 v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  return *std::max_element(lanes, lanes + kLanes);
}

// Lane j of the result: the sum of the lanes of a[j]. Halving the width four times costs
// 30 shuffles and 15 adds for 16 sums, where one sum at a time costs 8 dependent steps.
inline v16 transpose_sum(const v16* a) {
  v16 c[8], d[4], e[2];
  for (int j = 0; j < 8; ++j)
    c[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                   18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    d[j] = __builtin_shufflevector(c[2 * j], c[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                   18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * j], c[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    e[j] = __builtin_shufflevector(d[2 * j], d[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                   20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(d[2 * j], d[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                 26, 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                 27, 29, 31);
}


struct Shape {
  int64_t kv_heads, group, head_dim, page, slot_stride, max_blocks;
};

template <typename T>
struct Scratch {
  std::vector<const T*> rows;  // [n_pad] each visible position's slot
  std::vector<float> values;       // scores [group, n_pad], then sums [group, d]
  std::vector<float> queries;      // [count, group, d] the rows' query heads, in fp32
  std::vector<float> tile;         // [16, d] a bf16 tile's K or V rows, widened once
};

// x[i] as fp32, for i < n
template <typename T>
inline void widen(const T* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(y + i, load(x + i));
  for (; i < n; ++i) y[i] = float(x[i]);
}

// Asks for the next tile's rows ahead of their use: a tile's 16 rows lie in scattered pages,
// which the hardware prefetcher does not follow, so each would wait out its miss.
template <typename T>
inline void prefetch_tile(const T* const* at, int64_t offset, int64_t d) {
  for (int j = 0; j < kLanes; ++j)
    for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(at[j] + offset) + b);
}

// The 16 rows of a tile as fp32 rows: an fp32 cache's in place; a bf16 cache's widened
// once into `buf` (they then serve every query head of every row from L1 as they are).
template <typename T>
inline void tile_rows(const T* const* at, int64_t offset, int64_t d, float* buf,
                      const float** rows) {
  for (int j = 0; j < kLanes; ++j) {
    if constexpr (std::is_same_v<T, float>) {
      rows[j] = at[j] + offset;
    } else {
      widen(at[j] + offset, d, buf + j * d);
      rows[j] = buf + j * d;
    }
  }
}

// The 16 scores of a tile for one query head: k[j] the K row of position j.
inline v16 tile_scores(const float* q, const float* const* k, int64_t d) {
  v16 a[kLanes] = {};
  const int64_t full = d / kLanes * kLanes;
  for (int64_t c = 0; c < full; c += kLanes) {
    const v16 qc = load(q + c);
    for (int j = 0; j < kLanes; ++j) a[j] += qc * load(k[j] + c);
  }
  v16 x = transpose_sum(a);
  for (int64_t c = full; c < d; ++c)  // a head size that is not a multiple of 16
    for (int j = 0; j < kLanes; ++j) x[j] += q[c] * k[j][c];
  return x;
}

// y += sum over the tile's positions j of w[j] * v[j] (the rows of V), y [d].
inline void tile_accumulate(const float* w, const float* const* v, float* y, int64_t d) {
  const int64_t full = d / kLanes * kLanes;
  int64_t c = 0;
  for (; c + 4 * kLanes <= full; c += 4 * kLanes) {  // 8 chains, so no FMA waits on the last
    v16 a[4], b[4] = {};
    for (int i = 0; i < 4; ++i) a[i] = load(y + c + i * kLanes);
    for (int j = 0; j < kLanes; j += 2)
      for (int i = 0; i < 4; ++i) {
        a[i] += w[j] * load(v[j] + c + i * kLanes);
        b[i] += w[j + 1] * load(v[j + 1] + c + i * kLanes);
      }
    for (int i = 0; i < 4; ++i) store(y + c + i * kLanes, a[i] + b[i]);
  }
  for (; c < full; c += kLanes) {
    v16 a[4] = {};
    for (int j = 0; j < kLanes; j += 4)
      for (int i = 0; i < 4; ++i) a[i] += w[j + i] * load(v[j + i] + c);
    store(y + c, load(y + c) + (a[0] + a[1]) + (a[2] + a[3]));
  }
  for (; c < d; ++c)
    for (int j = 0; j < kLanes; ++j) y[c] += w[j] * v[j][c];
}

// For each of `count` rows (tokens of one sequence, one page table, row r seeing the
// positions before lens[r], from lo = 0): out_r[g] = softmax(scores of q_r[g]) @ V for the
// `group` query heads of KV head `kvh`, in tiles of 16 positions. Each tile's K and V rows
// are read once from memory, then from L1 for every query head of every row. A row's
// numbers are those it gets alone: its tiles start at position 0 either way, and past its
// length its last tile holds a repeat of its last score, weighted 0 (alone: of its last K
// and V row). With a sliding window (lo > 0) rows go one at a time.
template <typename T, typename Q>
void attend(const Q* const* q_in, const T* cache, const int64_t* table,
            const int64_t* lens, int64_t count, int64_t kvh, const Shape& s, float scale,
            int64_t window, float softcap, Q* const* out, Scratch<T>& scratch) {
  const int64_t d = s.head_dim, group = s.group, len = lens[count - 1];
  scratch.queries.resize(count * group * d);
  scratch.tile.resize(kLanes * d);
  const float* q[kMaxRunRows];  // each row's query heads of KV head kvh, in fp32
  for (int64_t r = 0; r < count; ++r) {
    float* qf = scratch.queries.data() + r * group * d;
    widen(q_in[r] + kvh * group * d, group * d, qf);
    q[r] = qf;
  }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  const int64_t n = len - lo, n_pad = (n + kLanes - 1) / kLanes * kLanes;
  const int64_t rows_q = count * group;  // score rows: (row, query head)
  scratch.rows.resize(n_pad);
  scratch.values.resize(rows_q * (n_pad + d));
  const T** rows = scratch.rows.data();
  float* scores = scratch.values.data();
  float* sums = scores + rows_q * n_pad;
  for (int64_t pos = lo, t = 0; pos < len;) {  // page by page: no division per position
    const int64_t page = pos / s.page, offset = pos % s.page;
    const int64_t last = std::min(len, pos - offset + s.page);
    const T* row = cache + (table[page] * s.page + offset) * s.slot_stride;
    for (; pos < last; ++pos, row += s.slot_stride) rows[t++] = row;
  }
  std::fill(rows + n, rows + n_pad, rows[n - 1]);
  const int64_t k_at = kvh * d, v_at = (s.kv_heads + kvh) * d;
  auto padded = [&](int64_t r) { return (lens[r] - lo + kLanes - 1) / kLanes * kLanes; };

  for (int64_t t0 = 0; t0 < std::min<int64_t>(n_pad, 2 * kLanes); t0 += kLanes)
    prefetch_tile(rows + t0, k_at, d);
  for (int64_t t0 = 0; t0 < n_pad; t0 += kLanes) {
    const float* k[kLanes];
    if (t0 + 2 * kLanes < n_pad) prefetch_tile(rows + t0 + 2 * kLanes, k_at, d);
    tile_rows(rows + t0, k_at, d, scratch.tile.data(), k);
    for (int64_t r = count - 1; r >= 0 && t0 < padded(r); --r)  // lens rise with r
      for (int64_t g = 0; g < group; ++g)
        store(scores + (r * group + g) * n_pad + t0, tile_scores(q[r] + g * d, k, d) * scale);
  }
  for (int64_t t0 = 0; t0 < std::min<int64_t>(n_pad, 2 * kLanes); t0 += kLanes)
    prefetch_tile(rows + t0, v_at, d);  // while the softmax runs
  for (int64_t r = 0; r < count; ++r) {
    const int64_t n_r = lens[r] - lo, pad_r = padded(r);
    for (int64_t g = 0; g < group; ++g) {  // weights e^(score - max); their sum divides at the end
      float* row = scores + (r * group + g) * n_pad;
      std::fill(row + n_r, row + pad_r, row[n_r - 1]);  // as a repeat of the last K row gives
      if (softcap > 0.f)
        for (int64_t i = 0; i < pad_r; ++i) row[i] = softcap * std::tanh(row[i] / softcap);
      v16 top = splat(row[0]);
      for (int64_t i = 0; i < pad_r; i += kLanes) {
        const v16 x = load(row + i);
        top = x > top ? x : top;  // the padding repeats a real score: it cannot win
      }
      const float m = hmax(top);
      for (int64_t i = 0; i < pad_r; i += kLanes)
        store(row + i, exp_nonpositive(load(row + i) - m));
      std::fill(row + n_r, row + pad_r, 0.f);
    }
  }
  std::fill(sums, sums + rows_q * d, 0.f);
  for (int64_t t0 = 0; t0 < n_pad; t0 += kLanes) {
    const float* v[kLanes];
    if (t0 + 2 * kLanes < n_pad) prefetch_tile(rows + t0 + 2 * kLanes, v_at, d);
    tile_rows(rows + t0, v_at, d, scratch.tile.data(), v);
    for (int64_t r = count - 1; r >= 0 && t0 < padded(r); --r)
      for (int64_t g = 0; g < group; ++g)
        tile_accumulate(scores + (r * group + g) * n_pad + t0, v,
                        sums + (r * group + g) * d, d);
  }
  for (int64_t r = 0; r < count; ++r)
    for (int64_t g = 0; g < group; ++g) {
      const float* row = scores + (r * group + g) * n_pad;
      v16 total{};
      for (int64_t i = 0; i < padded(r); i += kLanes) total += load(row + i);
      const float inv = 1.f / hsum(total);
      Q* o = out[r] + (kvh * group + g) * d;
      const float* sum = sums + (r * group + g) * d;
      int64_t c = 0;
      for (; c + kLanes <= d; c += kLanes) store(o + c, load(sum + c) * inv);
      for (; c < d; ++c) o[c] = Q(sum[c] * inv);
    }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& cache,
                                  const at::Tensor& blocks, const at::Tensor& lens,
                                  int64_t block_size, double scale, int64_t window,
                                  double softcap) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) == 2 && cache.is_contiguous() &&
              (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16),
              "paged_decode_attention: cache must be contiguous float32 or bfloat16 [slots, 2, "
              "kv_heads, d]");
  const int64_t kv_heads = cache.size(2), d = cache.size(3);
  TORCH_CHECK(block_size > 0 && cache.size(0) % block_size == 0,
              "paged_decode_attention: ", cache.size(0), " slots are not whole pages of ",
              block_size);
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1 && q.size(1) % (kv_heads * d) == 0 &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "paged_decode_attention: q must be float32 or bfloat16 [B, heads * ", d,
              "] with contiguous rows, heads a multiple of ", kv_heads);
  const int64_t B = q.size(0), heads = q.size(1) / d;
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == B && blocks.scalar_type() == at::kLong &&
              blocks.stride(1) == 1,
              "paged_decode_attention: blocks must be int64 [B, max_blocks], rows contiguous");
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B && lens.scalar_type() == at::kLong &&
              lens.is_contiguous(), "paged_decode_attention: lens must be int64 [B]");
  TORCH_CHECK(window >= 0 && softcap >= 0, "paged_decode_attention: window and softcap must "
              "be >= 0 (0: none)");
  const Shape s{kv_heads, heads / kv_heads, d, block_size, 2 * kv_heads * d, blocks.size(1)};
  const int64_t pages = cache.size(0) / block_size;
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t b_stride = blocks.stride(0);
  int64_t visible = 0;  // keys read over the batch, for the work estimate
  for (int64_t b = 0; b < B; ++b) {  // an id out of range would read outside the cache
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= s.max_blocks * block_size,
                "paged_decode_attention: sequence ", b, " has length ", lp[b], ", not in [1, ",
                s.max_blocks * block_size, "]");
    const int64_t lo = window > 0 ? std::max<int64_t>(0, lp[b] - window) : 0;
    for (int64_t p = lo / block_size; p < (lp[b] + block_size - 1) / block_size; ++p) {
      const int64_t id = bp[b * b_stride + p];
      TORCH_CHECK(id >= 0 && id < pages, "paged_decode_attention: page id ", id,
                  " of sequence ", b, " is outside the cache's ", pages, " pages");
    }
    visible += lp[b] - lo;
  }
  at::Tensor out = at::empty({B, heads * d}, q.options());
  if (B == 0) return out;
  // Rows of one page table (a prompt's slice: a stride-0 table), lengths rising by one, go
  // together in runs of up to kMaxRunRows: a tile's K and V serve all of them from L1.
  const int64_t q_stride = q.stride(0);
  const bool one_table = b_stride == 0 && window == 0;
  std::vector<std::pair<int64_t, int64_t>> runs;  // [first row, row count]
  for (int64_t b = 0; b < B;) {
    int64_t e = b + 1;
    while (one_table && e < B && e - b < kMaxRunRows && lp[e] == lp[e - 1] + 1) ++e;
    runs.emplace_back(b, e - b);
    b = e;
  }
  const int64_t tasks = int64_t(runs.size()) * kv_heads;
  const int64_t work_per_task = std::max<int64_t>(1, visible * 2 * heads * d / tasks);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / work_per_task);
  auto run = [&](auto* cp, auto* qp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(cp)>>;
    using Q = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
    Q* op = out.data_ptr<Q>();
    at::parallel_for(0, tasks, grain, [&](int64_t first, int64_t last) {
      Scratch<T> scratch;
      const Q* qs[kMaxRunRows];
      Q* outs[kMaxRunRows];
      for (int64_t task = first; task < last; ++task) {
        const auto [b, count] = runs[task / kv_heads];
        for (int64_t r = 0; r < count; ++r) {
          qs[r] = qp + (b + r) * q_stride;
          outs[r] = op + (b + r) * heads * d;
        }
        attend(qs, cp, bp + b * b_stride, lp + b, count, task % kv_heads, s, float(scale),
               window, float(softcap), outs, scratch);
      }
    });
  };
  auto with_q = [&](auto* cp) {
    if (q.scalar_type() == at::kFloat) {
      run(cp, q.data_ptr<float>());
    } else {
      run(cp, q.data_ptr<c10::BFloat16>());
    }
  };
  if (cache.scalar_type() == at::kFloat) {
    with_q(cache.data_ptr<float>());
  } else {
    with_q(cache.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraxd_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor cache, Tensor blocks, Tensor lens, "
        "int block_size, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraxd_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}

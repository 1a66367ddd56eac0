// Exact top-k squared L2 for a range of queries against the packed bank. Needs simd.h and
// dot_tile.h first.
//
// Queries are taken in blocks that stay in the core's L2 cache while every bank panel
// streams past; each dot tile turns into distances |q|^2 + |b|^2 - 2 q.b, clamped at zero,
// in registers, and only distances below a query's current k-th enter its sorted list. The
// query x bank matrix never exists.

// Insert (value, index) into an ascending list of length k whose last entry is larger than
// value. Equal entries keep their place ahead of it: bank rows arrive in ascending order,
// so ties stay with the lower index.
inline void insert_sorted(float* values, int64_t* indices, int64_t k, float value, int64_t index) {
  int64_t pos = k - 1;
  while (pos > 0 && values[pos - 1] > value) {
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  values[pos] = value;
  indices[pos] = index;
}

// Queries per block: their rows take at most this many bytes, next to one bank panel.
constexpr int64_t kQueryBlockBytes = 256 * 1024;

void knn(const KnnBlock& b, int64_t q_lo, int64_t q_hi) {
  const int64_t dim = b.dim, k = b.k;
  const int64_t panels = (b.num_bank + kPanel - 1) / kPanel;
  int64_t block = kQueryBlockBytes / (static_cast<int64_t>(sizeof(float)) * dim) / kRows * kRows;
  if (block < kRows) block = kRows;
  float* scratch = static_cast<float*>(std::malloc(sizeof(float) * kRows * dim));
  alignas(64) float tile[kRows * kPanel];
  alignas(64) float lane_values[kLanes];

  for (int64_t q0 = q_lo; q0 < q_hi; q0 += block) {
    const int64_t q1 = q0 + block < q_hi ? q0 + block : q_hi;
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int64_t first_bank = panel * kPanel;
      const int64_t width = b.num_bank - first_bank < kPanel ? b.num_bank - first_bank : kPanel;
      const float* packed = b.bank + panel * dim * kPanel;
      for_each_row_group(b.queries, dim, q0, q1, scratch, [&](const float* a, int64_t stride, int64_t first, int count) {
        dot_tile(a, stride, packed, dim, tile);
        for (int r = 0; r < count; ++r) {
          const int64_t q = first + r;
          float* values = b.out_distance + q * k;
          int64_t* indices = b.out_index + q * k;
          const Vec query_norm = vset1(b.query_norm_sq[q]);
          for (int v = 0; v < kPanelVecs; ++v) {
            const int64_t lanes = width - v * kLanes;
            if (lanes <= 0) break;
            const int64_t j0 = first_bank + v * kLanes;
            const Vec dot = vload(tile + r * kPanel + v * kLanes);
            // max(0, d) keeps a NaN (overflowing rows) as NaN, which never enters a list.
            const Vec d = vmax(vzero(), vsub(vadd(query_norm, vload(b.bank_norm_sq + j0)), vadd(dot, dot)));
            unsigned below = vmask_lt(d, vset1(values[k - 1]));
            if (lanes < kLanes) below &= (1u << lanes) - 1u;
            if (!below) continue;
            vstore(lane_values, d);
            while (below) {
              const int l = __builtin_ctz(below);
              below &= below - 1u;
              if (lane_values[l] < values[k - 1]) insert_sorted(values, indices, k, lane_values[l], j0 + l);
            }
          }
        }
      });
    }
  }
  std::free(scratch);
}

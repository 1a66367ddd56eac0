// One pass of the CPU greedy coreset over a slice of rows (see greedy_coreset_cpu.cpp for the
// selection around it). Needs simd.h and dot_tile.h first.
//
// For each group of kRows rows and each panel of up to kPanel batch centres, one dot tile
// gives the screen value S of every (row, centre) pair; only pairs the screen cannot rule out
// (coreset_screen.h) get an exact distance. The rows with the largest minima are kept for the
// next batch.

inline bool ranks_above(float value, int64_t index, float other_value, int64_t other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

// Keeps the kCandidates + 1 best rows offered. Rows arrive in ascending index order, so a
// value equal to the weakest kept one never displaces it.
struct TopKeeper {
  TopRows& top;
  float floor = -__builtin_inff();
  int weakest = 0;

  void offer(float value, int64_t index) {
    constexpr int capacity = kCandidates + 1;
    if (top.count < capacity) {
      top.value[top.count] = value;
      top.index[top.count] = index;
      if (++top.count == capacity) find_weakest();
      return;
    }
    if (!(value > floor)) return;
    top.value[weakest] = value;
    top.index[weakest] = index;
    find_weakest();
  }

  void find_weakest() {
    weakest = 0;
    for (int j = 1; j < top.count; ++j)
      if (ranks_above(top.value[weakest], top.index[weakest], top.value[j], top.index[j])) weakest = j;
    floor = top.value[weakest];
  }
};

void coreset_pass(const CoresetPass& p, int64_t lo, int64_t hi, TopRows& top) {
  top.count = 0;
  TopKeeper keeper{top};
  const int64_t dim = p.dim;
  const int panels = (p.batch + kPanel - 1) / kPanel;
  const float error = p.screen_error;
  const Vec underflow = vset1(screen::absolute_underflow(dim));
  float* scratch = static_cast<float*>(std::malloc(sizeof(float) * kRows * dim));
  alignas(64) float tile[kRows * kPanel];

  for_each_row_group(p.rows, dim, lo, hi, scratch, [&](const float* a, int64_t stride, int64_t first, int count) {
    // The next group's rows come from L3 or memory: ask for them while this group computes.
    const int64_t next_end = (first + 2 * kRows < hi ? first + 2 * kRows : hi) * dim;
    for (int64_t f = (first + kRows) * dim; f < next_end; f += 64 / sizeof(float)) __builtin_prefetch(p.rows + f);
    for (int panel = 0; panel < panels; ++panel) {
      dot_tile(a, stride, p.centres + panel * dim * kPanel, dim, tile);
      const int first_centre = panel * kPanel;
      const int width = p.batch - first_centre < kPanel ? p.batch - first_centre : kPanel;
      for (int r = 0; r < count; ++r) {
        const int64_t i = first + r;
        const Vec row_norm_sq = vset1(p.norm_sq[i]);
        const Vec row_norm = vset1(p.norm[i]);
        for (int v = 0; v < kPanelVecs; ++v) {
          const int c = first_centre + v * kLanes;
          const int lanes = width - v * kLanes;
          if (lanes <= 0) break;
          const Vec dot = vload(tile + r * kPanel + v * kLanes);
          const Vec s = vsub(vadd(row_norm_sq, vload(p.centre_norm_sq + c)), vadd(dot, dot));
          const Vec spread = vadd(row_norm, vload(p.centre_norm + c));
          const Vec e = vadd(vmul(vset1(error), vmul(spread, spread)), underflow);
          unsigned open = vmask_not_ge(vsub(s, e), vset1(p.skip_below[i]));
          if (lanes < kLanes) open &= (1u << lanes) - 1u;
          while (open) {
            const int l = __builtin_ctz(open);
            open &= open - 1u;
            const float d = exact_distance(p.rows + i * dim, p.centre_rows + (c + l) * dim, dim);
            if (d < p.min_distance[i]) {
              p.min_distance[i] = d;
              p.skip_below[i] = screen::skip_threshold(d, dim);
            }
          }
        }
      }
    }
    for (int r = 0; r < count; ++r) keeper.offer(p.min_distance[first + r], first + r);
  });
  std::free(scratch);
}

// Exact top-k that skips the bank rows a bound rules out (see cpu_kernels.h PrunedKnn and
// search_bound.h). Needs simd.h, dot_tile.h and knn_block.h first.
//
// A block of kPanel queries is packed twice as a panel ([dim][kPanel]): raw, and screened
// (Y_q, R_q, 1). Bank rows are the tile's rows (in place, or gathered by index), so every
// exact distance is the same sequential multiply-add chain and the same epilogue as knn's:
// the same float bit for bit. Lists are kept in (distance, bank index) order, so the order in
// which rows arrive does not matter.

// (value, index) precedes (value2, index2): smaller distance, or equal and lower bank index.
inline bool precedes(float value, int64_t index, float value2, int64_t index2) {
  return value < value2 || (value == value2 && index < index2);
}

// Insert (value, index) into a list of k pairs in that order; the caller checked that it
// precedes the last.
inline void insert_pair(float* values, int64_t* indices, int64_t k, float value, int64_t index) {
  int64_t pos = k - 1;
  while (pos > 0 && precedes(value, index, values[pos - 1], indices[pos - 1])) {
    values[pos] = values[pos - 1];
    indices[pos] = indices[pos - 1];
    --pos;
  }
  values[pos] = value;
  indices[pos] = index;
}

void project(const float* rows, int64_t dim, int64_t lo, int64_t hi, const float* packed, int64_t panels, float* out,
             int64_t out_stride) {
  float* scratch = static_cast<float*>(std::malloc(sizeof(float) * kRows * dim));
  alignas(64) float tile[kRows * kPanel];
  for_each_row_group(rows, dim, lo, hi, scratch, [&](const float* a, int64_t stride, int64_t first, int count) {
    for (int64_t panel = 0; panel < panels; ++panel) {
      dot_tile(a, stride, packed + panel * dim * kPanel, dim, tile);
      for (int r = 0; r < count; ++r)
        std::memcpy(out + (first + r) * out_stride + panel * kPanel, tile + r * kPanel, sizeof(float) * kPanel);
    }
  });
  std::free(scratch);
}

// One thread's state for a run of query blocks.
struct PrunedBlock {
  const PrunedKnn& s;
  float* exact_panel;    // [dim][kPanel] the block's queries
  float* screen_panel;   // [screen_dim][kPanel] their screen vectors
  float* extension_panel;// [extension_dim][kPanel] their extension vectors
  float* screened;       // [chunk_rows][kPanel] screen values t of the chunk's rows
  int64_t* stamp;        // [M] the (block, chunk) tag that last listed each row
  int64_t* rows;         // [chunk] rows to compute exactly
  int64_t* threshold_rows; // [kPanel k] rows whose distances set the thresholds
  float* screen_scratch; // [kRows][screen_dim] zero-padded last row group
  float* values;         // [kPanel][k] each query's list (distance, bank index)
  int64_t* indices;
  float* best_t;         // [kPanel][k] each query's k largest t, negated, with their rows
  int64_t* best_rows;
  alignas(64) float query_norm[kPanel];
  alignas(64) float kth[kPanel];        // each query's k-th distance
  alignas(64) float kth_t[kPanel];      // each query's k-th largest t
  alignas(64) float cut[kPanel];
  unsigned lanes[kPanelVecs];           // bits of the block's real queries in each vector
  int count;                            // real queries in the block

  // Exact distances from the block's queries to rows[0, n), into the lists.
  void exact(const int64_t* list, int64_t n) {
    const int64_t dim = s.dim, k = s.k;
    alignas(64) float tile[kRows * kPanel];
    alignas(64) float lane_values[kLanes];
    for (int64_t i = 0; i < n; i += kRows) {
      const int got = n - i < kRows ? static_cast<int>(n - i) : kRows;
      dot_tile_rows([&](int r) { return s.bank + list[i + (r < got ? r : 0)] * dim; }, exact_panel, dim, tile);
      for (int r = 0; r < got; ++r) {
        const int64_t row = list[i + r];
        const Vec bank_norm = vset1(s.bank_norm_sq[row]);
        for (int v = 0; v < kPanelVecs; ++v) {
          const Vec dot = vload(tile + r * kPanel + v * kLanes);
          // knn's epilogue, operand for operand (knn_block.h).
          const Vec d = vmax(vzero(), vsub(vadd(vload(query_norm + v * kLanes), bank_norm), vadd(dot, dot)));
          unsigned below = vmask_le(d, vload(kth + v * kLanes)) & lanes[v];
          if (!below) continue;
          vstore(lane_values, d);
          while (below) {
            const int l = __builtin_ctz(below);
            below &= below - 1u;
            const int q = v * kLanes + l;
            float* qv = values + q * k;
            int64_t* qi = indices + q * k;
            if (precedes(lane_values[l], row, qv[k - 1], qi[k - 1])) {
              insert_pair(qv, qi, k, lane_values[l], row);
              kth[q] = qv[k - 1];
            }
          }
        }
      }
    }
  }

  void forget_best() {
    for (int q = 0; q < kPanel; ++q) {
      kth_t[q] = -__builtin_inff();
      for (int64_t j = 0; j < s.k; ++j) {
        best_t[q * s.k + j] = __builtin_inff();
        best_rows[q * s.k + j] = -1;
      }
    }
  }

  // Stores row's screen values t (tile lanes) at `t` and keeps each query's k largest.
  void note(const float* tile, float* t, int64_t row) {
    const int64_t k = s.k;
    for (int v = 0; v < kPanelVecs; ++v) {
      const Vec tv = vload(tile + v * kLanes);
      vstore(t + v * kLanes, tv);
      unsigned above = vmask_lt(vload(kth_t + v * kLanes), tv) & lanes[v];
      while (above) {
        const int l = __builtin_ctz(above);
        above &= above - 1u;
        const int q = v * kLanes + l;
        insert_pair(best_t + q * k, best_rows + q * k, k, -t[q], row);
        kth_t[q] = -best_t[q * k + k - 1];
      }
    }
  }

  // Screens bank rows [c0, c1): stores every t and keeps each query's k largest.
  void screen(int64_t c0, int64_t c1) {
    const int64_t sd = s.screen_dim;
    alignas(64) float tile[kRows * kPanel];
    for_each_row_group(s.bank_screen, sd, c0, c1, screen_scratch, [&](const float* a, int64_t stride, int64_t first,
                                                                     int got) {
      dot_tile(a, stride, screen_panel, sd, tile);
      for (int r = 0; r < got; ++r) note(tile + r * kPanel, screened + (first + r - c0) * kPanel, first + r);
    });
  }

  void update_cuts(int64_t q0) {
    for (int q = 0; q < kPanel; ++q)
      cut[q] = q < count ? search_bound::cut(s.query_norm64[s.order[q0 + q]], kth[q], s.query_margin[s.order[q0 + q]])
                         : __builtin_inff();
  }

  // Exact distances first to each query's best-screened rows that its present cut keeps (they
  // tighten its cut; rows the cut rules out could not improve its list), then new cuts.
  int64_t thresholds(int64_t q0, int64_t tag) {
    update_cuts(q0);
    int64_t* list = threshold_rows;
    int64_t n = 0;
    for (int q = 0; q < count; ++q)
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t row = best_rows[q * s.k + j];
        if (row >= 0 && stamp[row] != tag && -best_t[q * s.k + j] >= cut[q]) {
          stamp[row] = tag;
          list[n++] = row;
        }
      }
    exact(list, n);
    update_cuts(q0);
    return n;
  }

  // Keeps (in place, in order) the rows among rows[0, n) not yet computed whose stored t some
  // query's cut keeps; returns how many.
  int64_t filter(int64_t c0, int64_t n, int64_t tag) {
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = rows[i];
      if (stamp[row] == tag) continue;
      const float* t = screened + (row - c0) * kPanel;
      unsigned keep = 0;
      for (int v = 0; v < kPanelVecs; ++v) keep |= vmask_le(vload(cut + v * kLanes), vload(t + v * kLanes));
      if (keep) rows[kept++] = row;
    }
    return kept;
  }

  // The cascade's second screen on rows[0, n): each row's t becomes t + its extension term
  // (stored in place), the best of those set new thresholds, and the rows some cut still keeps
  // are returned (in place, in order). *computed counts the threshold rows.
  int64_t rescreen(int64_t q0, int64_t c0, int64_t n, int64_t tag, int64_t* computed) {
    const int64_t ed = s.extension_dim;
    alignas(64) float tile[kRows * kPanel];
    forget_best();
    for (int64_t i = 0; i < n; i += kRows) {
      const int got = n - i < kRows ? static_cast<int>(n - i) : kRows;
      dot_tile_rows([&](int r) { return s.bank_extension + rows[i + (r < got ? r : 0)] * ed; }, extension_panel, ed,
                    tile);
      for (int r = 0; r < got; ++r) {
        float* t = screened + (rows[i + r] - c0) * kPanel;
        for (int v = 0; v < kPanelVecs; ++v)
          vstore(tile + r * kPanel + v * kLanes, vadd(vload(t + v * kLanes), vload(tile + r * kPanel + v * kLanes)));
        note(tile + r * kPanel, t, rows[i + r]);
      }
    }
    *computed += thresholds(q0, tag);
    return filter(c0, n, tag);
  }

  // The block's queries order[q0, q0 + count) against the whole bank; returns rows computed
  // exactly and adds the rows screened again to *extended.
  int64_t run(int64_t q0, int64_t tag, int64_t* extended) {
    const int64_t dim = s.dim, sd = s.screen_dim, ed = s.extension_dim, k = s.k, m = s.num_bank;
    count = s.num_queries - q0 < kPanel ? static_cast<int>(s.num_queries - q0) : kPanel;
    for (int v = 0; v < kPanelVecs; ++v) {
      const int real = count - v * kLanes;
      lanes[v] = real <= 0 ? 0u : (1u << (real < kLanes ? real : kLanes)) - 1u;  // kLanes <= 16
    }
    std::memset(exact_panel, 0, sizeof(float) * dim * kPanel);
    std::memset(screen_panel, 0, sizeof(float) * sd * kPanel);
    if (ed) std::memset(extension_panel, 0, sizeof(float) * ed * kPanel);
    for (int q = 0; q < kPanel; ++q) {
      query_norm[q] = 0.f;
      kth[q] = __builtin_inff();
      for (int64_t j = 0; j < k; ++j) {
        values[q * k + j] = __builtin_inff();
        indices[q * k + j] = -1;
      }
    }
    for (int q = 0; q < count; ++q) {
      const int64_t src = s.order[q0 + q];
      for (int64_t j = 0; j < dim; ++j) exact_panel[j * kPanel + q] = s.queries[src * dim + j];
      for (int64_t j = 0; j < sd; ++j) screen_panel[j * kPanel + q] = s.query_screen[src * sd + j];
      for (int64_t j = 0; j < ed; ++j) extension_panel[j * kPanel + q] = s.query_extension[src * ed + j];
      query_norm[q] = s.query_norm_sq[src];
    }
    int64_t computed = 0;
    for (int64_t c0 = 0; c0 < m; c0 += s.chunk_rows, ++tag) {
      const int64_t c1 = c0 + s.chunk_rows < m ? c0 + s.chunk_rows : m;
      forget_best();
      screen(c0, c1);
      computed += thresholds(q0, tag);
      // Then every row some query's cut keeps, in bank order (for a cascade: and still keeps
      // with the further directions).
      int64_t n = 0;
      for (int64_t row = c0; row < c1; ++row) rows[n++] = row;
      n = filter(c0, n, tag);
      if (ed) {
        *extended += n;
        n = rescreen(q0, c0, n, tag, &computed);
      }
      exact(rows, n);
      computed += n;
    }
    for (int q = 0; q < count; ++q) {
      const int64_t dst = s.order[q0 + q];
      std::memcpy(s.out_distance + dst * k, values + q * k, sizeof(float) * k);
      std::memcpy(s.out_index + dst * k, indices + q * k, sizeof(int64_t) * k);
    }
    return computed;
  }
};

void knn_pruned(const PrunedKnn& s, int64_t block_lo, int64_t block_hi) {
  const int64_t chunks = (s.num_bank + s.chunk_rows - 1) / s.chunk_rows;
  const int64_t chunk = s.chunk_rows < s.num_bank ? s.chunk_rows : s.num_bank;
  const int64_t pair = kPanel * s.k;
  // One allocation for the thread's scratch (floats and int64s, 64-byte aligned pieces).
  const int64_t floats =
      s.dim * kPanel + s.screen_dim * kPanel + s.extension_dim * kPanel + chunk * kPanel + kRows * s.screen_dim + 2 * pair;
  const int64_t longs = s.num_bank + chunk + pair + 2 * pair;
  char* memory = static_cast<char*>(std::aligned_alloc(64, ((floats * 4 + longs * 8) / 64 + 8) * 64));
  float* f = reinterpret_cast<float*>(memory);
  int64_t* l = reinterpret_cast<int64_t*>(memory + ((floats * 4 + 63) / 64) * 64);
  PrunedBlock b{s};
  b.exact_panel = f;
  b.screen_panel = b.exact_panel + s.dim * kPanel;
  b.extension_panel = b.screen_panel + s.screen_dim * kPanel;
  b.screened = b.extension_panel + s.extension_dim * kPanel;
  b.screen_scratch = b.screened + chunk * kPanel;
  b.values = b.screen_scratch + kRows * s.screen_dim;
  b.best_t = b.values + pair;
  b.stamp = l;
  b.rows = b.stamp + s.num_bank;
  b.threshold_rows = b.rows + chunk;
  b.indices = b.threshold_rows + pair;
  b.best_rows = b.indices + pair;
  std::memset(b.stamp, 0xff, sizeof(int64_t) * s.num_bank);  // -1: never a tag
  for (int64_t block = block_lo; block < block_hi; ++block) {
    s.extended_rows[block] = 0;
    s.exact_rows[block] = b.run(block * kPanel, block * chunks, &s.extended_rows[block]);
  }
  std::free(memory);
}

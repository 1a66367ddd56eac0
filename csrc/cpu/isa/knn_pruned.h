// Exact top-k that skips the bank rows a bound rules out (see cpu_kernels.h PrunedKnn and
// search_bound.h). Needs simd.h, dot_tile.h, knn_block.h and code_tile.h first.
//
// A block of kPanel queries is packed as panels: raw ([dim][kPanel]), their 8-bit codes for
// the first screen (code_tile.h) and, for a cascade, their extension vectors. Bank rows are the tile's rows (in place, or gathered by index), so every
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
  int8_t* code_panel;    // [code_dim / 4][kPanel][4] their codes
  float* code_panel_float; // [code_dim][kPanel] the same as floats (the portable path's tile)
  CodeLanes* code_lanes; // their code scales, errors, norms, residual bounds and offsets
  float* extension_panel;// [extension_dim][kPanel] their extension vectors
  float* screened;       // [chunk_rows][kPanel] screen values t of the chunk's rows
  int64_t* stamp;        // [M] the (block, chunk) tag that last listed each row
  int64_t* rows;         // [chunk] rows to compute exactly
  int64_t* by_vector[kPanelVecs]; // [chunk] each the rows the queries of one panel vector keep
  int64_t* threshold_rows; // [kPanel k] rows whose distances set the thresholds
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
  void exact(const int64_t* list, int64_t n) { exact_lanes<kRows, kPanelVecs>(list, n, 0); }

  // The same for the queries of vectors [v0, v0 + Vecs) only.
  template <int Rows, int Vecs>
  void exact_lanes(const int64_t* list, int64_t n, int v0) {
    const int64_t dim = s.dim, k = s.k;
    alignas(64) float tile[Rows * kPanel];
    alignas(64) float lane_values[kLanes];
    for (int64_t i = 0; i < n; i += Rows) {
      const int got = n - i < Rows ? static_cast<int>(n - i) : Rows;
      dot_tile_rows<Rows, Vecs>([&](int r) { return s.bank + list[i + (r < got ? r : 0)] * dim; },
                                exact_panel + v0 * kLanes, dim, tile);
      for (int r = 0; r < got; ++r) {
        const int64_t row = list[i + r];
        const Vec bank_norm = vset1(s.bank_norm_sq[row]);
        for (int v = v0; v < v0 + Vecs; ++v) {
          const Vec dot = vload(tile + r * kPanel + (v - v0) * kLanes);
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

  // The rows[0, n) the cuts keep, each computed only for the vectors of queries that keep it
  // (neighbouring queries keep mostly different rows: a row is rarely needed by a whole block).
  // Returns the (row, vector) pairs computed, in rows of a whole panel.
  int64_t exact_kept(int64_t c0, int64_t n) {
    int64_t counts[kPanelVecs];
    split_by_vector(c0, n, counts);
    int64_t pairs = 0;
    for (int v = 0; v < kPanelVecs; ++v) {
      exact_lanes<kTallRows, 1>(by_vector[v], counts[v], v);
      pairs += counts[v];
    }
    return (pairs + kPanelVecs - 1) / kPanelVecs;
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
    for (int v = 0; v < kPanelVecs; ++v) note_vector(vload(tile + v * kLanes), t, row, v);
  }

  // The same for the lanes of panel vector v, whose values are tv.
  void note_vector(Vec tv, float* t, int64_t row, int v) {
    const int64_t k = s.k;
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

  // Screens bank rows [c0, c1) with the codes: stores every t and keeps each query's k largest.
  void screen(int64_t c0, int64_t c1) {
    const int64_t cd = s.code_dim;
    alignas(64) float tile[kRows * kPanel];
    const uint8_t* rows_at[kRows];
    const float* terms_at[kRows];
    for (int64_t first = c0; first < c1; first += kRows) {
      const int got = c1 - first < kRows ? static_cast<int>(c1 - first) : kRows;
      for (int r = 0; r < kRows; ++r) {  // a short last group repeats its first row
        const int64_t row = first + (r < got ? r : 0);
        rows_at[r] = s.bank_codes + row * cd;
        terms_at[r] = s.bank_code_terms + row * kCodeTerms;
      }
      code_tile(rows_at, terms_at, got, code_panel, code_panel_float, cd / 4, *code_lanes, s.vnni, tile);
      for (int r = 0; r < got; ++r) note(tile + r * kPanel, screened + (first + r - c0) * kPanel, first + r);
    }
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

  // Splits rows[0, n) by the panel vectors whose queries' cuts keep them (stored t); returns
  // how many went to each vector's list (by_vector).
  void split_by_vector(int64_t c0, int64_t n, int64_t* counts) {
    for (int v = 0; v < kPanelVecs; ++v) counts[v] = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float* t = screened + (rows[i] - c0) * kPanel;
      for (int v = 0; v < kPanelVecs; ++v)
        if (vmask_le(vload(cut + v * kLanes), vload(t + v * kLanes)) & lanes[v]) by_vector[v][counts[v]++] = rows[i];
    }
  }

  // The cascade's second screen on rows[0, n), per panel vector that keeps a row: its lanes' t
  // become t + the extension term (stored in place), the best of those set new thresholds, and
  // the rows some cut still keeps are returned (in place, in order). *computed counts the
  // threshold rows, *extended the (row, vector) pairs screened again, in rows of a whole panel.
  int64_t rescreen(int64_t q0, int64_t c0, int64_t n, int64_t tag, int64_t* computed, int64_t* extended) {
    constexpr int kTall = kTallRows;
    const int64_t ed = s.extension_dim;
    alignas(64) float tile[kTall * kPanel];
    int64_t counts[kPanelVecs];
    split_by_vector(c0, n, counts);
    forget_best();
    int64_t pairs = 0;
    for (int v = 0; v < kPanelVecs; ++v) {
      const int64_t* list = by_vector[v];
      pairs += counts[v];
      for (int64_t i = 0; i < counts[v]; i += kTall) {
        const int got = counts[v] - i < kTall ? static_cast<int>(counts[v] - i) : kTall;
        dot_tile_rows<kTall, 1>([&](int r) { return s.bank_extension + list[i + (r < got ? r : 0)] * ed; },
                                extension_panel + v * kLanes, ed, tile);
        for (int r = 0; r < got; ++r) {
          float* t = screened + (list[i + r] - c0) * kPanel;
          const Vec t2 = vadd(vload(t + v * kLanes), vload(tile + r * kPanel));
          note_vector(t2, t, list[i + r], v);
        }
      }
    }
    *extended += (pairs + kPanelVecs - 1) / kPanelVecs;
    *computed += thresholds(q0, tag);
    return filter(c0, n, tag);
  }

  // The block's queries order[q0, q0 + count) against the whole bank; returns rows computed
  // exactly and adds the rows screened again to *extended.
  int64_t run(int64_t q0, int64_t tag, int64_t* extended) {
    const int64_t dim = s.dim, cd = s.code_dim, ed = s.extension_dim, k = s.k, m = s.num_bank;
    count = s.num_queries - q0 < kPanel ? static_cast<int>(s.num_queries - q0) : kPanel;
    for (int v = 0; v < kPanelVecs; ++v) {
      const int real = count - v * kLanes;
      lanes[v] = real <= 0 ? 0u : (1u << (real < kLanes ? real : kLanes)) - 1u;  // kLanes <= 16
    }
    std::memset(exact_panel, 0, sizeof(float) * dim * kPanel);
    std::memset(code_panel, 0, static_cast<size_t>(cd) * kPanel);
    std::memset(code_panel_float, 0, sizeof(float) * cd * kPanel);
    std::memset(code_lanes, 0, sizeof(CodeLanes));
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
      for (int64_t j = 0; j < cd; ++j) {
        code_panel[(j / 4 * kPanel + q) * 4 + j % 4] = s.query_codes[src * cd + j];
        code_panel_float[j * kPanel + q] = s.query_codes[src * cd + j];
      }
      const float* terms = s.query_code_terms + src * 4;
      code_lanes->scale[q] = terms[0];
      code_lanes->error[q] = terms[1];
      code_lanes->norm[q] = terms[2];
      code_lanes->residual[q] = terms[3];
      code_lanes->offset[q] = s.query_code_offset[src];
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
      if (ed) n = rescreen(q0, c0, n, tag, &computed, extended);
      computed += exact_kept(c0, n);
    }
    for (int q = 0; q < count; ++q) {
      const int64_t dst = s.order[q0 + q];
      std::memcpy(s.out_distance + dst * k, values + q * k, sizeof(float) * k);
      std::memcpy(s.out_index + dst * k, indices + q * k, sizeof(int64_t) * k);
    }
    return computed;
  }
};

void knn_pruned(const PrunedKnn& s, std::atomic<int64_t>& next_block, int64_t block_end) {
  const int64_t chunks = (s.num_bank + s.chunk_rows - 1) / s.chunk_rows;
  const int64_t chunk = s.chunk_rows < s.num_bank ? s.chunk_rows : s.num_bank;
  const int64_t pair = kPanel * s.k;
  // One allocation for the thread's scratch (floats and int64s, 64-byte aligned pieces).
  // Pieces rounded up to 16 floats, so that each starts 64-byte aligned.
  const auto whole = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t exact_floats = whole(s.dim * kPanel), lanes_floats = whole(sizeof(CodeLanes) / 4);
  const int64_t code_floats = whole((s.code_dim * kPanel + 3) / 4), extension_floats = whole(s.extension_dim * kPanel);
  const int64_t floats = exact_floats + lanes_floats + code_floats + whole(s.code_dim * kPanel) + extension_floats +
                         whole(chunk * kPanel) + 2 * pair;
  const int64_t longs = s.num_bank + chunk * (1 + kPanelVecs) + pair + 2 * pair;
  char* memory = static_cast<char*>(std::aligned_alloc(64, ((floats * 4 + longs * 8) / 64 + 8) * 64));
  float* f = reinterpret_cast<float*>(memory);
  int64_t* l = reinterpret_cast<int64_t*>(memory + ((floats * 4 + 63) / 64) * 64);
  PrunedBlock b{s};
  b.exact_panel = f;
  b.code_lanes = new (f + exact_floats) CodeLanes;
  b.code_panel = reinterpret_cast<int8_t*>(f + exact_floats + lanes_floats);
  b.code_panel_float = f + exact_floats + lanes_floats + code_floats;
  b.extension_panel = b.code_panel_float + whole(s.code_dim * kPanel);
  b.screened = b.extension_panel + extension_floats;
  b.values = b.screened + whole(chunk * kPanel);
  b.best_t = b.values + pair;
  b.stamp = l;
  b.rows = b.stamp + s.num_bank;
  for (int v = 0; v < kPanelVecs; ++v) b.by_vector[v] = b.rows + chunk * (1 + v);
  b.threshold_rows = b.rows + chunk * (1 + kPanelVecs);
  b.indices = b.threshold_rows + pair;
  b.best_rows = b.indices + pair;
  std::memset(b.stamp, 0xff, sizeof(int64_t) * s.num_bank);  // -1: never a tag
  for (int64_t block; (block = next_block.fetch_add(1, std::memory_order_relaxed)) < block_end;) {
    s.extended_rows[block] = 0;
    s.exact_rows[block] = b.run(block * kPanel, block * chunks, &s.extended_rows[block]);
  }
  std::free(memory);
}

// The locally aware patch embedding in one pass over the feature maps (cpu_kernels.h EmbedLayer,
// ResampleAdd; the index arithmetic in embedding_bins.h). No neighbourhood is ever unfolded.
//
// Per row of a layer's grid: the three map rows around it, of every channel, zero-padded by one
// cell on the left and to whole vectors on the right ("padded", [channels][3][span]). Element u
// of the neighbourhood of cell x is then padded[offsets[u] + x], so kLanes neighbouring cells
// take a bin's elements as whole vectors. Per column, in registers: each bin summed element by
// element in u order and divided by its length (as torch's adaptive pooling does), the bins
// added, the sum divided by the layer count; then the lanes are written to their cells' rows.

void embed_layer(const EmbedLayer& e, int64_t row_lo, int64_t row_hi) {
  const int64_t w = e.width, chunks = (w + kLanes - 1) / kLanes, span = chunks * kLanes + 2;
  const int64_t length = 9 * e.channels;
  float* padded = static_cast<float*>(std::malloc(sizeof(float) * e.channels * 3 * span));
  float* tile = static_cast<float*>(std::malloc(sizeof(float) * e.columns * kLanes));
  // Element u = c * 9 + ky * 3 + kx of a neighbourhood: padded row (c, ky), shifted by kx.
  int64_t* offsets = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * length));
  for (int64_t u = 0; u < length; ++u) offsets[u] = (u / 9 * 3 + u % 9 / 3) * span + u % 3;
  const Vec layers = vset1(static_cast<float>(e.layers));
  for (int64_t row = row_lo; row < row_hi; ++row) {
    const int64_t image = row / e.height, y = row - image * e.height;
    const float* maps = e.maps + image * e.channels * e.height * w;
    for (int64_t c = 0; c < e.channels; ++c) {
      for (int64_t ky = 0; ky < 3; ++ky) {
        float* dst = padded + (c * 3 + ky) * span;
        const int64_t source_y = y + ky - 1;
        std::memset(dst, 0, sizeof(float) * span);
        if (source_y >= 0 && source_y < e.height) std::memcpy(dst + 1, maps + (c * e.height + source_y) * w, sizeof(float) * w);
      }
    }
    for (int64_t x0 = 0; x0 < w; x0 += kLanes) {
      for (int64_t j = 0; j < e.columns; ++j) {
        // The bins of this layer that column first_column + j averages.
        const int64_t entry = (e.first_column + j) * e.layers - e.layer * e.dim;
        const int64_t bin_lo = entry > 0 ? entry : 0, bin_hi = entry + e.layers < e.dim ? entry + e.layers : e.dim;
        Vec value = vzero();
        for (int64_t b = bin_lo; b < bin_hi; ++b) {
          const int64_t start = embedding::bin_start(b, length, e.dim), end = embedding::bin_end(b, length, e.dim);
          Vec sum = vzero();
          for (int64_t u = start; u < end; ++u) sum = vadd(sum, vload(padded + offsets[u] + x0));
          value = vadd(value, vdiv(sum, vset1(static_cast<float>(end - start))));
        }
        vstore(tile + j * kLanes, vdiv(value, layers));
      }
      const int64_t cells = w - x0 < kLanes ? w - x0 : kLanes;
      for (int64_t c = 0; c < cells; ++c) {
        float* out = e.out + (row * w + x0 + c) * e.out_stride;
        int64_t j = 0;
        for (; j < e.added_columns; ++j) out[j] += tile[j * kLanes + c];
        for (; j < e.columns; ++j) out[j] = tile[j * kLanes + c];
      }
    }
  }
  std::free(offsets);
  std::free(tile);
  std::free(padded);
}

void resample_add(const ResampleAdd& r, int64_t row_lo, int64_t row_hi) {
  const int64_t columns = r.columns;
  for (int64_t row = row_lo; row < row_hi; ++row) {
    const int64_t image = row / r.out_height, y = row - image * r.out_height;
    const embedding::Taps ty = embedding::bilinear_taps(y, r.height, r.out_height);
    const float* above = r.source + (image * r.height + ty.i0) * r.width * columns;
    const float* below = r.source + (image * r.height + ty.i1) * r.width * columns;
    for (int64_t x = 0; x < r.out_width; ++x) {
      const embedding::Taps tx = embedding::bilinear_taps(x, r.width, r.out_width);
      const float* a = above + tx.i0 * columns;
      const float* b = above + tx.i1 * columns;
      const float* c = below + tx.i0 * columns;
      const float* d = below + tx.i1 * columns;
      float* out = r.out + (row * r.out_width + x) * r.out_stride;
      int64_t j = 0;
      for (; j < r.added_columns; ++j) {
        out[j] += ty.w0 * (tx.w0 * a[j] + tx.w1 * b[j]) + ty.w1 * (tx.w0 * c[j] + tx.w1 * d[j]);
      }
      for (; j < columns; ++j) {
        out[j] = ty.w0 * (tx.w0 * a[j] + tx.w1 * b[j]) + ty.w1 * (tx.w0 * c[j] + tx.w1 * d[j]);
      }
    }
  }
}

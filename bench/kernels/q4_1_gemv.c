/* A hand-written float32-activation Q4_1 matrix-vector product (AVX-512), for bench/q4_gemv.py.
 *
 * y[n] = sum_b d[n,b] * (q[n,b,:] . x[32b:32b+32]) + m[n,b] * sum(x[32b:32b+32]): the GGUF's Q4_1
 * (w = d*q + m, element j of a block in the low nibble of byte j, element j+16 in the high
 * nibble), the min term folded in, activations kept float32. It exists to measure whether a
 * custom kernel could beat ONNX Runtime's MatMulNBits at accuracy level 0 (issue 14), not to
 * serve: it is not an ONNX Runtime operator.
 */
#include <immintrin.h>
#include <stdint.h>

static void rows(const uint8_t* q, const float* d, const float* m, const float* x,
                 const float* bs, float* y, int n0, int n1, int kb) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  int n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < kb; b++) {
      const __m512 xl = _mm512_loadu_ps(x + 32 * b), xh = _mm512_loadu_ps(x + 32 * b + 16);
      for (int r = 0; r < 4; r++) {
        const size_t blk = (size_t)(n + r) * kb + b;
        const __m128i raw = _mm_loadu_si128((const __m128i*)(q + 16 * blk));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
        const __m512 t = _mm512_fmadd_ps(hi, xh, _mm512_mul_ps(lo, xl));
        acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(d[blk]), acc[r]);
      }
    }
    for (int r = 0; r < 4; r++) {
      float s = _mm512_reduce_add_ps(acc[r]);
      for (int b = 0; b < kb; b++) s += m[(size_t)(n + r) * kb + b] * bs[b];
      y[n + r] = s;
    }
  }
  for (; n < n1; n++) {  /* a tail of fewer than 4 rows */
    float s = 0;
    for (int b = 0; b < kb; b++) {
      const size_t blk = (size_t)n * kb + b;
      float dot = 0;
      for (int j = 0; j < 16; j++)
        dot += (float)(q[16 * blk + j] & 15) * x[32 * b + j] + (float)(q[16 * blk + j] >> 4) * x[32 * b + 16 + j];
      s += d[blk] * dot + m[blk] * bs[b];
    }
    y[n] = s;
  }
}

/* One decode step's products: `count` matrices, each [N[i], K[i]] against its own x[i]. */
void q4_1_gemv_many(const uint8_t** q, const float** d, const float** m, const float** x, float** y,
                    const int* N, const int* K, int count, int threads) {
  for (int i = 0; i < count; i++) {
    const int kb = K[i] / 32;
    float bs[1024];
    for (int b = 0; b < kb; b++) {
      float s = 0;
      for (int j = 0; j < 32; j++) s += x[i][32 * b + j];
      bs[b] = s;
    }
    const int per = ((N[i] / threads + 3) / 4) * 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
      const int n0 = t * per, n1 = n0 + per < N[i] ? n0 + per : N[i];
      if (n0 < n1) rows(q[i], d[i], m[i], x[i], bs, y[i], n0, n1, kb);
    }
  }
}

/* The same product by table lookup (T-MAC's idea, kept in float32): for each group of 4
 * activations, a table of the 16 sums of its subsets; a weight row's 4-bit values split into
 * bit planes, each plane picks one table entry per group, and plane k counts 2^k. Sixteen rows at
 * once: one vpermps looks up 16 rows' entries of one table. Layout (bench/q4_gemv.py `lut_layout`):
 * for each tile of 16 rows, each block, each pair of groups, 16 dwords (one per row) whose nibble
 * 4*g+k is row r's plane-k pattern in group g of the pair; d and m as [tile][block][16]. */
static void lut_tile(const uint32_t* w, const float* d, const float* m, const float* tables,
                     const float* bs, float* y, int kb) {
  __m512 acc = _mm512_setzero_ps();
  for (int b = 0; b < kb; b++) {
    __m512 p[4], q[4];  /* plane sums of the pair's first and second group: 8 short chains */
    for (int k = 0; k < 4; k++) p[k] = q[k] = _mm512_setzero_ps();
    for (int pair = 0; pair < 4; pair++) {
      const __m512i v = _mm512_loadu_si512((const void*)(w + 16 * (4 * b + pair)));
      const float* t = tables + 16 * (8 * b + 2 * pair);
      const __m512 t0 = _mm512_loadu_ps(t), t1 = _mm512_loadu_ps(t + 16);
      for (int k = 0; k < 4; k++) {
        p[k] = _mm512_add_ps(p[k], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * k), t0));
        q[k] = _mm512_add_ps(q[k], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * k + 16), t1));
      }
    }
    for (int k = 0; k < 4; k++) p[k] = _mm512_add_ps(p[k], q[k]);
    const __m512 s = _mm512_fmadd_ps(p[3], _mm512_set1_ps(8.f),
                     _mm512_fmadd_ps(p[2], _mm512_set1_ps(4.f), _mm512_fmadd_ps(p[1], _mm512_set1_ps(2.f), p[0])));
    acc = _mm512_fmadd_ps(s, _mm512_loadu_ps(d + 16 * b), acc);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(m + 16 * b), _mm512_set1_ps(bs[b]), acc);
  }
  _mm512_storeu_ps(y, acc);
}

void q4_1_lut_many(const uint32_t** w, const float** d, const float** m, const float** x, float** y,
                   const int* N, const int* K, int count, int threads) {
  static float tables[1536 / 4 * 16];
  for (int i = 0; i < count; i++) {
    const int kb = K[i] / 32, tiles = N[i] / 16;
    float bs[64];
    /* entry p of a group's table: the sum of the activations whose bit is set in p */
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 bit[4];
    for (int j = 0; j < 4; j++)
      bit[j] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lane, j), _mm512_set1_epi32(1)));
    for (int g = 0; g < K[i] / 4; g++) {
      const float* xg = x[i] + 4 * g;
      __m512 t = _mm512_mul_ps(bit[0], _mm512_set1_ps(xg[0]));
      for (int j = 1; j < 4; j++) t = _mm512_fmadd_ps(bit[j], _mm512_set1_ps(xg[j]), t);
      _mm512_storeu_ps(tables + 16 * g, t);
    }
    for (int b = 0; b < kb; b++) {
      float s = 0;
      for (int j = 0; j < 32; j++) s += x[i][32 * b + j];
      bs[b] = s;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++)
      lut_tile(w[i] + (size_t)t * kb * 4 * 16, d[i] + (size_t)t * kb * 16, m[i] + (size_t)t * kb * 16,
               tables, bs, y[i] + 16 * t, kb);
  }
}

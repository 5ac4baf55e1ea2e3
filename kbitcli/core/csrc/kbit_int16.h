/* The integer path of batch-1 decode (included from kbit_matmul.c on the AVX2 + FMA path; AVX-512 VBMI CPUs keep
 * their exact walk, whose k = 4 lookup is one `vpermps` per 16 values and which nobody has measured against this):
 * k = 4 with any codebook and k = 8 with the int one, rows of whole blocks of 32, 64 or 128, one row of x.
 * Why: the exact k = 4 walk (csrc/kbit_avx2.h, row_dot_k4) rebuilds every fp32 codebook entry from four byte
 * planes, 12 shuffle-unit instructions per 32 values (~3 values a cycle, well under what memory delivers): it
 * left nf4 decode of SmolLM2-135M at ~1.6x dense fp32 however the loop was arranged. Here x is rounded once per
 * call to int16 in groups of 32 (one fp32 scale each: the group's absmax / 16383) and the 16 codebook entries to
 * int16 (entry / max|entry| * 16383; an int codebook's entries, and k = 8 int codes, are small integers already
 * and stay exact); 32 products are two `vpshufb` (the lookup, low and high bytes) + two unpacks + two
 * `vpmaddwd`: exact integer sums, one int -> float conversion and one FMA (the group's x scale) per 32 values,
 * the block's weight scale once per block.
 * Why int16 and not int8 activations (llama.cpp's Q8_0 x with `vpmaddubsw`, a little faster again): measured on
 * SmolLM2-135M (emulated on the same windows), x at int8 per 32 values added 1.9% to nf4's ΔNLL and an int8
 * codebook 1.5% (3.9% together; through this kernel, int8 measured +4.3%); at 14 bits each, the loss is the exact
 * path's to 4 decimals (docs/SPEED.md). The result differs from the exact fp32 walk by ~1e-4 of a layer's largest
 * output; KBIT_EXACT=1 / matvec.set_exact(True) keeps every row on that walk. */

enum { I16_GROUP = 32, I16_MAX = 16383 }; /* |x|, |entry| <= 2^14 - 1: four products per int32 lane never overflow */

typedef struct {
    int8_t lo[32], hi[32]; /* the 16 int16 codebook entries' low and high bytes, twice (both 128-bit lanes) */
    float cb_step;         /* value = int16 entry * cb_step */
} i16_book;

/* the int16 form of the codebook, or 0 when it has none (k = 4: an infinite entry, or all zero) */
static int i16_codebook(const kbit_weight *w, i16_book *book) {
    if (w->bits == 8) { /* int: the code itself, minus the zero, in the walk */
        book->cb_step = w->affine_step;
        return 1;
    }
    int16_t e[16];
    if (w->affine_zero >= 0) { /* int: entry i = (i - zero) * step exactly, and |i - zero| <= 8 */
        for (int i = 0; i < 16; i++) e[i] = (int16_t)(i - w->affine_zero);
        book->cb_step = w->affine_step;
    } else {
        /* a NaN entry is padding past a 15-entry table (fp, int): no loaded module has a code for it (check_codes
         * refuses such a file at load), so it becomes 0; an Inf would be a damaged table: the exact path */
        float amax = 0.0f;
        for (int i = 0; i < 16; i++) {
            if (isinf(w->codebook[i])) return 0;
            if (!isnan(w->codebook[i])) amax = fmaxf(amax, fabsf(w->codebook[i]));
        }
        if (amax == 0.0f) return 0;
        for (int i = 0; i < 16; i++)
            e[i] = isnan(w->codebook[i]) ? 0 : (int16_t)lrintf(w->codebook[i] / amax * (float)I16_MAX);
        book->cb_step = amax / (float)I16_MAX;
    }
    for (int i = 0; i < 16; i++) {
        uint16_t u = (uint16_t)e[i];
        book->lo[i] = book->lo[16 + i] = (int8_t)(u & 0xff);
        book->hi[i] = book->hi[16 + i] = (int8_t)(u >> 8);
    }
    return 1;
}

/* k = 4 with any codebook; k = 8 with the int one (codes 0..254 = -127..127) */
static int i16_row_ok(const kbit_weight *w, int64_t m) {
    return m == 1 && !w->transposed && w->cols % w->block == 0 &&
           (w->block == 32 || w->block == 64 || w->block == 128) &&
           (w->bits == 4 || (w->bits == 8 && w->affine_zero == 127));
}

/* where value i of a group of 32 goes in the k = 4 walk's order: k4_codes leaves the even positions in the low
 * 128-bit lane and the odd in the high one, and each unpack takes 8 of each */
static inline int i16_slot(int i) { return (i & 1) * 8 + ((i >> 1) & 7) + (i >> 4) * 16; }

/* x (cols values, cols a multiple of 32) -> xq: per group of 32, int16 values (k = 4: in the walk's order), and
 * xs: the group's scale. Returns 0 if x is not finite (the exact path then carries the NaN/Inf through, as dense
 * would). */
static int i16_quantize_x(const float *x, int64_t cols, int k4, int16_t *xq, float *xs) {
    for (int64_t g = 0; g < cols / I16_GROUP; g++) {
        const float *xp = x + g * I16_GROUP;
        float amax = 0.0f;
        for (int i = 0; i < I16_GROUP; i++) {
            float a = fabsf(xp[i]);
            if (!(a <= FLT_MAX)) return 0; /* NaN or Inf (fmaxf would skip a NaN: test_non_finite_and_zero_x) */
            amax = a > amax ? a : amax;
        }
        float inv = amax > 0.0f ? (float)I16_MAX / amax : 0.0f;
        xs[g] = amax / (float)I16_MAX;
        int16_t *q = xq + g * I16_GROUP;
        for (int i = 0; i < I16_GROUP; i++) q[k4 ? i16_slot(i) : i] = (int16_t)lrintf(xp[i] * inv);
    }
    return 1;
}

/* 8 int32 partial sums of the 32 products of the codes at cp (k = 4: 16 bytes; k = 8: 32) and xq. k = 8 codes
 * are clamped to 254 first: 255 exists only in a damaged file. */
static inline __attribute__((always_inline)) __m256i i16_dot32(const uint8_t *cp, const int16_t *xq, const __m256i lo,
                                                                const __m256i hi, const __m256i nib, const int K) {
    __m256i wa, wb;
    if (K == 4) {
        __m256i c = k4_codes(cp, nib);
        __m256i l = _mm256_shuffle_epi8(lo, c), h = _mm256_shuffle_epi8(hi, c);
        wa = _mm256_unpacklo_epi8(l, h);
        wb = _mm256_unpackhi_epi8(l, h);
    } else {
        const __m256i top = _mm256_set1_epi16(254), zero = _mm256_set1_epi16(127);
        wa = _mm256_sub_epi16(_mm256_min_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)cp)), top), zero);
        wb = _mm256_sub_epi16(_mm256_min_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cp + 16))), top),
                              zero);
    }
    return _mm256_add_epi32(_mm256_madd_epi16(wa, _mm256_loadu_si256((const __m256i *)xq)),
                            _mm256_madd_epi16(wb, _mm256_loadu_si256((const __m256i *)(xq + 16))));
}

/* the sum over one block's NQ groups of 32 of (integer dot) x (the group's x scale), in float */
static inline __attribute__((always_inline)) __m256 i16_block(const uint8_t *cp, const int16_t *xq, const float *xs,
                                                              const __m256i lo, const __m256i hi, const __m256i nib,
                                                              const int NQ, const int K) {
    __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(i16_dot32(cp, xq, lo, hi, nib, K)), _mm256_broadcast_ss(xs));
    for (int q = 1; q < NQ; q++)
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i16_dot32(cp + 4 * K * q, xq + 32 * q, lo, hi, nib, K)),
                            _mm256_broadcast_ss(xs + q), s);
    return s;
}

/* dot(stored row r, x) for a row of whole blocks of 32 * NQ values, its blocks' scales (times the codebook step)
 * in scl: each block's group sums times its scale, two blocks a step into two accumulators (FMA latency; both stay
 * in registers) */
static inline __attribute__((always_inline)) float i16_row(const uint8_t *row, int64_t nb, const float *scl,
                                                           const int16_t *xq, const float *xs, const __m256i lo,
                                                           const __m256i hi, const int NQ, const int K) {
    const int64_t B = 32 * NQ;
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    const uint8_t *cp = row;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, cp += B * K / 4, xq += 2 * B, xs += 2 * NQ) {
        _mm_prefetch((const char *)cp + 2048, _MM_HINT_T0);
        if (K == 8) _mm_prefetch((const char *)cp + 2048 + 64, _MM_HINT_T0);
        acc0 = _mm256_fmadd_ps(i16_block(cp, xq, xs, lo, hi, nib, NQ, K), _mm256_set1_ps(scl[b]), acc0);
        acc1 = _mm256_fmadd_ps(i16_block(cp + B * K / 8, xq + B, xs + NQ, lo, hi, nib, NQ, K),
                               _mm256_set1_ps(scl[b + 1]), acc1);
    }
    if (b < nb) acc0 = _mm256_fmadd_ps(i16_block(cp, xq, xs, lo, hi, nib, NQ, K), _mm256_set1_ps(scl[b]), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* out[r] = dot(stored row r, x) for rows [r0, r1). Rows of whole blocks are contiguous in the block order, so the
 * scales of as many rows as fit in one 512-entry table are decoded in one call (a short row, SmolLM2's 576
 * values = 9 blocks, spent a third of its time on per-row scale decoding when each row did its own); a row of
 * more than 512 blocks goes in passes. */
static inline __attribute__((always_inline)) void i16_rows(const kbit_weight *w, const i16_book *book, int64_t r0,
                                                           int64_t r1, const int16_t *xq, const float *xs, float *out,
                                                           const int NQ, const int K) {
    const int64_t B = 32 * NQ, nb = w->cols / B, row_bytes = w->cols * K / 8;
    const __m256i lo = _mm256_loadu_si256((const __m256i *)book->lo), hi = _mm256_loadu_si256((const __m256i *)book->hi);
    enum { PASS = 512 };
    float scl[PASS];
    if (nb <= PASS) {
        const int64_t per = PASS / nb;
        for (int64_t r = r0; r < r1; r += per) {
            const int64_t n = r1 - r < per ? r1 - r : per;
            row_scales(w, r * nb, n * nb, book->cb_step, scl);
            for (int64_t i = 0; i < n; i++)
                out[r + i] = i16_row(w->codes + (r + i) * row_bytes, nb, scl + i * nb, xq, xs, lo, hi, NQ, K);
        }
        return;
    }
    for (int64_t r = r0; r < r1; r++) {
        float sum = 0.0f;
        for (int64_t p0 = 0; p0 < nb; p0 += PASS) {
            const int64_t n = nb - p0 < PASS ? nb - p0 : PASS;
            row_scales(w, r * nb + p0, n, book->cb_step, scl);
            sum += i16_row(w->codes + r * row_bytes + p0 * B * K / 8, n, scl, xq + p0 * B, xs + p0 * NQ, lo, hi, NQ, K);
        }
        out[r] = sum;
    }
}

static void i16_dot(const kbit_weight *w, const i16_book *book, int64_t r0, int64_t r1, const int16_t *xq,
                    const float *xs, float *out) {
    const int k8 = w->bits == 8;
    switch (w->block) { /* i16_row_ok admits 32, 64 and 128 */
    case 32: if (k8) i16_rows(w, book, r0, r1, xq, xs, out, 1, 8); else i16_rows(w, book, r0, r1, xq, xs, out, 1, 4); return;
    case 64: if (k8) i16_rows(w, book, r0, r1, xq, xs, out, 2, 8); else i16_rows(w, book, r0, r1, xq, xs, out, 2, 4); return;
    default: if (k8) i16_rows(w, book, r0, r1, xq, xs, out, 4, 8); else i16_rows(w, book, r0, r1, xq, xs, out, 4, 4); return;
    }
}
#define KBIT_INT16 1

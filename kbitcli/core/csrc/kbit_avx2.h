/* The AVX2 + FMA path of kbit_matmul.c (included from there; AMD Zen 1-4 before AVX-512 VBMI, most Intel client
 * CPUs): the same walk as the AVX-512 path, 8 codes at a time instead of 16.
 * Why a path of its own: the portable loop decodes one code per iteration (shift, mask, table load, multiply)
 * and gcc cannot vectorise the bit extraction, so on an AVX2 machine a 4-bit layer ran slower than fp32 dense.
 * 8 codes of k bits are exactly k whole bytes, so within a block segment every 8-code chunk starts at the same
 * bit offset o and one (byte shuffle, shift) pattern per o extracts them all: the chunk's (at most 8) bytes are
 * read as one 64-bit word and broadcast, `vpshufb` puts the two bytes each code touches into its 32-bit lane,
 * `vpsrlvd` + mask leave the code. Values: one `vpermps` for k <= 3, two and a blend on bit 3 for k = 4, the
 * integer itself for a uniform (int) codebook (its step folded into the block scale), else a gather. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

typedef struct {
    __m256i idx[8], shift[8]; /* per starting bit offset o: the byte shuffle and right shifts of 8 lanes */
    __m256 lut[2];            /* codebook entries 0-7 and 8-15 */
    __m256i plane[4];         /* k = 4: byte b of each of the 16 entries, in both 128-bit lanes (row_dot_fast) */
    __m256i mask, zero;
    const float *table;
    const uint8_t *codes_end; /* an 8-byte read that would pass it takes the bytes one by one */
    int k, affine;
    int aligned, chunk_shift; /* every block is whole 8-code chunks within one row; chunk q is in block q >> chunk_shift */
} simd_ctx;

static void byte_planes(const float *codebook, __m256i plane[4]) {
    uint8_t pb[4][32];
    for (int i = 0; i < 16; i++) {
        uint8_t bytes[4];
        memcpy(bytes, codebook + i, 4);
        for (int b = 0; b < 4; b++) pb[b][i] = pb[b][16 + i] = bytes[b];
    }
    for (int b = 0; b < 4; b++) plane[b] = _mm256_loadu_si256((const __m256i *)pb[b]);
}

static void simd_init(simd_ctx *s, const kbit_weight *w) {
    int k = w->bits;
    s->k = k;
    for (int o = 0; o < 8; o++) {
        uint8_t idx[32];
        uint32_t sh[8];
        for (int i = 0; i < 8; i++) {
            /* lane i holds (byte j << 8 | byte j+1) with j the byte of the code's first bit; both 128-bit halves
             * hold the 8 bytes twice (bytes 8-15 = 0-7), so j + 1 = 8 reads byte 0: only when the code ends
             * inside byte j, and then the shift drops it */
            int bp = o + i * k, j = bp >> 3, lane = 4 * (i & 3) + 16 * (i >> 2);
            idx[lane] = (uint8_t)(j + 1);
            idx[lane + 1] = (uint8_t)j;
            idx[lane + 2] = idx[lane + 3] = 0x80; /* zero */
            sh[i] = (uint32_t)(16 - (bp & 7) - k);
        }
        s->idx[o] = _mm256_loadu_si256((const __m256i *)idx);
        s->shift[o] = _mm256_loadu_si256((const __m256i *)sh);
    }
    s->lut[0] = _mm256_loadu_ps(w->codebook);
    s->lut[1] = _mm256_loadu_ps(w->codebook + 8);
    byte_planes(w->codebook, s->plane);
    s->mask = _mm256_set1_epi32((1 << k) - 1);
    s->table = w->codebook;
    s->codes_end = w->codes + (w->rows * w->cols * k + 7) / 8;
    s->affine = k >= 5 && w->affine_zero >= 0;
    s->zero = _mm256_set1_epi32(w->affine_zero);
    int64_t B = w->block;
    s->aligned = !w->transposed && B % 8 == 0 && (B & (B - 1)) == 0 && w->cols % B == 0;
    s->chunk_shift = 0;
    while ((8LL << s->chunk_shift) < B) s->chunk_shift++;
}

static inline __attribute__((always_inline)) uint64_t load8(const simd_ctx *s, const uint8_t *src) {
    uint64_t u = 0;
    if (src + 8 <= s->codes_end) memcpy(&u, src, 8); /* one load */
    else memcpy(&u, src, (size_t)(s->codes_end - src)); /* the last bytes of the weight */
    return u;
}

/* codebook values (for an affine codebook: code - zero) of the 8 codes whose first bit is bit o of *src */
static inline __attribute__((always_inline)) __m256 simd_values(const simd_ctx *s, const uint8_t *src, int o,
                                                                const int k) {
    uint64_t u = load8(s, src);
    __m256i c;
    if (k == 8) {
        c = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)u));
    } else {
        __m256i words = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)u), s->idx[o]);
        c = _mm256_and_si256(_mm256_srlv_epi32(words, s->shift[o]), s->mask);
    }
    if (k <= 3) return _mm256_permutevar8x32_ps(s->lut[0], c);
    if (k == 4) {
        __m256 lo = _mm256_permutevar8x32_ps(s->lut[0], c), hi = _mm256_permutevar8x32_ps(s->lut[1], c);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28))); /* bit 3 -> sign */
    }
    if (s->affine) return _mm256_cvtepi32_ps(_mm256_sub_epi32(c, s->zero));
    return _mm256_i32gather_ps(s->table, c, 4);
}

static inline float hsum8(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* out[mi] = dot(stored row r, x[mi]) for mc (<= 8) rows of x; as the AVX-512 row_dot: na independent
 * accumulators per row when mc is 1 or 2 (FMA latency), a straight walk for rows of whole power-of-two blocks,
 * block segments otherwise (a segment's last < 8 codes one at a time). */
static inline __attribute__((always_inline)) void row_dot(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                          const float *x, int64_t ldx, float *out, int64_t ldo,
                                                          const int mc, const int k) {
    const int na = mc == 1 ? 4 : (mc == 2 ? 2 : 1);
    __m256 acc[4][8];
    float tail[8] = {0};
    for (int a = 0; a < na; a++)
        for (int mi = 0; mi < mc; mi++) acc[a][mi] = _mm256_setzero_ps();
    const float step = s->affine ? w->affine_step : 1.0f;
    int64_t start = r * w->cols, p = start, end = start + w->cols;
    if (s->aligned) {
        enum { PASS = 512 };
        float scl[PASS];
        const int64_t nchunks = w->cols / 8, b0 = start / w->block;
        const uint8_t *src = w->codes + (start * k >> 3); /* start * k is whole bytes: cols is whole blocks of 8 */
        const int sh = s->chunk_shift;
        for (int64_t q0 = 0; q0 < nchunks; q0 += (int64_t)PASS << sh) {
            int64_t q1 = q0 + ((int64_t)PASS << sh) < nchunks ? q0 + ((int64_t)PASS << sh) : nchunks;
            row_scales(w, b0 + (q0 >> sh), ((q1 - 1) >> sh) - (q0 >> sh) + 1, step, scl);
            const float *sp = scl - (q0 >> sh);
            int64_t q = q0;
            for (; q + na <= q1; q += na) {
                _mm_prefetch((const char *)(src + q * k) + PREFETCH_BYTES, _MM_HINT_T0);
                for (int a = 0; a < na; a++) {
                    __m256 v = _mm256_mul_ps(simd_values(s, src + (q + a) * k, 0, k), _mm256_set1_ps(sp[(q + a) >> sh]));
                    for (int mi = 0; mi < mc; mi++)
                        acc[a][mi] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (q + a) * 8 + mi * ldx), acc[a][mi]);
                }
            }
            for (; q < q1; q++) {
                __m256 v = _mm256_mul_ps(simd_values(s, src + q * k, 0, k), _mm256_set1_ps(sp[q >> sh]));
                for (int mi = 0; mi < mc; mi++)
                    acc[0][mi] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + q * 8 + mi * ldx), acc[0][mi]);
            }
        }
        p = end;
    }
    int64_t b = start / w->block, block_end = (b + 1) * w->block;
    while (p < end) {
        int64_t seg_end = block_end < end ? block_end : end;
        float scale = block_scale(w, b);
        __m256 sc = _mm256_set1_ps(scale * step);
        int64_t full = (seg_end - p) / 8;
        if (full) {
            int64_t bit = p * k;
            const uint8_t *src = w->codes + (bit >> 3);
            const int o = (int)(bit & 7);
            const float *xp = x + (p - start);
            int64_t i = 0;
            for (; i + na <= full; i += na, src += na * k, xp += na * 8) {
                _mm_prefetch((const char *)src + PREFETCH_BYTES, _MM_HINT_T0);
                for (int a = 0; a < na; a++) {
                    __m256 v = _mm256_mul_ps(simd_values(s, src + a * k, o, k), sc);
                    for (int mi = 0; mi < mc; mi++)
                        acc[a][mi] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + a * 8 + mi * ldx), acc[a][mi]);
                }
            }
            for (; i < full; i++, src += k, xp += 8) {
                __m256 v = _mm256_mul_ps(simd_values(s, src, o, k), sc);
                for (int mi = 0; mi < mc; mi++)
                    acc[0][mi] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + mi * ldx), acc[0][mi]);
            }
            p += 8 * full;
        }
        for (; p < seg_end; p++) { /* the segment's last < 8 codes: the table itself, times the block scale */
            float v = w->codebook[code_at(w->codes, p, k)] * scale;
            for (int mi = 0; mi < mc; mi++) tail[mi] += v * x[mi * ldx + (p - start)];
        }
        b++;
        block_end += w->block;
    }
    for (int mi = 0; mi < mc; mi++) {
        __m256 t = acc[0][mi];
        if (na == 4) t = _mm256_add_ps(_mm256_add_ps(acc[0][mi], acc[1][mi]), _mm256_add_ps(acc[2][mi], acc[3][mi]));
        else if (na == 2) t = _mm256_add_ps(acc[0][mi], acc[1][mi]);
        out[mi * ldo] = hsum8(t) + tail[mi];
    }
}

/* ---- one row of x (token-by-token decode), rows of whole blocks: k = 4 (blocks of 32s) and k = 8 (16s) ---------
 * Two more savings where they matter most: a block's products are summed first and multiplied by its scale once
 * (not once per value), and for k = 4 the table lookup uses byte shuffles instead of `vpermps` (one or two
 * per cycle on AMD Zen 3, where two `vpermps` + a blend per 8 values capped the kernel at ~1.4 values a cycle):
 * 16 bytes of codes = 32 codes; the high nibbles (codes 0, 2, ..) go to the low 128-bit lane and the low nibbles
 * (codes 1, 3, ..) to the high lane, one byte each; four `vpshufb` look up the four bytes of each fp32 codebook
 * entry (byte planes of the 16-entry table), and two rounds of unpacks put them back together as floats, bit
 * for bit the codebook's. The unpacks leave 8 values of codes [8g, 8g+2, 8g+4, 8g+6, 8g+1, 8g+3, 8g+5, 8g+7]
 * per register, so kbit_matmul lays x out once per call in that order (fast_x). */
static int fast_row_ok(const kbit_weight *w, int64_t m) {
    return m == 1 && !w->transposed && w->cols % w->block == 0 &&
           ((w->bits == 4 && w->block % 32 == 0) || (w->bits == 8 && w->block % 16 == 0));
}

/* x in the order row_dot_fast reads it: for k = 4, each 8 values as the 4 even then the 4 odd ones */
static void fast_x(const kbit_weight *w, const float *x, float *out) {
    if (w->bits != 4) { memcpy(out, x, (size_t)w->cols * sizeof(float)); return; }
    for (int64_t i = 0; i < w->cols; i += 8)
        for (int j = 0; j < 4; j++) { out[i + j] = x[i + 2 * j]; out[i + 4 + j] = x[i + 2 * j + 1]; }
}

/* the 32 codes of 16 bytes of k = 4 codes, one a byte: the high nibbles (codes 0, 2, ..) in the low 128-bit lane,
 * the low nibbles (codes 1, 3, ..) in the high one (NIB: 0x0f in every byte). K4_VALUES and the integer path
 * (kbit_int16.h) look them up, and lay x out in this order. */
static inline __attribute__((always_inline)) __m256i k4_codes(const uint8_t *p, const __m256i nib) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_blend_epi32(_mm256_srli_epi16(v, 4), v, 0xF0), nib);
}

/* the 32 fp32 codebook values of 16 bytes of k = 4 codes (row_dot_fast's order, see above): PLn the byte planes */
#define K4_VALUES(P, PL0, PL1, PL2, PL3, NIB, V0, V1, V2, V3)                                                     \
    do {                                                                                                          \
        __m256i c_ = k4_codes((const uint8_t *)(P), (NIB));                                                       \
        __m256i b0_ = _mm256_shuffle_epi8((PL0), c_), b1_ = _mm256_shuffle_epi8((PL1), c_);                       \
        __m256i b2_ = _mm256_shuffle_epi8((PL2), c_), b3_ = _mm256_shuffle_epi8((PL3), c_);                       \
        __m256i lo01_ = _mm256_unpacklo_epi8(b0_, b1_), hi01_ = _mm256_unpackhi_epi8(b0_, b1_);                   \
        __m256i lo23_ = _mm256_unpacklo_epi8(b2_, b3_), hi23_ = _mm256_unpackhi_epi8(b2_, b3_);                   \
        V0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01_, lo23_));                                            \
        V1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01_, lo23_));                                            \
        V2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01_, hi23_));                                            \
        V3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01_, hi23_));                                            \
    } while (0)

/* 32 values (k = 4: 16 bytes) or 16 values (k = 8: 16 bytes) from byte p times x, into the block's accumulators */
#define FAST_STEP(K, P, XP, A0, A1, A2, A3)                                                                       \
    do {                                                                                                          \
        if ((K) == 4) {                                                                                           \
            __m256 u0_, u1_, u2_, u3_;                                                                            \
            K4_VALUES(P, plane[0], plane[1], plane[2], plane[3], nib, u0_, u1_, u2_, u3_);                         \
            A0 = _mm256_fmadd_ps(u0_, _mm256_loadu_ps(XP), A0);                                                   \
            A1 = _mm256_fmadd_ps(u1_, _mm256_loadu_ps((XP) + 8), A1);                                             \
            A2 = _mm256_fmadd_ps(u2_, _mm256_loadu_ps((XP) + 16), A2);                                            \
            A3 = _mm256_fmadd_ps(u3_, _mm256_loadu_ps((XP) + 24), A3);                                            \
        } else {                                                                                                  \
            __m256i d0_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(P)));                             \
            __m256i d1_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((P) + 8)));                       \
            __m256 v0_, v1_;                                                                                      \
            if (s->affine) {                                                                                      \
                v0_ = _mm256_cvtepi32_ps(_mm256_sub_epi32(d0_, s->zero));                                         \
                v1_ = _mm256_cvtepi32_ps(_mm256_sub_epi32(d1_, s->zero));                                         \
            } else {                                                                                              \
                v0_ = _mm256_i32gather_ps(s->table, d0_, 4);                                                      \
                v1_ = _mm256_i32gather_ps(s->table, d1_, 4);                                                      \
            }                                                                                                     \
            A0 = _mm256_fmadd_ps(v0_, _mm256_loadu_ps(XP), A0);                                                   \
            A1 = _mm256_fmadd_ps(v1_, _mm256_loadu_ps((XP) + 8), A1);                                             \
        }                                                                                                         \
    } while (0)

static inline __attribute__((always_inline)) void row_dot_fast(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                               const float *xd, float *out, const int k) {
    const int64_t B = w->block, nb = w->cols / B, b0 = r * nb, per_step = k == 4 ? 32 : 16, nq = B / per_step;
    const uint8_t *row = w->codes + r * w->cols * k / 8;
    const float step = s->affine ? w->affine_step : 1.0f;
    const __m256i *plane = s->plane;
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    enum { PASS = 512 };
    float scl[PASS];
    for (int64_t p0 = 0; p0 < nb; p0 += PASS) {
        int64_t n = nb - p0 < PASS ? nb - p0 : PASS;
        row_scales(w, b0 + p0, n, step, scl);
        for (int64_t b = 0; b < n; b++) {
            const uint8_t *cp = row + (p0 + b) * B * k / 8;
            const float *xp = xd + (p0 + b) * B;
            _mm_prefetch((const char *)cp + PREFETCH_BYTES, _MM_HINT_T0);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t q = 0;
            if (k == 8) /* two steps into four chains: FMA latency */
                for (; q + 2 <= nq; q += 2) {
                    FAST_STEP(8, cp + q * 16, xp + q * 16, a0, a1, a2, a3);
                    FAST_STEP(8, cp + (q + 1) * 16, xp + (q + 1) * 16, a2, a3, a0, a1);
                }
            for (; q < nq; q++) FAST_STEP(k, cp + q * 16, xp + q * per_step, a0, a1, a2, a3);
            __m256 sc = _mm256_set1_ps(scl[b]);
            acc0 = _mm256_fmadd_ps(a0, sc, acc0);
            acc1 = _mm256_fmadd_ps(a1, sc, acc1);
            acc2 = _mm256_fmadd_ps(a2, sc, acc2);
            acc3 = _mm256_fmadd_ps(a3, sc, acc3);
        }
    }
    out[0] = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}
/* k = 4 with blocks of 32, 64 or 128 (every recipe's): the walk above with the block's step count a
 * compile-time constant, so the steps are straight-line code, the four byte planes and the accumulators stay in
 * the 16 ymm registers (the generic walk reloads the planes and spills two accumulators every block: ~80
 * instructions per 64 values, which is what capped it at ~2.6 values a cycle), a block's four partial sums are
 * added before its one scale multiply, and two block accumulators alternate (FMA latency). */
static inline __attribute__((always_inline)) __m256 k4_block(const uint8_t *cp, const float *xp, const __m256i pl0,
                                                             const __m256i pl1, const __m256i pl2, const __m256i pl3,
                                                             const __m256i nib, const int NQ) {
    __m256 v0, v1, v2, v3;
    K4_VALUES(cp, pl0, pl1, pl2, pl3, nib, v0, v1, v2, v3);
    __m256 a0 = _mm256_mul_ps(v0, _mm256_loadu_ps(xp)), a1 = _mm256_mul_ps(v1, _mm256_loadu_ps(xp + 8));
    __m256 a2 = _mm256_mul_ps(v2, _mm256_loadu_ps(xp + 16)), a3 = _mm256_mul_ps(v3, _mm256_loadu_ps(xp + 24));
    for (int q = 1; q < NQ; q++) {
        K4_VALUES(cp + 16 * q, pl0, pl1, pl2, pl3, nib, v0, v1, v2, v3);
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xp + 32 * q), a0);
        a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xp + 32 * q + 8), a1);
        a2 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xp + 32 * q + 16), a2);
        a3 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xp + 32 * q + 24), a3);
    }
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

static inline __attribute__((always_inline)) void row_dot_k4(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                             const float *xd, float *out, const int NQ) {
    const int64_t B = 32 * NQ, nb = w->cols / B;
    const uint8_t *row = w->codes + r * w->cols / 2;
    const __m256i pl0 = s->plane[0], pl1 = s->plane[1], pl2 = s->plane[2], pl3 = s->plane[3];
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    enum { PASS = 512 };
    float scl[PASS];
    for (int64_t p0 = 0; p0 < nb; p0 += PASS) {
        const int64_t n = nb - p0 < PASS ? nb - p0 : PASS;
        row_scales(w, r * nb + p0, n, 1.0f, scl);
        const uint8_t *cp = row + p0 * B / 2;
        const float *xp = xd + p0 * B;
        int64_t b = 0;
        for (; b + 2 <= n; b += 2, cp += B, xp += 2 * B) {
            _mm_prefetch((const char *)cp + PREFETCH_BYTES, _MM_HINT_T0);
            acc0 = _mm256_fmadd_ps(k4_block(cp, xp, pl0, pl1, pl2, pl3, nib, NQ), _mm256_set1_ps(scl[b]), acc0);
            acc1 = _mm256_fmadd_ps(k4_block(cp + B / 2, xp + B, pl0, pl1, pl2, pl3, nib, NQ), _mm256_set1_ps(scl[b + 1]),
                                   acc1);
        }
        if (b < n) acc0 = _mm256_fmadd_ps(k4_block(cp, xp, pl0, pl1, pl2, pl3, nib, NQ), _mm256_set1_ps(scl[b]), acc0);
    }
    out[0] = hsum8(_mm256_add_ps(acc0, acc1));
}

static void dot_fast_4(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *xd, float *out) {
    switch (w->block) {
    case 32: row_dot_k4(w, s, r, xd, out, 1); return;
    case 64: row_dot_k4(w, s, r, xd, out, 2); return;
    case 128: row_dot_k4(w, s, r, xd, out, 4); return;
    default: row_dot_fast(w, s, r, xd, out, 4);
    }
}
static void dot_fast_8(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *xd, float *out) {
    row_dot_fast(w, s, r, xd, out, 8);
}
#define KBIT_FAST_ROW 1

/* y[mi, c0:c1] += x[mi, r] * (stored row r)[c0:c1] for mc (<= 8) rows of x: the transposed (Conv1D) case */
static inline __attribute__((always_inline)) void row_axpy(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                           const float *x, int64_t ldx, float *y, int64_t ldy,
                                                           int64_t c0, int64_t c1, const int mc, const int k) {
    int64_t start = r * w->cols, p = start + c0, end = start + c1;
    while (p < end) {
        int64_t b = p / w->block, seg_end = (b + 1) * w->block;
        if (seg_end > end) seg_end = end;
        float sc = block_scale(w, b) * (s->affine ? w->affine_step : 1.0f);
        __m256 a[8];
        for (int mi = 0; mi < mc; mi++) a[mi] = _mm256_set1_ps(x[mi * ldx + r] * sc);
        int64_t bit = p * k;
        const uint8_t *src = w->codes + (bit >> 3);
        const int o = (int)(bit & 7);
        for (; p + 8 <= seg_end; p += 8, src += k) {
            __m256 v = simd_values(s, src, o, k);
            for (int mi = 0; mi < mc; mi++) {
                float *yp = y + mi * ldy + (p - start);
                _mm256_storeu_ps(yp, _mm256_fmadd_ps(v, a[mi], _mm256_loadu_ps(yp)));
            }
        }
        for (; p < seg_end; p++) { /* exactly what a vector lane computes, so where a thread's columns start
                                    * (which values take this loop) never changes a result */
            int c = code_at(w->codes, p, k);
            float v = s->affine ? (float)(c - w->affine_zero) : w->codebook[c];
            for (int mi = 0; mi < mc; mi++) {
                float *yp = y + mi * ldy + (p - start);
                *yp = fmaf(v, x[mi * ldx + r] * sc, *yp);
            }
        }
    }
}
/* out[i] = value of flat position p + i for p in [p, end): codebook entry x block scale, rounded to fp32 as torch's
 * decoder rounds it (uniform codebooks looked up, not computed: bit for bit core/blockwise.dequantize) */
static inline __attribute__((always_inline)) void decode_range(const kbit_weight *w, const simd_ctx *s0, int64_t p,
                                                               int64_t end, float *out, const int k) {
    simd_ctx sc_ = *s0;
    sc_.affine = 0;
    const simd_ctx *s = &sc_;
    while (p < end) {
        int64_t b = p / w->block, seg_end = (b + 1) * w->block < end ? (b + 1) * w->block : end;
        float scale = block_scale(w, b);
        __m256 sc = _mm256_set1_ps(scale);
        int64_t bit = p * k;
        const uint8_t *src = w->codes + (bit >> 3);
        const int o = (int)(bit & 7);
        for (; p + 8 <= seg_end; p += 8, src += k, out += 8)
            _mm256_storeu_ps(out, _mm256_mul_ps(simd_values(s, src, o, k), sc));
        for (; p < seg_end; p++) *out++ = w->codebook[code_at(w->codes, p, k)] * scale;
    }
}
#define CTX_DECL simd_ctx ctx; simd_init(&ctx, w); const simd_ctx *s = &ctx;

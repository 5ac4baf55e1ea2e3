/* Fused k-bit small-batch matmul on CPU: y = x @ W^T (or x @ W for a transposed, Conv1D-style weight), reading
 * the packed codes of W directly; W is never materialised. See kbitcli/core/matvec.py for why C, how it is built
 * and loaded, and the layout it reads (the one core/blockwise.py + core/pack.py write):
 *   - the stored [rows, cols] matrix is flattened row-major and cut into blocks of `block` values, one scale each
 *     (a block may span two rows);
 *   - code i sits at stream bits [i*k, (i+1)*k), stream bit j is bit (7 - j%8) of byte j/8 (MSB first);
 *   - value = codebook[code] * scale(block).
 * Each output row (or, transposed, each stored row) is walked as segments: the part of the row inside one block.
 * A segment is decoded 16 codes at a time: since 16 codes are 2k whole bytes, the bit offset of the first code
 * is the same for every 16-code chunk of the segment, so one (byte shuffle, shift) pattern serves it all. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__) && !defined(KBIT_PORTABLE) && \
    !defined(KBIT_NO_AVX512)
#include <immintrin.h>
#define KBIT_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(KBIT_PORTABLE)
#include <immintrin.h>
#define KBIT_AVX2 1 /* csrc/kbit_avx2.h */
#endif

typedef struct {
    const uint8_t *codes;
    int64_t rows, cols;    /* the stored matrix */
    int64_t block;         /* values per scale */
    int32_t bits;          /* k = 2..8 */
    int32_t scale_kind;    /* 0 fp32, 1 fp16, 2 bf16, 3 double quant (uint8 codes into dq_table) */
    const void *scales;
    const float *codebook; /* 256 entries (padded by the caller) */
    const float *dq_table; /* 256 entries */
    const float *dq_absmax; /* one per 256 blocks */
    float dq_offset;
    int32_t transposed;
    int32_t affine_zero;   /* >= 0: the codebook is uniform, value = (code - affine_zero) * affine_step (int types) */
    float affine_step;
} kbit_weight;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, f;
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-8f; /* subnormal (or zero): man * 2^-24, exact */
        memcpy(&f, &v, 4);
        f |= sign;
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (man << 13);
    } else {
        f = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

static inline float block_scale(const kbit_weight *w, int64_t b) {
    switch (w->scale_kind) {
    case 0: return ((const float *)w->scales)[b];
    case 1: return half_to_float(((const uint16_t *)w->scales)[b]);
    case 2: { uint32_t u = (uint32_t)((const uint16_t *)w->scales)[b] << 16; float f; memcpy(&f, &u, 4); return f; }
    default: { /* as torch computes it: a product, then a sum, each rounded (compiled with -ffp-contract=off) */
        float p = w->dq_table[((const uint8_t *)w->scales)[b]] * w->dq_absmax[b / 256];
        return p + w->dq_offset; }
    }
}

static inline int code_at(const uint8_t *codes, int64_t i, int k) {
    int64_t bit = i * k;
    const uint8_t *p = codes + (bit >> 3);
    int o = (int)(bit & 7);
    unsigned word = (unsigned)p[0] << 8;
    if (o + k > 8) word |= p[1]; /* only read the second byte when the code reaches it (it may be past the end) */
    return (int)((word >> (16 - o - k)) & ((1u << k) - 1));
}

/* the scales of blocks [b0, b0 + n) times `step`, the scale kind switched on once, not once per block */
static inline void row_scales(const kbit_weight *w, int64_t b0, int64_t n, float step, float *out) {
    switch (w->scale_kind) {
    case 0: for (int64_t i = 0; i < n; i++) out[i] = ((const float *)w->scales)[b0 + i] * step; break;
    case 1: for (int64_t i = 0; i < n; i++) out[i] = half_to_float(((const uint16_t *)w->scales)[b0 + i]) * step; break;
    default: for (int64_t i = 0; i < n; i++) out[i] = block_scale(w, b0 + i) * step; break;
    }
}

#ifdef KBIT_AVX512
/* how far ahead of the decode the code stream is prefetched: at batch 1 the hardware prefetcher alone left the
 * kernel at ~3.5 GB/s from DRAM against ~7.8 GB/s from cache (SmolLM2's nf4 layers, one thread) */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif
typedef struct {
    __m512i idx[8], shift[8]; /* per starting bit offset: byte gather pattern and right shifts of 16 lanes */
    __m512 lut[16];           /* the codebook, 16 floats per register */
    __m512i mask;
    const float *table;
    __m512i zero;
    int k, affine;
    int aligned, chunk_shift; /* every block is whole 16-code chunks within one row; chunk q is in block q >> chunk_shift */
} simd_ctx;

static void simd_init(simd_ctx *s, const kbit_weight *w) {
    int k = w->bits;
    s->k = k;
    for (int o = 0; o < 8; o++) {
        uint8_t idx[64];
        uint32_t sh[16];
        memset(idx, 0, sizeof idx);
        for (int i = 0; i < 16; i++) {
            int bp = o + i * k, j = bp >> 3;
            idx[4 * i] = (uint8_t)(j + 1); /* little-endian dword: low byte = the later stream byte */
            idx[4 * i + 1] = (uint8_t)j;
            sh[i] = (uint32_t)(16 - (bp & 7) - k);
        }
        s->idx[o] = _mm512_loadu_si512(idx);
        s->shift[o] = _mm512_loadu_si512(sh);
    }
    for (int i = 0; i < 16; i++) s->lut[i] = _mm512_loadu_ps(w->codebook + 16 * i);
    s->mask = _mm512_set1_epi32((1 << k) - 1);
    s->table = w->codebook;
    s->affine = k >= 6 && w->affine_zero >= 0;
    s->zero = _mm512_set1_epi32(w->affine_zero);
    int64_t B = w->block;
    s->aligned = !w->transposed && B % 16 == 0 && (B & (B - 1)) == 0 && w->cols % B == 0;
    s->chunk_shift = 0;
    while ((16LL << s->chunk_shift) < B) s->chunk_shift++;
}

/* codebook values of 16 codes whose first bit is bit o of *src; `load` masks the bytes they occupy (masked-off
 * bytes are never touched, so the last chunk cannot read past the buffer). k is a literal at every call site. */
static inline __attribute__((always_inline)) __m512 simd_values(const simd_ctx *s, const uint8_t *src, int o,
                                                                __mmask64 load, const int k) {
    __m512i c;
    if (k == 8) {
        c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)load, src));
    } else {
        __m512i raw = _mm512_maskz_loadu_epi8(load, src);
        __m512i words = _mm512_maskz_permutexvar_epi8((__mmask64)0x3333333333333333ULL, s->idx[o], raw);
        c = _mm512_and_si512(_mm512_srlv_epi32(words, s->shift[o]), s->mask);
    }
    if (k <= 4) return _mm512_permutexvar_ps(c, s->lut[0]);
    /* a uniform (int) codebook needs no table: the step is folded into the block scale (see scale_of) */
    if (k >= 6 && s->affine) return _mm512_cvtepi32_ps(_mm512_sub_epi32(c, s->zero));
    if (k == 5) return _mm512_permutex2var_ps(s->lut[0], c, s->lut[1]);
    if (k == 8) return _mm512_i32gather_ps(c, s->table, 4); /* measured: faster than a 15-op tree at k = 8 */
    __m512 v[8];
    const int groups = 1 << (k - 5);
    for (int g = 0; g < groups; g++) v[g] = _mm512_permutex2var_ps(s->lut[2 * g], c, s->lut[2 * g + 1]);
    for (int bitn = 5; bitn < k; bitn++) {
        __mmask16 hi = _mm512_test_epi32_mask(c, _mm512_set1_epi32(1 << bitn));
        int step = 1 << (bitn - 5);
        for (int g = 0; g < groups; g += 2 * step) v[g] = _mm512_mask_blend_ps(hi, v[g], v[g + step]);
    }
    return v[0];
}

/* where the n codes from flat position q start, and the byte mask that covers them */
#define CHUNK_AT(q, n) int64_t bit_ = (q) * k; const uint8_t *src = w->codes + (bit_ >> 3); int o = (int)(bit_ & 7); \
    __mmask64 load = (__mmask64)((1ULL << ((o + (n) * k + 7) >> 3)) - 1);

/* out[mi] = dot(stored row r, x[mi]) for mc (<= 8) rows of x.
 * Each FMA chain is latency-bound (an FMA waits ~4 cycles for the previous one into the same register), so with
 * one or two rows of x the 16-value chunks go round-robin into na independent accumulators per row (measured on
 * SmolLM2's nf4 layers at batch 1, from cache: 1.2-1.3x the throughput of one chain). Rows of whole power-of-two
 * blocks (the usual layer) take a straight walk with no per-block bookkeeping (another 1.35x at B = 64); other
 * rows walk block segments, the block index advancing with the walk instead of a 64-bit division per segment. */
static inline __attribute__((always_inline)) void row_dot(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                          const float *x, int64_t ldx, float *out, int64_t ldo,
                                                          const int mc, const int k) {
    const int na = mc == 1 ? 4 : (mc == 2 ? 2 : 1);
    __m512 acc[4][8];
    for (int a = 0; a < na; a++)
        for (int mi = 0; mi < mc; mi++) acc[a][mi] = _mm512_setzero_ps();
    const float step = s->affine ? w->affine_step : 1.0f;
    int64_t start = r * w->cols, p = start, end = start + w->cols;
    if (s->aligned) {
        /* whole blocks of whole chunks (the usual case: B = 64, rows a multiple of it): one straight walk over
         * the row's chunks, each chunk's scale read from a small table filled once per pass */
        enum { PASS = 512 };
        float scl[PASS];
        const int64_t nchunks = w->cols / 16, b0 = start / w->block;
        const uint8_t *src = w->codes + (start * k >> 3);
        const __mmask64 load = (__mmask64)((1ULL << (2 * k)) - 1);
        const int sh = s->chunk_shift;
        for (int64_t q0 = 0; q0 < nchunks; q0 += (int64_t)PASS << sh) {
            int64_t q1 = q0 + ((int64_t)PASS << sh) < nchunks ? q0 + ((int64_t)PASS << sh) : nchunks;
            row_scales(w, b0 + (q0 >> sh), ((q1 - 1) >> sh) - (q0 >> sh) + 1, step, scl);
            const float *sp = scl - (q0 >> sh);
            int64_t q = q0;
            for (; q + na <= q1; q += na) {
                _mm_prefetch((const char *)(src + q * 2 * k) + PREFETCH_BYTES, _MM_HINT_T0);
                for (int a = 0; a < na; a++) {
                    __m512 v = _mm512_mul_ps(simd_values(s, src + (q + a) * 2 * k, 0, load, k),
                                             _mm512_set1_ps(sp[(q + a) >> sh]));
                    for (int mi = 0; mi < mc; mi++)
                        acc[a][mi] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + (q + a) * 16 + mi * ldx), acc[a][mi]);
                }
            }
            for (; q < q1; q++) {
                __m512 v = _mm512_mul_ps(simd_values(s, src + q * 2 * k, 0, load, k), _mm512_set1_ps(sp[q >> sh]));
                for (int mi = 0; mi < mc; mi++)
                    acc[0][mi] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + q * 16 + mi * ldx), acc[0][mi]);
            }
        }
        p = end;
    }
    int64_t b = start / w->block, block_end = (b + 1) * w->block;
    while (p < end) {
        int64_t seg_end = block_end < end ? block_end : end;
        __m512 sc = _mm512_set1_ps(block_scale(w, b) * step);
        int64_t full = (seg_end - p) / 16;
        if (full) {
            CHUNK_AT(p, 16)
            const float *xp = x + (p - start);
            int64_t i = 0;
            for (; i + na <= full; i += na, src += na * 2 * k, xp += na * 16) {
                _mm_prefetch((const char *)src + PREFETCH_BYTES, _MM_HINT_T0);
                for (int a = 0; a < na; a++) {
                    __m512 v = _mm512_mul_ps(simd_values(s, src + a * 2 * k, o, load, k), sc);
                    for (int mi = 0; mi < mc; mi++)
                        acc[a][mi] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xp + a * 16 + mi * ldx), acc[a][mi]);
                }
            }
            for (; i < full; i++, src += 2 * k, xp += 16) {
                __m512 v = _mm512_mul_ps(simd_values(s, src, o, load, k), sc);
                for (int mi = 0; mi < mc; mi++) acc[0][mi] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xp + mi * ldx), acc[0][mi]);
            }
            p += 16 * full;
        }
        if (p < seg_end) {
            int n = (int)(seg_end - p);
            CHUNK_AT(p, n)
            __mmask16 m = (__mmask16)((1u << n) - 1);
            __m512 v = _mm512_mul_ps(simd_values(s, src, o, load, k), sc);
            for (int mi = 0; mi < mc; mi++)
                acc[0][mi] = _mm512_mask3_fmadd_ps(v, _mm512_maskz_loadu_ps(m, x + mi * ldx + (p - start)), acc[0][mi], m);
            p = seg_end;
        }
        b++;
        block_end += w->block;
    }
    for (int mi = 0; mi < mc; mi++) {
        __m512 t = acc[0][mi];
        if (na == 4) t = _mm512_add_ps(_mm512_add_ps(acc[0][mi], acc[1][mi]), _mm512_add_ps(acc[2][mi], acc[3][mi]));
        else if (na == 2) t = _mm512_add_ps(acc[0][mi], acc[1][mi]);
        out[mi * ldo] = _mm512_reduce_add_ps(t);
    }
}

/* y[mi, :] += x[mi, r] * (stored row r) for mc (<= 8) rows of x: the transposed (Conv1D) case */
static inline __attribute__((always_inline)) void row_axpy(const kbit_weight *w, const simd_ctx *s, int64_t r,
                                                           const float *x, int64_t ldx, float *y, int64_t ldy,
                                                           int64_t c0, int64_t c1, const int mc, const int k) {
    int64_t start = r * w->cols, p = start + c0, end = start + c1;
    while (p < end) {
        int64_t b = p / w->block, seg_end = (b + 1) * w->block;
        if (seg_end > end) seg_end = end;
        float sc = block_scale(w, b) * (s->affine ? w->affine_step : 1.0f);
        __m512 a[8];
        for (int mi = 0; mi < mc; mi++) a[mi] = _mm512_set1_ps(x[mi * ldx + r] * sc);
        while (p < seg_end) {
            int n = seg_end - p < 16 ? (int)(seg_end - p) : 16;
            CHUNK_AT(p, n)
            __mmask16 m = (__mmask16)((1u << n) - 1);
            __m512 v = simd_values(s, src, o, load, k);
            for (int mi = 0; mi < mc; mi++) {
                float *yp = y + mi * ldy + (p - start);
                _mm512_mask_storeu_ps(yp, m, _mm512_fmadd_ps(v, a[mi], _mm512_maskz_loadu_ps(m, yp)));
            }
            p += n;
        }
    }
}
/* out[i] = value of flat position p + i, for p in [p, end): codebook entry x block scale, rounded to fp32 as
 * torch's decoder rounds it (a uniform codebook is looked up too, not computed, so the values are bit for bit
 * core/blockwise.dequantize's) */
static inline __attribute__((always_inline)) void decode_range(const kbit_weight *w, const simd_ctx *s0, int64_t p,
                                                               int64_t end, float *out, const int k) {
    simd_ctx sc_ = *s0;
    sc_.affine = 0;
    const simd_ctx *s = &sc_;
    while (p < end) {
        int64_t b = p / w->block, seg_end = (b + 1) * w->block < end ? (b + 1) * w->block : end;
        float scale = block_scale(w, b);
        __m512 sc = _mm512_set1_ps(scale);
        while (p < seg_end) {
            int n = seg_end - p < 16 ? (int)(seg_end - p) : 16;
            CHUNK_AT(p, n)
            __mmask16 m = (__mmask16)((1u << n) - 1);
            _mm512_mask_storeu_ps(out, m, _mm512_mul_ps(simd_values(s, src, o, load, k), sc));
            p += n;
            out += n;
        }
    }
}
#define CTX_DECL simd_ctx ctx; simd_init(&ctx, w); const simd_ctx *s = &ctx;
#elif defined(KBIT_AVX2)
#include "kbit_avx2.h"
#else
/* portable path: one code at a time (the compiler vectorises what it can) */
typedef int simd_ctx;
/* BODY runs once per stored weight p in [P0, P1) with its decoded value V (codebook entry times block scale);
 * the scale is looked up once per block segment, blocks may start mid-row */
#define FOR_EACH_WEIGHT(w, k, P0, P1, p, V, BODY)                                   \
    for (int64_t p = (P0), end_ = (P1); p < end_;) {                                \
        int64_t b_ = p / (w)->block, seg_ = (b_ + 1) * (w)->block;                  \
        if (seg_ > end_) seg_ = end_;                                               \
        float sc_ = block_scale((w), b_);                                           \
        for (; p < seg_; p++) {                                                     \
            float V = (w)->codebook[code_at((w)->codes, p, (k))] * sc_;             \
            BODY;                                                                   \
        }                                                                           \
    }
static inline void row_dot(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *x, int64_t ldx,
                           float *out, int64_t ldo, const int mc, const int k) {
    (void)s;
    float acc[8] = {0};
    int64_t start = r * w->cols;
    FOR_EACH_WEIGHT(w, k, start, start + w->cols, p, v,
                    for (int mi = 0; mi < mc; mi++) acc[mi] += v * x[mi * ldx + (p - start)]);
    for (int mi = 0; mi < mc; mi++) out[mi * ldo] = acc[mi];
}

static inline void row_axpy(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *x, int64_t ldx,
                            float *y, int64_t ldy, int64_t c0, int64_t c1, const int mc, const int k) {
    (void)s;
    int64_t start = r * w->cols;
    FOR_EACH_WEIGHT(w, k, start + c0, start + c1, p, v,
                    for (int mi = 0; mi < mc; mi++) y[mi * ldy + (p - start)] += v * x[mi * ldx + r]);
}
static inline void decode_range(const kbit_weight *w, const simd_ctx *s, int64_t p0, int64_t end, float *out,
                                const int k) {
    (void)s;
    FOR_EACH_WEIGHT(w, k, p0, end, p, v, out[p - p0] = v);
}
#define CTX_DECL simd_ctx ctx = 0; const simd_ctx *s = &ctx;
#endif
#ifdef KBIT_AVX2 /* measured faster than the exact walk here; the AVX-512 path's one-`vpermps` lookup is unmeasured
                  * against it on an AVX-512 machine, so those keep their exact walk */
#include "kbit_int16.h"
#endif
/* 1: batch-1 rows take the integer path where it exists (kbit_int16.h); 0: always the exact fp32 walk */
static _Atomic int int16_on = 1;
void kbit_set_int16(int on) { atomic_store(&int16_on, on ? 1 : 0); }
int kbit_has_int16(void) {
#ifdef KBIT_INT16
    return 1;
#else
    return 0;
#endif
}

/* One compiled copy per (k, rows of x at once): k and mc are literals inside each, so the shifts, lookups and
 * accumulators are resolved at compile time and the accumulators live in registers. */
typedef void (*row_fn)(const kbit_weight *, const simd_ctx *, int64_t, const float *, int64_t, float *, int64_t);
typedef void (*axpy_fn)(const kbit_weight *, const simd_ctx *, int64_t, const float *, int64_t, float *, int64_t,
                        int64_t, int64_t);
#define DEF1(K, MC) \
    static void dot_##K##_##MC(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *x, int64_t ldx, \
                               float *o, int64_t ldo) { row_dot(w, s, r, x, ldx, o, ldo, MC, K); } \
    static void axpy_##K##_##MC(const kbit_weight *w, const simd_ctx *s, int64_t r, const float *x, int64_t ldx, \
                                float *o, int64_t ldo, int64_t c0, int64_t c1) { \
        row_axpy(w, s, r, x, ldx, o, ldo, c0, c1, MC, K); }
#define DEFK(K) DEF1(K, 1) DEF1(K, 2) DEF1(K, 3) DEF1(K, 4) DEF1(K, 5) DEF1(K, 6) DEF1(K, 7) DEF1(K, 8)
DEFK(2) DEFK(3) DEFK(4) DEFK(5) DEFK(6) DEFK(7) DEFK(8)
#define ROWK(F, K) {0, F##_##K##_1, F##_##K##_2, F##_##K##_3, F##_##K##_4, F##_##K##_5, F##_##K##_6, F##_##K##_7, F##_##K##_8}
#define TABLE(F) {{0}, {0}, ROWK(F, 2), ROWK(F, 3), ROWK(F, 4), ROWK(F, 5), ROWK(F, 6), ROWK(F, 7), ROWK(F, 8)}
static const row_fn DOT[9][9] = TABLE(dot);
static const axpy_fn AXPY[9][9] = TABLE(axpy);
typedef void (*decode_fn)(const kbit_weight *, const simd_ctx *, int64_t, int64_t, float *);
#define DEFD(K) static void decode_##K(const kbit_weight *w, const simd_ctx *s, int64_t p, int64_t e, float *o) { \
        decode_range(w, s, p, e, o, K); }
DEFD(2) DEFD(3) DEFD(4) DEFD(5) DEFD(6) DEFD(7) DEFD(8)
static const decode_fn DECODE[9] = {0, 0, decode_2, decode_3, decode_4, decode_5, decode_6, decode_7, decode_8};

int kbit_abi_version(void) { return 4; }

int kbit_has_simd(void) { /* 0 portable, 1 AVX-512 VBMI, 2 AVX2 + FMA */
#ifdef KBIT_AVX512
    return 1;
#elif defined(KBIT_AVX2)
    return 2;
#else
    return 0;
#endif
}

/* ---- one job = one matmul, cut into chunks (output rows; transposed: output columns) -------------------- */
typedef struct {
    const kbit_weight *w;
    const simd_ctx *s;
    const float *x;
    float *y;
    int64_t m, per, nchunks; /* per: rows (columns) per chunk */
    int fast;                /* 1: one row of x through dot_fast_K (x laid out by fast_x); 2: through i16_dot */
#ifdef KBIT_INT16
    const int16_t *xq;       /* fast == 2: x as int16 in groups of 32 (i16_quantize_x), and the groups' scales */
    const float *xs;
    i16_book book;
#endif
    int64_t start, stop;     /* decode jobs (x == NULL): flat positions [start, stop) into y */
} job_t;

static void run_chunk(const job_t *j, int64_t idx) {
    const kbit_weight *w = j->w;
    int64_t rows = w->rows, cols = w->cols;
    if (!j->x) { /* decode: positions [start + idx * per, ...) */
        int64_t p = j->start + idx * j->per, e = p + j->per < j->stop ? p + j->per : j->stop;
        DECODE[w->bits](w, j->s, p, e, j->y + (p - j->start));
        return;
    }
    if (!w->transposed) { /* y[:, r] = x @ stored row r */
        int64_t r1 = (idx + 1) * j->per < rows ? (idx + 1) * j->per : rows;
#ifdef KBIT_INT16
        if (j->fast == 2) {
            i16_dot(w, &j->book, idx * j->per, r1, j->xq, j->xs, j->y);
            return;
        }
#endif
#ifdef KBIT_FAST_ROW
        if (j->fast) {
            for (int64_t r = idx * j->per; r < r1; r++)
                (w->bits == 4 ? dot_fast_4 : dot_fast_8)(w, j->s, r, j->x, j->y + r);
            return;
        }
#endif
        for (int64_t r = idx * j->per; r < r1; r++)
            for (int64_t m0 = 0; m0 < j->m; m0 += 8) {
                int mc = j->m - m0 < 8 ? (int)(j->m - m0) : 8;
                DOT[w->bits][mc](w, j->s, r, j->x + m0 * cols, cols, j->y + m0 * rows + r, rows);
            }
        return;
    }
    /* transposed: y[:, c0:c1] = sum over stored rows r of x[:, r] * stored row r, columns c0:c1 */
    int64_t c0 = idx * j->per, c1 = c0 + j->per < cols ? c0 + j->per : cols;
    for (int64_t mi = 0; mi < j->m; mi++) memset(j->y + mi * cols + c0, 0, (size_t)(c1 - c0) * sizeof(float));
    for (int64_t m0 = 0; m0 < j->m; m0 += 8) {
        int mc = j->m - m0 < 8 ? (int)(j->m - m0) : 8;
        for (int64_t r = 0; r < rows; r++)
            AXPY[w->bits][mc](w, j->s, r, j->x + m0 * rows, rows, j->y + m0 * cols, cols, c0, c1);
    }
}

/* ---- a small thread pool that never waits for a thread the OS has not scheduled yet ----------------------
 * Why not OpenMP: its fork/join waits for every thread to arrive. On a loaded machine (two cores shared with
 * other work) a sleeping worker is woken only at the next scheduler tick, and every layer then costs ~8 ms
 * (measured; torch's own 2-thread ops suffer the same). Here the caller takes chunks itself from an atomic
 * ticket; a worker that wakes late finds nothing left and sleeps again, so the caller waits only for chunks
 * a worker is actually computing. The ticket carries the job's generation: a late worker can never take a
 * chunk of a newer job with an older job's arguments (it reads the job under the mutex, and its claim fails
 * once the generation moved on). */
#define MAX_WORKERS 63
/* A worker preempted mid-chunk (a machine with more runnable threads than cores) keeps the caller spinning until
 * the OS runs it again: milliseconds per layer, measured as 2-thread decode falling to half of 1-thread decode
 * at load 6 on 2 cores. So a job whose wait for workers outlasted the caller's own share of the work switches
 * the next SOLO_JOBS jobs to the calling thread alone (same chunks, same results), then threads are tried again. */
#define SOLO_JOBS 2048
static _Atomic int solo_left;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER, call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static job_t pool_job;
static uint32_t pool_gen;                  /* under pool_mu */
static _Atomic uint64_t pool_ticket;       /* gen << 32 | next chunk */
static _Atomic int64_t pool_done;          /* chunks finished in the current job */
static int pool_workers;

static int claim(uint32_t gen, int64_t nchunks, int64_t *idx) {
    uint64_t t = atomic_load(&pool_ticket);
    for (;;) {
        if ((uint32_t)(t >> 32) != gen || (int64_t)(t & 0xffffffffu) >= nchunks) return 0;
        if (atomic_compare_exchange_weak(&pool_ticket, &t, t + 1)) {
            *idx = (int64_t)(t & 0xffffffffu);
            return 1;
        }
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        job_t j = pool_job;
        pthread_mutex_unlock(&pool_mu);
        int64_t idx;
        while (claim(seen, j.nchunks, &idx)) {
            run_chunk(&j, idx);
            atomic_fetch_add(&pool_done, 1);
        }
    }
    return NULL;
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void run_job(job_t *j, int nthreads) {
    if (nthreads > 1 && atomic_load(&solo_left) > 0) {
        atomic_fetch_sub(&solo_left, 1);
        nthreads = 1;
    }
    if (nthreads <= 1 || j->nchunks <= 1) {
        for (int64_t i = 0; i < j->nchunks; i++) run_chunk(j, i);
        return;
    }
    pthread_mutex_lock(&call_mu); /* one pooled job at a time (several Python threads may call in) */
    pthread_mutex_lock(&pool_mu);
    while (pool_workers < nthreads - 1 && pool_workers < MAX_WORKERS) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    uint32_t gen = ++pool_gen;
    if (gen == 0) gen = ++pool_gen; /* 0 is every worker's initial "seen" */
    pool_job = *j;
    atomic_store(&pool_done, 0);
    atomic_store(&pool_ticket, (uint64_t)gen << 32);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    int64_t idx, mine = 0;
    double t0 = now_seconds();
    while (claim(gen, j->nchunks, &idx)) {
        run_chunk(j, idx);
        mine++;
    }
    double t1 = now_seconds();
    while (atomic_load(&pool_done) + mine < j->nchunks) { /* only chunks a running worker has taken */
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    if (now_seconds() - t1 > (t1 - t0) + 20e-6) atomic_store(&solo_left, SOLO_JOBS);
    pthread_mutex_unlock(&call_mu);
}

/* x: [m, in] fp32 row-major; y: [m, out] fp32 row-major (fully written). Returns 0, or 1 for a bad weight. */
int kbit_matmul(const kbit_weight *w, const float *x, int64_t m, float *y, int nthreads) {
    if (w->bits < 2 || w->bits > 8 || w->block < 1 || m < 0) return 1;
    if (m == 0 || w->rows == 0 || w->cols == 0) {
        if (w->transposed && m) memset(y, 0, (size_t)(m * w->cols) * sizeof(float));
        return 0;
    }
    if (nthreads < 1) nthreads = 1;
    job_t j = {0};
    j.w = w, j.x = x, j.y = y, j.m = m;
    int64_t n = w->transposed ? w->cols : w->rows;
    int64_t want = nthreads > 1 ? 8 * (int64_t)nthreads : 1; /* several chunks each: a late thread costs little */
    j.per = (n + want - 1) / want;
    if (w->transposed) j.per = (j.per + 15) / 16 * 16; /* whole 16-lane vectors of columns */
    j.nchunks = (n + j.per - 1) / j.per;
#ifdef KBIT_INT16
    if (atomic_load(&int16_on) && i16_row_ok(w, m) && i16_codebook(w, &j.book)) {
        int16_t stack_q[4096], *xq = w->cols <= 4096 ? stack_q : malloc((size_t)w->cols * sizeof(int16_t));
        float stack_s[4096 / I16_GROUP], *xs = w->cols <= 4096 ? stack_s : malloc((size_t)w->cols / I16_GROUP * sizeof(float));
        int done = 0, ok = xq && xs;
        if (ok && i16_quantize_x(x, w->cols, w->bits == 4, xq, xs)) {
            j.xq = xq, j.xs = xs, j.fast = 2;
            run_job(&j, nthreads); /* returns when every chunk is done: the buffers outlive the workers' reads */
            done = 1;
        }
        if (xq && xq != stack_q) free(xq);
        if (xs && xs != stack_s) free(xs);
        if (!ok) return 1;
        if (done) return 0;
    }
#endif
    CTX_DECL /* after the integer path, which needs none of it (~0.1 us a call saved) */
    j.s = s;
#ifdef KBIT_FAST_ROW
    if (fast_row_ok(w, m)) {
        float stack[4096], *xd = w->cols <= 4096 ? stack : malloc((size_t)w->cols * sizeof(float));
        if (!xd) return 1;
        fast_x(w, x, xd);
        j.x = xd;
        j.fast = 1;
        run_job(&j, nthreads); /* returns when every chunk is done: xd outlives the workers' reads */
        if (xd != stack) free(xd);
        return 0;
    }
#endif
    run_job(&j, nthreads);
    return 0;
}

/* out[0 : stop - start] = the weight's values at flat positions [start, stop) (stored row-major), fp32, exactly
 * as core/blockwise.dequantize computes them: KbitLinear's slab path (prefill, finetuning) decodes with this
 * instead of torch's gathers. Returns 0, or 1 for a bad weight or range. */
int kbit_decode(const kbit_weight *w, int64_t start, int64_t stop, float *out, int nthreads) {
    if (w->bits < 2 || w->bits > 8 || w->block < 1 || start < 0 || stop < start || stop > w->rows * w->cols) return 1;
    if (stop == start) return 0;
    CTX_DECL
    if (nthreads < 1) nthreads = 1;
    job_t j = {0};
    j.w = w, j.s = s, j.y = out, j.start = start, j.stop = stop;
    int64_t n = stop - start, want = nthreads > 1 ? 4 * (int64_t)nthreads : 1;
    j.per = ((n + want - 1) / want + 255) / 256 * 256; /* whole 256-value pieces: every block size's chunks stay whole */
    if (j.per < 1 << 14) j.per = 1 << 14;             /* and not so small that waking a thread costs more */
    j.nchunks = (n + j.per - 1) / j.per;
    run_job(&j, nthreads);
    return 0;
}

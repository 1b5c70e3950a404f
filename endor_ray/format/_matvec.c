/* Small-batch products straight from the stored blocks: y = x @ W^T without decoding W to memory.
 *
 * W is a [rows, cols] tensor held as its encoding (endor_ray.format.quant's dense "int8"/"int4" with
 * group scales, or gguf_blocks' q8_0, q4_0, q4_1, q5_0, q5_1, and q4_k, q5_k, q6_k where each row is
 * whole 256-weight super-blocks, cols % 256 == 0: a k-type tensor whose blocks run over the flattened
 * elements has no product and is decoded); x is [x_rows, cols] float32 and y [x_rows, rows] float32.
 * Each weight is first computed exactly as the reference decode defines it, float32 then rounded to
 * nearest even to the tensor's dtype (fp16, bf16 or fp32), and that value is what multiplies x: the
 * product uses the decoded tensor's values bit for bit. For the k-types that value is gguf_blocks'
 * (d * sc) * q - (dmin * mn) (q4_k, q5_k) or (d * sc) * (q - 32) (q6_k), each product and difference
 * one float32 rounding (this file is built with -ffp-contract=off).
 *
 * The sum's order is part of the spec, so that the AVX-512, AVX2 and scalar loops agree bit for bit:
 * a row's columns fall into 32 lanes (column c into lane c % 32); each lane accumulates, in column
 * order, acc = fmaf(w, x, acc) from +0.0 (one fused multiply-add, one rounding); the 32 lanes are
 * then added as a tree: lane j += lane j + 16 (j < 16), then + 8, + 4, + 2, + 1. A ragged last
 * chunk leaves the lanes past `cols` untouched (masked, not multiplied by zero: x may hold inf).
 *
 * endor_matvec() computes output rows [first_row, last_row) of W for every row of x; callers split
 * W's rows over threads (ctypes releases the GIL). The weight row is read from memory once and
 * stays in L1 while it meets x in groups of 4 rows; a k-type row goes a super-block at a time, its
 * scales decoded once for the 8 chunks of 32 (each chunk one q4_k/q5_k sub-block, two q6_k ones, so
 * one scale per register). Every size is checked against the arrays given: nothing is read outside
 * them, whatever the arguments.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MATVEC_X86 1
#include <immintrin.h>
#endif
#include "_decode.h"

enum { MV_Q4_0 = 2, MV_Q4_1 = 3, MV_Q5_0 = 6, MV_Q5_1 = 7, MV_Q8_0 = 8, MV_Q4_K = 12, MV_Q5_K = 13, MV_Q6_K = 14,
       MV_INT8 = 100, MV_INT4 = 101 };
#define IS_K(type) ((type) == MV_Q4_K || (type) == MV_Q5_K || (type) == MV_Q6_K)
#define K_ELEMS 256 /* a k-type super-block's weights */
#define LANES 32
#define X_GROUP 4 /* rows of x per pass over a weight row (their accumulators fit the registers) */

typedef struct {
    int type, dtype;
    const uint8_t *values;
    const void *scales; /* int8/int4: rows * groups_per_row scales in `dtype` */
    int64_t groups_per_row, group_size, rows, cols, block_size;
    const float *x;
    const float *x_split; /* int4 (AVX-512): x with each full chunk's even columns first, then its odd */
    int64_t x_rows;
    float *y;
} matvec_args;

/* ---- one weight, exactly (the scalar reference every loop matches) --------------------------- */

static inline float scale_at(const matvec_args *a, int64_t index) {
    if (a->dtype == ENDOR_F32) return ((const float *)a->scales)[index];
    uint16_t bits = ((const uint16_t *)a->scales)[index];
    return a->dtype == ENDOR_F16 ? f16_to_f32(bits) : bits_f32((uint32_t)bits << 16);
}

static inline float f16_at(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return f16_to_f32(h); }

/* float32 -> the tensor's dtype -> float32 (round to nearest even; a NaN stays a NaN) */
static inline float round_to_dtype(float v, int dtype) {
    if (dtype == ENDOR_F32 || v != v) return v;
    if (dtype == ENDOR_F16) return f16_to_f32(f32_to_f16(v));
    return bits_f32((uint32_t)f32_to_bf16(v, 0x7FC0) << 16);
}

static inline int nibble32(const uint8_t *qs, int e) { return e < 16 ? qs[e] & 15 : qs[e - 16] >> 4; }

/* q4_k / q5_k: the 6-bit scale and minimum of sub-block s (0..7) from the 12 packed bytes S */
static inline void k_scale_min(const uint8_t *S, int s, float *sc, float *mn) {
    if (s < 4) {
        *sc = (float)(S[s] & 63), *mn = (float)(S[s + 4] & 63);
    } else {
        *sc = (float)((S[s + 4] & 15) | (S[s - 4] >> 6) << 4), *mn = (float)((S[s + 4] >> 4) | (S[s] >> 6) << 4);
    }
}

/* The k-type super-block at `block` and this row's element e (0..255) in it, as gguf_blocks' spec
 * says: q4_k/q5_k sub-block s = e / 32 is nibble s % 2 of qs[32 (s / 2) + l] (+ 16 for bit s of
 * q5_k's qh[l]); q6_k e = 128 h + 32 k + l takes nibble k / 2 of ql[64 h + 32 (k % 2) + l], bits
 * 2k, 2k + 1 of qh[32 h + l] above them, and the int8 scale of sub-block e / 16. */
static float k_weight(int type, const uint8_t *block, int e) {
    int l = e % 32;
    if (type == MV_Q6_K) {
        int h = e / 128, k = e % 128 / 32;
        int low = (block[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 15;
        int q = low | ((block[128 + 32 * h + l] >> (2 * k)) & 3) << 4;
        return (f16_at(block + 208) * (float)(int8_t)block[192 + e / 16]) * (float)(q - 32);
    }
    int s = e / 32;
    float sc, mn;
    k_scale_min(block + 4, s, &sc, &mn);
    int q = (block[(type == MV_Q4_K ? 16 : 48) + 32 * (s / 2) + l] >> (4 * (s % 2))) & 15;
    if (type == MV_Q5_K) q |= ((block[16 + l] >> s) & 1) << 4;
    return (f16_at(block) * sc) * (float)q - (f16_at(block + 2) * mn);
}

static float weight_at(const matvec_args *a, int64_t n, int64_t c) {
    float v;
    if (a->type == MV_INT8 || a->type == MV_INT4) {
        int64_t flat = n * a->cols + c;
        int code;
        if (a->type == MV_INT8) code = (int8_t)a->values[flat];
        else code = (((a->values[flat >> 1] >> (4 * (flat & 1))) & 15) ^ 8) - 8;
        v = (float)code * scale_at(a, n * a->groups_per_row + c / a->group_size);
    } else if (IS_K(a->type)) {
        v = k_weight(a->type, a->values + (n * (a->cols / K_ELEMS) + c / K_ELEMS) * a->block_size, (int)(c % K_ELEMS));
    } else {
        const uint8_t *block = a->values + (n * (a->cols / 32) + c / 32) * a->block_size;
        int e = (int)(c % 32);
        float d = f16_at(block);
        uint32_t qh;
        switch (a->type) {
        case MV_Q8_0: v = (float)(int8_t)block[2 + e] * d; break;
        case MV_Q4_0: v = d * ((float)nibble32(block + 2, e) - 8.0f); break;
        case MV_Q4_1: v = (d * (float)nibble32(block + 4, e)) + f16_at(block + 2); break;
        case MV_Q5_0:
            memcpy(&qh, block + 2, 4);
            v = d * ((float)(nibble32(block + 6, e) | ((qh >> e) & 1) << 4) - 16.0f);
            break;
        default: /* MV_Q5_1 */
            memcpy(&qh, block + 4, 4);
            v = (d * (float)(nibble32(block + 8, e) | ((qh >> e) & 1) << 4)) + f16_at(block + 2);
        }
    }
    return round_to_dtype(v, a->dtype);
}

/* The weights of columns [c0, c0 + count) of row n into w[0..count) (count <= LANES). */
static void chunk_scalar(const matvec_args *a, int64_t n, int64_t c0, int count, float *w) {
    for (int j = 0; j < count; j++) w[j] = weight_at(a, n, c0 + j);
}

static float reduce_lanes(float *acc) {
    for (int step = LANES / 2; step >= 1; step /= 2)
        for (int j = 0; j < step; j++) acc[j] = acc[j] + acc[j + step];
    return acc[0];
}

static void rows_scalar(const matvec_args *a, int64_t first, int64_t last) {
    float w[LANES], acc[X_GROUP][LANES];
    for (int64_t n = first; n < last; n++) {
        for (int64_t g = 0; g < a->x_rows; g += X_GROUP) {
            int group = a->x_rows - g < X_GROUP ? (int)(a->x_rows - g) : X_GROUP;
            memset(acc, 0, sizeof acc);
            for (int64_t c0 = 0; c0 < a->cols; c0 += LANES) {
                int count = a->cols - c0 < LANES ? (int)(a->cols - c0) : LANES;
                chunk_scalar(a, n, c0, count, w);
                for (int r = 0; r < group; r++) {
                    const float *x = a->x + (g + r) * a->cols + c0;
                    for (int j = 0; j < count; j++) acc[r][j] = fmaf(w[j], x[j], acc[r][j]);
                }
            }
            for (int r = 0; r < group; r++) a->y[(g + r) * a->rows + n] = reduce_lanes(acc[r]);
        }
    }
}

/* Whether row n's full chunks have a vector decode: group scales constant over each 16 lanes (int4:
 * over the chunk), and (int4) the row starting on a whole byte. */
static int row_is_fast(const matvec_args *a, int64_t n) {
    if (a->type == MV_INT8) return a->group_size % 16 == 0;
    if (a->type == MV_INT4) return a->group_size % 32 == 0 && (n * a->cols) % 2 == 0;
    return 1;
}

/* k-types: row n's super-block starting at column c0 (a multiple of 256) */
static inline const uint8_t *k_block(const matvec_args *a, int64_t n, int64_t c0) {
    return a->values + (n * (a->cols / K_ELEMS) + c0 / K_ELEMS) * a->block_size;
}

/* A k-type super-block's scales, once for its 256 weights: q4_k/q5_k ds[s] = d * sc[s], dm[s] =
 * dmin * mn[s] (s < 8); q6_k ds[s] = d * float(sc[s]) (s < 16). The loops take each sub-block's
 * weights from these, as the reference computes them. Returns whether the f16 scales are finite, so
 * that no weight can be a NaN (|d * sc * q| < 2^16 * 2^6 * 2^6) and the rounding skips the NaN blend. */
static inline int k_header(int type, const uint8_t *b, float *ds, float *dm) {
    if (type == MV_Q6_K) {
        float d = f16_at(b + 208);
        for (int s = 0; s < 16; s++) ds[s] = d * (float)(int8_t)b[192 + s];
        return (f32_bits(d) & 0x7F800000u) != 0x7F800000u;
    }
    float d = f16_at(b), dmin = f16_at(b + 2), sc, mn;
    for (int s = 0; s < 8; s++) {
        k_scale_min(b + 4, s, &sc, &mn);
        ds[s] = d * sc, dm[s] = dmin * mn;
    }
    return (f32_bits(d) & 0x7F800000u) != 0x7F800000u && (f32_bits(dmin) & 0x7F800000u) != 0x7F800000u;
}

#ifdef MATVEC_X86
#define AVX2 "avx2,fma,f16c"
#define AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"

/* q6_k chunk j (= 4 h + k) of super-block b: its 32 codes - 32 as bytes, from nibble k / 2 of
 * ql[64 h + 32 (k % 2) ..] and bits 2k of qh[32 h ..] (top <= 3: no bit leaves its byte). AVX2, so
 * that the AVX-512 and AVX2 loops share it. */
__attribute__((target(AVX2), always_inline)) static inline __m256i q6_k_codes(const uint8_t *b, int j) {
    int h = j / 4, k = j % 4;
    const uint8_t *ql = b + 64 * h + 32 * (k % 2), *qh = b + 128 + 32 * h;
    __m128i low_shift = _mm_cvtsi32_si128(4 * (k / 2)), high_shift = _mm_cvtsi32_si128(2 * k);
    __m256i low = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)ql), low_shift),
                                   _mm256_set1_epi8(15));
    __m256i top = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qh), high_shift),
                                   _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(top, 4)), _mm256_set1_epi8(32));
}

/* ---- AVX-512: a chunk of 32 weights is two registers ------------------------------------------ */

/* to the dtype and back; `finite`: the operands were finite, so no NaN can arise (int8/q8_0 products
 * of a finite scale), and the NaN-keeping blend is skipped */
__attribute__((target(AVX512), always_inline)) static inline __m512 round512(__m512 v, int dtype, int finite) {
    if (dtype == ENDOR_F32) return v;
    if (dtype == ENDOR_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    rounded = _mm512_and_si512(rounded, _mm512_set1_epi32((int)0xFFFF0000u));
    if (finite) return _mm512_castsi512_ps(rounded);
    return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

static inline int is_finite(float f) { return (f32_bits(f) & 0x7F800000u) != 0x7F800000u; }

__attribute__((target(AVX512), always_inline)) static inline __m512 int8x16(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The 16 weights a 4-bit code n decodes to (table[n]) for scale d and, q4_1, minimum m: computed
 * once per group or block with the reference's own operations, then looked up (vpermps) */
__attribute__((target(AVX512), always_inline)) static inline __m512 table512(int type, float d, float m, int dtype) {
    __m512 n = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 v;
    if (type == MV_INT4) /* code (n ^ 8) - 8 */
        v = _mm512_mul_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1), _mm512_set1_ps(d));
    else if (type == MV_Q4_0)
        v = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_sub_ps(n, _mm512_set1_ps(8.0f)));
    else /* MV_Q4_1 */
        v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d), n), _mm512_set1_ps(m));
    return round512(v, dtype, 0);
}

__attribute__((target(AVX512), always_inline)) static inline __m512i bytes16(const uint8_t *p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}

/* k-types: the 32 weights of chunk j (columns 32 j .. 32 j + 31) of super-block b, scales from k_header.
 * q4_k: a 16-entry table per sub-block (vpermps reads the low 4 bits: the other nibble is ignored);
 * q5_k: 32 entries, the fifth bit picking the second table (vpermt2ps); q6_k (two sub-blocks of 16,
 * one a register) computed lane by lane. */
__attribute__((target(AVX512), always_inline)) static inline void chunk512_k(int type, int dtype, int finite,
                                                                            const uint8_t *b, int j, const float *ds,
                                                                            const float *dm, __m512 *w) {
    const __m512i fifteen = _mm512_set1_epi32(15);
    if (type == MV_Q6_K) { /* chunk j = 4 h + k: nibble k / 2 of ql[64 h + 32 (k % 2) ..], bits 2k of qh[32 h ..] */
        __m256i q = q6_k_codes(b, j); /* widened 16 at a time */
        __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        w[0] = round512(_mm512_mul_ps(_mm512_set1_ps(ds[2 * j]), f0), dtype, finite);
        w[1] = round512(_mm512_mul_ps(_mm512_set1_ps(ds[2 * j + 1]), f1), dtype, finite);
        return;
    }
    const uint8_t *qs = b + (type == MV_Q4_K ? 16 : 48) + 32 * (j / 2);  /* sub-block j: nibble j % 2 */
    __m128i shift = _mm_cvtsi32_si128(4 * (j % 2));
    __m512i q0 = _mm512_srl_epi32(bytes16(qs), shift), q1 = _mm512_srl_epi32(bytes16(qs + 16), shift);
    __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 scale = _mm512_set1_ps(ds[j]), minimum = _mm512_set1_ps(dm[j]);
    __m512 low = round512(_mm512_sub_ps(_mm512_mul_ps(scale, codes), minimum), dtype, finite);
    if (type == MV_Q4_K) {
        w[0] = _mm512_permutexvar_ps(q0, low), w[1] = _mm512_permutexvar_ps(q1, low);
        return;
    }
    __m512 high = round512(_mm512_sub_ps(_mm512_mul_ps(scale, _mm512_add_ps(codes, _mm512_set1_ps(16.0f))), minimum),
                           dtype, finite);
    const __m128i bit = _mm_set1_epi8((char)(1 << j));  /* the fifth bits: bit j of qh[l], as a lane mask */
    const __m512i sixteen = _mm512_set1_epi32(16);
    q0 = _mm512_and_si512(q0, fifteen), q1 = _mm512_and_si512(q1, fifteen);
    q0 = _mm512_mask_or_epi32(q0, _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)(b + 16)), bit), q0, sixteen);
    q1 = _mm512_mask_or_epi32(q1, _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)(b + 32)), bit), q1, sixteen);
    w[0] = _mm512_permutex2var_ps(low, q0, high), w[1] = _mm512_permutex2var_ps(low, q1, high);
}

/* Row n, columns [c0, c0 + 32): the 32 decoded weights in w[0], w[1] (type a constant). int4 gives
 * them as the chunk's even columns, then its odd ones (its nibble order; x is permuted to match). */
__attribute__((target(AVX512), always_inline)) static inline void chunk512(const matvec_args *a, int type,
                                                                          int64_t n, int64_t c0, __m512 *w) {
    if (type == MV_INT8) {
        int64_t slot = n * a->groups_per_row;
        float s0 = scale_at(a, slot + c0 / a->group_size), s1 = scale_at(a, slot + (c0 + 16) / a->group_size);
        const uint8_t *codes = a->values + n * a->cols + c0;
        w[0] = round512(_mm512_mul_ps(int8x16(codes), _mm512_set1_ps(s0)), a->dtype, is_finite(s0));
        w[1] = round512(_mm512_mul_ps(int8x16(codes + 16), _mm512_set1_ps(s1)), a->dtype, is_finite(s1));
    } else if (type == MV_INT4) { /* byte k: column 2k (low nibble), 2k + 1; one group (size % 32 == 0) */
        __m512 table = table512(type, scale_at(a, n * a->groups_per_row + c0 / a->group_size), 0.0f, a->dtype);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->values + (n * a->cols + c0) / 2)));
        w[0] = _mm512_permutexvar_ps(bytes, table);  /* vpermps reads the low 4 bits of each index */
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    } else {
        const uint8_t *block = a->values + (n * (a->cols / 32) + c0 / 32) * a->block_size;
        float d = f16_at(block);
        if (type == MV_Q8_0) {
            w[0] = round512(_mm512_mul_ps(int8x16(block + 2), _mm512_set1_ps(d)), a->dtype, is_finite(d));
            w[1] = round512(_mm512_mul_ps(int8x16(block + 18), _mm512_set1_ps(d)), a->dtype, is_finite(d));
        } else if (type == MV_Q4_0 || type == MV_Q4_1) { /* byte k: column k (low nibble), k + 16 */
            __m512 table = table512(type, d, type == MV_Q4_1 ? f16_at(block + 2) : 0.0f, a->dtype);
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (type == MV_Q4_0 ? 2 : 4))));
            w[0] = _mm512_permutexvar_ps(bytes, table);
            w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        } else {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (type == MV_Q5_0 ? 6 : 8))));
            __m512i q0 = _mm512_and_si512(bytes, _mm512_set1_epi32(15)), q1 = _mm512_srli_epi32(bytes, 4);
            uint32_t qh;
            memcpy(&qh, block + (type == MV_Q5_0 ? 2 : 4), 4);
            q0 = _mm512_mask_or_epi32(q0, (__mmask16)qh, q0, _mm512_set1_epi32(16));
            q1 = _mm512_mask_or_epi32(q1, (__mmask16)(qh >> 16), q1, _mm512_set1_epi32(16));
            __m512 f0 = _mm512_cvtepi32_ps(q0), f1 = _mm512_cvtepi32_ps(q1), dd = _mm512_set1_ps(d);
            if (type == MV_Q5_0) {
                __m512 offset = _mm512_set1_ps(16.0f);
                w[0] = _mm512_mul_ps(dd, _mm512_sub_ps(f0, offset)), w[1] = _mm512_mul_ps(dd, _mm512_sub_ps(f1, offset));
            } else {
                __m512 m = _mm512_set1_ps(f16_at(block + 2));
                w[0] = _mm512_add_ps(_mm512_mul_ps(dd, f0), m), w[1] = _mm512_add_ps(_mm512_mul_ps(dd, f1), m);
            }
            w[0] = round512(w[0], a->dtype, 0), w[1] = round512(w[1], a->dtype, 0);
        }
    }
}

/* Output row n for x rows [g, g + GROUP) (GROUP and type constants: the loops unroll). For int4 the
 * accumulators hold the even lanes, then the odd ones, until they are stored back in lane order. */
__attribute__((target(AVX512), always_inline)) static inline void row512(const matvec_args *a, int type, int64_t n,
                                                                        int64_t g, const int GROUP) {
    const int split = type == MV_INT4;  /* even/odd lane order (x from a->x_split) */
    __m512 acc[X_GROUP][2], w[2];
    for (int r = 0; r < GROUP; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t full = a->cols / LANES * LANES;
    int fast = row_is_fast(a, n);
    float staged[LANES];
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
#define FMA512(C0)                                                                      \
    for (int r = 0; r < GROUP; r++) {                                                   \
        const float *x = (split ? a->x_split : a->x) + (g + r) * a->cols + (C0);        \
        acc[r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(x), acc[r][0]);               \
        acc[r][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(x + 16), acc[r][1]);          \
    }
    if (IS_K(type)) { /* a super-block at a time (cols % 256 == 0), its scales decoded once */
        for (int64_t c0 = 0; c0 < full; c0 += K_ELEMS) {
            const uint8_t *b = k_block(a, n, c0);
            float ds[16], dm[8];
            int finite = k_header(type, b, ds, dm);
#pragma GCC unroll 8
            for (int j = 0; j < K_ELEMS / LANES; j++) {
                chunk512_k(type, a->dtype, finite, b, j, ds, dm, w);
                FMA512(c0 + LANES * j)
            }
        }
    }
    for (int64_t c0 = 0; c0 < full && !IS_K(type); c0 += LANES) {
        if (fast) {
            chunk512(a, type, n, c0, w);
        } else {
            chunk_scalar(a, n, c0, LANES, staged);
            w[0] = _mm512_loadu_ps(staged), w[1] = _mm512_loadu_ps(staged + 16);
            if (split) {
                __m512 low = w[0];
                w[0] = _mm512_permutex2var_ps(low, evens, w[1]), w[1] = _mm512_permutex2var_ps(low, odds, w[1]);
            }
        }
        FMA512(c0)
    }
#undef FMA512
    const __m512i low_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high_half = _mm512_add_epi32(low_half, _mm512_set1_epi32(8));
    for (int r = 0; r < GROUP; r++) {
        float lanes[LANES];
        __m512 first = acc[r][0], second = acc[r][1];
        if (split) { /* even lanes k, odd lanes k -> lanes 2k, 2k + 1 */
            first = _mm512_permutex2var_ps(acc[r][0], low_half, acc[r][1]);
            second = _mm512_permutex2var_ps(acc[r][0], high_half, acc[r][1]);
        }
        _mm512_storeu_ps(lanes, first), _mm512_storeu_ps(lanes + 16, second);
        if (full < a->cols) { /* the ragged last chunk, lane by lane as the scalar loop does */
            int count = (int)(a->cols - full);
            chunk_scalar(a, n, full, count, staged);
            const float *x = a->x + (g + r) * a->cols + full;
            for (int j = 0; j < count; j++) lanes[j] = fmaf(staged[j], x[j], lanes[j]);
        }
        a->y[(g + r) * a->rows + n] = reduce_lanes(lanes);
    }
}

#define ROWS_FOR_TYPE(TARGET, ROW, NAME, TYPE)                                                             \
    __attribute__((target(TARGET))) static void NAME(const matvec_args *a, int64_t first, int64_t last) { \
        for (int64_t n = first; n < last; n++) {                                                           \
            int64_t g = 0;                                                                                 \
            for (; g + X_GROUP <= a->x_rows; g += X_GROUP) ROW(a, TYPE, n, g, X_GROUP);                    \
            switch (a->x_rows - g) {                                                                       \
            case 3: ROW(a, TYPE, n, g, 3); break;                                                          \
            case 2: ROW(a, TYPE, n, g, 2); break;                                                          \
            case 1: ROW(a, TYPE, n, g, 1); break;                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
ROWS_FOR_TYPE(AVX512, row512, rows512_int8, MV_INT8)
ROWS_FOR_TYPE(AVX512, row512, rows512_int4, MV_INT4)
ROWS_FOR_TYPE(AVX512, row512, rows512_q8_0, MV_Q8_0)
ROWS_FOR_TYPE(AVX512, row512, rows512_q4_0, MV_Q4_0)
ROWS_FOR_TYPE(AVX512, row512, rows512_q4_1, MV_Q4_1)
ROWS_FOR_TYPE(AVX512, row512, rows512_q5_0, MV_Q5_0)
ROWS_FOR_TYPE(AVX512, row512, rows512_q5_1, MV_Q5_1)
ROWS_FOR_TYPE(AVX512, row512, rows512_q4_k, MV_Q4_K)
ROWS_FOR_TYPE(AVX512, row512, rows512_q5_k, MV_Q5_K)
ROWS_FOR_TYPE(AVX512, row512, rows512_q6_k, MV_Q6_K)

/* ---- AVX2: a chunk of 32 weights is four registers -------------------------------------------- */

/* to the dtype and back, as round512 (`finite`: no NaN can arise, the NaN-keeping blend is skipped) */
__attribute__((target(AVX2), always_inline)) static inline __m256 round256(__m256 v, int dtype, int finite) {
    if (dtype == ENDOR_F32) return v;
    if (dtype == ENDOR_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
    rounded = _mm256_and_si256(rounded, _mm256_set1_epi32((int)0xFFFF0000u));
    if (finite) return _mm256_castsi256_ps(rounded);
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* f16_at with the F16C instruction: the same value (the conversion is exact; a NaN is kept, quieted alike) */
__attribute__((target(AVX2), always_inline)) static inline float f16c_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

__attribute__((target(AVX2), always_inline)) static inline __m256 int8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 8 bytes -> 16 int4 codes (byte k: elements 2k, 2k + 1) as two registers of 8 floats */
__attribute__((target(AVX2), always_inline)) static inline void int4x16(const uint8_t *p, __m256 *w) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i words = _mm256_or_si256(_mm256_and_si256(bytes, _mm256_set1_epi32(15)),
                                    _mm256_slli_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0xF0)), 12));
    __m256i codes = _mm256_sub_epi16(_mm256_xor_si256(words, _mm256_set1_epi16(8)), _mm256_set1_epi16(8));
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(codes)));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(codes, 1)));
}

/* the 8 lanes of bits [8k, 8k + 8) of qh, as 16 where set */
__attribute__((target(AVX2), always_inline)) static inline __m256i high_bits(uint32_t qh, int k) {
    __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(qh >> (8 * k))), lanes), lanes);
    return _mm256_and_si256(set, _mm256_set1_epi32(16));
}

__attribute__((target(AVX2), always_inline)) static inline __m256i bytes8(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* k-types: chunk j of super-block b as chunk512_k, unrounded: w[k] holds its columns 8k .. 8k + 7 */
__attribute__((target(AVX2), always_inline)) static inline void chunk256_k(int type, const uint8_t *b, int j,
                                                                          const float *ds, const float *dm, __m256 *w) {
    if (type == MV_Q6_K) {
        __m256i q = q6_k_codes(b, j); /* widened 8 at a time */
        for (int half = 0; half < 2; half++) {
            __m128i codes = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
            __m256 scale = _mm256_set1_ps(ds[2 * j + half]);
            w[2 * half] = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)));
            w[2 * half + 1] = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8))));
        }
        return;
    }
    const uint8_t *qs = b + (type == MV_Q4_K ? 16 : 48) + 32 * (j / 2);
    __m128i shift = _mm_cvtsi32_si128(4 * (j % 2)), bit_shift = _mm_cvtsi32_si128(j);
    __m256 scale = _mm256_set1_ps(ds[j]), minimum = _mm256_set1_ps(dm[j]);
    /* the 32 codes as bytes (the 16-bit shifts' carried bits masked off), then widened 8 at a time */
    __m256i q = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)qs), shift);
    q = _mm256_and_si256(q, _mm256_set1_epi8(15));
    if (type == MV_Q5_K) {
        __m256i fifth = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(b + 16)), bit_shift);
        q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(fifth, _mm256_set1_epi8(1)), 4));
    }
    for (int half = 0; half < 2; half++) {
        __m128i codes = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
        w[2 * half] = _mm256_sub_ps(_mm256_mul_ps(scale, f0), minimum);
        w[2 * half + 1] = _mm256_sub_ps(_mm256_mul_ps(scale, f1), minimum);
    }
}

__attribute__((target(AVX2), always_inline)) static inline void chunk256(const matvec_args *a, int type,
                                                                        int64_t n, int64_t c0, __m256 *w) {
    int finite; /* the scales (and minimum) finite: no weight can be a NaN */
    if (type == MV_INT8 || type == MV_INT4) {
        int64_t slot = n * a->groups_per_row;
        float scale0 = scale_at(a, slot + c0 / a->group_size), scale1 = scale_at(a, slot + (c0 + 16) / a->group_size);
        __m256 s0 = _mm256_set1_ps(scale0), s1 = _mm256_set1_ps(scale1);
        finite = is_finite(scale0) && is_finite(scale1);
        if (type == MV_INT8) {
            const uint8_t *codes = a->values + n * a->cols + c0;
            for (int k = 0; k < 4; k++) w[k] = int8x8(codes + 8 * k);
        } else {
            const uint8_t *bytes = a->values + (n * a->cols + c0) / 2;
            int4x16(bytes, w), int4x16(bytes + 8, w + 2);
        }
        w[0] = _mm256_mul_ps(w[0], s0), w[1] = _mm256_mul_ps(w[1], s0);
        w[2] = _mm256_mul_ps(w[2], s1), w[3] = _mm256_mul_ps(w[3], s1);
    } else {
        const uint8_t *block = a->values + (n * (a->cols / 32) + c0 / 32) * a->block_size;
        float scale = f16c_at(block), minimum = type == MV_Q4_1 || type == MV_Q5_1 ? f16c_at(block + 2) : 0.0f;
        __m256 d = _mm256_set1_ps(scale);
        finite = is_finite(scale) && is_finite(minimum);
        if (type == MV_Q8_0) {
            for (int k = 0; k < 4; k++) w[k] = _mm256_mul_ps(int8x8(block + 2 + 8 * k), d);
        } else if (type == MV_Q4_0) { /* the 32 codes - 8 as bytes (16 low nibbles, then 16 high), widened 8 at a time */
            __m128i qs = _mm_loadu_si128((const __m128i *)(block + 2)), low4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
            __m128i lo = _mm_sub_epi8(_mm_and_si128(qs, low4), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(qs, 4), low4), eight);
            w[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
            w[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
            w[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
            w[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
        } else {
            int qs_at = type == MV_Q4_1 ? 4 : type == MV_Q5_0 ? 6 : 8;
            uint32_t qh = 0;
            if (type == MV_Q5_0 || type == MV_Q5_1) memcpy(&qh, block + (type == MV_Q5_0 ? 2 : 4), 4);
            __m256 m = _mm256_set1_ps(minimum);
            __m256 offset = _mm256_set1_ps(16.0f); /* q5_0 */
            for (int k = 0; k < 4; k++) { /* elements 8k..8k+7: nibbles of bytes 8 (k % 2) .., low for k < 2 */
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(block + qs_at + 8 * (k % 2))));
                __m256i q = k < 2 ? _mm256_and_si256(bytes, _mm256_set1_epi32(15)) : _mm256_srli_epi32(bytes, 4);
                if (type == MV_Q5_0 || type == MV_Q5_1) q = _mm256_or_si256(q, high_bits(qh, k));
                __m256 f = _mm256_cvtepi32_ps(q);
                if (type == MV_Q5_0) w[k] = _mm256_mul_ps(d, _mm256_sub_ps(f, offset));
                else w[k] = _mm256_add_ps(_mm256_mul_ps(d, f), m);
            }
        }
    }
    for (int k = 0; k < 4; k++) w[k] = round256(w[k], a->dtype, finite);
}

__attribute__((target(AVX2), always_inline)) static inline void row256(const matvec_args *a, int type, int64_t n,
                                                                      int64_t g, const int GROUP) {
    __m256 acc[X_GROUP][4], w[4];
    for (int r = 0; r < GROUP; r++)
        for (int k = 0; k < 4; k++) acc[r][k] = _mm256_setzero_ps();
    int64_t full = a->cols / LANES * LANES;
    int fast = row_is_fast(a, n);
    float staged[LANES];
#define FMA256(C0)                                                                                      \
    for (int r = 0; r < GROUP; r++) {                                                                   \
        const float *x = a->x + (g + r) * a->cols + (C0);                                               \
        for (int k = 0; k < 4; k++) acc[r][k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), acc[r][k]); \
    }
    if (IS_K(type)) { /* a super-block at a time (cols % 256 == 0), its scales decoded once */
        for (int64_t c0 = 0; c0 < full; c0 += K_ELEMS) {
            const uint8_t *b = k_block(a, n, c0);
            float ds[16], dm[8];
            int finite = k_header(type, b, ds, dm);
#pragma GCC unroll 8
            for (int j = 0; j < K_ELEMS / LANES; j++) {
                chunk256_k(type, b, j, ds, dm, w);
                for (int k = 0; k < 4; k++) w[k] = round256(w[k], a->dtype, finite);
                FMA256(c0 + LANES * j)
            }
        }
    }
    for (int64_t c0 = 0; c0 < full && !IS_K(type); c0 += LANES) {
        if (fast) {
            chunk256(a, type, n, c0, w);
        } else {
            chunk_scalar(a, n, c0, LANES, staged);
            for (int k = 0; k < 4; k++) w[k] = _mm256_loadu_ps(staged + 8 * k);
        }
        FMA256(c0)
    }
#undef FMA256
    float lanes[X_GROUP][LANES];
    for (int r = 0; r < GROUP; r++)
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(lanes[r] + 8 * k, acc[r][k]);
    if (full < a->cols) { /* the ragged last chunk, lane by lane as the scalar loop does */
        int count = (int)(a->cols - full);
        chunk_scalar(a, n, full, count, staged);
        for (int r = 0; r < GROUP; r++) {
            const float *x = a->x + (g + r) * a->cols + full;
            for (int j = 0; j < count; j++) lanes[r][j] = fmaf(staged[j], x[j], lanes[r][j]);
        }
    }
    for (int r = 0; r < GROUP; r++) a->y[(g + r) * a->rows + n] = reduce_lanes(lanes[r]);
}

ROWS_FOR_TYPE(AVX2, row256, rows256_int8, MV_INT8)
ROWS_FOR_TYPE(AVX2, row256, rows256_int4, MV_INT4)
ROWS_FOR_TYPE(AVX2, row256, rows256_q8_0, MV_Q8_0)
ROWS_FOR_TYPE(AVX2, row256, rows256_q4_0, MV_Q4_0)
ROWS_FOR_TYPE(AVX2, row256, rows256_q4_1, MV_Q4_1)
ROWS_FOR_TYPE(AVX2, row256, rows256_q5_0, MV_Q5_0)
ROWS_FOR_TYPE(AVX2, row256, rows256_q5_1, MV_Q5_1)
ROWS_FOR_TYPE(AVX2, row256, rows256_q4_k, MV_Q4_K)
ROWS_FOR_TYPE(AVX2, row256, rows256_q5_k, MV_Q5_K)
ROWS_FOR_TYPE(AVX2, row256, rows256_q6_k, MV_Q6_K)
#endif

/* ---- entry points --------------------------------------------------------------------------------- */

typedef void (*rows_fn)(const matvec_args *, int64_t, int64_t);
static int matvec_best = ENDOR_ISA_SCALAR;

/* The best implementation this CPU runs for the products (any dtype). */
int endor_matvec_best_isa(void) { return matvec_best; }

static rows_fn pick(int type, int isa) {
#ifdef MATVEC_X86
    static const int types[10] = {MV_INT8, MV_INT4, MV_Q8_0, MV_Q4_0, MV_Q4_1, MV_Q5_0, MV_Q5_1,
                                  MV_Q4_K, MV_Q5_K, MV_Q6_K};
    static const rows_fn avx512[10] = {rows512_int8, rows512_int4, rows512_q8_0, rows512_q4_0, rows512_q4_1,
                                       rows512_q5_0, rows512_q5_1, rows512_q4_k, rows512_q5_k, rows512_q6_k};
    static const rows_fn avx2[10] = {rows256_int8, rows256_int4, rows256_q8_0, rows256_q4_0, rows256_q4_1,
                                     rows256_q5_0, rows256_q5_1, rows256_q4_k, rows256_q5_k, rows256_q6_k};
    for (int t = 0; t < 10; t++)
        if (types[t] == type) return isa == ENDOR_ISA_AVX512 ? avx512[t] : isa == ENDOR_ISA_AVX2 ? avx2[t] : rows_scalar;
#endif
    (void)type, (void)isa;
    return rows_scalar;
}

/* y[r, n] = sum_c x[r, c] * W[n, c] for n in [first_row, last_row) and every r < x_rows (the sum in
 * the order of the file comment). W: `type` (a ggml type id, or 100 int8 / 101 int4; the k-types with
 * cols % 256 == 0, the 32-weight types with cols % 32 == 0), `values_nbytes`
 * bytes at `values`; int8/int4 also `num_scales` scales of `dtype` at `scales`, `group_size` columns
 * each, ceil(cols / group_size) per row. Returns 0, ENDOR_ERR_ARGS (sizes that do not describe the
 * arrays: nothing is read), or ENDOR_ERR_SHORT (too few bytes). */
int endor_matvec(int type, const uint8_t *values, int64_t values_nbytes, const void *scales, int64_t num_scales,
                 int64_t group_size, int64_t rows, int64_t cols, int dtype, const float *x, int64_t x_rows, float *y,
                 int isa, int64_t first_row, int64_t last_row) {
    matvec_args a = {type, dtype, values, scales, 0, group_size, rows, cols, 0, x, x, x_rows, y};
    if (rows < 0 || cols < 1 || x_rows < 0 || dtype < ENDOR_F16 || dtype > ENDOR_F32 || first_row < 0 ||
        last_row < first_row || last_row > rows || values_nbytes < 0 || cols > (INT64_MAX / 2) / (rows ? rows : 1))
        return ENDOR_ERR_ARGS;
    if (type == MV_INT8 || type == MV_INT4) {
        if (group_size < 1) return ENDOR_ERR_ARGS;
        a.groups_per_row = (cols + group_size - 1) / group_size;
        if (num_scales != rows * a.groups_per_row) return ENDOR_ERR_ARGS;
        if (values_nbytes < (type == MV_INT8 ? rows * cols : (rows * cols + 1) / 2)) return ENDOR_ERR_SHORT;
    } else {
        int64_t size = type == MV_Q8_0 ? 34 : type == MV_Q4_0 ? 18 : type == MV_Q4_1 ? 20 : type == MV_Q5_0 ? 22
                     : type == MV_Q5_1 ? 24 : type == MV_Q4_K ? 144 : type == MV_Q5_K ? 176 : type == MV_Q6_K ? 210 : 0;
        int64_t block_elems = IS_K(type) ? K_ELEMS : 32;  /* a row is whole blocks: no block spans two */
        if (!size || cols % block_elems) return ENDOR_ERR_ARGS;
        a.block_size = size;
        if (values_nbytes / size / (cols / block_elems) < rows) return ENDOR_ERR_SHORT;
    }
    isa = isa == ENDOR_ISA_AUTO || isa > matvec_best ? matvec_best : isa;
    if (first_row == last_row || x_rows == 0) return 0;
    float *split = NULL;
    if (type == MV_INT4 && isa == ENDOR_ISA_AVX512) { /* x's columns in the order int4's nibbles give */
        split = malloc((size_t)(x_rows * cols) * sizeof(float));
        if (!split) return ENDOR_ERR_MEMORY;
        for (int64_t r = 0; r < x_rows; r++) {
            const float *from = x + r * cols;
            float *to = split + r * cols;
            int64_t c0 = 0;
            for (; c0 + LANES <= cols; c0 += LANES)
                for (int k = 0; k < LANES / 2; k++) to[c0 + k] = from[c0 + 2 * k], to[c0 + 16 + k] = from[c0 + 2 * k + 1];
            for (; c0 < cols; c0++) to[c0] = from[c0];
        }
        a.x_split = split;
    }
    pick(type, isa)(&a, first_row, last_row);
    free(split);
    return 0;
}

__attribute__((constructor)) static void endor_matvec_init(void) {
#ifdef MATVEC_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        matvec_best = ENDOR_ISA_AVX2;
    if (matvec_best == ENDOR_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        matvec_best = ENDOR_ISA_AVX512;
#endif
}

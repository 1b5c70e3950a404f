/* GGUF (ggml) block encodings on the CPU: rows of blocks -> dense rows of fp16 / bf16 / fp32.
 *
 * The spec is endor_ray.format.gguf_blocks (byte layouts of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
 * Q5_K, Q6_K, Q3_K, Q2_K, IQ4_NL as llama.cpp writes them). Element values are the float32 numbers gguf-py's
 * `gguf.quants.dequantize` computes: the same operations in the same order, each rounded to float32
 * on its own (the extension is compiled with -ffp-contract=off, so no multiply-add is fused):
 *   Q8_0, Q4_0, Q5_0:  d * q                      (q signed: x, nibble - 8, 5-bit - 16)
 *   Q4_1, Q5_1:        (d * q) + m
 *   Q4_K, Q5_K:        (d * sc) * q - (dmin * m)  (sc, m: the sub-block's 6-bit scale and minimum)
 *   Q6_K:              (d * sc) * q               (sc int8, q 6-bit - 32)
 *   Q3_K:              (d * sc) * q               (sc 6-bit - 32, q 2-bit - 4 unless its high bit)
 *   Q2_K:              (d * sc) * q - (dmin * m)  (sc, m: the sub-block's 4-bit scale and minimum)
 *   IQ4_NL:            d * kv                     (kv the codebook's value at the nibble)
 * with every fp16 block scale widened exactly. The float32 result is then rounded to nearest even
 * into fp16 (vcvtps2ph or its bit-exact software twin), bf16 (integer rounding; a NaN becomes the
 * pattern torch gives, passed in) or kept as fp32: bit-identical to torch's `.to(dtype)`.
 *
 * Every position read is fixed by the type and the block index, so the one bounds check is that
 * the rows asked for lie inside `nbytes`; whatever the bytes hold, nothing else is read.
 *
 * Three implementations, chosen at run time (or forced, for tests): AVX-512 (F, BW, VL) and AVX2
 * (with F16C) unpack 16 codes at a time with SSE2, widen, scale and round them in registers and
 * store them straight into the output; the portable C (the only one built off x86-64, and the one
 * a bf16 block with a non-finite scale takes) decodes a block into float32 and rounds it after.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENDOR_X86 1
#include <immintrin.h>
#endif
#include "_decode.h"

/* ggml's type ids (gguf.GGMLQuantizationType), the `type` argument */
enum { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
       GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ4_NL = 20 };

/* IQ4_NL's 16 levels (ggml's kvalues_iq4nl) */
static const int8_t IQ4_NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

#define INLINE static inline __attribute__((always_inline))

INLINE float scale_at(const uint8_t *p) { return f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

/* ---- the portable build: one block -> its float32 values (32 or 256), then rounded ------------- */

INLINE void block_q8_0(const uint8_t *restrict b, float *restrict v) {  /* d, int8 x[32] */
    float d = scale_at(b);
    const int8_t *x = (const int8_t *)(b + 2);
    for (int l = 0; l < 32; l++) v[l] = (float)x[l] * d;
}

INLINE void block_q4_0(const uint8_t *restrict b, float *restrict v) {  /* d, qs[16]: low nibbles first */
    float d = scale_at(b);
    const uint8_t *qs = b + 2;
    for (int l = 0; l < 16; l++) {
        v[l] = d * (float)((int)(qs[l] & 15) - 8);
        v[l + 16] = d * (float)((int)(qs[l] >> 4) - 8);
    }
}

INLINE void block_q4_1(const uint8_t *restrict b, float *restrict v) {  /* d, m, qs[16] */
    float d = scale_at(b), m = scale_at(b + 2);
    const uint8_t *qs = b + 4;
    for (int l = 0; l < 16; l++) {
        v[l] = d * (float)(qs[l] & 15) + m;
        v[l + 16] = d * (float)(qs[l] >> 4) + m;
    }
}

INLINE uint32_t le32(const uint8_t *p) {
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

INLINE void block_q5_0(const uint8_t *restrict b, float *restrict v) {  /* d, qh (bit l: element l's 5th), qs[16] */
    float d = scale_at(b);
    uint32_t qh = le32(b + 2);
    const uint8_t *qs = b + 6;
    for (int l = 0; l < 16; l++) {
        v[l] = d * (float)((int)((qs[l] & 15) | ((qh >> l) & 1) << 4) - 16);
        v[l + 16] = d * (float)((int)((qs[l] >> 4) | ((qh >> (l + 16)) & 1) << 4) - 16);
    }
}

INLINE void block_q5_1(const uint8_t *restrict b, float *restrict v) {  /* d, m, qh, qs[16] */
    float d = scale_at(b), m = scale_at(b + 2);
    uint32_t qh = le32(b + 4);
    const uint8_t *qs = b + 8;
    for (int l = 0; l < 16; l++) {
        v[l] = d * (float)((qs[l] & 15) | ((qh >> l) & 1) << 4) + m;
        v[l + 16] = d * (float)((qs[l] >> 4) | ((qh >> (l + 16)) & 1) << 4) + m;
    }
}

/* The 6-bit scale and minimum of sub-block s (0..7) from the K-types' 12 packed bytes */
INLINE void k_scale_min(const uint8_t *scales, int s, float *sc, float *mn) {
    if (s < 4) {
        *sc = (float)(scales[s] & 63);
        *mn = (float)(scales[s + 4] & 63);
    } else {
        *sc = (float)((scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4);
        *mn = (float)((scales[s + 4] >> 4) | (scales[s] >> 6) << 4);
    }
}

/* Q4_K: d, dmin, scales[12], qs[128]; sub-block s (32 elements) is nibble s % 2 of bytes 32 (s / 2) .. */
INLINE void block_q4_k(const uint8_t *restrict b, float *restrict v) {
    float d = scale_at(b), dmin = scale_at(b + 2);
    const uint8_t *qs = b + 16;
    for (int s = 0; s < 8; s++) {
        float sc, mn;
        k_scale_min(b + 4, s, &sc, &mn);
        float ds = d * sc, dm = dmin * mn;
        const uint8_t *q = qs + 32 * (s >> 1);
        int shift = 4 * (s & 1);
        for (int l = 0; l < 32; l++) v[32 * s + l] = ds * (float)((q[l] >> shift) & 15) - dm;
    }
}

/* Q5_K: d, dmin, scales[12], qh[32] (bit s of byte l: element 32 s + l's 5th), qs[128] as Q4_K */
INLINE void block_q5_k(const uint8_t *restrict b, float *restrict v) {
    float d = scale_at(b), dmin = scale_at(b + 2);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int s = 0; s < 8; s++) {
        float sc, mn;
        k_scale_min(b + 4, s, &sc, &mn);
        float ds = d * sc, dm = dmin * mn;
        const uint8_t *q = qs + 32 * (s >> 1);
        int shift = 4 * (s & 1);
        for (int l = 0; l < 32; l++)
            v[32 * s + l] = ds * (float)(((q[l] >> shift) & 15) | ((qh[l] >> s) & 1) << 4) - dm;
    }
}

/* Q6_K: ql[128], qh[64], int8 scales[16] (one per 16 elements), d. Element 128 a + 32 k + l
 * (a < 2, k < 4, l < 32): low 4 bits nibble k / 2 of ql[64 a + 32 (k % 2) + l], high 2 bits
 * bits 2k of qh[32 a + l]. */
INLINE void block_q6_k(const uint8_t *restrict b, float *restrict v) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = scale_at(b + 208);
    for (int a = 0; a < 2; a++) {
        for (int k = 0; k < 4; k++) {
            const uint8_t *low = ql + 64 * a + 32 * (k & 1), *high = qh + 32 * a;
            int low_shift = 4 * (k >> 1), high_shift = 2 * k;
            for (int half = 0; half < 2; half++) {
                float ds = d * (float)scales[8 * a + 2 * k + half];
                float *dst = v + 128 * a + 32 * k + 16 * half;
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    int q = ((low[l] >> low_shift) & 15) | ((high[l] >> high_shift) & 3) << 4;
                    dst[l - 16 * half] = ds * (float)(q - 32);
                }
            }
        }
    }
}

/* Q3_K: hmask[32], qs[64], scales[12], d. Element 128 h + 32 k + l: 2 bits at bit 2k of qs[32 h + l],
 * minus 4 unless bit 4 h + k of hmask[l] is set; sub-block s = e / 16 has the signed 6-bit scale
 * q3_scale(s). Q2_K (scales[16] = scale | min << 4, qs[64], d, dmin) packs its 2 bits the same way. */
INLINE int q3_scale(const uint8_t *scales, int s) {
    return (((scales[s % 8] >> (4 * (s / 8))) & 15) | ((scales[8 + s % 4] >> (2 * (s / 4))) & 3) << 4) - 32;
}

INLINE void block_q3_k(const uint8_t *restrict b, float *restrict v) {
    const uint8_t *hmask = b, *qs = b + 32;
    float d = scale_at(b + 108);
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++)
            for (int half = 0; half < 2; half++) {
                float ds = d * (float)q3_scale(b + 96, 8 * h + 2 * k + half);
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    int q = ((qs[32 * h + l] >> (2 * k)) & 3) - ((hmask[l] >> (4 * h + k)) & 1 ? 0 : 4);
                    v[128 * h + 32 * k + l] = ds * (float)q;
                }
            }
}

INLINE void block_q2_k(const uint8_t *restrict b, float *restrict v) {
    const uint8_t *scales = b, *qs = b + 16;
    float d = scale_at(b + 80), dmin = scale_at(b + 82);
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++)
            for (int half = 0; half < 2; half++) {
                int s = 8 * h + 2 * k + half;
                float ds = d * (float)(scales[s] & 15), dm = dmin * (float)(scales[s] >> 4);
                for (int l = 16 * half; l < 16 * half + 16; l++)
                    v[128 * h + 32 * k + l] = ds * (float)((qs[32 * h + l] >> (2 * k)) & 3) - dm;
            }
}

INLINE void block_iq4_nl(const uint8_t *restrict b, float *restrict v) {  /* d, qs[16] as Q4_0, a codebook */
    float d = scale_at(b);
    const uint8_t *qs = b + 2;
    for (int l = 0; l < 16; l++) {
        v[l] = d * (float)IQ4_NL_VALUES[qs[l] & 15];
        v[l + 16] = d * (float)IQ4_NL_VALUES[qs[l] >> 4];
    }
}

INLINE void store_scalar(const float *v, int n, void *out, int dtype, uint16_t nan) {
    uint16_t *o = out;
    if (dtype == ENDOR_F16) for (int i = 0; i < n; i++) o[i] = f32_to_f16(v[i]);
    else for (int i = 0; i < n; i++) o[i] = f32_to_bf16(v[i], nan);
}

/* fp32 output is written in place; fp16 / bf16 go through a block-sized staging buffer */
#define PORTABLE_BLOCKS(BLOCK, ELEMS, SIZE)                                                                   \
    for (int64_t k = first; k < last; k++) {                                                                  \
        const uint8_t *b = blocks + k * (SIZE);                                                               \
        if (dtype == ENDOR_F32) {                                                                             \
            BLOCK(b, (float *)out + k * (ELEMS));                                                             \
        } else {                                                                                              \
            BLOCK(b, staging);                                                                                \
            store_scalar(staging, ELEMS, (uint16_t *)out + k * (ELEMS), dtype, nan);                          \
        }                                                                                                     \
    }

static void gguf_scalar(int type, const uint8_t *restrict blocks, void *restrict out, int dtype, uint16_t nan,
                        int64_t first, int64_t last) {
    float staging[256];
    switch (type) {
    case GGML_Q8_0: PORTABLE_BLOCKS(block_q8_0, 32, 34) break;
    case GGML_Q4_0: PORTABLE_BLOCKS(block_q4_0, 32, 18) break;
    case GGML_Q4_1: PORTABLE_BLOCKS(block_q4_1, 32, 20) break;
    case GGML_Q5_0: PORTABLE_BLOCKS(block_q5_0, 32, 22) break;
    case GGML_Q5_1: PORTABLE_BLOCKS(block_q5_1, 32, 24) break;
    case GGML_Q4_K: PORTABLE_BLOCKS(block_q4_k, 256, 144) break;
    case GGML_Q5_K: PORTABLE_BLOCKS(block_q5_k, 256, 176) break;
    case GGML_Q6_K: PORTABLE_BLOCKS(block_q6_k, 256, 210) break;
    case GGML_Q3_K: PORTABLE_BLOCKS(block_q3_k, 256, 110) break;
    case GGML_Q2_K: PORTABLE_BLOCKS(block_q2_k, 256, 84) break;
    case GGML_IQ4_NL: PORTABLE_BLOCKS(block_iq4_nl, 32, 18) break;
    }
}

#ifdef ENDOR_X86
/* ---- x86: 16 codes at a time in a register, scaled and rounded straight into the output --------- */
/* Codes are unpacked with SSE2 into 16 unsigned bytes q (Q8_0's int8 x as x + 128); EMIT then
 * computes d * float(q - offset) + add for the 16 elements and stores them in the output dtype.
 * `add` is the type's m (Q4_1, Q5_1), -(dmin * m) (K-types: x - y and x + -y are the same IEEE
 * result) or -0.0 (x + -0.0 == x for every x, -0.0 included), so each element is exactly the
 * reference's d * q [+ m | - dm]. */

/* an fp16 scale, widened exactly by vcvtph2ps (the same float as f16_to_f32, without its branches) */
__attribute__((target("f16c"), always_inline)) static inline float scale_f16c(const uint8_t *p) {
    return _cvtsh_ss((unsigned short)(p[0] | p[1] << 8));
}

INLINE __m128i load16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
INLINE __m128i low_nibbles(__m128i x) { return _mm_and_si128(x, _mm_set1_epi8(15)); }
INLINE __m128i high_nibbles(__m128i x) { return _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(15)); }

/* 16 lanes of 16 where bit l of qh0 | qh1 << 8 (lane l) is set, else 0 */
INLINE __m128i fifth_bits(uint8_t qh0, uint8_t qh1) {
    const __m128i bits = _mm_set1_epi64x((long long)0x8040201008040201ull);
    __m128i spread = _mm_set_epi64x((long long)(0x0101010101010101ull * qh1), (long long)(0x0101010101010101ull * qh0));
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bits), bits), _mm_set1_epi8(16));
}

/* `value` where bit s of the byte is set, else 0 (Q5_K's fifth bits: 16; Q3_K's third: 4) */
INLINE __m128i bit_value(__m128i qh, int s, int value) {
    const __m128i bit = _mm_set1_epi8((char)(1 << s));
    return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(qh, bit), bit), _mm_set1_epi8((char)value));
}

/* Q3_K / Q2_K: bits shift, shift + 1 of each byte (the 16-bit shift's carried bits are masked off) */
INLINE __m128i crumbs(__m128i x, int shift) {
    return _mm_and_si128(_mm_srl_epi16(x, _mm_cvtsi32_si128(shift)), _mm_set1_epi8(3));
}

/* Q6_K: nibble (low_shift / 4) of low | bits high_shift, high_shift + 1 of high, << 4 */
INLINE __m128i q6_codes(__m128i low, int low_shift, __m128i high, int high_shift) {
    __m128i codes = _mm_and_si128(_mm_srl_epi16(low, _mm_cvtsi32_si128(low_shift)), _mm_set1_epi8(15));
    __m128i top = _mm_and_si128(_mm_srl_epi16(high, _mm_cvtsi32_si128(high_shift)), _mm_set1_epi8(3));
    return _mm_or_si128(codes, _mm_slli_epi16(top, 4));  /* top <= 3: no bit crosses into the next byte */
}

#define AVX2 "avx2,f16c"
#define AVX512 "avx512f,avx512bw,avx512vl,avx2,f16c"

/* A bf16 rounding without a NaN case: a block whose scales are all finite has only finite values
 * (below 2^29 in magnitude), so blocks with a non-finite scale go through the portable code instead. */
__attribute__((target(AVX2), always_inline)) static inline __m256i bf16_avx2(__m256 f) {  /* in the low halves */
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

__attribute__((target(AVX2), always_inline))
static inline void emit_avx2(__m128i q, int offset, float d, float add, void *out, int64_t index, int dtype) {
    const __m256i off = _mm256_set1_epi32(offset);
    const __m256 scale = _mm256_set1_ps(d), plus = _mm256_set1_ps(add);
    __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(q), off));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)), off));
    lo = _mm256_add_ps(_mm256_mul_ps(scale, lo), plus);
    hi = _mm256_add_ps(_mm256_mul_ps(scale, hi), plus);
    if (dtype == ENDOR_F32) {
        _mm256_storeu_ps((float *)out + index, lo);
        _mm256_storeu_ps((float *)out + index + 8, hi);
    } else if (dtype == ENDOR_F16) {
        __m128i *o = (__m128i *)((uint16_t *)out + index);
        _mm_storeu_si128(o, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128(o + 1, _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
    } else {
        __m256i packed = _mm256_packus_epi32(bf16_avx2(lo), bf16_avx2(hi));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), _mm256_permute4x64_epi64(packed, 0xD8));
    }
}

__attribute__((target(AVX512), always_inline))
static inline void emit_avx512(__m128i q, int offset, float d, float add, void *out, int64_t index, int dtype) {
    __m512 x = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), _mm512_set1_epi32(offset)));
    __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d), x), _mm512_set1_ps(add));
    if (dtype == ENDOR_F32) {
        _mm512_storeu_ps((float *)out + index, v);
    } else if (dtype == ENDOR_F16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), _mm512_cvtepi32_epi16(rounded));
    }
}

INLINE int finite16(const uint8_t *p) { return (p[1] & 0x7C) != 0x7C; }  /* the fp16 at p is not inf / NaN */

/* One type's blocks [first, last): the rest of the arguments decode block b (the k-th) into the
 * elements from e0 = k * ELEMS; a bf16 block whose scales are not FINITE takes the PORTABLE path. */
#define EACH_BLOCK(SIZE, ELEMS, FINITE, PORTABLE, ...)                                                        \
    for (int64_t k = first; k < last; k++) {                                                                  \
        const uint8_t *b = blocks + k * (SIZE);                                                               \
        int64_t e0 = k * (ELEMS);                                                                             \
        if (dtype == ENDOR_BF16 && !(FINITE)) {                                                               \
            PORTABLE(b, staging);                                                                             \
            store_scalar(staging, ELEMS, (uint16_t *)out + e0, ENDOR_BF16, nan);                              \
            continue;                                                                                         \
        }                                                                                                     \
        __VA_ARGS__                                                                                           \
    }

/* The x86 decoder for one target; `dtype` is a constant in each call of NAME_typed, so its tests
 * fold away */
#define X86_DECODER(NAME, TARGET, EMIT)                                                                       \
    __attribute__((target(TARGET), always_inline)) static inline void NAME##_typed(                           \
        int type, const uint8_t *restrict blocks, void *restrict out, int dtype, uint16_t nan,                \
        int64_t first, int64_t last) {                                                                        \
        const __m128i sign = _mm_set1_epi8((char)0x80);                                                       \
        float staging[256];                                                                                   \
        switch (type) {                                                                                       \
        case GGML_Q8_0: EACH_BLOCK(34, 32, finite16(b), block_q8_0, {                                         \
            float d = scale_f16c(b);                                                                          \
            EMIT(_mm_xor_si128(load16(b + 2), sign), 128, d, -0.0f, out, e0, dtype);                          \
            EMIT(_mm_xor_si128(load16(b + 18), sign), 128, d, -0.0f, out, e0 + 16, dtype);                    \
        }) break;                                                                                             \
        case GGML_Q4_0: EACH_BLOCK(18, 32, finite16(b), block_q4_0, {                                         \
            float d = scale_f16c(b);                                                                          \
            __m128i qs = load16(b + 2);                                                                       \
            EMIT(low_nibbles(qs), 8, d, -0.0f, out, e0, dtype);                                               \
            EMIT(high_nibbles(qs), 8, d, -0.0f, out, e0 + 16, dtype);                                         \
        }) break;                                                                                             \
        case GGML_Q4_1: EACH_BLOCK(20, 32, finite16(b) && finite16(b + 2), block_q4_1, {                      \
            float d = scale_f16c(b), m = scale_f16c(b + 2);                                                   \
            __m128i qs = load16(b + 4);                                                                       \
            EMIT(low_nibbles(qs), 0, d, m, out, e0, dtype);                                                   \
            EMIT(high_nibbles(qs), 0, d, m, out, e0 + 16, dtype);                                             \
        }) break;                                                                                             \
        case GGML_Q5_0: EACH_BLOCK(22, 32, finite16(b), block_q5_0, {                                         \
            float d = scale_f16c(b);                                                                          \
            __m128i qs = load16(b + 6);                                                                       \
            EMIT(_mm_or_si128(low_nibbles(qs), fifth_bits(b[2], b[3])), 16, d, -0.0f, out, e0, dtype);        \
            EMIT(_mm_or_si128(high_nibbles(qs), fifth_bits(b[4], b[5])), 16, d, -0.0f, out, e0 + 16, dtype);  \
        }) break;                                                                                             \
        case GGML_Q5_1: EACH_BLOCK(24, 32, finite16(b) && finite16(b + 2), block_q5_1, {                      \
            float d = scale_f16c(b), m = scale_f16c(b + 2);                                                   \
            __m128i qs = load16(b + 8);                                                                       \
            EMIT(_mm_or_si128(low_nibbles(qs), fifth_bits(b[4], b[5])), 0, d, m, out, e0, dtype);             \
            EMIT(_mm_or_si128(high_nibbles(qs), fifth_bits(b[6], b[7])), 0, d, m, out, e0 + 16, dtype);       \
        }) break;                                                                                             \
        case GGML_Q4_K: EACH_BLOCK(144, 256, finite16(b) && finite16(b + 2), block_q4_k, {                    \
            K_BLOCK(EMIT, b + 16, _mm_setzero_si128())                                                        \
        }) break;                                                                                             \
        case GGML_Q5_K: EACH_BLOCK(176, 256, finite16(b) && finite16(b + 2), block_q5_k, {                    \
            K_BLOCK(EMIT, b + 48, bit_value(load16(b + 16 + part), s, 16))                                            \
        }) break;                                                                                             \
        case GGML_Q6_K: EACH_BLOCK(210, 256, finite16(b + 208), block_q6_k, {                                 \
            float d = scale_f16c(b + 208);                                                                    \
            const int8_t *scales = (const int8_t *)(b + 192);                                                 \
            for (int a = 0; a < 2; a++)                                                                       \
                for (int k4 = 0; k4 < 4; k4++)                                                                \
                    for (int part = 0; part < 32; part += 16) {                                               \
                        __m128i q = q6_codes(load16(b + 64 * a + 32 * (k4 & 1) + part), 4 * (k4 >> 1),        \
                                             load16(b + 128 + 32 * a + part), 2 * k4);                        \
                        float ds = d * (float)scales[8 * a + 2 * k4 + part / 16];                             \
                        EMIT(q, 32, ds, -0.0f, out, e0 + 128 * a + 32 * k4 + part, dtype);                    \
                    }                                                                                         \
        }) break;                                                                                             \
        case GGML_Q3_K: EACH_BLOCK(110, 256, finite16(b + 108), block_q3_k, {                                 \
            float d = scale_f16c(b + 108);  /* codes low | high bit << 2 in 0..7, the value code - 4 */      \
            for (int h = 0; h < 2; h++)                                                                       \
                for (int k4 = 0; k4 < 4; k4++)                                                                \
                    for (int part = 0; part < 32; part += 16) {                                               \
                        __m128i q = _mm_or_si128(crumbs(load16(b + 32 + 32 * h + part), 2 * k4),              \
                                                 bit_value(load16(b + part), 4 * h + k4, 4));                 \
                        float ds = d * (float)q3_scale(b + 96, 8 * h + 2 * k4 + part / 16);                   \
                        EMIT(q, 4, ds, -0.0f, out, e0 + 128 * h + 32 * k4 + part, dtype);                     \
                    }                                                                                         \
        }) break;                                                                                             \
        case GGML_Q2_K: EACH_BLOCK(84, 256, finite16(b + 80) && finite16(b + 82), block_q2_k, {               \
            float d = scale_f16c(b + 80), dmin = scale_f16c(b + 82);                                          \
            for (int h = 0; h < 2; h++)                                                                       \
                for (int k4 = 0; k4 < 4; k4++)                                                                \
                    for (int part = 0; part < 32; part += 16) {                                               \
                        int s = 8 * h + 2 * k4 + part / 16;                                                   \
                        float ds = d * (float)(b[s] & 15), minus_dm = -(dmin * (float)(b[s] >> 4));           \
                        EMIT(crumbs(load16(b + 16 + 32 * h + part), 2 * k4), 0, ds, minus_dm, out,            \
                             e0 + 128 * h + 32 * k4 + part, dtype);                                           \
                    }                                                                                         \
        }) break;                                                                                             \
        case GGML_IQ4_NL: EACH_BLOCK(18, 32, finite16(b), block_iq4_nl, {                                     \
            /* the codebook + 128 (1..241) looked up by pshufb; EMIT takes the 128 off again */               \
            const __m128i book = _mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141,         \
                                               (char)153, (char)166, (char)181, (char)197, (char)217, (char)241); \
            float d = scale_f16c(b);                                                                          \
            __m128i qs = load16(b + 2);                                                                       \
            EMIT(_mm_shuffle_epi8(book, low_nibbles(qs)), 128, d, -0.0f, out, e0, dtype);                     \
            EMIT(_mm_shuffle_epi8(book, high_nibbles(qs)), 128, d, -0.0f, out, e0 + 16, dtype);               \
        }) break;                                                                                             \
        }                                                                                                     \
    }                                                                                                         \
    __attribute__((target(TARGET))) static void NAME(int type, const uint8_t *restrict blocks,                \
                                                     void *restrict out, int dtype, uint16_t nan,             \
                                                     int64_t first, int64_t last) {                           \
        if (dtype == ENDOR_F32) NAME##_typed(type, blocks, out, ENDOR_F32, nan, first, last);                 \
        else if (dtype == ENDOR_F16) NAME##_typed(type, blocks, out, ENDOR_F16, nan, first, last);            \
        else NAME##_typed(type, blocks, out, ENDOR_BF16, nan, first, last);                                   \
    }

/* Q4_K / Q5_K: sub-block s is nibble s % 2 of qs[32 (s / 2) ..], plus HIGH (0 or Q5_K's fifth bits) */
#define K_BLOCK(EMIT, QS, HIGH)                                                                               \
    float d = scale_f16c(b), dmin = scale_f16c(b + 2);                                                        \
    for (int s = 0; s < 8; s++) {                                                                             \
        float sc, mn;                                                                                         \
        k_scale_min(b + 4, s, &sc, &mn);                                                                      \
        float ds = d * sc, minus_dm = -(dmin * mn);                                                           \
        for (int part = 0; part < 32; part += 16) {                                                           \
            __m128i packed = load16((QS) + 32 * (s >> 1) + part);                                             \
            __m128i q = s & 1 ? high_nibbles(packed) : low_nibbles(packed);                                   \
            EMIT(_mm_or_si128(q, HIGH), 0, ds, minus_dm, out, e0 + 32 * s + part, dtype);                     \
        }                                                                                                     \
    }

X86_DECODER(gguf_avx2, AVX2, emit_avx2)
X86_DECODER(gguf_avx512, AVX512, emit_avx512)
#endif /* ENDOR_X86 */

/* ---- entry points (ctypes) ---------------------------------------------------------------------- */

static int gguf_best = ENDOR_ISA_SCALAR;

/* The best implementation this CPU runs for GGUF blocks (any output dtype). */
int endor_gguf_best_isa(void) { return gguf_best; }

/* Elements per block and bytes per block of ggml type `type`; 0 if it is not one decoded here. */
static int geometry(int type, int64_t *elems, int64_t *size) {
    switch (type) {
    case GGML_Q8_0: *elems = 32, *size = 34; return 1;
    case GGML_Q4_0: *elems = 32, *size = 18; return 1;
    case GGML_Q4_1: *elems = 32, *size = 20; return 1;
    case GGML_Q5_0: *elems = 32, *size = 22; return 1;
    case GGML_Q5_1: *elems = 32, *size = 24; return 1;
    case GGML_Q4_K: *elems = 256, *size = 144; return 1;
    case GGML_Q5_K: *elems = 256, *size = 176; return 1;
    case GGML_Q6_K: *elems = 256, *size = 210; return 1;
    case GGML_Q3_K: *elems = 256, *size = 110; return 1;
    case GGML_Q2_K: *elems = 256, *size = 84; return 1;
    case GGML_IQ4_NL: *elems = 32, *size = 18; return 1;
    }
    return 0;
}

/* Decode rows [first_row, last_row) of a [rows, cols] tensor of ggml type `type` whose `nbytes`
 * bytes of blocks start at `blocks`, into the dense rows of `out` (the whole tensor's output, dtype
 * ENDOR_F16 / BF16 / F32). Returns 0, ENDOR_ERR_ARGS, or ENDOR_ERR_SHORT where the rows' blocks
 * do not fit in nbytes (nothing is read then). */
int endor_dequant_gguf(int type, const uint8_t *blocks, int64_t nbytes, int64_t rows, int64_t cols, void *out,
                       int dtype, int isa, uint16_t bf16_nan, int64_t first_row, int64_t last_row) {
    int64_t elems, size;
    if (!geometry(type, &elems, &size) || nbytes < 0 || rows < 0 || cols < 1 || cols % elems ||
        dtype < ENDOR_F16 || dtype > ENDOR_F32 || first_row < 0 || last_row < first_row || last_row > rows)
        return ENDOR_ERR_ARGS;
    int64_t blocks_per_row = cols / elems, row_bytes = blocks_per_row * size;
    if (last_row > nbytes / row_bytes) return ENDOR_ERR_SHORT;  /* divides: no overflow */
    if (first_row == last_row) return 0;
    int64_t first = first_row * blocks_per_row, last = last_row * blocks_per_row;
    isa = isa == ENDOR_ISA_AUTO || isa > gguf_best ? gguf_best : isa;
#ifdef ENDOR_X86
    if (isa == ENDOR_ISA_AVX512) { gguf_avx512(type, blocks, out, dtype, bf16_nan, first, last); return 0; }
    if (isa == ENDOR_ISA_AVX2) { gguf_avx2(type, blocks, out, dtype, bf16_nan, first, last); return 0; }
#endif
    gguf_scalar(type, blocks, out, dtype, bf16_nan, first, last);
    return 0;
}

__attribute__((constructor)) static void endor_gguf_init(void) {
#ifdef ENDOR_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) gguf_best = ENDOR_ISA_AVX2;
    if (gguf_best == ENDOR_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        gguf_best = ENDOR_ISA_AVX512;
#endif
}

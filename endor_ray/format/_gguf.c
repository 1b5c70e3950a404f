/* GGUF (ggml) block encodings on the CPU: rows of blocks -> dense rows of fp16 / bf16 / fp32.
 *
 * The spec is endor_ray.format.gguf_blocks (byte layouts of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
 * Q5_K, Q6_K as llama.cpp writes them). Element values are the float32 numbers gguf-py's
 * `gguf.quants.dequantize` computes: the same operations in the same order, each rounded to float32
 * on its own (the extension is compiled with -ffp-contract=off, so no multiply-add is fused):
 *   Q8_0, Q4_0, Q5_0:  d * q                      (q signed: x, nibble - 8, 5-bit - 16)
 *   Q4_1, Q5_1:        (d * q) + m
 *   Q4_K, Q5_K:        (d * sc) * q - (dmin * m)  (sc, m: the sub-block's 6-bit scale and minimum)
 *   Q6_K:              (d * sc) * q               (sc int8, q 6-bit - 32)
 * with every fp16 block scale widened exactly. The float32 result is then rounded to nearest even
 * into fp16 (vcvtps2ph or its bit-exact software twin), bf16 (integer rounding; a NaN becomes the
 * pattern torch gives, passed in) or kept as fp32: bit-identical to torch's `.to(dtype)`.
 *
 * Every position read is fixed by the type and the block index, so the one bounds check is that
 * the rows asked for lie inside `nbytes`; whatever the bytes hold, nothing else is read.
 *
 * Three builds of the same C, chosen at run time (or forced, for tests): AVX-512 (F, BW, VL),
 * AVX2 (with F16C) and the baseline. The per-block loops are plain C that the compiler vectorises
 * at each target's width (element-wise IEEE operations, so every width gives the same bits); the
 * rounding to fp16 / bf16 is written with intrinsics.
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
       GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14 };

#define INLINE static inline __attribute__((always_inline))

INLINE float scale_at(const uint8_t *p) { return f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

/* ---- one block -> its float32 values (32 or 256) ----------------------------------------------- */

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

INLINE uint32_t le32(const uint8_t *p) { return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

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

/* ---- float32 -> output dtype, n (a multiple of 16) at a time ------------------------------------ */

INLINE void store_scalar(const float *v, int n, void *out, int dtype, uint16_t nan) {
    uint16_t *o = out;
    if (dtype == ENDOR_F16) for (int i = 0; i < n; i++) o[i] = f32_to_f16(v[i]);
    else for (int i = 0; i < n; i++) o[i] = f32_to_bf16(v[i], nan);
}

#ifdef ENDOR_X86
__attribute__((target("avx2,f16c")))
static inline __m256i bf16_nan_avx2(__m256 f, __m256i nan) {  /* the bf16 bits in each 32-bit lane's low half */
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                        _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(rounded, nan, is_nan);
}

__attribute__((target("avx2,f16c")))
static inline void store_avx2(const float *v, int n, void *out, int dtype, uint16_t nan) {
    uint16_t *o = out;
    if (dtype == ENDOR_F16) {
        for (int i = 0; i < n; i += 8)
            _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
        return;
    }
    __m256i nan_bits = _mm256_set1_epi32(nan);
    for (int i = 0; i < n; i += 16) {
        __m256i lo = bf16_nan_avx2(_mm256_loadu_ps(v + i), nan_bits);
        __m256i hi = bf16_nan_avx2(_mm256_loadu_ps(v + i + 8), nan_bits);
        _mm256_storeu_si256((__m256i *)(o + i), _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
    }
}

#define AVX512 "avx512f,avx512bw,avx512vl,avx2,f16c"
__attribute__((target(AVX512)))
static inline void store_avx512(const float *v, int n, void *out, int dtype, uint16_t nan) {
    uint16_t *o = out;
    if (dtype == ENDOR_F16) {
        for (int i = 0; i < n; i += 16)
            _mm256_storeu_si256((__m256i *)(o + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
    }
    const __m512i nan_bits = _mm512_set1_epi32(nan), lsb_bit = _mm512_set1_epi32(1);
    for (int i = 0; i < n; i += 16) {
        __m512i u = _mm512_castps_si512(_mm512_loadu_ps(v + i));
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb_bit);
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
        __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                   _mm512_set1_epi32(0x7F800000));
        _mm256_storeu_si256((__m256i *)(o + i), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan_bits)));
    }
}
#endif

/* ---- blocks [first, last) of one type, built once per target ------------------------------------ */

/* fp32 output is written in place; fp16 / bf16 go through a block-sized staging buffer */
#define BLOCKS(BLOCK, ELEMS, SIZE, STORE)                                                         \
    for (int64_t k = first; k < last; k++) {                                                      \
        const uint8_t *b = blocks + k * (SIZE);                                                    \
        if (dtype == ENDOR_F32) {                                                                 \
            BLOCK(b, (float *)out + k * (ELEMS));                                                  \
        } else {                                                                                  \
            BLOCK(b, staging);                                                                    \
            STORE(staging, ELEMS, (uint16_t *)out + k * (ELEMS), dtype, nan);                      \
        }                                                                                         \
    }

#define GGUF_DECODER(NAME, ATTRIBUTES, STORE)                                                      \
    ATTRIBUTES static void NAME(int type, const uint8_t *restrict blocks, void *restrict out, int dtype, \
                                uint16_t nan, int64_t first, int64_t last) {                      \
        float staging[256] __attribute__((aligned(64)));                                          \
        switch (type) {                                                                           \
        case GGML_Q8_0: BLOCKS(block_q8_0, 32, 34, STORE) break;                                  \
        case GGML_Q4_0: BLOCKS(block_q4_0, 32, 18, STORE) break;                                  \
        case GGML_Q4_1: BLOCKS(block_q4_1, 32, 20, STORE) break;                                  \
        case GGML_Q5_0: BLOCKS(block_q5_0, 32, 22, STORE) break;                                  \
        case GGML_Q5_1: BLOCKS(block_q5_1, 32, 24, STORE) break;                                  \
        case GGML_Q4_K: BLOCKS(block_q4_k, 256, 144, STORE) break;                                \
        case GGML_Q5_K: BLOCKS(block_q5_k, 256, 176, STORE) break;                                \
        case GGML_Q6_K: BLOCKS(block_q6_k, 256, 210, STORE) break;                                \
        }                                                                                         \
    }
GGUF_DECODER(gguf_scalar, , store_scalar)
#ifdef ENDOR_X86
GGUF_DECODER(gguf_avx2, __attribute__((target("avx2,f16c"))), store_avx2)
GGUF_DECODER(gguf_avx512, __attribute__((target(AVX512))), store_avx512)
#endif

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

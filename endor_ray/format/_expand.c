/* Endor bitmap expansion on the CPU: bitmap + packed values -> dense, in one pass.
 *
 * The spec is endor_ray.format.tensor: element e of the dense output is the next packed value if
 * bit e of the LSB-first bitmap is set, else zero. Values are moved as 16- or 32-bit integers
 * (fp16/bf16, fp32), so the output is bit-identical to what was encoded.
 *
 * endor_expand() decodes the elements [begin, end) of one tensor, with `values` pointing at the
 * first packed value of that range (block_offsets[begin / block_size] for a block boundary). It
 * returns the number of values consumed, or -1 if the bitmap sets more bits than `nnz_avail`
 * values exist: nothing is ever read past values[nnz_avail - 1], whatever the bitmap says.
 *
 * Three implementations, chosen at run time from what the CPU has (or forced, for tests):
 *   ENDOR_ISA_AVX512: vpexpandw (AVX-512 VBMI2) / vpexpandd (AVX-512F), 32 / 16 elements per
 *                     instruction under a mask read straight from the bitmap;
 *   ENDOR_ISA_AVX2:   a byte of the bitmap selects a shuffle (pshufb / vpermd) from a table;
 *   ENDOR_ISA_SCALAR: a plain loop.
 * The GIL is not needed: callers (ctypes) release it, so several threads decode at once.
 *
 * Quantized values ("int8" / "int4" codes with one scale per group of G kept elements of a row,
 * endor_ray.format.quant): endor_dequant_expand() decodes a range of blocks of a bitmap tensor,
 * block by block: the block's codes (unpacked from nibbles for int4) are dequantized into a
 * staging buffer, one run of equal scale at a time (the row found by walking row_offsets, the
 * group by counting), float32(code) * float32(scale) rounded to nearest even into fp16 (F16C
 * vcvtps2ph), bf16 (integer rounding) or fp32, and the staging buffer is then expanded as raw
 * values. endor_dequant_dense() does the same for rows of a dense tensor straight into the output.
 * Both are bit-identical to the torch reference (tensor.decode) and bounds-check every index
 * they take from the data: a row or scale outside its array is an error return, never a read.
 *
 * Built as a Python extension module only so that pip builds it at install; Python reaches the
 * functions through ctypes (endor_ray.format.cpu_decode). On a CPU other than x86-64 only the
 * scalar loop is built.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENDOR_X86 1
#include <immintrin.h>
#endif
#include "_decode.h"

/* ---- scalar ----------------------------------------------------------------------------------- */

#define SCALAR_EXPAND(T)                                                                          \
    static int64_t expand##T##_scalar(const uint8_t *bitmap, const uint##T##_t *values,           \
                                      int64_t nnz_avail, uint##T##_t *out, int64_t begin,         \
                                      int64_t end) {                                              \
        int64_t used = 0;                                                                         \
        for (int64_t e = begin; e < end; e++) {                                                   \
            if ((bitmap[e >> 3] >> (e & 7)) & 1) {                                                \
                if (used >= nnz_avail) return -1;                                                 \
                out[e] = values[used++];                                                          \
            } else {                                                                              \
                out[e] = 0;                                                                       \
            }                                                                                     \
        }                                                                                         \
        return used;                                                                              \
    }
SCALAR_EXPAND(16)
SCALAR_EXPAND(32)

#ifdef ENDOR_X86
/* ---- AVX2: table-driven shuffles, 8 elements per bitmap byte ---------------------------------- */

static uint8_t shuffle16[256][16];  /* pshufb control: lane j <- packed value popcount(b & ((1<<j)-1)) */
static uint32_t permute32[256][8];  /* vpermd indices, same rule */
static uint32_t keep32[256][8];     /* all-ones where bit j is set */

static void build_tables(void) {
    for (int b = 0; b < 256; b++) {
        int slot = 0;
        for (int j = 0; j < 8; j++) {
            int set = (b >> j) & 1;
            shuffle16[b][2 * j] = set ? (uint8_t)(2 * slot) : 0x80;      /* 0x80: pshufb writes 0 */
            shuffle16[b][2 * j + 1] = set ? (uint8_t)(2 * slot + 1) : 0x80;
            permute32[b][j] = set ? (uint32_t)slot : 0;
            keep32[b][j] = set ? 0xFFFFFFFFu : 0;
            slot += set;
        }
    }
}

__attribute__((target("avx2,popcnt")))
static int64_t expand16_avx2(const uint8_t *bitmap, const uint16_t *values, int64_t nnz_avail,
                             uint16_t *out, int64_t begin, int64_t end) {
    int64_t used = 0, e = begin;
    for (; e + 8 <= end; e += 8) {
        unsigned b = bitmap[e >> 3];
        int64_t count = __builtin_popcount(b);
        if (used + count > nnz_avail) return -1;
        __m128i packed;
        if (used + 8 <= nnz_avail) {
            packed = _mm_loadu_si128((const __m128i *)(values + used));
        } else {  /* near the end of values: never read past it */
            uint16_t tail[8] = {0};
            memcpy(tail, values + used, (size_t)(nnz_avail - used) * sizeof(uint16_t));
            packed = _mm_loadu_si128((const __m128i *)tail);
        }
        __m128i control = _mm_loadu_si128((const __m128i *)shuffle16[b]);
        _mm_storeu_si128((__m128i *)(out + e), _mm_shuffle_epi8(packed, control));
        used += count;
    }
    if (e < end) {
        int64_t rest = expand16_scalar(bitmap, values + used, nnz_avail - used, out, e, end);
        return rest < 0 ? -1 : used + rest;
    }
    return used;
}

__attribute__((target("avx2,popcnt")))
static int64_t expand32_avx2(const uint8_t *bitmap, const uint32_t *values, int64_t nnz_avail,
                             uint32_t *out, int64_t begin, int64_t end) {
    int64_t used = 0, e = begin;
    for (; e + 8 <= end; e += 8) {
        unsigned b = bitmap[e >> 3];
        int64_t count = __builtin_popcount(b);
        if (used + count > nnz_avail) return -1;
        __m256i packed;
        if (used + 8 <= nnz_avail) {
            packed = _mm256_loadu_si256((const __m256i *)(values + used));
        } else {
            uint32_t tail[8] = {0};
            memcpy(tail, values + used, (size_t)(nnz_avail - used) * sizeof(uint32_t));
            packed = _mm256_loadu_si256((const __m256i *)tail);
        }
        __m256i index = _mm256_loadu_si256((const __m256i *)permute32[b]);
        __m256i keep = _mm256_loadu_si256((const __m256i *)keep32[b]);
        __m256i dense = _mm256_and_si256(_mm256_permutevar8x32_epi32(packed, index), keep);
        _mm256_storeu_si256((__m256i *)(out + e), dense);
        used += count;
    }
    if (e < end) {
        int64_t rest = expand32_scalar(bitmap, values + used, nnz_avail - used, out, e, end);
        return rest < 0 ? -1 : used + rest;
    }
    return used;
}

/* ---- AVX-512: one masked expand-load per 32 (16-bit) or 16 (32-bit) elements ------------------ */
/* The expand-load reads exactly popcount(mask) values (masked-off lanes never fault), so no guard
 * against reading past the values is needed beyond the count check. */

__attribute__((target("avx512f,avx512bw,avx512vbmi2,popcnt")))
static int64_t expand16_avx512(const uint8_t *bitmap, const uint16_t *values, int64_t nnz_avail,
                               uint16_t *out, int64_t begin, int64_t end) {
    int64_t used = 0, e = begin;
    for (; e + 32 <= end; e += 32) {
        uint32_t mask;
        memcpy(&mask, bitmap + (e >> 3), sizeof mask);
        int64_t count = __builtin_popcount(mask);
        if (used + count > nnz_avail) return -1;
        _mm512_storeu_si512(out + e, _mm512_maskz_expandloadu_epi16(mask, values + used));
        used += count;
    }
    if (e < end) {
        int64_t rest = expand16_scalar(bitmap, values + used, nnz_avail - used, out, e, end);
        return rest < 0 ? -1 : used + rest;
    }
    return used;
}

__attribute__((target("avx512f,popcnt")))
static int64_t expand32_avx512(const uint8_t *bitmap, const uint32_t *values, int64_t nnz_avail,
                               uint32_t *out, int64_t begin, int64_t end) {
    int64_t used = 0, e = begin;
    for (; e + 16 <= end; e += 16) {
        uint16_t mask;
        memcpy(&mask, bitmap + (e >> 3), sizeof mask);
        int64_t count = __builtin_popcount(mask);
        if (used + count > nnz_avail) return -1;
        _mm512_storeu_si512(out + e, _mm512_maskz_expandloadu_epi32(mask, values + used));
        used += count;
    }
    if (e < end) {
        int64_t rest = expand32_scalar(bitmap, values + used, nnz_avail - used, out, e, end);
        return rest < 0 ? -1 : used + rest;
    }
    return used;
}

#endif /* ENDOR_X86 */

/* ---- entry points (ctypes) -------------------------------------------------------------------- */

static int best_isa16 = ENDOR_ISA_SCALAR, best_isa32 = ENDOR_ISA_SCALAR;

/* The best implementation this CPU runs for `elem_size`-byte elements (2 or 4). */
int endor_best_isa(int elem_size) { return elem_size == 2 ? best_isa16 : best_isa32; }

/* `isa`, or the best this CPU runs where it asks for more (or for ENDOR_ISA_AUTO) */
static int endor_isa_for(int isa, int elem_size) {
    return isa == ENDOR_ISA_AUTO || isa > endor_best_isa(elem_size) ? endor_best_isa(elem_size) : isa;
}

/* Decode elements [begin, end) (begin a multiple of 32) of a tensor of `elem_size`-byte elements. */
int64_t endor_expand(const uint8_t *bitmap, const void *values, int64_t nnz_avail, void *out,
                     int64_t begin, int64_t end, int elem_size, int isa) {
    if (begin < 0 || end < begin || (begin & 31) || nnz_avail < 0) return -2;
    isa = endor_isa_for(isa, elem_size);
#ifdef ENDOR_X86
    if (elem_size == 2 && isa == ENDOR_ISA_AVX512) return expand16_avx512(bitmap, values, nnz_avail, out, begin, end);
    if (elem_size == 2 && isa == ENDOR_ISA_AVX2) return expand16_avx2(bitmap, values, nnz_avail, out, begin, end);
    if (elem_size == 4 && isa == ENDOR_ISA_AVX512) return expand32_avx512(bitmap, values, nnz_avail, out, begin, end);
    if (elem_size == 4 && isa == ENDOR_ISA_AVX2) return expand32_avx2(bitmap, values, nnz_avail, out, begin, end);
#endif
    if (elem_size == 2) return expand16_scalar(bitmap, values, nnz_avail, out, begin, end);
    if (elem_size == 4) return expand32_scalar(bitmap, values, nnz_avail, out, begin, end);
    return -2;
}

/* ---- dequantization: float32(code) * float32(scale), rounded to nearest even -------------------- */

static inline float load_scale(const void *scales, int64_t index, int dtype) {
    if (dtype == ENDOR_F32) return ((const float *)scales)[index];
    uint16_t h = ((const uint16_t *)scales)[index];
    return dtype == ENDOR_BF16 ? bits_f32((uint32_t)h << 16) : f16_to_f32(h);
}

/* Dequantize n codes with one scale into out (n elements of the dtype). Each implementation reads
 * exactly codes[0 .. n) and writes exactly out[0 .. n). The vector ones take a finite scale only:
 * then no product is a NaN (codes are small integers), so the bf16 rounding needs no NaN case. */
static void dequant_scalar(const int8_t *codes, int64_t n, float scale, void *out, int dtype, uint16_t nan) {
    if (dtype == ENDOR_F32) {
        float *o = out;
        for (int64_t i = 0; i < n; i++) o[i] = (float)codes[i] * scale;
    } else if (dtype == ENDOR_BF16) {
        uint16_t *o = out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16((float)codes[i] * scale, nan);
    } else {
        uint16_t *o = out;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_f16((float)codes[i] * scale);
    }
}

#ifdef ENDOR_X86
/* AVX2: 16 codes per step; the tail goes through small zeroed buffers so nothing outside is touched */
__attribute__((target("avx2")))
static inline __m256i bf16_bits_avx2(__m256 f) {  /* round to nearest even; the result in the low half */
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

#define STORE16_F16_AVX2(p, lo, hi)                                                                \
    _mm256_storeu_si256((__m256i *)(p), _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT), \
                                                         _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT)))
#define STORE16_BF16_AVX2(p, lo, hi)                                                               \
    _mm256_storeu_si256((__m256i *)(p), _mm256_permute4x64_epi64(                                 \
                                            _mm256_packus_epi32(bf16_bits_avx2(lo), bf16_bits_avx2(hi)), 0xD8))
#define STORE16_F32_AVX2(p, lo, hi) (_mm256_storeu_ps((p), lo), _mm256_storeu_ps((p) + 8, hi))

#define DEQUANT_AVX2(NAME, TARGET, T, STORE16)                                                     \
    __attribute__((target(TARGET)))                                                               \
    static void NAME(const int8_t *codes, int64_t n, float s, void *out_, uint16_t nan) {         \
        (void)nan;                                                                                \
        T *out = out_;                                                                            \
        const __m256 scale = _mm256_set1_ps(s);                                                   \
        int64_t i = 0;                                                                            \
        for (;; i += 16) {                                                                        \
            __m128i c;                                                                            \
            T tail[16];                                                                           \
            if (i + 16 <= n) {                                                                    \
                c = _mm_loadu_si128((const __m128i *)(codes + i));                                \
            } else if (i < n) {                                                                   \
                int8_t tail_codes[16] = {0};                                                      \
                memcpy(tail_codes, codes + i, (size_t)(n - i));                                   \
                c = _mm_loadu_si128((const __m128i *)tail_codes);                                 \
            } else {                                                                              \
                break;                                                                            \
            }                                                                                     \
            __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), scale);        \
            __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c, c))), scale); \
            if (i + 16 <= n) {                                                                    \
                STORE16(out + i, lo, hi);                                                         \
            } else {                                                                              \
                STORE16(tail, lo, hi);                                                            \
                memcpy(out + i, tail, (size_t)(n - i) * sizeof(T));                               \
                break;                                                                            \
            }                                                                                     \
        }                                                                                         \
    }
DEQUANT_AVX2(dequant_f16_avx2, "avx2,f16c", uint16_t, STORE16_F16_AVX2)
DEQUANT_AVX2(dequant_bf16_avx2, "avx2", uint16_t, STORE16_BF16_AVX2)
DEQUANT_AVX2(dequant_f32_avx2, "avx2", float, STORE16_F32_AVX2)

/* AVX-512: 32 codes per step, the tail 16 at a time under a mask (masked-off lanes are neither
 * read nor written) */
__attribute__((target("avx512f")))
static inline __m256i bf16_avx512(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16));
}

#define DEQUANT_AVX512(NAME, TARGET, T, CONVERT, STORE, MASK_STORE)                                \
    __attribute__((target(TARGET)))                                                               \
    static void NAME(const int8_t *codes, int64_t n, float s, void *out_, uint16_t nan) {         \
        (void)nan;                                                                                \
        T *out = out_;                                                                            \
        const __m512 scale = _mm512_set1_ps(s);                                                   \
        int64_t i = 0;                                                                            \
        for (; i + 32 <= n; i += 32) {                                                            \
            __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));      \
            __m512i d = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + i + 16))); \
            STORE(out + i, CONVERT(_mm512_mul_ps(_mm512_cvtepi32_ps(c), scale)));                 \
            STORE(out + i + 16, CONVERT(_mm512_mul_ps(_mm512_cvtepi32_ps(d), scale)));            \
        }                                                                                         \
        for (; i < n; i += 16) {                                                                  \
            __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);     \
            int8_t tail_codes[16] = {0};                                                          \
            memcpy(tail_codes, codes + i, (size_t)(n - i < 16 ? n - i : 16));                     \
            __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)tail_codes));       \
            MASK_STORE(out + i, m, CONVERT(_mm512_mul_ps(_mm512_cvtepi32_ps(c), scale)));         \
        }                                                                                         \
    }
#define F16_AVX512(f) _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define SAME(f) (f)
#define STORE16_AVX512(p, h) _mm256_storeu_si256((__m256i *)(p), h)
#define MASK_STORE16_AVX512(p, m, h) _mm256_mask_storeu_epi16(p, m, h)
#define AVX512_16 "avx512f,avx512bw,avx512vl"
DEQUANT_AVX512(dequant_f16_avx512, AVX512_16, uint16_t, F16_AVX512, STORE16_AVX512, MASK_STORE16_AVX512)
DEQUANT_AVX512(dequant_bf16_avx512, AVX512_16, uint16_t, bf16_avx512, STORE16_AVX512, MASK_STORE16_AVX512)
DEQUANT_AVX512(dequant_f32_avx512, "avx512f", float, SAME, _mm512_storeu_ps, _mm512_mask_storeu_ps)
#endif /* ENDOR_X86 */

typedef void (*dequant_fn)(const int8_t *, int64_t, float, void *, uint16_t);

#define DEQUANT_SCALAR(NAME, DTYPE)                                                                \
    static void NAME(const int8_t *c, int64_t n, float s, void *o, uint16_t nan) {                  \
        dequant_scalar(c, n, s, o, DTYPE, nan);                                                   \
    }
DEQUANT_SCALAR(dequant_f16_scalar, ENDOR_F16)
DEQUANT_SCALAR(dequant_bf16_scalar, ENDOR_BF16)
DEQUANT_SCALAR(dequant_f32_scalar, ENDOR_F32)
static const dequant_fn dequant_scalars[3] = {dequant_f16_scalar, dequant_bf16_scalar, dequant_f32_scalar};

static dequant_fn pick_dequant(int dtype, int isa) {
    (void)isa;
#ifdef ENDOR_X86
    static const dequant_fn avx512[3] = {dequant_f16_avx512, dequant_bf16_avx512, dequant_f32_avx512};
    static const dequant_fn avx2[3] = {dequant_f16_avx2, dequant_bf16_avx2, dequant_f32_avx2};
    if (isa == ENDOR_ISA_AVX512) return avx512[dtype];
    if (isa == ENDOR_ISA_AVX2) return avx2[dtype];
#endif
    return dequant_scalars[dtype];
}

/* One run of equal scale: the vector kernel, or the scalar one where the scale is not finite */
static inline void dequant_run(dequant_fn vector, const int8_t *codes, int64_t n, float scale, void *out, int dtype,
                               uint16_t nan) {
    if ((f32_bits(scale) & 0x7F800000u) == 0x7F800000u) dequant_scalars[dtype](codes, n, scale, out, nan);
    else vector(codes, n, scale, out, nan);
}

/* int4 codes [v0, v0 + n) (nibble v % 2 of byte v / 2, two's complement) -> int8. Reads only the
 * bytes holding those nibbles. The pairs loop vectorises (gcc -O3) at each target's width. */
static inline int8_t nibble(unsigned x) { return (int8_t)((int)((x & 15u) ^ 8u) - 8); }

#define UNPACK_INT4(NAME, ATTRIBUTES)                                                              \
    ATTRIBUTES static void NAME(const uint8_t *restrict packed, int64_t v0, int64_t n, int8_t *restrict dst) { \
        int64_t i = 0;                                                                            \
        if (n > 0 && (v0 & 1)) dst[i++] = nibble(packed[v0 >> 1] >> 4);                          \
        const uint8_t *p = packed + ((v0 + i) >> 1);                                              \
        int64_t pairs = (n - i) >> 1;                                                             \
        int8_t *d = dst + i;                                                                      \
        for (int64_t j = 0; j < pairs; j++) {                                                     \
            d[2 * j] = nibble(p[j]);                                                              \
            d[2 * j + 1] = nibble(p[j] >> 4);                                                     \
        }                                                                                         \
        if ((n - i) & 1) dst[n - 1] = nibble(p[pairs]);                                           \
    }
UNPACK_INT4(unpack_int4_scalar, )
#ifdef ENDOR_X86
UNPACK_INT4(unpack_int4_avx2, __attribute__((target("avx2"))))
UNPACK_INT4(unpack_int4_avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))))
#endif

typedef void (*unpack_fn)(const uint8_t *restrict, int64_t, int64_t, int8_t *restrict);

#ifdef ENDOR_X86
static int has_avx512bw = 0;  /* set at load: ENDOR_ISA_AVX512 for 32-bit elements needs only AVX-512F */
#endif

static unpack_fn pick_unpack(int isa) {
    (void)isa;
#ifdef ENDOR_X86
    if (isa == ENDOR_ISA_AVX512 && has_avx512bw) return unpack_int4_avx512;
    if (isa == ENDOR_ISA_AVX512) return unpack_int4_avx2;
    if (isa == ENDOR_ISA_AVX2) return unpack_int4_avx2;
#endif
    return unpack_int4_scalar;
}

/* The codes of values [v0, v0 + n) as int8: in place for int8, unpacked into `staging` for int4. */
static inline const int8_t *codes_at(const uint8_t *values, unpack_fn unpack, int64_t v0, int64_t n,
                                     int8_t *staging) {
    if (unpack == NULL) return (const int8_t *)values + v0;
    unpack(values, v0, n, staging);
    return staging;
}

/* Decode blocks [first_block, last_block) of a quantized bitmap tensor (the whole tensor's arrays).
 * values: the codes (int8, or int4 nibbles: bits 8 / 4) of value_count kept elements; row_offsets
 * [rows + 1]; scales [num_scales] of the output dtype, groups_per_row per row; out: the whole
 * dense output. Returns 0, or an ENDOR_ERR_* code. */
int endor_dequant_expand(const uint8_t *bitmap, const int64_t *block_offsets, int64_t block_size, int64_t numel,
                         const uint8_t *values, int64_t value_count, int bits,
                         const int64_t *row_offsets, int64_t rows, int64_t cols,
                         const void *scales, int64_t num_scales, int64_t groups_per_row, int64_t group_size,
                         void *out, int dtype, int isa, uint16_t bf16_nan, int64_t first_block, int64_t last_block) {
    if (block_size < 32 || (block_size & 31) || numel < 0 || value_count < 0 || (bits != 8 && bits != 4) ||
        rows < 1 || cols < 1 || rows > numel / cols || rows * cols != numel || num_scales < 0 ||
        groups_per_row < 0 || group_size < 1 || dtype < ENDOR_F16 || dtype > ENDOR_F32 || first_block < 0 ||
        last_block < first_block || last_block > (numel + block_size - 1) / block_size)
        return ENDOR_ERR_ARGS;
    if (first_block == last_block) return 0;
    int elem_size = dtype == ENDOR_F32 ? 4 : 2;
    isa = endor_isa_for(isa, elem_size);
    dequant_fn dequant = pick_dequant(dtype, isa);
    unpack_fn unpack = bits == 4 ? pick_unpack(isa) : NULL;
    int8_t *codes_staging = malloc((size_t)block_size + (size_t)block_size * (size_t)elem_size);
    if (codes_staging == NULL) return ENDOR_ERR_MEMORY;
    uint8_t *staged = (uint8_t *)codes_staging + block_size;  /* the block's dequantized values */
    int result = 0;
    int64_t r = first_block * block_size / cols;  /* the row of the first element: values follow on */
    for (int64_t b = first_block; b < last_block && result == 0; b++) {
        int64_t begin = b * block_size, end = begin + block_size < numel ? begin + block_size : numel;
        int64_t v0 = block_offsets[b], v1 = block_offsets[b + 1];
        if (v0 < 0 || v1 < v0 || v1 > value_count || v1 - v0 > end - begin) { result = ENDOR_ERR_OFFSETS; break; }
        const int8_t *codes = codes_at(values, unpack, v0, v1 - v0, codes_staging);
        for (int64_t v = v0; v < v1;) {  /* runs of one scale: within a row and a group */
            while (r < rows && row_offsets[r + 1] <= v) r++;
            if (r >= rows || row_offsets[r] > v || row_offsets[r] < 0) { result = ENDOR_ERR_SCALE; break; }
            int64_t row_start = row_offsets[r], group = (v - row_start) / group_size;
            int64_t scale_index = r * groups_per_row + group;
            if (group >= groups_per_row || scale_index >= num_scales) { result = ENDOR_ERR_SCALE; break; }
            int64_t run_end = row_start + (group + 1) * group_size;
            if (run_end > row_offsets[r + 1]) run_end = row_offsets[r + 1];
            if (run_end > v1) run_end = v1;
            dequant_run(dequant, codes + (v - v0), run_end - v, load_scale(scales, scale_index, dtype),
                        staged + (v - v0) * elem_size, dtype, bf16_nan);
            v = run_end;
        }
        if (result) break;
        int64_t used = endor_expand(bitmap, staged, v1 - v0, out, begin, end, elem_size, isa);
        if (used < 0) result = ENDOR_ERR_MORE_BITS;
        else if (used != v1 - v0) result = ENDOR_ERR_FEWER_BITS;
    }
    free(codes_staging);
    return result;
}

/* Decode rows [first_row, last_row) of a quantized dense tensor: element (r, c) is code r*cols + c
 * with scale r * groups_per_row + c / group_size. Returns 0 or an ENDOR_ERR_* code. */
int endor_dequant_dense(const uint8_t *values, int64_t value_count, int bits, int64_t rows, int64_t cols,
                        const void *scales, int64_t num_scales, int64_t groups_per_row, int64_t group_size,
                        void *out, int dtype, int isa, uint16_t bf16_nan, int64_t first_row, int64_t last_row) {
    if (value_count < 0 || (bits != 8 && bits != 4) || rows < 0 || cols < 1 || rows > value_count / cols ||
        num_scales < 0 || groups_per_row < 0 || group_size < 1 || dtype < ENDOR_F16 || dtype > ENDOR_F32 ||
        first_row < 0 || last_row < first_row || last_row > rows)
        return ENDOR_ERR_ARGS;
    int elem_size = dtype == ENDOR_F32 ? 4 : 2;
    isa = endor_isa_for(isa, elem_size);
    dequant_fn dequant = pick_dequant(dtype, isa);
    unpack_fn unpack = bits == 4 ? pick_unpack(isa) : NULL;
    enum { CHUNK = 4096 };  /* int4 codes are unpacked this many at a time */
    int8_t staging[CHUNK];
    for (int64_t r = first_row; r < last_row; r++) {
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t c1 = cols - c0 > CHUNK ? c0 + CHUNK : cols;
            const int8_t *codes = codes_at(values, unpack, r * cols + c0, c1 - c0, staging);
            for (int64_t c = c0; c < c1;) {
                int64_t group = c / group_size, scale_index = r * groups_per_row + group;
                if (group >= groups_per_row || scale_index >= num_scales) return ENDOR_ERR_SCALE;
                int64_t run_end = (group + 1) * group_size < c1 ? (group + 1) * group_size : c1;
                dequant_run(dequant, codes + (c - c0), run_end - c, load_scale(scales, scale_index, dtype),
                            (uint8_t *)out + (r * cols + c) * elem_size, dtype, bf16_nan);
                c = run_end;
            }
        }
    }
    return 0;
}

/* Runs when the library is loaded (by import or by ctypes): tables and the CPU's features. */
__attribute__((constructor)) static void endor_expand_init(void) {
#ifdef ENDOR_X86
    build_tables();
    __builtin_cpu_init();
    /* F16C (fp16 conversion) and AVX-512 VL (16-bit masked stores) come with every CPU that has the
     * rest; checked all the same, since the dequantizing decode uses them */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("f16c"))
        best_isa16 = best_isa32 = ENDOR_ISA_AVX2;
    if (best_isa32 == ENDOR_ISA_AVX2 && __builtin_cpu_supports("avx512f")) best_isa32 = ENDOR_ISA_AVX512;
    if (best_isa32 == ENDOR_ISA_AVX512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vbmi2"))
        best_isa16 = ENDOR_ISA_AVX512;
    has_avx512bw = best_isa32 == ENDOR_ISA_AVX512 && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl");
#endif
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_expand",
                                    "Endor bitmap expansion (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__expand(void) { return PyModule_Create(&module); }

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
 * Built as a Python extension module only so that pip builds it at install; Python reaches the
 * functions through ctypes (endor_ray.format.cpu_decode). On a CPU other than x86-64 only the
 * scalar loop is built.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENDOR_X86 1
#include <immintrin.h>
#endif

enum { ENDOR_ISA_AUTO = -1, ENDOR_ISA_SCALAR = 0, ENDOR_ISA_AVX2 = 1, ENDOR_ISA_AVX512 = 2 };

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

/* Decode elements [begin, end) (begin a multiple of 32) of a tensor of `elem_size`-byte elements. */
int64_t endor_expand(const uint8_t *bitmap, const void *values, int64_t nnz_avail, void *out,
                     int64_t begin, int64_t end, int elem_size, int isa) {
    if (begin < 0 || end < begin || (begin & 31) || nnz_avail < 0) return -2;
    if (isa == ENDOR_ISA_AUTO || isa > endor_best_isa(elem_size)) isa = endor_best_isa(elem_size);
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

/* Runs when the library is loaded (by import or by ctypes): tables and the CPU's features. */
__attribute__((constructor)) static void endor_expand_init(void) {
#ifdef ENDOR_X86
    build_tables();
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) best_isa16 = best_isa32 = ENDOR_ISA_AVX2;
    if (__builtin_cpu_supports("avx512f")) best_isa32 = ENDOR_ISA_AVX512;
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2")) best_isa16 = ENDOR_ISA_AVX512;
#endif
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_expand",
                                    "Endor bitmap expansion (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__expand(void) { return PyModule_Create(&module); }

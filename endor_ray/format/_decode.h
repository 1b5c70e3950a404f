/* What the CPU decoders (_expand.c, _gguf.c) share: the codes ctypes passes (ISA, output dtype,
 * errors) and the exact conversions between fp32 and fp16 / bf16 (round to nearest even, as torch). */
#ifndef ENDOR_DECODE_H
#define ENDOR_DECODE_H
#include <stdint.h>
#include <string.h>

enum { ENDOR_ISA_AUTO = -1, ENDOR_ISA_SCALAR = 0, ENDOR_ISA_AVX2 = 1, ENDOR_ISA_AVX512 = 2 };
enum { ENDOR_F16 = 0, ENDOR_BF16 = 1, ENDOR_F32 = 2 };  /* output dtype codes */
enum {
    ENDOR_ERR_MORE_BITS = -1,    /* the bitmap sets more bits than the block has values */
    ENDOR_ERR_ARGS = -2,         /* arguments that cannot describe a tensor */
    ENDOR_ERR_OFFSETS = -3,      /* block offsets outside the values, decreasing, or more than the block */
    ENDOR_ERR_FEWER_BITS = -4,   /* the bitmap sets fewer bits than the block has values */
    ENDOR_ERR_SCALE = -5,        /* a value whose row (row_offsets) or scale lies outside its array */
    ENDOR_ERR_MEMORY = -6,
    ENDOR_ERR_SHORT = -7,        /* GGUF blocks: fewer bytes than rows x cols of the type need */
};

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp16 -> fp32, exact, as vcvtph2ps does (a NaN keeps its sign and payload and comes out quiet) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    if (exponent == 0x1F) return bits_f32(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0));
    if (exponent == 0) return bits_f32(sign | f32_bits((float)mantissa * 0x1p-24f));  /* exact: < 2^10 */
    return bits_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* fp32 -> fp16 rounded to nearest even, as vcvtps2ph does (NaN: sign | quiet | top payload bits) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520 rounds to infinity */
    if (a < 0x38800000u) {  /* below 2^-14: a subnormal half; the float add rounds (nearest even) */
        float magic = 0.5f;  /* exponent 126: one unit in its last place is 2^-24, a half's subnormal step */
        return (uint16_t)(sign | (f32_bits(bits_f32(a) + magic) - f32_bits(magic)));
    }
    a += 0xC8000FFFu + ((a >> 13) & 1);  /* rebias the exponent (-112 << 23), round to nearest even */
    return (uint16_t)(sign | (a >> 13));
}

/* fp32 -> bf16 rounded to nearest even; NaN -> `nan` (torch's choice, which varies: see cpu_decode) */
static inline uint16_t f32_to_bf16(float f, uint16_t nan) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return nan;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

#endif /* ENDOR_DECODE_H */

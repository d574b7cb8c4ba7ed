/* bf16 and fp32 element access shared by the CPU kernels (cpu_*.c): a bf16 is the top half of an
 * fp32; stores round to nearest even, as torch does, and keep NaN a NaN. */
#ifndef PDKERNELS_CPU_BF16_H
#define PDKERNELS_CPU_BF16_H

#include <stdint.h>

typedef union { uint32_t u; float f; } bits32;

static inline float load_bf16(const uint16_t *p) { bits32 x; x.u = (uint32_t)(*p) << 16; return x.f; }

static inline uint16_t to_bf16(float f) {
    bits32 x; x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x.u >> 16) | 0x40u);   /* NaN */
    x.u += 0x7fffu + ((x.u >> 16) & 1u);                                              /* nearest even */
    return (uint16_t)(x.u >> 16);
}

static inline float round_bf16(float f) { bits32 x; x.u = (uint32_t)to_bf16(f) << 16; return x.f; }
static inline void store_bf16(uint16_t *p, float f) { *p = to_bf16(f); }
static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float f) { *p = f; }
static inline float round_f32(float f) { return f; }

#endif

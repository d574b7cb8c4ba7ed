/* The causal softmax of a block of prefill attention scores, in one pass (engine/prefill_attention.py).
 *
 * A block of `rows` queries starting at position `start` has scores against keys 0 .. start+rows-1,
 * laid out [kv_heads, rows, group, cols] (cols = start + rows; `group` query heads per kv head).
 * Query i may see keys 0 ..= start + i. In torch that is a masked_fill of the block's diagonal (a
 * strided, broadcast write: 0.4 ms per block on the EPYC) then a softmax; here each row is read,
 * its visible part turned into probabilities in fp32, its hidden part zeroed, in place.
 * Returns 0, or -1 when scratch memory fails.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_bf16.h"

/* e^x for x <= 0 as 2^n * 2^f, 2^f by its Taylor polynomial (relative error < 2e-7 on |f| <= 1/2):
 * no libm call, so the loop vectorizes whole (libmvec's expf is 2.5x the cost). The bf16 kernel's
 * probabilities are rounded to 8 bits of mantissa; the fp32 kernel keeps expf. */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504f, n = floorf(t + 0.5f), f = t - n;
    const float p = 1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f + f * (0.00961812911f
                    + f * (0.00133335581f + f * 0.000154035304f)))));
    bits32 scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

#define DEFINE_CAUSAL_SOFTMAX(NAME, T, LOAD, STORE, EXP)                                            \
int NAME(T *scores, int64_t kv_heads, int64_t rows, int64_t group, int64_t start) {                 \
    const int64_t cols = start + rows;                                                             \
    float *tmp = malloc(sizeof(float) * (size_t)cols);                                             \
    if (tmp == NULL) return -1;                                                                    \
    for (int64_t g = 0; g < kv_heads; g++)                                                         \
        for (int64_t i = 0; i < rows; i++)                                                         \
            for (int64_t j = 0; j < group; j++) {                                                  \
                T *s = scores + ((g * rows + i) * group + j) * cols;                               \
                const int64_t n = start + i + 1;   /* the keys query i sees */                     \
                float m = LOAD(s);                                                                 \
                for (int64_t t = 1; t < n; t++) { const float x = LOAD(s + t); m = x > m ? x : m; } \
                float sum = 0.0f;                                                                  \
                for (int64_t t = 0; t < n; t++) { tmp[t] = EXP(LOAD(s + t) - m); sum += tmp[t]; }   \
                const float inv = 1.0f / sum;                                                      \
                for (int64_t t = 0; t < n; t++) STORE(s + t, tmp[t] * inv);                        \
                for (int64_t t = n; t < cols; t++) STORE(s + t, 0.0f);                             \
            }                                                                                      \
    free(tmp);                                                                                     \
    return 0;                                                                                      \
}

DEFINE_CAUSAL_SOFTMAX(causal_softmax_bf16, uint16_t, load_bf16, store_bf16, exp_neg)
DEFINE_CAUSAL_SOFTMAX(causal_softmax_f32, float, load_f32, store_f32, expf)

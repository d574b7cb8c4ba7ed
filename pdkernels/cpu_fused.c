/* Small per-token ops of a decoder layer, one call each, for a CPU core.
 *
 * A decode step at small batch is made of tiny tensors: an RMSNorm over 1-32 rows of 576 is
 * eight torch ops (float, pow, mean, add, rsqrt, mul, cast, scale) at 3-10 us of dispatch each,
 * for under a microsecond of arithmetic. Here each op is one pass over its rows, and the model
 * dtype's arithmetic is reproduced step by step: every intermediate that the torch code rounds to
 * the model dtype is rounded here too (bf16: to nearest even), so that rotary and the residual
 * add give the torch code's bits exactly, and RMSNorm differs only in the order of its sum.
 * Built without -ffast-math and without FMA contraction (pdkernels/cpu_native.py), for the same
 * reason.
 *
 *   add_rmsnorm:  [s = round(h + a), written to s_out; else s = h]  out = w * round(s * rsqrt(mean(s^2) + eps))
 *                 h, a, s_out, out: [rows, dim] with row strides; w: [dim]; sums in fp32
 *   rope:         x[t, h] = x * cos[pos[t]] + rotate_half(x) * sin[pos[t]], in place,
 *                 x: [tokens, heads, head_dim] with a token stride; cos/sin: [positions, head_dim]
 *                 in the model dtype; rotate_half(x) = (-x[half:], x[:half])
 *   store_kv:     k_cache[slot] = k[t], v_cache[slot] = v[t] for slot = slots[t] >= 0 (a cache row is
 *                 [kv_heads, head_dim], contiguous), element size `elem` bytes
 * Return 0, or -2 when a slot or position is outside its table (nothing written out of bounds).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"

/* 16 partial sums, one per vector lane: a sum the compiler may vectorize without reassociating */
#define SUM_SQUARES(T, LOAD, x, n, out) do {                                                       \
    float acc_[16] = {0};                                                                          \
    int64_t d_ = 0;                                                                                \
    for (; d_ + 16 <= (n); d_ += 16)                                                               \
        for (int j_ = 0; j_ < 16; j_++) { const float v_ = LOAD((x) + d_ + j_); acc_[j_] += v_ * v_; } \
    for (; d_ < (n); d_++) { const float v_ = LOAD((x) + d_); acc_[0] += v_ * v_; }                \
    (out) = 0.0f;                                                                                  \
    for (int j_ = 0; j_ < 16; j_++) (out) += acc_[j_];                                             \
} while (0)

#define DEFINE_ADD_RMSNORM(NAME, T, LOAD, STORE, ROUND)                                             \
int NAME(const T *h, int64_t h_stride, const T *a, int64_t a_stride, T *s_out, int64_t s_stride,      \
         const T *w, T *out, int64_t out_stride, int64_t rows, int64_t dim, float eps) {           \
    for (int64_t r = 0; r < rows; r++) {                                                           \
        const T *s = h + r * h_stride;                                                             \
        if (a != NULL) {                                                                           \
            T *sr = s_out + r * s_stride;                                                          \
            for (int64_t d = 0; d < dim; d++) STORE(sr + d, LOAD(s + d) + LOAD(a + r * a_stride + d)); \
            s = sr;                                                                                \
        }                                                                                          \
        float ss;                                                                                  \
        SUM_SQUARES(T, LOAD, s, dim, ss);                                                          \
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);                                     \
        T *o = out + r * out_stride;                                                               \
        for (int64_t d = 0; d < dim; d++) STORE(o + d, LOAD(w + d) * ROUND(LOAD(s + d) * inv));     \
    }                                                                                              \
    return 0;                                                                                      \
}

DEFINE_ADD_RMSNORM(add_rmsnorm_bf16, uint16_t, load_bf16, store_bf16, round_bf16)
DEFINE_ADD_RMSNORM(add_rmsnorm_f32, float, load_f32, store_f32, round_f32)

#define DEFINE_ROPE(NAME, T, LOAD, STORE, ROUND)                                                    \
int NAME(T *x, int64_t token_stride, int64_t tokens, int64_t heads, int64_t head_dim,              \
         const int64_t *positions, const T *cos, const T *sin, int64_t num_positions) {            \
    const int64_t half = head_dim / 2;                                                             \
    for (int64_t t = 0; t < tokens; t++)                                                           \
        if (positions[t] < 0 || positions[t] >= num_positions) return -2;                          \
    for (int64_t t = 0; t < tokens; t++) {                                                         \
        const T *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;            \
        for (int64_t h = 0; h < heads; h++) {                                                      \
            T *v = x + t * token_stride + h * head_dim;                                            \
            for (int64_t d = 0; d < half; d++) {                                                   \
                const float lo = LOAD(v + d), hi = LOAD(v + d + half);                             \
                /* x * cos + rotate_half(x) * sin, each product rounded as torch rounds it */      \
                const float new_lo = ROUND(lo * LOAD(c + d)) + ROUND(-hi * LOAD(s + d));           \
                const float new_hi = ROUND(hi * LOAD(c + d + half)) + ROUND(lo * LOAD(s + d + half)); \
                STORE(v + d, new_lo);                                                              \
                STORE(v + d + half, new_hi);                                                       \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    return 0;                                                                                      \
}

DEFINE_ROPE(rope_bf16, uint16_t, load_bf16, store_bf16, round_bf16)
DEFINE_ROPE(rope_f32, float, load_f32, store_f32, round_f32)

int store_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *k_cache, char *v_cache,
             const int64_t *slots, int64_t tokens, int64_t row_bytes, int64_t num_slots, int64_t elem) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return -2;
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;   /* padding: not cached */
        memcpy(k_cache + slot * row_bytes, k + t * k_stride * elem, (size_t)row_bytes);
        memcpy(v_cache + slot * row_bytes, v + t * v_stride * elem, (size_t)row_bytes);
    }
    return 0;
}

/* Decode attention over the paged KV cache on a CPU core: one pass per sequence.
 *
 * The torch reference (paged_attention.py) gathers every sequence's blocks into a padded
 * buffer, then runs two bmms of 3 query rows each per (sequence, kv head): on one core at
 * batch 12 of mixed contexts that is 2.2 ms per layer for 4 MB of KV, 5x the time to read it.
 * Here each sequence reads its K and V blocks in place, once, every kv head of a cache row
 * together (blocks are [block_size, kv_heads, head_dim]: one contiguous run each):
 *   1. scores[g][t] = q[g] . k[t] * scale   for the group's g query heads
 *   2. softmax over t, per query head (fp32)
 *   3. out[g] = sum_t p[g][t] v[t]          fp32 accumulation, one rounding at the end
 *
 * Layouts (checked by the caller, pdkernels/cpu_native.py):
 *   q, out:        [batch, heads, head_dim], contiguous
 *   k/v cache:     [num_blocks, block_size, kv_heads, head_dim], contiguous
 *   block_tables:  [batch, bt_stride] int32; context_lens: [batch] int32, each >= 1
 * Head h reads kv head h / (heads / kv_heads). Returns 0; -1 when scratch memory fails; -2 when
 * a context needs more blocks than its table row has, or a table entry is not a cache block
 * (nothing is read out of bounds: the caller raises instead).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "cpu_bf16.h"

/* Asks for the next block while this one is computed: the blocks of a sequence are scattered
 * over the cache, where the hardware prefetcher does not follow. */
static inline void prefetch_block(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

#define DEFINE_DECODE_ATTENTION(NAME, T, LOAD, STORE)                                               \
int NAME(const T *q, const T *k_cache, const T *v_cache, const int32_t *block_tables,              \
         const int32_t *context_lens, T *out, int64_t batch, int64_t heads, int64_t kv_heads,      \
         int64_t head_dim, int64_t block_size, int64_t bt_stride, int64_t num_blocks, float scale) { \
    const int64_t group = heads / kv_heads, row = kv_heads * head_dim, block = block_size * row;  \
    int64_t max_ctx = 1;                                                                           \
    for (int64_t b = 0; b < batch; b++) {                                                          \
        const int64_t n = context_lens[b];                                                         \
        if (n < 1 || n > bt_stride * block_size) return -2;                                        \
        for (int64_t i = 0; i < (n + block_size - 1) / block_size; i++) {                          \
            const int32_t blk = block_tables[b * bt_stride + i];                                   \
            if (blk < 0 || blk >= num_blocks) return -2;                                           \
        }                                                                                          \
        if (n > max_ctx) max_ctx = n;                                                              \
    }                                                                                              \
    /* scores [heads][max_ctx], then q and acc [heads][head_dim], then one cache row [row] */     \
    float *scores = malloc(sizeof(float) * (size_t)(heads * max_ctx + 2 * heads * head_dim + row)); \
    if (scores == NULL) return -1;                                                                 \
    float *qf = scores + heads * max_ctx, *acc = qf + heads * head_dim, *kv = acc + heads * head_dim; \
    for (int64_t b = 0; b < batch; b++) {                                                          \
        const int64_t n = context_lens[b], nblocks = (n + block_size - 1) / block_size;            \
        const int32_t *table = block_tables + b * bt_stride;                                       \
        for (int64_t i = 0; i < heads * head_dim; i++) qf[i] = LOAD(q + b * heads * head_dim + i) * scale; \
        /* 1. scores: each block read once, every kv head of a row together (one contiguous run) */ \
        for (int64_t i = 0; i < nblocks; i++) {                                                    \
            const T *base = k_cache + (int64_t)table[i] * block;                                   \
            if (i + 1 < nblocks) prefetch_block(k_cache + (int64_t)table[i + 1] * block, block * (int64_t)sizeof(T)); \
            const int64_t rows = n - i * block_size < block_size ? n - i * block_size : block_size; \
            for (int64_t j = 0; j < rows; j++) {                                                   \
                const int64_t t = i * block_size + j;                                              \
                for (int64_t d = 0; d < row; d++) kv[d] = LOAD(base + j * row + d);                \
                for (int64_t h = 0; h < heads; h++) {                                              \
                    const float *qh = qf + h * head_dim, *kh = kv + (h / group) * head_dim;        \
                    float s = 0.0f;                                                                \
                    for (int64_t d = 0; d < head_dim; d++) s += qh[d] * kh[d];                     \
                    scores[h * max_ctx + t] = s;                                                   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        /* 2. softmax per query head, in fp32 */                                                   \
        for (int64_t h = 0; h < heads; h++) {                                                      \
            float *s = scores + h * max_ctx, m = s[0], sum = 0.0f;                                 \
            for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;                               \
            for (int64_t t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }                \
            const float inv = 1.0f / sum;                                                          \
            for (int64_t t = 0; t < n; t++) s[t] *= inv;                                           \
        }                                                                                          \
        /* 3. the weighted sum of V, block by block as for K */                                    \
        memset(acc, 0, sizeof(float) * (size_t)(heads * head_dim));                                \
        for (int64_t i = 0; i < nblocks; i++) {                                                    \
            const T *base = v_cache + (int64_t)table[i] * block;                                   \
            if (i + 1 < nblocks) prefetch_block(v_cache + (int64_t)table[i + 1] * block, block * (int64_t)sizeof(T)); \
            const int64_t rows = n - i * block_size < block_size ? n - i * block_size : block_size; \
            for (int64_t j = 0; j < rows; j++) {                                                   \
                const int64_t t = i * block_size + j;                                              \
                for (int64_t d = 0; d < row; d++) kv[d] = LOAD(base + j * row + d);                \
                for (int64_t h = 0; h < heads; h++) {                                              \
                    const float p = scores[h * max_ctx + t], *vh = kv + (h / group) * head_dim;    \
                    float *ah = acc + h * head_dim;                                                \
                    for (int64_t d = 0; d < head_dim; d++) ah[d] += p * vh[d];                     \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int64_t i = 0; i < heads * head_dim; i++) STORE(out + b * heads * head_dim + i, acc[i]); \
    }                                                                                              \
    free(scores);                                                                                  \
    return 0;                                                                                      \
}

DEFINE_DECODE_ATTENTION(decode_attention_bf16_generic, uint16_t, load_bf16, store_bf16)
DEFINE_DECODE_ATTENTION(paged_decode_attention_f32, float, load_f32, store_f32)

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* Lane i of the result = the sum of v[i]'s 16 lanes: a transpose folded into the adds. */
static inline __m512 sum16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int k = 0; k < 8; k++)
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) {
        const __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
        x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xdd));
    const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xdd));
}

/* One sequence's attention for head_dim = 32 * NQ, in registers: scores 16 tokens at a time, q . k
 * straight from bf16 (vdpbf16ps: exact products, fp32 sums), the 16 dot products reduced together
 * (sum16), not one by one; softmax and the weighted sum of V in fp32, one query head at a time
 * (its accumulators stay in registers; the sequence's V for a kv head stays in L1 across them). */
#define DEFINE_BF16_SEQUENCE(NAME, NQ)                                                             \
static void NAME(const uint16_t *qb, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, \
                 int64_t n, uint16_t *ob, int64_t heads, int64_t group, int64_t block_size, int64_t row, \
                 float scale, float *scores, int64_t stride) {                                     \
    const int64_t head_dim = 32 * NQ, block = block_size * row;                                    \
    for (int64_t t0 = 0; t0 < n; t0 += 16) {                                                       \
        const uint16_t *krow[16];                                                                  \
        for (int i = 0; i < 16; i++) {   /* past the context: token 0 again (read, never used) */  \
            const int64_t t = t0 + i < n ? t0 + i : 0, at = (int64_t)table[t / block_size] * block + (t % block_size) * row; \
            krow[i] = k_cache + at;                                                                \
            /* the blocks are scattered: ask for this chunk's V rows and the next chunk's K rows now */ \
            prefetch_block(v_cache + at, row * (int64_t)sizeof(uint16_t));                        \
            const int64_t u = t0 + 16 + i;                                                         \
            if (u < n)                                                                             \
                prefetch_block(k_cache + (int64_t)table[u / block_size] * block + (u % block_size) * row, \
                               row * (int64_t)sizeof(uint16_t));                                   \
        }                                                                                          \
        for (int64_t h = 0; h < heads; h++) {                                                      \
            const int64_t off = (h / group) * head_dim;                                            \
            __m512bh qv[NQ];                                                                       \
            for (int c = 0; c < NQ; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qb + h * head_dim + 32 * c); \
            __m512 acc[16];                                                                        \
            for (int i = 0; i < 16; i++) {                                                         \
                acc[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(krow[i] + off)); \
                for (int c = 1; c < NQ; c++)                                                       \
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv[c], (__m512bh)_mm512_loadu_si512(krow[i] + off + 32 * c)); \
            }                                                                                      \
            _mm512_storeu_ps(scores + h * stride + t0, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale))); \
        }                                                                                          \
    }                                                                                              \
    for (int64_t h = 0; h < heads; h++) {                                                          \
        float *s = scores + h * stride, m = s[0], sum = 0.0f;                                      \
        for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;                                   \
        for (int64_t t = 0; t < n; t++) { s[t] = expf(s[t] - m); sum += s[t]; }                    \
        const float inv = 1.0f / sum;                                                              \
        __m512 acc[2 * NQ];                                                                        \
        for (int c = 0; c < 2 * NQ; c++) acc[c] = _mm512_setzero_ps();                             \
        const int64_t off = (h / group) * head_dim;                                                \
        for (int64_t i = 0; i * block_size < n; i++) {                                             \
            const uint16_t *base = v_cache + (int64_t)table[i] * block + off;                      \
            const int64_t rows = n - i * block_size < block_size ? n - i * block_size : block_size; \
            for (int64_t j = 0; j < rows; j++) {                                                   \
                const __m512 p = _mm512_set1_ps(s[i * block_size + j]);                            \
                for (int c = 0; c < 2 * NQ; c++)                                                   \
                    acc[c] = _mm512_fmadd_ps(p, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(     \
                        (const __m256i *)(base + j * row + 16 * c))), acc[c]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int c = 0; c < 2 * NQ; c++)                                                           \
            _mm256_storeu_si256((__m256i *)(ob + h * head_dim + 16 * c),                           \
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], _mm512_set1_ps(inv)))); \
    }                                                                                              \
}

DEFINE_BF16_SEQUENCE(sequence_bf16_d32, 1)
DEFINE_BF16_SEQUENCE(sequence_bf16_d64, 2)
DEFINE_BF16_SEQUENCE(sequence_bf16_d128, 4)

/* bf16 with AVX512-BF16 at head_dim 32, 64 or 128: 2-3x the generic loop's speed on the EPYC. */
int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, uint16_t *out,
                                int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, int64_t bt_stride, int64_t num_blocks, float scale) {
    typeof(sequence_bf16_d64) *seq = head_dim == 32 ? sequence_bf16_d32 : head_dim == 64 ? sequence_bf16_d64
                                     : head_dim == 128 ? sequence_bf16_d128 : NULL;
    if (seq == NULL)
        return decode_attention_bf16_generic(q, k_cache, v_cache, block_tables, context_lens, out, batch, heads,
                                             kv_heads, head_dim, block_size, bt_stride, num_blocks, scale);
    int64_t max_ctx = 1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t n = context_lens[b];
        if (n < 1 || n > bt_stride * block_size) return -2;
        for (int64_t i = 0; i < (n + block_size - 1) / block_size; i++) {
            const int32_t blk = block_tables[b * bt_stride + i];
            if (blk < 0 || blk >= num_blocks) return -2;
        }
        if (n > max_ctx) max_ctx = n;
    }
    const int64_t stride = (max_ctx + 15) / 16 * 16;   /* whole chunks of 16 scores per head */
    float *scores = malloc(sizeof(float) * (size_t)(heads * stride));
    if (scores == NULL) return -1;
    for (int64_t b = 0; b < batch; b++)
        seq(q + b * heads * head_dim, k_cache, v_cache, block_tables + b * bt_stride, context_lens[b],
            out + b * heads * head_dim, heads, heads / kv_heads, block_size, kv_heads * head_dim, scale, scores, stride);
    free(scores);
    return 0;
}
#else
int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int32_t *block_tables, const int32_t *context_lens, uint16_t *out,
                                int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                int64_t block_size, int64_t bt_stride, int64_t num_blocks, float scale) {
    return decode_attention_bf16_generic(q, k_cache, v_cache, block_tables, context_lens, out, batch, heads,
                                         kv_heads, head_dim, block_size, bt_stride, num_blocks, scale);
}
#endif

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

typedef union { uint32_t u; float f; } bits32;

static inline float load_bf16(const uint16_t *p) { bits32 x; x.u = (uint32_t)(*p) << 16; return x.f; }

static inline void store_bf16(uint16_t *p, float f) {
    bits32 x; x.f = f;
    if ((x.u & 0x7fffffffu) > 0x7f800000u) { *p = (uint16_t)((x.u >> 16) | 0x40u); return; }  /* NaN */
    x.u += 0x7fffu + ((x.u >> 16) & 1u);                                                    /* nearest even */
    *p = (uint16_t)(x.u >> 16);
}

static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float f) { *p = f; }

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

DEFINE_DECODE_ATTENTION(paged_decode_attention_bf16, uint16_t, load_bf16, store_bf16)
DEFINE_DECODE_ATTENTION(paged_decode_attention_f32, float, load_f32, store_f32)

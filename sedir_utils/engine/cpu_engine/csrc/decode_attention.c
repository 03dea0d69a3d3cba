/* Attention of one decoded token per row against that row's own cached keys and values (CPU).
 *
 * Layouts (contiguous): q and out [batch, kv_heads, group, dim]; k and v [batch, kv_heads, columns, dim];
 * counts[b] is how many leading columns row b attends to (its cached tokens plus the new one). Grouped
 * query heads share their key/value head, so each key row is read once for the whole group; columns past
 * a row's count are never read. Scores, softmax and the weighted sum of values run in float32.
 *
 * Built and loaded at run time by sedir_utils/engine/cpu_engine/kernels.py (gcc -O3 -march=native -fopenmp); the loops
 * are written for the compiler's auto-vectoriser (dim is the innermost, unit-stride loop; the dot
 * product's sum is marked as a SIMD reduction, which plain -O3 would not reorder).
 *
 * Denormals: every thread of a call flushes them to zero (x86's MXCSR FTZ and DAZ bits) for the call
 * and restores its own mode after, so the output does not depend on which thread takes a row nor on the
 * caller's mode (torch.set_flush_denormal sets only the calling thread's), and nothing else changes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#define FLOAT_MODE_ENTER unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040u); /* FTZ|DAZ */
#define FLOAT_MODE_LEAVE _mm_setcsr(saved_csr);
#else /* elsewhere the caller's mode holds, the same in every thread only if the caller made it so */
#define FLOAT_MODE_ENTER
#define FLOAT_MODE_LEAVE
#endif

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                             \
int NAME(const T *q, const T *k, const T *v, const int64_t *counts, T *out, int64_t batch,            \
         int64_t kv_heads, int64_t group, int64_t columns, int64_t dim, float scale, int threads) {     \
    int failed = 0;                                                                                     \
    _Pragma("omp parallel num_threads(threads)")                                                        \
    {                                                                                                   \
    FLOAT_MODE_ENTER                                                                                    \
    _Pragma("omp for collapse(2) schedule(dynamic)")                                                    \
    for (int64_t b = 0; b < batch; b++) {                                                               \
        for (int64_t h = 0; h < kv_heads; h++) {                                                        \
            int64_t n = counts[b] < columns ? counts[b] : columns;                                      \
            if (n < 1) n = 1;                                                                           \
            float *work = malloc(sizeof(float) * (size_t)(2 * group * dim + dim + group * n));          \
            if (!work) { failed = 1; continue; }                                                        \
            float *qf = work, *acc = qf + group * dim, *row = acc + group * dim;                        \
            float *scores = row + dim;                                                                  \
            const T *qh = q + (b * kv_heads + h) * group * dim;                                         \
            const T *kh = k + (b * kv_heads + h) * columns * dim;                                       \
            const T *vh = v + (b * kv_heads + h) * columns * dim;                                       \
            for (int64_t i = 0; i < group * dim; i++) { qf[i] = LOAD(qh[i]) * scale; acc[i] = 0.0f; }  \
            for (int64_t j = 0; j < n; j++) {                                                           \
                for (int64_t d = 0; d < dim; d++) row[d] = LOAD(kh[j * dim + d]);                       \
                for (int64_t g = 0; g < group; g++) {                                                   \
                    float s = 0.0f;                                                                     \
                    _Pragma("omp simd reduction(+:s)")                                                  \
                    for (int64_t d = 0; d < dim; d++) s += qf[g * dim + d] * row[d];                    \
                    scores[g * n + j] = s;                                                              \
                }                                                                                       \
            }                                                                                           \
            for (int64_t g = 0; g < group; g++) {                                                       \
                float *sg = scores + g * n, top = sg[0], total = 0.0f;                                  \
                for (int64_t j = 1; j < n; j++) top = sg[j] > top ? sg[j] : top;                        \
                for (int64_t j = 0; j < n; j++) { sg[j] = expf(sg[j] - top); total += sg[j]; }          \
                for (int64_t j = 0; j < n; j++) sg[j] /= total;                                         \
            }                                                                                           \
            for (int64_t j = 0; j < n; j++) {                                                           \
                for (int64_t d = 0; d < dim; d++) row[d] = LOAD(vh[j * dim + d]);                       \
                for (int64_t g = 0; g < group; g++) {                                                   \
                    float p = scores[g * n + j];                                                        \
                    for (int64_t d = 0; d < dim; d++) acc[g * dim + d] += p * row[d];                   \
                }                                                                                       \
            }                                                                                           \
            T *oh = out + (b * kv_heads + h) * group * dim;                                             \
            for (int64_t i = 0; i < group * dim; i++) oh[i] = STORE(acc[i]);                            \
            free(work);                                                                                 \
        }                                                                                               \
    }                                                                                                   \
    FLOAT_MODE_LEAVE                                                                                    \
    }                                                                                                   \
    return failed;                                                                                      \
}

#define IDENTITY(x) (x)
DEFINE_KERNEL(generic_bf16, uint16_t, bf16_to_float, float_to_bf16)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
/* bf16 with AVX512-BF16, for dim a multiple of 32 and group * dim / 16 <= 32 (accumulators in registers'
 * reach): dot products with vdpbf16ps straight from the bf16 data, values widened 16 at a time. */
static int fast_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *counts, uint16_t *out,
                     int64_t batch, int64_t kv_heads, int64_t group, int64_t columns, int64_t dim, float scale,
                     int threads) {
    int failed = 0;
    const int64_t chunks = dim / 32, lanes = dim / 16;
    #pragma omp parallel num_threads(threads)
    {
    FLOAT_MODE_ENTER
    #pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t n = counts[b] < columns ? counts[b] : columns;
            if (n < 1) n = 1;
            float *scores = malloc(sizeof(float) * (size_t)(group * n));
            if (!scores) { failed = 1; continue; }
            const uint16_t *qh = q + (b * kv_heads + h) * group * dim;
            const uint16_t *kh = k + (b * kv_heads + h) * columns * dim;
            const uint16_t *vh = v + (b * kv_heads + h) * columns * dim;
            __m512i qv[64];
            for (int64_t g = 0; g < group; g++)
                for (int64_t c = 0; c < chunks; c++) qv[g * chunks + c] = _mm512_loadu_si512(qh + g * dim + c * 32);
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *row = kh + j * dim;
                for (int64_t g = 0; g < group; g++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t c = 0; c < chunks; c++)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)qv[g * chunks + c], (__m512bh)_mm512_loadu_si512(row + c * 32));
                    scores[g * n + j] = _mm512_reduce_add_ps(acc) * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *sg = scores + g * n, top = sg[0], total = 0.0f;
                for (int64_t j = 1; j < n; j++) top = sg[j] > top ? sg[j] : top;
                for (int64_t j = 0; j < n; j++) { sg[j] = expf(sg[j] - top); total += sg[j]; }
                for (int64_t j = 0; j < n; j++) sg[j] /= total;
            }
            __m512 acc[32];
            for (int64_t i = 0; i < group * lanes; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *row = vh + j * dim;
                for (int64_t c = 0; c < lanes; c++) {
                    __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + c * 16))), 16));
                    for (int64_t g = 0; g < group; g++)
                        acc[g * lanes + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + j]), x, acc[g * lanes + c]);
                }
            }
            uint16_t *oh = out + (b * kv_heads + h) * group * dim;
            for (int64_t i = 0; i < group * lanes; i++) {
                float tmp[16];
                _mm512_storeu_ps(tmp, acc[i]);
                for (int t = 0; t < 16; t++) oh[i * 16 + t] = float_to_bf16(tmp[t]);
            }
            free(scores);
        }
    }
    FLOAT_MODE_LEAVE
    }
    return failed;
}
#endif

int decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *counts,
                          uint16_t *out, int64_t batch, int64_t kv_heads, int64_t group, int64_t columns,
                          int64_t dim, float scale, int threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (dim % 32 == 0 && group * dim / 32 <= 64 && group * dim / 16 <= 32)
        return fast_bf16(q, k, v, counts, out, batch, kv_heads, group, columns, dim, scale, threads);
#endif
    return generic_bf16(q, k, v, counts, out, batch, kv_heads, group, columns, dim, scale, threads);
}

DEFINE_KERNEL(decode_attention_f32, float, IDENTITY, IDENTITY)

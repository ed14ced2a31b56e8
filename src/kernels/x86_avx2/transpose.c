/*
 * Matrix transpose, AVX2: 8 x 8 blocks transposed in registers (unpack,
 * shuffle, then swap the 128-bit halves), the edges by the generic loop.
 * A copy, so every element is exact. Used at the avx2 level to turn A B and
 * A^T B into A B^T for oneDNN (onednn.c).
 * Dimension key: rows, cols of src; ld its row stride.
 */
#include "avx2.h"

#include <immintrin.h>

static inline void block8(float *dst, int64_t ldd, const float *src, int64_t lds) {
    __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
    __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
    __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
    __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}

void moe__avx2_transpose(float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
    enum { T = 32 }; /* tiles of 32 x 32: 4 x 4 register blocks, in cache on both sides */
    int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
    for (int64_t i0 = 0; i0 < r8; i0 += T)
        for (int64_t j0 = 0; j0 < c8; j0 += T)
            for (int64_t i = i0; i < i0 + T && i < r8; i += 8)
                for (int64_t j = j0; j < j0 + T && j < c8; j += 8) block8(dst + j * rows + i, rows, src + i * ld + j, ld);
    /* the edges: the last cols % 8 columns of every row, the last rows % 8 rows */
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = c8; j < cols; j++) dst[j * rows + i] = src[i * ld + j];
    for (int64_t i = r8; i < rows; i++)
        for (int64_t j = 0; j < c8; j++) dst[j * rows + i] = src[i * ld + j];
}

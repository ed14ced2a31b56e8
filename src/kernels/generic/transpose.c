/*
 * Matrix transpose, generic: dst (cols, rows) = src (rows, cols)^T, in
 * tiles of 32 x 32 so that both the reads and the writes stay within a few
 * cache lines at a time (a row-by-row transpose misses on every write).
 * Dimension key: rows, cols of src; ld its row stride.
 */
#include "generic.h"

void moe__g_transpose(float *dst, const float *src, int64_t rows, int64_t cols, int64_t ld) {
    enum { B = 32 };
    for (int64_t i0 = 0; i0 < rows; i0 += B)
        for (int64_t j0 = 0; j0 < cols; j0 += B) {
            int64_t i1 = i0 + B < rows ? i0 + B : rows, j1 = j0 + B < cols ? j0 + B : cols;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++) dst[j * rows + i] = src[i * ld + j];
        }
}

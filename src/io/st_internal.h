/*
 * Private to the safetensors reader (safetensors.c) and writer (st_write.c).
 */
#ifndef MOE_ST_INTERNAL_H
#define MOE_ST_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_INT ((uint64_t)1 << 53) /* largest JSON integer accepted (exact in a double) */
/* Checksum of tensor data, written by moe_st_write as metadata
 * "libmoe.checksum" and verified on read (safetensors.c says how). */
#define ST_CHECKSUM_KEY "libmoe.checksum"

/* Offset of the first byte of s (n) that is not valid UTF-8, or n. */
size_t moe__st_utf8_bad_at(const unsigned char *s, size_t n);
/* Sorts names (n) in place; the first name that appears twice, or NULL. */
const char *moe__st_sort_find_dup(const char **names, size_t n);
/* The checksum's word loop over p[0..n) (n a multiple of 8), its end (the
 * tail bytes p[0..n % 8) and the length n), and its text "h64:<16 hex>". */
uint64_t moe__st_hash_words(uint64_t h, const unsigned char *p, size_t n);
uint64_t moe__st_hash_end(uint64_t h, const unsigned char *tail, size_t n);
void     moe__st_hash_str(char out[24], uint64_t h);

#endif

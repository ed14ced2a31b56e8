/*
 * safetensors files: the writer (moe_st_write), atomic: a temp file beside
 * the target, its blocks reserved first, the data straight from the
 * caller's arrays with the checksum computed as it goes, fsync, rename.
 * The reader, the format and the checks are in safetensors.c.
 */
#include "internal.h"
#include "st_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- writing */

/* A JSON integer printed exactly (cJSON would print the double, with an
 * exponent from 1e15 on). */
static cJSON *json_int(uint64_t v) {
    char s[24];
    snprintf(s, sizeof s, "%llu", (unsigned long long)v);
    return cJSON_CreateRaw(s);
}

static cJSON *entry_json(const moe_st_entry *e, size_t begin, size_t end) {
    cJSON *o = cJSON_CreateObject(), *shape = NULL, *offs = NULL;
    int ok = o && cJSON_AddStringToObject(o, "dtype", moe_dtype_name(e->dtype)) &&
             (shape = cJSON_AddArrayToObject(o, "shape")) && (offs = cJSON_AddArrayToObject(o, "data_offsets"));
    for (int d = 0; ok && d < e->ndim; d++) ok = cJSON_AddItemToArray(shape, json_int((uint64_t)e->shape[d]));
    ok = ok && cJSON_AddItemToArray(offs, json_int(begin)) && cJSON_AddItemToArray(offs, json_int(end));
    if (!ok) cJSON_Delete(o);
    return ok ? o : NULL;
}

/* Check the arguments; sizes[i] gets entry i's byte count. */
static moe_status check_write_args(size_t *sizes, const moe_st_entry *entries, int n, const char *const *meta_kv,
                                   int n_meta, const char **names) {
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        const moe_st_entry *e = &entries[i];
        if (!e->name || !e->name[0]) return moe_err(MOE_ERR_ARG, "moe_st_write: entry %d has no name", i);
        const char *nm = e->name;
        if (!strcmp(nm, "__metadata__") || moe__st_utf8_bad_at((const unsigned char *)nm, strlen(nm)) < strlen(nm))
            return moe_err(MOE_ERR_ARG, "moe_st_write: tensor name '%s' is reserved or not UTF-8", nm);
        if ((unsigned)e->dtype >= MOE_DT_COUNT)
            return moe_err(MOE_ERR_ARG, "moe_st_write: tensor '%s': unknown dtype %d", nm, (int)e->dtype);
        if (e->ndim < 0 || e->ndim > MOE_ST_MAX_DIMS)
            return moe_err(MOE_ERR_ARG, "moe_st_write: tensor '%s': ndim %d not in [0, %d]", nm, e->ndim,
                           MOE_ST_MAX_DIMS);
        size_t numel = 1;
        int ok = 1, zero = 0;
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0 || (uint64_t)e->shape[d] > ST_MAX_INT)
                return moe_err(MOE_ERR_ARG, "moe_st_write: tensor '%s': shape[%d] = %lld not in [0, 2^53]", nm,
                               d, (long long)e->shape[d]);
            zero |= e->shape[d] == 0;
            ok = ok && moe_mul_size(&numel, numel, (size_t)e->shape[d]);
        }
        if (zero) numel = 0, ok = 1;
        if (!ok || !moe_mul_size(&sizes[i], numel, moe_dtype_size(e->dtype)) ||
            !moe_add_size(&total, total, sizes[i]) || total > ST_MAX_INT)
            return moe_err(MOE_ERR_ARG, "moe_st_write: tensor '%s': size overflows", nm);
        if (sizes[i] && !e->data) return moe_err(MOE_ERR_ARG, "moe_st_write: tensor '%s': data is NULL", nm);
        names[i] = nm;
    }
    const char *dup = moe__st_sort_find_dup(names, (size_t)n);
    if (dup) return moe_err(MOE_ERR_ARG, "moe_st_write: tensor name '%s' appears twice", dup);
    for (int i = 0; i < 2 * n_meta; i++) {
        const char *s = meta_kv[i];
        if (!s || moe__st_utf8_bad_at((const unsigned char *)s, strlen(s)) < strlen(s))
            return moe_err(MOE_ERR_ARG, "moe_st_write: metadata %s %d is NULL or not UTF-8", i % 2 ? "value" : "key",
                           i / 2);
        if (i % 2 == 0) names[i / 2] = s;
    }
    dup = moe__st_sort_find_dup(names, (size_t)n_meta);
    if (dup) return moe_err(MOE_ERR_ARG, "moe_st_write: metadata key '%s' appears twice", dup);
    return MOE_OK;
}

/* The header text, unpadded; NULL when out of memory. Free with moe_free(). */
static char *build_header(const moe_st_entry *entries, int n, const size_t *sizes, const char *const *meta_kv,
                          int n_meta) {
    cJSON *root = cJSON_CreateObject(), *meta = NULL;
    int ok = root != NULL;
    if (ok && n_meta > 0) ok = (meta = cJSON_AddObjectToObject(root, "__metadata__")) != NULL;
    for (int i = 0; ok && i < n_meta; i++) ok = cJSON_AddStringToObject(meta, meta_kv[2 * i], meta_kv[2 * i + 1]) != NULL;
    size_t at = 0;
    for (int i = 0; ok && i < n; i++) {
        cJSON *e = entry_json(&entries[i], at, at + sizes[i]);
        ok = e && cJSON_AddItemToObject(root, entries[i].name, e);
        if (!ok) cJSON_Delete(e);
        at += sizes[i];
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

/* write(2)/pwrite(2) of all n bytes (short writes and EINTR retried); 0 with
 * errno on failure. */
static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n > ((size_t)1 << 30) ? (size_t)1 << 30 : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            return 0;
        }
        p += w, n -= (size_t)w;
    }
    return 1;
}

static int pwrite_all(int fd, const void *buf, size_t n, off_t off) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            return 0;
        }
        p += w, n -= (size_t)w, off += w;
    }
    return 1;
}

moe_status moe_st_write(const char *path, const moe_st_entry *entries, int n, const char *const *meta_kv,
                        int n_meta) {
    if (!path || !path[0] || n < 0 || (n > 0 && !entries) || n_meta < 0 || (n_meta > 0 && !meta_kv))
        return moe_err(MOE_ERR_ARG, "moe_st_write: bad arguments (path %s, %d entries, %d metadata pairs)",
                       path ? path : "NULL", n, n_meta);
    size_t m = (size_t)(n > n_meta ? n : n_meta) + 1;
    moe_status st = MOE_OK;
    size_t *sizes = moe_alloc(m * sizeof *sizes);
    const char **names = moe_alloc(m * sizeof *names);
    char *hdr = NULL, *tmp = NULL;
    unsigned char *head = NULL;
    const char **meta2 = NULL;
    if (!sizes || !names) {
        st = moe_err(MOE_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    if ((st = check_write_args(sizes, entries, n, meta_kv, n_meta, names)) != MOE_OK) goto done;
    for (int i = 0; i < n_meta; i++)
        if (!strcmp(meta_kv[2 * i], ST_CHECKSUM_KEY)) {
            st = moe_err(MOE_ERR_ARG, "moe_st_write: metadata key '%s' is reserved (libmoe writes it)",
                         ST_CHECKSUM_KEY);
            goto done;
        }
    /* The caller's metadata and the checksum of the data, in entry order. The
     * checksum is computed as the data is written (one pass over it), so the
     * header goes out first with a placeholder of the same width and is
     * written again, with the checksum, at the end. */
    char sum[24];
    moe__st_hash_str(sum, 0);
    meta2 = moe_alloc((size_t)(2 * n_meta + 2) * sizeof *meta2);
    if (!meta2) {
        st = moe_err(MOE_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    for (int i = 0; i < 2 * n_meta; i++) meta2[i] = meta_kv[i];
    meta2[2 * n_meta] = ST_CHECKSUM_KEY, meta2[2 * n_meta + 1] = sum;
    if (!(hdr = build_header(entries, n, sizes, meta2, n_meta + 1)) || !(tmp = moe_alloc(strlen(path) + 32))) {
        st = moe_err(MOE_ERR_NOMEM, "%s: out of memory building the header", path);
        goto done;
    }

    /* u64 LE length, header padded with spaces so the data starts 8-aligned,
     * then the tensors' bytes in entry order: the header in one write, the
     * data straight from the caller's arrays, a piece at a time (hashed just
     * before it is written, while it is in cache). */
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    if (!(head = moe_alloc(8 + padded))) {
        st = moe_err(MOE_ERR_NOMEM, "%s: out of memory building the header", path);
        goto done;
    }
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(head + 8, hdr, hl);
    memset(head + 8 + hl, ' ', padded - hl);
    snprintf(tmp, strlen(path) + 32, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        st = moe_err(MOE_ERR_IO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
        goto done;
    }
    const size_t piece = (size_t)4 << 20; /* a multiple of 8 */
    uint64_t h = 0x6c69626d6f65ull;
    int ok = 1, err = 0;
#ifdef __linux__
    /* The file's blocks reserved up front: on ext4 that makes the writes
     * below faster and steadier (151 MB in 4 MB writes: 35-385 ms, median
     * about 45 -> 23-27 ms, 16 runs; without it every page written pays for
     * delayed block allocation), and a full disk is found here, before any
     * data is written. Only a lack of space fails
     * the write here; any other refusal (a file system without fallocate,
     * EOPNOTSUPP, and the like) leaves the plain writes below to do it. */
    size_t total = 8 + padded;
    for (int i = 0; i < n; i++) total += sizes[i];
    if (fallocate(fd, 0, 0, (off_t)total) != 0 && (errno == ENOSPC || errno == EDQUOT || errno == EFBIG)) {
        err = errno;
        close(fd);
        unlink(tmp);
        st = moe_err(MOE_ERR_IO, "%s: cannot reserve %zu bytes for it: %s%s", path, total, strerror(err),
                     err == EFBIG ? " (the file-size limit, ulimit -f)" : " (free some disk space or write elsewhere)");
        goto done;
    }
#endif
    if (!(ok = write_all(fd, head, 8 + padded))) err = errno;
    for (int i = 0; ok && i < n; i++) {
        const unsigned char *p = entries[i].data;
        for (size_t at = 0; ok && at < sizes[i]; at += piece) {
            size_t m = sizes[i] - at < piece ? sizes[i] - at : piece;
            h = moe__st_hash_words(h, p + at, m & ~(size_t)7);
            if (!(ok = write_all(fd, p + at, m))) err = errno;
        }
        h = moe__st_hash_end(h, sizes[i] ? p + (sizes[i] & ~(size_t)7) : p, sizes[i]);
    }
    if (ok) { /* the header again, now with the checksum: same length */
        moe__st_hash_str(sum, h);
        moe_free(hdr);
        hdr = build_header(entries, n, sizes, meta2, n_meta + 1);
        if (!hdr || strlen(hdr) != hl) {
            close(fd);
            unlink(tmp);
            st = moe_err(MOE_ERR_NOMEM, "%s: out of memory building the header", path);
            goto done;
        }
        memcpy(head + 8, hdr, hl);
        if (!(ok = pwrite_all(fd, head, 8 + padded, 0))) err = errno;
    }
    if (ok && fsync(fd) != 0) ok = 0, err = errno;
    if (close(fd) != 0 && ok) ok = 0, err = errno;
    if (ok && rename(tmp, path) != 0) ok = 0, err = errno;
    if (!ok) {
        unlink(tmp);
        st = moe_err(MOE_ERR_IO, "%s: cannot write: %s", path, strerror(err ? err : EIO));
    }
done:
    moe_free(head);
    moe_free(meta2);
    moe_free(tmp);
    moe_free(hdr);
    moe_free(names);
    moe_free(sizes);
    return st;
}

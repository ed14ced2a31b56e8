/*
 * safetensors files: read, validate, convert to float32 (the atomic writer
 * is in st_write.c).
 *
 * Files are mapped (mmap, read-only, private), not read into a buffer.
 *
 * Layout: u64 little-endian N | N bytes of UTF-8 JSON header | data buffer.
 * The header maps each tensor name to {"dtype", "shape", "data_offsets":
 * [begin, end]} (offsets into the data buffer), plus an optional
 * "__metadata__" object of string -> string.
 *
 * Files come from users, so everything is checked before any tensor is
 * exposed. The JSON itself is parsed and printed by cJSON; the only
 * hand-written parts are the binary framing (length prefix, padding), the
 * checks cJSON cannot make (UTF-8, "\u0000" escapes, exact integers, sizes,
 * offsets, overlaps, duplicate keys: cJSON keeps every duplicate and finds
 * the first), integer printing (cJSON prints doubles), and the element
 * conversions (F16/BF16/F64 -> F32).
 *
 * Byte order: safetensors data is little-endian and is used as is, so this
 * file assumes a little-endian host (x86_64, aarch64). The header length is
 * read and written byte by byte and does not depend on the host.
 */
#include "internal.h"
#include "st_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MiB */

struct moe_st_file {
    void                 *map;     /* the file mapped read-only (moe_st_open); NULL for moe_st_parse */
    size_t                map_len; /* its length: the file's size when opened */
    cJSON                *root;    /* parsed header: owns tensor names and metadata strings */
    const cJSON          *meta;    /* "__metadata__" object, or NULL */
    int                   n;
    moe_st_tensor        *t;       /* n tensors in header order */
    const moe_st_tensor **by_name; /* the same, sorted by name, for moe_st_find */
};

/* ---------------------------------------------------------------- dtypes */

static const char *const k_dtype_name[MOE_DT_COUNT] = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8",
    "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
static const unsigned char k_dtype_size[MOE_DT_COUNT] = {8, 4, 2, 2, 8, 4, 2, 1, 8, 4, 2, 1, 1, 1, 1};

const char *moe_dtype_name(moe_dtype t) {
    return (unsigned)t < MOE_DT_COUNT ? k_dtype_name[t] : NULL;
}

size_t moe_dtype_size(moe_dtype t) {
    return (unsigned)t < MOE_DT_COUNT ? k_dtype_size[t] : 0;
}

/* ---------------------------------------------------------------- helpers */

/* Index of the first byte of s[0..n) that is not well-formed UTF-8 (RFC 3629:
 * no overlong forms, surrogates or code points past U+10FFFF) or is NUL;
 * n if there is none. */
size_t moe__st_utf8_bad_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i], lo = 0x80, hi = 0xBF;
        size_t k;
        if (c == 0) return i;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c >= 0xE0 && c <= 0xEF) k = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        else if (c >= 0xF0 && c <= 0xF4) k = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        else return i;
        if (n - i - 1 < k) return i;
        for (size_t j = 1; j <= k; j++, lo = 0x80, hi = 0xBF)
            if (s[i + j] < lo || s[i + j] > hi) return i;
        i += k + 1;
    }
    return n;
}

/* 1 if the JSON text has a "\u0000" escape. cJSON decodes it to a NUL byte,
 * which silently cuts a C string short ("a\u0000b" would read as "a"). */
static int has_escaped_nul(const char *s, size_t n) {
    for (const char *p = s; (p = memmem(p, n - (size_t)(p - s), "u0000", 5)) != NULL; p++) {
        size_t bs = 0;
        while (p - bs > s && p[-1 - (ptrdiff_t)bs] == '\\') bs++;
        if (bs % 2) return 1;
    }
    return 0;
}

/* A JSON number that is an exact integer in [0, 2^53]. */
static int json_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= (double)ST_MAX_INT) || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

/* Describe a JSON value for a message ("-3", "2.5", "a string"). */
static const char *json_desc(char *buf, size_t cap, const cJSON *v) {
    if (cJSON_IsNumber(v)) snprintf(buf, cap, "%.17g", v->valuedouble);
    else snprintf(buf, cap, "%s", cJSON_IsString(v) ? "a string" : cJSON_IsArray(v) ? "an array" :
                                  cJSON_IsObject(v) ? "an object" : cJSON_IsBool(v) ? "a boolean" : "null");
    return buf;
}

/* "(4, 8)"; "()" for a scalar. */
static const char *fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t at = (size_t)snprintf(buf, cap, "(");
    for (int d = 0; d < ndim && at < cap; d++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (at < cap) snprintf(buf + at, cap - at, ")");
    return buf;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sort names[0..n) in place; return a name that occurs twice, or NULL. */
const char *moe__st_sort_find_dup(const char **names, size_t n) {
    if (n > 1) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) return names[i];
    return NULL;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const moe_st_tensor *const *)a)->name, (*(const moe_st_tensor *const *)b)->name);
}

typedef struct { size_t begin, end; int i; } st_range;

static int cmp_range(const void *a, const void *b) {
    const st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* ---------------------------------------------------------------- reading */

/* Validate one header entry and fill t (t->name is already set). */
static moe_status parse_entry(moe_st_tensor *t, st_range *r, const cJSON *e, const char *label,
                              const unsigned char *data, size_t dlen) {
    const char *nm = t->name;
    char a[512], b[64];
    if (!cJSON_IsObject(e))
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': entry is %s, expected an object", label, nm,
                       json_desc(b, sizeof b, e));
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL, *v;
    cJSON_ArrayForEach(v, e) {
        const cJSON **slot = !strcmp(v->string, "dtype") ? &dtype : !strcmp(v->string, "shape") ? &shape :
                             !strcmp(v->string, "data_offsets") ? &offs : NULL;
        if (!slot)
            return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': unknown key \"%s\" (expected dtype, shape, "
                           "data_offsets)", label, nm, v->string);
        if (*slot)
            return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': key \"%s\" appears twice", label, nm, v->string);
        *slot = v;
    }
    const char *missing = !dtype ? "dtype" : !shape ? "shape" : !offs ? "data_offsets" : NULL;
    if (missing) return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': missing \"%s\"", label, nm, missing);

    int dt = -1;
    for (int i = 0; i < MOE_DT_COUNT && cJSON_IsString(dtype); i++)
        if (!strcmp(dtype->valuestring, k_dtype_name[i])) dt = i;
    if (dt < 0) {
        if (cJSON_IsString(dtype))
            return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': unknown dtype \"%s\"", label, nm, dtype->valuestring);
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': dtype is %s, expected a string such as \"F32\"",
                       label, nm, json_desc(b, sizeof b, dtype));
    }
    t->dtype = (moe_dtype)dt;

    if (!cJSON_IsArray(shape))
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape is %s, expected an array", label, nm,
                       json_desc(b, sizeof b, shape));
    int nd = cJSON_GetArraySize(shape);
    if (nd > MOE_ST_MAX_DIMS)
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape has %d dims, at most %d are supported", label,
                       nm, nd, MOE_ST_MAX_DIMS);
    t->ndim = 0;
    cJSON_ArrayForEach(v, shape) {
        uint64_t d;
        if (!json_uint(v, &d))
            return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape[%d] is %s, expected an integer in [0, 2^53]",
                           label, nm, t->ndim, json_desc(b, sizeof b, v));
        t->shape[t->ndim++] = (int64_t)d;
    }

    uint64_t off[2];
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &off[0]) ||
        !json_uint(offs->child->next, &off[1]))
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets must be [begin, end], two integers in "
                       "[0, 2^53]", label, nm);
    if (off[0] > off[1])
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] begin after end", label, nm,
                       (unsigned long long)off[0], (unsigned long long)off[1]);
    if (off[1] > dlen)
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] past the end of the data "
                       "(%zu bytes)", label, nm, (unsigned long long)off[0], (unsigned long long)off[1], dlen);

    /* numel and bytes, overflow-checked; any zero dim makes the product 0 */
    size_t numel = 1, nbytes = 0;
    int zero = 0;
    for (int d = 0; d < t->ndim; d++) zero |= t->shape[d] == 0;
    for (int d = 0; d < t->ndim && !zero; d++)
        if (!moe_mul_size(&numel, numel, (size_t)t->shape[d]) || numel > INT64_MAX)
            return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape %s has more elements than fit in 64 bits",
                           label, nm, fmt_shape(a, sizeof a, t->ndim, t->shape));
    if (zero) numel = 0;
    if (!moe_mul_size(&nbytes, numel, k_dtype_size[dt]))
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape %s of %s is more bytes than fit in 64 bits",
                       label, nm, fmt_shape(a, sizeof a, t->ndim, t->shape), k_dtype_name[dt]);
    if (nbytes != off[1] - off[0])
        return moe_err(MOE_ERR_FORMAT, "%s: tensor '%s': shape %s of %s is %zu bytes but data_offsets "
                       "[%llu, %llu] span %llu", label, nm, fmt_shape(a, sizeof a, t->ndim, t->shape),
                       k_dtype_name[dt], nbytes, (unsigned long long)off[0], (unsigned long long)off[1],
                       (unsigned long long)(off[1] - off[0]));
    t->numel = (int64_t)numel;
    t->nbytes = nbytes;
    t->data = data + off[0];
    r->begin = (size_t)off[0];
    r->end = (size_t)off[1];
    return MOE_OK;
}

/* Check "__metadata__": an object of string values with unique keys. */
static moe_status check_metadata(const cJSON *m, const char *label) {
    char b[64];
    if (!cJSON_IsObject(m))
        return moe_err(MOE_ERR_FORMAT, "%s: \"__metadata__\" is %s, expected an object of strings", label,
                       json_desc(b, sizeof b, m));
    int n = cJSON_GetArraySize(m);
    const char **keys = moe_alloc((size_t)(n ? n : 1) * sizeof *keys);
    if (!keys) return moe_err(MOE_ERR_NOMEM, "%s: out of memory checking metadata", label);
    moe_status st = MOE_OK;
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, m) {
        keys[i++] = v->string;
        if (!cJSON_IsString(v) && st == MOE_OK)
            st = moe_err(MOE_ERR_FORMAT, "%s: metadata \"%s\" is %s, expected a string", label, v->string,
                         json_desc(b, sizeof b, v));
    }
    const char *dup = st == MOE_OK ? moe__st_sort_find_dup(keys, (size_t)n) : NULL;
    if (dup) st = moe_err(MOE_ERR_FORMAT, "%s: metadata key \"%s\" appears twice", label, dup);
    moe_free(keys);
    return st;
}

/* Validate buf[0..len) and fill f (whose fields are zero); on error the caller
 * closes f. label names the file in messages. */
/* Checksum of tensor data, written by moe_st_write as metadata
 * "libmoe.checksum" and verified on read: a 64-bit multiply-xorshift over
 * 8-byte words (then the tail bytes), chained over the tensors in header
 * order. It detects damage (flipped bits, truncation inside the data, a
 * tensor's bytes swapped); it is not a defence against a deliberate forgery. */
/* The hash's word loop over p[0..n) (n a multiple of 8), so a tensor can be
 * hashed a piece at a time (moe_st_write: while it is written). */
uint64_t moe__st_hash_words(uint64_t h, const unsigned char *p, size_t n) {
    const uint64_t k = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * k;
        h ^= h >> 29;
    }
    return h;
}

/* The end of a tensor of n bytes whose words were hashed: its tail bytes
 * p[0..n % 8), then its length. */
uint64_t moe__st_hash_end(uint64_t h, const unsigned char *tail, size_t n) {
    const uint64_t k = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n % 8; i++) {
        h = (h ^ tail[i]) * k;
        h ^= h >> 29;
    }
    return (h ^ (uint64_t)n) * k;
}

static uint64_t st_hash(uint64_t h, const unsigned char *p, size_t n) {
    return moe__st_hash_end(moe__st_hash_words(h, p, n & ~(size_t)7), p + (n & ~(size_t)7), n);
}

void moe__st_hash_str(char out[24], uint64_t h) { snprintf(out, 24, "h64:%016llx", (unsigned long long)h); }

static moe_status parse_into(moe_st_file *f, const unsigned char *buf, size_t len, const char *label) {
    if (len < 8)
        return moe_err(MOE_ERR_FORMAT, "%s: file is %zu bytes, too short for the 8-byte header length",
                       label, len);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--) hn = hn << 8 | buf[i];
    if (hn > len - 8)
        return moe_err(MOE_ERR_FORMAT, "%s: header length %llu is past the end of the file (%zu bytes)",
                       label, (unsigned long long)hn, len);
    if (hn > ST_MAX_HEADER)
        return moe_err(MOE_ERR_FORMAT, "%s: header length %llu exceeds the limit of %llu bytes", label,
                       (unsigned long long)hn, (unsigned long long)ST_MAX_HEADER);
    size_t n = (size_t)hn, dlen = len - 8 - n;
    const char *hdr = (const char *)buf + 8;
    const unsigned char *data = buf + 8 + n;
    size_t bad = moe__st_utf8_bad_at((const unsigned char *)hdr, n);
    if (bad < n)
        return moe_err(MOE_ERR_FORMAT, "%s: header byte %zu (0x%02x) is not valid UTF-8 text", label, bad,
                       (unsigned char)hdr[bad]);
    if (has_escaped_nul(hdr, n))
        return moe_err(MOE_ERR_FORMAT, "%s: header has a \\u0000 escape (NUL in a string)", label);

    /* cJSON wants a NUL-terminated string; the header is followed by data. */
    char *text = moe_alloc(n + 1);
    if (!text) return moe_err(MOE_ERR_NOMEM, "%s: out of memory for a %zu-byte header", label, n);
    memcpy(text, hdr, n);
    text[n] = '\0';
    const char *end = NULL;
    f->root = cJSON_ParseWithOpts(text, &end, 1); /* 1: only whitespace may follow */
    size_t at = end ? (size_t)(end - text) : 0;
    moe_free(text);
    if (!f->root)
        return moe_err(MOE_ERR_FORMAT, "%s: header is not valid JSON (error at byte %zu of %zu)", label, at, n);
    if (!cJSON_IsObject(f->root))
        return moe_err(MOE_ERR_FORMAT, "%s: header is not a JSON object", label);

    int count = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, f->root) {
        if (strcmp(e->string, "__metadata__") != 0) {
            count++;
            continue;
        }
        if (f->meta) return moe_err(MOE_ERR_FORMAT, "%s: \"__metadata__\" appears twice", label);
        moe_status st = check_metadata(e, label);
        if (st != MOE_OK) return st;
        f->meta = e;
    }
    size_t cnt = count ? (size_t)count : 1;
    f->t = moe_calloc(cnt * sizeof *f->t);
    f->by_name = moe_alloc(cnt * sizeof *f->by_name);
    st_range *r = moe_alloc(cnt * sizeof *r);
    if (!f->t || !f->by_name || !r) {
        moe_free(r);
        return moe_err(MOE_ERR_NOMEM, "%s: out of memory for %d tensors", label, count);
    }
    moe_status st = MOE_OK;
    cJSON_ArrayForEach(e, f->root) {
        if (e == f->meta) continue;
        moe_st_tensor *t = &f->t[f->n];
        t->name = e->string;
        if ((st = parse_entry(t, &r[f->n], e, label, data, dlen)) != MOE_OK) break;
        r[f->n].i = f->n;
        f->by_name[f->n] = t;
        f->n++;
    }
    if (st == MOE_OK && f->n > 1) {
        qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
        for (int i = 1; i < f->n && st == MOE_OK; i++)
            if (!strcmp(f->by_name[i - 1]->name, f->by_name[i]->name))
                st = moe_err(MOE_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", label,
                             f->by_name[i]->name);
    }
    if (st == MOE_OK && f->n > 1) {
        /* Sorted by begin, non-empty ranges must not overlap the previous one. */
        qsort(r, (size_t)f->n, sizeof *r, cmp_range);
        const st_range *prev = NULL;
        for (int i = 0; i < f->n && st == MOE_OK; i++) {
            if (r[i].begin == r[i].end) continue;
            if (prev && r[i].begin < prev->end)
                st = moe_err(MOE_ERR_FORMAT, "%s: tensors '%s' [%zu, %zu] and '%s' [%zu, %zu] overlap", label,
                             f->t[prev->i].name, prev->begin, prev->end, f->t[r[i].i].name, r[i].begin, r[i].end);
            prev = &r[i];
        }
    }
    moe_free(r);
    const cJSON *sum = f->meta ? cJSON_GetObjectItemCaseSensitive(f->meta, ST_CHECKSUM_KEY) : NULL;
    if (st == MOE_OK && sum) {
        uint64_t h = 0x6c69626d6f65ull;
        for (int i = 0; i < f->n; i++) h = st_hash(h, f->t[i].data, f->t[i].nbytes);
        char got[24];
        moe__st_hash_str(got, h);
        if (strcmp(got, sum->valuestring) != 0)
            st = moe_err(MOE_ERR_FORMAT, "%s: checksum mismatch: the tensor data is not what was written "
                                         "(metadata %s %s, data gives %s); the file is damaged", label,
                         ST_CHECKSUM_KEY, sum->valuestring, got);
    }
    return st;
}

moe_status moe_st_parse(moe_st_file **out, const void *buf, size_t len) {
    if (!out) return moe_err(MOE_ERR_ARG, "moe_st_parse: out is NULL");
    *out = NULL;
    if (!buf) return moe_err(MOE_ERR_ARG, "moe_st_parse: buffer is NULL");
    moe_st_file *f = moe_calloc(sizeof *f);
    if (!f) return moe_err(MOE_ERR_NOMEM, "moe_st_parse: out of memory");
    moe_status st = parse_into(f, buf, len, "safetensors buffer");
    if (st != MOE_OK) {
        moe_st_close(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

moe_status moe_st_open(moe_st_file **out, const char *path) {
    if (!out) return moe_err(MOE_ERR_ARG, "moe_st_open: out is NULL");
    *out = NULL;
    if (!path) return moe_err(MOE_ERR_ARG, "moe_st_open: path is NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe_err(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    int rc = fstat(fd, &sb), e = errno;
    if (rc != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_err(MOE_ERR_IO, "%s: cannot read: %s", path, rc ? strerror(e) : "not a regular file");
    }
    if ((uintmax_t)sb.st_size > SIZE_MAX - 1) {
        close(fd);
        return moe_err(MOE_ERR_NOMEM, "%s: file of %lld bytes does not fit in memory", path,
                       (long long)sb.st_size);
    }
    /* The file is mapped read-only and private, never read into a buffer:
     * tensors are used in place (moe_st_read_f32 copies straight from the
     * page cache). Every check below is made against the size fstat gave, so
     * a header that claims more bytes than the file has is a format error
     * and nothing past the end is touched. (Like any mmap reader, a file
     * that another process truncates while it is open would fault.) An empty
     * file cannot be mapped; it gets the same "too short" error as any
     * file under 8 bytes. */
    size_t len = (size_t)sb.st_size;
    static const unsigned char empty[1];
    void *map = NULL;
    if (len > 0) {
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        e = errno;
        if (map == MAP_FAILED) {
            close(fd);
            return moe_err(e == ENOMEM ? MOE_ERR_NOMEM : MOE_ERR_IO, "%s: cannot map %zu bytes: %s", path, len,
                           strerror(e));
        }
    }
    close(fd); /* the mapping keeps the file */
    moe_st_file *f = moe_calloc(sizeof *f);
    if (!f) {
        if (map) munmap(map, len);
        return moe_err(MOE_ERR_NOMEM, "%s: out of memory", path);
    }
    f->map = map;
    f->map_len = len;
    moe_status st = parse_into(f, map ? map : empty, len, path);
    if (st != MOE_OK) {
        moe_st_close(f);
        return st;
    }
    *out = f;
    return MOE_OK;
}

void moe_st_close(moe_st_file *f) {
    if (!f) return;
    cJSON_Delete(f->root);
    moe_free(f->t);
    moe_free(f->by_name);
    if (f->map) munmap(f->map, f->map_len);
    moe_free(f);
}

int moe_st_count(const moe_st_file *f) { return f ? f->n : 0; }

const moe_st_tensor *moe_st_tensor_at(const moe_st_file *f, int i) {
    return f && i >= 0 && i < f->n ? &f->t[i] : NULL;
}

const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name) {
    if (!f || !name || f->n == 0) return NULL;
    moe_st_tensor key = {.name = name};
    const moe_st_tensor *kp = &key;
    const moe_st_tensor *const *hit = bsearch(&kp, f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_tensor_name);
    return hit ? *hit : NULL;
}

const char *moe_st_metadata(const moe_st_file *f, const char *key) {
    if (!f || !f->meta || !key) return NULL;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(f->meta, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* IEEE 754 half -> float, exact for every value (subnormals, inf, nan). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (exp == 0x1f) bits = sign | 0x7f800000u | man << 13;          /* inf, nan (payload kept) */
    else if (exp) bits = sign | (exp + 112) << 23 | man << 13;        /* normal: rebias 15 -> 127 */
    else {                                                            /* zero, subnormal: man * 2^-24 */
        f = (float)man * 0x1p-24f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

moe_status moe__st_check_f32(const moe_st_tensor **out, const moe_st_file *f, const char *name, int ndim,
                             const int64_t *shape) {
    *out = NULL;
    if (!f || !name) return moe_err(MOE_ERR_ARG, "moe_st_read_f32: NULL file or name");
    if (ndim > MOE_ST_MAX_DIMS || (ndim > 0 && !shape))
        return moe_err(MOE_ERR_ARG, "moe_st_read_f32: tensor '%s': bad expected shape (ndim %d%s)", name, ndim,
                       ndim > 0 && !shape ? ", shape NULL" : "");
    const moe_st_tensor *t = moe_st_find(f, name);
    if (!t) return moe_err(MOE_ERR_NOTFOUND, "tensor '%s' is not in the file", name);
    if (ndim >= 0) {
        /* a scalar may be saved as shape () or (1): torch.tensor(1.0) and torch.tensor([1.0]) */
        int same = t->ndim == ndim || (ndim == 0 && t->ndim == 1 && t->shape[0] == 1);
        for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
        if (!same) {
            char a[256], b[256];
            return moe_err(MOE_ERR_SHAPE, "tensor '%s' has shape %s, expected %s", name,
                           fmt_shape(a, sizeof a, t->ndim, t->shape), fmt_shape(b, sizeof b, ndim, shape));
        }
    }
    if (t->dtype != MOE_DT_F32 && t->dtype != MOE_DT_F64 && t->dtype != MOE_DT_F16 && t->dtype != MOE_DT_BF16)
        return moe_err(MOE_ERR_UNSUPPORTED, "tensor '%s' has dtype %s; only F32, F64, F16 and BF16 convert to "
                       "float32", name, k_dtype_name[t->dtype]);
    *out = t;
    return MOE_OK;
}

void moe__st_convert_f32(float *dst, const moe_st_tensor *t, size_t begin, size_t n) {
    const unsigned char *p = t->data; /* may be unaligned: every load is a memcpy */
    if (t->dtype == MOE_DT_F32) {
        if (n) memcpy(dst, p + 4 * begin, n * 4);
    } else if (t->dtype == MOE_DT_F64) {
        p += 8 * begin;
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
    } else {
        p += 2 * begin;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            if (t->dtype == MOE_DT_F16) {
                dst[i] = half_to_float(h);
            } else { /* BF16: the top half of a float32 */
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&dst[i], &bits, 4);
            }
        }
    }
}

moe_status moe_st_read_f32(float *dst, const moe_st_file *f, const char *name, int ndim, const int64_t *shape) {
    const moe_st_tensor *t;
    moe_status st = moe__st_check_f32(&t, f, name, ndim, shape);
    if (st != MOE_OK) return st;
    if (!dst && t->numel > 0) return moe_err(MOE_ERR_ARG, "moe_st_read_f32: tensor '%s': dst is NULL", name);
    moe__st_convert_f32(dst, t, 0, (size_t)t->numel);
    return MOE_OK;
}

/*
 * safetensors: round trips in every dtype, float32 conversions, read errors,
 * and hostile files built byte by byte (each must fail cleanly with a message
 * that says what was wrong; run under ASan/valgrind to catch over-reads).
 */
#include "check.h"
#include "moe.h"

#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHECK_MSG(sub) CHECK(strstr(moe_last_error(), sub) != NULL, "message lacks '%s': %s", sub, moe_last_error())

static char g_dir[64];

static const char *tmp_path(const char *name) {
    static char p[256];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

/* Files in g_dir whose name contains sub. */
static int count_files(const char *sub) {
    DIR *d = opendir(g_dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) n += strstr(e->d_name, sub) != NULL;
    if (d) closedir(d);
    return n;
}

/* A malloc'd buffer of exactly the file's size, so ASan sees any over-read. */
static unsigned char *make_buf(size_t *len, uint64_t hlen, const char *json, size_t dlen) {
    size_t jl = strlen(json);
    *len = 8 + jl + dlen;
    unsigned char *b = malloc(*len ? *len : 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(b + 8, json, jl);
    for (size_t i = 0; i < dlen; i++) b[8 + jl + i] = (unsigned char)i;
    return b;
}

static void write_bytes(const char *path, const void *b, size_t n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "fopen %s", path);
    if (!f) return;
    if (n) CHECK(fwrite(b, 1, n, f) == n, "fwrite");
    fclose(f);
}

static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len ? *len : 1);
    if (fread(b, 1, *len, f) != *len) *len = 0;
    fclose(f);
    return b;
}

/* Parse a header (length prefix = its own length) over dlen data bytes. */
static moe_status parse_json(const char *json, size_t dlen) {
    size_t len;
    unsigned char *b = make_buf(&len, strlen(json), json, dlen);
    moe_st_file *f = (moe_st_file *)1;
    moe_status st = moe_st_parse(&f, b, len);
    CHECK(st == MOE_OK ? f != NULL : f == NULL, "*out must be NULL on failure");
    moe_st_close(f);
    free(b);
    return st;
}

/* A hostile header must fail with FORMAT and a message containing `sub`. */
static void expect_bad(const char *json, size_t dlen, const char *sub) {
    moe_status st = parse_json(json, dlen);
    CHECK(st == MOE_ERR_FORMAT, "got %s for %s", moe_status_str(st), json);
    CHECK(moe_last_error()[0] != '\0', "empty message for %s", json);
    CHECK_MSG(sub);
}

/* ---------------------------------------------------------------- tests */

static void test_dtypes(void) {
    CHECK(moe_dtype_size(MOE_DT_F64) == 8 && moe_dtype_size(MOE_DT_BF16) == 2 && moe_dtype_size(MOE_DT_U64) == 8 &&
          moe_dtype_size(MOE_DT_BOOL) == 1 && moe_dtype_size(MOE_DT_F8_E5M2) == 1, "dtype sizes");
    CHECK(!strcmp(moe_dtype_name(MOE_DT_F8_E4M3), "F8_E4M3") && !strcmp(moe_dtype_name(MOE_DT_I16), "I16"),
          "dtype names");
    CHECK(moe_dtype_name(MOE_DT_COUNT) == NULL && moe_dtype_size(MOE_DT_COUNT) == 0 &&
          moe_dtype_name((moe_dtype)-1) == NULL, "out-of-range dtype");
}

static void test_round_trip(void) {
    enum { N = MOE_DT_COUNT + 3 };
    moe_st_entry e[N];
    unsigned char *data[N];
    char names[MOE_DT_COUNT][32];
    memset(e, 0, sizeof e);
    for (int i = 0; i < MOE_DT_COUNT; i++) {
        snprintf(names[i], sizeof names[i], "t.%s", moe_dtype_name((moe_dtype)i));
        e[i] = (moe_st_entry){.name = names[i], .dtype = (moe_dtype)i, .ndim = 2, .shape = {2, 3}};
        if (i % 3 == 0) e[i].ndim = 3, e[i].shape[2] = 1;
    }
    e[MOE_DT_COUNT] = (moe_st_entry){.name = "scalar", .dtype = MOE_DT_F32, .ndim = 0};
    e[MOE_DT_COUNT + 1] = (moe_st_entry){.name = "empty", .dtype = MOE_DT_F32, .ndim = 2, .shape = {0, 5}};
    e[MOE_DT_COUNT + 2] = (moe_st_entry){.name = "we\"ird\\name\n\xc3\x9f", .dtype = MOE_DT_U8, .ndim = 1, .shape = {3}};
    for (int i = 0; i < N; i++) {
        size_t nb = moe_dtype_size(e[i].dtype);
        for (int d = 0; d < e[i].ndim; d++) nb *= (size_t)e[i].shape[d];
        data[i] = nb ? malloc(nb) : NULL;
        for (size_t k = 0; k < nb; k++) data[i][k] = (unsigned char)(31 * i + 7 * k + 1);
        e[i].data = data[i];
    }
    const char *meta[] = {"format", "pt", "note", "quote \" and \\ and \xe2\x82\xac"};
    const char *path = tmp_path("rt.safetensors");
    CHECK_STATUS(moe_st_write(path, e, N, meta, 2), MOE_OK);
    CHECK(count_files(".tmp.") == 0, "temp file left behind");

    size_t len = 0;
    unsigned char *raw = read_all(path, &len);
    uint64_t hl = 0;
    for (int i = 7; raw && len >= 8 && i >= 0; i--) hl = hl << 8 | raw[i];
    CHECK(raw && len >= 8 && hl % 8 == 0 && hl <= len - 8, "header length %llu not a multiple of 8",
          (unsigned long long)hl);
    size_t close = hl;
    while (raw && close > 0 && raw[8 + close - 1] == ' ') close--;
    CHECK(raw && close > 0 && raw[8 + close - 1] == '}' && hl - close < 8, "header padded with < 8 spaces");

    for (int pass = 0; pass < 2; pass++) {
        moe_st_file *f = NULL;
        if (pass == 0) CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
        else CHECK_STATUS(moe_st_parse(&f, raw, len), MOE_OK);
        if (!f) continue;
        CHECK(moe_st_count(f) == N, "count %d", moe_st_count(f));
        const unsigned char *prev_end = NULL;
        for (int i = 0; i < N && i < moe_st_count(f); i++) {
            const moe_st_tensor *t = moe_st_tensor_at(f, i);
            CHECK(t && !strcmp(t->name, e[i].name), "tensor %d in entry order", i);
            CHECK(moe_st_find(f, e[i].name) == t, "find '%s'", e[i].name);
            if (!t) continue;
            size_t nb = moe_dtype_size(e[i].dtype);
            int same = t->dtype == e[i].dtype && t->ndim == e[i].ndim;
            for (int d = 0; d < e[i].ndim; d++) same &= t->shape[d] == e[i].shape[d], nb *= (size_t)e[i].shape[d];
            CHECK(same && t->nbytes == nb && t->numel == (int64_t)(nb / moe_dtype_size(e[i].dtype)),
                  "tensor '%s' dtype/shape/size", t->name);
            CHECK(nb == 0 || !memcmp(t->data, data[i], nb), "tensor '%s' bytes", t->name);
            CHECK(!prev_end || (const unsigned char *)t->data == prev_end, "tensor '%s' contiguous", t->name);
            prev_end = (const unsigned char *)t->data + t->nbytes;
        }
        if (pass) CHECK(prev_end == raw + len, "data ends at the file's end");
        const moe_st_tensor *s = moe_st_find(f, "scalar");
        CHECK(s && s->ndim == 0 && s->numel == 1 && s->nbytes == 4, "scalar numel 1");
        const moe_st_tensor *z = moe_st_find(f, "empty");
        CHECK(z && z->numel == 0 && z->nbytes == 0, "zero-size tensor");
        CHECK(moe_st_tensor_at(f, N) == NULL && moe_st_tensor_at(f, -1) == NULL, "tensor_at out of range");
        CHECK(moe_st_find(f, "t.F3") == NULL && moe_st_find(f, "") == NULL && moe_st_find(f, NULL) == NULL,
              "find of an absent name");
        const char *v = moe_st_metadata(f, "format");
        CHECK(v && !strcmp(v, "pt"), "metadata format");
        v = moe_st_metadata(f, "note");
        CHECK(v && !strcmp(v, meta[3]), "metadata with escapes");
        CHECK(moe_st_metadata(f, "absent") == NULL && moe_st_metadata(f, NULL) == NULL, "absent metadata");
        float sc = 0;
        CHECK_STATUS(moe_st_read_f32(&sc, f, "scalar", 0, NULL), MOE_OK);
        CHECK(!memcmp(&sc, data[MOE_DT_COUNT], 4), "scalar value");
        CHECK_STATUS(moe_st_read_f32(NULL, f, "empty", 2, (const int64_t[]){0, 5}), MOE_OK);
        moe_st_close(f);
    }
    free(raw);

    /* no tensors, no metadata: a valid file */
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_write(path, NULL, 0, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    CHECK(moe_st_count(f) == 0 && moe_st_find(f, "x") == NULL && moe_st_metadata(f, "format") == NULL, "empty file");
    moe_st_close(f);
    unlink(path);
    for (int i = 0; i < N; i++) free(data[i]);
}

static void test_convert(void) {
    const uint16_t h[] = {0x3C00, 0xC000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x8000, 0x3555, 0x8001};
    const float hf[] = {1.0f, -2.0f, 0x1p-24f, 1023 * 0x1p-24f, 0x1p-14f, 65504.0f, INFINITY, -INFINITY, -0.0f,
                        0x1.554p-2f, -0x1p-24f};
    const uint16_t nanh[] = {0x7E00, 0xFC01};
    const uint16_t bf[] = {0x3F80, 0xC040, 0x7F80, 0x0001, 0x4049};
    const float bff[] = {1.0f, -3.0f, INFINITY, 0x1p-133f, 3.140625f};
    const double dd[] = {1.5, -1e-3, 1e300, -0.0, 123456789.0};
    const float f32[] = {1.0f, -0.5f, 3.25f};
    enum { NH = sizeof h / 2, NB = sizeof bf / 2, ND = sizeof dd / 8 };
    moe_st_entry e[] = {
        {.name = "h", .dtype = MOE_DT_F16, .ndim = 1, .shape = {NH}, .data = h},
        {.name = "nan", .dtype = MOE_DT_F16, .ndim = 1, .shape = {2}, .data = nanh},
        {.name = "bf", .dtype = MOE_DT_BF16, .ndim = 1, .shape = {NB}, .data = bf},
        {.name = "d", .dtype = MOE_DT_F64, .ndim = 1, .shape = {ND}, .data = dd},
        {.name = "f", .dtype = MOE_DT_F32, .ndim = 2, .shape = {1, 3}, .data = f32},
        {.name = "i", .dtype = MOE_DT_I32, .ndim = 1, .shape = {1}, .data = f32},
    };
    const char *path = tmp_path("conv.safetensors");
    CHECK_STATUS(moe_st_write(path, e, 6, NULL, 0), MOE_OK);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    if (!f) return;
    float out[16];
    CHECK_STATUS(moe_st_read_f32(out, f, "h", 1, (const int64_t[]){NH}), MOE_OK);
    for (int i = 0; i < NH; i++)
        CHECK(memcmp(&out[i], &hf[i], 4) == 0, "F16 0x%04x -> %a, want %a", h[i], out[i], hf[i]);
    CHECK_STATUS(moe_st_read_f32(out, f, "nan", -1, NULL), MOE_OK);
    CHECK(isnan(out[0]) && isnan(out[1]) && signbit(out[1]), "F16 nan -> %g %g", out[0], out[1]);
    CHECK_STATUS(moe_st_read_f32(out, f, "bf", 1, (const int64_t[]){NB}), MOE_OK);
    for (int i = 0; i < NB; i++) CHECK(out[i] == bff[i], "BF16 0x%04x -> %a, want %a", bf[i], out[i], bff[i]);
    CHECK_STATUS(moe_st_read_f32(out, f, "d", -1, NULL), MOE_OK);
    for (int i = 0; i < ND; i++) CHECK(memcmp(&out[i], &(float){(float)dd[i]}, 4) == 0, "F64 %g -> %g", dd[i], out[i]);
    CHECK_STATUS(moe_st_read_f32(out, f, "f", 2, (const int64_t[]){1, 3}), MOE_OK);
    CHECK(!memcmp(out, f32, sizeof f32), "F32 copy");

    /* shape mismatch, missing tensor, unsupported dtype, bad arguments */
    CHECK_STATUS(moe_st_read_f32(out, f, "f", 2, (const int64_t[]){1, 4}), MOE_ERR_SHAPE);
    CHECK_MSG("'f' has shape (1, 3), expected (1, 4)");
    CHECK_STATUS(moe_st_read_f32(out, f, "f", 1, (const int64_t[]){3}), MOE_ERR_SHAPE);
    CHECK_MSG("expected (3)");
    CHECK_STATUS(moe_st_read_f32(out, f, "f", 0, NULL), MOE_ERR_SHAPE); /* (1, 3) is no scalar */
    CHECK_MSG("expected ()");
    CHECK_STATUS(moe_st_read_f32(out, f, "h", 0, NULL), MOE_ERR_SHAPE); /* nor (11) */
    CHECK_STATUS(moe_st_read_f32(out, f, "nan", 0, NULL), MOE_ERR_SHAPE); /* nor (2) */
    CHECK_STATUS(moe_st_read_f32(out, f, "gate.weight", -1, NULL), MOE_ERR_NOTFOUND);
    CHECK_MSG("'gate.weight'");
    CHECK_STATUS(moe_st_read_f32(out, f, "i", -1, NULL), MOE_ERR_UNSUPPORTED);
    CHECK_MSG("I32");
    CHECK_MSG("'i'");
    CHECK_STATUS(moe_st_read_f32(NULL, f, "f", -1, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_read_f32(out, NULL, "f", -1, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_read_f32(out, f, NULL, -1, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_read_f32(out, f, "f", 2, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_read_f32(out, f, "f", MOE_ST_MAX_DIMS + 1, (const int64_t[9]){0}), MOE_ERR_ARG);
    moe_st_close(f);
    unlink(path);

    /* unaligned data: an F32 at byte 1 of the data buffer, F16 at byte 5 */
    const char *js = "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                     "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[1,5]},"
                     "\"y\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[5,7]}}";
    size_t len;
    unsigned char *b = make_buf(&len, strlen(js), js, 7), *d = b + 8 + strlen(js);
    float one = 1.0f;
    memcpy(d + 1, &one, 4);
    d[5] = 0x00, d[6] = 0xC0; /* -2.0 */
    CHECK_STATUS(moe_st_parse(&f, b, len), MOE_OK);
    if (f) {
        CHECK_STATUS(moe_st_read_f32(out, f, "x", 1, (const int64_t[]){1}), MOE_OK);
        CHECK(out[0] == 1.0f, "unaligned F32 %g", out[0]);
        CHECK_STATUS(moe_st_read_f32(out, f, "y", -1, NULL), MOE_OK);
        CHECK(out[0] == -2.0f, "unaligned F16 %g", out[0]);
        /* a scalar saved as shape (1) (torch.tensor([1.0])) reads as a scalar */
        CHECK_STATUS(moe_st_read_f32(out, f, "x", 0, NULL), MOE_OK);
        CHECK(out[0] == 1.0f, "scalar from shape (1): %g", out[0]);
        CHECK_STATUS(moe_st_read_f32(out, f, "y", 0, NULL), MOE_OK);
        CHECK(out[0] == -2.0f, "F16 scalar from shape (1): %g", out[0]);
        moe_st_close(f);
    }
    free(b);
}

static void test_hostile(void) {
    /* framing */
    size_t len;
    unsigned char *b = make_buf(&len, 0, "", 0);
    moe_st_file *f = (moe_st_file *)1;
    CHECK_STATUS(moe_st_parse(&f, b, 0), MOE_ERR_FORMAT);
    CHECK(f == NULL, "*out NULL on failure");
    CHECK_MSG("too short");
    CHECK_STATUS(moe_st_parse(&f, b, 7), MOE_ERR_FORMAT);
    CHECK_MSG("7 bytes");
    CHECK_STATUS(moe_st_parse(&f, b, 8), MOE_ERR_FORMAT); /* N = 0: empty header */
    CHECK_MSG("not valid JSON");
    CHECK_STATUS(moe_st_parse(&f, NULL, 8), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_parse(NULL, b, 8), MOE_ERR_ARG);
    free(b);
    b = make_buf(&len, 100, "{}", 10);
    CHECK_STATUS(moe_st_parse(&f, b, len), MOE_ERR_FORMAT);
    CHECK_MSG("header length 100 is past the end of the file (20 bytes)");
    free(b);
    b = make_buf(&len, (uint64_t)1 << 63, "{}", 0);
    CHECK_STATUS(moe_st_parse(&f, b, len), MOE_ERR_FORMAT);
    CHECK_MSG("9223372036854775808");
    free(b);
    b = make_buf(&len, UINT64_MAX, "{}", 0);
    CHECK_STATUS(moe_st_parse(&f, b, len), MOE_ERR_FORMAT);
    free(b);
    size_t big = (100u << 20) + 1;
    b = calloc(8 + big, 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)big >> (8 * i));
    CHECK_STATUS(moe_st_parse(&f, b, 8 + big), MOE_ERR_FORMAT);
    CHECK_MSG("exceeds the limit");
    free(b);

    /* the JSON text */
    expect_bad("{not json", 0, "not valid JSON");
    expect_bad("{} x", 0, "not valid JSON");
    expect_bad("[]", 0, "not a JSON object");
    expect_bad("\"str\"", 0, "not a JSON object");
    expect_bad("{\"a\xff\":{}}", 0, "not valid UTF-8");
    expect_bad("{\"a\xc0\x80\":{}}", 0, "not valid UTF-8"); /* overlong NUL */
    expect_bad("{\"\xed\xa0\x80\":{}}", 0, "not valid UTF-8"); /* surrogate */
    expect_bad("{\"a\\u0000b\":{}}", 0, "\\u0000");
    CHECK_STATUS(parse_json("{\"a\\\\u0000\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0), MOE_OK);
    {
        b = make_buf(&len, 4, "{}", 2);
        b[10] = 0, b[11] = ' ';
        CHECK_STATUS(moe_st_parse(&f, b, len), MOE_ERR_FORMAT);
        CHECK_MSG("0x00");
        free(b);
    }
    char deep[4100];
    for (int i = 0; i < 2048; i++) deep[i] = '[', deep[4095 - i] = ']';
    deep[4096] = '\0';
    expect_bad(deep, 0, "not valid JSON");

    /* entries (the data buffer has 64 bytes: 0, 1, 2, ...) */
#define T(name, body) "{\"" name "\":{" body "}}"
#define OK_F32 "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]"
    CHECK_STATUS(parse_json(T("w", OK_F32), 64), MOE_OK);
    CHECK_STATUS(parse_json("{}", 0), MOE_OK);
    CHECK_STATUS(parse_json("  {}      ", 0), MOE_OK);
    expect_bad("{\"w\":5}", 64, "tensor 'w': entry is 5, expected an object");
    expect_bad("{\"w\":\"F32\"}", 64, "tensor 'w'");
    expect_bad("{\"w\":[]}", 64, "tensor 'w'");
    expect_bad(T("gate.weight", "\"shape\":[2,2],\"data_offsets\":[0,16]"), 64, "'gate.weight': missing \"dtype\"");
    expect_bad(T("gate.weight", "\"dtype\":\"F32\",\"data_offsets\":[0,16]"), 64, "'gate.weight': missing \"shape\"");
    expect_bad(T("gate.weight", "\"dtype\":\"F32\",\"shape\":[2,2]"), 64, "'gate.weight': missing \"data_offsets\"");
    expect_bad(T("w", "\"dtype\":\"F33\",\"shape\":[2,2],\"data_offsets\":[0,16]"), 64, "unknown dtype \"F33\"");
    expect_bad(T("w", "\"dtype\":\"f32\",\"shape\":[2,2],\"data_offsets\":[0,16]"), 64, "unknown dtype");
    expect_bad(T("w", "\"dtype\":4,\"shape\":[2,2],\"data_offsets\":[0,16]"), 64, "dtype is 4");
    expect_bad(T("w", OK_F32 ",\"extra\":1"), 64, "unknown key \"extra\"");
    expect_bad(T("w", OK_F32 ",\"dtype\":\"F16\""), 64, "\"dtype\" appears twice");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,-2],\"data_offsets\":[0,16]"), 64, "shape[1] is -2");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2.5,2],\"data_offsets\":[0,16]"), 64, "shape[0] is 2.5");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[\"2\",2],\"data_offsets\":[0,16]"), 64, "shape[0] is a string");
    expect_bad(T("w", "\"dtype\":\"U8\",\"shape\":[9007199254740994,0],\"data_offsets\":[0,0]"), 64, "shape[0]");
    expect_bad(T("w", "\"dtype\":\"U8\",\"shape\":[1e400,0],\"data_offsets\":[0,0]"), 64, "shape[0]");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]"), 64, "shape is 4, expected an array");
    expect_bad(T("w", "\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]"), 64, "9 dims");
    CHECK_STATUS(parse_json(T("w", "\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]"), 64), MOE_OK);
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,16]"), 64,
               "'w': shape (4294967296, 4294967296, 16) has more elements than fit in 64 bits");
    expect_bad(T("w", "\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,16]"), 64, "shape[0]");
    expect_bad(T("w", "\"dtype\":\"F64\",\"shape\":[4503599627370496,1024],\"data_offsets\":[0,16]"), 64,
               "more bytes than fit");
    CHECK_STATUS(parse_json(T("w", "\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[3,3]"), 64),
                 MOE_OK);
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]"), 64,
               "'w': shape (2, 2) of F32 is 16 bytes but data_offsets [0, 12] span 12");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,0]"), 64, "is 4 bytes");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16,0]"), 64, "[16, 0] begin after end");
    expect_bad(T("gate.weight", "\"dtype\":\"F32\",\"shape\":[4,6],\"data_offsets\":[0,96]"), 64,
               "tensor 'gate.weight': data_offsets [0, 96] past the end of the data (64 bytes)");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0]"), 64, "data_offsets must be");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16,32]"), 64, "data_offsets must be");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[-16,0]"), 64, "data_offsets must be");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":{\"a\":0,\"b\":16}"), 64, "data_offsets");
    expect_bad(T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0.5,16.5]"), 64, "data_offsets");

    /* between entries */
    expect_bad("{\"a\":{" OK_F32 "},\"b\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]}}", 64,
               "'a' [0, 16] and 'b' [8, 24] overlap");
    expect_bad("{\"b\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]},\"a\":{" OK_F32 "}}", 64, "overlap");
    expect_bad("{\"a\":{" OK_F32 "},\"b\":{" OK_F32 "}}", 64, "overlap"); /* identical ranges */
    expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[40],\"data_offsets\":[0,40]},\"b\":{" OK_F32 "},"
               "\"c\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[20,28]}}", 64, "overlap");
    CHECK_STATUS(parse_json("{\"a\":{" OK_F32 "},\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
                            "\"y\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
                            "\"b\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16,32]}}", 64), MOE_OK);
    expect_bad("{\"gate.weight\":{" OK_F32 "},\"gate.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":"
               "[16,32]}}", 64, "tensor 'gate.weight' appears twice");

    /* metadata */
    CHECK_STATUS(parse_json("{\"__metadata__\":{\"format\":\"pt\"},\"w\":{" OK_F32 "}}", 64), MOE_OK);
    CHECK_STATUS(parse_json("{\"__metadata__\":{}}", 0), MOE_OK);
    expect_bad("{\"__metadata__\":{\"epoch\":3}}", 0, "metadata \"epoch\" is 3, expected a string");
    expect_bad("{\"__metadata__\":{\"a\":null}}", 0, "metadata \"a\"");
    expect_bad("{\"__metadata__\":[\"a\"]}", 0, "\"__metadata__\" is an array");
    expect_bad("{\"__metadata__\":\"x\"}", 0, "\"__metadata__\" is a string");
    expect_bad("{\"__metadata__\":{},\"__metadata__\":{}}", 0, "\"__metadata__\" appears twice");
    expect_bad("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, "metadata key \"k\" appears twice");
#undef T
#undef OK_F32
}

/* Every proper prefix of a valid file is refused cleanly. */
static void test_truncated(void) {
    const float w[6] = {1, 2, 3, 4, 5, 6};
    const uint16_t h[3] = {1, 2, 3};
    moe_st_entry e[] = {
        {.name = "a", .dtype = MOE_DT_F32, .ndim = 2, .shape = {2, 3}, .data = w},
        {.name = "b", .dtype = MOE_DT_F16, .ndim = 1, .shape = {3}, .data = h},
        {.name = "s", .dtype = MOE_DT_F32, .ndim = 0, .data = w},
        {.name = "z", .dtype = MOE_DT_F32, .ndim = 1, .shape = {0}},
    };
    const char *meta[] = {"format", "pt"};
    const char *path = tmp_path("trunc.safetensors");
    CHECK_STATUS(moe_st_write(path, e, 4, meta, 1), MOE_OK);
    size_t len = 0;
    unsigned char *raw = read_all(path, &len);
    CHECK(raw && len > 8, "read back");
    int bad = 0, nomsg = 0;
    for (size_t cut = 0; raw && cut < len; cut++) {
        unsigned char *b = malloc(cut ? cut : 1);
        memcpy(b, raw, cut);
        moe_st_file *f = NULL;
        moe_status st = moe_st_parse(&f, b, cut);
        bad += st != MOE_ERR_FORMAT || f != NULL;
        nomsg += moe_last_error()[0] == '\0';
        moe_st_close(f);
        free(b);
    }
    CHECK(bad == 0, "%d truncated buffers were not refused with MOE_ERR_FORMAT", bad);
    CHECK(nomsg == 0, "%d refusals without a message", nomsg);
    const size_t cuts[] = {0, 5, 8, 20, len - 24, len - 1};
    for (int i = 0; raw && i < 6; i++) {
        write_bytes(path, raw, cuts[i]);
        moe_st_file *f = (moe_st_file *)1;
        CHECK_STATUS(moe_st_open(&f, path), MOE_ERR_FORMAT);
        CHECK(f == NULL, "*out NULL");
        CHECK_MSG(path);
    }
    /* the last tensor's end is past the data */
    write_bytes(path, raw, len - 1);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_open(&f, path), MOE_ERR_FORMAT);
    CHECK_MSG("past the end of the data");
    unlink(path);
    free(raw);
}

/* FNV-1a of a file's bytes (the golden values below come from the writer
 * before it computed the checksum while writing: the bytes must not change). */
static uint64_t fnv_file(const char *path, size_t *len) {
    unsigned char *b = read_all(path, len);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; b && i < *len; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    free(b);
    return b ? h : 0;
}

/* moe_st_write's output, byte for byte: tensors that end off an 8-byte word,
 * one of several 4 MiB pieces (hashed and written a piece at a time), an
 * empty one, metadata; and what moe_st_open reads back from the mapping. */
static void test_write_bytes(void) {
    size_t nbig = ((size_t)9 << 20) + 5, nf = 1001;
    unsigned char *big = malloc(nbig);
    float *fl = malloc(nf * sizeof *fl);
    unsigned long long rs = 42;
    for (size_t i = 0; i < nbig; i++) big[i] = (unsigned char)(i * 131 + (i >> 9));
    for (size_t i = 0; i < nf; i++) fl[i] = check_nrand(&rs);
    const uint16_t h3[3] = {0x3c00, 0xc000, 0x7bff};
    moe_st_entry e[] = {
        {.name = "w", .dtype = MOE_DT_F32, .ndim = 2, .shape = {7, 143}, .data = fl},
        {.name = "big", .dtype = MOE_DT_U8, .ndim = 1, .shape = {(int64_t)nbig}, .data = big},
        {.name = "h", .dtype = MOE_DT_F16, .ndim = 1, .shape = {3}, .data = h3},
        {.name = "empty", .dtype = MOE_DT_F32, .ndim = 2, .shape = {0, 4}},
        {.name = "s", .dtype = MOE_DT_F32, .ndim = 0, .data = fl + 5},
    };
    const char *meta[] = {"format", "pt", "note", "h64:0000000000000000"};
    const char *path = tmp_path("bytes.safetensors");
    CHECK_STATUS(moe_st_write(path, e, 5, meta, 2), MOE_OK);
    size_t len = 0;
    uint64_t h = fnv_file(path, &len);
    CHECK(len == 9441643 && h == 0x7fbc2d6aec267b01ull, "file is %zu bytes, FNV-1a %016llx", len, (unsigned long long)h);
    const moe_st_entry one = {.name = "x", .dtype = MOE_DT_F32, .ndim = 1, .shape = {3}, .data = fl};
    CHECK_STATUS(moe_st_write(path, &one, 1, NULL, 0), MOE_OK);
    h = fnv_file(path, &len);
    CHECK(len == 140 && h == 0x87bafa126356d52dull, "file is %zu bytes, FNV-1a %016llx", len, (unsigned long long)h);
    /* read back through the mapping: the same bytes, the checksum verified */
    CHECK_STATUS(moe_st_write(path, e, 5, meta, 2), MOE_OK);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    const moe_st_tensor *t = moe_st_find(f, "big");
    CHECK(t && t->nbytes == nbig && memcmp(t->data, big, nbig) == 0, "big tensor read back");
    float back[1001];
    CHECK_STATUS(moe_st_read_f32(back, f, "w", 2, (const int64_t[]){7, 143}), MOE_OK);
    CHECK(memcmp(back, fl, sizeof back) == 0, "F32 tensor read back bit for bit");
    CHECK(moe_st_metadata(f, "note") && strcmp(moe_st_metadata(f, "note"), "h64:0000000000000000") == 0,
          "metadata kept");
    moe_st_close(f);
    unlink(path);
    free(big);
    free(fl);
}

/* moe_st_open maps the file: every cut of a file whose data spans several
 * pages is refused with MOE_ERR_FORMAT and a message (never a fault from
 * touching past the end), and so is a header that claims more bytes than
 * the file has. */
static void test_mapped_truncated(void) {
    static float w[3000];
    for (int i = 0; i < 3000; i++) w[i] = (float)i;
    moe_st_entry e[] = {
        {.name = "a", .dtype = MOE_DT_F32, .ndim = 2, .shape = {1000, 2}, .data = w},
        {.name = "b", .dtype = MOE_DT_F32, .ndim = 1, .shape = {1000}, .data = w + 2000},
    };
    const char *path = tmp_path("mapped.safetensors");
    CHECK_STATUS(moe_st_write(path, e, 2, NULL, 0), MOE_OK);
    size_t len = 0;
    unsigned char *raw = read_all(path, &len);
    CHECK(raw && len > 12000, "read back");
    int bad = 0, nomsg = 0, n = 0;
    for (size_t cut = 0; raw && cut < len; cut += cut < 200 ? 1 : 997) {
        write_bytes(path, raw, cut);
        moe_st_file *f = (moe_st_file *)1;
        moe_status st = moe_st_open(&f, path);
        bad += st != MOE_ERR_FORMAT || f != NULL;
        nomsg += strstr(moe_last_error(), path) == NULL;
        moe_st_close(f == (moe_st_file *)1 ? NULL : f);
        n++;
    }
    CHECK(bad == 0, "%d of %d cut files were not refused with MOE_ERR_FORMAT", bad, n);
    CHECK(nomsg == 0, "%d refusals without the path in the message", nomsg);
    /* cut at a page boundary inside the data: the tensors' ends are past it */
    write_bytes(path, raw, 8192);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_open(&f, path), MOE_ERR_FORMAT);
    CHECK_MSG("past the end of the data (");
    /* a header length larger than the file */
    unsigned char *b = malloc(len);
    memcpy(b, raw, len);
    uint64_t hl = (uint64_t)len;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hl >> (8 * i));
    write_bytes(path, b, len);
    CHECK_STATUS(moe_st_open(&f, path), MOE_ERR_FORMAT);
    CHECK_MSG("past the end of the file");
    CHECK(f == NULL, "*out NULL");
    /* the whole file again: opens, and reads the values */
    write_bytes(path, raw, len);
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    float back[1000];
    CHECK_STATUS(moe_st_read_f32(back, f, "b", 1, (const int64_t[]){1000}), MOE_OK);
    CHECK(memcmp(back, w + 2000, sizeof back) == 0, "values read from the mapping");
    moe_st_close(f);
    unlink(path);
    free(b);
    free(raw);
}

static void test_io_errors(void) {
    moe_st_file *f = (moe_st_file *)1;
    CHECK_STATUS(moe_st_open(&f, "/nonexistent/w.safetensors"), MOE_ERR_IO);
    CHECK(f == NULL, "*out NULL");
    CHECK_MSG("/nonexistent/w.safetensors");
    CHECK_STATUS(moe_st_open(&f, g_dir), MOE_ERR_IO); /* a directory */
    CHECK_MSG(g_dir);
    CHECK_STATUS(moe_st_open(&f, NULL), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_open(NULL, "x"), MOE_ERR_ARG);

    const float w[2] = {1, 2};
    moe_st_entry e = {.name = "w", .dtype = MOE_DT_F32, .ndim = 1, .shape = {2}, .data = w};
    CHECK_STATUS(moe_st_write("/nonexistent/dir/w.safetensors", &e, 1, NULL, 0), MOE_ERR_IO);
    CHECK_MSG("/nonexistent/dir/w.safetensors");
    CHECK_MSG("No such file");
    /* the temp file is created, the rename onto a directory fails: nothing stays */
    const char *sub = tmp_path("adir");
    CHECK(mkdir(sub, 0755) == 0, "mkdir");
    int before = count_files("");
    CHECK_STATUS(moe_st_write(sub, &e, 1, NULL, 0), MOE_ERR_IO);
    CHECK_MSG(sub);
    CHECK(count_files(".tmp.") == 0 && count_files("") == before, "temp file left behind");
    rmdir(sub);

    /* overwriting an existing file replaces it */
    const char *path = tmp_path("over.safetensors");
    write_bytes(path, "garbage", 7);
    CHECK_STATUS(moe_st_write(path, &e, 1, NULL, 0), MOE_OK);
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    CHECK(moe_st_count(f) == 1, "overwritten file");
    moe_st_close(f);
    unlink(path);
}

/* A file that cannot get its space (here a file-size limit, as a full disk
 * would be): MOE_ERR_IO naming the file, no temp file left, and the file
 * already there untouched. moe_st_write reserves the whole size up front
 * (fallocate), so the failure comes before any data is written. */
static void test_no_space(void) {
    const char *path = tmp_path("space.safetensors");
    const float w[2] = {1, 2};
    moe_st_entry e = {.name = "w", .dtype = MOE_DT_F32, .ndim = 1, .shape = {2}, .data = w};
    CHECK_STATUS(moe_st_write(path, &e, 1, NULL, 0), MOE_OK);
    size_t len0 = 0, len1 = 0;
    unsigned char *before = read_all(path, &len0);

    enum { BIG = 1 << 20 }; /* 4 MB of floats against a 1 MB limit */
    float *big = calloc(BIG, sizeof *big);
    moe_st_entry eb = {.name = "big", .dtype = MOE_DT_F32, .ndim = 1, .shape = {BIG}, .data = big};
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 1 << 20;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN); /* EFBIG instead of the signal */
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0, "setrlimit");
    moe_status st = moe_st_write(path, &eb, 1, NULL, 0);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);
    CHECK_STATUS(st, MOE_ERR_IO);
    CHECK_MSG(path);
    CHECK_MSG("cannot reserve"); /* found by the reservation, before any data was written */
    CHECK(count_files(".tmp.") == 0, "temp file left behind");
    unsigned char *after = read_all(path, &len1);
    CHECK(before && after && len0 == len1 && !memcmp(before, after, len0), "the existing file changed");
    free(before);
    free(after);
    free(big);
    unlink(path);
}

static void test_write_args(void) {
    const float w[4] = {1, 2, 3, 4};
    const char *path = tmp_path("args.safetensors");
    moe_st_entry e[2] = {
        {.name = "a", .dtype = MOE_DT_F32, .ndim = 1, .shape = {2}, .data = w},
        {.name = "gate.weight", .dtype = MOE_DT_F32, .ndim = 1, .shape = {2}, .data = w},
    };
#define BAD_WRITE(n, meta, nm, sub)                                                  \
    do {                                                                             \
        CHECK_STATUS(moe_st_write(path, e, n, meta, nm), MOE_ERR_ARG);               \
        CHECK_MSG(sub);                                                              \
        CHECK(access(path, F_OK) != 0 && count_files(".tmp.") == 0, "file written"); \
    } while (0)
    e[1].name = "a";
    BAD_WRITE(2, NULL, 0, "'a' appears twice");
    e[1].name = "";
    BAD_WRITE(2, NULL, 0, "entry 1 has no name");
    e[1].name = NULL;
    BAD_WRITE(2, NULL, 0, "entry 1 has no name");
    e[1].name = "__metadata__";
    BAD_WRITE(2, NULL, 0, "__metadata__");
    e[1].name = "bad\xff";
    BAD_WRITE(2, NULL, 0, "not UTF-8");
    e[1].name = "gate.weight";
    e[1].dtype = MOE_DT_COUNT;
    BAD_WRITE(2, NULL, 0, "'gate.weight': unknown dtype");
    e[1].dtype = MOE_DT_F32;
    e[1].ndim = MOE_ST_MAX_DIMS + 1;
    BAD_WRITE(2, NULL, 0, "'gate.weight': ndim 9");
    e[1].ndim = -1;
    BAD_WRITE(2, NULL, 0, "ndim -1");
    e[1].ndim = 2, e[1].shape[1] = -2;
    BAD_WRITE(2, NULL, 0, "'gate.weight': shape[1] = -2");
    e[1].shape[1] = (int64_t)1 << 40, e[1].shape[0] = (int64_t)1 << 40;
    BAD_WRITE(2, NULL, 0, "size overflows");
    e[1].ndim = 1, e[1].shape[0] = 2, e[1].data = NULL;
    BAD_WRITE(2, NULL, 0, "'gate.weight': data is NULL");
    const char *m1[] = {"k", NULL};
    BAD_WRITE(1, m1, 1, "metadata value 0");
    const char *m2[] = {"k", "1", "k", "2"};
    BAD_WRITE(1, m2, 2, "metadata key 'k' appears twice");
    BAD_WRITE(-1, NULL, 0, "bad arguments");
    BAD_WRITE(1, NULL, 1, "bad arguments");
    CHECK_STATUS(moe_st_write(path, NULL, 1, NULL, 0), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_write(NULL, e, 1, NULL, 0), MOE_ERR_ARG);
    CHECK_STATUS(moe_st_write("", e, 1, NULL, 0), MOE_ERR_ARG);
#undef BAD_WRITE
    /* a zero-size tensor may have NULL data; huge dims are fine when one is 0 */
    e[1].ndim = 3, e[1].shape[0] = 0, e[1].shape[1] = (int64_t)1 << 40, e[1].shape[2] = (int64_t)1 << 40;
    CHECK_STATUS(moe_st_write(path, e, 2, NULL, 0), MOE_OK);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_open(&f, path), MOE_OK);
    const moe_st_tensor *t = moe_st_find(f, "gate.weight");
    CHECK(t && t->numel == 0 && t->shape[2] == (int64_t)1 << 40, "zero-size tensor with huge dims");
    moe_st_close(f);
    unlink(path);
}

/* Files libmoe writes carry a checksum of their tensor data: every single
 * flipped bit in the data is refused with a message naming it, the intact file
 * loads, a file without the key (PyTorch's) loads, and the key is reserved. */
static void test_checksum(void) {
    float w[40];
    for (int i = 0; i < 40; i++) w[i] = (float)i * 0.25f - 3.0f;
    const int32_t k[3] = {7, -1, 65536};
    moe_st_entry e[] = {
        {.name = "w", .dtype = MOE_DT_F32, .ndim = 2, .shape = {5, 8}, .data = w},
        {.name = "k", .dtype = MOE_DT_I32, .ndim = 1, .shape = {3}, .data = k},
    };
    const char *meta[] = {"format", "pt"};
    const char *path = tmp_path("sum.safetensors");
    CHECK_STATUS(moe_st_write(path, e, 2, meta, 1), MOE_OK);
    size_t len = 0;
    unsigned char *raw = read_all(path, &len);
    moe_st_file *f = NULL;
    CHECK_STATUS(moe_st_parse(&f, raw, len), MOE_OK);
    CHECK(f && moe_st_metadata(f, "libmoe.checksum") && !strncmp(moe_st_metadata(f, "libmoe.checksum"), "h64:", 4),
          "checksum metadata");
    moe_st_close(f);
    size_t data = len - sizeof w - sizeof k; /* the data follows the header */
    int missed = 0, nomsg = 0;
    for (size_t i = data; raw && i < len; i++)
        for (int bit = 0; bit < 8; bit++) {
            raw[i] ^= (unsigned char)(1u << bit);
            f = NULL;
            moe_status st = moe_st_parse(&f, raw, len);
            missed += st != MOE_ERR_FORMAT || f != NULL;
            nomsg += strstr(moe_last_error(), "checksum mismatch") == NULL;
            moe_st_close(f);
            raw[i] ^= (unsigned char)(1u << bit);
        }
    CHECK(missed == 0 && nomsg == 0, "%d of %zu single-bit flips in the data were not refused (%d without the "
          "checksum message)", missed, 8 * (len - data), nomsg);
    /* two tensors' bytes swapped in place: same bytes, wrong order */
    memcpy(raw + data, raw + data + 4, 4);
    CHECK_STATUS(moe_st_parse(&f, raw, len), MOE_ERR_FORMAT);
    write_bytes(path, raw, len);
    CHECK_STATUS(moe_st_open(&f, path), MOE_ERR_FORMAT);
    CHECK_MSG(path);
    CHECK_MSG("damaged");
    unlink(path);
    free(raw);
    /* a file without the key (as PyTorch writes it) needs none */
    const char *json = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    size_t blen = 0;
    unsigned char *b = make_buf(&blen, strlen(json), json, 4);
    CHECK_STATUS(moe_st_parse(&f, b, blen), MOE_OK);
    moe_st_close(f);
    free(b);
    const char *reserved[] = {"libmoe.checksum", "h64:0"};
    CHECK_STATUS(moe_st_write(path, e, 2, reserved, 1), MOE_ERR_ARG);
    CHECK_MSG("reserved");
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/moe_st_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_dtypes();
    test_round_trip();
    test_convert();
    test_hostile();
    test_truncated();
    test_io_errors();
    test_no_space();
    test_write_args();
    test_checksum();
    test_write_bytes();
    test_mapped_truncated();
    CHECK(count_files("") == 2, "temp dir not clean (%d entries)", count_files("")); /* . and .. */
    rmdir(g_dir);
    return check_summary("test_safetensors");
}

/*
 * The built-in training corpus of `moe train` (see corpus.h): copy, reverse,
 * sort and add lines from a splitmix64 generator seeded by the caller.
 */
#include "corpus.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The longest line: "A:9999+9999=19998\n" is 18 bytes, "C:abcdefgh=abcdefgh\n" 20. */
#define CORPUS_MAX_LINE 20
#define CORPUS_MAX_WORD 8
#define CORPUS_MAX_NUM  9999

enum { TASK_COPY, TASK_REVERSE, TASK_SORT, TASK_ADD };

static const char corpus_tags[CORPUS_NTASKS] = {'C', 'R', 'S', 'A'};
static const char *const corpus_names[CORPUS_NTASKS] = {"copy", "reverse", "sort", "add"};

typedef struct {
    uint64_t state;
} corpus_rng;

static uint64_t corpus_next(corpus_rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), n > 0, without modulo bias (rejects the top partial block). */
static uint64_t corpus_below(corpus_rng *r, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n; /* the largest multiple of n that fits */
    uint64_t x;
    do {
        x = corpus_next(r);
    } while (x >= limit);
    return x % n;
}

const char *corpus_task_name(int task) {
    return task >= 0 && task < CORPUS_NTASKS ? corpus_names[task] : NULL;
}

int corpus_task_of_tag(char tag) {
    for (int t = 0; t < CORPUS_NTASKS; t++)
        if (corpus_tags[t] == tag) return t;
    return -1;
}

/* Write v (>= 0) in decimal without leading zeros; returns the digits written. */
static int corpus_put_uint(char *p, uint32_t v) {
    char tmp[10];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < n; i++) p[i] = tmp[n - 1 - i];
    return n;
}

/* Write one line of the given task at p; returns its length. *eq is set to
 * the offset of the '=' in the line. */
static int corpus_line(corpus_rng *r, int task, char *p, int *eq) {
    int n = 0;
    p[n++] = corpus_tags[task];
    p[n++] = ':';
    if (task == TASK_ADD) {
        uint32_t a = (uint32_t)corpus_below(r, CORPUS_MAX_NUM + 1);
        uint32_t b = (uint32_t)corpus_below(r, CORPUS_MAX_NUM + 1);
        n += corpus_put_uint(p + n, a);
        p[n++] = '+';
        n += corpus_put_uint(p + n, b);
        *eq = n;
        p[n++] = '=';
        n += corpus_put_uint(p + n, a + b);
    } else {
        char s[CORPUS_MAX_WORD];
        int len = 1 + (int)corpus_below(r, CORPUS_MAX_WORD);
        for (int i = 0; i < len; i++) s[i] = (char)('a' + corpus_below(r, 26));
        memcpy(p + n, s, (size_t)len);
        n += len;
        *eq = n;
        p[n++] = '=';
        if (task == TASK_REVERSE) {
            for (int i = 0; i < len; i++) p[n + i] = s[len - 1 - i];
        } else {
            if (task == TASK_SORT) { /* insertion sort: at most 8 bytes */
                for (int i = 1; i < len; i++) {
                    char c = s[i];
                    int j = i - 1;
                    for (; j >= 0 && (unsigned char)s[j] > (unsigned char)c; j--) s[j + 1] = s[j];
                    s[j + 1] = c;
                }
            }
            memcpy(p + n, s, (size_t)len);
        }
        n += len;
    }
    p[n++] = '\n';
    return n;
}

int corpus_generate(corpus *out, uint64_t seed, int64_t n_lines) {
    memset(out, 0, sizeof *out);
    if (n_lines < 1) return -1;
    if ((uint64_t)n_lines > (SIZE_MAX - 1) / CORPUS_MAX_LINE || n_lines > (INT64_MAX - 1) / CORPUS_MAX_LINE)
        return -1;
    size_t cap = (size_t)n_lines * CORPUS_MAX_LINE;
    char *text = malloc(cap + 1);
    int8_t *task = malloc(cap);
    uint8_t *answer = malloc(cap);
    if (!text || !task || !answer) {
        free(text);
        free(task);
        free(answer);
        return -1;
    }

    corpus_rng r = {seed};
    size_t len = 0;
    for (int64_t l = 0; l < n_lines; l++) {
        int t = (int)corpus_below(&r, CORPUS_NTASKS);
        int eq;
        int n = corpus_line(&r, t, text + len, &eq);
        memset(task + len, t, (size_t)n);
        memset(answer + len, 0, (size_t)eq + 1);
        memset(answer + len + eq + 1, 1, (size_t)(n - eq - 1));
        len += (size_t)n;
    }
    text[len] = '\0';

    /* Give back the unused tail; a failed shrink keeps the larger block. */
    char *t2 = realloc(text, len + 1);
    int8_t *k2 = realloc(task, len);
    uint8_t *a2 = realloc(answer, len);
    out->text = t2 ? t2 : text;
    out->task = k2 ? k2 : task;
    out->answer = a2 ? a2 : answer;
    out->len = (int64_t)len;
    return 0;
}

void corpus_free(corpus *c) {
    if (!c) return;
    free(c->text);
    free(c->task);
    free(c->answer);
    memset(c, 0, sizeof *c);
}

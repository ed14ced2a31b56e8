/*
 * The built-in corpus of `moe train` (tools/moe/corpus.c, compiled into this
 * test directly since the tests link only libmoe): determinism, a pinned hash
 * of one text, every line parsed and its answer recomputed, the task and
 * answer arrays against the text, task frequencies, and bad arguments.
 */
#include "check.h"

#include "../tools/moe/corpus.c"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Seed 1, 1000 lines: computed once from this generator; a change in the
 * generation changes these. */
#define PINNED_HASH 0x03e33e7362a24e1eULL
#define PINNED_LEN  14050

static uint64_t fnv1a(const char *p, int64_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int64_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

typedef struct {
    int64_t lines, tasks[CORPUS_NTASKS];
    int64_t word_len[CORPUS_MAX_WORD + 1]; /* copy/reverse/sort inputs by length */
    int64_t letters[26];
    int64_t num_digits[5];                 /* add operands by digit count */
    int bad;                               /* failed checks, so one broken line does not flood */
} stats;

/* Parse a decimal 0..9999 without leading zeros at *p, advancing it; -1 if malformed. */
static long parse_num(const char **p) {
    const char *s = *p;
    long v = 0;
    int n = 0;
    while (s[n] >= '0' && s[n] <= '9') v = v * 10 + (s[n++] - '0');
    if (n < 1 || n > 4 || (n > 1 && s[0] == '0')) return -1;
    *p = s + n;
    return v;
}

/* Check one line starting at text[off]; returns its length, or -1 if it does not parse. */
static int64_t check_line(const corpus *c, int64_t off, stats *st) {
    const char *line = c->text + off;
    const char *nl = memchr(line, '\n', (size_t)(c->len - off));
    if (!nl) return -1;
    int64_t n = nl - line + 1;
    int t = corpus_task_of_tag(line[0]);
    if (t < 0 || n < 3 || line[1] != ':' || n > CORPUS_MAX_LINE) return -1;
    const char *eq = memchr(line, '=', (size_t)n);
    if (!eq) return -1;
    const char *in = line + 2, *ans = eq + 1;
    int64_t in_len = eq - in, ans_len = nl - ans;
    char want[32];
    int want_len;
    if (t == TASK_ADD) {
        const char *p = in;
        long a = parse_num(&p);
        if (a < 0 || *p++ != '+') return -1;
        long b = parse_num(&p);
        if (b < 0 || p != eq) return -1;
        st->num_digits[snprintf(want, sizeof want, "%ld", a)]++;
        st->num_digits[snprintf(want, sizeof want, "%ld", b)]++;
        want_len = snprintf(want, sizeof want, "%ld", a + b);
    } else {
        if (in_len < 1 || in_len > CORPUS_MAX_WORD) return -1;
        for (int64_t i = 0; i < in_len; i++) {
            if (in[i] < 'a' || in[i] > 'z') return -1;
            st->letters[in[i] - 'a']++;
        }
        st->word_len[in_len]++;
        want_len = (int)in_len;
        for (int i = 0; i < want_len; i++) want[i] = t == TASK_REVERSE ? in[want_len - 1 - i] : in[i];
        if (t == TASK_SORT) /* a different sort from the generator's: selection sort */
            for (int i = 0; i < want_len; i++)
                for (int j = i + 1; j < want_len; j++)
                    if ((unsigned char)want[j] < (unsigned char)want[i]) {
                        char x = want[i];
                        want[i] = want[j];
                        want[j] = x;
                    }
    }
    if (ans_len != want_len || memcmp(ans, want, (size_t)want_len) != 0) {
        if (st->bad++ < 5)
            CHECK(0, "line at %lld: answer '%.*s', want '%.*s'", (long long)off, (int)ans_len, ans, want_len, want);
    }
    int64_t ans_start = eq - line + 1;
    for (int64_t i = 0; i < n; i++) {
        if (c->task[off + i] != t || c->answer[off + i] != (i >= ans_start)) {
            if (st->bad++ < 5)
                CHECK(0, "byte %lld: task %d answer %d, want %d %d", (long long)(off + i), c->task[off + i],
                      c->answer[off + i], t, i >= ans_start);
            break;
        }
    }
    st->tasks[t]++;
    st->lines++;
    return n;
}

/* Parse the whole text: every line well formed, n_lines of them, nothing after. */
static void check_text(const corpus *c, int64_t n_lines, stats *st) {
    memset(st, 0, sizeof *st);
    CHECK(c->text[c->len] == '\0', "text not NUL-terminated");
    CHECK((int64_t)strlen(c->text) == c->len, "NUL inside the text: strlen %zu, len %lld", strlen(c->text),
          (long long)c->len);
    int64_t off = 0;
    while (off < c->len) {
        int64_t n = check_line(c, off, st);
        if (n < 0) {
            CHECK(0, "line at byte %lld does not parse: '%.30s'", (long long)off, c->text + off);
            return;
        }
        off += n;
    }
    CHECK(st->lines == n_lines, "%lld lines, want %lld", (long long)st->lines, (long long)n_lines);
    CHECK(st->bad == 0, "%d bad lines or bytes", st->bad);
}

static int same(const corpus *a, const corpus *b) {
    return a->len == b->len && memcmp(a->text, b->text, (size_t)a->len) == 0 &&
           memcmp(a->task, b->task, (size_t)a->len) == 0 && memcmp(a->answer, b->answer, (size_t)a->len) == 0;
}

static void test_names(void) {
    static const char *names[] = {"copy", "reverse", "sort", "add"};
    static const char tags[] = {'C', 'R', 'S', 'A'};
    for (int t = 0; t < CORPUS_NTASKS; t++) {
        CHECK(corpus_task_name(t) && strcmp(corpus_task_name(t), names[t]) == 0, "task %d name %s", t,
              corpus_task_name(t) ? corpus_task_name(t) : "(null)");
        CHECK(corpus_task_of_tag(tags[t]) == t, "tag %c -> %d", tags[t], corpus_task_of_tag(tags[t]));
    }
    CHECK(corpus_task_name(-1) == NULL && corpus_task_name(CORPUS_NTASKS) == NULL, "names out of range");
    CHECK(corpus_task_of_tag('c') == -1 && corpus_task_of_tag('X') == -1 && corpus_task_of_tag('\0') == -1 &&
              corpus_task_of_tag('=') == -1,
          "unknown tags");
}

static void test_bad_args(void) {
    corpus c;
    memset(&c, 0x55, sizeof c);
    CHECK(corpus_generate(&c, 1, 0) == -1, "n_lines 0 accepted");
    CHECK(c.text == NULL && c.task == NULL && c.answer == NULL && c.len == 0, "out not zeroed on error");
    CHECK(corpus_generate(&c, 1, -3) == -1, "n_lines -3 accepted");
    CHECK(corpus_generate(&c, 1, INT64_MAX) == -1, "n_lines INT64_MAX accepted");
    CHECK(c.text == NULL, "out not zeroed on error");
    corpus_free(&c); /* zeroed: harmless */
    corpus_free(NULL);
}

static void test_pinned(void) {
    corpus a, b, d;
    CHECK(corpus_generate(&a, 1, 1000) == 0, "generate seed 1");
    CHECK(corpus_generate(&b, 1, 1000) == 0, "generate seed 1 again");
    CHECK(corpus_generate(&d, 2, 1000) == 0, "generate seed 2");
    CHECK(same(&a, &b), "seed 1 twice differs");
    CHECK(a.len != d.len || memcmp(a.text, d.text, (size_t)a.len) != 0, "seed 2 same as seed 1");
    uint64_t h = fnv1a(a.text, a.len);
    printf("seed 1, 1000 lines: len %lld, fnv1a 0x%016llx; first line \"%.*s\"\n", (long long)a.len,
           (unsigned long long)h, (int)strcspn(a.text, "\n"), a.text);
    CHECK(h == PINNED_HASH, "fnv1a 0x%016llx, pinned 0x%016llx", (unsigned long long)h,
          (unsigned long long)PINNED_HASH);
    CHECK(a.len == PINNED_LEN, "len %lld, pinned %d", (long long)a.len, PINNED_LEN);
    stats st;
    check_text(&a, 1000, &st);
    check_text(&d, 1000, &st);

    /* Lines are generated in order: fewer lines are a prefix of more. */
    corpus p;
    CHECK(corpus_generate(&p, 1, 10) == 0, "generate 10 lines");
    CHECK(p.len < a.len && memcmp(p.text, a.text, (size_t)p.len) == 0 &&
              memcmp(p.task, a.task, (size_t)p.len) == 0 && memcmp(p.answer, a.answer, (size_t)p.len) == 0,
          "10 lines not a prefix of 1000");
    corpus_free(&p);
    CHECK(p.text == NULL && p.len == 0, "corpus_free did not zero");

    corpus one;
    CHECK(corpus_generate(&one, 1, 1) == 0, "generate 1 line");
    check_text(&one, 1, &st);
    corpus_free(&one);

    corpus_free(&a);
    corpus_free(&b);
    corpus_free(&d);
}

static void test_distribution(void) {
    const int64_t n = 20000;
    corpus c;
    CHECK(corpus_generate(&c, 12345, n) == 0, "generate %lld lines", (long long)n);
    stats st;
    check_text(&c, n, &st);
    double sigma = sqrt((double)n * 0.25 * 0.75);
    for (int t = 0; t < CORPUS_NTASKS; t++) {
        double dev = fabs((double)st.tasks[t] - 0.25 * (double)n) / sigma;
        CHECK(dev < 5.0, "task %s: %lld of %lld lines, %.2f sigma from 1/4", corpus_task_name(t),
              (long long)st.tasks[t], (long long)n, dev);
    }
    printf("20000 lines: copy %lld reverse %lld sort %lld add %lld (sigma %.1f), %lld bytes\n",
           (long long)st.tasks[0], (long long)st.tasks[1], (long long)st.tasks[2], (long long)st.tasks[3], sigma,
           (long long)c.len);
    /* Every word length, letter and operand size occurs (each expected hundreds of times, >= 10 for 1-digit). */
    for (int l = 1; l <= CORPUS_MAX_WORD; l++)
        CHECK(st.word_len[l] > 0, "no word of length %d", l);
    CHECK(st.word_len[0] == 0, "empty word");
    for (int k = 0; k < 26; k++)
        CHECK(st.letters[k] > 0, "letter %c never occurs", 'a' + k);
    for (int d = 1; d <= 4; d++)
        CHECK(st.num_digits[d] > 0, "no %d-digit operand", d);
    /* Word lengths uniform on 1..8: each within 5 sigma of 1/8 of the words. */
    int64_t words = st.tasks[0] + st.tasks[1] + st.tasks[2];
    double ws = sqrt((double)words * (1.0 / 8) * (7.0 / 8));
    for (int l = 1; l <= CORPUS_MAX_WORD; l++)
        CHECK(fabs((double)st.word_len[l] - (double)words / 8) < 5 * ws, "length %d: %lld of %lld words", l,
              (long long)st.word_len[l], (long long)words);
    corpus_free(&c);
}

int main(void) {
    test_names();
    test_bad_args();
    test_pinned();
    test_distribution();
    return check_summary("test_corpus");
}

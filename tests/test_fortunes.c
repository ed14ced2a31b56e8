/*
 * The multilingual fortunes corpus of `moe train --corpus fortunes`
 * (tools/moe/fortunes.c, compiled into this test directly since the tests
 * link only libmoe).
 *
 * A fake root in a temporary directory, with files in the places Debian's
 * packages use: Latin-1 and CP1252 German, KOI8-R Russian, ISO-8859-2 Polish,
 * GBK Chinese written as bytes, CRLF lines, "%" separators with trailing
 * blanks, empty and too-long entries, an unconvertible byte, escape
 * sequences and overstrike, .dat/.u8 twins, symlinks, excluded files and
 * directories (ascii-art, es/off, Slovak), and cs/ vs cz/ copies. The
 * expected train and validation texts are built here, with an FNV-1a written
 * here, and compared byte for byte, with the per-byte language arrays and
 * every count. Then: determinism, missing languages, the error messages for
 * an empty or absent root and for a file over 64 MiB, $MOE_FORTUNES_DIR.
 *
 * The real corpus under /usr/share/games/fortunes when it is there: all 8
 * languages non-empty, 3..7% validation, valid UTF-8, no control bytes but
 * tab and newline, language arrays matching the tags; prints the
 * per-language table and the load time. Absent: "skipped", or a failure
 * with MOE_REQUIRE_FORTUNES=1 (CI installs the packages with tools/deps.sh
 * test).
 * Units: bytes of text.
 */
#include "check.h"

#include "../tools/moe/fortunes.c"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* FNV-1a 64, written again here so the split is checked independently. */
static uint64_t fnv1a(const char *p, size_t n) {
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Well-formed UTF-8, decoded code point by code point (not the library's loop). */
static int utf8_ok(const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n;) {
        uint32_t c = p[i], cp;
        int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || i + len > n) return 0;
        cp = len == 1 ? c : c & (0x7F >> len);
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (p[i + k] & 0x3F);
        }
        static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}

/* ---- files ---------------------------------------------------------- */

static int write_bytes(const char *root, const char *rel, const char *bytes, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    for (char *s = path + strlen(root) + 1; (s = strchr(s, '/')); s++) { /* mkdir -p the parents */
        *s = '\0';
        mkdir(path, 0755);
        *s = '/';
    }
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(bytes, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}
#define WRITE(root, rel, lit) CHECK(write_bytes(root, rel, lit, sizeof lit - 1) == 0, "cannot write %s", rel)

static int make_link(const char *root, const char *rel, const char *target) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    return symlink(target, path);
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) { return remove(path); }
static void rm_tree(const char *root) { nftw(root, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

/* ---- the expected corpus -------------------------------------------- */

typedef struct {
    char *text[2]; /* [0] train, [1] val */
    int8_t *lang[2];
    int64_t n[2], cap[2];
    int64_t docs[FORTUNES_NLANG][2], bytes[FORTUNES_NLANG][2];
} expect;

static void expect_doc(expect *e, int lang, const char *text) {
    static const char *codes[FORTUNES_NLANG] = {"en", "de", "es", "it", "ru", "zh", "pl", "cs"};
    size_t n = strlen(text);
    int v = fnv1a(text, n) % 20 == 0;
    char doc[512];
    int len = snprintf(doc, sizeof doc, "<%s> %s\n", codes[lang], text);
    if (e->n[v] + len + 1 > e->cap[v]) {
        e->cap[v] = 2 * (e->n[v] + len + 1);
        e->text[v] = realloc(e->text[v], (size_t)e->cap[v]);
        e->lang[v] = realloc(e->lang[v], (size_t)e->cap[v]);
    }
    memcpy(e->text[v] + e->n[v], doc, (size_t)len);
    memset(e->lang[v] + e->n[v], lang, (size_t)len);
    e->n[v] += len;
    e->docs[lang][v]++;
    e->bytes[lang][v] += len;
}

static void expect_free(expect *e) {
    for (int v = 0; v < 2; v++) free(e->text[v]), free(e->lang[v]);
}

enum { EN, DE, ES, IT, RU, ZH, PL, CS };

/* A text that lands in validation: the first "Entrada de validación número k." with hash % 20 == 0. */
static void val_text(char *buf, size_t cap) {
    for (int k = 0;; k++) {
        snprintf(buf, cap, "Entrada de validación número %d.", k);
        if (fnv1a(buf, strlen(buf)) % 20 == 0) return;
    }
}

/* The fake root: every file, and what should come out of it (in the order the table reads). */
static void build_fake(const char *r, expect *e) {
    /* en: explicit top-level files; CRLF, blank and "%  " separators, an empty entry, overstrike, escapes. */
    WRITE(r, "fortunes",
          "Hello world.\r\n%\r\n\r\n  \r\nSecond entry\r\nline two.\r\n\r\n%  \r\n%\r\n"
          "It's a very *__\b\bUN*lucky week.\n%\t\n\x1b[33mColour\x1b[m text\x07.\n%\n");
    WRITE(r, "fortunes.dat", "\x00\x00\x00\x02\xff\xfe binary index");
    CHECK(make_link(r, "fortunes.u8", "fortunes") == 0, "symlink fortunes.u8");
    char riddles[70100];
    memset(riddles, 'x', 70000); /* one entry over 64 KiB: skipped */
    strcpy(riddles + 70000, "\n%\nWhat is it? A riddle.\n");
    CHECK(write_bytes(r, "riddles", riddles, strlen(riddles)) == 0, "write riddles");
    WRITE(r, "ascii-art", "  /\\_/\\  ASCIIART-MARKER\n%\n"); /* not in the English list */
    WRITE(r, "off/rude", "OFF-MARKER\n");                     /* fortunes-off: never read */
    expect_doc(e, EN, "Hello world.");
    expect_doc(e, EN, "Second entry\nline two.");
    expect_doc(e, EN, "It's a very *UN*lucky week.");
    expect_doc(e, EN, "Colour text.");
    expect_doc(e, EN, "What is it? A riddle.");

    /* de: Latin-1; CP1252 quotes (C1 in Latin-1: that candidate fails) with an unconvertible 0x81. */
    WRITE(r, "de/witze",
          "Wer A sagt, mu\xdf auch B sagen.\n%\nGr\xfc\xdf"
          "e!\n");
    CHECK(make_link(r, "de/witze.u8", "witze") == 0, "symlink witze.u8");
    WRITE(r, "de/witze.dat", "\x01\x02\x03");
    WRITE(r, "de/asciiart", "ASCIIART-MARKER\n");
    WRITE(r, "de/zitate", "\x84Zitat\x93 ist gut.\n%\nBad \x81 byte.\n");
    expect_doc(e, DE, "Wer A sagt, muß auch B sagen.");
    expect_doc(e, DE, "Grüße!");
    expect_doc(e, DE, "„Zitat“ ist gut.");

    /* es: UTF-8; es/off is offensive and skipped; one entry chosen to land in validation. */
    char vt[128], es[256];
    val_text(vt, sizeof vt);
    snprintf(es, sizeof es, "Más vale tarde que nunca.\n%%\n%s\n", vt);
    CHECK(write_bytes(r, "es/refranes.fortunes", es, strlen(es)) == 0, "write es");
    WRITE(r, "es/off/malo.fortunes", "OFF-MARKER\n");
    expect_doc(e, ES, "Más vale tarde que nunca.");
    expect_doc(e, ES, vt);

    /* it: the top-level name is a symlink into it/ (read once, as Italian); it/banner is excluded. */
    WRITE(r, "it/adams", "Chi va piano va sano e va lontano.\n");
    WRITE(r, "it/banner", "BANNER-MARKER\n");
    CHECK(make_link(r, "adams", "it/adams") == 0, "symlink adams");
    expect_doc(e, IT, "Chi va piano va sano e va lontano.");

    /* ru: KOI8-R bytes of "Привет, мир!" and "Тише едешь, дальше будешь." */
    WRITE(r, "ru/koi",
          "\xf0\xd2\xc9\xd7\xc5\xd4, \xcd\xc9\xd2!\n%\n"
          "\xf4\xc9\xdb\xc5 \xc5\xc4\xc5\xdb\xd8, \xc4\xc1\xcc\xd8\xdb\xc5 "
          "\xc2\xd5\xc4\xc5\xdb\xd8.\n");
    expect_doc(e, RU, "Привет, мир!");
    expect_doc(e, RU, "Тише едешь, дальше будешь.");

    /* zh: GBK bytes of "中文很好。" and "你好世界"; 0xFF is neither GB18030 nor Big5. */
    WRITE(r, "chinese",
          "\xd6\xd0\xce\xc4\xba\xdc\xba\xc3\xa1\xa3\n%\n\xc4\xe3\xba\xc3\xca\xc0\xbd\xe7\n%\n\xff bad\n");
    expect_doc(e, ZH, "中文很好。");
    expect_doc(e, ZH, "你好世界");

    /* pl: ISO-8859-2 bytes of "Zażółć gęślą jaźń."; x.u8 is empty (as in fortunes-pl) and skipped,
     * only.u8 has no base and is read; cows is excluded. */
    WRITE(r, "pl/x", "Za\xbf\xf3\xb3\xe6 g\xea\xb6l\xb1 ja\xbc\xf1.\n");
    WRITE(r, "pl/x.u8", "");
    WRITE(r, "pl/only.u8", "Tylko plik u8.\n");
    WRITE(r, "pl/cows", "COWS-MARKER\n");
    expect_doc(e, PL, "Tylko plik u8.");
    expect_doc(e, PL, "Zażółć gęślą jaźń.");

    /* cs: cz/citaty is a copy (not a link) of cs/citaty: its entries are duplicates; cz/extra
     * repeats one more; cz/linked is a symlink to cs/citaty (as every cz/NAME is in Debian), not read
     * again; klasik-sk and sk/ are Slovak. */
    WRITE(r, "cs/citaty", "Tiše — dál.\n%\nDvakrát měř, jednou řež.\n");
    WRITE(r, "cz/citaty", "Tiše — dál.\n%\nDvakrát měř, jednou řež.\n");
    WRITE(r, "cz/extra", "Dvakrát měř, jednou řež.\n%\nNová věc.\n");
    CHECK(make_link(r, "cz/linked", "../cs/citaty") == 0, "symlink cz/linked");
    WRITE(r, "cs/klasik-sk", "SLOVAK-MARKER\n");
    WRITE(r, "sk/klasik-sk", "SLOVAK-MARKER\n");
    expect_doc(e, CS, "Tiše — dál.");
    expect_doc(e, CS, "Dvakrát měř, jednou řež.");
    expect_doc(e, CS, "Nová věc.");
}

static int64_t sum2(const int64_t a[][2], int v) {
    int64_t s = 0;
    for (int l = 0; l < FORTUNES_NLANG; l++) s += a[l][v];
    return s;
}

static void test_fake(const char *tmp) {
    char r[4096];
    snprintf(r, sizeof r, "%s/root", tmp);
    mkdir(r, 0755);
    expect e = {0};
    build_fake(r, &e);
    CHECK(e.n[1] > 0 && e.n[0] > 0, "the fixture has train (%lld) and val (%lld) bytes", (long long)e.n[0],
          (long long)e.n[1]);

    fortunes_corpus c;
    char msg[1024];
    int rc = fortunes_load(&c, r, msg, sizeof msg);
    CHECK(rc == 0, "load the fake root: %s", msg);
    if (rc) {
        expect_free(&e);
        return;
    }
    CHECK(msg[0] == '\0', "message on a complete load: %s", msg);
    CHECK(c.n_lang == 8, "n_lang %d", c.n_lang);
    for (int l = 0; l < 8; l++)
        CHECK(strcmp(c.lang[l], fortunes_lang_name(l)) == 0, "lang %d: %s", l, c.lang[l]);
    CHECK(strcmp(c.missing, "") == 0, "missing '%s'", c.missing);

    /* exact bytes, order and split */
    CHECK(c.n_train == e.n[0] && memcmp(c.train, e.text[0], (size_t)e.n[0]) == 0,
          "train text differs (%lld bytes, want %lld):\n%.*s\n-- want --\n%.*s", (long long)c.n_train,
          (long long)e.n[0], (int)c.n_train, (const char *)c.train, (int)e.n[0], e.text[0]);
    CHECK(c.n_val == e.n[1] && memcmp(c.val, e.text[1], (size_t)e.n[1]) == 0,
          "val text differs (%lld bytes, want %lld):\n%.*s\n-- want --\n%.*s", (long long)c.n_val,
          (long long)e.n[1], (int)c.n_val, (const char *)c.val, (int)e.n[1], e.text[1]);
    CHECK(c.train[c.n_train] == 0 && c.val[c.n_val] == 0, "texts not NUL-terminated");
    if (c.n_train == e.n[0])
        CHECK(memcmp(c.train_lang, e.lang[0], (size_t)e.n[0]) == 0, "train_lang differs");
    if (c.n_val == e.n[1]) CHECK(memcmp(c.val_lang, e.lang[1], (size_t)e.n[1]) == 0, "val_lang differs");
    /* a few documents spelled out */
    CHECK(memmem(c.train, (size_t)c.n_train, "<de> Wer A sagt, mu\xc3\x9f auch B sagen.\n", 36) ||
              memmem(c.val, (size_t)c.n_val, "<de> Wer A sagt, mu\xc3\x9f auch B sagen.\n", 36),
          "the Latin-1 German document");
    const char *ru = "<ru> \xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82, \xd0\xbc\xd0\xb8\xd1\x80!\n";
    const char *zh = "<zh> \xe4\xb8\xad\xe6\x96\x87\xe5\xbe\x88\xe5\xa5\xbd\xe3\x80\x82\n";
    const char *pl =
        "<pl> Za\xc5\xbc\xc3\xb3\xc5\x82\xc4\x87 g\xc4\x99\xc5\x9bl\xc4\x85 ja\xc5\xba\xc5\x84.\n";
    const char *en = "<en> Second entry\nline two.\n";
    const char *docs[] = {ru, zh, pl, en};
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(docs[i]);
        int in_val = fnv1a(docs[i] + 5, n - 6) % 20 == 0;
        const uint8_t *t = in_val ? c.val : c.train;
        int64_t tn = in_val ? c.n_val : c.n_train;
        const uint8_t *at = memmem(t, (size_t)tn, docs[i], n);
        CHECK(at != NULL, "document %d not in its split (%s): %s", i, in_val ? "val" : "train", docs[i]);
        int lang = i == 0 ? RU : i == 1 ? ZH : i == 2 ? PL : EN;
        if (at) {
            const int8_t *la = (in_val ? c.val_lang : c.train_lang) + (at - t);
            int ok = 1;
            for (size_t k = 0; k < n; k++) ok &= la[k] == lang;
            CHECK(ok, "language bytes of document %d", i);
        }
    }
    /* the validation entry is there, with its tag */
    char vt[128], vdoc[160];
    val_text(vt, sizeof vt);
    snprintf(vdoc, sizeof vdoc, "<es> %s\n", vt);
    CHECK(memmem(c.val, (size_t)c.n_val, vdoc, strlen(vdoc)) != NULL, "validation entry not in val");
    CHECK(memmem(c.train, (size_t)c.n_train, vdoc, strlen(vdoc)) == NULL, "validation entry in train");
    /* nothing excluded leaked in */
    static const char *markers[] = {"MARKER", "Bad ", " bad", "xxxxxxxx", "\r", "\x1b", "\b", "\x07"};
    for (int i = 0; i < 8; i++)
        CHECK(!memmem(c.train, (size_t)c.n_train, markers[i], strlen(markers[i])) &&
                  !memmem(c.val, (size_t)c.n_val, markers[i], strlen(markers[i])),
              "'%s' in the output", markers[i]);

    /* counts */
    for (int l = 0; l < 8; l++)
        for (int v = 0; v < 2; v++) {
            CHECK(c.docs[l][v] == e.docs[l][v], "%s docs[%d] %lld, want %lld", c.lang[l], v,
                  (long long)c.docs[l][v], (long long)e.docs[l][v]);
            CHECK(c.bytes[l][v] == e.bytes[l][v], "%s bytes[%d] %lld, want %lld", c.lang[l], v,
                  (long long)c.bytes[l][v], (long long)e.bytes[l][v]);
        }
    CHECK(sum2(c.bytes, 0) == c.n_train && sum2(c.bytes, 1) == c.n_val, "bytes do not add up");
    static const int64_t files[8] = {2, 2, 1, 1, 1, 1, 2, 3}, legacy[8] = {0, 2, 0, 0, 1, 1, 1, 0};
    for (int l = 0; l < 8; l++) {
        CHECK(c.files[l] == files[l], "%s files %lld, want %lld", c.lang[l], (long long)c.files[l],
              (long long)files[l]);
        CHECK(c.legacy_files[l] == legacy[l], "%s legacy files %lld, want %lld", c.lang[l],
              (long long)c.legacy_files[l], (long long)legacy[l]);
    }
    CHECK(c.duplicates == 3, "duplicates %lld, want 3 (cz/citaty twice, cz/extra once)",
          (long long)c.duplicates);
    CHECK(c.skipped_long == 1, "skipped_long %lld, want 1", (long long)c.skipped_long);
    CHECK(c.skipped_bad == 2, "skipped_bad %lld, want 2 (de 0x81, zh 0xff)", (long long)c.skipped_bad);
    CHECK(c.skipped == 3, "skipped %lld, want 3", (long long)c.skipped);

    /* determinism */
    fortunes_corpus d;
    CHECK(fortunes_load(&d, r, msg, sizeof msg) == 0, "second load: %s", msg);
    CHECK(d.n_train == c.n_train && d.n_val == c.n_val && memcmp(d.train, c.train, (size_t)c.n_train) == 0 &&
              memcmp(d.val, c.val, (size_t)c.n_val) == 0 &&
              memcmp(d.train_lang, c.train_lang, (size_t)c.n_train) == 0 &&
              memcmp(d.docs, c.docs, sizeof c.docs) == 0,
          "two loads differ");
    fortunes_free(&d);

    /* $MOE_FORTUNES_DIR when root is NULL */
    setenv("MOE_FORTUNES_DIR", r, 1);
    CHECK(fortunes_load(&d, NULL, msg, sizeof msg) == 0, "load via MOE_FORTUNES_DIR: %s", msg);
    CHECK(d.n_train == c.n_train && memcmp(d.train, c.train, (size_t)c.n_train) == 0, "env root differs");
    fortunes_free(&d);
    unsetenv("MOE_FORTUNES_DIR");

    fortunes_free(&c);
    CHECK(c.train == NULL && c.n_train == 0 && c.val_lang == NULL, "fortunes_free did not zero");
    fortunes_free(&c);
    fortunes_free(NULL);
    expect_free(&e);
}

/* Only English and German: the others are listed as missing, with their packages. */
static void test_missing(const char *tmp) {
    char r[4096];
    snprintf(r, sizeof r, "%s/partial", tmp);
    mkdir(r, 0755);
    WRITE(r, "fortunes", "One.\n%\nTwo.\n");
    WRITE(r, "de/witze", "Drei.\n");
    fortunes_corpus c;
    char msg[1024];
    CHECK(fortunes_load(&c, r, msg, sizeof msg) == 0, "partial root: %s", msg);
    CHECK(strcmp(c.missing, "es it ru zh pl cs") == 0, "missing '%s'", c.missing);
    CHECK(strstr(msg, "es it ru zh pl cs") && strstr(msg, "apt-get install fortunes-es fortunes-it") &&
              strstr(msg, "fortunes-cs"),
          "message: %s", msg);
    CHECK(c.n_lang == 8 && strcmp(c.lang[7], "cs") == 0, "n_lang %d", c.n_lang);
    CHECK(c.docs[0][0] + c.docs[0][1] == 2 && c.docs[1][0] + c.docs[1][1] == 1, "en %lld de %lld docs",
          (long long)(c.docs[0][0] + c.docs[0][1]), (long long)(c.docs[1][0] + c.docs[1][1]));
    for (int l = 2; l < 8; l++)
        CHECK(c.docs[l][0] + c.docs[l][1] == 0 && c.files[l] == 0, "%s not empty", c.lang[l]);
    fortunes_free(&c);
}

static void test_errors(const char *tmp) {
    fortunes_corpus c;
    char msg[1024], r[4096];
    snprintf(r, sizeof r, "%s/empty", tmp);
    mkdir(r, 0755);
    memset(&c, 0x55, sizeof c);
    CHECK(fortunes_load(&c, r, msg, sizeof msg) == -1, "an empty root loads");
    CHECK(strstr(msg, "apt-get install fortunes") && strstr(msg, r) && strstr(msg, "tools/deps.sh corpus"),
          "message: %s", msg);
    CHECK(c.train == NULL && c.n_train == 0 && c.n_lang == 0, "out not zeroed on error");

    snprintf(r, sizeof r, "%s/does-not-exist", tmp);
    CHECK(fortunes_load(&c, r, msg, sizeof msg) == -1, "an absent root loads");
    CHECK(strstr(msg, "apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh "
                      "fortunes-pl fortunes-cs") != NULL,
          "message: %s", msg);
    setenv("MOE_FORTUNES_DIR", r, 1);
    CHECK(fortunes_load(&c, NULL, msg, sizeof msg) == -1, "an absent $MOE_FORTUNES_DIR loads");
    CHECK(strstr(msg, "MOE_FORTUNES_DIR") && strstr(msg, "apt-get install fortunes"), "message: %s", msg);
    unsetenv("MOE_FORTUNES_DIR");
    CHECK(fortunes_load(&c, r, NULL, 0) == -1, "no message buffer");

    /* a file over 64 MiB (sparse: no disk) is refused, with its name */
    snprintf(r, sizeof r, "%s/huge", tmp);
    mkdir(r, 0755);
    char path[4200];
    snprintf(path, sizeof path, "%s/de", r);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/de/witze", r);
    FILE *f = fopen(path, "wb");
    CHECK(f && ftruncate(fileno(f), FORTUNES_MAX_FILE + 1) == 0, "sparse file");
    if (f) fclose(f);
    WRITE(r, "fortunes", "Small.\n");
    CHECK(fortunes_load(&c, r, msg, sizeof msg) == -1, "a 64 MiB + 1 file loads");
    CHECK(strstr(msg, "de/witze") && strstr(msg, "64 MiB"), "message: %s", msg);
    CHECK(c.train == NULL && c.n_lang == 0, "out not zeroed on error");

    /* names, packages, hash */
    static const char *titles[8] = {"English", "German",  "Spanish", "Italian",
                                    "Russian", "Chinese", "Polish",  "Czech"};
    for (int l = 0; l < 8; l++) {
        CHECK(strcmp(fortunes_lang_title(l), titles[l]) == 0, "title %d", l);
        CHECK(fortunes_lang_index(fortunes_lang_name(l)) == l, "index of %s", fortunes_lang_name(l));
        CHECK(strncmp(fortunes_lang_package(l), "fortunes", 8) == 0, "package %d", l);
    }
    CHECK(!fortunes_lang_name(8) && !fortunes_lang_name(-1) && !fortunes_lang_title(8) &&
              !fortunes_lang_package(-1) && fortunes_lang_index("xx") == -1 &&
              fortunes_lang_index(NULL) == -1,
          "out of range");
    CHECK(fortunes_hash("", 0) == 0xcbf29ce484222325ULL && fortunes_hash("a", 1) == 0xaf63dc4c8601ec8cULL &&
              fortunes_hash("foobar", 6) == 0x85944171f73967e8ULL,
          "FNV-1a 64 test vectors");
    static const struct {
        const char *s;
        int ok;
    } u[] = {{"abc", 1},      {"\xc3\xa9", 1},     {"\xe2\x82\xac", 1}, {"\xf0\x9f\x98\x80", 1},
             {"\xc0\xaf", 0}, {"\xe0\x80\xaf", 0}, {"\xed\xa0\x80", 0}, {"\xf4\x90\x80\x80", 0},
             {"\xc3", 0},     {"\x80", 0},         {"\xff", 0},         {"\xe2\x82", 0}};
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++)
        CHECK(fortunes_utf8_valid((const uint8_t *)u[i].s, strlen(u[i].s)) == u[i].ok &&
                  utf8_ok((const uint8_t *)u[i].s, (int64_t)strlen(u[i].s)) == u[i].ok,
              "utf8 case %zu", i);
}

/* Line starts "<xx> " whose bytes carry language l: at least one per document. */
static void check_split_real(const char *name, const uint8_t *t, const int8_t *la, int64_t n,
                             const fortunes_corpus *c, int v) {
    CHECK(utf8_ok(t, n), "%s is not valid UTF-8", name);
    int64_t ctrl = 0, per_lang[8] = {0}, starts[8] = {0}, bad_lang = 0;
    for (int64_t i = 0; i < n; i++) {
        if ((t[i] < 0x20 && t[i] != '\n' && t[i] != '\t') || t[i] == 0x7F) ctrl++;
        if (la[i] < 0 || la[i] >= 8) {
            bad_lang++;
            continue;
        }
        per_lang[la[i]]++;
        if ((i == 0 || t[i - 1] == '\n') && i + 5 <= n && t[i] == '<' && t[i + 3] == '>' && t[i + 4] == ' ' &&
            memcmp(t + i + 1, c->lang[la[i]], 2) == 0)
            starts[la[i]]++;
    }
    CHECK(ctrl == 0, "%s: %lld control bytes", name, (long long)ctrl);
    CHECK(bad_lang == 0, "%s: %lld bytes with no language", name, (long long)bad_lang);
    CHECK(n > 0 && t[n - 1] == '\n' && t[n] == 0, "%s does not end with a newline and NUL", name);
    for (int l = 0; l < 8; l++) {
        CHECK(per_lang[l] == c->bytes[l][v], "%s %s: %lld language bytes, counted %lld", name, c->lang[l],
              (long long)per_lang[l], (long long)c->bytes[l][v]);
        CHECK(starts[l] >= c->docs[l][v], "%s %s: %lld tagged line starts for %lld documents", name,
              c->lang[l], (long long)starts[l], (long long)c->docs[l][v]);
    }
}

static void test_real(void) {
    struct stat st;
    if (stat(FORTUNES_DEFAULT_ROOT, &st) != 0) {
        const char *req = getenv("MOE_REQUIRE_FORTUNES");
        if (req && strcmp(req, "1") == 0)
            CHECK(0, "%s is missing and MOE_REQUIRE_FORTUNES=1; install: %s", FORTUNES_DEFAULT_ROOT,
                  FORTUNES_INSTALL_HINT);
        else
            printf("test_fortunes: the real corpus: skipped (%s is missing; install: %s)\n",
                   FORTUNES_DEFAULT_ROOT, FORTUNES_INSTALL_HINT);
        return;
    }
    fortunes_corpus c;
    char msg[1024];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = fortunes_load(&c, FORTUNES_DEFAULT_ROOT, msg, sizeof msg);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    CHECK(rc == 0, "load %s: %s", FORTUNES_DEFAULT_ROOT, msg);
    if (rc) return;
    CHECK(c.missing[0] == '\0', "missing languages: %s (%s)", c.missing, msg);
    int64_t n = c.n_train + c.n_val;
    printf("the real corpus (%s): loaded in %.3f s; %lld train + %lld val bytes (%.2f%% val), "
           "%lld duplicates, %lld skipped (%lld unconvertible, %lld over 64 KiB)\n",
           FORTUNES_DEFAULT_ROOT, secs, (long long)c.n_train, (long long)c.n_val,
           100.0 * (double)c.n_val / (double)n, (long long)c.duplicates, (long long)c.skipped,
           (long long)c.skipped_bad, (long long)c.skipped_long);
    printf("  lang  %-8s %5s %6s %8s %6s %10s %9s\n", "name", "files", "legacy", "docs", "val", "bytes",
           "val");
    for (int l = 0; l < c.n_lang; l++) {
        printf("  %-5s %-8s %5lld %6lld %8lld %6lld %10lld %9lld\n", c.lang[l], fortunes_lang_title(l),
               (long long)c.files[l], (long long)c.legacy_files[l], (long long)c.docs[l][0],
               (long long)c.docs[l][1], (long long)c.bytes[l][0], (long long)c.bytes[l][1]);
        CHECK(c.docs[l][0] > 0 && c.docs[l][1] > 0, "%s: %lld train, %lld val documents", c.lang[l],
              (long long)c.docs[l][0], (long long)c.docs[l][1]);
    }
    double fv = (double)c.n_val / (double)n;
    CHECK(fv >= 0.03 && fv <= 0.07, "validation fraction %.4f", fv);
    int64_t docs = sum2(c.docs, 0) + sum2(c.docs, 1);
    double fd = (double)sum2(c.docs, 1) / (double)docs;
    CHECK(fd >= 0.03 && fd <= 0.07, "validation fraction of documents %.4f", fd);
    check_split_real("train", c.train, c.train_lang, c.n_train, &c, 0);
    check_split_real("val", c.val, c.val_lang, c.n_val, &c, 1);
    fortunes_free(&c);
}

int main(void) {
    char tmp[] = "/tmp/test_fortunes.XXXXXX";
    if (!mkdtemp(tmp)) {
        CHECK(0, "mkdtemp");
        return check_summary("test_fortunes");
    }
    test_fake(tmp);
    test_missing(tmp);
    test_errors(tmp);
    rm_tree(tmp);
    test_real();
    return check_summary("test_fortunes");
}

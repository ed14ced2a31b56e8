/*
 * The multilingual fortunes corpus (see fortunes.h): the language -> files
 * table, reading with a size cap, conversion to UTF-8 with iconv(3), entry
 * splitting and cleaning, de-duplication and the hash split.
 * Units: bytes of text.
 */
#include "fortunes.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <iconv.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------
 * The table. Paths are relative to the root; "dir/" means every fortune file
 * directly in dir (sub-directories are not entered, so es/off, the offensive
 * Spanish fortunes, is never read; neither is the top-level off/ of
 * fortunes-off, which no entry names). Names ending in .dat (the indexes)
 * are skipped, and so are NAME.u8 twins when NAME exists: in these packages
 * they are symlinks to NAME, or empty files (fortunes-pl). Lists are in
 * strcmp order; a directory is read in strcmp order of its names.
 *
 * en: the top-level files owned by fortunes and fortunes-min (riddles,
 *     literature and fortunes are fortunes-min's), except ascii-art: it is
 *     drawings, not prose. `art` stays: it is jokes and quotes about art.
 *     The other top-level names are not English: chinese, song100 and
 *     tang300 are fortunes-zh's; adams, banner, computer, ... are
 *     fortunes-it's symlinks into it/ (read there, once).
 * zh: chinese (sayings and the Debian code of conduct), song100 (Song ci),
 *     tang300 (the 300 Tang poems), all top-level; there is no zh/.
 * cs: cs/ and cz/ (in the Debian packages here every cz/NAME is a symlink
 *     to cs/NAME, read once; in other layouts they may be copies: exact
 *     duplicates are dropped anyway).
 *     sk/ and klasik-sk are Slovak, not Czech, and are left out.
 * Excluded as drawings rather than text (their letters are under a third of
 * their non-space characters): de/asciiart, it/banner (a banner), pl/cows
 * (cowsay cows).
 *
 * Legacy encodings, tried in order for a file that is not valid UTF-8 (the
 * Debian packages installed here are all UTF-8 already; older ones and
 * upstream tarballs were Latin-1, KOI8-R, ISO-8859-2, GB2312):
 * Latin-1 languages: ISO-8859-1, then CP1252 (its superset with quotes and
 * dashes at 0x80..0x9F, which ISO-8859-1 turns into C1 controls, a failure).
 * ru: KOI8-R (it maps every byte, so CP1251 is only reached where iconv has
 * no KOI8-R). zh: GB18030 (a superset of GB2312 and GBK), then BIG5 (Big5
 * text mostly decodes as GBK too, so traditional Chinese is only recognised
 * when GB18030 fails). pl, cs: ISO-8859-2, then CP1250.
 */
static const char *const fx_en_paths[] = {
    "art",       "computers",  "cookie",        "debian",       "definitions", "disclaimer", "drugs",
    "education", "ethnic",     "food",          "fortunes",     "goedel",      "humorists",  "kids",
    "knghtbrd",  "law",        "linux",         "linuxcookie",  "literature",  "love",       "magic",
    "medicine",  "men-women",  "miscellaneous", "news",         "paradoxum",   "people",     "perl",
    "pets",      "platitudes", "politics",      "pratchett",    "riddles",     "science",    "songs-poems",
    "sports",    "startrek",   "tao",           "translate-me", "wisdom",      "work",       "zippy",
    NULL};
static const char *const fx_de_paths[] = {"de/", NULL};
static const char *const fx_es_paths[] = {"es/", NULL};
static const char *const fx_it_paths[] = {"it/", NULL};
static const char *const fx_ru_paths[] = {"ru/", NULL};
static const char *const fx_zh_paths[] = {"chinese", "song100", "tang300", NULL};
static const char *const fx_pl_paths[] = {"pl/", NULL};
static const char *const fx_cs_paths[] = {"cs/", "cz/", NULL};

static const char *const fx_latin1[] = {"ISO-8859-1", "CP1252", NULL};
static const char *const fx_cyrillic[] = {"KOI8-R", "CP1251", NULL};
static const char *const fx_chinese[] = {"GB18030", "BIG5", NULL};
static const char *const fx_latin2[] = {"ISO-8859-2", "CP1250", NULL};

/* Files inside a listed directory that are left out (see above). */
static const char *const fx_excluded[] = {"cs/klasik-sk", "cz/klasik-sk", "de/asciiart",
                                          "it/banner",    "pl/cows",      NULL};

typedef struct {
    const char *code, *title, *package;
    const char *const *paths;  /* NULL-terminated */
    const char *const *legacy; /* iconv encoding names, NULL-terminated */
} fx_lang;

static const fx_lang fx_langs[FORTUNES_NLANG] = {
    {"en", "English", "fortunes", fx_en_paths, fx_latin1},
    {"de", "German", "fortunes-de", fx_de_paths, fx_latin1},
    {"es", "Spanish", "fortunes-es", fx_es_paths, fx_latin1},
    {"it", "Italian", "fortunes-it", fx_it_paths, fx_latin1},
    {"ru", "Russian", "fortunes-ru", fx_ru_paths, fx_cyrillic},
    {"zh", "Chinese", "fortunes-zh", fx_zh_paths, fx_chinese},
    {"pl", "Polish", "fortunes-pl", fx_pl_paths, fx_latin2},
    {"cs", "Czech", "fortunes-cs", fx_cs_paths, fx_latin2},
};

const char *fortunes_lang_name(int i) { return i >= 0 && i < FORTUNES_NLANG ? fx_langs[i].code : NULL; }
const char *fortunes_lang_title(int i) { return i >= 0 && i < FORTUNES_NLANG ? fx_langs[i].title : NULL; }
const char *fortunes_lang_package(int i) { return i >= 0 && i < FORTUNES_NLANG ? fx_langs[i].package : NULL; }

int fortunes_lang_index(const char *code) {
    for (int i = 0; code && i < FORTUNES_NLANG; i++)
        if (strcmp(fx_langs[i].code, code) == 0) return i;
    return -1;
}

uint64_t fortunes_hash(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int fortunes_utf8_valid(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint8_t lo = 0x80, hi = 0xBF; /* the allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            len = 2;
        else if (c == 0xE0)
            len = 3, lo = 0xA0; /* no overlong forms */
        else if (c == 0xED)
            len = 3, hi = 0x9F; /* no surrogates */
        else if (c >= 0xE1 && c <= 0xEF)
            len = 3;
        else if (c == 0xF0)
            len = 4, lo = 0x90; /* no overlong forms */
        else if (c >= 0xF1 && c <= 0xF3)
            len = 4;
        else if (c == 0xF4)
            len = 4, hi = 0x8F; /* nothing above U+10FFFF */
        else
            return 0;
        if (n - i < len || p[i + 1] < lo || p[i + 1] > hi) return 0;
        for (size_t k = 2; k < len; k++)
            if ((p[i + k] & 0xC0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

/* ------------------------------------------------------------------------
 * Loading state. */

typedef struct {
    uint8_t *text; /* (text_cap) documents, NUL after the last */
    int8_t *lang;  /* (lang_cap) */
    int64_t n;
    size_t text_cap, lang_cap;
} fx_split;

typedef struct {
    uint64_t hash;
    int64_t off; /* of the text (after the tag) in its split; the split is hash % MOD == 0 */
    int64_t len; /* 0: an empty slot (entries are never empty) */
} fx_slot;

typedef struct {
    dev_t dev;
    ino_t ino;
} fx_id;

typedef struct {
    fortunes_corpus *out;
    const char *root;
    fx_split split[2]; /* [0] train, [1] val */
    fx_slot *set;      /* (set_cap) open addressing on the text hash, a power of two */
    size_t set_cap, set_n;
    fx_id *seen; /* (n_seen) files already read */
    size_t n_seen, cap_seen;
    uint8_t *conv; /* (conv_cap) one entry converted to UTF-8 */
    size_t conv_cap;
    uint8_t *clean; /* (clean_cap) one entry cleaned */
    size_t clean_cap;
    char *msg;
    size_t msg_len;
} fx_state;

static int fx_err(fx_state *s, const char *fmt, ...) {
    if (s->msg && s->msg_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->msg, s->msg_len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* p (elements of elem bytes, *cap of them) grown by doubling to hold at
 * least need > 0 elements; p itself when it does already. NULL when out of
 * memory: p is then unchanged and still valid. */
static void *fx_grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (p && need <= *cap) return p;
    size_t c = *cap ? *cap : 64;
    while (c < need) {
        if (c > SIZE_MAX / 2 / elem) return NULL;
        c *= 2;
    }
    void *q = realloc(p, c * elem);
    if (q) *cap = c;
    return q;
}

/* Set p to fx_grow(p, ...) when that succeeds (through a void *tmp_ that the
 * caller declares): 0, or -1 when out of memory (p unchanged). */
#define FX_GROW(p, cap, need) ((tmp_ = fx_grow((p), (cap), (need), sizeof *(p))) ? ((p) = tmp_, 0) : -1)

/* Is the text (t, n) of hash h already in the corpus? */
static int fx_set_has(const fx_state *s, uint64_t h, const uint8_t *t, size_t n) {
    if (!s->set_cap) return 0;
    const fx_split *sp = &s->split[h % FORTUNES_VAL_MOD == 0];
    for (size_t i = (size_t)h & (s->set_cap - 1);; i = (i + 1) & (s->set_cap - 1)) {
        const fx_slot *e = &s->set[i];
        if (!e->len) return 0;
        if (e->hash == h && (size_t)e->len == n && memcmp(sp->text + e->off, t, n) == 0) return 1;
    }
}

static void fx_set_put(fx_slot *set, size_t cap, fx_slot e) {
    size_t i = (size_t)e.hash & (cap - 1);
    while (set[i].len) i = (i + 1) & (cap - 1);
    set[i] = e;
}

/* Add (h, off, len) to the set, growing it to keep it at most half full. */
static int fx_set_add(fx_state *s, uint64_t h, int64_t off, int64_t len) {
    if ((s->set_n + 1) * 2 > s->set_cap) {
        size_t cap = s->set_cap ? s->set_cap * 2 : 4096;
        fx_slot *set = calloc(cap, sizeof *set);
        if (!set) return -1;
        for (size_t i = 0; i < s->set_cap; i++)
            if (s->set[i].len) fx_set_put(set, cap, s->set[i]);
        free(s->set);
        s->set = set;
        s->set_cap = cap;
    }
    fx_set_put(s->set, s->set_cap, (fx_slot){h, off, len});
    s->set_n++;
    return 0;
}

/* Append the document "<code> text\n" of language lang to its split. */
static int fx_append(fx_state *s, int lang, uint64_t h, const uint8_t *t, size_t n) {
    int v = h % FORTUNES_VAL_MOD == 0;
    fx_split *sp = &s->split[v];
    const char *code = fx_langs[lang].code;
    size_t tag = strlen(code) + 3; /* "<" code ">" " " */
    size_t doc = tag + n + 1;
    if (s->split[0].n + s->split[1].n + (int64_t)doc > FORTUNES_MAX_TOTAL)
        return fx_err(s, "fortunes: the corpus under %s passes %lld MiB; refusing it", s->root,
                      (long long)(FORTUNES_MAX_TOTAL >> 20));
    size_t need = (size_t)sp->n + doc;
    void *tmp_;
    if (FX_GROW(sp->text, &sp->text_cap, need + 1) || FX_GROW(sp->lang, &sp->lang_cap, need))
        return fx_err(s, "fortunes: out of memory");
    uint8_t *d = sp->text + sp->n;
    d[0] = '<';
    memcpy(d + 1, code, tag - 3);
    d[tag - 2] = '>';
    d[tag - 1] = ' ';
    memcpy(d + tag, t, n);
    d[tag + n] = '\n';
    d[doc] = '\0';
    memset(sp->lang + sp->n, lang, doc);
    if (fx_set_add(s, h, sp->n + (int64_t)tag, (int64_t)n)) return fx_err(s, "fortunes: out of memory");
    sp->n += (int64_t)doc;
    s->out->docs[lang][v]++;
    s->out->bytes[lang][v] += (int64_t)doc;
    return 0;
}

/* Convert (in, n) with cd into s->conv. Returns the UTF-8 length, -1 when a
 * byte cannot be converted or the result has a C1 control (U+0080..U+009F:
 * the bytes 0x80..0x9F of a wrongly guessed ISO-8859 encoding), -2 when out
 * of memory. */
static int64_t fx_convert(fx_state *s, iconv_t cd, const uint8_t *in, size_t n) {
    void *tmp_;
    if (FX_GROW(s->conv, &s->conv_cap, 4 * n + 16)) return -2; /* at most 3 out per byte in */
    iconv(cd, NULL, NULL, NULL, NULL);                         /* the initial state */
    char *ip = (char *)in, *op = (char *)s->conv;
    size_t il = n, ol = s->conv_cap;
    if (iconv(cd, &ip, &il, &op, &ol) == (size_t)-1 || iconv(cd, NULL, NULL, &op, &ol) == (size_t)-1)
        return -1;
    size_t m = s->conv_cap - ol;
    for (size_t i = 0; i + 1 < m; i++)
        if (s->conv[i] == 0xC2 && s->conv[i + 1] >= 0x80 && s->conv[i + 1] <= 0x9F) return -1;
    return (int64_t)m;
}

/* Clean the UTF-8 text (p, n) into s->clean (see fortunes.h: CRs, escape
 * sequences, overstrike, control characters, U+FEFF). Returns its length
 * (never more than n), or -1 when out of memory. */
static int64_t fx_clean(fx_state *s, const uint8_t *p, size_t n) {
    void *tmp_;
    if (FX_GROW(s->clean, &s->clean_cap, n + 1)) return -1;
    uint8_t *o = s->clean;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c == 0x1B) { /* ESC '[' parameters intermediates final, or a lone ESC */
            if (i + 1 < n && p[i + 1] == '[') {
                i += 2;
                while (i < n && p[i] >= 0x20 && p[i] <= 0x3F) i++;
                if (!(i < n && p[i] >= 0x40 && p[i] <= 0x7E)) i--; /* no final byte: keep what follows */
            }
            continue;
        }
        if (c == '\b') { /* overstrike: the next character replaces the one before */
            if (k > 0 && o[k - 1] != '\n') {
                k--;
                while (k > 0 && (o[k] & 0xC0) == 0x80) k--;
            }
            continue;
        }
        if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7F) continue;
        if (c == 0xC2 && i + 1 < n && p[i + 1] >= 0x80 && p[i + 1] <= 0x9F) { /* C1 control */
            i++;
            continue;
        }
        if (c == 0xEF && i + 2 < n && p[i + 1] == 0xBB && p[i + 2] == 0xBF) { /* U+FEFF */
            i += 2;
            continue;
        }
        o[k++] = c;
    }
    return (int64_t)k;
}

/* One raw entry of a file (the bytes between separator lines), in UTF-8
 * already (cd NULL) or to convert with cd. Skips, drops or appends it.
 * Returns 0, or -1 with the message set. */
static int fx_entry(fx_state *s, int lang, const uint8_t *raw, size_t n, iconv_t cd) {
    if ((int64_t)n > FORTUNES_MAX_ENTRY) {
        s->out->skipped_long++;
        return 0;
    }
    const uint8_t *p = raw;
    size_t m = n;
    if (cd) {
        int64_t r = fx_convert(s, cd, raw, n);
        if (r == -2) return fx_err(s, "fortunes: out of memory");
        if (r < 0) {
            s->out->skipped_bad++;
            return 0;
        }
        p = s->conv, m = (size_t)r;
    }
    int64_t k = fx_clean(s, p, m);
    if (k < 0) return fx_err(s, "fortunes: out of memory");
    const uint8_t *t = s->clean;
    size_t e = (size_t)k, a = 0;
    while (e > 0 && (t[e - 1] == ' ' || t[e - 1] == '\t' || t[e - 1] == '\n')) e--; /* trailing blank */
    while (a < e) { /* leading blank lines (a line's own indentation stays) */
        size_t j = a;
        while (j < e && (t[j] == ' ' || t[j] == '\t')) j++;
        if (j < e && t[j] == '\n')
            a = j + 1;
        else
            break;
    }
    if (a >= e) return 0; /* empty */
    t += a, e -= a;
    if (!fortunes_utf8_valid(t, e)) { /* cannot happen after the checks above; kept as the guarantee */
        s->out->skipped_bad++;
        return 0;
    }
    uint64_t h = fortunes_hash(t, e);
    if (fx_set_has(s, h, t, e)) {
        s->out->duplicates++;
        return 0;
    }
    return fx_append(s, lang, h, t, e);
}

/* The next entry of buf[*pos, n): *start and *len cover the lines before the
 * next separator line ("%" and optional spaces, tabs, CRs) or the end;
 * *pos moves past the separator. Returns 0 when nothing is left. */
static int fx_next_entry(const uint8_t *buf, size_t n, size_t *pos, size_t *start, size_t *len) {
    size_t i = *pos;
    if (i >= n) return 0;
    *start = i;
    while (i < n) {
        const uint8_t *nl = memchr(buf + i, '\n', n - i);
        size_t le = nl ? (size_t)(nl - buf) : n; /* the line is [i, le) */
        int sep = buf[i] == '%';
        for (size_t j = i + 1; sep && j < le; j++) sep = buf[j] == ' ' || buf[j] == '\t' || buf[j] == '\r';
        if (sep) {
            *len = i - *start;
            *pos = nl ? le + 1 : n;
            return 1;
        }
        i = nl ? le + 1 : n;
    }
    *len = n - *start;
    *pos = n;
    return 1;
}

/* Read the regular file at path into *buf (*n bytes, malloc'd). Returns 1
 * when read, 0 to skip it (absent, not a regular file, read already), -1 on
 * an error (message set). */
static int fx_read(fx_state *s, const char *path, uint8_t **buf, size_t *n) {
    *buf = NULL, *n = 0;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); /* O_NONBLOCK: a FIFO must not hang us */
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP) return 0;
        return fx_err(s, "fortunes: cannot open %s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return fx_err(s, "fortunes: cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return 0;
    }
    for (size_t i = 0; i < s->n_seen; i++)
        if (s->seen[i].dev == st.st_dev && s->seen[i].ino == st.st_ino) {
            close(fd);
            return 0;
        }
    if (st.st_size > FORTUNES_MAX_FILE) {
        close(fd);
        return fx_err(s,
                      "fortunes: %s is %lld bytes, over the %lld MiB limit for one fortune file; refusing it",
                      path, (long long)st.st_size, (long long)(FORTUNES_MAX_FILE >> 20));
    }
    void *tmp_;
    if (FX_GROW(s->seen, &s->cap_seen, s->n_seen + 1)) {
        close(fd);
        return fx_err(s, "fortunes: out of memory");
    }
    s->seen[s->n_seen++] = (fx_id){st.st_dev, st.st_ino};
    size_t size = (size_t)st.st_size, got = 0;
    uint8_t *b = malloc(size + 1);
    if (!b) {
        close(fd);
        return fx_err(s, "fortunes: out of memory reading %s", path);
    }
    while (got < size) { /* a file that shrank meanwhile ends early; one that grew is read to size */
        ssize_t r = read(fd, b + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            free(b);
            close(fd);
            return fx_err(s, "fortunes: cannot read %s: %s", path, strerror(e));
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    close(fd);
    *buf = b, *n = got;
    return 1;
}

/* Append word to the space separated list in buf (cap bytes). */
static void fx_list_add(char *buf, size_t cap, const char *word) {
    size_t k = strlen(buf);
    snprintf(buf + k, cap - k, "%s%s", k ? " " : "", word);
}

/* Read one fortune file of language lang. Returns 0, or -1 with the message. */
static int fx_file(fx_state *s, int lang, const char *path) {
    uint8_t *buf;
    size_t n;
    int r = fx_read(s, path, &buf, &n);
    if (r <= 0) return r;
    fortunes_corpus *out = s->out;
    out->files[lang]++;
    iconv_t cd = NULL;
    if (!fortunes_utf8_valid(buf, n)) { /* choose the legacy encoding that fails on the fewest entries */
        int64_t best_fails = -1;
        const char *const *enc = fx_langs[lang].legacy;
        for (int c = 0; enc[c]; c++) {
            iconv_t t = iconv_open("UTF-8", enc[c]);
            if (t == (iconv_t)-1) continue;
            int64_t fails = 0;
            size_t pos = 0, st, len;
            while (fx_next_entry(buf, n, &pos, &st, &len)) {
                if ((int64_t)len > FORTUNES_MAX_ENTRY) continue;
                int64_t m = fx_convert(s, t, buf + st, len);
                if (m == -2) {
                    iconv_close(t);
                    if (cd) iconv_close(cd);
                    free(buf);
                    return fx_err(s, "fortunes: out of memory");
                }
                fails += m < 0;
            }
            if (best_fails < 0 || fails < best_fails) {
                if (cd) iconv_close(cd);
                cd = t, best_fails = fails;
            } else {
                iconv_close(t);
            }
            if (fails == 0) break;
        }
        if (!cd) {
            char list[128] = "";
            for (int c = 0; enc[c]; c++) fx_list_add(list, sizeof list, enc[c]);
            free(buf);
            return fx_err(s, "fortunes: %s is not UTF-8, and iconv here converts from none of: %s", path,
                          list);
        }
        out->legacy_files[lang]++;
    }
    size_t pos = 0, st, len;
    int rc = 0;
    while (rc == 0 && fx_next_entry(buf, n, &pos, &st, &len)) rc = fx_entry(s, lang, buf + st, len, cd);
    if (cd) iconv_close(cd);
    free(buf);
    return rc;
}

static int fx_cmp_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int fx_has_suffix(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

/* Read the fortune files directly in root/dir of language lang, sorted by
 * name. An absent directory is no error. Returns 0, or -1 with the message. */
static int fx_dir(fx_state *s, int lang, const char *dir /* "de" */) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", s->root, dir) >= sizeof path)
        return fx_err(s, "fortunes: path too long: %s/%s", s->root, dir);
    DIR *d = opendir(path);
    if (!d) {
        if (errno == ENOENT || errno == ENOTDIR) return 0;
        return fx_err(s, "fortunes: cannot read the directory %s: %s", path, strerror(errno));
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.' || fx_has_suffix(e->d_name, ".dat")) continue;
        char *name = strdup(e->d_name);
        void *tmp_;
        if (!name || FX_GROW(names, &cap, n + 1)) {
            free(name);
            rc = fx_err(s, "fortunes: out of memory");
            break;
        }
        names[n++] = name;
    }
    closedir(d);
    if (rc == 0) qsort(names, n, sizeof *names, fx_cmp_name);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const char *name = names[i];
        if (fx_has_suffix(name, ".u8")) { /* a twin: skipped when its base is here */
            size_t bl = strlen(name) - 3;
            int has_base = 0;
            for (size_t j = 0; j < n && !has_base; j++)
                has_base = strlen(names[j]) == bl && !strncmp(names[j], name, bl);
            if (has_base) continue;
        }
        char rel[4096];
        if ((size_t)snprintf(rel, sizeof rel, "%s/%s", dir, name) >= sizeof rel ||
            (size_t)snprintf(path, sizeof path, "%s/%s", s->root, rel) >= sizeof path) {
            rc = fx_err(s, "fortunes: path too long: %s/%s/%s", s->root, dir, name);
            break;
        }
        int excluded = 0;
        for (int x = 0; fx_excluded[x] && !excluded; x++) excluded = strcmp(fx_excluded[x], rel) == 0;
        if (!excluded) rc = fx_file(s, lang, path); /* sub-directories (es/off) are skipped there */
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

int fortunes_load(fortunes_corpus *out, const char *root, char *msg, size_t msg_len) {
    memset(out, 0, sizeof *out);
    if (msg && msg_len) msg[0] = '\0';
    const char *from_env = NULL;
    if (!root || !*root) {
        from_env = getenv(FORTUNES_ENV_ROOT);
        root = from_env && *from_env ? from_env : FORTUNES_DEFAULT_ROOT;
        if (root != from_env) from_env = NULL;
    }
    fx_state s = {.out = out, .root = root, .msg = msg, .msg_len = msg_len};
    int rc = 0;
    for (int l = 0; rc == 0 && l < FORTUNES_NLANG; l++) {
        for (const char *const *p = fx_langs[l].paths; rc == 0 && *p; p++) {
            size_t k = strlen(*p);
            if (k && (*p)[k - 1] == '/') {
                char dir[256];
                snprintf(dir, sizeof dir, "%.*s", (int)(k - 1), *p);
                rc = fx_dir(&s, l, dir);
            } else {
                char path[4096];
                if ((size_t)snprintf(path, sizeof path, "%s/%s", root, *p) >= sizeof path)
                    rc = fx_err(&s, "fortunes: path too long: %s/%s", root, *p);
                else
                    rc = fx_file(&s, l, path);
            }
        }
    }
    int64_t files = 0;
    for (int l = 0; l < FORTUNES_NLANG; l++) files += out->files[l];
    if (rc == 0 && files == 0)
        rc = fx_err(&s, "no fortune files under %s%s; install them with: " FORTUNES_INSTALL_HINT, root,
                    from_env ? " (from $" FORTUNES_ENV_ROOT ")" : "");
    free(s.set);
    free(s.seen);
    free(s.conv);
    free(s.clean);
    if (rc != 0) {
        for (int i = 0; i < 2; i++) free(s.split[i].text), free(s.split[i].lang);
        memset(out, 0, sizeof *out);
        return -1;
    }
    for (int i = 0; i < 2; i++) { /* never NULL, even when a split is empty */
        if (!s.split[i].text) s.split[i].text = calloc(1, 1);
        if (!s.split[i].lang) s.split[i].lang = calloc(1, 1);
        if (!s.split[i].text || !s.split[i].lang) {
            for (int j = 0; j < 2; j++) free(s.split[j].text), free(s.split[j].lang);
            memset(out, 0, sizeof *out);
            return fx_err(&s, "fortunes: out of memory");
        }
    }
    out->train = s.split[0].text, out->train_lang = s.split[0].lang, out->n_train = s.split[0].n;
    out->val = s.split[1].text, out->val_lang = s.split[1].lang, out->n_val = s.split[1].n;
    out->n_lang = FORTUNES_NLANG;
    for (int l = 0; l < FORTUNES_NLANG; l++)
        snprintf(out->lang[l], sizeof out->lang[l], "%s", fx_langs[l].code);
    out->skipped = out->skipped_bad + out->skipped_long;
    char pkgs[256] = "";
    for (int l = 0; l < FORTUNES_NLANG; l++)
        if (!out->files[l]) {
            fx_list_add(out->missing, sizeof out->missing, fx_langs[l].code);
            fx_list_add(pkgs, sizeof pkgs, fx_langs[l].package);
        }
    if (out->missing[0])
        fx_err(&s, "no fortune files for %s under %s; install them with: apt-get install %s", out->missing,
               root, pkgs);
    return 0;
}

void fortunes_free(fortunes_corpus *c) {
    if (!c) return;
    free(c->train);
    free(c->val);
    free(c->train_lang);
    free(c->val_lang);
    memset(c, 0, sizeof *c);
}

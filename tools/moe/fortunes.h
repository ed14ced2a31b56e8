/*
 * The multilingual fortunes corpus of `moe train --corpus fortunes`: Debian's
 * fortune-cookie files (packages fortunes, fortunes-min, fortunes-de,
 * fortunes-es, fortunes-it, fortunes-ru, fortunes-zh, fortunes-pl,
 * fortunes-cs, installed under /usr/share/games/fortunes) read into one
 * UTF-8 text for training and one for validation.
 *
 * Source format: a fortune file is text; its entries (fortunes) are separated
 * by lines that are exactly "%" (trailing spaces, tabs or a CR allowed). Each
 * file NAME has an index NAME.dat (ignored) and often a NAME.u8 twin (a
 * symlink to NAME, or in fortunes-pl an empty file: ignored unless NAME is
 * absent). Which files belong to which language is a fixed table in
 * fortunes.c; files are read in that table's order and, inside a directory,
 * in strcmp order of their names, so the result is deterministic. A file
 * reached twice (a symlink such as cz/ -> cs/ or the top-level Italian names
 * -> it/) is read once.
 *
 * Encoding: a file that is valid UTF-8 is used as it is; otherwise it is
 * converted with iconv(3) from the language's legacy encodings (candidates
 * tried in order: the first that converts every entry wins, else the one
 * that fails on the fewest entries). An entry with a byte that still cannot
 * be converted (or that becomes a C1 control, U+0080..U+009F, the sign of a
 * wrong guess) is skipped and counted.
 *
 * Cleaning, per entry: CRs removed; terminal escape sequences (ESC '[' ...
 * final byte, as in the Chinese files' colours) and lone ESCs removed;
 * backspace overstrike ("_\bX", "X\bX") resolved by deleting the character
 * before each backspace on its line; other C0 controls except tab and
 * newline, DEL, C1 controls and U+FEFF removed; leading blank lines and the
 * trailing whitespace (blank lines, spaces, tabs) removed. An entry that is
 * then empty is dropped; an entry whose text equals an earlier entry's (in
 * any language) is dropped and counted as a duplicate.
 *
 * Output: each entry becomes a document
 *     "<" code ">" " " text "\n"          e.g. "<de> Wer A sagt, muss auch B sagen.\n"
 * and the documents are concatenated, train and validation separately. The
 * split is fixed by the text: an entry goes to validation iff
 * FNV-1a-64(text) % FORTUNES_VAL_MOD == 0 (text without tag and newline), so
 * it does not depend on file order or on which languages are installed.
 *
 * Units: every size, offset and count of bytes is in bytes of UTF-8 text; a
 * document is one fortune.
 */
#ifndef MOE_FORTUNES_H
#define MOE_FORTUNES_H

#include <stddef.h>
#include <stdint.h>

#define FORTUNES_DEFAULT_ROOT "/usr/share/games/fortunes"
#define FORTUNES_ENV_ROOT     "MOE_FORTUNES_DIR"  /* overrides the default root (tests) */
#define FORTUNES_NLANG        8                   /* en de es it ru zh pl cs, in this order */
#define FORTUNES_MAX_LANG     16                  /* room in the per-language tables */
#define FORTUNES_VAL_MOD      20                  /* validation iff hash % 20 == 0: 5% */
#define FORTUNES_MAX_FILE     ((int64_t)64 << 20) /* a bigger file is refused (error) */
#define FORTUNES_MAX_ENTRY    ((int64_t)64 << 10) /* a longer entry (bytes in its file) is skipped */
#define FORTUNES_MAX_TOTAL    ((int64_t)1 << 30)  /* more document bytes than this: error */
#define FORTUNES_INSTALL_HINT                                                                                \
    "apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-zh "                  \
    "fortunes-pl fortunes-cs (or: sh tools/deps.sh corpus)"

typedef struct {
    uint8_t *train, *val; /* (n_train), (n_val) documents; train[n_train] and val[n_val] are NULs */
    int64_t n_train, n_val;
    int8_t *train_lang, *val_lang;           /* (n_train), (n_val) language index of each byte's document */
    int n_lang;                              /* FORTUNES_NLANG, always, even when languages are missing */
    char lang[FORTUNES_MAX_LANG][8];         /* language codes, "en", "de", ... */
    int64_t docs[FORTUNES_MAX_LANG][2];      /* documents per language: [0] train, [1] val */
    int64_t bytes[FORTUNES_MAX_LANG][2];     /* document bytes (tag and newline included) */
    int64_t files[FORTUNES_MAX_LANG];        /* fortune files read */
    int64_t legacy_files[FORTUNES_MAX_LANG]; /* of which converted from a legacy encoding */
    int64_t skipped;                         /* entries skipped: skipped_bad + skipped_long */
    int64_t skipped_bad;                     /* a byte that could not be converted to UTF-8 */
    int64_t skipped_long;                    /* longer than FORTUNES_MAX_ENTRY bytes in the file */
    int64_t duplicates;                      /* entries dropped as exact repeats of an earlier one */
    char missing[256]; /* codes of the languages with no files, space separated; "" if none */
} fortunes_corpus;

/* Read the corpus under root into *out (the arrays are malloc'd; free with
 * fortunes_free). root NULL or "" means $MOE_FORTUNES_DIR when that is set
 * and not empty, else FORTUNES_DEFAULT_ROOT. Returns 0 when at least one fortune file
 * was found: msg is then "" or, when languages are missing (listed in
 * out->missing, their counts 0), a sentence naming them and the packages to
 * install. Returns -1 with a message in msg (and *out zeroed) when no fortune
 * file is found at all (the message says what to install: it contains
 * FORTUNES_INSTALL_HINT), a file is over FORTUNES_MAX_FILE, a listed file or
 * directory exists but cannot be read, the documents pass FORTUNES_MAX_TOTAL,
 * or memory runs out. msg may be NULL when msg_len is 0. */
int fortunes_load(fortunes_corpus *out, const char *root, char *msg, size_t msg_len);
/* Free the arrays and zero *c; a zeroed corpus or NULL is fine. */
void fortunes_free(fortunes_corpus *c);

/* The code of language i ("en", "de", "es", "it", "ru", "zh", "pl", "cs"),
 * its English name ("English", "German", ...), and the Debian package that
 * ships it ("fortunes", "fortunes-de", ...); NULL when i is out of range. */
const char *fortunes_lang_name(int i);
const char *fortunes_lang_title(int i);
const char *fortunes_lang_package(int i);
/* The index of a language code, or -1. */
int fortunes_lang_index(const char *code);

/* FNV-1a 64 of n bytes (the split hash; offset basis 0xcbf29ce484222325,
 * prime 0x100000001b3). */
uint64_t fortunes_hash(const void *p, size_t n);
/* 1 if the n bytes at p are well-formed UTF-8 (no overlong forms, no
 * surrogates, nothing above U+10FFFF), else 0. */
int fortunes_utf8_valid(const uint8_t *p, size_t n);

#endif

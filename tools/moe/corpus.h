/*
 * The built-in training corpus of `moe train`: a character-level text of
 * several distinct tasks, one per line, generated deterministically from a
 * seed so that experts have something to specialise on. Lines:
 *   copy     "C:" s "=" s "\n"              s: 1..8 random lowercase letters
 *   reverse  "R:" s "=" reverse(s) "\n"
 *   sort     "S:" s "=" sorted(s) "\n"      ascending by byte
 *   add      "A:" a "+" b "=" (a+b) "\n"    a, b: decimal 0..9999, no leading zeros
 * The task of each line is uniform at random. The generator is splitmix64 and
 * uses no global state: the text depends only on (seed, n_lines), on every
 * platform.
 */
#ifndef MOE_CORPUS_H
#define MOE_CORPUS_H

#include <stdint.h>

#define CORPUS_NTASKS 4

/* "copy", "reverse", "sort", "add" for tasks 0..3; NULL if out of range.
 * Their line tags are 'C', 'R', 'S', 'A'. */
const char *corpus_task_name(int task);

/* A generated text of len bytes (text[len] is a NUL, not counted in len).
 * For every byte i < len: task[i] is the task of its line (0..3), and
 * answer[i] is 1 for the bytes after the '=' up to and including the '\n'
 * (what a model can be scored on), else 0. */
typedef struct {
    char *text;
    int8_t *task;
    uint8_t *answer;
    int64_t len;
} corpus;

/* Generate n_lines lines into *out; the arrays are malloc'd (free with
 * corpus_free). Returns 0, or -1 on allocation failure or n_lines < 1, in
 * which case nothing is allocated and *out is zeroed. Lines come out in
 * order: the first k lines are the same for any n_lines >= k. */
int corpus_generate(corpus *out, uint64_t seed, int64_t n_lines);
/* Free the arrays and zero *c; a zeroed corpus or NULL is fine. */
void corpus_free(corpus *c);
/* The task of a line given its first byte (the tag), or -1 if none. */
int corpus_task_of_tag(char tag);

#endif

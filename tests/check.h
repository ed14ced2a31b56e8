/*
 * Minimal test harness: CHECK records a failure and goes on; each test
 * program ends with check_summary(), which prints "N passed, N failed" for
 * its checks and returns the exit code.
 */
#ifndef MOE_CHECK_H
#define MOE_CHECK_H
#include <math.h>
#include <stdio.h>

static int check_pass_, check_fail_;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (cond) {                                                           \
            check_pass_++;                                                    \
        } else {                                                              \
            check_fail_++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
        }                                                                     \
    } while (0)

/* A status check: prints the library's message when it is not the expected one. */
#define CHECK_STATUS(expr, expected)                                          \
    do {                                                                      \
        moe_status s_ = (expr);                                               \
        CHECK(s_ == (expected), "got %s, want %s (%s)", moe_status_str(s_),   \
              moe_status_str(expected), moe_last_error());                    \
    } while (0)

/* N(0,1) test data from a 64-bit LCG state (Box-Muller on two draws). */
static inline float check_nrand(unsigned long long *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    double u1 = ((double)(*state >> 11) + 1.0) / 9007199254740993.0;
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    double u2 = (double)(*state >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static inline int check_summary(const char *name) {
    printf("%s: %d passed, %d failed\n", name, check_pass_, check_fail_);
    return check_fail_ ? 1 : 0;
}
#endif

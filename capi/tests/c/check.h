/* Checks shared by the C test programs: each failed check prints where and why, then
 * exits with status 1 (the Rust test that runs the program shows its output). */
#ifndef PARASYNC_TEST_CHECK_H
#define PARASYNC_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parasync.h"

/* The call must succeed. */
#define CHECK_OK(call)                                                                        \
    do {                                                                                      \
        ParasyncStatus status_ = (call);                                                      \
        if (status_ != PARASYNC_STATUS_OK) {                                                  \
            fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,          \
                    parasync_status_name(status_), parasync_last_error());                   \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* The call must fail with `want`, and parasync_last_error() must contain `needle`. */
#define CHECK_FAILS(call, want, needle)                                                       \
    do {                                                                                      \
        ParasyncStatus status_ = (call);                                                      \
        const char *message_ = parasync_last_error();                                         \
        if (status_ != (want) || strstr(message_, (needle)) == NULL) {                        \
            fprintf(stderr, "%s:%d: %s returned %s (\"%s\"), expected %s with \"%s\"\n",       \
                    __FILE__, __LINE__, #call, parasync_status_name(status_), message_,       \
                    parasync_status_name(want), (needle));                                    \
            exit(1);                                                                          \
        }                                                                                     \
        printf("as expected: %s -> %s: %s\n", #call, parasync_status_name(status_), message_); \
    } while (0)

/* A condition that must hold. */
#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fprintf(stderr, "\n");                                                            \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* Every element of `got` equals `want` exactly (the tests use integer-valued floats). */
static inline void check_floats(const char *what, const float *got, const float *want, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (got[i] != want[i]) {
            fprintf(stderr, "%s[%zu] = %g, expected %g\n", what, i, (double)got[i], (double)want[i]);
            exit(1);
        }
    }
}

#endif

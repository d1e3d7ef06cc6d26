/* Calls that must fail, with no server and no job around: bad arguments, an address nobody
 * listens on, an empty launcher environment. Each must return its status quickly with a
 * message that names the problem.
 *
 * Usage: errors DEAD_HOST:PORT   (an address where nothing listens) */
#include <time.h>

#include "check.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    CHECK(argc == 2, "usage: %s DEAD_HOST:PORT", argv[0]);
    const char *dead[] = {argv[1]};

    /* Nothing called yet: no error. */
    CHECK(strcmp(parasync_last_error(), "") == 0, "initial last error \"%s\"", parasync_last_error());
    CHECK(parasync_last_error_rank() == -1 && parasync_last_error_seq() == -1, "initial rank and seq");
    CHECK(strcmp(parasync_status_name(PARASYNC_STATUS_UNAVAILABLE), "PARASYNC_STATUS_UNAVAILABLE") == 0,
          "status name %s", parasync_status_name(PARASYNC_STATUS_UNAVAILABLE));
    CHECK(strcmp(parasync_status_name(1000), "PARASYNC_STATUS_UNKNOWN") == 0, "unknown status name");

    /* A server that is not there: UNAVAILABLE, within about the connect timeout. */
    ParasyncPsOptions opts;
    CHECK_OK(parasync_ps_options_default(&opts));
    opts.connect_timeout_ms = 300;
    ParasyncPsClient *ps = (ParasyncPsClient *)&opts; /* must be reset to NULL */
    double started = now_s();
    CHECK_FAILS(parasync_ps_connect(dead, 1, &opts, &ps), PARASYNC_STATUS_UNAVAILABLE, "unreachable");
    double took = now_s() - started;
    CHECK(took < 10.0, "giving up took %.1f s", took);
    CHECK(ps == NULL, "*out is NULL after a failed connect");
    printf("unavailable after %.2f s\n", took);

    /* Bad arguments to connect. */
    CHECK_FAILS(parasync_ps_connect(NULL, 1, &opts, &ps), PARASYNC_STATUS_USAGE,
                "addrs is NULL but 1 elements were announced");
    const char *null_addr[] = {NULL};
    CHECK_FAILS(parasync_ps_connect(null_addr, 1, &opts, &ps), PARASYNC_STATUS_USAGE, "addrs[0] is NULL");
    CHECK_FAILS(parasync_ps_connect(dead, 1, &opts, NULL), PARASYNC_STATUS_USAGE, "out is NULL");
    CHECK_FAILS(parasync_ps_connect(NULL, 0, &opts, &ps), PARASYNC_STATUS_USAGE,
                "TF_CONFIG lists no parameter servers");
    ParasyncPsOptions bad_opts = opts;
    bad_opts.wire_dtype = PARASYNC_DTYPE_I32;
    CHECK_FAILS(parasync_ps_connect(dead, 1, &bad_opts, &ps), PARASYNC_STATUS_USAGE,
                "options.wire_dtype is i32: the parameter server stores and moves f32 and bf16 only");
    bad_opts = opts;
    bad_opts.pull_wire_dtype = 77;
    CHECK_FAILS(parasync_ps_connect(dead, 1, &bad_opts, &ps), PARASYNC_STATUS_USAGE,
                "options.pull_wire_dtype is 77");
    CHECK_FAILS(parasync_ps_options_default(NULL), PARASYNC_STATUS_USAGE, "out is NULL");
    CHECK_FAILS(parasync_ps_variable_spec_default(NULL), PARASYNC_STATUS_USAGE, "out is NULL");

    /* Calls on no client. */
    size_t n = 0;
    CHECK_FAILS(parasync_ps_num_variables(NULL, &n), PARASYNC_STATUS_USAGE, "client is NULL");
    CHECK_FAILS(parasync_ps_set_learning_rate(NULL, 0.1f), PARASYNC_STATUS_USAGE, "client is NULL");
    CHECK_FAILS(parasync_ps_register(NULL, NULL, 0), PARASYNC_STATUS_USAGE, "client is NULL");

    /* A success clears the last error. */
    CHECK_OK(parasync_ps_options_default(&opts));
    CHECK(strcmp(parasync_last_error(), "") == 0, "last error after a success: \"%s\"", parasync_last_error());

    /* Collectives without a job. */
    ParasyncComm *comm = NULL;
    CHECK_FAILS(parasync_comm_from_env(1000, &comm), PARASYNC_STATUS_ENV, "no launcher variables");
    CHECK_FAILS(parasync_comm_connect(2, 2, argv[1], NULL, 1000, &comm), PARASYNC_STATUS_USAGE,
                "rank 2 of world size 2");
    CHECK_FAILS(parasync_comm_connect(0, 2, NULL, NULL, 1000, &comm), PARASYNC_STATUS_USAGE, "master is NULL");
    started = now_s();
    CHECK_FAILS(parasync_comm_connect(1, 2, argv[1], NULL, 500, &comm), PARASYNC_STATUS_RENDEZVOUS, "");
    took = now_s() - started;
    CHECK(took < 10.0, "giving up on the rendezvous took %.1f s", took);
    CHECK(comm == NULL, "*out is NULL after a failed connect");
    CHECK_FAILS(parasync_comm_rank(NULL, &n), PARASYNC_STATUS_USAGE, "comm is NULL");

    parasync_ps_free(NULL);
    parasync_comm_free(NULL);
    printf("errors: all checks passed\n");
    return 0;
}

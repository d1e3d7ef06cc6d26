/* Against a shard that requires an auth token: a client without one, or with a wrong one,
 * is refused with PARASYNC_STATUS_UNAUTHENTICATED and a message; with the right one it
 * registers, pushes and pulls.
 *
 * Usage: auth HOST:PORT TOKEN */
#include "check.h"

int main(int argc, char **argv) {
    CHECK(argc == 3, "usage: %s HOST:PORT TOKEN", argv[0]);
    const char *addrs[] = {argv[1]};

    ParasyncPsOptions opts;
    CHECK_OK(parasync_ps_options_default(&opts));
    CHECK(opts.auth_token == NULL, "no token by default");
    opts.connect_timeout_ms = 10000;
    ParasyncPsClient *ps = NULL;
    CHECK_FAILS(parasync_ps_connect(addrs, 1, &opts, &ps), PARASYNC_STATUS_UNAUTHENTICATED, "requires an auth token");
    CHECK(ps == NULL, "no client after a refusal");
    opts.auth_token = "a-guess";
    CHECK_FAILS(parasync_ps_connect(addrs, 1, &opts, &ps), PARASYNC_STATUS_UNAUTHENTICATED, "wrong auth token");
    opts.auth_token = "not a token";
    CHECK_FAILS(parasync_ps_connect(addrs, 1, &opts, &ps), PARASYNC_STATUS_USAGE, "options.auth_token");

    opts.auth_token = argv[2];
    CHECK_OK(parasync_ps_connect(addrs, 1, &opts, &ps));
    const size_t shape[] = {3};
    const float init[3] = {1, 2, 3};
    ParasyncVariableSpec spec;
    CHECK_OK(parasync_ps_variable_spec_default(&spec));
    spec.name = "auth/w";
    spec.shape = shape;
    spec.ndim = 1;
    spec.optimizer.kind = PARASYNC_OPTIMIZER_SGD;
    spec.optimizer.lr = 1.0f;
    spec.init.kind = PARASYNC_INIT_VALUES;
    spec.init.values = init;
    spec.init.n_values = 3;
    CHECK_OK(parasync_ps_register(ps, &spec, 1));
    float w[3];
    float *outs[] = {w};
    const size_t lens[] = {3};
    const float g[3] = {1, 1, 1};
    const float *grads[] = {g};
    CHECK_OK(parasync_ps_push(ps, 0, grads, lens, 1, NULL));
    CHECK_OK(parasync_ps_pull(ps, 1, outs, lens, 1));
    const float want[3] = {0, 1, 2};
    check_floats("w@1", w, want, 3);
    parasync_ps_free(ps);
    printf("auth: all checks passed\n");
    return 0;
}

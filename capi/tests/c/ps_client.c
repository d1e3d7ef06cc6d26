/* A worker of a one-worker sync job, in C: registers two variables with explicit values
 * (SGD, learning rate 1), pushes integer-valued gradients, pulls, and checks every value
 * exactly. Then checks that bad arguments on the live client are errors with messages.
 *
 * Usage: ps_client HOST:PORT */
#include "check.h"

#define W_LEN 6
#define B_LEN 4

int main(int argc, char **argv) {
    CHECK(argc == 2, "usage: %s HOST:PORT", argv[0]);
    const char *addrs[] = {argv[1]};

    ParasyncPsOptions opts;
    CHECK_OK(parasync_ps_options_default(&opts));
    CHECK(opts.wire_dtype == PARASYNC_DTYPE_F32 && opts.pull_wire_dtype == 0, "default wire dtypes");
    opts.connect_timeout_ms = 10000;
    opts.pull_timeout_ms = 10000;
    ParasyncPsClient *ps = NULL;
    CHECK_OK(parasync_ps_connect(addrs, 1, &opts, &ps));
    size_t shards = 0;
    CHECK_OK(parasync_ps_num_shards(ps, &shards));
    CHECK(shards == 1, "%zu shards", shards);

    /* w: 2x3, b: 4, both SGD with learning rate 1 and explicit initial values. */
    const size_t w_shape[] = {2, 3}, b_shape[] = {B_LEN};
    const float w_init[W_LEN] = {1, 2, 3, 4, 5, 6}, b_init[B_LEN] = {10, 20, 30, 40};
    ParasyncVariableSpec specs[2];
    for (int i = 0; i < 2; i++) {
        CHECK_OK(parasync_ps_variable_spec_default(&specs[i]));
        specs[i].optimizer.kind = PARASYNC_OPTIMIZER_SGD;
        specs[i].optimizer.lr = 1.0f;
        specs[i].init.kind = PARASYNC_INIT_VALUES;
    }
    specs[0].name = "dense/w";
    specs[0].shape = w_shape;
    specs[0].ndim = 2;
    specs[0].init.values = w_init;
    specs[0].init.n_values = W_LEN;
    specs[1].name = "dense/b";
    specs[1].shape = b_shape;
    specs[1].ndim = 1;
    specs[1].init.values = b_init;
    specs[1].init.n_values = B_LEN;
    size_t n_vars = 99;
    CHECK_OK(parasync_ps_num_variables(ps, &n_vars));
    CHECK(n_vars == 0, "%zu variables before registering", n_vars);
    CHECK_OK(parasync_ps_register(ps, specs, 2));
    CHECK_OK(parasync_ps_register(ps, specs, 2)); /* idempotent */
    CHECK_OK(parasync_ps_num_variables(ps, &n_vars));
    CHECK(n_vars == 2, "%zu variables after registering", n_vars);

    float w[W_LEN], b[B_LEN];
    float *outs[] = {w, b};
    const size_t lens[] = {W_LEN, B_LEN};

    /* Step 0: the initial values. */
    CHECK_OK(parasync_ps_pull(ps, 0, outs, lens, 2));
    check_floats("w@0", w, w_init, W_LEN);
    check_floats("b@0", b, b_init, B_LEN);

    /* Step 0's gradients give step 1: value - 1 * gradient. */
    const float gw0[W_LEN] = {1, 1, 1, 1, 1, 1}, gb0[B_LEN] = {1, 2, 3, 4};
    const float *grads0[] = {gw0, gb0};
    ParasyncPushSummary summary = {0};
    CHECK_OK(parasync_ps_push(ps, 0, grads0, lens, 2, &summary));
    CHECK(summary.accepted == 2 && summary.dropped_stale == 0 && summary.retried == 0 && summary.duplicate == 0,
          "summary %zu accepted, %zu dropped, %zu retried, %zu duplicate", summary.accepted, summary.dropped_stale,
          summary.retried, summary.duplicate);
    CHECK_OK(parasync_ps_pull(ps, 1, outs, lens, 2));
    const float w1[W_LEN] = {0, 1, 2, 3, 4, 5}, b1[B_LEN] = {9, 18, 27, 36};
    check_floats("w@1", w, w1, W_LEN);
    check_floats("b@1", b, b1, B_LEN);

    /* Push step 1 and receive step 2 in one call. */
    const float gw1[W_LEN] = {-1, -1, -1, -1, -1, -1}, gb1[B_LEN] = {0, 0, 0, -4};
    const float *grads1[] = {gw1, gb1};
    CHECK_OK(parasync_ps_push_pull(ps, 1, grads1, outs, lens, 2, NULL));
    const float w2[W_LEN] = {1, 2, 3, 4, 5, 6}, b2[B_LEN] = {9, 18, 27, 40};
    check_floats("w@2", w, w2, W_LEN);
    check_floats("b@2", b, b2, B_LEN);

    /* A new learning rate applies to the next step. */
    CHECK_OK(parasync_ps_set_learning_rate(ps, 2.0f));
    const float gw2[W_LEN] = {1, 1, 1, 1, 1, 1}, gb2[B_LEN] = {0, 0, 0, 0};
    const float *grads2[] = {gw2, gb2};
    CHECK_OK(parasync_ps_push(ps, 2, grads2, lens, 2, NULL));
    CHECK_OK(parasync_ps_pull(ps, 3, outs, lens, 2));
    const float w3[W_LEN] = {-1, 0, 1, 2, 3, 4};
    check_floats("w@3", w, w3, W_LEN);
    check_floats("b@3", b, b2, B_LEN);
    printf("training steps: every value as expected\n");

    /* Bad arguments on a live client: errors with messages, nothing sent, the client still usable. */
    CHECK_FAILS(parasync_ps_pull(ps, 3, outs, lens, 1), PARASYNC_STATUS_USAGE,
                "1 tensors given for 2 registered variables");
    const size_t short_lens[] = {W_LEN - 1, B_LEN};
    CHECK_FAILS(parasync_ps_pull(ps, 3, outs, short_lens, 2), PARASYNC_STATUS_USAGE,
                "has shape [2, 3] (6 elements), the tensor given has 5");
    CHECK_FAILS(parasync_ps_pull(ps, 3, NULL, lens, 2), PARASYNC_STATUS_USAGE, "outs is NULL");
    CHECK_FAILS(parasync_ps_pull(ps, 3, outs, NULL, 2), PARASYNC_STATUS_USAGE, "lens is NULL");
    CHECK_FAILS(parasync_ps_pull(NULL, 3, outs, lens, 2), PARASYNC_STATUS_USAGE, "client is NULL");
    float *same[] = {w, w};
    const size_t same_lens[] = {W_LEN, W_LEN};
    CHECK_FAILS(parasync_ps_pull(ps, 3, same, same_lens, 2), PARASYNC_STATUS_USAGE,
                "outs[0] and outs[1] overlap");
    const float *missing[] = {gw2, NULL};
    CHECK_FAILS(parasync_ps_push(ps, 3, missing, lens, 2, NULL), PARASYNC_STATUS_USAGE,
                "grads[1] is NULL but 4 elements were announced");
    /* ... and the client still works: push step 3 (learning rate 2), receive step 4. */
    CHECK_OK(parasync_ps_push_pull(ps, 3, grads2, outs, lens, 2, NULL));
    const float w4[W_LEN] = {-3, -2, -1, 0, 1, 2};
    check_floats("w@4", w, w4, W_LEN);
    check_floats("b@4", b, b2, B_LEN);
    /* The shard writes a checkpoint of step 4 (the test checks its files). */
    CHECK_OK(parasync_ps_checkpoint(ps, 4));
    printf("checkpoint of step 4 written\n");
    const float *aliased[] = {w, b};
    CHECK_FAILS(parasync_ps_push_pull(ps, 4, aliased, outs, lens, 2, NULL), PARASYNC_STATUS_USAGE,
                "overlap in memory");

    ParasyncVariableSpec bad = specs[0];
    bad.optimizer.kind = 99;
    CHECK_FAILS(parasync_ps_register(ps, &bad, 1), PARASYNC_STATUS_USAGE,
                "specs[0].optimizer.kind is 99, not a PARASYNC_OPTIMIZER_* value");
    bad = specs[1];
    bad.init.n_values = 3;
    CHECK_FAILS(parasync_ps_register(ps, &bad, 1), PARASYNC_STATUS_USAGE,
                "3 initial values for shape [4] (4 elements)");
    bad = specs[1];
    bad.dtype = PARASYNC_DTYPE_F64;
    CHECK_FAILS(parasync_ps_register(ps, &bad, 1), PARASYNC_STATUS_USAGE,
                "specs[0].dtype is f64: the parameter server stores and moves f32 and bf16 only");
    /* The same name with another shape conflicts with what the server holds. */
    const size_t other_shape[] = {3, 2};
    bad = specs[0];
    bad.shape = other_shape;
    CHECK_FAILS(parasync_ps_register(ps, &bad, 1), PARASYNC_STATUS_ALREADY_EXISTS,
                "\"dense/w\" is already registered with a different definition");

    /* Nothing above changed the registered model or the values. */
    CHECK_OK(parasync_ps_num_variables(ps, &n_vars));
    CHECK(n_vars == 2, "%zu variables after the failed registrations", n_vars);
    CHECK_OK(parasync_ps_pull(ps, 4, outs, lens, 2));
    check_floats("w@4 again", w, w4, W_LEN);
    parasync_ps_free(ps);
    parasync_ps_free(NULL);
    printf("ps_client: all checks passed\n");
    return 0;
}

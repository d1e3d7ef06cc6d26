/* One rank of a two-rank job, in C.
 *
 * Usage: collectives RANK MASTER_HOST:PORT ops    -- every collective on every rank, results checked
 *        collectives RANK MASTER_HOST:PORT leave  -- rank 1 leaves after a barrier; rank 0's next
 *                                                   allreduce must fail naming rank 1 */
#include <stdint.h>

#include "check.h"

#define WORLD 2
#define N 1000

static void run_ops(ParasyncComm *comm, size_t rank) {
    /* allreduce sum, f32: rank r contributes (r + 1) * i. */
    static float f[N];
    for (size_t i = 0; i < N; i++) f[i] = (float)((rank + 1) * i);
    CHECK_OK(parasync_comm_allreduce(comm, f, N, PARASYNC_DTYPE_F32, PARASYNC_REDUCE_SUM));
    for (size_t i = 0; i < N; i++) CHECK(f[i] == (float)(3 * i), "f32 sum [%zu] = %g", i, (double)f[i]);

    /* allreduce sum, i64, past 32 bits. */
    static int64_t l[N];
    for (size_t i = 0; i < N; i++) l[i] = (int64_t)(rank + 1) * 1000000000000LL + (int64_t)i;
    CHECK_OK(parasync_comm_allreduce(comm, l, N, PARASYNC_DTYPE_I64, PARASYNC_REDUCE_SUM));
    for (size_t i = 0; i < N; i++)
        CHECK(l[i] == 3000000000000LL + 2 * (int64_t)i, "i64 sum [%zu] = %lld", i, (long long)l[i]);

    /* allreduce max, f64; avg, i32; sum, bf16 (1.0 + 2.0 = 3.0 as bit patterns). */
    double d[3] = {rank ? -1.0 : 5.0, rank ? 7.5 : 2.0, 0.25};
    CHECK_OK(parasync_comm_allreduce(comm, d, 3, PARASYNC_DTYPE_F64, PARASYNC_REDUCE_MAX));
    CHECK(d[0] == 5.0 && d[1] == 7.5 && d[2] == 0.25, "f64 max = %g %g %g", d[0], d[1], d[2]);
    int32_t a[2] = {rank ? 10 : 20, -7};
    CHECK_OK(parasync_comm_allreduce(comm, a, 2, PARASYNC_DTYPE_I32, PARASYNC_REDUCE_AVG));
    CHECK(a[0] == 15 && a[1] == -7, "i32 avg = %d %d", a[0], a[1]);
    uint16_t h[1] = {rank ? 0x4000 : 0x3F80};
    CHECK_OK(parasync_comm_allreduce(comm, h, 1, PARASYNC_DTYPE_BF16, PARASYNC_REDUCE_SUM));
    CHECK(h[0] == 0x4040, "bf16 sum = 0x%04x", h[0]);

    /* broadcast from rank 1. */
    int32_t bc[N];
    for (size_t i = 0; i < N; i++) bc[i] = rank == 1 ? 7 * (int32_t)i : -1;
    CHECK_OK(parasync_comm_broadcast(comm, bc, N, PARASYNC_DTYPE_I32, 1));
    for (size_t i = 0; i < N; i++) CHECK(bc[i] == 7 * (int32_t)i, "broadcast [%zu] = %d", i, bc[i]);

    /* allgather: rank order. */
    float mine[3] = {(float)(rank * 10), (float)(rank * 10 + 1), (float)(rank * 10 + 2)};
    float all[3 * WORLD];
    CHECK_OK(parasync_comm_allgather(comm, mine, 3, all, PARASYNC_DTYPE_F32));
    const float all_want[3 * WORLD] = {0, 1, 2, 10, 11, 12};
    check_floats("allgather", all, all_want, 3 * WORLD);

    /* reduce_scatter: the sum of [1 2 3 4] * (rank + 1) is [3 6 9 12]; rank r gets block r. */
    int32_t send[2 * WORLD], recv[2];
    for (int i = 0; i < 2 * WORLD; i++) send[i] = (i + 1) * (int32_t)(rank + 1);
    CHECK_OK(parasync_comm_reduce_scatter(comm, send, recv, 2, PARASYNC_DTYPE_I32, PARASYNC_REDUCE_SUM));
    CHECK(recv[0] == 3 * (int32_t)(2 * rank + 1) && recv[1] == 3 * (int32_t)(2 * rank + 2),
          "reduce_scatter = %d %d", recv[0], recv[1]);

    /* Bad arguments are refused before anything is sent, on both ranks alike, so the
     * communicator stays usable. */
    CHECK_FAILS(parasync_comm_allreduce(comm, NULL, 4, PARASYNC_DTYPE_F32, PARASYNC_REDUCE_SUM),
                PARASYNC_STATUS_USAGE, "buf is NULL but 4 elements were announced");
    CHECK_FAILS(parasync_comm_allreduce(comm, f, N, 42, PARASYNC_REDUCE_SUM), PARASYNC_STATUS_USAGE,
                "dtype is 42, not a PARASYNC_DTYPE_* value");
    CHECK_FAILS(parasync_comm_allreduce(comm, f, N, PARASYNC_DTYPE_F32, 0), PARASYNC_STATUS_USAGE,
                "op is 0");
    CHECK_FAILS(parasync_comm_broadcast(comm, bc, N, PARASYNC_DTYPE_I32, 5), PARASYNC_STATUS_USAGE,
                "broadcast root 5 is not a rank of 2");
    CHECK_FAILS(parasync_comm_allgather(comm, all + 1, 3, all, PARASYNC_DTYPE_F32), PARASYNC_STATUS_USAGE,
                "send and recv overlap");
    CHECK_FAILS(parasync_comm_allreduce(comm, (char *)l + 1, 2, PARASYNC_DTYPE_I64, PARASYNC_REDUCE_SUM),
                PARASYNC_STATUS_USAGE, "buf is not aligned to 8 bytes");
    CHECK_FAILS(parasync_comm_barrier(NULL), PARASYNC_STATUS_USAGE, "comm is NULL");

    CHECK_OK(parasync_comm_barrier(comm));
    CHECK(parasync_last_error()[0] == '\0' && parasync_last_error_rank() == -1, "a success clears the last error");
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: %s RANK MASTER_HOST:PORT ops|leave", argv[0]);
    size_t rank = (size_t)strtoul(argv[1], NULL, 10);
    const char *master = argv[2], *mode = argv[3];

    ParasyncComm *comm = NULL;
    CHECK_OK(parasync_comm_connect(rank, WORLD, master, "capi-test", 30000, &comm));
    size_t got_rank = 99, got_size = 99;
    CHECK_OK(parasync_comm_rank(comm, &got_rank));
    CHECK_OK(parasync_comm_size(comm, &got_size));
    CHECK(got_rank == rank && got_size == WORLD, "rank %zu of %zu", got_rank, got_size);

    if (strcmp(mode, "ops") == 0) {
        run_ops(comm, rank);
    } else if (strcmp(mode, "leave") == 0) {
        CHECK_OK(parasync_comm_barrier(comm));
        if (rank == 1) {
            parasync_comm_free(comm);
            printf("rank 1: left\n");
            return 0;
        }
        float x[4] = {1, 2, 3, 4};
        CHECK_FAILS(parasync_comm_allreduce(comm, x, 4, PARASYNC_DTYPE_F32, PARASYNC_REDUCE_SUM),
                    PARASYNC_STATUS_PEER, "rank 1");
        CHECK(parasync_last_error_rank() == 1, "the error names rank %lld", (long long)parasync_last_error_rank());
        CHECK(parasync_last_error_seq() == 1, "the failed operation is #%lld", (long long)parasync_last_error_seq());
        CHECK_FAILS(parasync_comm_barrier(comm), PARASYNC_STATUS_POISONED, "unusable after an earlier error");
    } else {
        CHECK(0, "unknown mode %s", mode);
    }
    parasync_comm_free(comm);
    parasync_comm_free(NULL);
    printf("rank %zu: all checks passed\n", rank);
    return 0;
}

/*
 * tp_decode: a tensor-parallel decode engine (the guide's "decode_tp8") that
 * discovers a prefill engine of another TP size, one thread per local rank.
 *
 *   tp_decode REMOTE_ENGINE LOCAL_TP [--size BYTES] [--timeout-ms MS] [--options JSON]
 *
 * Each local rank r opens its own client (environment, or --options JSON),
 * then:
 *   1. nixl_etcd_wait_engine(REMOTE_ENGINE): waits until every rank of the
 *      remote engine is registered and learns its size REMOTE_TP (the world
 *      size its ranks declared);
 *   2. nixl_etcd_target_ranks(LOCAL_TP, r, REMOTE_TP): the remote ranks that r
 *      reads from (vLLM's heterogeneous-TP mapping);
 *   3. nixl_etcd_wait on exactly those ranks, and checks each blob's length
 *      (BYTES, default 8192) and every byte against pattern.h.
 * MS limits each wait (< 0, the default: VLLM_NIXL_ETCD_TIMEOUT).
 *
 * Prints per local rank "tp_decode: local rank R read remote ranks [a,b]
 * (N bytes verified)", N being the total over those ranks.
 *
 * Exit status: 0 when every local rank verified, 2 on a content mismatch, 1
 * on any other error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "nixl_etcd.h"
#include "pattern.h"

#define PROG "tp_decode"
#define MAX_TP 1024u
#define USAGE                                                                                  \
    "usage: " PROG " REMOTE_ENGINE LOCAL_TP [--size BYTES] [--timeout-ms MS] [--options JSON]\n" \
    "  LOCAL_TP           number of local ranks (threads, one client each), 1..1024\n"         \
    "  --size BYTES       expected metadata bytes per remote rank (default 8192)\n"             \
    "  --timeout-ms MS    limit of each wait; < 0 = VLLM_NIXL_ETCD_TIMEOUT (default -1)\n"      \
    "  --options JSON     client options (default: environment only)\n"

struct rank_ctx {
    const char *engine_id; /* the remote engine */
    const char *options;
    uint32_t local_tp;
    uint32_t rank; /* local rank */
    size_t size;
    int64_t timeout_ms;
    uint32_t remote_tp; /* out: learnt from nixl_etcd_wait_engine */
    int result;         /* out: 0 ok, 2 mismatch, 1 error */
};

/* nixl_etcd_last_error is per thread: call this in the thread that failed. */
static void report(uint32_t rank, const char *call, nixl_etcd_status st)
{
    const char *s = nixl_etcd_status_str(st);
    const char *e = nixl_etcd_last_error();
    fprintf(stderr, PROG ": local rank %u: %s failed: %s: %s\n", rank, call,
            s ? s : "unknown status", e ? e : "");
}

/* 0 when buf is remote rank `remote`'s blob of `size` bytes, else 2 (and the
 * difference is printed). */
static int verify(const struct rank_ctx *ctx, uint32_t remote, const nixl_etcd_buffer *b)
{
    if (b->len != ctx->size) {
        fprintf(stderr, PROG ": local rank %u: remote rank %u: got %zu bytes, expected %zu\n",
                ctx->rank, remote, b->len, ctx->size);
        return 2;
    }
    if (b->len > 0 && b->data == NULL) {
        fprintf(stderr, PROG ": local rank %u: remote rank %u: %zu bytes announced but no data\n",
                ctx->rank, remote, b->len);
        return 2;
    }
    size_t off = pattern_first_mismatch(b->data, b->len, ctx->engine_id, remote);
    if (off != b->len) {
        fprintf(stderr,
                PROG ": local rank %u: remote rank %u: mismatch at offset %zu: got 0x%02x, "
                     "expected 0x%02x\n",
                ctx->rank, remote, off, b->data[off], pattern_byte(ctx->engine_id, remote, off));
        return 2;
    }
    return 0;
}

/* "[a,b,c]" into a malloc'd string (NULL when out of memory). */
static char *format_ranks(const uint32_t *ranks, size_t n)
{
    size_t cap = 3 + n * 11; /* up to 10 digits and a comma each, brackets, NUL */
    char *s = malloc(cap);
    if (s == NULL)
        return NULL;
    size_t at = 0;
    s[at++] = '[';
    for (size_t i = 0; i < n; ++i)
        at += (size_t)snprintf(s + at, cap - at, i == 0 ? "%u" : ",%u", ranks[i]);
    snprintf(s + at, cap - at, "]");
    return s;
}

/* Steps 2 and 3 for one local rank, with its open client. */
static int read_targets(struct rank_ctx *ctx, nixl_etcd_client *client)
{
    size_t n = 0;
    uint32_t *targets = malloc((size_t)ctx->remote_tp * sizeof *targets);
    if (targets == NULL) {
        fprintf(stderr, PROG ": local rank %u: out of memory\n", ctx->rank);
        return 1;
    }
    nixl_etcd_status st = nixl_etcd_target_ranks(ctx->local_tp, ctx->rank, ctx->remote_tp,
                                                 targets, ctx->remote_tp, &n);
    if (st != NIXL_ETCD_OK) {
        report(ctx->rank, "nixl_etcd_target_ranks", st);
        free(targets);
        return 1;
    }

    int result = 0;
    size_t verified = 0;
    for (size_t i = 0; i < n && result != 1; ++i) {
        nixl_etcd_buffer buf = {NULL, 0};
        st = nixl_etcd_wait(client, ctx->engine_id, targets[i], ctx->timeout_ms, &buf);
        if (st != NIXL_ETCD_OK) {
            report(ctx->rank, "nixl_etcd_wait", st);
            fprintf(stderr, PROG ": local rank %u: (remote rank %u of %s)\n", ctx->rank,
                    targets[i], ctx->engine_id);
            result = 1;
        } else if (verify(ctx, targets[i], &buf) != 0) {
            result = 2;
        } else {
            verified += buf.len;
        }
        nixl_etcd_buffer_free(&buf);
    }

    if (result == 0) {
        char *list = format_ranks(targets, n);
        printf(PROG ": local rank %u read remote ranks %s (%zu bytes verified)\n", ctx->rank,
               list ? list : "[?]", verified);
        free(list);
    }
    free(targets);
    return result;
}

static void *rank_main(void *arg)
{
    struct rank_ctx *ctx = arg;
    nixl_etcd_client *client = NULL;
    nixl_etcd_status st = nixl_etcd_open(ctx->options, &client);
    if (st != NIXL_ETCD_OK || client == NULL) {
        report(ctx->rank, "nixl_etcd_open", st);
        ctx->result = 1;
        return NULL;
    }
    uint32_t remote_tp = 0;
    st = nixl_etcd_wait_engine(client, ctx->engine_id, ctx->timeout_ms, &remote_tp);
    if (st != NIXL_ETCD_OK) {
        report(ctx->rank, "nixl_etcd_wait_engine", st);
        ctx->result = 1;
    } else if (remote_tp == 0) {
        fprintf(stderr, PROG ": local rank %u: engine %s reports world size 0\n", ctx->rank,
                ctx->engine_id);
        ctx->result = 1;
    } else {
        ctx->remote_tp = remote_tp;
        ctx->result = read_targets(ctx, client);
    }
    st = nixl_etcd_close(client);
    if (st != NIXL_ETCD_OK) {
        report(ctx->rank, "nixl_etcd_close", st);
        ctx->result = 1;
    }
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        perror(PROG ": clock_gettime");
        exit(1);
    }
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    long long timeout_ms = -1;
    const struct cli_spec spec = {PROG, USAGE, "--timeout-ms", cli_extra_i64, &timeout_ms};
    struct cli_args args;
    int rc = cli_parse(argc, argv, &spec, &args);
    if (rc != 0)
        return rc == 2 ? 0 : 1; /* 2: help was printed */
    const char *engine_id = args.engine_id;
    const uint32_t local_tp = args.nranks;
    if (local_tp > MAX_TP) {
        fprintf(stderr, PROG ": LOCAL_TP must be 1..%u, got %u\n", MAX_TP, local_tp);
        return 1;
    }

    setvbuf(stdout, NULL, _IOLBF, 0);

    if (!nixl_etcd_enabled())
        fprintf(stderr, PROG ": note: VLLM_NIXL_USE_ETCD is not enabled; using etcd anyway\n");

    pthread_t *threads = calloc(local_tp, sizeof *threads);
    struct rank_ctx *ctxs = calloc(local_tp, sizeof *ctxs);
    if (threads == NULL || ctxs == NULL) {
        fprintf(stderr, PROG ": cannot allocate %u rank threads\n", local_tp);
        return 1;
    }

    double t0 = now_s();
    uint32_t started = 0;
    for (; started < local_tp; ++started) {
        struct rank_ctx *c = &ctxs[started];
        c->engine_id = engine_id;
        c->options = args.options;
        c->local_tp = local_tp;
        c->rank = started;
        c->size = args.size;
        c->timeout_ms = (int64_t)timeout_ms;
        c->result = 1;
        int err = pthread_create(&threads[started], NULL, rank_main, c);
        if (err != 0) {
            fprintf(stderr, PROG ": cannot start the thread of local rank %u: %s\n", started,
                    strerror(err));
            break;
        }
    }
    int errors = started < local_tp, mismatches = 0;
    for (uint32_t r = 0; r < started; ++r) {
        pthread_join(threads[r], NULL);
        if (ctxs[r].result == 1)
            errors = 1;
        else if (ctxs[r].result == 2)
            mismatches = 1;
    }
    double elapsed = now_s() - t0;

    /* Every local rank must have seen the same remote engine size. */
    uint32_t remote_tp = started > 0 ? ctxs[0].remote_tp : 0;
    for (uint32_t r = 1; r < started && !errors; ++r) {
        if (ctxs[r].remote_tp != remote_tp) {
            fprintf(stderr, PROG ": local ranks disagree on the size of %s: %u (rank 0), %u "
                            "(rank %u)\n",
                    engine_id, remote_tp, ctxs[r].remote_tp, r);
            errors = 1;
        }
    }
    free(threads);
    free(ctxs);
    if (errors)
        return 1;
    if (mismatches)
        return 2;
    printf(PROG ": all %u ranks verified against %u remote ranks in %.3f seconds\n", local_tp,
           remote_tp, elapsed);
    return 0;
}

/*
 * tp_prefill: a tensor-parallel prefill engine (the guide's "prefill_tp4"),
 * one process with one thread per rank.
 *
 *   tp_prefill ENGINE_ID TP [--size BYTES] [--hold SECONDS] [--options JSON]
 *
 * Each of the TP rank threads opens its own client, as each GPU worker of a
 * real engine would, with the options {"world_size":TP} merged into --options
 * (or into the environment's settings when --options is absent), so that a
 * decode engine can learn TP with nixl_etcd_wait_engine. Rank R registers
 * its blob of BYTES bytes (default 8192, pattern.h) for (ENGINE_ID, R). Once
 * every rank is registered, all hold until SIGINT/SIGTERM or until --hold
 * SECONDS have passed; then every rank closes its client, which revokes its
 * lease and deletes its key.
 *
 * Exit status: 0 on success, 1 on any error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "nixl_etcd.h"
#include "pattern.h"

#define PROG "tp_prefill"
#define MAX_TP 1024u
#define USAGE                                                                              \
    "usage: " PROG " ENGINE_ID TP [--size BYTES] [--hold SECONDS] [--options JSON]\n"      \
    "  TP               number of ranks (threads, one client each), 1..1024\n"             \
    "  --size BYTES     metadata bytes per rank (default 8192)\n"                          \
    "  --hold SECONDS   close after this long (default: until SIGINT/SIGTERM)\n"           \
    "  --options JSON   client options, a JSON object; \"world_size\":TP is added\n"       \
    "                   (default: environment only, plus world_size)\n"

/* What the rank threads and main share, under mu. */
struct shared {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t registered; /* ranks that registered and now hold */
    uint32_t failed;     /* ranks that gave up before holding */
    int release;         /* set by main: close and return */
};

struct rank_ctx {
    struct shared *sh;
    const char *engine_id;
    const char *options;
    uint32_t rank;
    size_t size;
    int result; /* 0 ok, 1 error */
};

/* nixl_etcd_last_error is per thread: call this in the thread that failed. */
static void report(uint32_t rank, const char *call, nixl_etcd_status st)
{
    const char *s = nixl_etcd_status_str(st);
    const char *e = nixl_etcd_last_error();
    fprintf(stderr, PROG ": rank %u: %s failed: %s: %s\n", rank, call,
            s ? s : "unknown status", e ? e : "");
}

static void *rank_main(void *arg)
{
    struct rank_ctx *ctx = arg;
    struct shared *sh = ctx->sh;
    nixl_etcd_client *client = NULL;
    int ok = 0;

    uint8_t *blob = malloc(ctx->size > 0 ? ctx->size : 1);
    if (blob == NULL) {
        fprintf(stderr, PROG ": rank %u: cannot allocate %zu bytes\n", ctx->rank, ctx->size);
    } else {
        pattern_fill(blob, ctx->size, ctx->engine_id, ctx->rank);
        nixl_etcd_status st = nixl_etcd_open(ctx->options, &client);
        if (st != NIXL_ETCD_OK || client == NULL) {
            report(ctx->rank, "nixl_etcd_open", st);
            client = NULL;
        } else {
            st = nixl_etcd_register(client, ctx->engine_id, ctx->rank, blob, ctx->size);
            if (st != NIXL_ETCD_OK)
                report(ctx->rank, "nixl_etcd_register", st);
            else
                ok = 1;
        }
        free(blob);
    }
    if (ok)
        printf(PROG ": rank %u registered\n", ctx->rank);

    /* Tell main, then hold until main releases every rank. */
    pthread_mutex_lock(&sh->mu);
    if (ok)
        sh->registered++;
    else
        sh->failed++;
    pthread_cond_broadcast(&sh->cv);
    while (!sh->release)
        pthread_cond_wait(&sh->cv, &sh->mu);
    pthread_mutex_unlock(&sh->mu);

    ctx->result = ok ? 0 : 1;
    if (client != NULL) {
        nixl_etcd_status st = nixl_etcd_close(client);
        if (st != NIXL_ETCD_OK) {
            report(ctx->rank, "nixl_etcd_close", st);
            ctx->result = 1;
        }
    }
    return NULL;
}

static void on_signal(int sig)
{
    (void)sig; /* never runs: the signals are blocked and taken synchronously */
}

/* Waits for SIGINT/SIGTERM, or hold_s seconds when hold_s >= 0. Returns the
 * signal number, 0 when the time ran out, -1 on error. */
static int hold(const sigset_t *set, double hold_s)
{
    if (hold_s < 0) {
        int sig = 0;
        int rc = sigwait(set, &sig);
        if (rc != 0) {
            fprintf(stderr, PROG ": sigwait failed: %s\n", strerror(rc));
            return -1;
        }
        return sig;
    }
    struct timespec start, now;
    if (clock_gettime(CLOCK_MONOTONIC, &start) != 0) {
        perror(PROG ": clock_gettime");
        return -1;
    }
    for (;;) {
        if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
            perror(PROG ": clock_gettime");
            return -1;
        }
        double left = hold_s - ((double)(now.tv_sec - start.tv_sec) +
                                (double)(now.tv_nsec - start.tv_nsec) / 1e9);
        if (left <= 0)
            return 0;
        struct timespec ts;
        ts.tv_sec = (time_t)left;
        ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec >= 1000000000L)
            ts.tv_nsec = 999999999L;
        int sig = sigtimedwait(set, NULL, &ts);
        if (sig > 0)
            return sig;
        if (errno == EAGAIN)
            return 0;
        if (errno != EINTR) {
            perror(PROG ": sigtimedwait");
            return -1;
        }
    }
}

/* Releases every started rank thread and joins it; returns 0 when each one
 * succeeded, else 1. */
static int release_and_join(struct shared *sh, pthread_t *threads, struct rank_ctx *ctxs,
                            uint32_t started)
{
    pthread_mutex_lock(&sh->mu);
    sh->release = 1;
    pthread_cond_broadcast(&sh->cv);
    pthread_mutex_unlock(&sh->mu);
    int rc = 0;
    for (uint32_t r = 0; r < started; ++r) {
        pthread_join(threads[r], NULL);
        if (ctxs[r].result != 0)
            rc = 1;
    }
    return rc;
}

int main(int argc, char **argv)
{
    double hold_s = -1.0;
    const struct cli_spec spec = {PROG, USAGE, "--hold", cli_extra_seconds, &hold_s};
    struct cli_args args;
    int rc = cli_parse(argc, argv, &spec, &args);
    if (rc != 0)
        return rc == 2 ? 0 : 1; /* 2: help was printed */
    const char *engine_id = args.engine_id;
    const uint32_t tp = args.nranks;
    if (tp > MAX_TP) {
        fprintf(stderr, PROG ": TP must be 1..%u, got %u\n", MAX_TP, tp);
        return 1;
    }

    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Block SIGINT/SIGTERM before any thread starts (ours or the library's),
     * so every thread inherits the mask and main takes them with sigwait. */
    sigset_t set;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    if (sigemptyset(&set) != 0 || sigaddset(&set, SIGINT) != 0 || sigaddset(&set, SIGTERM) != 0 ||
        sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGINT, &sa, NULL) != 0 ||
        sigaction(SIGTERM, &sa, NULL) != 0 || pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) {
        perror(PROG ": signal setup");
        return 1;
    }

    if (!nixl_etcd_enabled())
        fprintf(stderr, PROG ": note: VLLM_NIXL_USE_ETCD is not enabled; using etcd anyway\n");

    char *options = cli_options_with_world_size(PROG, args.options, tp);
    if (options == NULL)
        return 1;

    struct shared sh;
    memset(&sh, 0, sizeof sh);
    pthread_t *threads = calloc(tp, sizeof *threads);
    struct rank_ctx *ctxs = calloc(tp, sizeof *ctxs);
    if (threads == NULL || ctxs == NULL || pthread_mutex_init(&sh.mu, NULL) != 0 ||
        pthread_cond_init(&sh.cv, NULL) != 0) {
        fprintf(stderr, PROG ": cannot set up %u rank threads\n", tp);
        return 1;
    }

    uint32_t started = 0;
    for (; started < tp; ++started) {
        struct rank_ctx *c = &ctxs[started];
        c->sh = &sh;
        c->engine_id = engine_id;
        c->options = options;
        c->rank = started;
        c->size = args.size;
        c->result = 1;
        int err = pthread_create(&threads[started], NULL, rank_main, c);
        if (err != 0) {
            fprintf(stderr, PROG ": cannot start the thread of rank %u: %s\n", started,
                    strerror(err));
            break;
        }
    }

    /* Wait until every started rank has either registered or failed. */
    pthread_mutex_lock(&sh.mu);
    while (sh.registered + sh.failed < started)
        pthread_cond_wait(&sh.cv, &sh.mu);
    uint32_t registered = sh.registered;
    pthread_mutex_unlock(&sh.mu);

    int sig = -1;
    if (started == tp && registered == tp) {
        printf(PROG ": %u ranks of %s registered, holding\n", tp, engine_id);
        sig = hold(&set, hold_s);
        if (sig > 0)
            printf(PROG ": got %s, closing\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        else if (sig == 0)
            printf(PROG ": held for %.3f seconds, closing\n", hold_s);
    } else {
        fprintf(stderr, PROG ": only %u of %u ranks registered; closing\n", registered, tp);
    }

    rc = release_and_join(&sh, threads, ctxs, started);
    free(threads);
    free(ctxs);
    free(options);
    pthread_cond_destroy(&sh.cv);
    pthread_mutex_destroy(&sh.mu);
    if (sig < 0 || rc != 0)
        return 1;
    printf(PROG ": closed\n");
    return 0;
}

/*
 * prefill: the producer side of the nixl-etcd handshake, in C.
 *
 *   prefill ENGINE_ID NRANKS [--size BYTES] [--hold SECONDS] [--options JSON]
 *
 * Opens a client (from the environment: VLLM_NIXL_ETCD_ENDPOINTS,
 * VLLM_NIXL_ETCD_NAMESPACE, VLLM_NIXL_ETCD_TIMEOUT, ...; or from --options,
 * a JSON object with the library's option keys), registers ranks
 * 0..NRANKS-1 of ENGINE_ID, each with a deterministic metadata blob of BYTES
 * bytes (default 8192, see pattern.h), then holds the registration until
 * SIGINT/SIGTERM or until --hold SECONDS have passed. Closing the client
 * revokes its lease, which deletes the keys.
 *
 * Exit status: 0 on success, 1 on any error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "nixl_etcd.h"
#include "pattern.h"

#define PROG "prefill"
#define USAGE                                                                              \
    "usage: " PROG " ENGINE_ID NRANKS [--size BYTES] [--hold SECONDS] [--options JSON]\n"  \
    "  --size BYTES     metadata bytes per rank (default 8192)\n"                            \
    "  --hold SECONDS   close after this long (default: until SIGINT/SIGTERM)\n"             \
    "  --options JSON   client options (default: environment only)\n"

static void report(const char *call, nixl_etcd_status st)
{
    const char *s = nixl_etcd_status_str(st);
    const char *e = nixl_etcd_last_error();
    fprintf(stderr, PROG ": %s failed: %s: %s\n", call, s ? s : "unknown status", e ? e : "");
}

/* Close on an error path; a failure here is reported too. */
static void close_after_error(nixl_etcd_client *client)
{
    nixl_etcd_status st = nixl_etcd_close(client);
    if (st != NIXL_ETCD_OK)
        report("nixl_etcd_close", st);
}

static void on_signal(int sig)
{
    (void)sig; /* never runs: the signals are blocked and taken with sigwait */
}

/* Wait for SIGINT/SIGTERM, or hold_s seconds when hold_s >= 0. Returns the
 * signal number, 0 when the hold time ran out, -1 on error. */
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
    struct timespec now, end;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
        perror(PROG ": clock_gettime");
        return -1;
    }
    time_t whole = (time_t)hold_s; /* hold_s >= 0: truncation is floor */
    end.tv_sec = now.tv_sec + whole;
    end.tv_nsec = now.tv_nsec + (long)((hold_s - (double)whole) * 1e9);
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec += 1;
        end.tv_nsec -= 1000000000L;
    }
    for (;;) {
        if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
            perror(PROG ": clock_gettime");
            return -1;
        }
        struct timespec left;
        left.tv_sec = end.tv_sec - now.tv_sec;
        left.tv_nsec = end.tv_nsec - now.tv_nsec;
        if (left.tv_nsec < 0) {
            left.tv_sec -= 1;
            left.tv_nsec += 1000000000L;
        }
        if (left.tv_sec < 0)
            return 0;
        int sig = sigtimedwait(set, NULL, &left);
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

int main(int argc, char **argv)
{
    double hold_s = -1.0;
    const struct cli_spec spec = {PROG, USAGE, "--hold", cli_extra_seconds, &hold_s};
    struct cli_args args;
    int rc = cli_parse(argc, argv, &spec, &args);
    if (rc != 0)
        return rc == 2 ? 0 : 1; /* 2: help was printed */
    const char *engine_id = args.engine_id;
    const uint32_t nranks = args.nranks;
    const size_t size = args.size;

    /* Line-buffered, so a reader of a pipe or file sees each line at once. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Take SIGINT/SIGTERM synchronously. Block them before the library starts
     * any thread, so every thread inherits the mask and none dies of them.
     * A handler replaces a SIG_IGN inherited from a shell's background job. */
    sigset_t set;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    if (sigemptyset(&set) != 0 || sigaddset(&set, SIGINT) != 0 || sigaddset(&set, SIGTERM) != 0 ||
        sigemptyset(&sa.sa_mask) != 0 || sigaction(SIGINT, &sa, NULL) != 0 ||
        sigaction(SIGTERM, &sa, NULL) != 0 || sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        perror(PROG ": signal setup");
        return 1;
    }

    if (!nixl_etcd_enabled())
        fprintf(stderr, PROG ": note: VLLM_NIXL_USE_ETCD is not enabled; using etcd anyway\n");

    uint8_t *blob = malloc(size > 0 ? size : 1);
    if (blob == NULL) {
        fprintf(stderr, PROG ": cannot allocate %zu bytes\n", size);
        return 1;
    }

    nixl_etcd_client *client = NULL;
    nixl_etcd_status st = nixl_etcd_open(args.options, &client);
    if (st != NIXL_ETCD_OK || client == NULL) {
        report("nixl_etcd_open", st);
        free(blob);
        return 1;
    }

    for (uint32_t rank = 0; rank < nranks; ++rank) {
        pattern_fill(blob, size, engine_id, rank);
        st = nixl_etcd_register(client, engine_id, rank, blob, size);
        if (st != NIXL_ETCD_OK) {
            report("nixl_etcd_register", st);
            free(blob);
            close_after_error(client);
            return 1;
        }
        printf(PROG ": registered rank %u of %s (%zu bytes)\n", rank, engine_id, size);
    }
    free(blob);

    printf(PROG ": registered %u ranks of %s, holding\n", nranks, engine_id);
    fflush(stdout);

    int sig = hold(&set, hold_s);
    if (sig > 0)
        printf(PROG ": got %s, closing\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    else if (sig == 0)
        printf(PROG ": held for %.3f seconds, closing\n", hold_s);

    nixl_etcd_status cst = nixl_etcd_close(client);
    if (cst != NIXL_ETCD_OK) {
        report("nixl_etcd_close", cst);
        return 1;
    }
    printf(PROG ": closed\n");
    fflush(stdout);
    return sig < 0 ? 1 : 0;
}

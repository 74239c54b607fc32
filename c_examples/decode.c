/*
 * decode: the consumer side of the nixl-etcd handshake, in C.
 *
 *   decode ENGINE_ID NRANKS [--size BYTES] [--timeout-ms MS] [--options JSON]
 *
 * Opens a client (from the environment, or from --options JSON), waits for
 * the metadata of ranks 0..NRANKS-1 of ENGINE_ID (nixl_etcd_wait; MS < 0, the
 * default, means VLLM_NIXL_ETCD_TIMEOUT), and checks each blob's length
 * (BYTES, default 8192) and every byte against pattern.h.
 *
 * Exit status: 0 when every rank verified, 2 on a content mismatch, 1 on any
 * other error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "nixl_etcd.h"
#include "pattern.h"

#define PROG "decode"
#define USAGE                                                                               \
    "usage: " PROG " ENGINE_ID NRANKS [--size BYTES] [--timeout-ms MS] [--options JSON]\n"  \
    "  --size BYTES       expected metadata bytes per rank (default 8192)\n"                  \
    "  --timeout-ms MS    wait limit per rank; < 0 = VLLM_NIXL_ETCD_TIMEOUT (default -1)\n"   \
    "  --options JSON     client options (default: environment only)\n"

static void report(const char *call, nixl_etcd_status st)
{
    const char *s = nixl_etcd_status_str(st);
    const char *e = nixl_etcd_last_error();
    fprintf(stderr, PROG ": %s failed: %s: %s\n", call, s ? s : "unknown status", e ? e : "");
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

/* Free every buffer and close the client; returns 0, or 1 if close failed. */
static int cleanup(nixl_etcd_client *client, nixl_etcd_buffer *bufs, uint32_t n)
{
    for (uint32_t r = 0; r < n; ++r)
        if (bufs[r].data != NULL)
            nixl_etcd_buffer_free(&bufs[r]);
    free(bufs);
    nixl_etcd_status st = nixl_etcd_close(client);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_close", st);
        return 1;
    }
    return 0;
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
    const uint32_t nranks = args.nranks;
    const size_t size = args.size;

    setvbuf(stdout, NULL, _IOLBF, 0);

    if (!nixl_etcd_enabled())
        fprintf(stderr, PROG ": note: VLLM_NIXL_USE_ETCD is not enabled; using etcd anyway\n");

    nixl_etcd_buffer *bufs = calloc(nranks, sizeof *bufs);
    if (bufs == NULL) {
        fprintf(stderr, PROG ": cannot allocate %u buffers\n", nranks);
        return 1;
    }

    nixl_etcd_client *client = NULL;
    nixl_etcd_status st = nixl_etcd_open(args.options, &client);
    if (st != NIXL_ETCD_OK || client == NULL) {
        report("nixl_etcd_open", st);
        free(bufs);
        return 1;
    }

    double t0 = now_s();
    for (uint32_t rank = 0; rank < nranks; ++rank) {
        st = nixl_etcd_wait(client, engine_id, rank, (int64_t)timeout_ms, &bufs[rank]);
        if (st != NIXL_ETCD_OK) {
            report("nixl_etcd_wait", st);
            fprintf(stderr, PROG ": (rank %u of %s)\n", rank, engine_id);
            cleanup(client, bufs, nranks);
            return 1;
        }
    }
    double elapsed = now_s() - t0;

    int mismatch = 0;
    for (uint32_t rank = 0; rank < nranks; ++rank) {
        const nixl_etcd_buffer *b = &bufs[rank];
        if (b->len != size) {
            fprintf(stderr, PROG ": rank %u: got %zu bytes, expected %zu\n", rank, b->len, size);
            mismatch = 1;
            continue;
        }
        if (b->len > 0 && b->data == NULL) {
            fprintf(stderr, PROG ": rank %u: %zu bytes announced but no data\n", rank, b->len);
            mismatch = 1;
            continue;
        }
        size_t off = pattern_first_mismatch(b->data, b->len, engine_id, rank);
        if (off != b->len) {
            fprintf(stderr, PROG ": rank %u: mismatch at offset %zu: got 0x%02x, expected 0x%02x\n",
                    rank, off, b->data[off], pattern_byte(engine_id, rank, off));
            mismatch = 1;
            continue;
        }
        printf(PROG ": rank %u: %zu bytes verified\n", rank, b->len);
    }

    if (mismatch) {
        cleanup(client, bufs, nranks);
        return 2;
    }
    printf(PROG ": ETCD handshake completed in %.3f seconds for %u ranks of %s\n",
           elapsed, nranks, engine_id);
    return cleanup(client, bufs, nranks);
}

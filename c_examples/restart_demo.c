/*
 * restart_demo: a prefill rank restarts, and the decode side sees it.
 *
 *   restart_demo [--options JSON]
 *
 * One process plays both sides, each with its own clients (environment, or
 * --options JSON for all of them), on engine "restart_engine", rank 0:
 *   1. the decode client subscribes to the engine;
 *   2. prefill client A registers rank 0 with blob version 1   -> ADDED;
 *   3. client B, the restarted prefill process (a new incarnation), registers
 *      rank 0 with blob version 2 while A's record still exists -> REPLACED;
 *      the decode side "reloads": it reads the record again and checks that
 *      it is B's incarnation with version 2;
 *   4. A closes: its lease is revoked, but the key now belongs to B's lease,
 *      so rank 0 stays (no event; a lookup still finds version 2);
 *   5. B closes                                                -> REMOVED.
 * The callback runs on the library's event thread: it prints the event,
 * copies what main needs and hands it over through a mutex and condition
 * variable; main does the waiting (10 s per step) and the checks.
 *
 * Exit status: 0 when ADDED, REPLACED, REMOVED were seen in that order and
 * every check passed; 1 otherwise.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nixl_etcd.h"
#include "pattern.h"

#define PROG "restart_demo"
#define USAGE "usage: " PROG " [--options JSON]\n"                                    \
              "  --options JSON   client options (default: environment only)\n"
#define ENGINE "restart_engine"
#define RANK 0u
#define BLOB_BYTES 4096u
#define STEP_TIMEOUT_MS 10000
/* After A closes: how long to watch for an (unwanted) event before looking up. */
#define SETTLE_MS 300
#define QUEUE_CAP 64u

/* ---- metadata blobs: version V is pattern.h's blob of "restart_engine/vV" ---- */

static const char *version_key(int version)
{
    return version == 1 ? ENGINE "/v1" : ENGINE "/v2";
}

static void blob_fill(uint8_t *buf, int version)
{
    pattern_fill(buf, BLOB_BYTES, version_key(version), RANK);
}

/* 1 or 2 when data is that version's blob, else 0. */
static int blob_version(const uint8_t *data, size_t len)
{
    if (data == NULL || len != BLOB_BYTES)
        return 0;
    for (int v = 1; v <= 2; ++v)
        if (pattern_first_mismatch(data, len, version_key(v), RANK) == len)
            return v;
    return 0;
}

/* ---- events handed from the callback to main ---- */

struct event_copy {
    int kind;
    uint32_t rank;
    char *incarnation; /* malloc'd; NULL if out of memory */
    size_t bytes;
    int version; /* blob_version of the metadata */
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct event_copy items[QUEUE_CAP];
    unsigned head, count;
    unsigned dropped;
} queue = {.mu = PTHREAD_MUTEX_INITIALIZER};

static const char *kind_name(int kind)
{
    switch (kind) {
    case NIXL_ETCD_EVENT_ADDED:
        return "ADDED";
    case NIXL_ETCD_EVENT_UPDATED:
        return "UPDATED";
    case NIXL_ETCD_EVENT_REPLACED:
        return "REPLACED";
    case NIXL_ETCD_EVENT_REMOVED:
        return "REMOVED";
    default:
        return "UNKNOWN";
    }
}

/* Runs on the library's event thread: print, copy, hand over; never wait. */
static void on_event(void *user_data, const nixl_etcd_event *ev)
{
    (void)user_data;
    const char *inc = ev->incarnation ? ev->incarnation : "";
    printf(PROG ": EVENT kind=%s rank=%u incarnation=%s bytes=%zu\n", kind_name(ev->kind),
           ev->rank, inc, ev->metadata_len);
    struct event_copy e;
    e.kind = ev->kind;
    e.rank = ev->rank;
    e.incarnation = strdup(inc);
    e.bytes = ev->metadata_len;
    e.version = blob_version(ev->metadata, ev->metadata_len);

    pthread_mutex_lock(&queue.mu);
    if (queue.count < QUEUE_CAP) {
        queue.items[(queue.head + queue.count) % QUEUE_CAP] = e;
        queue.count++;
    } else {
        queue.dropped++;
        free(e.incarnation);
    }
    pthread_cond_signal(&queue.cv);
    pthread_mutex_unlock(&queue.mu);
}

/* Takes the next event, waiting up to timeout_ms. Returns 1 with *out filled
 * (the caller frees out->incarnation), 0 on timeout. */
static int next_event(int timeout_ms, struct event_copy *out)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    int got = 0;
    pthread_mutex_lock(&queue.mu);
    while (queue.count == 0) {
        int rc = pthread_cond_timedwait(&queue.cv, &queue.mu, &deadline);
        if (rc == ETIMEDOUT)
            break;
    }
    if (queue.count > 0) {
        *out = queue.items[queue.head];
        queue.head = (queue.head + 1) % QUEUE_CAP;
        queue.count--;
        got = 1;
    }
    pthread_mutex_unlock(&queue.mu);
    return got;
}

static void drain_events(void)
{
    struct event_copy e;
    pthread_mutex_lock(&queue.mu);
    while (queue.count > 0) {
        e = queue.items[queue.head];
        queue.head = (queue.head + 1) % QUEUE_CAP;
        queue.count--;
        free(e.incarnation);
    }
    pthread_mutex_unlock(&queue.mu);
}

/* ---- the demo ---- */

static nixl_etcd_client *decode_client, *client_a, *client_b;
static uint64_t subscription;
static int subscribed;

static void report(const char *what, nixl_etcd_status st)
{
    const char *s = nixl_etcd_status_str(st);
    const char *e = nixl_etcd_last_error();
    fprintf(stderr, PROG ": %s failed: %s: %s\n", what, s ? s : "unknown status", e ? e : "");
}

/* Unsubscribes and closes whatever is still open; returns 0, or 1 if any of
 * it failed. */
static int shut_down(void)
{
    int rc = 0;
    nixl_etcd_status st;
    if (subscribed) {
        subscribed = 0;
        st = nixl_etcd_unsubscribe(decode_client, subscription);
        if (st != NIXL_ETCD_OK) {
            report("nixl_etcd_unsubscribe", st);
            rc = 1;
        }
    }
    nixl_etcd_client **clients[] = {&client_a, &client_b, &decode_client};
    for (size_t i = 0; i < sizeof clients / sizeof clients[0]; ++i) {
        if (*clients[i] == NULL)
            continue;
        st = nixl_etcd_close(*clients[i]);
        *clients[i] = NULL;
        if (st != NIXL_ETCD_OK) {
            report("nixl_etcd_close", st);
            rc = 1;
        }
    }
    drain_events();
    return rc;
}

static int fail(void)
{
    shut_down();
    fprintf(stderr, PROG ": FAILED\n");
    return 1;
}

/* Waits for the next event and checks its kind and rank. Returns 1 with *e
 * filled, else 0 after printing why. */
static int expect_event(int kind, const char *step, struct event_copy *e)
{
    if (!next_event(STEP_TIMEOUT_MS, e)) {
        fprintf(stderr, PROG ": no %s event within %d ms after %s\n", kind_name(kind),
                STEP_TIMEOUT_MS, step);
        return 0;
    }
    if (e->kind != kind || e->rank != RANK || e->incarnation == NULL) {
        fprintf(stderr, PROG ": after %s expected %s of rank %u, got kind=%s rank=%u\n", step,
                kind_name(kind), RANK, kind_name(e->kind), e->rank);
        free(e->incarnation);
        return 0;
    }
    return 1;
}

static nixl_etcd_status open_client(const char *options, const char *who,
                                    nixl_etcd_client **out)
{
    nixl_etcd_status st = nixl_etcd_open(options, out);
    if (st != NIXL_ETCD_OK || *out == NULL) {
        char what[64];
        snprintf(what, sizeof what, "nixl_etcd_open (%s)", who);
        report(what, st);
        *out = NULL;
        return st != NIXL_ETCD_OK ? st : NIXL_ETCD_ERR_INTERNAL;
    }
    return NIXL_ETCD_OK;
}

int main(int argc, char **argv)
{
    const char *options = NULL;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            fputs(USAGE, stdout);
            return 0;
        } else if (strcmp(argv[i], "--options") == 0 && i + 1 < argc) {
            options = argv[++i];
        } else {
            fprintf(stderr, PROG ": unexpected argument '%s'\n", argv[i]);
            fputs(USAGE, stderr);
            return 1;
        }
    }

    setvbuf(stdout, NULL, _IOLBF, 0);

    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0 || pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&queue.cv, &ca) != 0) {
        fprintf(stderr, PROG ": cannot set up the event queue\n");
        return 1;
    }
    pthread_condattr_destroy(&ca);

    static uint8_t v1[BLOB_BYTES], v2[BLOB_BYTES];
    blob_fill(v1, 1);
    blob_fill(v2, 2);
    nixl_etcd_status st;
    struct event_copy e;

    /* 1. The decode side subscribes. */
    if (open_client(options, "decode", &decode_client) != NIXL_ETCD_OK)
        return fail();
    st = nixl_etcd_subscribe(decode_client, ENGINE, on_event, NULL, &subscription);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_subscribe", st);
        return fail();
    }
    subscribed = 1;
    printf(PROG ": decode subscribed to %s\n", ENGINE);

    /* 2. Prefill A registers rank 0, version 1. */
    if (open_client(options, "prefill A", &client_a) != NIXL_ETCD_OK)
        return fail();
    st = nixl_etcd_register(client_a, ENGINE, RANK, v1, sizeof v1);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_register (A, version 1)", st);
        return fail();
    }
    printf(PROG ": prefill A registered rank %u (version 1)\n", RANK);
    if (!expect_event(NIXL_ETCD_EVENT_ADDED, "A registered", &e))
        return fail();
    char *inc_a = e.incarnation;
    if (e.version != 1 || e.bytes != BLOB_BYTES) {
        fprintf(stderr, PROG ": ADDED carries %zu bytes of version %d, expected version 1\n",
                e.bytes, e.version);
        free(inc_a);
        return fail();
    }

    /* 3. The restarted prefill (B, a new incarnation) registers rank 0,
     * version 2, while A's registration still exists. */
    if (open_client(options, "prefill B", &client_b) != NIXL_ETCD_OK) {
        free(inc_a);
        return fail();
    }
    st = nixl_etcd_register(client_b, ENGINE, RANK, v2, sizeof v2);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_register (B, version 2)", st);
        free(inc_a);
        return fail();
    }
    printf(PROG ": prefill B (restarted) registered rank %u (version 2)\n", RANK);
    if (!expect_event(NIXL_ETCD_EVENT_REPLACED, "B registered", &e)) {
        free(inc_a);
        return fail();
    }
    char *inc_b = e.incarnation;
    int same = strcmp(inc_a, inc_b) == 0;
    free(inc_a);
    if (same || e.version != 2 || e.bytes != BLOB_BYTES) {
        fprintf(stderr,
                PROG ": REPLACED: incarnation %s (%s A's), %zu bytes of version %d; expected a "
                     "new incarnation with version 2\n",
                inc_b, same ? "same as" : "differs from", e.bytes, e.version);
        free(inc_b);
        return fail();
    }
    /* The decode side drops the old remote agent and reloads the rank. */
    nixl_etcd_record rec;
    memset(&rec, 0, sizeof rec);
    st = nixl_etcd_lookup_record(decode_client, ENGINE, RANK, &rec);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_lookup_record (reload)", st);
        free(inc_b);
        return fail();
    }
    int version = blob_version(rec.metadata.data, rec.metadata.len);
    if (rec.incarnation == NULL || strcmp(rec.incarnation, inc_b) != 0 || version != 2) {
        fprintf(stderr,
                PROG ": reload: record of incarnation %s with version %d; expected incarnation "
                     "%s with version 2\n",
                rec.incarnation ? rec.incarnation : "(null)", version, inc_b);
        nixl_etcd_record_free(&rec);
        free(inc_b);
        return fail();
    }
    printf(PROG ": reloaded rank %u from new incarnation %s (%zu bytes, version 2, pid %u, "
                "revision %lld)\n",
           RANK, rec.incarnation, rec.metadata.len, rec.pid, (long long)rec.revision);
    nixl_etcd_record_free(&rec);

    /* 4. A closes: its lease goes, B's record must stay. */
    st = nixl_etcd_close(client_a);
    client_a = NULL;
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_close (A)", st);
        free(inc_b);
        return fail();
    }
    printf(PROG ": prefill A closed (old incarnation's lease revoked)\n");
    if (next_event(SETTLE_MS, &e)) {
        fprintf(stderr, PROG ": unexpected kind=%s rank=%u incarnation=%s after A closed: "
                        "rank %u belongs to B now\n",
                kind_name(e.kind), e.rank, e.incarnation ? e.incarnation : "", RANK);
        free(e.incarnation);
        free(inc_b);
        return fail();
    }
    nixl_etcd_buffer buf = {NULL, 0};
    st = nixl_etcd_lookup(decode_client, ENGINE, RANK, &buf);
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_lookup (after A closed)", st);
        free(inc_b);
        return fail();
    }
    version = blob_version(buf.data, buf.len);
    nixl_etcd_buffer_free(&buf);
    if (version != 2) {
        fprintf(stderr, PROG ": after A closed rank %u holds version %d, expected 2\n", RANK,
                version);
        free(inc_b);
        return fail();
    }
    printf(PROG ": rank %u still registered after A closed (version 2)\n", RANK);

    /* 5. B closes: the rank is gone. */
    st = nixl_etcd_close(client_b);
    client_b = NULL;
    if (st != NIXL_ETCD_OK) {
        report("nixl_etcd_close (B)", st);
        free(inc_b);
        return fail();
    }
    printf(PROG ": prefill B closed\n");
    if (!expect_event(NIXL_ETCD_EVENT_REMOVED, "B closed", &e)) {
        free(inc_b);
        return fail();
    }
    same = strcmp(e.incarnation, inc_b) == 0;
    free(e.incarnation);
    free(inc_b);
    if (!same) {
        fprintf(stderr, PROG ": REMOVED names another incarnation than B's\n");
        return fail();
    }

    if (shut_down() != 0)
        return fail();
    if (queue.dropped > 0) {
        fprintf(stderr, PROG ": %u events were dropped (queue full)\n", queue.dropped);
        return 1;
    }
    printf(PROG ": saw ADDED, REPLACED, REMOVED; every check passed\n");
    return 0;
}

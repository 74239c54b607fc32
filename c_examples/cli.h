/*
 * Command-line parsing shared by the nixl-etcd C examples.
 *
 *   PROG ENGINE_ID NRANKS [--size BYTES] [EXTRA_OPTION VALUE] [--options JSON]
 *
 * cli_parse handles -h/--help, --size, --options, the positional ENGINE_ID
 * and NRANKS (1..CLI_MAX_RANKS) and one program-specific option that takes a
 * value (prefill's --hold, decode's --timeout-ms). Each value of that option
 * is handed, in order, to the program's parse_extra callback, so a bad value
 * is reported at the point where it appears, exactly as a built-in option's.
 * Every message starts with "PROG: " and goes to stderr; help goes to stdout.
 */
#ifndef NIXL_ETCD_EXAMPLE_CLI_H
#define NIXL_ETCD_EXAMPLE_CLI_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLI_MAX_RANKS 65536u

struct cli_args {
    const char *engine_id;
    uint32_t nranks;
    const char *options;     /* --options JSON, or NULL */
    size_t size;             /* --size BYTES, default 8192 */
    const char *extra_value; /* last value of the extra option, or NULL */
};

/* Parses one value of the extra option into ctx; returns 0, or -1 when the
 * value is bad (cli_parse then prints "PROG: bad OPTION 'VALUE'"). */
typedef int (*cli_extra_fn)(const char *value, void *ctx);

struct cli_spec {
    const char *prog;         /* prefix of every message */
    const char *usage;        /* full usage text, printed as is */
    const char *extra_option; /* e.g. "--hold" */
    cli_extra_fn parse_extra; /* may be NULL: any value is accepted */
    void *ctx;                /* passed to parse_extra */
};

/* A decimal unsigned integer with no sign; returns 0, or -1 when bad. */
static inline int cli_parse_u64(const char *text, unsigned long long *out)
{
    char *end = NULL;
    if (text == NULL || *text == '\0' || *text == '-')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static inline void cli_usage(const struct cli_spec *spec, FILE *f)
{
    fputs(spec->usage, f);
}

/* Returns 0 when out is filled in, 1 on an error (already printed), 2 when
 * help was printed (the program should exit 0). */
static inline int cli_parse(int argc, char **argv, const struct cli_spec *spec,
                            struct cli_args *out)
{
    const char *prog = spec->prog;
    const char *nranks_text = NULL;
    unsigned long long size = 8192;

    out->engine_id = NULL;
    out->nranks = 0;
    out->options = NULL;
    out->size = 0;
    out->extra_value = NULL;

    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            cli_usage(spec, stdout);
            return 2;
        } else if (strcmp(a, "--size") == 0 || strcmp(a, spec->extra_option) == 0 ||
                   strcmp(a, "--options") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n", prog, a);
                cli_usage(spec, stderr);
                return 1;
            }
            const char *v = argv[++i];
            if (strcmp(a, "--size") == 0) {
                if (cli_parse_u64(v, &size) != 0 || size > (unsigned long long)SIZE_MAX) {
                    fprintf(stderr, "%s: bad --size '%s'\n", prog, v);
                    return 1;
                }
            } else if (strcmp(a, spec->extra_option) == 0) {
                if (spec->parse_extra != NULL && spec->parse_extra(v, spec->ctx) != 0) {
                    fprintf(stderr, "%s: bad %s '%s'\n", prog, a, v);
                    return 1;
                }
                out->extra_value = v;
            } else {
                out->options = v;
            }
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "%s: unknown option %s\n", prog, a);
            cli_usage(spec, stderr);
            return 1;
        } else if (out->engine_id == NULL) {
            out->engine_id = a;
        } else if (nranks_text == NULL) {
            nranks_text = a;
        } else {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, a);
            cli_usage(spec, stderr);
            return 1;
        }
    }
    if (out->engine_id == NULL || nranks_text == NULL) {
        cli_usage(spec, stderr);
        return 1;
    }
    unsigned long long nranks = 0;
    if (cli_parse_u64(nranks_text, &nranks) != 0 || nranks == 0 || nranks > CLI_MAX_RANKS) {
        fprintf(stderr, "%s: NRANKS must be 1..%u, got '%s'\n", prog, CLI_MAX_RANKS,
                nranks_text);
        return 1;
    }
    out->nranks = (uint32_t)nranks;
    out->size = (size_t)size;
    return 0;
}

/* Parsers of an example's extra option (cli_spec's extra_fn), shared by
 * the examples; cli_parse does not depend on them. */

/* cli_extra_fn: a signed decimal, into the long long at ctx. */
static inline int cli_extra_i64(const char *text, void *ctx)
{
    long long *out = ctx;
    char *end = NULL;
    if (text == NULL || *text == '\0')
        return -1;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

/* cli_extra_fn: seconds, 0..1e9 (fractions allowed), into the double at ctx. */
static inline int cli_extra_seconds(const char *text, void *ctx)
{
    double *out = ctx;
    char *end = NULL;
    if (text == NULL || *text == '\0')
        return -1;
    errno = 0;
    double v = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !(v >= 0.0) || v > 1e9)
        return -1;
    *out = v;
    return 0;
}

/* The client options of one rank of a world_size-way engine: the --options
 * JSON object (NULL or "": none) with "world_size":N inserted as its first
 * key, e.g. {"namespace":"x"} -> {"world_size":4,"namespace":"x"}, and NULL
 * -> {"world_size":4} (everything else still comes from the environment).
 * The text is only checked to start with '{' and not to set world_size
 * itself; the library validates the rest. Returns a malloc'd string to free,
 * or NULL after printing "PROG: ..." to stderr. */
static inline char *cli_options_with_world_size(const char *prog, const char *options,
                                               uint32_t world_size)
{
    const char *rest = "}"; /* what follows the inserted key */
    const char *sep = "";
    if (options != NULL && *options != '\0') {
        const char *p = options;
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
            ++p;
        if (*p != '{') {
            fprintf(stderr, "%s: --options must be a JSON object, got '%s'\n", prog, options);
            return NULL;
        }
        if (strstr(options, "\"world_size\"") != NULL) {
            fprintf(stderr, "%s: --options must not set world_size (the rank count sets it)\n",
                    prog);
            return NULL;
        }
        rest = p + 1;
        const char *q = rest;
        while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
            ++q;
        if (*q != '}') /* a non-empty object: its keys follow ours */
            sep = ",";
    }
    const char *fmt = "{\"world_size\":%u%s%s";
    int n = snprintf(NULL, 0, fmt, (unsigned)world_size, sep, rest);
    if (n < 0)
        return NULL;
    char *out = malloc((size_t)n + 1);
    if (out == NULL) {
        fprintf(stderr, "%s: cannot allocate %d bytes\n", prog, n + 1);
        return NULL;
    }
    snprintf(out, (size_t)n + 1, fmt, (unsigned)world_size, sep, rest);
    return out;
}

#endif /* NIXL_ETCD_EXAMPLE_CLI_H */

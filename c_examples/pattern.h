/*
 * Deterministic metadata blobs for the nixl-etcd C examples.
 *
 * prefill fills rank R's blob of engine E with pattern_byte(E, R, i) for each
 * offset i; decode checks every byte it receives against the same function.
 *
 * Definition (so other languages can reproduce it):
 *   h  = FNV-1a 64 of the bytes of engine_id
 *   if i % 128 == 1: byte = 0      (every blob holds NUL bytes from offset 1 on)
 *   x  = h ^ ((rank + 1) * 0x9E3779B97F4A7C15) ^ (i * 0xD1B54A32D192ED03)   (mod 2^64)
 *   x ^= x >> 30; x *= 0xBF58476D1CE4E5B9;
 *   x ^= x >> 27; x *= 0x94D049BB133111EB;
 *   x ^= x >> 31
 *   byte = x >> 56
 * Other bytes are zero about once in 256, and blobs differ per engine and rank.
 */
#ifndef NIXL_ETCD_EXAMPLE_PATTERN_H
#define NIXL_ETCD_EXAMPLE_PATTERN_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t pattern_engine_hash(const char *engine_id)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)engine_id; *p; ++p) {
        h ^= *p;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* pattern_byte with the engine hash already computed. */
static inline uint8_t pattern_byte_h(uint64_t engine_hash, uint32_t rank, size_t i)
{
    if (i % 128 == 1)
        return 0;
    uint64_t x = engine_hash
               ^ (((uint64_t)rank + 1) * 0x9E3779B97F4A7C15ull)
               ^ ((uint64_t)i * 0xD1B54A32D192ED03ull);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (uint8_t)(x >> 56);
}

static inline uint8_t pattern_byte(const char *engine_id, uint32_t rank, size_t i)
{
    return pattern_byte_h(pattern_engine_hash(engine_id), rank, i);
}

/* Fill buf[0..len) with rank's blob. */
static inline void pattern_fill(uint8_t *buf, size_t len, const char *engine_id, uint32_t rank)
{
    uint64_t h = pattern_engine_hash(engine_id);
    for (size_t i = 0; i < len; ++i)
        buf[i] = pattern_byte_h(h, rank, i);
}

/* Offset of the first byte of buf[0..len) that differs from rank's blob, or
 * len when all match. */
static inline size_t pattern_first_mismatch(const uint8_t *buf, size_t len,
                                            const char *engine_id, uint32_t rank)
{
    uint64_t h = pattern_engine_hash(engine_id);
    for (size_t i = 0; i < len; ++i)
        if (buf[i] != pattern_byte_h(h, rank, i))
            return i;
    return len;
}

#endif /* NIXL_ETCD_EXAMPLE_PATTERN_H */

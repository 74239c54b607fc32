/*
 * raii_engine: a C++ engine on nixl-etcd, through the RAII wrapper in
 * nixl_etcd.hpp.
 *
 *   raii_engine ENGINE_ID NRANKS [PEER_ENGINE PEER_RANKS]
 *
 * Opens a client from the environment (VLLM_NIXL_ETCD_ENDPOINTS, ...),
 * registers ranks 0..NRANKS-1 of ENGINE_ID with the blobs of pattern.h,
 * reads each one back and checks every byte; with a peer, waits for ranks
 * 0..PEER_RANKS-1 of PEER_ENGINE (as `prefill` registers them) and checks
 * theirs. Then shows a failure as an exception (the lookup of a rank nobody
 * registered), unregisters, and leaves the close to the destructor.
 *
 * Exit status: 0 when every blob verified, 2 on a content mismatch, 1 on
 * any other error.
 */
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "nixl_etcd.hpp"
#include "pattern.h"

namespace {

constexpr size_t kBlobSize = 8192;

std::vector<uint8_t> blob(const std::string &engine_id, uint32_t rank)
{
    std::vector<uint8_t> md(kBlobSize);
    pattern_fill(md.data(), md.size(), engine_id.c_str(), rank);
    return md;
}

bool verified(const char *what, const std::string &engine_id, uint32_t rank,
              const std::vector<uint8_t> &md)
{
    size_t bad = pattern_first_mismatch(md.data(), md.size(), engine_id.c_str(), rank);
    if (md.size() != kBlobSize || bad != md.size()) {
        std::fprintf(stderr, "raii_engine: %s %s rank %u: mismatch at byte %zu of %zu\n", what,
                     engine_id.c_str(), rank, bad, md.size());
        return false;
    }
    std::printf("raii_engine: %s %s rank %u: %zu bytes verified\n", what, engine_id.c_str(),
                rank, md.size());
    return true;
}

uint32_t count(const char *text)
{
    char *end = nullptr;
    unsigned long v = std::strtoul(text, &end, 10);
    if (*text == '\0' || *text == '-' || *end != '\0' || v == 0 || v > 1024) {
        std::fprintf(stderr, "raii_engine: bad rank count '%s' (1..1024)\n", text);
        std::exit(1);
    }
    return static_cast<uint32_t>(v);
}

} // namespace

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 5) {
        std::fprintf(stderr, "usage: raii_engine ENGINE_ID NRANKS [PEER_ENGINE PEER_RANKS]\n");
        return 1;
    }
    const std::string engine = argv[1];
    const uint32_t nranks = count(argv[2]);
    bool ok = true;
    try {
        nixl_etcd::Client client;
        for (uint32_t r = 0; r < nranks; ++r)
            client.register_rank(engine, r, blob(engine, r));
        std::printf("raii_engine: registered %u ranks of %s\n", nranks, engine.c_str());
        for (uint32_t r = 0; r < nranks; ++r)
            ok &= verified("own", engine, r, client.lookup(engine, r));
        if (argc == 5) {
            const std::string peer = argv[3];
            const uint32_t peer_ranks = count(argv[4]);
            for (uint32_t r = 0; r < peer_ranks; ++r)
                ok &= verified("peer", peer, r, client.wait(peer, r, std::chrono::seconds(30)));
        }
        try {
            client.lookup(engine, nranks);
            std::fprintf(stderr, "raii_engine: rank %u of %s exists, yet nobody registered it\n",
                         nranks, engine.c_str());
            ok = false;
        } catch (const nixl_etcd::Error &e) {
            if (e.status() != NIXL_ETCD_ERR_NOT_FOUND)
                throw;
            std::printf("raii_engine: as expected, %s\n", e.what());
        }
        for (uint32_t r = 0; r < nranks; ++r)
            client.unregister_rank(engine, r);
        std::printf("raii_engine: unregistered, closing\n");
    } catch (const nixl_etcd::Error &e) {
        std::fprintf(stderr, "raii_engine: %s (status %d)\n", e.what(),
                     static_cast<int>(e.status()));
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "raii_engine: %s\n", e.what());
        return 1;
    }
    return ok ? 0 : 2;
}

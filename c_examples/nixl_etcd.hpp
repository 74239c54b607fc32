/*
 * nixl_etcd.hpp: the nixl-etcd C API in a small RAII class, as a C++ engine
 * would hold it. Header-only; link with -lnixl_etcd (pkg-config nixl_etcd).
 *
 *   nixl_etcd::Client client;                      // open (environment)
 *   client.register_rank("prefill", 0, metadata);  // throws nixl_etcd::Error
 *   auto md = client.wait("decode", 0, std::chrono::seconds(30));
 *   // the destructor closes the client: its lease is revoked, its records go
 *
 * Every failure throws nixl_etcd::Error, carrying the status and the
 * library's message (nixl_etcd_last_error) of the failed call.
 */
#ifndef NIXL_ETCD_HPP
#define NIXL_ETCD_HPP

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "nixl_etcd.h"

namespace nixl_etcd {

/* A failed call: the status and "CALL failed: STATUS: MESSAGE". */
class Error : public std::runtime_error {
public:
    Error(const char *call, nixl_etcd_status status)
        : std::runtime_error(describe(call, status)), status_(status)
    {
    }

    nixl_etcd_status status() const noexcept { return status_; }

private:
    static std::string describe(const char *call, nixl_etcd_status status)
    {
        const char *s = nixl_etcd_status_str(status);
        const char *e = nixl_etcd_last_error();
        std::string out(call);
        out += " failed: ";
        out += s ? s : "unknown status";
        if (e && *e) {
            out += ": ";
            out += e;
        }
        return out;
    }

    nixl_etcd_status status_;
};

inline void check(const char *call, nixl_etcd_status status)
{
    if (status != NIXL_ETCD_OK)
        throw Error(call, status);
}

/* A timeout in milliseconds for the C API: negative means the configured
 * VLLM_NIXL_ETCD_TIMEOUT. */
using Timeout = std::chrono::milliseconds;
inline constexpr Timeout kConfiguredTimeout{-1};

class Client {
public:
    /* Opens a client from the environment, overridden key by key by
     * options_json (a JSON object of the library's options) when not empty. */
    explicit Client(const std::string &options_json = std::string())
    {
        check("nixl_etcd_open",
              nixl_etcd_open(options_json.empty() ? nullptr : options_json.c_str(), &c_));
    }

    /* Closes the client. A destructor cannot throw: call close() first to
     * see a failure. */
    ~Client() { nixl_etcd_close(c_); }

    Client(const Client &) = delete;
    Client &operator=(const Client &) = delete;
    Client(Client &&other) noexcept : c_(std::exchange(other.c_, nullptr)) {}
    Client &operator=(Client &&other) noexcept
    {
        if (this != &other) {
            nixl_etcd_close(c_);
            c_ = std::exchange(other.c_, nullptr);
        }
        return *this;
    }

    /* Closes now, reporting a failure; the destructor then does nothing. */
    void close() { check("nixl_etcd_close", nixl_etcd_close(std::exchange(c_, nullptr))); }

    void register_rank(const std::string &engine_id, uint32_t rank,
                       const std::vector<uint8_t> &metadata)
    {
        check("nixl_etcd_register", nixl_etcd_register(c_, engine_id.c_str(), rank,
                                                       metadata.data(), metadata.size()));
    }

    void unregister_rank(const std::string &engine_id, uint32_t rank)
    {
        check("nixl_etcd_unregister", nixl_etcd_unregister(c_, engine_id.c_str(), rank));
    }

    /* The metadata of (engine_id, rank); throws NOT_FOUND at once if absent. */
    std::vector<uint8_t> lookup(const std::string &engine_id, uint32_t rank)
    {
        nixl_etcd_buffer buf{nullptr, 0};
        check("nixl_etcd_lookup", nixl_etcd_lookup(c_, engine_id.c_str(), rank, &buf));
        return take(buf);
    }

    /* The metadata of (engine_id, rank), waiting for it to be registered. */
    std::vector<uint8_t> wait(const std::string &engine_id, uint32_t rank,
                              Timeout timeout = kConfiguredTimeout)
    {
        nixl_etcd_buffer buf{nullptr, 0};
        check("nixl_etcd_wait", nixl_etcd_wait(c_, engine_id.c_str(), rank,
                                               static_cast<int64_t>(timeout.count()), &buf));
        return take(buf);
    }

    /* Waits until every rank of the engine is registered; its world size. */
    uint32_t wait_engine(const std::string &engine_id, Timeout timeout = kConfiguredTimeout)
    {
        uint32_t world_size = 0;
        check("nixl_etcd_wait_engine",
              nixl_etcd_wait_engine(c_, engine_id.c_str(),
                                    static_cast<int64_t>(timeout.count()), &world_size));
        return world_size;
    }

    /* The handle, for C calls this class does not wrap. */
    nixl_etcd_client *get() const noexcept { return c_; }

private:
    static std::vector<uint8_t> take(nixl_etcd_buffer &buf)
    {
        std::vector<uint8_t> out(buf.data, buf.data + buf.len);
        nixl_etcd_buffer_free(&buf);
        return out;
    }

    nixl_etcd_client *c_ = nullptr;
};

} // namespace nixl_etcd

#endif /* NIXL_ETCD_HPP */

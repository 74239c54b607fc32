#!/usr/bin/env bash
# Builds the Debian package into DIR:
#
#   bash scripts/deb.sh DIR     (needs cargo-deb: cargo install cargo-deb --locked)
#
# cargo builds the library and the command (feature nixl: the NIXL helpers, NIXL
# itself loaded at run time only when used); `make install-only` stages them
# under /usr with Debian's multiarch library directory (the SONAME links, the
# header, the C++ wrapper, nixl_etcd.pc); cargo-deb packs the stage, the
# store's systemd unit (deploy/systemd/nixl-etcd-serve.service, not enabled)
# and the docs, with its dependencies from dpkg-shlibdeps.
set -euo pipefail
out="${1:?usage: bash scripts/deb.sh DIR}"
mkdir -p "$out"
out="$(readlink -f "$out")"
cd "$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "scripts/deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi
multiarch=x86_64-linux-gnu # the package's asset paths (Cargo.toml) name it
if [[ "$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$multiarch")" != "$multiarch" ]]; then
    echo "scripts/deb.sh: this package is laid out for $multiarch only" >&2
    exit 1
fi
cargo build --release --lib --bin nixl-etcd --features nixl
stage=target/deb-stage
rm -rf "$stage"
make -s install-only PREFIX=/usr LIBDIR="/usr/lib/$multiarch" FEATURES=nixl DESTDIR="$PWD/$stage"
strip --strip-unneeded "$stage/usr/lib/$multiarch"/libnixl_etcd.so.*.*.* "$stage/usr/bin/nixl-etcd"
strip --strip-debug "$stage/usr/lib/$multiarch/libnixl_etcd.a"
cargo deb --no-build --no-strip --output "$out"

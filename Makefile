# Build and install nixl-etcd: the shared and static library, the C header
# (with the C++ wrapper), the nixl-etcd command, and a pkg-config file.
#
#   make install PREFIX=/opt/nixl-etcd           # cargo build --release, then install
#   make install PREFIX=/usr DESTDIR=$PWD/stage  # staged, for packaging
#   make install FEATURES=nixl                   # with the NIXL conveniences
#   make install-only PREFIX=... BUILD_DIR=...   # what is already built, no cargo
#   make uninstall PREFIX=...
#
# Then: cc app.c $(pkg-config --cflags --libs nixl_etcd)
# (PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig when PREFIX is not a system prefix).

PREFIX ?= /usr/local
EXEC_PREFIX ?= $(PREFIX)
BINDIR ?= $(EXEC_PREFIX)/bin
LIBDIR ?= $(EXEC_PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
DESTDIR ?=

CARGO ?= cargo
# Cargo features of the library: "nixl" adds nixl_etcd_publish_agent and
# nixl_etcd_load_remote_agent (and -DNIXL_ETCD_WITH_NIXL in the .pc file).
FEATURES ?=
BUILD_DIR ?= target/release
BIN ?= $(BUILD_DIR)/nixl-etcd
INSTALL ?= install

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# The shared library is installed as libnixl_etcd.so.$(VERSION), with the
# symlinks libnixl_etcd.so.$(SOMAJOR) (its SONAME, what programs linked
# against it load; set by build.rs) and libnixl_etcd.so (what -lnixl_etcd finds).
SOMAJOR := $(firstword $(subst ., ,$(VERSION)))
SONAME := libnixl_etcd.so.$(SOMAJOR)
REALNAME := libnixl_etcd.so.$(VERSION)
# What the static library needs from the system, as
# `cargo rustc --release --lib --crate-type staticlib -- --print native-static-libs`
# reports it (tests/integration/install.rs links a program with it).
LIBS_PRIVATE ?= -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
PC_CFLAGS := -I$${includedir}$(if $(filter nixl,$(FEATURES)), -DNIXL_ETCD_WITH_NIXL)

.PHONY: all build install install-only uninstall

all: build

build:
	$(CARGO) build --release --lib --bin nixl-etcd $(if $(FEATURES),--features $(FEATURES))

install: build
	$(MAKE) install-only

install-only:
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) \
		$(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 0755 $(BUILD_DIR)/libnixl_etcd.so $(DESTDIR)$(LIBDIR)/$(REALNAME)
	ln -sfn $(REALNAME) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sfn $(SONAME) $(DESTDIR)$(LIBDIR)/libnixl_etcd.so
	$(INSTALL) -m 0644 $(BUILD_DIR)/libnixl_etcd.a $(DESTDIR)$(LIBDIR)/libnixl_etcd.a
	$(INSTALL) -m 0644 include/nixl_etcd.h $(DESTDIR)$(INCLUDEDIR)/nixl_etcd.h
	$(INSTALL) -m 0644 c_examples/nixl_etcd.hpp $(DESTDIR)$(INCLUDEDIR)/nixl_etcd.hpp
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/nixl-etcd
	printf '%s\n' \
		'prefix=$(PREFIX)' \
		'exec_prefix=$(EXEC_PREFIX)' \
		'libdir=$(LIBDIR)' \
		'includedir=$(INCLUDEDIR)' \
		'' \
		'Name: nixl_etcd' \
		'Description: NIXL agent metadata discovery and exchange through etcd' \
		'Version: $(VERSION)' \
		'Libs: -L$${libdir} -lnixl_etcd' \
		'Libs.private: $(LIBS_PRIVATE)' \
		'Cflags: $(PC_CFLAGS)' \
		> $(DESTDIR)$(PKGCONFIGDIR)/nixl_etcd.pc
	chmod 0644 $(DESTDIR)$(PKGCONFIGDIR)/nixl_etcd.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libnixl_etcd.so $(DESTDIR)$(LIBDIR)/$(SONAME) \
		$(DESTDIR)$(LIBDIR)/$(REALNAME) $(DESTDIR)$(LIBDIR)/libnixl_etcd.a \
		$(DESTDIR)$(INCLUDEDIR)/nixl_etcd.h $(DESTDIR)$(INCLUDEDIR)/nixl_etcd.hpp \
		$(DESTDIR)$(BINDIR)/nixl-etcd $(DESTDIR)$(PKGCONFIGDIR)/nixl_etcd.pc

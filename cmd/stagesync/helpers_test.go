package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/dbtest"
	"github.com/stagesync/stagesync/test/remotesim"
)

// testDatabase is a fresh migrated database: its URL and a pool on it for
// fixtures and assertions. Sessions use UTC so hour buckets are UTC hours.
func testDatabase(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	u := dbtest.InTimeZone(t, dbtest.NewDatabase(t), "UTC")
	pool, err := db.NewPool(t.Context(), u, 8)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return u, pool
}

func execSQL(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	_, err := pool.Exec(t.Context(), sql, args...)
	require.NoError(t, err)
}

// fixture is a change row written directly, in any state.
type fixture struct {
	target, resourceID, status string
	attempts                   int
	lastError                  string // NULL if empty
	createdAt                  time.Time
	finishedAt                 time.Time // NULL if zero
}

func insertFixture(t *testing.T, pool *pgxpool.Pool, f fixture) int64 {
	t.Helper()
	if f.createdAt.IsZero() {
		f.createdAt = time.Now()
	}
	var lastErr *string
	if f.lastError != "" {
		lastErr = &f.lastError
	}
	var fin *time.Time
	if !f.finishedAt.IsZero() {
		fin = &f.finishedAt
	}
	var id int64
	err := pool.QueryRow(t.Context(), `INSERT INTO stagesync.changes
		(target, resource_id, fields, status, attempts, last_error, created_at, finished_at)
		VALUES ($1, $2, '{"status": "x"}', $3, $4, $5, $6, $7) RETURNING id`,
		f.target, f.resourceID, f.status, f.attempts, lastErr, f.createdAt, fin).Scan(&id)
	require.NoError(t, err)
	return id
}

func insertTarget(t *testing.T, pool *pgxpool.Pool, names ...string) {
	t.Helper()
	for _, n := range names {
		execSQL(t, pool, `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ($1, 'http://127.0.0.1:1', '/items/{id}')`, n)
	}
}

// insertAttempts writes n request rows of a target at one time; the first
// conflicts of them have outcome conflict, the rest applied.
func insertAttempts(t *testing.T, pool *pgxpool.Pool, target string, n, conflicts int, at time.Time) {
	t.Helper()
	execSQL(t, pool, `INSERT INTO stagesync.attempts (target, resource_id, method, url, status_code, duration_ms, outcome, created_at)
		SELECT $1, 'r' || i, 'PATCH', 'http://127.0.0.1:1/items/r' || i,
		       CASE WHEN i <= $3 THEN 412 ELSE 200 END, 12.5,
		       CASE WHEN i <= $3 THEN 'conflict' ELSE 'applied' END, $4
		FROM generate_series(1, $2) AS i`, target, n, conflicts, at)
}

func countWhere(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, pool.QueryRow(t.Context(), sql, args...).Scan(&n))
	return n
}

// waitFor polls cond every 20ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testToken is the auth credential of the test configs: it must never show
// up in a page, a metric or a log line.
const testToken = "tok-3f9c1b7e-never-print-me"

func testGetenv(name string) string {
	if name == "SIM_TOKEN" {
		return testToken
	}
	return ""
}

// testConfig is a processor config for one PATCH target "territory" at
// simURL with a batch ETag endpoint.
func testConfig(t *testing.T, simURL string, extra string) *processor.Config {
	t.Helper()
	cfg, err := processor.ParseConfig([]byte(`
listen: 127.0.0.1:0
dispatch:
  poll_interval: 500ms
  shutdown_grace: 10s
targets:
  territory:
    base_url: `+simURL+`
    item_path: /assignments/{id}
    batch_etag_path: /assignments
    auth: {env: SIM_TOKEN, prefix: "Bearer "}
    backoff: {base: 50ms, max: 500ms}
    merge:
      fields: {status: ours, owner: theirs, region: manual}
`+extra), testGetenv)
	require.NoError(t, err)
	return cfg
}

// newSim serves a simulator under /assignments for the test.
func newSim(t *testing.T, opts remotesim.Options) (*remotesim.Sim, *httptest.Server) {
	t.Helper()
	opts.ItemPrefix = "/assignments"
	sim := remotesim.New(opts)
	hs := httptest.NewServer(sim)
	t.Cleanup(hs.Close)
	return sim, hs
}

// server is a running serve() of a test.
type server struct {
	addr   string
	cancel context.CancelFunc
	done   chan error
	// logs collects the process log, to check what it never contains.
	logs *lockedBuffer
	once sync.Once
	err  error
}

// startServe runs serve in the background and returns once it serves HTTP,
// its targets are registered and its processor has started; stop (or the test's end) stops it and
// waits for it. opts adjust the serveOpts.
func startServe(t *testing.T, dbURL string, pool *pgxpool.Pool, cfg *processor.Config, opts ...func(*serveOpts)) *server {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	ready := make(chan string, 1)
	s := &server{cancel: cancel, done: make(chan error, 1), logs: &lockedBuffer{}}
	logger := slog.New(slog.NewTextHandler(io.MultiWriter(t.Output(), s.logs), &slog.HandlerOptions{Level: slog.LevelInfo}))
	o := serveOpts{cfg: cfg, databaseURL: dbURL, logger: logger, stdout: io.Discard, ready: ready, sampleEvery: 50 * time.Millisecond}
	for _, f := range opts {
		f(&o)
	}
	go func() { s.done <- serve(ctx, o) }()
	select {
	case s.addr = <-ready:
	case err := <-s.done:
		cancel()
		t.Fatalf("serve ended before it was ready: %v", err)
	}
	t.Cleanup(func() { _ = s.stop() })
	waitFor(t, 30*time.Second, "the targets to be registered", func() bool {
		return countWhere(t, pool, `SELECT count(*) FROM stagesync.targets WHERE name = ANY ($1)`, cfg.TargetNames()) == int64(len(cfg.Targets))
	})
	waitFor(t, 30*time.Second, "the processor to start", func() bool {
		_, body := s.get(t, "/readyz")
		return body != "starting\n"
	})
	return s
}

// stop cancels serve, waits for it and returns its result.
func (s *server) stop() error {
	s.once.Do(func() {
		s.cancel()
		s.err = <-s.done
	})
	return s.err
}

func (s *server) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + s.addr + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// lockedBuffer is a bytes.Buffer safe for a writer and a reader in
// different goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// lines returns s's non-empty lines.
func lines(s string) []string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

// dropTestDatabase drops a database a test made itself (the demo's
// dropDatabase refuses databases the demo did not make).
func dropTestDatabase(ctx context.Context, name string) error {
	c, err := pgx.Connect(ctx, dbtest.AdminURL())
	if err != nil {
		return fmt.Errorf("connect to drop %s: %w", name, err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop %s: %w", name, err)
	}
	return nil
}

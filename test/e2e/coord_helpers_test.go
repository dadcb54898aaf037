package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
)

// Helpers of the coordination tests (liveness, throttling, target health).

// runProcessor starts an in-process processor like startProcessor, with
// the given metrics (nil: unregistered ones), and returns a stop function
// the test may call early (it also runs at cleanup).
func (h *harness) runProcessor(yamlText string, metrics *processor.Metrics) (*processor.Processor, func()) {
	h.t.Helper()
	cfg := h.config(yamlText)
	logger := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	p, err := processor.New(cfg, processor.Options{Pool: h.pool, Logger: logger, Metrics: metrics})
	require.NoError(h.t, err, "processor.New")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					h.t.Errorf("processor.Run returned %v; want nil", err)
				}
			case <-time.After(90 * time.Second):
				h.t.Errorf("processor did not stop within 90s of cancel")
			}
		})
	}
	h.t.Cleanup(stop)
	h.waitFor("the processor registered", 30*time.Second, func() bool {
		select {
		case err := <-done:
			done <- err
			h.t.Fatalf("processor.Run ended at start: %v", err)
		default:
		}
		return h.count(`SELECT count(*) FROM stagesync.processes WHERE client_id = $1`, p.ClientID()) == 1 &&
			h.count(`SELECT count(*) FROM river_job WHERE kind = 'stagesync_dispatch' AND state = 'completed'`) > 0
	})
	return p, stop
}

// startRunNamed is startRun with the process's database connections named
// name (application_name), so the test can find its sessions.
func (h *harness) startRunNamed(name, configPath string) *runProc {
	h.t.Helper()
	u, err := url.Parse(h.dbURL)
	require.NoError(h.t, err)
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	plain := h.dbURL
	h.dbURL = u.String()
	defer func() { h.dbURL = plain }()
	return h.startRun(name, configPath)
}

// strings runs a query returning one text column.
func (h *harness) strings(sql string, args ...any) []string {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), sql, args...)
	require.NoError(h.t, err, "query %q", sql)
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		require.NoError(h.t, rows.Scan(&s))
		out = append(out, s)
	}
	require.NoError(h.t, rows.Err())
	return out
}

// frontDoor fronts the simulator for one processor. Armed, it answers the
// next request that matches with 429 and Retry-After instead of passing it
// on, and records when it answered; failing, it answers every request 500
// with a body that echoes the request's Authorization header (a remote
// that leaks credentials into its errors). Otherwise it passes requests to
// the simulator.
type frontDoor struct {
	next http.Handler

	mu         sync.Mutex
	match      func(*http.Request) bool
	retryAfter time.Duration
	throttled  []time.Time
	failing    bool
	// beforePatch, if set, runs before each PATCH is passed on.
	beforePatch func(id string)
}

func newFrontDoor(t testing.TB, next http.Handler) (*frontDoor, string) {
	f := &frontDoor{next: next}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

// arm makes the next request matching m get a 429 with Retry-After d.
func (f *frontDoor) arm(d time.Duration, m func(*http.Request) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.match, f.retryAfter = m, d
}

func (f *frontDoor) setFailing(v bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failing = v
}

// throttledAt is when the front door answered 429, in order.
func (f *frontDoor) throttledAt() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.throttled...)
}

func (f *frontDoor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	throttle := f.match != nil && f.match(r)
	if throttle {
		f.match = nil
	}
	failing, retryAfter, before := f.failing, f.retryAfter, f.beforePatch
	f.mu.Unlock()
	switch {
	case throttle:
		// Recorded before the answer is written: the client cannot have
		// it any earlier, so a pause it honours ends after this plus d.
		f.mu.Lock()
		f.throttled = append(f.throttled, time.Now())
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Retry-After", fmt.Sprint(int(retryAfter.Seconds())))
		w.WriteHeader(http.StatusTooManyRequests)
		fmt.Fprint(w, `{"error":"slow down"}`)
	case failing:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(w, `{"error":"backend down; your request had Authorization: %s"}`, r.Header.Get("Authorization"))
	default:
		if r.Method == http.MethodPatch && before != nil {
			before(strings.TrimPrefix(r.URL.Path, "/assignments/"))
		}
		f.next.ServeHTTP(w, r)
	}
}

// isBatchGet matches the batch ETag lookup.
func isBatchGet(r *http.Request) bool {
	return r.Method == http.MethodGet && r.URL.Path == "/assignments"
}

// isPatch matches a write.
func isPatch(r *http.Request) bool { return r.Method == http.MethodPatch }

package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/dbtest"
	"github.com/stagesync/stagesync/test/remotesim"
)

// stage inserts changes to target territory in one statement, as an
// upstream would: pairs of resource id and fields JSON.
func stage(t *testing.T, pool *pgxpool.Pool, pairs ...string) {
	t.Helper()
	var values []string
	var args []any
	for i := 0; i < len(pairs); i += 2 {
		values = append(values, fmt.Sprintf("('territory', $%d, $%d::jsonb)", i+1, i+2))
		args = append(args, pairs[i], pairs[i+1])
	}
	execSQL(t, pool, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES `+strings.Join(values, ", "), args...)
}

func waitTerminal(t *testing.T, pool *pgxpool.Pool, want int64) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("%d terminal changes", want), func() bool {
		return countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE finished_at IS NOT NULL`) == want
	})
}

func TestServeMetrics(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	sim, hs := newSim(t, remotesim.Options{Seed: 1})
	sim.Put("a-1", map[string]any{"owner": "rep-1", "status": "active"})
	sim.Put("a-2", map[string]any{"owner": "rep-2", "status": "active"})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))

	// Two changes without stored ETags: one batch ETag lookup, two PATCHes.
	stage(t, pool, "a-1", `{"status": "assigned"}`, "a-2", `{"owner": "rep-9"}`)
	waitTerminal(t, pool, 2)
	// A person edits a-1; the next write conflicts and is written again at
	// once with the ETag of the conflict answer (every field is policy
	// ours: no GET).
	_, ok := sim.Edit("a-1", map[string]any{"owner": "person"}, "person")
	require.True(t, ok)
	stage(t, pool, "a-1", `{"status": "on_hold"}`)
	waitTerminal(t, pool, 3)
	// One pending change of a target no process serves, for the backlog gauge.
	insertTarget(t, pool, "ledger")
	insertFixture(t, pool, fixture{target: "ledger", resourceID: "l-1", status: "pending"})

	// River completes a job just after the job's transaction commits.
	waitFor(t, 10*time.Second, "River jobs to complete", func() bool {
		return countWhere(t, pool, `SELECT count(*) FROM river_job WHERE queue = 'stagesync_territory' AND state <> 'completed'`) == 0
	})

	code, body := s.get(t, "/metrics")
	require.Equal(t, http.StatusOK, code)
	for _, line := range []string{
		"# TYPE stagesync_remote_requests_total counter",
		`stagesync_remote_requests_total{method="GET",outcome="fetched",status_class="2xx",target="territory"} 1`,
		`stagesync_remote_requests_total{method="PATCH",outcome="applied",status_class="2xx",target="territory"} 3`,
		`stagesync_remote_requests_total{method="PATCH",outcome="conflict",status_class="4xx",target="territory"} 1`,
		"# TYPE stagesync_remote_request_duration_seconds histogram",
		`stagesync_remote_request_duration_seconds_count{method="PATCH",target="territory"} 4`,
		"# TYPE stagesync_conflicts_total counter",
		`stagesync_conflicts_total{target="territory"} 1`,
		"# TYPE stagesync_merges_total counter",
		`stagesync_merges_total{outcome="merged",target="territory"} 1`,
		"# TYPE stagesync_changes_finished_total counter",
		`stagesync_changes_finished_total{status="applied",target="territory"} 2`,
		`stagesync_changes_finished_total{status="merged",target="territory"} 1`,
		"# TYPE stagesync_backlog_changes gauge",
		`stagesync_backlog_changes{status="pending",target="ledger"} 1`,
		`stagesync_backlog_changes{status="pending",target="territory"} 0`,
		`stagesync_backlog_changes{status="processing",target="territory"} 0`,
		"# TYPE stagesync_backlog_oldest_pending_seconds gauge",
		`stagesync_backlog_oldest_pending_seconds{target="territory"} 0`,
		"# TYPE stagesync_river_jobs gauge",
		`stagesync_river_jobs{queue="stagesync_territory",state="available"} 0`,
		`stagesync_river_jobs{queue="stagesync_territory",state="running"} 0`,
		`stagesync_river_jobs{queue="stagesync_territory",state="scheduled"} 0`,
		"stagesync_database_up 1",
		"# TYPE go_goroutines gauge",
	} {
		require.Contains(t, body, line+"\n")
	}
	require.NotContains(t, body, testToken)

	// The credential reached the remote, and nothing else.
	for _, r := range sim.Requests() {
		require.Equal(t, "present", r.Authorization, "request %s %s", r.Method, r.Path)
	}
	require.NoError(t, s.stop())
	require.NotContains(t, s.logs.String(), testToken)
}

func TestServeReadyz(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	_, hs := newSim(t, remotesim.Options{})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	name := strings.TrimPrefix(u.Path, "/")

	code, body := s.get(t, "/readyz")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ready\n", body)
	code, body = s.get(t, "/healthz")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok\n", body)

	// Take the database away: refuse new sessions, end the existing ones.
	admin, err := pgx.Connect(t.Context(), dbtest.AdminURL())
	require.NoError(t, err)
	defer admin.Close(t.Context())
	pool.Close()
	_, err = admin.Exec(t.Context(), `ALTER DATABASE `+pgx.Identifier{name}.Sanitize()+` ALLOW_CONNECTIONS false`)
	require.NoError(t, err)
	_, err = admin.Exec(t.Context(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, name)
	require.NoError(t, err)

	waitFor(t, 15*time.Second, "/readyz to answer 503", func() bool {
		code, _ := s.get(t, "/readyz")
		return code == http.StatusServiceUnavailable
	})
	code, body = s.get(t, "/readyz")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Equal(t, "database unreachable\n", body)
	code, _ = s.get(t, "/healthz")
	require.Equal(t, http.StatusOK, code, "the process itself is fine")
	code, body = s.get(t, "/metrics")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "\nstagesync_database_up 0\n")
	require.NotContains(t, body, "stagesync_backlog_changes{")
	code, body = s.get(t, "/")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "The database is unreachable or not migrated")

	// Back again: ready without a restart.
	_, err = admin.Exec(t.Context(), `ALTER DATABASE `+pgx.Identifier{name}.Sanitize()+` ALLOW_CONNECTIONS true`)
	require.NoError(t, err)
	waitFor(t, 30*time.Second, "/readyz to answer 200 again", func() bool {
		code, _ := s.get(t, "/readyz")
		return code == http.StatusOK
	})
	require.NoError(t, s.stop())
}

// countingHandler tracks requests in flight to the simulator.
type countingHandler struct {
	next     http.Handler
	inFlight atomic.Int64
	started  atomic.Int64
}

func (h *countingHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.started.Add(1)
	h.inFlight.Add(1)
	defer h.inFlight.Add(-1)
	h.next.ServeHTTP(w, r)
}

func TestServeShutsDownGracefullyWithRequestsInFlight(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments", Latency: 300 * time.Millisecond})
	counter := &countingHandler{next: sim}
	hs := httptest.NewServer(counter)
	t.Cleanup(hs.Close)
	const n = 40
	var pairs []string
	for i := range n {
		id := fmt.Sprintf("a-%02d", i)
		sim.Put(id, map[string]any{"owner": "rep-1", "status": "active"})
		pairs = append(pairs, id, `{"status": "assigned"}`)
	}
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, `    workers: 2
    concurrency: 4
    batch_size: 10
`))
	stage(t, pool, pairs...)

	// Cancel once PATCHes are under way, with some still in flight.
	waitFor(t, 30*time.Second, "PATCH requests in flight", func() bool {
		return sim.Stats().Patches >= 1 && counter.inFlight.Load() > 0
	})
	inFlight := counter.inFlight.Load()
	require.NoError(t, s.stop(), "serve returns nil after a graceful stop")
	require.Positive(t, inFlight)
	require.Zero(t, counter.inFlight.Load(), "requests still in flight after serve returned")

	// Every request made was recorded as an attempt: the in-flight ones
	// finished and their outcome is in the database.
	require.Equal(t, counter.started.Load(), countWhere(t, pool, `SELECT count(*) FROM stagesync.attempts`))
	st := sim.Stats()
	require.Equal(t, int64(st.Patches), countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE status = 'applied'`))
	require.Equal(t, int64(n-st.Patches), countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE status IN ('pending', 'processing')`))
	// Nothing is processing without a River job that will resume it.
	require.Zero(t, countWhere(t, pool, `SELECT count(*) FROM stagesync.changes c
		WHERE c.status = 'processing' AND NOT EXISTS (
			SELECT 1 FROM river_job j
			WHERE j.kind = 'stagesync_apply' AND j.state IN ('available', 'scheduled', 'retryable')
			  AND j.args ->> 'target' = c.target AND j.args -> 'resource_ids' ? c.resource_id)`))

	// A new process picks the rest up.
	sim.SetFaults(remotesim.Faults{})
	s2 := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	waitTerminal(t, pool, n)
	require.Equal(t, int64(n), countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE status = 'applied'`))
	require.NoError(t, s2.stop())
	require.Equal(t, 1, sim.Stats().MaxInFlightPerResource)
}

// A process whose processor is still starting (registering, taking its
// liveness lock, starting River) is not ready, even with a healthy
// database: a load balancer or a test must not count on it yet.
func TestReadyzSaysStartingUntilTheProcessorRuns(t *testing.T) {
	t.Parallel()
	_, pool := testDatabase(t)
	started := make(chan struct{})
	h := readyzHandler(pool, started)
	get := func() (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/readyz", nil))
		return rec.Code, rec.Body.String()
	}
	code, body := get()
	require.Equal(t, http.StatusServiceUnavailable, code, "before start: got %d; want 503", code)
	require.Equal(t, "starting\n", body)
	close(started)
	code, body = get()
	require.Equal(t, http.StatusOK, code, "after start: got %d %q; want 200", code, body)
	require.Equal(t, "ready\n", body)
}

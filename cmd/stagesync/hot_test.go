package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

func TestHotResourcesSQL(t *testing.T) {
	t.Parallel()
	_, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	now := time.Now().UTC().Truncate(time.Millisecond)
	attempt := func(resource, outcome string, at time.Time) {
		status := 200
		if outcome == "conflict" {
			status = 412
		}
		execSQL(t, pool, `INSERT INTO stagesync.attempts (target, resource_id, method, url, status_code, duration_ms, outcome, created_at)
			VALUES ('alpha', $1, 'PATCH', 'http://x/' || $1, $2, 5, $3, $4)`, resource, status, outcome, at)
	}
	// a: three conflicts and two writes in the window, one conflict before it.
	for i := range 3 {
		attempt("a", "conflict", now.Add(-time.Duration(i+1)*time.Minute))
	}
	attempt("a", "applied", now.Add(-30*time.Second))
	attempt("a", "applied", now.Add(-20*time.Second))
	attempt("a", "conflict", now.Add(-48*time.Hour))
	// c: busy but never conflicted.
	attempt("c", "applied", now.Add(-time.Minute))
	// A batch ETag lookup names no resource.
	execSQL(t, pool, `INSERT INTO stagesync.attempts (target, method, url, status_code, duration_ms, outcome) VALUES ('alpha', 'GET', 'http://x?ids=a', 200, 5, 'fetched')`)
	// a's merge: people changed owner, not status (base = theirs).
	execSQL(t, pool, `INSERT INTO stagesync.merges (target, resource_id, change_ids, base, ours, theirs, result, decisions, outcome, created_at) VALUES
		('alpha', 'a', '{1}', '{"owner": "a", "status": "x"}', '{"owner": "b", "status": "y"}', '{"owner": "c", "status": "x"}', '{}',
		 '{"owner": "kept_theirs", "status": "took_ours"}', 'merged', $1),
		('alpha', 'b', '{2}', NULL, '{"region": "US", "name": "n"}', '{"region": "EU", "name": "n"}', '{}',
		 '{"region": "needs_review", "name": "already_equal"}', 'needs_review', $1),
		('alpha', 'old', '{3}', NULL, '{"x": 1}', '{"x": 2}', '{}', '{"x": "took_ours"}', 'merged', $2)`, now.Add(-time.Minute), now.Add(-25*time.Hour))

	type hot struct {
		Target, ResourceID  string
		Requests, Conflicts int64
		Rate                float64
		Merges, NeedsReview int64
		LastConflict        *time.Time
		Fields              []string
	}
	read := func(sql string, args ...any) []hot {
		rows, err := pool.Query(t.Context(), sql, args...)
		require.NoError(t, err)
		got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[hot])
		require.NoError(t, err)
		return got
	}
	lastA := now.Add(-time.Minute)
	want := []hot{
		{"alpha", "a", 5, 3, 0.6, 1, 0, &lastA, []string{"owner"}},
		{"alpha", "b", 0, 0, 0, 1, 1, nil, []string{"region"}},
	}
	got := read(`SELECT * FROM stagesync.hot_resources`)
	for i := range got {
		if got[i].LastConflict != nil {
			u := got[i].LastConflict.UTC()
			got[i].LastConflict = &u
		}
	}
	require.Equal(t, want, got)
	require.Len(t, read(`SELECT * FROM stagesync.hot_resources_since($1, 1)`, now.Add(-time.Hour)), 1, "max_rows bounds the answer")
	require.Equal(t, "a", read(`SELECT * FROM stagesync.hot_resources_since($1, 1)`, now.Add(-time.Hour))[0].ResourceID, "hottest first")
	all := read(`SELECT * FROM stagesync.hot_resources_since($1)`, now.Add(-72*time.Hour))
	require.Len(t, all, 3, "a wider window sees the older merge")
	require.Equal(t, int64(4), all[0].Conflicts)
}

func TestStatusTextShowsHealthProcessesAndHotResources(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 1, 31, 8, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *time.Time { v := now.Add(d); return &v }
	reason := "429 Too Many Requests (Retry-After 30)"
	lastErr := "GET https://api.example/a/1: 503 \x1b[2Jservice unavailable"
	rep := &statusReport{
		GeneratedAt: now,
		Health: []targetHealth{
			{Target: "erp", PausedUntil: at(12 * time.Second), PauseReason: &reason, Processes: []processHealth{
				{ClientID: "c1", Hostname: "host-a", PID: 42, InflightLimit: 2, Concurrency: 8, LastSuccessAt: at(-3 * time.Minute), UpdatedAt: now},
			}},
			{Target: "ledger", Processes: []processHealth{}},
			{Target: "territory", Processes: []processHealth{
				{ClientID: "c1", Hostname: "host-a", PID: 42, InflightLimit: 8, Concurrency: 8, LastSuccessAt: at(-2 * time.Second), UpdatedAt: now},
				{ClientID: "c2", Hostname: "host-b", PID: 7, InflightLimit: 4, Concurrency: 8, LastSuccessAt: at(-10 * time.Minute),
					LastErrorAt: at(-5 * time.Second), LastError: &lastErr, ConsecutiveFailures: 17, UpdatedAt: now.Add(-2 * time.Minute)},
			}},
		},
		Processes: []processRow{
			{ClientID: "c1", Hostname: "host-a", PID: 42, Targets: []string{"erp", "territory"}, StartedAt: now.Add(-time.Hour), HeartbeatAt: now.Add(-time.Second)},
			{ClientID: "c2", Hostname: "host-b", PID: 7, Targets: []string{"territory"}, StartedAt: now.Add(-time.Hour), HeartbeatAt: now.Add(-2 * time.Second)},
		},
		HotResources: []hotResource{
			{Target: "territory", ResourceID: "acct-1", Requests: 40, Conflicts: 12, ConflictRate: 0.3, Merges: 10, NeedsReview: 1,
				LastConflictAt: at(-3 * time.Minute), ChangedFields: []string{"owner", "status"}},
		},
	}
	var out bytes.Buffer
	require.NoError(t, writeStatusText(&out, rep))
	text := out.String()
	t.Logf("\n%s", text)
	for _, want := range []string{
		"HEALTH     state                                                                process        in-flight limit  last success  failures  last error\n",
		"erp        PAUSED 12s (until 08:00:12): 429 Too Many Requests (Retry-After 30)  host-a pid 42  2/8              3m00s ago     0         -\n",
		"ledger     no live process serves it                                            -              -                -             -         -\n",
		"territory  ok                                                                   host-a pid 42  8/8              2s ago        0         -\n",
		"territory  FAILING (stale: updated 2m00s ago)                                   host-b pid 7   4/8              10m00s ago    17        5s ago: GET https://api.example/a/1: 503 [2Jservice unavailable\n",
		"PROCESSES (2 live)\n",
		"host-a pid 42  c1         erp,territory  2025-01-31 07:00:00  1s ago\n",
		"HOT RESOURCES (most conflicts in the last 24 hours; all: SELECT * FROM stagesync.hot_resources)\n",
		"territory  acct-1    12         40        30.0%          10      1             3m00s ago      owner, status\n",
	} {
		require.Contains(t, text, want)
	}
	require.NotContains(t, text, "\x1b")

	rep.Health, rep.Processes, rep.HotResources = nil, nil, nil
	out.Reset()
	require.NoError(t, writeStatusText(&out, rep))
	require.Contains(t, out.String(), "(no targets registered)\n")
	require.Contains(t, out.String(), "PROCESSES: none running (nothing is being applied)\n")
	require.Contains(t, out.String(), "HOT RESOURCES (last 24 hours): none had a conflict\n")
	require.False(t, strings.Contains(out.String(), "FAILING"))
}

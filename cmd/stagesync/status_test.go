package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// statusFixture is a database whose figures the status tests know exactly.
type statusFixture struct {
	url            string
	pool           *pgxpool.Pool
	now            time.Time
	deadID, rejID  int64
	oldestAlpha    time.Time
	oldestBeta     time.Time
	deadFinished   time.Time
	rejFinished    time.Time
	deadLastError  string
	rejectedReason string
}

func newStatusFixture(t *testing.T) statusFixture {
	t.Helper()
	url, pool := testDatabase(t)
	now := time.Now().UTC().Truncate(time.Second)
	f := statusFixture{
		url: url, pool: pool, now: now,
		oldestAlpha: now.Add(-90 * time.Second), oldestBeta: now.Add(-time.Hour),
		deadFinished: now.Add(-20 * time.Minute), rejFinished: now.Add(-time.Minute),
		deadLastError:  "gave up after 10 attempts: PATCH http://127.0.0.1:1/items/a9: 503 service unavailable",
		rejectedReason: "PATCH http://127.0.0.1:1/items/b2: 422 field status: value INVALID is not allowed",
	}
	insertTarget(t, pool, "alpha", "beta")
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a1", status: "pending", createdAt: f.oldestAlpha})
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a2", status: "pending", createdAt: now.Add(-30 * time.Second)})
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a3", status: "pending", createdAt: now.Add(-10 * time.Second)})
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a4", status: "processing"})
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a5", status: "processing"})
	for i := range 4 {
		insertFixture(t, pool, fixture{target: "alpha", resourceID: fmt.Sprintf("a%d", 10+i), status: "applied", finishedAt: now.Add(-5 * time.Minute)})
	}
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a20", status: "merged", finishedAt: now.Add(-5 * time.Minute)})
	insertFixture(t, pool, fixture{target: "alpha", resourceID: "a21", status: "applied", finishedAt: now.Add(-2 * time.Hour)})
	f.deadID = insertFixture(t, pool, fixture{target: "alpha", resourceID: "a9", status: "dead", attempts: 10, lastError: f.deadLastError, finishedAt: f.deadFinished})
	insertFixture(t, pool, fixture{target: "beta", resourceID: "b1", status: "pending", createdAt: f.oldestBeta})
	f.rejID = insertFixture(t, pool, fixture{target: "beta", resourceID: "b2", status: "rejected", attempts: 1, lastError: f.rejectedReason, finishedAt: f.rejFinished})

	insertAttempts(t, pool, "alpha", 10, 3, now.Add(-10*time.Minute))
	insertAttempts(t, pool, "alpha", 5, 5, now.Add(-2*time.Hour)) // outside the last hour
	insertAttempts(t, pool, "beta", 1, 0, now.Add(-time.Minute))

	// River jobs: only live jobs of the targets' queues count.
	execSQL(t, pool, `INSERT INTO river_job (kind, args, queue, state) VALUES
		('stagesync_apply', '{}', 'stagesync_alpha', 'available'),
		('stagesync_apply', '{}', 'stagesync_alpha', 'available'),
		('stagesync_apply', '{}', 'stagesync_alpha', 'running'),
		('stagesync_apply', '{}', 'stagesync_alpha', 'scheduled'),
		('stagesync_apply', '{}', 'stagesync_other', 'available')`)
	execSQL(t, pool, `INSERT INTO river_job (kind, args, queue, state, finalized_at)
		VALUES ('stagesync_apply', '{}', 'stagesync_alpha', 'completed', now())`)
	return f
}

func TestStatusJSONHasTheDatabaseFigures(t *testing.T) {
	t.Parallel()
	f := newStatusFixture(t)

	rep, err := readStatus(t.Context(), f.pool, f.now, statusLimits{dead: 10, hot: 10})
	require.NoError(t, err)
	var out bytes.Buffer
	require.NoError(t, writeStatusJSON(&out, rep))

	ts := func(t time.Time) string { return t.Format(time.RFC3339) }
	want := fmt.Sprintf(`{
	  "generated_at": %q,
	  "backlog": [
	    {"target": "alpha", "pending": 3, "processing": 2, "oldest_pending_at": %q, "oldest_pending_seconds": 90,
	     "jobs_available": 2, "jobs_running": 1, "jobs_scheduled": 1},
	    {"target": "beta", "pending": 1, "processing": 0, "oldest_pending_at": %q, "oldest_pending_seconds": 3600,
	     "jobs_available": 0, "jobs_running": 0, "jobs_scheduled": 0}
	  ],
	  "totals": {"pending": 4, "processing": 2},
	  "health": [
	    {"target": "alpha", "paused_until": null, "pause_reason": null, "processes": []},
	    {"target": "beta", "paused_until": null, "pause_reason": null, "processes": []}
	  ],
	  "processes": [],
	  "last_hour": [
	    {"target": "alpha", "requests": 10, "conflicts": 3, "conflict_rate": 0.3,
	     "finished": {"applied": 4, "merged": 1, "noop": 0, "dead": 1, "rejected": 0}},
	    {"target": "beta", "requests": 1, "conflicts": 0, "conflict_rate": 0,
	     "finished": {"applied": 0, "merged": 0, "noop": 0, "dead": 0, "rejected": 1}}
	  ],
	  "conflict_alerts": [
	    {"target": "alpha", "conflict_rate": 0.3, "threshold": 0.05, "window_seconds": 900, "requests": 10, "conflicts": 3,
	     "min_requests": 20, "above": false,
	     "summary": "conflict rate 30.0%% over the last 15m; too few requests (10 of 20) to judge it against the 5%% alert"},
	    {"target": "beta", "conflict_rate": 0, "threshold": 0.05, "window_seconds": 900, "requests": 1, "conflicts": 0,
	     "min_requests": 20, "above": false,
	     "summary": "conflict rate 0.0%% over the last 15m; too few requests (1 of 20) to judge it against the 5%% alert"}
	  ],
	  "dead_letters": [
	    {"id": %d, "target": "beta", "resource_id": "b2", "status": "rejected", "attempts": 1,
	     "last_error": %q, "finished_at": %q},
	    {"id": %d, "target": "alpha", "resource_id": "a9", "status": "dead", "attempts": 10,
	     "last_error": %q, "finished_at": %q}
	  ],
	  "hot_resources": [
	    {"target": "alpha", "resource_id": "r1", "requests": 2, "conflicts": 2, "conflict_rate": 1, "merges": 0, "needs_review": 0,
	     "last_conflict_at": %q, "changed_fields": []},
	    {"target": "alpha", "resource_id": "r2", "requests": 2, "conflicts": 2, "conflict_rate": 1, "merges": 0, "needs_review": 0,
	     "last_conflict_at": %q, "changed_fields": []},
	    {"target": "alpha", "resource_id": "r3", "requests": 2, "conflicts": 2, "conflict_rate": 1, "merges": 0, "needs_review": 0,
	     "last_conflict_at": %q, "changed_fields": []},
	    {"target": "alpha", "resource_id": "r4", "requests": 2, "conflicts": 1, "conflict_rate": 0.5, "merges": 0, "needs_review": 0,
	     "last_conflict_at": %q, "changed_fields": []},
	    {"target": "alpha", "resource_id": "r5", "requests": 2, "conflicts": 1, "conflict_rate": 0.5, "merges": 0, "needs_review": 0,
	     "last_conflict_at": %q, "changed_fields": []}
	  ]
	}`, ts(f.now), ts(f.oldestAlpha), ts(f.oldestBeta),
		f.rejID, f.rejectedReason, ts(f.rejFinished), f.deadID, f.deadLastError, ts(f.deadFinished),
		ts(f.now.Add(-10*time.Minute)), ts(f.now.Add(-10*time.Minute)), ts(f.now.Add(-10*time.Minute)),
		ts(f.now.Add(-2*time.Hour)), ts(f.now.Add(-2*time.Hour)))
	// Table sizes depend on the server; they are checked apart, the rest
	// exactly.
	var got map[string]any
	require.NoError(t, json.Unmarshal(out.Bytes(), &got))
	tables, ok := got["tables"].([]any)
	require.True(t, ok, "tables: got %T; want a list", got["tables"])
	sizes := map[string]float64{}
	for _, tb := range tables {
		m := tb.(map[string]any)
		sizes[m["table"].(string)] = m["bytes"].(float64)
		// null before the first ANALYZE, never a negative count.
		if rows, known := m["estimated_rows"].(float64); known {
			require.GreaterOrEqual(t, rows, float64(0), "estimated_rows of %v", m["table"])
		} else {
			require.Nil(t, m["estimated_rows"], "estimated_rows of %v", m["table"])
		}
	}
	for _, name := range []string{"changes", "attempts", "merges", "resources", "outbox", "river_job"} {
		require.Positive(t, sizes[name], "size of table %s: got %v; want > 0 (tables: %v)", name, sizes[name], sizes)
	}
	delete(got, "tables")
	rest, err := json.Marshal(got)
	require.NoError(t, err)
	require.JSONEq(t, want, string(rest))
}

func TestStatusMarksATargetAboveItsConflictAlert(t *testing.T) {
	t.Parallel()
	f := newStatusFixture(t)
	execSQL(t, f.pool, `INSERT INTO stagesync.targets (name, base_url, item_path, settings)
		VALUES ('gamma', 'http://127.0.0.1:1', '/items/{id}', '{"alert": {"conflict_rate": 0.1, "window": "1h0m0s"}}')`)
	insertAttempts(t, f.pool, "gamma", 50, 6, time.Now().Add(-30*time.Minute)) // 12% over the 1h window
	insertAttempts(t, f.pool, "gamma", 50, 50, time.Now().Add(-2*time.Hour))   // outside it
	getenv := func(string) string { return "" }

	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"status", "--json", "--database-url", f.url}, getenv, &out))
	var rep statusReport
	require.NoError(t, json.Unmarshal(out.Bytes(), &rep))
	require.Len(t, rep.ConflictAlerts, 3)
	require.Equal(t, conflictAlertRow{Target: "gamma", ConflictRate: 0.12, Threshold: 0.1, WindowSeconds: 3600, Requests: 50, Conflicts: 6,
		MinRequests: 20, Above: true, Summary: "conflict rate 12.0% over the last 1h, above the 10% alert"}, rep.ConflictAlerts[2])
	require.False(t, rep.ConflictAlerts[0].Above, "alpha (30%% of 10 requests) above: got true; want false (too few requests)")

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"status", "--database-url", f.url}, getenv, &out))
	text := out.String()
	require.Regexp(t, `(?m)^gamma +ABOVE +conflict rate 12\.0% over the last 1h, above the 10% alert \(6 conflicts in 50 requests\)$`, text)
	require.Regexp(t, `(?m)^alpha +ok +conflict rate 30\.0% over the last 15m; too few requests \(10 of 20\) to judge it against the 5% alert`, text)
}

func TestStatusCommand(t *testing.T) {
	t.Parallel()
	f := newStatusFixture(t)
	getenv := func(string) string { return "" }

	t.Run("json", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, run(t.Context(), []string{"status", "--json", "--dead", "1", "--database-url", f.url}, getenv, &out))
		var rep statusReport
		require.NoError(t, json.Unmarshal(out.Bytes(), &rep))
		require.Equal(t, backlogTotals{Pending: 4, Processing: 2}, rep.Totals)
		require.Len(t, rep.Backlog, 2)
		require.Equal(t, int64(3), rep.Backlog[0].Pending)
		require.Equal(t, int64(1), rep.Backlog[1].Pending)
		require.Len(t, rep.DeadLetters, 1)
		require.Equal(t, f.rejID, rep.DeadLetters[0].ID)
		require.Equal(t, int64(3), rep.LastHour[0].Conflicts)
	})

	t.Run("tables", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, run(t.Context(), []string{"status", "--database-url", f.url}, getenv, &out))
		text := out.String()
		row := func(prefix string) []string {
			for _, l := range lines(text) {
				if fs := strings.Fields(l); len(fs) > 0 && fs[0] == prefix {
					return fs
				}
			}
			t.Fatalf("no line starting with %q in:\n%s", prefix, text)
			return nil
		}
		// BACKLOG: target pending processing age running queued scheduled.
		a := row("alpha")
		require.Equal(t, []string{"alpha", "3", "2"}, a[:3])
		require.Equal(t, []string{"1", "2", "1"}, a[4:])
		require.Equal(t, []string{"total", "4", "2"}, row("total"))
		require.Contains(t, text, "IN FLIGHT: 2 changes processing, 1 jobs running, 2 jobs queued, 1 jobs scheduled for a retry\n")
		require.Contains(t, text, "\nTABLES (size with indexes; rows as estimated by PostgreSQL; kept in check by retention)\n")
		require.Regexp(t, `(?m)^ +changes +[0-9.]+ (B|KiB|MiB) +(-|[0-9]+) *$`, text)
		require.Contains(t, text, "DEAD LETTERS (latest 2; requeue one, once its cause is fixed, with stagesync requeue and the flags in its row)\n")
		// Each row names its own command: a rejected change needs
		// --include-rejected, a dead one does not.
		require.Regexp(t, `(?m)^14 +beta +b2 +rejected .* --id 14 --include-rejected +PATCH`, text)
		require.Regexp(t, `(?m)^12 +alpha +a9 +dead .* --id 12 +gave up`, text)
		require.Contains(t, text, f.deadLastError)
		require.Contains(t, text, f.rejectedReason)
	})

	t.Run("bad flags", func(t *testing.T) {
		var out bytes.Buffer
		err := run(t.Context(), []string{"status", "--watch", "--json", "--database-url", f.url}, getenv, &out)
		require.EqualError(t, err, "status: --watch and --until-drained don't combine with --json; run --json repeatedly instead")
		err = run(t.Context(), []string{"status", "--until-drained", "--json", "--database-url", f.url}, getenv, &out)
		require.EqualError(t, err, "status: --watch and --until-drained don't combine with --json; run --json repeatedly instead")
		err = run(t.Context(), []string{"status", "--dead", "-1", "--database-url", f.url}, getenv, &out)
		require.EqualError(t, err, "status: --dead must be between 0 and 1000, got -1")
	})
}

func TestStatusWatchDrains(t *testing.T) {
	t.Parallel()
	url, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	for i := range 3 {
		insertFixture(t, pool, fixture{target: "alpha", resourceID: fmt.Sprintf("r%d", i), status: "pending"})
	}

	out := &lockedBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(t.Context(), []string{"status", "--watch", "--interval", "100ms", "--until-drained", "--database-url", url},
			func(string) string { return "" }, out)
	}()
	waitFor(t, 10*time.Second, "the first progress line", func() bool { return strings.Contains(out.String(), "0/3") })
	execSQL(t, pool, `UPDATE stagesync.changes SET status = 'applied', finished_at = now()`)
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("status --watch --until-drained did not exit after the backlog drained")
	}
	ls := lines(out.String())
	require.Contains(t, ls[0], "[----------------------------------------]  0/3    0%  0/s  ETA -")
	require.Contains(t, ls[len(ls)-1], "[########################################]  3/3  100%")
	require.True(t, strings.HasSuffix(ls[len(ls)-1], "  drained"), "last line: %q", ls[len(ls)-1])
}

func TestProgressLine(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		done, total int64
		rate        float64
		want        string
	}{
		{"nothing to do", 0, 0, 0, "[##########]  0/0  100%  0/s  drained"},
		{"halfway", 250, 500, 50, "[#####-----]  250/500   50%  50/s  ETA 5s"},
		{"no rate yet", 1, 3, 0, "[###-------]  1/3   33%  0/s  ETA -"},
		{"slow", 10, 100, 0.5, "[#---------]  10/100   10%  0.5/s  ETA 3m00s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.want, progressLine(tt.done, tt.total, tt.rate, 10))
		})
	}
}

func TestProgressBarPrintsLinesWhenNotATerminal(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	bar := newProgressBar(&out, time.Second)
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	bar.update(t0, 0, 100)
	bar.update(t0.Add(500*time.Millisecond), 40, 100) // too soon for another line
	bar.update(t0.Add(time.Second), 50, 100)
	bar.finish(100, 100, "done in 2s")
	require.Equal(t, "[----------------------------------------]  0/100    0%  0/s  ETA -\n"+
		"[####################--------------------]  50/100   50%  50/s  ETA 1s\n"+
		"[########################################]  100/100  100%  done in 2s\n", out.String())
}

func TestRateMeterWindow(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	m := rateMeter{window: time.Second}
	require.Equal(t, 0.0, m.rate())
	m.add(t0, 0)
	m.add(t0.Add(time.Second), 10)
	m.add(t0.Add(2*time.Second), 30)
	require.Equal(t, 20.0, m.rate())
	require.Len(t, m.samples, 2)
}

func TestFormatAge(t *testing.T) {
	t.Parallel()
	for d, want := range map[time.Duration]string{
		850 * time.Millisecond:        "850ms",
		42 * time.Second:              "42s",
		192 * time.Second:             "3m12s",
		5*time.Hour + 3*time.Minute:   "5h03m",
		52*time.Hour + 10*time.Minute: "2d04h",
	} {
		require.Equal(t, want, formatAge(d), "formatAge(%v)", d)
	}
}

func TestOneLine(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, in string
		n        int
		want     string
	}{
		{"folds whitespace", "a\n\tb  c\r\n", 80, "a b c"},
		{"drops an escape sequence's ESC", "\x1b[31mred\x1b[0m text", 80, "[31mred[0m text"},
		{"drops a title sequence's ESC and BEL", "\x1b]0;owned\x07 503", 80, "]0;owned 503"},
		{"drops C1 controls and DEL", "a\u009bb\x7fc", 80, "abc"},
		{"leaves one space where a control stood alone", "a \x1b b", 80, "a b"},
		{"drops bidi controls", "abc\u202edef\u2066", 80, "abcdef"},
		{"cuts at n runes", "αβγδεζ", 4, "αβγ…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.want, oneLine(tt.in, tt.n))
		})
	}
}

func TestStatusTextDropsTerminalEscapes(t *testing.T) {
	t.Parallel()
	fin := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	rep := &statusReport{GeneratedAt: fin, DeadLetters: []deadLetterRow{{
		ID: 7, Target: "alpha", ResourceID: "a\x1b[2Jb", Status: "dead", Attempts: 10, FinishedAt: &fin,
		LastError: "gave up: 503 \x1b[2J\x1b]0;owned\x07service\nunavailable",
	}}}
	var out bytes.Buffer
	require.NoError(t, writeStatusText(&out, rep))
	text := out.String()
	require.NotContains(t, text, "\x1b")
	require.NotContains(t, text, "\x07")
	require.Contains(t, text, "  a[2Jb  ")
	require.Contains(t, text, "  gave up: 503 [2J]0;ownedservice unavailable\n")
}

// progressRE reads done and total from a --watch progress line.
var progressRE = regexp.MustCompile(`\]  (\d+)/(\d+) `)

func progressOf(t *testing.T, lines []string) (done, total []int64) {
	t.Helper()
	for _, l := range lines {
		if m := progressRE.FindStringSubmatch(l); m != nil {
			d, err := strconv.ParseInt(m[1], 10, 64)
			require.NoError(t, err)
			n, err := strconv.ParseInt(m[2], 10, 64)
			require.NoError(t, err)
			done, total = append(done, d), append(total, n)
		}
	}
	return done, total
}

// A change whose recording transaction began before the watch and
// committed after it has finished_at before the watch's start: counting
// "finished since start" missed it, and the total fell (3/3 → 0/0).
func TestStatusWatchCountsAChangeFinishedByATransactionOlderThanTheWatch(t *testing.T) {
	t.Parallel()
	url, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	for i := range 3 {
		insertFixture(t, pool, fixture{target: "alpha", resourceID: fmt.Sprintf("r%d", i), status: "processing"})
	}
	// The processor's recording transaction: now() is fixed at its start.
	tx, err := pool.Begin(t.Context())
	require.NoError(t, err)
	defer tx.Rollback(context.WithoutCancel(t.Context())) //nolint:errcheck // committed below
	_, err = tx.Exec(t.Context(), `SELECT now()`)
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)

	out := &lockedBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(t.Context(), []string{"status", "--watch", "--interval", "100ms", "--until-drained", "--database-url", url},
			func(string) string { return "" }, out)
	}()
	waitFor(t, 10*time.Second, "the first progress line", func() bool { return strings.Contains(out.String(), "0/3") })
	_, err = tx.Exec(t.Context(), `UPDATE stagesync.changes SET status = 'applied', finished_at = now()`)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(t.Context()))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("status --watch --until-drained did not exit after the backlog drained")
	}
	ls := lines(out.String())
	d, n := progressOf(t, ls)
	require.Equal(t, int64(3), d[len(d)-1], "done at the end; lines:\n%s", out.String())
	for i := range n {
		require.Equal(t, int64(3), n[i], "total of line %d; lines:\n%s", i, out.String())
	}
	require.True(t, strings.HasSuffix(ls[len(ls)-1], "  drained"), "last line: %q", ls[len(ls)-1])
}

// --until-drained started before anything is staged waits for the work,
// and while a real processor drains it the totals never go backwards nor
// exceed what was staged.
func TestStatusWatchUntilDrainedWaitsForWorkAndNeverGoesBackwards(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	sim, hs := newSim(t, remotesim.Options{Seed: 3, Latency: 10 * time.Millisecond})
	const n = 400
	for i := range n / 4 {
		sim.Put(fmt.Sprintf("a-%03d", i), map[string]any{"owner": "rep-1", "status": "active"})
	}
	startServe(t, dbURL, pool, testConfig(t, hs.URL, "    batch_size: 20\n    concurrency: 2\n"))

	out := &lockedBuffer{}
	done := make(chan error, 1)
	go func() {
		// --until-drained alone implies --watch.
		done <- run(t.Context(), []string{"status", "--interval", "100ms", "--until-drained", "--wait-for-work", "60s", "--database-url", dbURL},
			func(string) string { return "" }, out)
	}()
	defer func() { t.Logf("watch output:\n%s", out.String()) }()
	waitFor(t, 10*time.Second, "the watch to wait for work", func() bool {
		return strings.Contains(out.String(), "no work yet: waiting up to 1m0s for changes to be staged (--wait-for-work)")
	})
	// Four upstream batches, each touching every resource once.
	for b := range 4 {
		var pairs []string
		for i := range n / 4 {
			pairs = append(pairs, fmt.Sprintf("a-%03d", i), fmt.Sprintf(`{"status": "s%d"}`, b))
		}
		stage(t, pool, pairs...)
		time.Sleep(30 * time.Millisecond)
	}
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(120 * time.Second):
		t.Fatalf("the watch did not end; output:\n%s", out.String())
	}
	d, tot := progressOf(t, lines(out.String()))
	require.Greater(t, len(tot), 5, "progress lines during the drain")
	for i := 1; i < len(tot); i++ {
		require.GreaterOrEqual(t, tot[i], tot[i-1], "total went backwards at line %d; output:\n%s", i, out.String())
		require.GreaterOrEqual(t, d[i], d[i-1], "done went backwards at line %d", i)
	}
	for i := range tot {
		require.LessOrEqual(t, tot[i], int64(n), "a total beyond what was staged")
		require.LessOrEqual(t, d[i], tot[i])
	}
	require.Equal(t, int64(n), d[len(d)-1])
	require.Equal(t, int64(n), tot[len(tot)-1])
}

func TestStatusWatchUntilDrainedGivesUpWhenNoWorkAppears(t *testing.T) {
	t.Parallel()
	url, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	var out bytes.Buffer
	err := run(t.Context(), []string{"status", "--watch", "--interval", "100ms", "--until-drained", "--wait-for-work", "300ms", "--database-url", url},
		func(string) string { return "" }, &out)
	require.EqualError(t, err, "status: no work appeared within 300ms (--wait-for-work); nothing was drained")
	require.Contains(t, out.String(), "no work yet: waiting up to 300ms for changes to be staged (--wait-for-work)\n")
	require.NotContains(t, out.String(), "drained\n")

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"status", "--watch", "--until-drained", "--wait-for-work", "0", "--database-url", url},
		func(string) string { return "" }, &out), "--wait-for-work 0: nothing open means drained")
	require.Contains(t, out.String(), "0/0  100%  0/s  drained\n")
}

func TestFormatBytesAndRows(t *testing.T) {
	t.Parallel()
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 10 << 20: "10 MiB", 3 << 30: "3.0 GiB"} {
		require.Equal(t, want, formatBytes(n), "formatBytes(%d)", n)
	}
	require.Equal(t, "-", formatRows(nil), "before the first ANALYZE")
	n := int64(42)
	require.Equal(t, "42", formatRows(&n))
}

// The same counts read the same everywhere in status: 60 conflicts of 424
// requests is 14.2% in the last-hour table as in the alert section (the
// rounded stored rate, 0.1415, used to print 14.1%).
func TestLastHourRateIsRoundedOnce(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	rep := &statusReport{LastHour: []lastHourRow{{Target: "territory", Requests: 424, Conflicts: 60, ConflictRate: 0.1415}}}
	require.NoError(t, writeStatusText(&out, rep))
	require.Contains(t, out.String(), "14.2%")
	require.NotContains(t, out.String(), "14.1%")
}

package processor

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/dbtest"
)

func TestRetentionConfig(t *testing.T) {
	t.Parallel()
	const day = 24 * time.Hour
	target := func(name, retention string) string {
		s := "  " + name + ":\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n"
		if retention != "" {
			s += "    retention: " + retention + "\n"
		}
		return s
	}
	tests := []struct {
		name    string
		yaml    string
		want    map[string][2]time.Duration // target: finished, audit
		wantErr string
	}{
		{
			name: "defaults",
			yaml: "targets:\n" + target("a", ""),
			want: map[string][2]time.Duration{"a": {30 * day, 90 * day}},
		},
		{
			name: "global periods and a partial override",
			yaml: "retention: {finished: 7d, audit: 12h}\ntargets:\n" + target("a", "") + target("b", "{audit: 365d}"),
			want: map[string][2]time.Duration{"a": {7 * day, 12 * time.Hour}, "b": {7 * day, 365 * day}},
		},
		{
			name: "off and 0 disable",
			yaml: "retention: {finished: off}\ntargets:\n" + target("a", "{audit: 0}") + target("b", "{finished: 90m}"),
			want: map[string][2]time.Duration{"a": {0, 0}, "b": {90 * time.Minute, 90 * day}},
		},
		{
			name:    "a period with an unknown unit",
			yaml:    "retention: {finished: 30x}\ntargets:\n" + target("a", ""),
			wantErr: `retention.finished: "30x" is not a period like 30d, 12h or off`,
		},
		{
			name:    "a period under an hour",
			yaml:    "targets:\n" + target("a", "{audit: 10m}"),
			wantErr: "targets.a.retention.audit: must be off or at least 1h, got 10m",
		},
		{
			name:    "a negative period",
			yaml:    "retention: {audit: -5d}\ntargets:\n" + target("a", ""),
			wantErr: `retention.audit: "-5d" is not a period like 30d, 12h or off`,
		},
		{
			name:    "a short interval",
			yaml:    "retention: {interval: 10s}\ntargets:\n" + target("a", ""),
			wantErr: "retention.interval: must be at least 1m",
		},
		{
			name:    "a batch too large",
			yaml:    "retention: {batch_size: 1000000}\ntargets:\n" + target("a", ""),
			wantErr: "retention.batch_size: must be between 1 and 100000",
		},
		{
			name:    "a long pause",
			yaml:    "retention: {pause: 5m}\ntargets:\n" + target("a", ""),
			wantErr: "retention.pause: must be between 1ms and 1m",
		},
		{
			// Only the periods may be set per target; the words are the
			// YAML decoder's.
			name:    "the interval per target",
			yaml:    "targets:\n" + target("a", "{interval: 1h}"),
			wantErr: "interval",
		},
		{
			name:    "a list as a period",
			yaml:    "retention: {finished: [30d]}\ntargets:\n" + target("a", ""),
			wantErr: "a retention period is a value like 30d, 12h or off",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ParseConfig([]byte(tt.yaml), func(string) string { return "" })
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			for name, want := range tt.want {
				f, a := cfg.retentionFor(name)
				require.Equal(t, want, [2]time.Duration{f, a}, "periods of %s (finished, audit)", name)
			}
			require.Equal(t, time.Hour, cfg.Retention.Interval.D())
			require.Equal(t, 5000, cfg.Retention.BatchSize)
			require.Equal(t, 100*time.Millisecond, cfg.Retention.Pause.D())
		})
	}
}

// retentionWorld is a database with four registered targets, three of them
// configured, and a processor (not running) over it.
type retentionWorld struct {
	pool *pgxpool.Pool
	p    *Processor
	now  time.Time
}

func newRetentionWorld(t *testing.T, retentionYAML string) retentionWorld {
	t.Helper()
	pool := dbtest.NewPool(t)
	_, err := pool.Exec(t.Context(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES
		('territory', 'http://127.0.0.1:1', '/a/{id}'), ('billing', 'http://127.0.0.1:1', '/b/{id}'),
		('ledger', 'http://127.0.0.1:1', '/l/{id}'), ('legacy', 'http://127.0.0.1:1', '/x/{id}')`)
	require.NoError(t, err)
	cfg, err := ParseConfig([]byte(retentionYAML+`
dispatch: {rescue_after: 2m}
targets:
  territory: {base_url: "http://127.0.0.1:1", item_path: "/a/{id}"}
  billing: {base_url: "http://127.0.0.1:1", item_path: "/b/{id}", retention: {finished: 7d, audit: "off"}}
  ledger: {base_url: "http://127.0.0.1:1", item_path: "/l/{id}", retention: {finished: "off", audit: 2h}}
`), func(string) string { return "" })
	require.NoError(t, err)
	p, err := New(cfg, Options{Pool: pool, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	require.NoError(t, err)
	return retentionWorld{pool: pool, p: p, now: time.Now().Truncate(time.Second)}
}

// change inserts a change in status, staged a year ago and, when terminal,
// finished ago before now, and returns its id.
func (w retentionWorld) change(t *testing.T, target, status string, ago time.Duration) int64 {
	t.Helper()
	var finishedAt *time.Time
	if status != "pending" && status != "processing" {
		ts := w.now.Add(-ago)
		finishedAt = &ts
	}
	var id int64
	require.NoError(t, w.pool.QueryRow(t.Context(), `INSERT INTO stagesync.changes
		(target, resource_id, fields, status, finished_at, created_at)
		VALUES ($1, 'r1', '{"a": 1}', $2, $3, $4) RETURNING id`,
		target, status, finishedAt, w.now.Add(-365*24*time.Hour)).Scan(&id))
	return id
}

// attempt inserts an attempt made ago before now and returns its id.
func (w retentionWorld) attempt(t *testing.T, target string, ago time.Duration) int64 {
	t.Helper()
	var id int64
	require.NoError(t, w.pool.QueryRow(t.Context(), `INSERT INTO stagesync.attempts
		(target, resource_id, method, url, duration_ms, outcome, created_at)
		VALUES ($1, 'r1', 'PATCH', 'http://127.0.0.1:1/a/r1', 3, 'applied', $2) RETURNING id`,
		target, w.now.Add(-ago)).Scan(&id))
	return id
}

// merge inserts a merge made ago before now and returns its id.
func (w retentionWorld) merge(t *testing.T, target string, ago time.Duration) int64 {
	t.Helper()
	var id int64
	require.NoError(t, w.pool.QueryRow(t.Context(), `INSERT INTO stagesync.merges
		(target, resource_id, change_ids, ours, result, decisions, outcome, created_at)
		VALUES ($1, 'r1', '{1}', '{}', '{}', '{}', 'merged', $2) RETURNING id`,
		target, w.now.Add(-ago)).Scan(&id))
	return id
}

// batchRequest inserts a batch POST made ago before now and returns its id.
func (w retentionWorld) batchRequest(t *testing.T, target string, ago time.Duration) int64 {
	t.Helper()
	var id int64
	require.NoError(t, w.pool.QueryRow(t.Context(), `INSERT INTO stagesync.batch_requests
		(id, target, url, items, status_code, duration_ms, outcome, created_at)
		VALUES (nextval('stagesync.batch_requests_id_seq'), $1, 'http://127.0.0.1:1/$batch', 2, 200, 3, 'answered', $2) RETURNING id`,
		target, w.now.Add(-ago)).Scan(&id))
	return id
}

func (w retentionWorld) ids(t *testing.T, table string) map[int64]bool {
	t.Helper()
	rows, err := w.pool.Query(t.Context(), "SELECT id FROM stagesync."+table)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	set := map[int64]bool{}
	for _, id := range ids {
		set[id] = true
	}
	return set
}

func TestRetentionDeletesOnlyRowsOutsideTheirWindow(t *testing.T) {
	t.Parallel()
	w := newRetentionWorld(t, "")
	const day = 24 * time.Hour
	// Every row sits a minute inside or a minute outside its window.
	type row struct {
		table, target string
		id            int64
		wantKept      bool
	}
	var rows []row
	add := func(table, target string, id int64, kept bool) { rows = append(rows, row{table, target, id, kept}) }
	windows := map[string][2]time.Duration{ // finished, audit; 0 is off
		"territory": {30 * day, 90 * day}, // the defaults
		"billing":   {7 * day, 0},
		"ledger":    {0, 2 * time.Hour},
		"legacy":    {30 * day, 90 * day}, // registered, not configured: the global periods
	}
	for target, win := range windows {
		for _, status := range []string{"applied", "merged", "noop", "dead", "rejected"} {
			if win[0] == 0 {
				add("changes", target, w.change(t, target, status, 400*day), true)
				continue
			}
			add("changes", target, w.change(t, target, status, win[0]+time.Minute), false)
			add("changes", target, w.change(t, target, status, win[0]-time.Minute), true)
		}
		// Open changes are never deleted, however old.
		for _, status := range []string{"pending", "processing"} {
			add("changes", target, w.change(t, target, status, 0), true)
		}
		if win[1] == 0 {
			add("attempts", target, w.attempt(t, target, 400*day), true)
			add("merges", target, w.merge(t, target, 400*day), true)
			add("batch_requests", target, w.batchRequest(t, target, 400*day), true)
			continue
		}
		add("attempts", target, w.attempt(t, target, win[1]+time.Minute), false)
		add("attempts", target, w.attempt(t, target, win[1]-time.Minute), true)
		add("merges", target, w.merge(t, target, win[1]+time.Minute), false)
		add("merges", target, w.merge(t, target, win[1]-time.Minute), true)
		add("batch_requests", target, w.batchRequest(t, target, win[1]+time.Minute), false)
		add("batch_requests", target, w.batchRequest(t, target, win[1]-time.Minute), true)
	}
	_, err := w.pool.Exec(t.Context(), `INSERT INTO stagesync.resources (target, resource_id, etag, updated_at)
		VALUES ('territory', 'r1', '"v1"', '2001-01-01')`)
	require.NoError(t, err)

	rep, err := w.p.cleanup(t.Context(), w.now, w.now.Add(time.Hour))
	require.NoError(t, err)
	require.False(t, rep.More)

	kept := map[string]map[int64]bool{}
	for _, table := range []string{"changes", "attempts", "merges", "batch_requests"} {
		kept[table] = w.ids(t, table)
	}
	wantDeleted := map[string]*retentionCounts{}
	for _, r := range rows {
		require.Equal(t, r.wantKept, kept[r.table][r.id], "%s %d of %s: kept = %v; want %v",
			r.table, r.id, r.target, kept[r.table][r.id], r.wantKept)
		c := wantDeleted[r.target]
		if c == nil {
			c = &retentionCounts{}
			wantDeleted[r.target] = c
		}
		if !r.wantKept {
			*map[string]*int64{"changes": &c.Changes, "attempts": &c.Attempts, "merges": &c.Merges, "batch_requests": &c.BatchRequests}[r.table]++
		}
	}
	require.Equal(t, 1, countOf(t, w.pool, "SELECT count(*) FROM stagesync.resources"), "resources are state, never deleted")

	// The run is recorded: who, what, how many, and the cutoffs.
	var actor, sessionUser string
	var affected int
	var params []byte
	require.NoError(t, w.pool.QueryRow(t.Context(), `SELECT actor, session_user, affected, params
		FROM stagesync.admin_actions WHERE action = 'retention'`).Scan(&actor, &sessionUser, &affected, &params))
	require.Equal(t, sessionUser, actor)
	var got retentionReport
	require.NoError(t, json.Unmarshal(params, &got))
	var total int64
	for target, want := range wantDeleted {
		g := got.Targets[target]
		require.NotNil(t, g, "report of %s", target)
		require.Equal(t, [4]int64{want.Changes, want.Attempts, want.Merges, want.BatchRequests}, [4]int64{g.Changes, g.Attempts, g.Merges, g.BatchRequests},
			"deleted changes, attempts, merges, batch requests of %s", target)
		total += want.Changes + want.Attempts + want.Merges + want.BatchRequests
		win := windows[target]
		requireCutoff(t, g.FinishedBefore, win[0], w.now, target+" finished_before")
		requireCutoff(t, g.AuditBefore, win[1], w.now, target+" audit_before")
	}
	require.Equal(t, int(total), affected)
	require.Equal(t, 24, affected, "5+1+1+1 per target with both periods, 5 for billing's changes, 3 for ledger's audit")
}

func requireCutoff(t *testing.T, got *time.Time, keep time.Duration, now time.Time, what string) {
	t.Helper()
	if keep == 0 {
		require.Nil(t, got, "%s: got a cutoff; want none (off)", what)
		return
	}
	require.NotNil(t, got, what)
	require.True(t, now.Add(-keep).Equal(*got), "%s: got %v; want %v", what, *got, now.Add(-keep))
}

func countOf(t *testing.T, pool *pgxpool.Pool, sql string) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(t.Context(), sql).Scan(&n))
	return n
}

// A run deletes a batch per statement and stops at its deadline after a
// full batch; the next run goes on where it stopped.
func TestRetentionDeletesInBatchesAndResumes(t *testing.T) {
	t.Parallel()
	w := newRetentionWorld(t, "retention: {batch_size: 3, pause: 1ms}")
	for range 10 {
		w.change(t, "territory", "applied", 31*24*time.Hour)
	}
	keep := w.change(t, "territory", "applied", 29*24*time.Hour)

	rep, err := w.p.cleanup(t.Context(), w.now, w.now) // the deadline has passed
	require.NoError(t, err)
	require.True(t, rep.More, "a run stopped after a full batch must say rows may be left")
	require.Equal(t, int64(3), rep.Targets["territory"].Changes, "got %d deleted; want one batch of 3", rep.Targets["territory"].Changes)
	require.Equal(t, 8, countOf(t, w.pool, "SELECT count(*) FROM stagesync.changes"))

	rep, err = w.p.cleanup(t.Context(), w.now, w.now.Add(time.Hour))
	require.NoError(t, err)
	require.False(t, rep.More)
	require.Equal(t, int64(7), rep.Targets["territory"].Changes)
	require.Equal(t, map[int64]bool{keep: true}, w.ids(t, "changes"))
	require.Equal(t, 2, countOf(t, w.pool, "SELECT count(*) FROM stagesync.admin_actions WHERE action = 'retention'"))
	require.Equal(t, 1, countOf(t, w.pool, `SELECT count(*) FROM stagesync.admin_actions
		WHERE action = 'retention' AND params @> '{"more": true}' AND affected = 3`))

	// A run with nothing to delete leaves no row.
	rep, err = w.p.cleanup(t.Context(), w.now, w.now.Add(time.Hour))
	require.NoError(t, err)
	require.Zero(t, rep.total())
	require.Equal(t, 2, countOf(t, w.pool, "SELECT count(*) FROM stagesync.admin_actions WHERE action = 'retention'"))
}

// Retention passes rows another transaction holds (a requeue moving a dead
// change) instead of waiting for them, and never deletes a change requeued
// meanwhile.
func TestRetentionSkipsLockedRowsWithoutWaiting(t *testing.T) {
	t.Parallel()
	w := newRetentionWorld(t, "")
	ctx := t.Context()
	old := 40 * 24 * time.Hour
	held := w.change(t, "territory", "dead", old)
	free := w.change(t, "territory", "dead", old)

	tx, err := w.pool.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(ctx) })
	var moved int
	require.NoError(t, tx.QueryRow(ctx, "SELECT stagesync.requeue(ids => ARRAY[$1::bigint])", held).Scan(&moved))
	require.Equal(t, 1, moved)

	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rep, err := w.p.cleanup(cctx, w.now, w.now.Add(time.Hour))
	require.NoError(t, err, "the cleanup must not wait for the requeue's lock")
	require.Equal(t, int64(1), rep.Targets["territory"].Changes)
	require.NoError(t, tx.Commit(ctx))
	require.Equal(t, map[int64]bool{held: true}, w.ids(t, "changes"), "the requeued change stays, %d goes", free)
	var status string
	require.NoError(t, w.pool.QueryRow(ctx, "SELECT status FROM stagesync.changes WHERE id = $1", held).Scan(&status))
	require.Equal(t, "pending", status)
}

// The periodic job: a running processor cleans up at start (and then every
// interval) through River, and with every period off it schedules none.
func TestRetentionRunsAsAPeriodicJob(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		retention   string
		wantCleaned bool
	}{
		{"with the defaults", "", true},
		{"with every period off", "retention: {finished: \"off\", audit: \"off\"}", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pool := dbtest.NewPool(t)
			cfg, err := ParseConfig([]byte(tc.retention+`
dispatch: {poll_interval: 1h}
targets:
  territory: {base_url: "http://127.0.0.1:1", item_path: "/a/{id}"}
`), func(string) string { return "" })
			require.NoError(t, err)
			p, err := New(cfg, Options{Pool: pool, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
			require.NoError(t, err)
			require.NoError(t, p.RegisterTargets(t.Context()))
			w := retentionWorld{pool: pool, p: p, now: time.Now()}
			w.change(t, "territory", "applied", 31*24*time.Hour)
			w.attempt(t, "territory", 91*24*time.Hour)

			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var runErr error
			wg.Go(func() { runErr = p.Run(ctx) })
			t.Cleanup(func() {
				cancel()
				wg.Wait()
				require.NoError(t, runErr, "processor.Run")
			})

			if !tc.wantCleaned {
				// The start-up dispatch job runs; no retention job is ever
				// inserted.
				require.Eventually(t, func() bool {
					return countOf(t, pool, `SELECT count(*) FROM river_job WHERE kind = 'stagesync_dispatch' AND state = 'completed'`) > 0
				}, 30*time.Second, 50*time.Millisecond)
				require.Equal(t, 0, countOf(t, pool, `SELECT count(*) FROM river_job WHERE kind = 'stagesync_retention'`))
				require.Equal(t, 1, countOf(t, pool, `SELECT count(*) FROM stagesync.changes`))
				return
			}
			require.Eventually(t, func() bool {
				return countOf(t, pool, `SELECT count(*) FROM river_job WHERE kind = 'stagesync_retention' AND state = 'completed'`) == 1
			}, 30*time.Second, 50*time.Millisecond, "the retention job must run at start")
			require.Equal(t, 0, countOf(t, pool, `SELECT count(*) FROM stagesync.changes`))
			require.Equal(t, 0, countOf(t, pool, `SELECT count(*) FROM stagesync.attempts`))
			require.Equal(t, 1, countOf(t, pool, `SELECT count(*) FROM stagesync.admin_actions WHERE action = 'retention' AND affected = 2`))
		})
	}
}

package db_test

import (
	"context"
	"encoding/json"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
)

// requeueBase is the hour the requeue fixture's changes finish after.
var requeueBase = time.Date(2025, 1, 6, 0, 0, 0, 0, time.UTC)

// requeueFixture writes one change in every status; terminal ones finish at
// requeueBase plus a few hours. It returns their ids by name.
func requeueFixture(t *testing.T, q db.DBTX) map[string]int64 {
	t.Helper()
	at := func(hours int) time.Time { return requeueBase.Add(time.Duration(hours) * time.Hour) }
	rows := map[string]change{
		"pending":    {Status: "pending"},
		"processing": {Status: "processing", Attempts: 1},
		"applied":    {Status: "applied", Attempts: 1, AppliedETag: `"a1"`, FinishedAt: at(1)},
		"merged":     {Status: "merged", Attempts: 2, AppliedETag: `"m1"`, FinishedAt: at(1)},
		"noop":       {Status: "noop", Attempts: 1, FinishedAt: at(1)},
		"deadA":      {Status: "dead", Attempts: 5, LastError: "412 five times", AppliedETag: `"d1"`, FinishedAt: at(1)},
		"deadB":      {Status: "dead", Attempts: 5, LastError: "timeout", FinishedAt: at(2)},
		"deadC":      {Target: "billing", Status: "dead", Attempts: 3, LastError: "manual field conflict", FinishedAt: at(3)},
		"rejectedA":  {Status: "rejected", Attempts: 1, LastError: "422 invalid zip", FinishedAt: at(2)},
		"rejectedB":  {Target: "billing", Status: "rejected", Attempts: 1, LastError: "404", FinishedAt: at(4)},
	}
	ids := map[string]int64{}
	for _, name := range slices.Sorted(maps.Keys(rows)) {
		ids[name] = insertChange(t, q, rows[name])
	}
	return ids
}

// changeState is what requeue may change in a row.
type changeState struct {
	Status      string
	Attempts    int
	LastError   *string
	FinishedAt  *time.Time
	AppliedETag *string
}

func changeStates(t *testing.T, q db.DBTX) map[int64]changeState {
	t.Helper()
	rows, err := q.Query(t.Context(), `SELECT id, status, attempts, last_error, finished_at, applied_etag
		FROM stagesync.changes`)
	require.NoError(t, err)
	defer rows.Close()
	states := map[int64]changeState{}
	for rows.Next() {
		var id int64
		var s changeState
		require.NoError(t, rows.Scan(&id, &s.Status, &s.Attempts, &s.LastError, &s.FinishedAt, &s.AppliedETag))
		if s.FinishedAt != nil {
			utc := s.FinishedAt.UTC()
			s.FinishedAt = &utc
		}
		states[id] = s
	}
	require.NoError(t, rows.Err())
	return states
}

const requeueCall = `SELECT stagesync.requeue(ids => $1, target => $2, since => $3, until => $4,
	include_rejected => $5, everything => $6)`

func TestRequeueFilters(t *testing.T) {
	t.Parallel()
	hour := func(h int) *time.Time {
		ts := requeueBase.Add(time.Duration(h) * time.Hour)
		return &ts
	}
	tests := []struct {
		name            string
		ids             []string // fixture names; nil means no ids filter
		emptyIDs        bool     // pass an empty array rather than NULL
		target          *string
		since, until    *time.Time
		includeRejected bool
		everything      bool
		want            []string
	}{
		{name: "everything moves every dead change", everything: true, want: []string{"deadA", "deadB", "deadC"}},
		{
			name: "everything with include_rejected also moves rejected changes", everything: true, includeRejected: true,
			want: []string{"deadA", "deadB", "deadC", "rejectedA", "rejectedB"},
		},
		{
			name: "ids move only the dead among them",
			ids:  []string{"deadA", "rejectedA", "applied", "pending", "processing"},
			want: []string{"deadA"},
		},
		{
			name: "ids with include_rejected move dead and rejected among them",
			ids:  []string{"deadA", "rejectedA", "applied", "noop"}, includeRejected: true,
			want: []string{"deadA", "rejectedA"},
		},
		{name: "target moves only that target's dead changes", target: new("billing"), want: []string{"deadC"}},
		{
			name: "target with include_rejected", target: new("billing"), includeRejected: true,
			want: []string{"deadC", "rejectedB"},
		},
		{name: "since is inclusive", since: hour(2), want: []string{"deadB", "deadC"}},
		{name: "until is exclusive", until: hour(2), want: []string{"deadA"}},
		{
			name: "since and until bound a window", since: hour(2), until: hour(3), includeRejected: true,
			want: []string{"deadB", "rejectedA"},
		},
		{
			name: "all filters together",
			ids:  []string{"deadA", "deadB", "deadC", "rejectedA"}, target: new("territory"), since: hour(2),
			want: []string{"deadB"},
		},
		{name: "an empty ids array moves nothing", emptyIDs: true, includeRejected: true, want: []string{}},
		{name: "a target without dead changes moves nothing", target: new("ledger"), want: []string{}},
		{name: "a window without dead changes moves nothing", since: hour(10), want: []string{}},
		{name: "an empty window moves nothing", since: hour(2), until: hour(2), want: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			ctx := t.Context()
			fixture := requeueFixture(t, d.Pool)
			before := changeStates(t, d.Pool)

			var ids []int64
			if tt.emptyIDs {
				ids = []int64{}
			}
			for _, name := range tt.ids {
				ids = append(ids, fixture[name])
			}
			var moved int
			require.NoError(t, d.Pool.QueryRow(ctx, requeueCall,
				ids, tt.target, tt.since, tt.until, tt.includeRejected, tt.everything).Scan(&moved))
			require.Equal(t, len(tt.want), moved)

			after := changeStates(t, d.Pool)
			for name, id := range fixture {
				if slices.Contains(tt.want, name) {
					require.Equal(t, changeState{Status: "pending"}, after[id],
						"%s must be pending with attempts, last_error, finished_at and applied_etag reset", name)
				} else {
					require.Equal(t, before[id], after[id], "%s must not change", name)
				}
			}

			var actor, sessionUser, action string
			var affected int
			var params []byte
			require.Equal(t, 1, countRows(t, d.Pool, "stagesync.admin_actions"))
			require.NoError(t, d.Pool.QueryRow(ctx, `SELECT actor, session_user, action, affected, params
				FROM stagesync.admin_actions`).Scan(&actor, &sessionUser, &action, &affected, &params))
			require.Equal(t, sessionUser, actor)
			require.Equal(t, "requeue", action)
			require.Equal(t, moved, affected)

			// Filters not given are left out of params; include_rejected is
			// always there, everything when it is true.
			var keys map[string]json.RawMessage
			require.NoError(t, json.Unmarshal(params, &keys))
			wantKeys := []string{"include_rejected"}
			if tt.everything {
				wantKeys = append(wantKeys, "everything")
			}
			if ids != nil {
				wantKeys = append(wantKeys, "ids")
			}
			if tt.target != nil {
				wantKeys = append(wantKeys, "target")
			}
			if tt.since != nil {
				wantKeys = append(wantKeys, "since")
			}
			if tt.until != nil {
				wantKeys = append(wantKeys, "until")
			}
			require.ElementsMatch(t, wantKeys, slices.Collect(maps.Keys(keys)), "params %s", params)

			var got struct {
				IDs             []int64    `json:"ids"`
				Target          *string    `json:"target"`
				Since           *time.Time `json:"since"`
				Until           *time.Time `json:"until"`
				IncludeRejected bool       `json:"include_rejected"`
			}
			require.NoError(t, json.Unmarshal(params, &got))
			require.Equal(t, ids, got.IDs)
			require.Equal(t, tt.target, got.Target)
			require.Equal(t, tt.includeRejected, got.IncludeRejected)
			for _, p := range []struct{ got, want *time.Time }{{got.Since, tt.since}, {got.Until, tt.until}} {
				if p.want != nil {
					require.True(t, p.want.Equal(*p.got), "params time %v; want %v", *p.got, *p.want)
				}
			}
		})
	}
}

func TestRequeueRefusesBadArguments(t *testing.T) {
	t.Parallel()
	since := requeueBase.Add(3 * time.Hour)
	until := requeueBase.Add(2 * time.Hour)
	tests := []struct {
		name         string
		ids          []int64
		target       *string
		since, until *time.Time
		everything   *bool
		wantMessage  string
	}{
		{
			name:        "no filter",
			wantMessage: "requeue: no filter given; pass ids, target, since or until, or everything => true to requeue every dead change",
		},
		{
			name: "everything => false and no filter", everything: new(false),
			wantMessage: "requeue: no filter given; pass ids, target, since or until, or everything => true to requeue every dead change",
		},
		{
			name: "everything with a filter", target: new("territory"), everything: new(true),
			wantMessage: "requeue: everything => true requeues every dead change; don't combine it with ids, target, since or until",
		},
		{
			name: "everything with ids", ids: []int64{1}, everything: new(true),
			wantMessage: "requeue: everything => true requeues every dead change; don't combine it with ids, target, since or until",
		},
		{
			name: "an unknown target", target: new("nowhere"),
			wantMessage: "requeue: unknown target 'nowhere'",
		},
		{
			name: "since after until", since: &since, until: &until,
			wantMessage: "requeue: since (2025-01-06 08:45:00+05:45) is after until (2025-01-06 07:45:00+05:45)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			requeueFixture(t, d.Pool)
			before := changeStates(t, d.Pool)

			_, err := d.Pool.Exec(t.Context(), requeueCall, tt.ids, tt.target, tt.since, tt.until, true, tt.everything)
			pgErr := requirePgError(t, err, "22023")
			require.Equal(t, tt.wantMessage, pgErr.Message)
			require.Equal(t, before, changeStates(t, d.Pool), "a refused requeue must move nothing")
			require.Equal(t, 0, countRows(t, d.Pool, "stagesync.admin_actions"))
		})
	}
}

func TestRequeueConcurrentCallsMoveEachRowOnce(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name                  string
		firstTarget           *string
		wantFirst, wantSecond int
	}{
		{"both requeue everything", nil, 3, 0},
		{"the first requeues one target and the second everything", new("territory"), 2, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			ctx := t.Context()
			fixture := requeueFixture(t, d.Pool)
			first, second := d.conn(t, ""), d.conn(t, "")

			// The first call holds its row locks in an open transaction.
			tx, err := first.Begin(ctx)
			require.NoError(t, err)
			t.Cleanup(func() { _ = tx.Rollback(ctx) })
			var movedFirst int
			require.NoError(t, tx.QueryRow(ctx, requeueCall, nil, tt.firstTarget, nil, nil, false, tt.firstTarget == nil).Scan(&movedFirst))
			require.Equal(t, tt.wantFirst, movedFirst)

			type result struct {
				moved int
				err   error
			}
			done := make(chan result, 1)
			go func() {
				var r result
				r.err = second.QueryRow(ctx, requeueCall, nil, nil, nil, nil, false, true).Scan(&r.moved)
				done <- r
			}()

			// Barrier: commit only once the second call waits on a row lock.
			secondPID := second.PgConn().PID()
			require.Eventually(t, func() bool {
				var waitType *string
				err := d.Pool.QueryRow(ctx, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
					secondPID).Scan(&waitType)
				return err == nil && waitType != nil && *waitType == "Lock"
			}, 10*time.Second, 5*time.Millisecond, "the second requeue must block on the first one's row locks")
			select {
			case r := <-done:
				t.Fatalf("the second requeue returned %d, %v while the first held its locks", r.moved, r.err)
			default:
			}
			require.NoError(t, tx.Commit(ctx))

			r := <-done
			require.NoError(t, r.err)
			require.Equal(t, tt.wantSecond, r.moved)
			require.Equal(t, 3, movedFirst+r.moved, "the dead rows must be moved once in all")

			states := changeStates(t, d.Pool)
			for _, name := range []string{"deadA", "deadB", "deadC"} {
				require.Equal(t, changeState{Status: "pending"}, states[fixture[name]], name)
			}
			rows, err := d.Pool.Query(ctx, "SELECT affected FROM stagesync.admin_actions ORDER BY id")
			require.NoError(t, err)
			affected, err := pgx.CollectRows(rows, pgx.RowTo[int])
			require.NoError(t, err)
			require.Equal(t, []int{tt.wantFirst, tt.wantSecond}, affected)
		})
	}
}

// A requeue that leaves matching changes because they are rejected says so
// in a NOTICE whose hint names include_rejected (issue 10 §3); one that
// leaves none, or that includes them, says nothing.
func TestRequeueNoticesRejectedChangesItLeft(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name            string
		ids             []string
		target          *string
		includeRejected bool
		everything      bool
		wantMoved       int
		wantNotice      string
	}{
		{name: "only rejected ids", ids: []string{"rejectedA"}, wantMoved: 0,
			wantNotice: "requeue: 1 matching change is rejected and was left as it is"},
		{name: "dead and rejected ids", ids: []string{"deadA", "rejectedA", "applied"}, wantMoved: 1,
			wantNotice: "requeue: 1 matching change is rejected and was left as it is"},
		{name: "a target", target: new("billing"), wantMoved: 1,
			wantNotice: "requeue: 1 matching change is rejected and was left as it is"},
		{name: "everything", everything: true, wantMoved: 3,
			wantNotice: "requeue: 2 matching changes are rejected and were left as they are"},
		{name: "with include_rejected", ids: []string{"rejectedA"}, includeRejected: true, wantMoved: 1},
		{name: "no rejected among them", ids: []string{"deadA", "applied"}, wantMoved: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			ctx := t.Context()
			fixture := requeueFixture(t, d.Pool)
			var ids []int64
			for _, name := range tt.ids {
				ids = append(ids, fixture[name])
			}

			cfg, err := pgx.ParseConfig(d.URL)
			require.NoError(t, err)
			var notices []*pgconn.Notice
			cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n) }
			c, err := pgx.ConnectConfig(ctx, cfg)
			require.NoError(t, err)
			t.Cleanup(func() { c.Close(context.Background()) })

			var moved int
			require.NoError(t, c.QueryRow(ctx, requeueCall, ids, tt.target, nil, nil, tt.includeRejected, tt.everything).Scan(&moved))
			require.Equal(t, tt.wantMoved, moved)
			if tt.wantNotice == "" {
				require.Empty(t, notices)
				return
			}
			require.Len(t, notices, 1)
			require.Equal(t, "NOTICE", notices[0].Severity)
			require.Equal(t, tt.wantNotice, notices[0].Message)
			require.Equal(t, "Add include_rejected => true to requeue rejected changes too (stagesync requeue --include-rejected).",
				notices[0].Hint)
		})
	}
}

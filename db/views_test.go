package db_test

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

func TestConflictRates(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	hour1 := time.Date(2025, 2, 3, 10, 0, 0, 0, time.UTC)
	hour2 := hour1.Add(time.Hour)
	minute := func(h time.Time, m int) time.Time { return h.Add(time.Duration(m) * time.Minute) }

	// territory, hour 1: 8 requests, 2 conflicts, 10…80 ms.
	for i, outcome := range []string{"applied", "conflict", "applied", "fetched", "conflict", "applied", "retryable", "applied"} {
		insertAttempt(t, d.Pool, attempt{Outcome: outcome, DurationMs: float64(10 * (i + 1)), CreatedAt: minute(hour1, 5*i)})
	}
	// territory, hour 2: 3 requests, 1 conflict, unsorted durations; the
	// first at the hour's first instant.
	insertAttempt(t, d.Pool, attempt{Outcome: "conflict", DurationMs: 300, CreatedAt: hour2})
	insertAttempt(t, d.Pool, attempt{Outcome: "applied", DurationMs: 100, CreatedAt: minute(hour2, 30)})
	insertAttempt(t, d.Pool, attempt{Outcome: "transport_error", DurationMs: 200, CreatedAt: minute(hour2, 59)})
	// billing, hour 2: one failed request.
	insertAttempt(t, d.Pool, attempt{Target: "billing", Outcome: "fatal", DurationMs: 50, CreatedAt: minute(hour2, 1)})

	// Finished changes. The last of hour 1 ends a microsecond before hour 2.
	finished := []struct {
		target, status string
		at             time.Time
	}{
		{"territory", "applied", minute(hour1, 1)},
		{"territory", "applied", minute(hour1, 2)},
		{"territory", "applied", hour2.Add(-time.Microsecond)},
		{"territory", "merged", minute(hour1, 3)},
		{"territory", "noop", minute(hour1, 4)},
		{"territory", "dead", minute(hour1, 5)},
		{"territory", "rejected", minute(hour1, 6)},
		{"territory", "applied", hour2},
		{"territory", "merged", minute(hour2, 10)},
		{"territory", "merged", minute(hour2, 20)},
		{"billing", "dead", minute(hour1, 7)},
		{"billing", "dead", minute(hour1, 8)},
	}
	for _, f := range finished {
		insertChange(t, d.Pool, change{Target: f.target, Status: f.status, FinishedAt: f.at})
	}
	// Open changes count in no hour.
	insertChange(t, d.Pool, change{Status: "pending", CreatedAt: minute(hour1, 1)})
	insertChange(t, d.Pool, change{Status: "processing", CreatedAt: minute(hour2, 1)})

	type rate struct {
		Target                                string
		Hour                                  time.Time
		Requests, Conflicts                   int64
		ConflictRate                          float64
		Applied, Merged, Noop, Dead, Rejected int64
		P50, P95                              *float64
	}
	ms := func(v float64) *float64 { return &v }
	want := []rate{
		{Target: "billing", Hour: hour1, Dead: 2},
		{Target: "billing", Hour: hour2, Requests: 1, P50: ms(50), P95: ms(50)},
		{Target: "territory", Hour: hour1, Requests: 8, Conflicts: 2, ConflictRate: 0.25,
			Applied: 3, Merged: 1, Noop: 1, Dead: 1, Rejected: 1, P50: ms(45), P95: ms(76.5)},
		{Target: "territory", Hour: hour2, Requests: 3, Conflicts: 1, ConflictRate: 0.3333,
			Applied: 1, Merged: 2, P50: ms(200), P95: ms(290)},
	}

	rows, err := d.Pool.Query(ctx, `SELECT target, hour, requests, conflicts, conflict_rate,
		applied, merged, noop, dead, rejected, p50_ms, p95_ms
		FROM stagesync.conflict_rates ORDER BY target, hour`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (rate, error) {
		var r rate
		err := row.Scan(&r.Target, &r.Hour, &r.Requests, &r.Conflicts, &r.ConflictRate,
			&r.Applied, &r.Merged, &r.Noop, &r.Dead, &r.Rejected, &r.P50, &r.P95)
		r.Hour = r.Hour.UTC()
		return r, err
	})
	require.NoError(t, err)
	require.Len(t, got, len(want))
	for i := range want {
		// percentile_cont interpolates in float8: compare its figures
		// within a rounding error and the rest exactly.
		for _, p := range []struct {
			name      string
			got, want *float64
		}{{"p50_ms", got[i].P50, want[i].P50}, {"p95_ms", got[i].P95, want[i].P95}} {
			if p.want == nil {
				require.Nil(t, p.got, "%s of %s %v", p.name, want[i].Target, want[i].Hour)
			} else {
				require.NotNil(t, p.got, "%s of %s %v", p.name, want[i].Target, want[i].Hour)
				require.InDelta(t, *p.want, *p.got, 1e-9, "%s of %s %v", p.name, want[i].Target, want[i].Hour)
			}
		}
		got[i].P50, got[i].P95, want[i].P50, want[i].P95 = nil, nil, nil, nil
		require.Equal(t, want[i], got[i])
	}
}

func TestBacklog(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	now := time.Now().Truncate(time.Microsecond)
	oldest := now.Add(-2 * time.Hour)

	for _, c := range []change{
		{Status: "pending", CreatedAt: now.Add(-time.Hour)},
		{Status: "pending", CreatedAt: oldest},
		{Status: "pending", CreatedAt: now.Add(-5 * time.Minute)},
		{Status: "processing", CreatedAt: now.Add(-3 * time.Hour)},
		{Status: "processing"},
		// Finished changes are no backlog, however old.
		{Status: "applied", CreatedAt: now.Add(-48 * time.Hour), FinishedAt: now},
		{Status: "dead", CreatedAt: now.Add(-48 * time.Hour), FinishedAt: now},
		{Target: "billing", Status: "processing"},
		{Target: "billing", Status: "rejected", FinishedAt: now},
	} {
		insertChange(t, d.Pool, c)
	}

	type backlog struct {
		Target              string
		Pending, Processing int64
		OldestPendingAt     *time.Time
		OldestPendingAge    *time.Duration
	}
	rows, err := d.Pool.Query(ctx, `SELECT target, pending, processing, oldest_pending_at, oldest_pending_age
		FROM stagesync.backlog ORDER BY target`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[backlog])
	require.NoError(t, err)
	require.Len(t, got, 3, "every target must have a row, even without changes")

	require.Equal(t, backlog{Target: "billing", Processing: 1}, got[0])
	require.Equal(t, backlog{Target: "ledger"}, got[1])

	territory := got[2]
	require.Equal(t, "territory", territory.Target)
	require.Equal(t, int64(3), territory.Pending)
	require.Equal(t, int64(2), territory.Processing)
	require.NotNil(t, territory.OldestPendingAt)
	require.True(t, oldest.Equal(*territory.OldestPendingAt), "oldest_pending_at = %v; want %v", *territory.OldestPendingAt, oldest)
	require.NotNil(t, territory.OldestPendingAge)
	require.GreaterOrEqual(t, *territory.OldestPendingAge, 2*time.Hour)
	require.Less(t, *territory.OldestPendingAge, 2*time.Hour+time.Minute)
}

func TestDeadLetters(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	base := time.Date(2025, 2, 3, 10, 0, 0, 0, time.UTC)

	dead1 := insertChange(t, d.Pool, change{Status: "dead", Attempts: 5, LastError: "412 five times", FinishedAt: base.Add(time.Hour)})
	rejected := insertChange(t, d.Pool, change{Status: "rejected", Attempts: 1, LastError: "422 invalid zip", FinishedAt: base.Add(3 * time.Hour)})
	// Finished at the same instant as rejected: the higher id comes first.
	dead2 := insertChange(t, d.Pool, change{Status: "dead", Attempts: 8, LastError: "manual field conflict: owner", FinishedAt: base.Add(3 * time.Hour)})
	dead3 := insertChange(t, d.Pool, change{Target: "billing", ResourceID: "b7", Status: "dead", Attempts: 3, LastError: "timeout", FinishedAt: base.Add(2 * time.Hour)})
	for _, c := range []change{
		{Status: "applied", Attempts: 1, FinishedAt: base.Add(4 * time.Hour)},
		{Status: "merged", Attempts: 2, FinishedAt: base.Add(4 * time.Hour)},
		{Status: "noop", Attempts: 1, FinishedAt: base.Add(4 * time.Hour)},
		{Status: "pending"},
		{Status: "processing", Attempts: 4, LastError: "503"},
	} {
		insertChange(t, d.Pool, c)
	}

	type letter struct {
		ID                 int64
		Target, ResourceID string
		Status             string
		Attempts           int
		LastError          string
		FinishedAt         time.Time
	}
	rows, err := d.Pool.Query(ctx, `SELECT id, target, resource_id, status, attempts, last_error, finished_at
		FROM stagesync.dead_letters`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (letter, error) {
		l, err := pgx.RowToStructByPos[letter](row)
		l.FinishedAt = l.FinishedAt.UTC()
		return l, err
	})
	require.NoError(t, err)
	require.Equal(t, []letter{
		{dead2, "territory", "r1", "dead", 8, "manual field conflict: owner", base.Add(3 * time.Hour)},
		{rejected, "territory", "r1", "rejected", 1, "422 invalid zip", base.Add(3 * time.Hour)},
		{dead3, "billing", "b7", "dead", 3, "timeout", base.Add(2 * time.Hour)},
		{dead1, "territory", "r1", "dead", 5, "412 five times", base.Add(time.Hour)},
	}, got)
}

func TestChangeHistory(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	t0 := time.Date(2025, 2, 3, 10, 0, 0, 0, time.UTC)
	at := func(m int) time.Time { return t0.Add(time.Duration(m) * time.Minute) }

	// x and y are coalesced into one request after a conflict; z comes later
	// on the same resource; w is on another resource.
	x := insertChange(t, d.Pool, change{ResourceID: "r1", Fields: `{"name": "b"}`, Status: "merged",
		Attempts: 2, AppliedETag: `"v3"`, CreatedAt: t0, FinishedAt: at(8)})
	y := insertChange(t, d.Pool, change{ResourceID: "r1", Fields: `{"zip": "2"}`, Status: "merged",
		Attempts: 1, CreatedAt: at(1), FinishedAt: at(8)})
	z := insertChange(t, d.Pool, change{ResourceID: "r1", Fields: `{"zip": "3"}`, CreatedAt: at(2)})
	w := insertChange(t, d.Pool, change{ResourceID: "r2", CreatedAt: at(2)})

	insertAttempt(t, d.Pool, attempt{ResourceID: "r1", ChangeIDs: []int64{x}, Method: "PATCH",
		IfMatch: `"v1"`, StatusCode: 412, Outcome: "conflict", DurationMs: 12, CreatedAt: at(5)})
	insertAttempt(t, d.Pool, attempt{ResourceID: "r1", ChangeIDs: []int64{x, y}, Method: "GET",
		StatusCode: 200, ResponseETag: `"v2"`, Outcome: "fetched", DurationMs: 8, CreatedAt: at(6)})
	insertMerge(t, d.Pool, "r1", []int64{x, y}, "merged", at(7))
	insertAttempt(t, d.Pool, attempt{ResourceID: "r1", ChangeIDs: []int64{x, y}, Method: "PATCH",
		IfMatch: `"v2"`, StatusCode: 200, ResponseETag: `"v3"`, Outcome: "applied", DurationMs: 20, CreatedAt: at(8)})
	insertAttempt(t, d.Pool, attempt{ResourceID: "r1", ChangeIDs: []int64{z}, Method: "PATCH",
		StatusCode: 503, Outcome: "retryable", DurationMs: 30, CreatedAt: at(9)})
	insertMerge(t, d.Pool, "r1", []int64{z}, "needs_review", at(10))
	insertAttempt(t, d.Pool, attempt{ResourceID: "r2", ChangeIDs: []int64{w}, Outcome: "applied", DurationMs: 5, CreatedAt: at(4)})

	type event struct {
		At         time.Time
		Event      string
		Method     *string
		StatusCode *int32
		Outcome    *string
	}
	history := func(t *testing.T, changeID int64) []event {
		t.Helper()
		rows, err := d.Pool.Query(t.Context(), `SELECT at, event, method, status_code, outcome
			FROM stagesync.change_history($1)`, changeID)
		require.NoError(t, err)
		events, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (event, error) {
			var e event
			err := row.Scan(&e.At, &e.Event, &e.Method, &e.StatusCode, &e.Outcome)
			e.At = e.At.UTC()
			return e, err
		})
		require.NoError(t, err)
		return events
	}
	s := func(v string) *string { return &v }
	code := func(v int32) *int32 { return &v }

	tests := []struct {
		name     string
		changeID int64
		want     []event
	}{
		{
			name: "a merged change: staged, its attempts and merge, finished", changeID: x,
			want: []event{
				{At: t0, Event: "staged"},
				{At: at(5), Event: "attempt", Method: s("PATCH"), StatusCode: code(412), Outcome: s("conflict")},
				{At: at(6), Event: "attempt", Method: s("GET"), StatusCode: code(200), Outcome: s("fetched")},
				{At: at(7), Event: "merge", Outcome: s("merged")},
				{At: at(8), Event: "attempt", Method: s("PATCH"), StatusCode: code(200), Outcome: s("applied")},
				{At: at(8), Event: "finished", Outcome: s("merged")},
			},
		},
		{
			name: "a change coalesced into a later request", changeID: y,
			want: []event{
				{At: at(1), Event: "staged"},
				{At: at(6), Event: "attempt", Method: s("GET"), StatusCode: code(200), Outcome: s("fetched")},
				{At: at(7), Event: "merge", Outcome: s("merged")},
				{At: at(8), Event: "attempt", Method: s("PATCH"), StatusCode: code(200), Outcome: s("applied")},
				{At: at(8), Event: "finished", Outcome: s("merged")},
			},
		},
		{
			name: "an open change has no finished event", changeID: z,
			want: []event{
				{At: at(2), Event: "staged"},
				{At: at(9), Event: "attempt", Method: s("PATCH"), StatusCode: code(503), Outcome: s("retryable")},
				{At: at(10), Event: "merge", Outcome: s("needs_review")},
			},
		},
		{name: "an unknown change has no history", changeID: w + 1000, want: []event{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.want, history(t, tt.changeID))
		})
	}

	t.Run("details describe each event", func(t *testing.T) {
		t.Parallel()
		rows, err := d.Pool.Query(t.Context(), "SELECT detail FROM stagesync.change_history($1)", x)
		require.NoError(t, err)
		details, err := pgx.CollectRows(rows, pgx.RowTo[map[string]any])
		require.NoError(t, err)
		require.Len(t, details, 6)
		require.Equal(t, map[string]any{"op": "update", "fields": map[string]any{"name": "b"},
			"source": "crm", "idempotency_key": nil}, details[0])
		require.Equal(t, map[string]any{"if_match": `"v1"`, "response_etag": nil, "duration_ms": float64(12),
			"error": nil, "change_ids": []any{float64(x)}}, details[1])
		require.Equal(t, map[string]any{"name": "took_ours", "zip": "kept_theirs"}, details[3]["decisions"])
		require.Equal(t, []any{float64(x), float64(y)}, details[3]["change_ids"])
		require.Equal(t, map[string]any{"applied_etag": `"v3"`, "last_error": nil, "attempts": float64(2), "outcome_detail": nil}, details[5])
	})
}

package main

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestRequeueCommandMovesRows(t *testing.T) {
	t.Parallel()
	url, pool := testDatabase(t)
	insertTarget(t, pool, "alpha", "beta")
	now := time.Now()
	a1 := insertFixture(t, pool, fixture{target: "alpha", resourceID: "a1", status: "dead", attempts: 10, lastError: "gave up", finishedAt: now.Add(-3 * time.Hour)})
	a2 := insertFixture(t, pool, fixture{target: "alpha", resourceID: "a2", status: "dead", attempts: 10, lastError: "gave up", finishedAt: now.Add(-3 * time.Hour)})
	a3 := insertFixture(t, pool, fixture{target: "alpha", resourceID: "a3", status: "rejected", attempts: 1, lastError: "422", finishedAt: now.Add(-3 * time.Hour)})
	b1 := insertFixture(t, pool, fixture{target: "beta", resourceID: "b1", status: "dead", attempts: 3, lastError: "needs_review", finishedAt: now.Add(-5 * time.Minute)})
	b2 := insertFixture(t, pool, fixture{target: "beta", resourceID: "b2", status: "applied", finishedAt: now.Add(-5 * time.Minute)})
	getenv := func(string) string { return "" }
	status := func(id int64) string {
		var s string
		require.NoError(t, pool.QueryRow(t.Context(), `SELECT status || '/' || attempts FROM stagesync.changes WHERE id = $1`, id).Scan(&s))
		return s
	}
	requeue := func(args ...string) string {
		t.Helper()
		var out bytes.Buffer
		require.NoError(t, run(t.Context(), append([]string{"requeue", "--database-url", url}, args...), getenv, &out))
		return out.String()
	}

	out := requeue("--since", "1h")
	// The bound is the command's own clock minus an hour.
	require.Regexp(t, `^requeue: moved 1 dead change back to pending \(finished since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)\n$`, out)
	require.Equal(t, "pending/0", status(b1))

	out = requeue("--id", fmt.Sprint(a3))
	require.Equal(t, fmt.Sprintf("requeue: moved 0 dead changes back to pending (ids %d)\n", a3)+
		"requeue: 1 matching change is rejected and was left as it is; add --include-rejected to requeue rejected changes too\n", out)

	out = requeue("--id", fmt.Sprint(a1), "--id", fmt.Sprintf("%d,%d", a2, a3))
	require.Equal(t, fmt.Sprintf("requeue: moved 2 dead changes back to pending (ids %d,%d,%d)\n", a1, a2, a3)+
		"requeue: 1 matching change is rejected and was left as it is; add --include-rejected to requeue rejected changes too\n", out)
	require.Equal(t, "pending/0", status(a1))
	require.Equal(t, "pending/0", status(a2))
	require.Equal(t, "rejected/1", status(a3), "rejected stays without --include-rejected")

	out = requeue("--target", "alpha", "--include-rejected")
	require.Equal(t, "requeue: moved 1 dead or rejected change back to pending (target alpha)\n", out)
	require.Equal(t, "pending/0", status(a3))
	require.Equal(t, "applied/0", status(b2))

	out = requeue("--all")
	require.Equal(t, "requeue: moved 0 dead changes back to pending (all)\n", out)

	// An id no change has is named, not passed over.
	out = requeue("--id", fmt.Sprintf("%d,999999,999998", b2))
	require.Equal(t, fmt.Sprintf("requeue: moved 0 dead changes back to pending (ids %d,999999,999998)\n", b2)+
		"requeue: no change has id 999998, 999999 (never staged, or removed by retention)\n", out)

	require.Equal(t, int64(6), countWhere(t, pool, `SELECT count(*) FROM stagesync.admin_actions WHERE action = 'requeue'`))
	require.Equal(t, int64(1), countWhere(t, pool, `SELECT count(*) FROM stagesync.admin_actions WHERE params @> '{"everything": true}'`),
		"--all must reach the function as everything => true")
	require.Equal(t, int64(4), countWhere(t, pool, `SELECT sum(affected) FROM stagesync.admin_actions`))
}

func TestRequeueCommandRefuses(t *testing.T) {
	t.Parallel()
	url, pool := testDatabase(t)
	insertTarget(t, pool, "alpha")
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no filter", nil, "requeue: give --id, --target, --since or --until, or --all to requeue every dead change"},
		{"all with a filter", []string{"--all", "--target", "alpha"}, "requeue: --all requeues everything; don't combine it with filters"},
		{"a bad id", []string{"--id", "7,x"}, `invalid value "7,x" for flag -id: "x" is not a change id (a positive integer)`},
		{"a bad time", []string{"--since", "yesterday"}, `requeue: --since: "yesterday" is not an RFC 3339 time (2025-01-31T08:00:00Z), a date (2025-01-31) or a duration ago (90m)`},
		{"an unknown target", []string{"--target", "nope"}, "requeue: ERROR: requeue: unknown target 'nope' (SQLSTATE 22023)"},
		{"since after until", []string{"--since", "2025-02-01", "--until", "2025-01-01"}, "requeue: ERROR: requeue: since (2025-02-01 00:00:00+00) is after until (2025-01-01 00:00:00+00) (SQLSTATE 22023)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out bytes.Buffer
			err := run(t.Context(), append([]string{"requeue", "--database-url", url}, tt.args...), func(string) string { return "" }, &out)
			require.EqualError(t, err, tt.wantErr)
		})
	}
}

func TestParseTimeFlag(t *testing.T) {
	t.Parallel()
	now := time.Date(2025, 3, 10, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Time
	}{
		{"2025-01-31T08:00:00Z", time.Date(2025, 1, 31, 8, 0, 0, 0, time.UTC)},
		{"2025-01-31", time.Date(2025, 1, 31, 0, 0, 0, 0, time.UTC)},
		{"90m", now.Add(-90 * time.Minute)},
	}
	for _, tt := range tests {
		got, err := parseTimeFlag("--since", tt.in, now)
		require.NoError(t, err)
		require.True(t, tt.want.Equal(*got), "parseTimeFlag(%q) = %v; want %v", tt.in, *got, tt.want)
	}
	got, err := parseTimeFlag("--since", "", now)
	require.NoError(t, err)
	require.Nil(t, got)
}

func TestRequeueHintsNameTheRightCommand(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		ids         []int64
		anyRejected bool
		wantFlags   string
		wantSQL     string
	}{
		{"one dead change", []int64{9921}, false, "--id 9921", "SELECT stagesync.requeue(ids => ARRAY[9921])"},
		{"dead and rejected changes", []int64{2, 326}, true, "--id 2,326 --include-rejected",
			"SELECT stagesync.requeue(ids => ARRAY[2, 326], include_rejected => true)"},
	}
	for _, tt := range tests {
		require.Equal(t, tt.wantFlags, RequeueFlags(tt.ids, tt.anyRejected), tt.name)
		require.Equal(t, tt.wantSQL, RequeueSQL(tt.ids, tt.anyRejected), tt.name)
	}
	require.Equal(t, "stagesync requeue --id 7", RequeueHint(7, "dead"))
	require.Equal(t, "stagesync requeue --id 8 --include-rejected", RequeueHint(8, "rejected"))
}

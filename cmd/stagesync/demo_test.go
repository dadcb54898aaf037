package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/dbtest"
)

func TestDemoDrainsAndReports(t *testing.T) {
	t.Parallel()
	admin := dbtest.AdminURL()
	name := "stagesync_demo_" + randomSuffix()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 30*time.Second)
		defer cancel()
		if err := dropDatabase(ctx, admin, name); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
	})
	getenv := func(k string) string {
		if k == "DATABASE_URL" {
			return admin
		}
		return ""
	}
	args := []string{"demo", "--changes", "60", "--demo-db", name, "--latency", "2ms", "--seed", "2"}

	var out bytes.Buffer
	require.NoError(t, run(t.Context(), args, getenv, &out), "demo output:\n%s", out.String())
	report := out.String()
	t.Logf("demo output:\n%s", report)

	demoURL, _, err := demoDatabaseURL(admin, name)
	require.NoError(t, err)
	pool, err := db.NewPool(t.Context(), demoURL, 2)
	require.NoError(t, err)

	// Every change is terminal; exactly the two planted ones need a person.
	byStatus := map[string]int64{}
	rows, err := pool.Query(t.Context(), `SELECT status, count(*) FROM stagesync.changes GROUP BY status`)
	require.NoError(t, err)
	for rows.Next() {
		var s string
		var n int64
		require.NoError(t, rows.Scan(&s, &n))
		byStatus[s] = n
	}
	require.NoError(t, rows.Err())
	require.Equal(t, int64(60), byStatus["applied"]+byStatus["merged"]+byStatus["noop"]+byStatus["dead"]+byStatus["rejected"])
	require.Equal(t, int64(1), byStatus["dead"])
	require.Equal(t, int64(1), byStatus["rejected"])
	require.Zero(t, byStatus["pending"]+byStatus["processing"])

	// The faults line names the throttling answers that paused the target,
	// as many as the audit recorded.
	var throttled int
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM stagesync.attempts WHERE status_code IN (429, 503)`).Scan(&throttled))
	if throttled > 0 {
		require.Contains(t, report, fmt.Sprintf("; %d of them (429, 503) paused the target for their Retry-After", throttled))
	} else {
		require.NotContains(t, report, "paused the target")
	}

	var deadID, rejID int64
	var deadErr, rejErr string
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT id, last_error FROM stagesync.changes WHERE status = 'dead'`).Scan(&deadID, &deadErr))
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT id, last_error FROM stagesync.changes WHERE status = 'rejected'`).Scan(&rejID, &rejErr))
	require.Equal(t, `needs_review: field "region" was changed on the remote to "EMEA-North"; upstream wants "EMEA-South" (policy manual)`, deadErr)
	require.Contains(t, rejErr, "422 field status: value INVALID is not allowed")
	requests := countWhere(t, pool, `SELECT count(*) FROM stagesync.attempts`)
	conflicts := countWhere(t, pool, `SELECT count(*) FROM stagesync.attempts WHERE outcome = 'conflict'`)
	// Upstream retries were absorbed: one row per idempotency key.
	require.Equal(t, int64(60), countWhere(t, pool, `SELECT count(DISTINCT idempotency_key) FROM stagesync.changes WHERE source = 'crm'`))

	// The report shows the database's figures.
	for _, s := range terminalStates {
		require.Contains(t, report, fmt.Sprintf("\n  %-10s %5d\n", s, byStatus[s]))
	}
	require.Contains(t, report, "  changes     60 staged by the CRM")
	require.Contains(t, report, fmt.Sprintf("  requests    %d to the remote = %.2f per change (", requests, float64(requests)/60))
	require.Contains(t, report, fmt.Sprintf("  conflicts   %d = %s of requests", conflicts, formatPercent(float64(conflicts)/float64(requests))))
	require.Contains(t, report, fmt.Sprintf("  #%-5d %-8s %-10s %s\n", deadID, "dead", demoManualID, deadErr))
	require.Contains(t, report, fmt.Sprintf("  #%-5d %-8s %-10s ", rejID, "rejected", demoInvalidID))
	first, second := deadID, rejID // newest first
	if strings.Index(report, fmt.Sprintf("#%-5d", rejID)) < strings.Index(report, fmt.Sprintf("#%-5d", deadID)) {
		first, second = rejID, deadID
	}
	require.Contains(t, report, fmt.Sprintf("-c 'SELECT stagesync.requeue(ids => ARRAY[%d, %d], include_rejected => true)'\n", first, second))
	require.Contains(t, report, fmt.Sprintf("--id %d,%d --include-rejected\n", first, second))
	require.Contains(t, report, "[########################################]  60/60  100%  done in ")
	shown := shellQuote(mustParseURL(t, demoURL).Redacted())
	require.Contains(t, report, fmt.Sprintf("  stagesync history --database-url %s --change %d\n", shown, first))
	require.Contains(t, report, fmt.Sprintf("  stagesync status --database-url %s\n", shown))

	// Nothing is left running: no session on the demo database once ours
	// is closed, and the simulator's port is closed.
	pool.Close()
	conn, err := pgx.Connect(t.Context(), admin)
	require.NoError(t, err)
	defer conn.Close(context.WithoutCancel(t.Context()))
	// A backend leaves pg_stat_activity a moment after its client hung up.
	var sessions int64
	waitFor(t, 5*time.Second, "no sessions on the demo database", func() bool {
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, name).Scan(&sessions))
		return sessions == 0
	})
	m := regexp.MustCompile(`remote     http://(127\.0\.0\.1:\d+)/assignments`).FindStringSubmatch(report)
	require.Len(t, m, 2, "simulator address in the report")
	_, err = net.DialTimeout("tcp", m[1], time.Second)
	require.Error(t, err, "the simulator still listens on %s", m[1])

	// It runs again cleanly on the same database name, and --drop removes it.
	out.Reset()
	require.NoError(t, run(t.Context(), append(args, "--drop"), getenv, &out), "second demo output:\n%s", out.String())
	require.Contains(t, out.String(), "  dead           1\n")
	require.NotContains(t, out.String(), "is kept for you to explore")
	// Nothing to run against a database that is gone.
	require.NotContains(t, out.String(), "requeue --database-url")
	require.NotContains(t, out.String(), "psql ")
	require.NotContains(t, out.String(), "--database-url")
	require.Contains(t, out.String(), "\nThe database "+name+" was dropped (--drop); run the demo without --drop to keep it for a look around.\n")
	var exists bool
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, name).Scan(&exists))
	require.False(t, exists, "--drop left the demo database behind")
}

func TestDemoFlags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"too few changes", []string{"--changes", "3"}, "demo: --changes must be between 10 and 100000, got 3"},
		{"unsafe database name", []string{"--demo-db", "x; DROP"}, `demo: --demo-db "x; DROP": use lowercase letters, digits and _ (it is dropped and recreated)`},
		{"negative latency", []string{"--latency", "-1s"}, "demo: --latency must not be negative, got -1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out bytes.Buffer
			err := run(t.Context(), append([]string{"demo"}, tt.args...), func(string) string { return "" }, &out)
			require.EqualError(t, err, tt.wantErr)
		})
	}
}

func TestDemoDatabaseURL(t *testing.T) {
	t.Parallel()
	connect, shown, err := demoDatabaseURL("postgres://app:s3cret@db.example:5433/postgres?sslmode=disable", "stagesync_demo")
	require.NoError(t, err)
	require.Equal(t, "postgres://app:s3cret@db.example:5433/stagesync_demo?sslmode=disable", connect)
	require.Equal(t, "postgres://app:xxxxx@db.example:5433/stagesync_demo?sslmode=disable", shown)

	connect, shown, err = demoDatabaseURL("host=127.0.0.1 user=postgres dbname=postgres", "stagesync_demo")
	require.NoError(t, err)
	require.Equal(t, "host=127.0.0.1 user=postgres dbname=postgres dbname=stagesync_demo", connect)
	require.Equal(t, "host=127.0.0.1 user=postgres dbname=postgres dbname=stagesync_demo", shown)

	connect, shown, err = demoDatabaseURL("host=db.example password='s3 cr\\'et' user=app", "stagesync_demo")
	require.NoError(t, err)
	require.Equal(t, "host=db.example password='s3 cr\\'et' user=app dbname=stagesync_demo", connect)
	require.Equal(t, "host=db.example user=app dbname=stagesync_demo", shown, "the password is not shown")

	// No DATABASE_URL and no PG* variables: libpq's defaults, as psql.
	connect, shown, err = demoDatabaseURL("", "stagesync_demo")
	require.NoError(t, err)
	require.Equal(t, "dbname=stagesync_demo", connect)
	require.Equal(t, "dbname=stagesync_demo", shown)

	_, _, err = demoDatabaseURL("postgres://127.0.0.1/stagesync_demo", "stagesync_demo")
	require.EqualError(t, err, `demo: --demo-db "stagesync_demo" is the database of --database-url; the demo drops it, so pick another name`)
}

// The demo drops only a database it made: one of the same name holding
// someone's data is refused, untouched, with words that say why.
func TestDemoNeverDropsADatabaseItDidNotMake(t *testing.T) {
	t.Parallel()
	admin := dbtest.AdminURL()
	name := "stagesync_demo_" + randomSuffix()
	conn, err := pgx.Connect(t.Context(), admin)
	require.NoError(t, err)
	defer conn.Close(context.WithoutCancel(t.Context()))
	_, err = conn.Exec(t.Context(), "CREATE DATABASE "+name)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 30*time.Second)
		defer cancel()
		if err := dropTestDatabase(ctx, name); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
	})
	theirURL, _, err := demoDatabaseURL(admin, name)
	require.NoError(t, err)
	theirs, err := pgx.Connect(t.Context(), theirURL)
	require.NoError(t, err)
	defer theirs.Close(context.WithoutCancel(t.Context()))
	_, err = theirs.Exec(t.Context(), "CREATE TABLE precious (v int); INSERT INTO precious VALUES (42)")
	require.NoError(t, err)

	getenv := func(k string) string {
		if k == "DATABASE_URL" {
			return admin
		}
		return ""
	}
	var out bytes.Buffer
	err = run(t.Context(), []string{"demo", "--changes", "10", "--demo-db", name, "--latency", "1ms"}, getenv, &out)
	require.EqualError(t, err, "demo: database "+name+" exists and was not made by `stagesync demo`, so the demo will not drop it: pick another --demo-db, or drop it yourself if it is an old demo database")
	require.ErrorContains(t, dropDatabase(t.Context(), admin, name), "was not made by `stagesync demo`")

	// Their data and their session are still there.
	var v int
	require.NoError(t, theirs.QueryRow(t.Context(), "SELECT v FROM precious").Scan(&v))
	require.Equal(t, 42, v)
}

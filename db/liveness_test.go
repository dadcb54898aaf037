package db_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// Advisory locks are open to every role. A process is alive only while a
// session of its own login holds its liveness key: an upstream login that
// takes (or queues for) a dead process's key cannot keep it "alive" and its
// jobs from being handed back.
func TestLivenessCountsOnlyTheProcessLoginsLock(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	const key = 7_300_421_977
	_, err := d.Pool.Exec(ctx, `INSERT INTO stagesync.processes (client_id, lock_key, hostname, pid, targets)
		VALUES ('proc-1', $1, 'host', 1, '{territory}')`, key)
	require.NoError(t, err)
	live := func() []string {
		rows, err := d.Pool.Query(ctx, `SELECT client_id FROM stagesync.live_processes()`)
		require.NoError(t, err)
		var ids []string
		for rows.Next() {
			var id string
			require.NoError(t, rows.Scan(&id))
			ids = append(ids, id)
		}
		require.NoError(t, rows.Err())
		return ids
	}
	got := live()
	require.Empty(t, got, "no session holds the key: got live %v; want none", got)

	impostor := loginConn(t, d, newRole(t, d, "stagesync_test_crm", "LOGIN IN ROLE stagesync_upstream"), "")
	_, err = impostor.Exec(ctx, `SELECT pg_advisory_lock($1)`, int64(key))
	require.NoError(t, err)
	got = live()
	require.Empty(t, got, "an upstream login holds the process's key: got live %v; want none", got)
	_, err = impostor.Exec(ctx, `SELECT pg_advisory_unlock($1)`, int64(key))
	require.NoError(t, err)

	own := d.conn(t, "")
	_, err = own.Exec(ctx, `SELECT pg_advisory_lock($1)`, int64(key))
	require.NoError(t, err)
	require.Equal(t, []string{"proc-1"}, live(), "a session of the process's own login holds it")
}

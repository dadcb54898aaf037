package processor

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/dbtest"
)

func TestResetOrphanedChangesSparesChangesWithALiveJob(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool := dbtest.NewPool(t)
	_, err := pool.Exec(ctx, `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ('territory', 'http://127.0.0.1:1', '/a/{id}')`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields)
		SELECT 'territory', r, '{"status":"x"}' FROM unnest(ARRAY['covered', 'orphan', 'also-orphan', 'pending']) r`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `UPDATE stagesync.changes SET status = 'processing' WHERE resource_id <> 'pending'`)
	require.NoError(t, err)

	// An insert-only River client: a scheduled retry job for "covered".
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{})
	require.NoError(t, err)
	_, err = client.Insert(ctx, ApplyArgs{Target: "territory", ResourceIDs: []string{"other", "covered"}},
		&river.InsertOpts{Queue: QueueName("territory"), ScheduledAt: time.Now().Add(time.Hour)})
	require.NoError(t, err)

	q := db.New()
	n, err := q.ChangesResetOrphaned(ctx, pool, time.Now().Add(-time.Hour))
	require.NoError(t, err)
	require.Equal(t, int32(0), n, "changes touched after the cutoff must not be reset")

	n, err = q.ChangesResetOrphaned(ctx, pool, time.Now().Add(time.Minute))
	require.NoError(t, err)
	require.Equal(t, int32(2), n)

	rows, err := pool.Query(ctx, `SELECT resource_id, status FROM stagesync.changes ORDER BY resource_id`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var v [2]string
		return v, r.Scan(&v[0], &v[1])
	})
	require.NoError(t, err)
	require.Equal(t, [][2]string{
		{"also-orphan", "pending"}, {"covered", "processing"}, {"orphan", "pending"}, {"pending", "pending"},
	}, got)
}

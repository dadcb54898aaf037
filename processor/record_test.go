package processor

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/dbtest"
)

// A flush's statements travel in one pipelined batch and commit together:
// when one fails, none of them took effect (the recorder then records the
// resources one by one), and a statement whose result is needed can't be
// queued.
func TestPipelinedRecordingIsAllOrNothing(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	ctx := context.Background()
	_, err := pool.Exec(ctx, `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ('crm', 'http://x.test', '/a/{id}')`)
	require.NoError(t, err)

	var pl pipeline
	_, err = pl.Exec(ctx, `INSERT INTO stagesync.resources (target, resource_id, etag) VALUES ('crm', 'r-1', '"e1"')`)
	require.NoError(t, err)
	_, err = pl.Exec(ctx, `INSERT INTO stagesync.resources (target, resource_id, etag) VALUES ('nope', 'r-2', '"e2"')`)
	require.NoError(t, err)
	err = pl.send(ctx, pool)
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr, "send with a failing statement: got %v; want the PostgreSQL error", err)
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM stagesync.resources`).Scan(&n))
	require.Equal(t, 0, n, "resources rows after a failed batch: got %d; want 0 (all or nothing)", n)

	pl = pipeline{}
	_, err = pl.Exec(ctx, `INSERT INTO stagesync.resources (target, resource_id, etag) VALUES ('crm', 'r-1', '"e1"')`)
	require.NoError(t, err)
	require.NoError(t, pl.send(ctx, pool))
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM stagesync.resources`).Scan(&n))
	require.Equal(t, 1, n, "resources rows after a good batch: got %d; want 1", n)

	_, err = pl.Query(ctx, `SELECT 1`)
	require.ErrorIs(t, err, errNotPipelined, "Query on a pipeline: got %v; want errNotPipelined", err)
	require.ErrorIs(t, pl.QueryRow(ctx, `SELECT 1`).Scan(), errNotPipelined)
}

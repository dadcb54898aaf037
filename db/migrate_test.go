package db_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/dbtest"
)

func TestMigrateUpDownUp(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool, err := db.NewPool(ctx, dbtest.NewEmptyDatabase(t), 4)
	require.NoError(t, err)
	t.Cleanup(pool.Close)

	current, err := db.MigrationsCurrent(ctx, pool)
	require.NoError(t, err)
	require.False(t, current, "a new database must report pending migrations")

	require.NoError(t, db.Migrate(ctx, pool, nil))
	require.NoError(t, db.Migrate(ctx, pool, nil), "a second up must be a no-op")
	current, err = db.MigrationsCurrent(ctx, pool)
	require.NoError(t, err)
	require.True(t, current)

	tables := func() int {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM information_schema.tables
			WHERE table_schema = 'stagesync' OR table_name LIKE 'river\_%'`).Scan(&n))
		return n
	}
	upTables := tables()
	require.Greater(t, upTables, 8)

	require.NoError(t, db.MigrateDown(ctx, pool, nil))
	require.Equal(t, 0, tables(), "down must remove every stagesync and River table")

	require.NoError(t, db.Migrate(ctx, pool, nil))
	require.Equal(t, upTables, tables(), "up after down must rebuild the same tables")
	states, err := db.MigrationStatus(ctx, pool)
	require.NoError(t, err)
	for _, s := range states {
		require.True(t, s.Applied, "%s %d %s not applied", s.Component, s.Version, s.Name)
	}
}

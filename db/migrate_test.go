package db_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pressly/goose/v3/lock"
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
	var gooseTable *string
	require.NoError(t, pool.QueryRow(ctx, "SELECT to_regclass('goose_db_version')::text").Scan(&gooseTable))
	require.Nil(t, gooseTable, "MigrationsCurrent must not create goose's version table")

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

func TestMigrationsCurrentSeesEachPendingMigration(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, forget string }{
		{"a river migration", "DELETE FROM river_migration WHERE version = (SELECT max(version) FROM river_migration)"},
		{"a stagesync migration", "DELETE FROM goose_db_version WHERE version_id = (SELECT max(version_id) FROM goose_db_version)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			pool := dbtest.NewPool(t)
			current, err := db.MigrationsCurrent(t.Context(), pool)
			require.NoError(t, err)
			require.True(t, current)

			_, err = pool.Exec(t.Context(), tt.forget)
			require.NoError(t, err)
			current, err = db.MigrationsCurrent(t.Context(), pool)
			require.NoError(t, err)
			require.False(t, current)
		})
	}
}

// /readyz calls MigrationsCurrent with a 3 s budget; probes must neither wait
// for a migration in progress nor for each other.
func TestMigrationsCurrentTakesNoLock(t *testing.T) {
	t.Parallel()
	url := dbtest.NewDatabase(t)
	pool, err := db.NewPool(t.Context(), url, 8)
	require.NoError(t, err)
	t.Cleanup(pool.Close)

	// Advisory locks are per database: hold goose's in this one, as a
	// migration (or `migrate status`) would.
	holder, err := pgx.Connect(t.Context(), url)
	require.NoError(t, err)
	t.Cleanup(func() { holder.Close(context.Background()) })
	_, err = holder.Exec(t.Context(), "SELECT pg_advisory_lock($1)", lock.DefaultLockID)
	require.NoError(t, err)

	// The timeout only keeps a regression from hanging; goose's locker
	// retries every 5 s, so a probe that waited for the lock ends here.
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() {
			current, err := db.MigrationsCurrent(ctx, pool)
			if err == nil && !current {
				err = errors.New("got current = false; want true")
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "probe %d", i)
	}
}

// Processes starting together on a new database must take turns: River's
// migrations take no lock of their own, and two runs creating its tables at
// once would collide. Several rounds make an overlap likely.
func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	for round := range 5 {
		t.Run(fmt.Sprintf("round %d", round), func(t *testing.T) {
			t.Parallel()
			url := dbtest.NewEmptyDatabase(t)
			pools := make([]*pgxpool.Pool, 2)
			for i := range pools {
				pool, err := db.NewPool(t.Context(), url, 4)
				require.NoError(t, err)
				t.Cleanup(pool.Close)
				pools[i] = pool
			}
			errs := make([]error, len(pools))
			var wg sync.WaitGroup
			for i, pool := range pools {
				wg.Go(func() { errs[i] = db.Migrate(t.Context(), pool, nil) })
			}
			wg.Wait()
			for i, err := range errs {
				require.NoError(t, err, "migration %d", i)
			}
			current, err := db.MigrationsCurrent(t.Context(), pools[0])
			require.NoError(t, err)
			require.True(t, current)
		})
	}
}

package db

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/database"
	"github.com/pressly/goose/v3/lock"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/stagesync/stagesync/migrations"
)

// MigrationState is one migration's version and whether it is applied.
type MigrationState struct {
	Component string // "river" or "stagesync"
	Version   int64
	Name      string
	Applied   bool
}

// Migrate applies River's migrations and then stagesync's. Running it on a
// current database is a no-op. Concurrent calls (several processes starting
// at once) take turns: see withMigrationLock.
func Migrate(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
	_, err := MigrateUp(ctx, pool, logger)
	return err
}

// MigrateResult says what one MigrateUp applied and where each schema stands.
type MigrateResult struct {
	// Applied lists the migrations this call applied, River's first, in
	// order; empty when the schema was already current.
	Applied []MigrationState
	// RiverVersion and StagesyncVersion are the newest migration versions
	// this binary knows, which the database is now at.
	RiverVersion, StagesyncVersion int64
}

// MigrateUp is Migrate that also reports what it applied, for `stagesync
// migrate up` to say so.
func MigrateUp(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) (MigrateResult, error) {
	var res MigrateResult
	err := withMigrationLock(ctx, pool, func() error {
		rm, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: quiet(logger)})
		if err != nil {
			return fmt.Errorf("create river migrator: %w", err)
		}
		rr, err := rm.Migrate(ctx, rivermigrate.DirectionUp, nil)
		if err != nil {
			return fmt.Errorf("apply river migrations: %w", err)
		}
		for _, v := range rr.Versions {
			res.Applied = append(res.Applied, MigrationState{Component: "river", Version: int64(v.Version), Name: v.Name, Applied: true})
		}
		for _, v := range rm.AllVersions() {
			res.RiverVersion = max(res.RiverVersion, int64(v.Version))
		}
		return withProvider(pool, func(p *goose.Provider) error {
			results, err := p.Up(ctx)
			if err != nil {
				return fmt.Errorf("apply stagesync migrations: %w", err)
			}
			for _, r := range results {
				res.Applied = append(res.Applied, MigrationState{Component: "stagesync", Version: r.Source.Version, Name: filepath.Base(r.Source.Path), Applied: true})
			}
			for _, src := range p.ListSources() {
				res.StagesyncVersion = max(res.StagesyncVersion, src.Version)
			}
			return nil
		})
	})
	return res, err
}

// MigrateDown removes stagesync's schema and then River's tables: the reverse
// of Migrate. The cluster-wide roles stay, since other databases may use them.
func MigrateDown(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
	return withMigrationLock(ctx, pool, func() error {
		err := withProvider(pool, func(p *goose.Provider) error {
			if _, err := p.DownTo(ctx, 0); err != nil {
				return fmt.Errorf("roll back stagesync migrations: %w", err)
			}
			return nil
		})
		if err != nil {
			return err
		}
		rm, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: quiet(logger)})
		if err != nil {
			return fmt.Errorf("create river migrator: %w", err)
		}
		if _, err := rm.Migrate(ctx, rivermigrate.DirectionDown, &rivermigrate.MigrateOpts{TargetVersion: -1}); err != nil {
			return fmt.Errorf("roll back river migrations: %w", err)
		}
		return nil
	})
}

// withMigrationLock runs fn while holding MigrationLock on a connection of
// its own, so the migrations need a pool of two connections or more.
// rivermigrate takes no lock, and goose's session lock covers only
// goose's half, so without this two processes migrating a new database at
// once would both create River's tables and one would fail. The lock is
// session-scoped because the migrators run their transactions on other
// connections of the pool.
func withMigrationLock(ctx context.Context, pool *pgxpool.Pool, fn func() error) (err error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire a connection for the migration lock: %w", err)
	}
	defer conn.Release()
	q := New()
	if err := q.MigrationLock(ctx, conn); err != nil {
		return fmt.Errorf("take the migration lock: %w", err)
	}
	defer func() {
		// ctx may be cancelled by now; the lock must go regardless. If the
		// unlock fails, closing the connection ends the session and with it
		// the lock, and Release then drops the connection from the pool.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if uerr := q.MigrationUnlock(uctx, conn); uerr != nil {
			_ = conn.Conn().Close(uctx)
			err = errors.Join(err, fmt.Errorf("release the migration lock: %w", uerr))
		}
	}()
	return fn()
}

// MigrationStatus lists River's applied versions and each stagesync
// migration with whether it is applied.
func MigrationStatus(ctx context.Context, pool *pgxpool.Pool) ([]MigrationState, error) {
	var states []MigrationState
	rm, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: quiet(nil)})
	if err != nil {
		return nil, fmt.Errorf("create river migrator: %w", err)
	}
	all := rm.AllVersions()
	existing, err := rm.ExistingVersions(ctx)
	if err != nil {
		return nil, fmt.Errorf("read river migration versions: %w", err)
	}
	applied := make(map[int]bool, len(existing))
	for _, m := range existing {
		applied[m.Version] = true
	}
	for _, m := range all {
		states = append(states, MigrationState{Component: "river", Version: int64(m.Version), Name: m.Name, Applied: applied[m.Version]})
	}
	err = withProvider(pool, func(p *goose.Provider) error {
		st, err := p.Status(ctx)
		if err != nil {
			return fmt.Errorf("read stagesync migration status: %w", err)
		}
		for _, s := range st {
			states = append(states, MigrationState{
				Component: "stagesync", Version: s.Source.Version, Name: s.Source.Path,
				Applied: s.State == goose.StateApplied,
			})
		}
		return nil
	})
	return states, err
}

// MigrationsCurrent reports whether every River and stagesync migration is
// applied; /readyz uses it. Unlike MigrationStatus it takes no lock and
// writes nothing, so any number of probes answer at once, even while a
// migration holds goose's lock: it compares River's AllVersions with
// ExistingVersions, and our migration files with the rows of goose's version
// table. goose's Provider.HasPending would skip the lock too, but it creates
// the version table when it is missing.
func MigrationsCurrent(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	rm, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: quiet(nil)})
	if err != nil {
		return false, fmt.Errorf("create river migrator: %w", err)
	}
	existing, err := rm.ExistingVersions(ctx)
	if err != nil {
		return false, fmt.Errorf("read river migration versions: %w", err)
	}
	riverApplied := make(map[int]bool, len(existing))
	for _, m := range existing {
		riverApplied[m.Version] = true
	}
	for _, m := range rm.AllVersions() {
		if !riverApplied[m.Version] {
			return false, nil
		}
	}

	sqlDB := stdlib.OpenDBFromPool(pool)
	defer sqlDB.Close() // closes the wrapper only, not the pool
	// No session locker: the provider only lists our migration files here.
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, migrations.FS, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return false, fmt.Errorf("create goose provider: %w", err)
	}
	// goose's store runs goose's own catalog and version-table queries, the
	// same ones the provider would.
	store, err := database.NewStore(database.DialectPostgres, goose.DefaultTablename)
	if err != nil {
		return false, fmt.Errorf("create goose store: %w", err)
	}
	ext, ok := store.(database.StoreExtender)
	if !ok {
		return false, errors.New("goose's postgres store cannot check for its version table")
	}
	exists, err := ext.TableExists(ctx, sqlDB)
	if err != nil {
		return false, fmt.Errorf("look up stagesync migration table: %w", err)
	}
	if !exists {
		return false, nil
	}
	rows, err := store.ListMigrations(ctx, sqlDB)
	if err != nil {
		return false, fmt.Errorf("read stagesync migration versions: %w", err)
	}
	// Like goose's HasPending: a version with a row is applied (goose
	// deletes the row when it rolls a migration back).
	applied := make(map[int64]bool, len(rows))
	for _, r := range rows {
		applied[r.Version] = true
	}
	for _, src := range p.ListSources() {
		if !applied[src.Version] {
			return false, nil
		}
	}
	return true, nil
}

func withProvider(pool *pgxpool.Pool, fn func(*goose.Provider) error) (err error) {
	locker, err := lock.NewPostgresSessionLocker()
	if err != nil {
		return fmt.Errorf("create migration lock: %w", err)
	}
	sqlDB := stdlib.OpenDBFromPool(pool)
	p, err := goose.NewProvider(goose.DialectPostgres, sqlDB, migrations.FS,
		goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		_ = sqlDB.Close()
		return fmt.Errorf("create goose provider: %w", err)
	}
	defer func() {
		// Closing the provider closes sqlDB but, per pgx, not the pool.
		err = errors.Join(err, p.Close())
	}()
	return fn(p)
}

func quiet(logger *slog.Logger) *slog.Logger {
	if logger != nil {
		return logger
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

package db

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
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
// current database is a no-op. A goose session lock makes concurrent calls
// (several processes starting at once) take turns.
func Migrate(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
	rm, err := rivermigrate.New(riverpgxv5.New(pool), &rivermigrate.Config{Logger: quiet(logger)})
	if err != nil {
		return fmt.Errorf("create river migrator: %w", err)
	}
	if _, err := rm.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("apply river migrations: %w", err)
	}
	return withProvider(pool, func(p *goose.Provider) error {
		if _, err := p.Up(ctx); err != nil {
			return fmt.Errorf("apply stagesync migrations: %w", err)
		}
		return nil
	})
}

// MigrateDown removes stagesync's schema and then River's tables: the reverse
// of Migrate. The cluster-wide roles stay, since other databases may use them.
func MigrateDown(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
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
// applied; /readyz uses it.
func MigrationsCurrent(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	states, err := MigrationStatus(ctx, pool)
	if err != nil {
		return false, err
	}
	for _, s := range states {
		if !s.Applied {
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

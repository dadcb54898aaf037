package db

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultURL is used when neither a flag nor DATABASE_URL names a database:
// the local server a developer machine (and `make db-up`) provides.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// NewPool connects to databaseURL and checks the connection. maxConns, when
// positive, overrides pgx's default (4 or the CPU count), which is too small
// for a processor that holds one connection per job being worked on.
func NewPool(ctx context.Context, databaseURL string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		// pgx's parse errors can echo the URL, password included.
		return nil, fmt.Errorf("parse database URL: %w", redactedError{err})
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database pool: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to database %s:%d/%s: %w",
			cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database, err)
	}
	return pool, nil
}

// redactedError hides the text of a URL parse error, which may contain the
// password, while keeping it unwrappable for errors.Is/As.
type redactedError struct{ err error }

func (e redactedError) Error() string {
	return "invalid connection string (details withheld: may contain a password)"
}
func (e redactedError) Unwrap() error { return e.err }

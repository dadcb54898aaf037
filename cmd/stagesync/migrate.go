package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/stagesync/stagesync/db"
)

func cmdMigrate(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the local server)")
	fs.Usage = func() {
		fmt.Fprintln(stdout, "usage: stagesync migrate [--database-url URL] up|down|status")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return fmt.Errorf("migrate: want exactly one of up, down, status; got %d arguments", fs.NArg())
	}
	pool, err := db.NewPool(ctx, databaseURL(*dbURL, getenv), 4)
	if err != nil {
		return err
	}
	defer pool.Close()

	switch fs.Arg(0) {
	case "up":
		if err := db.Migrate(ctx, pool, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "migrate: schema is current")
	case "down":
		if err := db.MigrateDown(ctx, pool, nil); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "migrate: stagesync and River schemas removed (roles kept)")
	case "status":
		states, err := db.MigrationStatus(ctx, pool)
		if err != nil {
			return err
		}
		for _, s := range states {
			mark := "pending"
			if s.Applied {
				mark = "applied"
			}
			fmt.Fprintf(stdout, "%-9s %5d  %-7s  %s\n", s.Component, s.Version, mark, s.Name)
		}
	default:
		return fmt.Errorf("migrate: unknown action %q (want up, down or status)", fs.Arg(0))
	}
	return nil
}

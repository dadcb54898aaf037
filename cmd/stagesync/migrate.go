package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

func cmdMigrate(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "migrate", stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: the config's database_url, $DATABASE_URL, else the PG* variables as psql uses them)")
	configPath := fs.String("config", "", "with up: also register this config's targets (as \"targets sync\" does)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("migrate: want exactly one of up, down, status; got %q (see %s migrate -h)", pos, self)
	}
	action := pos[0]
	if *configPath != "" && action != "up" {
		return fmt.Errorf("migrate: --config goes with up only")
	}
	var cfg *processor.Config
	cfgURL := ""
	if *configPath != "" {
		// Read first: a bad config should not leave a half-done job.
		if cfg, err = processor.LoadConfig(*configPath, getenv); err != nil {
			return err
		}
		cfgURL = cfg.DatabaseURL
	}
	src := resolveDatabase(*dbURL, cfgURL, getenv)
	pool, err := db.NewPool(ctx, src.url, 4)
	if err != nil {
		return fmt.Errorf("%w (database from %s)", err, src.from)
	}
	defer pool.Close()

	switch action {
	case "up":
		res, err := db.MigrateUp(ctx, pool, nil)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, describeMigrateUp(res))
		if cfg != nil {
			return syncTargets(ctx, pool, cfg, stdout)
		}
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
		return fmt.Errorf("migrate: unknown action %q (want up, down or status)", action)
	}
	return nil
}

// describeMigrateUp says what MigrateUp did: "applied 14 migrations (River
// 1–6, stagesync 00001_schema.sql … 00009_operator_lookups.sql); the schema
// is current (River version 6, stagesync version 9)".
func describeMigrateUp(res db.MigrateResult) string {
	current := fmt.Sprintf("River version %d, stagesync version %d", res.RiverVersion, res.StagesyncVersion)
	if len(res.Applied) == 0 {
		return "migrate: the schema was already current (" + current + "); nothing to apply"
	}
	var river, ours []db.MigrationState
	for _, m := range res.Applied {
		if m.Component == "river" {
			river = append(river, m)
		} else {
			ours = append(ours, m)
		}
	}
	var parts []string
	if len(river) > 0 {
		parts = append(parts, "River "+span(river, func(m db.MigrationState) string { return fmt.Sprint(m.Version) }, "–"))
	}
	if len(ours) > 0 {
		parts = append(parts, "stagesync "+span(ours, func(m db.MigrationState) string { return m.Name }, " … "))
	}
	noun := "migrations"
	if len(res.Applied) == 1 {
		noun = "migration"
	}
	return fmt.Sprintf("migrate: applied %d %s (%s); the schema is current (%s)", len(res.Applied), noun, strings.Join(parts, ", "), current)
}

func span(ms []db.MigrationState, name func(db.MigrationState) string, sep string) string {
	if len(ms) == 1 {
		return name(ms[0])
	}
	return name(ms[0]) + sep + name(ms[len(ms)-1])
}

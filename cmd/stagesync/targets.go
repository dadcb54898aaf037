package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
)

func cmdTargets(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "targets", stdout)
	configPath := fs.String("config", "stagesync.yaml", "YAML config file whose targets to register")
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: the config's database_url, $DATABASE_URL, else the PG* variables as psql uses them)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "sync" {
		return fmt.Errorf("targets: want the action sync; got %q (see %s targets -h)", pos, self)
	}
	cfg, err := processor.LoadConfig(*configPath, getenv)
	if err != nil {
		return err
	}
	pool, err := connect(ctx, resolveDatabase(*dbURL, cfg.DatabaseURL, getenv), 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	return syncTargets(ctx, pool, cfg, stdout)
}

// syncTargets registers cfg's targets and says, per target, whether it was
// new, changed or already so, and which registered targets the config
// lacks (they are left alone: another process's config may serve them).
func syncTargets(ctx context.Context, pool *pgxpool.Pool, cfg *processor.Config, stdout io.Writer) error {
	q := db.New()
	before, err := q.TargetsRegistered(ctx, pool)
	if err != nil {
		return fmt.Errorf("read registered targets: %w", err)
	}
	if err := processor.RegisterTargets(ctx, pool, cfg); err != nil {
		return err
	}
	after, err := q.TargetsRegistered(ctx, pool)
	if err != nil {
		return fmt.Errorf("read registered targets: %w", err)
	}
	old := map[string]db.TargetsRegisteredRow{}
	for _, t := range before {
		old[t.Name] = t
	}
	noun := "targets"
	if len(cfg.Targets) == 1 {
		noun = "target"
	}
	fmt.Fprintf(stdout, "targets: registered %d %s; the upstream may stage changes for %s now\n", len(cfg.Targets), noun, joinNames(cfg.TargetNames()))
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	for _, t := range after {
		state := "in the database, not in this config: left as is"
		if _, ok := cfg.Targets[t.Name]; ok {
			o, existed := old[t.Name]
			switch {
			case !existed:
				state = "new"
			case sameTarget(o, t):
				state = "unchanged"
			default:
				state = "updated"
			}
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s %s\n", t.Name, state, t.UpdateMethod, t.BaseURL+t.ItemPath)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write targets: %w", err)
	}
	return nil
}

func sameTarget(a, b db.TargetsRegisteredRow) bool {
	if a.BaseURL != b.BaseURL || a.ItemPath != b.ItemPath || a.UpdateMethod != b.UpdateMethod {
		return false
	}
	// jsonb normalizes key order and spacing, so equal settings read back
	// as equal text; decode anyway to compare values, not bytes.
	var sa, sb any
	if json.Unmarshal(a.Settings, &sa) != nil || json.Unmarshal(b.Settings, &sb) != nil {
		return false
	}
	ja, _ := json.Marshal(sa)
	jb, _ := json.Marshal(sb)
	return string(ja) == string(jb)
}

func joinNames(names []string) string {
	switch len(names) {
	case 0:
		return "none"
	case 1:
		return names[0]
	}
	s := ""
	for i, n := range names {
		switch {
		case i == 0:
		case i == len(names)-1:
			s += " and "
		default:
			s += ", "
		}
		s += n
	}
	return s
}

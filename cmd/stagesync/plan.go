package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/stagesync/stagesync/processor"
)

func cmdPlan(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "plan", stdout)
	configPath := fs.String("config", "stagesync.yaml", "YAML config file (the targets' URLs, update methods and field policies)")
	target := fs.String("target", "", "only this target (default: every target of the config)")
	limit := fs.Int("limit", 50, "the most resources to describe, oldest open change first")
	asJSON := fs.Bool("json", false, "print a JSON array of steps (full bodies and Idempotency-Keys) instead of a table")
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default: the config's database_url, $DATABASE_URL, else the PG* variables as psql uses them)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		return fmt.Errorf("plan: unexpected arguments %q", pos)
	case *limit < 1 || *limit > 10000:
		return fmt.Errorf("plan: --limit must be between 1 and 10000, got %d", *limit)
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
	steps, err := processor.Plan(ctx, pool, cfg, processor.PlanOptions{Target: *target, Limit: *limit})
	if err != nil {
		return err
	}
	if *asJSON {
		if steps == nil {
			steps = []processor.PlannedStep{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(steps); err != nil {
			return fmt.Errorf("write plan: %w", err)
		}
		return nil
	}
	return writePlanText(stdout, steps, *limit)
}

// writePlanText prints the plan as a table: one line per step.
func writePlanText(w io.Writer, steps []processor.PlannedStep, limit int) error {
	resources := map[string]bool{}
	changes := 0
	for _, s := range steps {
		resources[s.Target+"\x00"+s.ResourceID] = true
		changes += len(s.ChangeIDs)
	}
	if len(steps) == 0 {
		_, err := fmt.Fprintln(w, "plan: no open changes: nothing would be sent")
		return err
	}
	more := ""
	if len(resources) == limit {
		more = fmt.Sprintf(" (the first %d; --limit shows more)", limit)
	}
	fmt.Fprintf(w, "plan: the next requests for %d open changes of %d resources%s; nothing was sent, no row changed\n\n", changes, len(resources), more)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tRESOURCE\tCHANGES\tREQUEST\tIF-MATCH\tBODY")
	for _, s := range steps {
		ids := make([]string, len(s.ChangeIDs))
		for i, id := range s.ChangeIDs {
			ids[i] = fmt.Sprintf("#%d", id)
		}
		req, ifMatch, body := "—", "", ""
		switch {
		case s.Method == "":
			ifMatch = s.Outcome + ": " + s.Note
		default:
			req = s.Method + " " + s.URL
			ifMatch = s.IfMatch
			switch {
			case s.First != "":
				ifMatch = s.First
			case s.IfNoneMatch != "":
				ifMatch = "If-None-Match: " + s.IfNoneMatch
			}
			if s.Body != nil {
				b, err := json.Marshal(s.Body)
				if err != nil {
					return fmt.Errorf("encode the body for %s: %w", s.ResourceID, err)
				}
				body = shorten(string(b), 80)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Target, s.ResourceID, strings.Join(ids, " "), req, ifMatch, body)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write plan: %w", err)
	}
	var notes []string
	for _, s := range steps {
		if s.Method != "" && s.Note != "" {
			notes = append(notes, fmt.Sprintf("  %s %s: %s", s.Target, s.ResourceID, s.Note))
		}
	}
	if len(notes) > 0 {
		fmt.Fprintf(w, "\nnotes:\n%s\n", strings.Join(notes, "\n"))
	}
	return nil
}

// shorten cuts s to n runes with an ellipsis.
func shorten(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

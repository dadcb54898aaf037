package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/stagesync/stagesync/db"
)

func cmdRequeue(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("requeue", flag.ContinueOnError)
	fs.SetOutput(stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the local server)")
	var ids idList
	fs.Var(&ids, "id", "change id to requeue; repeat the flag or give a comma-separated list")
	target := fs.String("target", "", "only changes of this target")
	since := fs.String("since", "", "only changes finished at or after this time: RFC 3339 (2025-01-31T08:00:00Z), a date (2025-01-31, UTC) or a duration ago (90m)")
	until := fs.String("until", "", "only changes finished before this time (same forms as --since)")
	includeRejected := fs.Bool("include-rejected", false, "also requeue rejected changes (by default only dead ones)")
	all := fs.Bool("all", false, "requeue every dead change (required when no other filter is given)")
	fs.Usage = func() {
		fmt.Fprintln(stdout, "usage: stagesync requeue [--id N[,N…]]… [--target NAME] [--since T] [--until T] [--include-rejected] [--all] [--database-url URL]")
		fmt.Fprintln(stdout, "Moves dead (and with --include-rejected, rejected) changes back to pending with a fresh attempt budget,")
		fmt.Fprintln(stdout, "via SELECT stagesync.requeue(...); the call is recorded in stagesync.admin_actions.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("requeue: unexpected arguments %q", fs.Args())
	}
	now := time.Now()
	params := db.RequeueParams{IDs: ids, IncludeRejected: *includeRejected}
	if *target != "" {
		params.Target = target
	}
	var err error
	if params.Since, err = parseTimeFlag("--since", *since, now); err != nil {
		return err
	}
	if params.Until, err = parseTimeFlag("--until", *until, now); err != nil {
		return err
	}
	filtered := len(ids) > 0 || params.Target != nil || params.Since != nil || params.Until != nil
	if !filtered && !*all {
		return errors.New("requeue: give --id, --target, --since or --until, or --all to requeue every dead change")
	}
	if filtered && *all {
		return errors.New("requeue: --all requeues everything; don't combine it with filters")
	}

	pool, err := db.NewPool(ctx, databaseURL(*dbURL, getenv), 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	moved, err := db.New().Requeue(ctx, pool, params)
	if err != nil {
		return fmt.Errorf("requeue: %w", err)
	}
	states := "dead"
	if *includeRejected {
		states = "dead or rejected"
	}
	noun := "changes"
	if moved == 1 {
		noun = "change"
	}
	_, err = fmt.Fprintf(stdout, "requeue: moved %d %s %s back to pending (%s)\n", moved, states, noun, describeRequeue(params))
	return err
}

// describeRequeue says which filters were applied, for the confirmation.
func describeRequeue(p db.RequeueParams) string {
	var parts []string
	if len(p.IDs) > 0 {
		s := make([]string, len(p.IDs))
		for i, id := range p.IDs {
			s[i] = strconv.FormatInt(id, 10)
		}
		parts = append(parts, "ids "+strings.Join(s, ","))
	}
	if p.Target != nil {
		parts = append(parts, "target "+*p.Target)
	}
	if p.Since != nil {
		parts = append(parts, "finished since "+p.Since.UTC().Format(time.RFC3339))
	}
	if p.Until != nil {
		parts = append(parts, "finished before "+p.Until.UTC().Format(time.RFC3339))
	}
	if len(parts) == 0 {
		return "all"
	}
	return strings.Join(parts, ", ")
}

// idList is a repeatable flag of change ids; each value may be a
// comma-separated list.
type idList []int64

func (l *idList) String() string {
	if l == nil {
		return ""
	}
	s := make([]string, len(*l))
	for i, id := range *l {
		s[i] = strconv.FormatInt(id, 10)
	}
	return strings.Join(s, ",")
}

func (l *idList) Set(v string) error {
	for part := range strings.SplitSeq(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		id, err := strconv.ParseInt(part, 10, 64)
		if err != nil || id <= 0 {
			return fmt.Errorf("%q is not a change id (a positive integer)", part)
		}
		*l = append(*l, id)
	}
	return nil
}

// parseTimeFlag reads an RFC 3339 time, a date (midnight UTC) or a
// duration meaning that long before now. Empty means no bound.
func parseTimeFlag(name, v string, now time.Time) (*time.Time, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return nil, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return &t, nil
	}
	if t, err := time.Parse(time.DateOnly, v); err == nil {
		return &t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		t := now.Add(-d)
		return &t, nil
	}
	return nil, fmt.Errorf("requeue: %s: %q is not an RFC 3339 time (2025-01-31T08:00:00Z), a date (2025-01-31) or a duration ago (90m)", name, v)
}

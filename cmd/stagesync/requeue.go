package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/stagesync/stagesync/db"
)

func cmdRequeue(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	fs := newFlagSet(ctx, "requeue", stdout)
	dbURL := fs.String("database-url", "", "PostgreSQL URL (default $DATABASE_URL, else the PG* variables as psql uses them)")
	var ids idList
	fs.Var(&ids, "id", "change id to requeue; repeat the flag or give a comma-separated list")
	target := fs.String("target", "", "only changes of this target")
	since := fs.String("since", "", "only changes finished at or after this time: RFC 3339 (2025-01-31T08:00:00Z), a date (2025-01-31, UTC) or a duration ago (90m)")
	until := fs.String("until", "", "only changes finished before this time (same forms as --since)")
	includeRejected := fs.Bool("include-rejected", false, "also requeue rejected changes (by default only dead ones)")
	all := fs.Bool("all", false, "requeue every dead change (required when no other filter is given; SQL: everything => true)")
	rest, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("requeue: unexpected arguments %q", rest)
	}
	now := time.Now()
	params := db.RequeueParams{IDs: ids, IncludeRejected: *includeRejected, Everything: *all}
	if *target != "" {
		params.Target = target
	}
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

	// stagesync.requeue says in a NOTICE when it left matching changes
	// because they are rejected; the connection collects it.
	var notices []*pgconn.Notice
	conn, err := connectCollectingNotices(ctx, databaseURL(*dbURL, getenv), &notices)
	if err != nil {
		return fmt.Errorf("requeue: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	moved, err := db.New().Requeue(ctx, conn, params)
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
	if _, err := fmt.Fprintf(stdout, "requeue: moved %d %s %s back to pending (%s)\n", moved, states, noun, describeRequeue(params)); err != nil {
		return err
	}
	for _, n := range notices {
		// The function's own hint names its SQL parameter; here the flag.
		if strings.HasPrefix(n.Message, "requeue: ") && strings.Contains(n.Message, "rejected") {
			if _, err := fmt.Fprintf(stdout, "%s; add --include-rejected to requeue rejected changes too\n", n.Message); err != nil {
				return err
			}
		}
	}
	if int(moved) < len(ids) {
		missing, err := db.New().ChangesMissing(ctx, conn, ids)
		if err != nil {
			return fmt.Errorf("requeue: look up the ids that moved nothing: %w", err)
		}
		if len(missing) > 0 {
			if _, err := fmt.Fprintf(stdout, "requeue: no change has id %s (never staged, or removed by retention)\n", joinIDs(missing, ", ")); err != nil {
				return err
			}
		}
	}
	return nil
}

// connectCollectingNotices opens one connection that appends the server's
// notices to *notices.
func connectCollectingNotices(ctx context.Context, url string, notices *[]*pgconn.Notice) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		// pgx's parse errors can echo the URL, password included.
		return nil, errors.New("parse database URL: invalid connection string (details withheld: may contain a password)")
	}
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { *notices = append(*notices, n) }
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to database %s:%d/%s: %w", cfg.Host, cfg.Port, cfg.Database, err)
	}
	return conn, nil
}

// RequeueFlags returns the flags of `stagesync requeue` that requeue the
// changes with the given ids: --id with the ids, and --include-rejected
// when any of them is rejected (without it requeue moves only dead
// changes), e.g. "--id 2,326 --include-rejected".
func RequeueFlags(ids []int64, anyRejected bool) string {
	flags := "--id " + joinIDs(ids, ",")
	if anyRejected {
		flags += " --include-rejected"
	}
	return flags
}

// RequeueSQL returns the SQL call that requeues the changes with the given
// ids, e.g. "SELECT stagesync.requeue(ids => ARRAY[2, 326],
// include_rejected => true)".
func RequeueSQL(ids []int64, anyRejected bool) string {
	call := "SELECT stagesync.requeue(ids => ARRAY[" + joinIDs(ids, ", ") + "]"
	if anyRejected {
		call += ", include_rejected => true"
	}
	return call + ")"
}

// RequeueHint returns the command that requeues one dead letter, as this
// binary was run: a dead change needs only its id, a rejected one also
// --include-rejected.
func RequeueHint(id int64, status string) string {
	return self + " requeue " + RequeueFlags([]int64{id}, status == "rejected")
}

func joinIDs(ids []int64, sep string) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.FormatInt(id, 10)
	}
	return strings.Join(s, sep)
}

// describeRequeue says which filters were applied, for the confirmation.
func describeRequeue(p db.RequeueParams) string {
	var parts []string
	if len(p.IDs) > 0 {
		parts = append(parts, "ids "+joinIDs(p.IDs, ","))
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

// Command stagesync applies changes staged in PostgreSQL to remote REST APIs
// that guard resources with ETags. Subcommands: migrate, run, status,
// history, plan, check, targets, requeue, demo, simulate.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/stagesync/stagesync/db"
)

type command struct {
	summary string
	// usage is the synopsis after "stagesync".
	usage string
	// about says what the subcommand does, for -h.
	about string
	// examples are command lines (after "stagesync ") with an optional
	// "  # comment", for -h.
	examples []string
	run      func(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error
}

// commands is set in init: the subcommands' flag sets read it for their
// help, which a package-level initializer could not allow (a cycle).
var commands map[string]command

func init() {
	commands = map[string]command{
		"check": {
			summary: "validate a config and probe each target without writing (exit 1 on a failure)",
			usage:   "check [--config stagesync.yaml] [--resource ID] [--database-url URL]",
			about: "Validates the config, confirms the database is migrated and the targets registered, and probes\n" +
				"each target with GET requests only: the base URL answers, the credential is accepted, a GET of an\n" +
				"item returns an ETag, the batch ETag endpoint answers. Prints a table; exits 1 if anything failed.",
			examples: []string{
				"check --config stagesync.yaml",
				"check --config stagesync.yaml --resource territory=ACC-1042   # probe this item of target territory",
			},
			run: cmdCheck,
		},
		"demo": {
			summary: "run a self-contained demo: simulator, seeded CRM workload, drain, report",
			usage:   "demo [--changes 500] [--database-url URL] [--demo-db stagesync_demo] [--drop]",
			about: "Runs the simulator, a simulated CRM and the processor in one process against a fresh database,\n" +
				"drains the workload with a progress bar and prints a report.",
			examples: []string{
				"demo",
				"demo --changes 5000 --latency 5ms --drop",
			},
			run: cmdDemo,
		},
		"history": {
			summary: "show everything that happened to one change or one resource",
			usage:   "history (--change N | [--target T] --resource ID) [--json] [--database-url URL]",
			about: "Prints a timeline: the staged row(s), every request (method, If-Match, status, ETag, duration,\n" +
				"outcome), every merge with its per-field decisions, and how each change ended. The same as\n" +
				"SELECT * FROM stagesync.change_history(N) or stagesync.resource_history(target, id).",
			examples: []string{
				"history --change 1042",
				"history --target territory --resource ACC-1042",
				"history --resource ACC-1042 --json | jq '.events[] | select(.event == \"merge\")'",
			},
			run: cmdHistory,
		},
		"migrate": {
			summary: "apply (up), roll back (down) or list (status) the schema",
			usage:   "migrate up|down|status [--config FILE] [--database-url URL]",
			about: "up applies River's and stagesync's migrations and says what it applied; again is a no-op.\n" +
				"With --config it also registers the config's targets, so the upstream can stage changes\n" +
				"before the first `run`. down removes both schemas (the roles stay). status lists them.",
			examples: []string{
				"migrate up",
				"migrate up --config stagesync.yaml --database-url postgres://stagesync@db:5432/crm",
				"migrate status",
			},
			run: cmdMigrate,
		},
		"plan": {
			summary: "show the next requests for open changes, without sending anything",
			usage:   "plan [--config stagesync.yaml] [--target T] [--limit N] [--json] [--database-url URL]",
			about: "Shows, resource by resource (oldest open change first), what the next `run` would send: method,\n" +
				"URL, If-Match (or what comes first: a lookup when no ETag is stored, the resolution of an\n" +
				"in-doubt write) and the body after coalescing and per-field ordering, and which changes end\n" +
				"without a request (noop: already on the remote, superseded by a newer change). It runs the\n" +
				"processor's own decisions in a read-only transaction: nothing is sent, no row changes.",
			examples: []string{
				"plan --config stagesync.yaml",
				"plan --config stagesync.yaml --target territory --limit 10",
				"plan --config stagesync.yaml --json | jq '.[] | select(.method == \"PATCH\") | .body'",
			},
			run: cmdPlan,
		},
		"requeue": {
			summary: "move dead (or rejected) changes back to pending",
			usage:   "requeue [--id N[,N…]]… [--target NAME] [--since T] [--until T] [--include-rejected] [--all]",
			about: "Moves dead (and with --include-rejected, rejected) changes back to pending with a fresh attempt\n" +
				"budget, via SELECT stagesync.requeue(...); the call is recorded in stagesync.admin_actions. With\n" +
				"no filter it refuses unless --all is given.",
			examples: []string{
				"requeue --id 9921",
				"requeue --target territory --since 2h",
			},
			run: cmdRequeue,
		},
		"run": {
			summary: "apply staged changes to the configured targets (the main job)",
			usage:   "run [--config stagesync.yaml] [--listen ADDR] [--database-url URL] [--migrate]",
			about: "Registers the config's targets and applies staged changes until SIGTERM or SIGINT; serves\n" +
				"/metrics, /healthz, /readyz and the status page on --listen.",
			examples: []string{
				"run --config stagesync.yaml",
				"run --config stagesync.yaml --listen 127.0.0.1:9090 --log-format json",
			},
			run: cmdRun,
		},
		"simulate": {
			summary: "serve an ETag-enforcing REST API with fault injection (for tests and demos)",
			usage:   "simulate [--listen 127.0.0.1:8080] [--item-prefix /items] [flags]",
			about: "Serves an ETag-enforcing REST API of JSON resources at PREFIX/ID (GET, PATCH, PUT, DELETE; PUT with\n" +
				"If-None-Match: * creates), a batch ETag lookup at GET PREFIX?ids=a,b&fields=id,etag, with --batch an\n" +
				"OData JSON $batch endpoint, and the inspection endpoints /_sim/state, /_sim/requests, /_sim/stats and\n" +
				"/_sim/history?id=ID. Rates are drawn from --seed; misbehave flags imitate odd remotes.",
			examples: []string{
				"simulate --listen 127.0.0.1:8080 --item-prefix /assignments --seed-resources 200 --other-users-rate 5",
			},
			run: cmdSimulate,
		},
		"status": {
			summary: "show backlog, health, conflict rate, hot resources and dead letters (--watch, --json)",
			usage:   "status [--json | --watch [--interval 2s] [--until-drained [--wait-for-work 1m]]] [--dead N] [--database-url URL]",
			about: "Shows the backlog per target, each target's health (last success and error, consecutive\n" +
				"failures, pause, in-flight limit) and the live processes, the last hour's requests and\n" +
				"conflicts, the hot resources of the last 24 hours and the latest dead letters.",
			examples: []string{
				"status",
				"status --json | jq .totals",
				"status --watch --until-drained --interval 1s   # exits 0 once the work that appears has drained",
			},
			run: cmdStatus,
		},
		"targets": {
			summary: "register the config's targets in the database (targets sync)",
			usage:   "targets sync [--config stagesync.yaml] [--database-url URL]",
			about: "sync writes the config's targets to stagesync.targets, as `run` does at start, so the\n" +
				"upstream can stage changes for them before any processor has run.",
			examples: []string{
				"targets sync --config stagesync.yaml",
			},
			run: cmdTargets,
		},
	}
}

// self is how the user ran this binary, for the commands it prints.
var self = "stagesync"

func main() {
	self = programName(os.Args[0], os.TempDir())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return // -h: the help went to stdout
		}
		fmt.Fprintf(os.Stderr, "%s: %v\n", filepath.Base(self), err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		if len(args) == 2 && args[0] == "help" {
			return run(ctx, []string{args[1], "-h"}, getenv, stdout)
		}
		usage(stdout)
		if len(args) == 0 {
			return errors.New("a subcommand is required")
		}
		return nil
	}
	cmd, ok := commands[args[0]]
	if !ok {
		usage(stdout)
		return fmt.Errorf("unknown subcommand %q", args[0])
	}
	var helped atomic.Bool
	err := cmd.run(context.WithValue(ctx, helpPrintedKey{}, &helped), args[1:], getenv, stdout)
	if errors.Is(err, flag.ErrHelp) {
		if !helped.Load() {
			// A subcommand whose flag set is not built by newFlagSet printed
			// (at most) its flags; add what it does and examples.
			printAbout(stdout, args[0], cmd)
		}
		return nil
	}
	return explainError(err)
}

func usage(w io.Writer) {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	fmt.Fprintf(&b, "usage: %s <subcommand> [flags]\n\nsubcommands:\n", self)
	for _, n := range names {
		fmt.Fprintf(&b, "  %-9s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(&b, "\nRun '%s <subcommand> -h' for what it does, its flags and examples.\n", self)
	io.WriteString(w, b.String()) //nolint:errcheck // best-effort help text
}

// helpPrintedKey marks, in the context a subcommand runs with, that its
// newFlagSet printed the whole help.
type helpPrintedKey struct{}

// newFlagSet is a subcommand's flag set: -h prints the usage line, what the
// subcommand does, its flags and examples to stdout (and `run` then
// returns nil, so the exit status is 0).
func newFlagSet(ctx context.Context, name string, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.Usage = func() {
		c := commands[name]
		fmt.Fprintf(stdout, "usage: %s %s\n\n%s\n\nflags:\n", self, c.usage, c.about)
		fs.PrintDefaults()
		printExamples(stdout, c)
		if p, ok := ctx.Value(helpPrintedKey{}).(*atomic.Bool); ok {
			p.Store(true)
		}
	}
	return fs
}

func printAbout(w io.Writer, name string, c command) {
	fmt.Fprintf(w, "\nusage: %s %s\n\n%s\n", self, c.usage, c.about)
	printExamples(w, c)
}

func printExamples(w io.Writer, c command) {
	if len(c.examples) == 0 {
		return
	}
	fmt.Fprintf(w, "\nexamples:\n")
	for _, e := range c.examples {
		fmt.Fprintf(w, "  %s %s\n", self, e)
	}
}

// parseFlags parses args allowing flags after positional arguments
// (`migrate up --database-url URL`), which the flag package alone stops at.
// Everything after "--" is positional. It returns the positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// databaseURL resolves the database URL: the flag, else DATABASE_URL, else
// the standard PG* variables and libpq's defaults, as psql uses them.
func databaseURL(flagValue string, getenv func(string) string) string {
	return resolveDatabase(flagValue, "", getenv).url
}

// dbSource is the database a subcommand connects to and where that choice
// came from, for error messages.
type dbSource struct {
	url, from string
}

// resolveDatabase picks the database: --database-url, the config's
// database_url, DATABASE_URL, else the PG* variables with libpq's defaults
// for the rest (host: the local socket directory or localhost; user: the OS
// user; database: the user's name), exactly as psql does.
func resolveDatabase(flagValue, configValue string, getenv func(string) string) dbSource {
	switch {
	case flagValue != "":
		return dbSource{flagValue, "--database-url"}
	case configValue != "":
		return dbSource{configValue, "database_url of the config"}
	case getenv("DATABASE_URL") != "":
		return dbSource{getenv("DATABASE_URL"), "DATABASE_URL"}
	}
	return dbSource{pgEnvConnString(getenv), "PG* variables and libpq defaults, as psql (DATABASE_URL is not set)"}
}

// pgEnvKeywords maps the libpq environment variables to connection-string
// keywords. pgx reads the process environment itself; passing them through
// getenv as well makes the choice visible to (and injectable by) callers.
var pgEnvKeywords = []struct{ env, keyword string }{
	{"PGHOST", "host"}, {"PGHOSTADDR", "hostaddr"}, {"PGPORT", "port"}, {"PGDATABASE", "dbname"},
	{"PGUSER", "user"}, {"PGPASSWORD", "password"}, {"PGPASSFILE", "passfile"},
	{"PGSERVICE", "service"}, {"PGSERVICEFILE", "servicefile"}, {"PGSSLMODE", "sslmode"},
	{"PGSSLROOTCERT", "sslrootcert"}, {"PGSSLCERT", "sslcert"}, {"PGSSLKEY", "sslkey"},
	{"PGAPPNAME", "application_name"}, {"PGCONNECT_TIMEOUT", "connect_timeout"},
	{"PGOPTIONS", "options"}, {"PGTZ", "timezone"}, {"PGTARGETSESSIONATTRS", "target_session_attrs"},
}

// pgEnvConnString is a keyword=value connection string of the PG* variables
// that are set; empty when none is (pgx then applies libpq's defaults).
func pgEnvConnString(getenv func(string) string) string {
	var parts []string
	for _, kv := range pgEnvKeywords {
		if v := getenv(kv.env); v != "" {
			parts = append(parts, kv.keyword+"='"+strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v)+"'")
		}
	}
	return strings.Join(parts, " ")
}

// connect opens a pool on the database and checks that every migration of
// this binary is applied, so a subcommand on a database never migrated says
// what to do instead of failing on a missing relation.
func connect(ctx context.Context, src dbSource, maxConns int32) (*pgxpool.Pool, error) {
	pool, err := db.NewPool(ctx, src.url, maxConns)
	if err != nil {
		return nil, fmt.Errorf("%w (database from %s)", err, src.from)
	}
	if err := requireMigrated(ctx, pool); err != nil {
		pool.Close()
		return nil, err
	}
	return pool, nil
}

// requireMigrated fails with the command to run when the database lacks
// River's or stagesync's migrations.
func requireMigrated(ctx context.Context, pool *pgxpool.Pool) error {
	current, err := db.MigrationsCurrent(ctx, pool)
	if err != nil {
		return fmt.Errorf("check the database's migrations: %w", err)
	}
	if !current {
		c := pool.Config().ConnConfig
		return fmt.Errorf("database %s:%d/%s is not migrated (or lacks this version's migrations): run `%s migrate up`",
			c.Host, c.Port, c.Database, self)
	}
	return nil
}

// explainError adds what to do to the errors of a database that is not (or
// not fully) migrated, for any subcommand that did not check first.
func explainError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && strings.Contains(pgErr.Message, "stagesync") {
		switch pgErr.Code {
		case "42P01", "3F000", "42883": // undefined table, schema, function
			return fmt.Errorf("%w; the database is not migrated (or lacks this version's migrations): run `%s migrate up`", err, self)
		}
	}
	return err
}

// programName is how to run this binary again, for printed commands: the
// bare name when it was found on PATH, else its absolute path; `go run`'s
// temporary build becomes `go run ./cmd/stagesync`.
func programName(arg0, tmpDir string) string {
	if arg0 == "" {
		return "stagesync"
	}
	if !strings.ContainsRune(arg0, filepath.Separator) {
		return shellQuote(arg0)
	}
	abs, err := filepath.Abs(arg0)
	if err != nil {
		return shellQuote(arg0)
	}
	if rel, err := filepath.Rel(tmpDir, abs); err == nil && strings.HasPrefix(rel, "go-build") {
		return "go run ./cmd/stagesync"
	}
	return shellQuote(abs)
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=@,+%") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

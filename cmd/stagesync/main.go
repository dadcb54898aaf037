// Command stagesync applies changes staged in PostgreSQL to remote REST APIs
// that guard resources with ETags. Subcommands: migrate, run, status,
// requeue, demo, simulate.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/stagesync/stagesync/db"
)

type command struct {
	summary string
	run     func(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error
}

var commands = map[string]command{
	"demo":     {"run a self-contained demo: simulator, seeded CRM workload, drain, report", cmdDemo},
	"migrate":  {"apply (up), roll back (down) or list (status) the schema", cmdMigrate},
	"requeue":  {"move dead (or rejected) changes back to pending", cmdRequeue},
	"run":      {"apply staged changes to the configured targets (the main job)", cmdRun},
	"simulate": {"serve an ETag-enforcing REST API with fault injection (for tests and demos)", cmdSimulate},
	"status":   {"show backlog, in-flight work, conflict rate and dead letters (--watch, --json)", cmdStatus},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "stagesync: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
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
	return cmd.run(ctx, args[1:], getenv, stdout)
}

func usage(w io.Writer) {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString("usage: stagesync <subcommand> [flags]\n\nsubcommands:\n")
	for _, n := range names {
		fmt.Fprintf(&b, "  %-9s %s\n", n, commands[n].summary)
	}
	b.WriteString("\nRun 'stagesync <subcommand> -h' for its flags.\n")
	io.WriteString(w, b.String()) //nolint:errcheck // best-effort help text
}

// databaseURL resolves the database URL: the flag, else DATABASE_URL, else
// the local default.
func databaseURL(flagValue string, getenv func(string) string) string {
	if flagValue != "" {
		return flagValue
	}
	if u := getenv("DATABASE_URL"); u != "" {
		return u
	}
	return db.DefaultURL
}

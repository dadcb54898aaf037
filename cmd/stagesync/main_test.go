package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/dbtest"
)

// TestMain lets a test run the real main (exit status, stdout, stderr) by
// executing the test binary with STAGESYNC_RUN_MAIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("STAGESYNC_RUN_MAIN") == "1" {
		os.Args = append([]string{os.Args[0]}, strings.Fields(os.Getenv("STAGESYNC_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runMain runs the binary's main with args and env; it returns stdout,
// stderr and the exit status.
func runMain(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0])
	cmd.Env = append([]string{"STAGESYNC_RUN_MAIN=1", "STAGESYNC_ARGS=" + strings.Join(args, " "), "PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return o.String(), e.String(), code
}

// emptyDatabase creates a database that was never migrated.
func emptyDatabase(t *testing.T) string {
	t.Helper()
	name := "stagesync_empty_" + randomSuffix()
	admin, err := pgx.Connect(t.Context(), dbtest.AdminURL())
	require.NoError(t, err)
	defer admin.Close(context.WithoutCancel(t.Context()))
	_, err = admin.Exec(t.Context(), "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 30*time.Second)
		defer cancel()
		require.NoError(t, dropTestDatabase(ctx, name))
	})
	u, err := url.Parse(dbtest.AdminURL())
	require.NoError(t, err)
	u.Path = "/" + name
	return u.String()
}

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stagesync.yaml")
	require.NoError(t, os.WriteFile(p, []byte(text), 0o600))
	return p
}

func TestHelpGoesToStdoutAndExitsZero(t *testing.T) {
	t.Parallel()
	for name, c := range commands {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			stdout, stderr, code := runMain(t, nil, name, "-h")
			require.Equal(t, 0, code, "exit status of %s -h; stderr:\n%s", name, stderr)
			require.Contains(t, stdout, "usage: ")
			require.Contains(t, stdout, c.usage)
			require.Contains(t, stdout, c.about)
			require.Contains(t, stdout, "\nexamples:\n")
			for _, e := range c.examples {
				require.Contains(t, stdout, " "+e+"\n")
			}
			require.Contains(t, stdout, "\nflags:\n")
			require.Empty(t, stderr)
		})
	}
	stdout, _, code := runMain(t, nil, "--help")
	require.Equal(t, 0, code)
	require.Contains(t, stdout, "  history   show everything that happened to one change or one resource\n")
	stdout, _, code = runMain(t, nil, "help", "status")
	require.Equal(t, 0, code)
	require.Contains(t, stdout, "usage: ")
	require.Contains(t, stdout, commands["status"].about)
	_, stderr, code := runMain(t, nil, "nosuch")
	require.Equal(t, 1, code)
	require.Contains(t, stderr, `unknown subcommand "nosuch"`)
}

func TestParseFlagsAcceptsFlagsAfterPositionalArguments(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args    []string
		wantPos []string
		wantURL string
		wantErr string
	}{
		{[]string{"up", "--database-url", "postgres://x"}, []string{"up"}, "postgres://x", ""},
		{[]string{"--database-url=postgres://y", "up"}, []string{"up"}, "postgres://y", ""},
		{[]string{"sync", "--database-url", "postgres://z", "extra"}, []string{"sync", "extra"}, "postgres://z", ""},
		{[]string{"up", "--", "--database-url", "q"}, []string{"up", "--database-url", "q"}, "", ""},
		{[]string{"up", "--bogus"}, nil, "", "flag provided but not defined: -bogus"},
	}
	for _, tt := range tests {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		u := fs.String("database-url", "", "")
		pos, err := parseFlags(fs, tt.args)
		if tt.wantErr != "" {
			require.EqualError(t, err, tt.wantErr)
			continue
		}
		require.NoError(t, err, "%q", tt.args)
		require.Equal(t, tt.wantPos, pos, "%q", tt.args)
		require.Equal(t, tt.wantURL, *u, "%q", tt.args)
	}
}

func TestMigrateUpSaysWhatItAppliedAndRegistersTargets(t *testing.T) {
	t.Parallel()
	dbURL := emptyDatabase(t)
	cfg := writeConfig(t, "targets:\n  territory:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n")
	getenv := func(string) string { return "" }

	var out bytes.Buffer
	// Flags after the action, as people type them.
	require.NoError(t, run(t.Context(), []string{"migrate", "up", "--database-url", dbURL, "--config", cfg}, getenv, &out))
	pool, err := db.NewPool(t.Context(), dbURL, 2)
	require.NoError(t, err)
	defer pool.Close()
	states, err := db.MigrationStatus(t.Context(), pool)
	require.NoError(t, err)
	var river, ours []db.MigrationState
	for _, s := range states {
		require.True(t, s.Applied)
		if s.Component == "river" {
			river = append(river, s)
		} else {
			ours = append(ours, s)
		}
	}
	want := "migrate: applied " + itoa(int64(len(states))) + " migrations (River 1–" + itoa(river[len(river)-1].Version) +
		", stagesync 00001_schema.sql … " + filepath.Base(ours[len(ours)-1].Name) + "); the schema is current (River version " +
		itoa(river[len(river)-1].Version) + ", stagesync version " + itoa(ours[len(ours)-1].Version) + ")\n"
	require.True(t, strings.HasPrefix(out.String(), want), "got %q; want prefix %q", out.String(), want)
	require.Contains(t, out.String(), "targets: registered 1 target; the upstream may stage changes for territory now\n")
	require.Contains(t, out.String(), "  territory  new  PATCH http://127.0.0.1:1/a/{id}\n")
	// The upstream can stage at once: the target exists before any run.
	_, err = pool.Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'a', '{"x": 1}')`)
	require.NoError(t, err)

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"migrate", "up", "--database-url", dbURL}, getenv, &out))
	require.Equal(t, "migrate: the schema was already current (River version "+itoa(river[len(river)-1].Version)+", stagesync version "+
		itoa(ours[len(ours)-1].Version)+"); nothing to apply\n", out.String())

	err = run(t.Context(), []string{"migrate", "status", "--config", cfg, "--database-url", dbURL}, getenv, &out)
	require.EqualError(t, err, "migrate: --config goes with up only")
	err = run(t.Context(), []string{"migrate", "--database-url", dbURL}, getenv, &out)
	require.EqualError(t, err, `migrate: want exactly one of up, down, status; got [] (see stagesync migrate -h)`)
}

func TestEverySubcommandOnANeverMigratedDatabaseSaysToMigrate(t *testing.T) {
	t.Parallel()
	dbURL := emptyDatabase(t)
	cfg := writeConfig(t, "targets:\n  territory:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n")
	name := strings.TrimPrefix(mustParseURL(t, dbURL).Path, "/")
	want := "/" + name + " is not migrated (or lacks this version's migrations): run `stagesync migrate up`"
	getenv := func(string) string { return "" }
	for _, args := range [][]string{
		{"status"},
		{"status", "--watch", "--until-drained"},
		{"history", "--change", "1"},
		{"targets", "sync", "--config", cfg},
		{"run", "--config", cfg, "--listen", "127.0.0.1:0"},
	} {
		var out bytes.Buffer
		err := run(t.Context(), append(args, "--database-url", dbURL), getenv, &out)
		require.ErrorContains(t, err, want, "%v", args)
	}
	// requeue checks nothing first; its SQL error gets the advice.
	var out bytes.Buffer
	err := run(t.Context(), []string{"requeue", "--all", "--database-url", dbURL}, getenv, &out)
	require.ErrorContains(t, err, "run `stagesync migrate up`")
	// check reports it in its table, and fails.
	out.Reset()
	err = run(t.Context(), []string{"check", "--config", cfg, "--database-url", dbURL}, getenv, &out)
	require.EqualError(t, err, "check: 2 of 6 checks failed")
	require.Regexp(t, `\n- +database +FAILED +database [^\n]+ is not migrated`, out.String())
	require.NotContains(t, out.String(), "registered", "no registration check without a schema")

	// run refuses before it listens or logs anything.
	logs := &lockedBuffer{}
	c, err := processor.LoadConfig(cfg, getenv)
	require.NoError(t, err)
	err = serve(t.Context(), serveOpts{cfg: c, databaseURL: dbURL, logger: slog.New(slog.NewTextHandler(logs, nil)), stdout: io.Discard})
	require.ErrorContains(t, err, want+" (or start with --migrate)")
	require.NotContains(t, logs.String(), "serving")
	require.Empty(t, logs.String())

	// The binary prints it and exits 1.
	_, stderr, code := runMain(t, nil, "status", "--database-url", dbURL)
	require.Equal(t, 1, code)
	require.Contains(t, stderr, "is not migrated (or lacks this version's migrations): run `go run ./cmd/stagesync migrate up`",
		"a test binary runs from go's build cache: the advice names go run")
}

func mustParseURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	require.NoError(t, err)
	return u
}

// With DATABASE_URL unset, the PG* variables choose the database, as they
// do for psql.
func TestDatabaseFromPGVariablesLikePsql(t *testing.T) {
	t.Parallel()
	f := newStatusFixture(t)
	u := mustParseURL(t, f.url)
	pw, _ := u.User.Password()
	env := map[string]string{
		"PGHOST": u.Hostname(), "PGPORT": u.Port(), "PGUSER": u.User.Username(), "PGPASSWORD": pw,
		"PGDATABASE": strings.TrimPrefix(u.Path, "/"), "PGSSLMODE": u.Query().Get("sslmode"), "PGTZ": "UTC",
	}
	getenv := func(k string) string { return env[k] }
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"status", "--json"}, getenv, &out))
	require.Contains(t, out.String(), `"pending": 4,`, "the fixture's figures, read from the PG* database")

	env["PGDATABASE"] = "stagesync_no_such_db"
	err := run(t.Context(), []string{"status"}, getenv, &out)
	require.ErrorContains(t, err, "stagesync_no_such_db")
	require.ErrorContains(t, err, "(database from PG* variables and libpq defaults, as psql (DATABASE_URL is not set))")

	// DATABASE_URL wins over PG*, and the flag over both.
	env["DATABASE_URL"] = f.url
	require.NoError(t, run(t.Context(), []string{"status"}, getenv, &out))
	require.Equal(t, dbSource{"postgres://flag", "--database-url"}, resolveDatabase("postgres://flag", "postgres://cfg", getenv))
	require.Equal(t, dbSource{"postgres://cfg", "database_url of the config"}, resolveDatabase("", "postgres://cfg", getenv))
}

func TestPGEnvConnStringQuotesValues(t *testing.T) {
	t.Parallel()
	env := map[string]string{"PGHOST": "/var/run/postgresql", "PGUSER": "o'brien", "PGPASSWORD": `a b\c`, "PGDATABASE": "crm"}
	got := pgEnvConnString(func(k string) string { return env[k] })
	require.Equal(t, `host='/var/run/postgresql' dbname='crm' user='o\'brien' password='a b\\c'`, got)
	require.Empty(t, pgEnvConnString(func(string) string { return "" }), "no PG* variable: libpq's defaults")
}

func TestProgramNameIsHowToRunTheBinaryAgain(t *testing.T) {
	t.Parallel()
	wd, err := os.Getwd()
	require.NoError(t, err)
	for arg0, want := range map[string]string{
		"stagesync":                           "stagesync",
		"":                                    "stagesync",
		"bin/stagesync":                       filepath.Join(wd, "bin/stagesync"),
		"/opt/stage sync/stagesync":           "'/opt/stage sync/stagesync'",
		"/tmp/go-build123/b001/exe/stagesync": "go run ./cmd/stagesync",
	} {
		require.Equal(t, want, programName(arg0, "/tmp"), "programName(%q)", arg0)
	}
}

func TestTargetsSync(t *testing.T) {
	t.Parallel()
	dbURL, pool := testDatabase(t)
	insertTarget(t, pool, "ledger")
	cfg := writeConfig(t, `targets:
  territory:
    base_url: http://127.0.0.1:1
    item_path: /a/{id}
  erp:
    base_url: http://127.0.0.1:2
    item_path: /items/{id}
    update_method: PUT
`)
	getenv := func(string) string { return "" }
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg, "--database-url", dbURL}, getenv, &out))
	require.Equal(t, "targets: registered 2 targets; the upstream may stage changes for erp and territory now\n"+
		"  erp        new                                              PUT http://127.0.0.1:2/items/{id}\n"+
		"  ledger     in the database, not in this config: left as is  PATCH http://127.0.0.1:1/items/{id}\n"+
		"  territory  new                                              PATCH http://127.0.0.1:1/a/{id}\n", out.String())
	var settings string
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT settings->>'alert' FROM stagesync.targets WHERE name = 'erp'`).Scan(&settings))
	require.JSONEq(t, `{"conflict_rate": 0.05, "window": "15m0s"}`, settings)

	out.Reset()
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg, "--database-url", dbURL}, getenv, &out))
	require.Contains(t, out.String(), "  erp        unchanged  ")
	cfg2 := writeConfig(t, "targets:\n  erp:\n    base_url: http://127.0.0.1:3\n    item_path: /items/{id}\n")
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"targets", "sync", "--config", cfg2, "--database-url", dbURL}, getenv, &out))
	require.Contains(t, out.String(), "  erp        updated  ")
	require.Contains(t, out.String(), "  territory  in the database, not in this config: left as is  ")

	err := run(t.Context(), []string{"targets", "--config", cfg, "--database-url", dbURL}, getenv, &out)
	require.EqualError(t, err, "targets: want the action sync; got [] (see stagesync targets -h)")
	bad := writeConfig(t, "targets:\n  erp:\n    base_url: http://x\n    item_path: /i/{id}\n    batch_etag_paht: /i\n")
	err = run(t.Context(), []string{"targets", "sync", "--config", bad, "--database-url", dbURL}, getenv, &out)
	require.EqualError(t, err, "config "+bad+": line 5: targets.erp.batch_etag_paht: unknown key (did you mean batch_etag_path?)")
}

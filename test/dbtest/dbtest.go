// Package dbtest gives each test its own PostgreSQL database, cloned from a
// migrated template, so tests run in parallel and repeatedly on one server.
package dbtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/migrations"
)

var (
	templateMu   sync.Mutex
	templateName string
)

// template returns the migrated template's name, building it on first use
// or again when rebuild is set (a parallel run of another schema version
// dropped it).
func template(ctx context.Context, rebuild bool) (string, error) {
	templateMu.Lock()
	defer templateMu.Unlock()
	if templateName != "" && !rebuild {
		return templateName, nil
	}
	name, err := ensureTemplate(ctx)
	if err != nil {
		return "", err
	}
	templateName = name
	return name, nil
}

// AdminURL is the server's maintenance database: DATABASE_URL if set
// (`make db-up` exports the one it found or started), else the local default.
func AdminURL() string {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		return u
	}
	return db.DefaultURL
}

// NewDatabase creates an empty-of-data, fully migrated database for t and
// returns its URL. It is dropped when the test ends.
func NewDatabase(t testing.TB) string {
	t.Helper()
	ctx := t.Context()
	tpl, err := template(context.WithoutCancel(ctx), false)
	if err != nil {
		t.Fatalf("prepare template database: %v", err)
	}

	name := "stagesync_test_" + randomHex(8)
	admin, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		t.Fatalf("connect to %s: %v", redact(AdminURL()), err)
	}
	defer admin.Close(context.WithoutCancel(ctx))
	err = createFromTemplate(ctx, admin, name, tpl)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "3D000" {
		// The template was dropped as stale by a test run of another
		// schema version on the same server: build it again.
		if tpl, err = template(context.WithoutCancel(ctx), true); err == nil {
			err = createFromTemplate(ctx, admin, name, tpl)
		}
	}
	if err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		// t.Context is already cancelled when cleanups run.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, AdminURL())
		if err != nil {
			t.Errorf("connect to drop %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Errorf("drop test database %s: %v", name, err)
		}
	})
	return withDatabase(AdminURL(), name)
}

// InTimeZone returns the database URL with its sessions' time zone set, for
// tests whose figures depend on it (hour buckets, formatted times).
func InTimeZone(t testing.TB, rawURL, tz string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatalf("parse database URL: %s", redactedErr(err))
	}
	q := u.Query()
	q.Set("timezone", tz)
	u.RawQuery = q.Encode()
	return u.String()
}

// NewPool is NewDatabase plus a pool on it, closed before the drop.
func NewPool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	pool, err := db.NewPool(t.Context(), NewDatabase(t), 20)
	if err != nil {
		t.Fatalf("open test pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// NewEmptyDatabase creates a database with no migrations applied, for tests
// of the migrations themselves.
func NewEmptyDatabase(t testing.TB) string {
	t.Helper()
	ctx := t.Context()
	name := "stagesync_test_" + randomHex(8)
	admin, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		t.Fatalf("connect to %s: %v", redact(AdminURL()), err)
	}
	defer admin.Close(context.WithoutCancel(ctx))
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create empty database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, AdminURL()); err == nil {
			defer c.Close(ctx)
			if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
				t.Errorf("drop %s: %v", name, err)
			}
		}
	})
	return withDatabase(AdminURL(), name)
}

// ensureTemplate builds stagesync_tpl_<hash> once per server and schema
// version. The hash covers our migrations and River's, so a schema change
// gets a new template instead of reusing a stale one. It is built under a
// tmp_ name and renamed when complete, so no half-built template is ever
// visible, and an advisory lock keeps parallel test binaries from building it
// twice.
func ensureTemplate(ctx context.Context) (string, error) {
	hash, err := schemaHash()
	if err != nil {
		return "", err
	}
	name := "stagesync_tpl_" + hash
	admin, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", redact(AdminURL()), err)
	}
	defer admin.Close(ctx)

	if _, err := admin.Exec(ctx, "SELECT pg_advisory_lock(hashtextextended($1, 0))", name); err != nil {
		return "", fmt.Errorf("lock template build: %w", err)
	}
	defer admin.Exec(ctx, "SELECT pg_advisory_unlock(hashtextextended($1, 0))", name) //nolint:errcheck // the session ends right after

	var exists bool
	if err := admin.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name).Scan(&exists); err != nil {
		return "", fmt.Errorf("look up template: %w", err)
	}
	if exists {
		return name, nil
	}

	tmp := "tmp_" + name + "_" + randomHex(4)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{tmp}.Sanitize()); err != nil {
		return "", fmt.Errorf("create %s: %w", tmp, err)
	}
	pool, err := db.NewPool(ctx, withDatabase(AdminURL(), tmp), 4)
	if err != nil {
		return "", err
	}
	err = db.Migrate(ctx, pool, nil)
	pool.Close()
	if err != nil {
		return "", fmt.Errorf("migrate template: %w", err)
	}
	if _, err := admin.Exec(ctx, "ALTER DATABASE "+pgx.Identifier{tmp}.Sanitize()+" RENAME TO "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("rename template: %w", err)
	}
	// The build time lets dropStaleTemplates spare templates that a run of
	// another schema version (another branch) may be using right now.
	// COMMENT takes no parameters; the literal holds no quote.
	stamp := templateBuiltPrefix + time.Now().UTC().Format(time.RFC3339)
	if _, err := admin.Exec(ctx, "COMMENT ON DATABASE "+pgx.Identifier{name}.Sanitize()+" IS '"+stamp+"'"); err != nil {
		return "", fmt.Errorf("stamp template: %w", err)
	}
	dropStaleTemplates(ctx, admin, name)
	return name, nil
}

// templateBuiltPrefix starts a template's comment; the build time follows.
const templateBuiltPrefix = "stagesync test template built "

// staleTemplateAge is how long a template of another schema version is
// kept: a test run on another branch may be cloning it.
const staleTemplateAge = time.Hour

// dropStaleTemplates removes templates of other schema versions built over
// staleTemplateAge ago, so a developer's server does not collect one per
// migration edit. One still in use refuses the drop and is left for next
// time; a run that finds its template gone builds it again.
func dropStaleTemplates(ctx context.Context, admin *pgx.Conn, keep string) {
	rows, err := admin.Query(ctx, `
		SELECT d.datname FROM pg_database d
		LEFT JOIN pg_shdescription s ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass
		WHERE d.datname LIKE 'stagesync\_tpl\_%' AND d.datname <> $1
		  AND (s.description IS NULL OR s.description NOT LIKE $2 || '%'
		       OR substr(s.description, length($2) + 1)::timestamptz < now() - $3::interval)`,
		keep, templateBuiltPrefix, staleTemplateAge.String())
	if err != nil {
		return
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return
	}
	for _, n := range names {
		_, _ = admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{n}.Sanitize())
	}
}

// createFromTemplate retries while the template is briefly in use: CREATE
// DATABASE refuses a source with other sessions, and a parallel clone can
// overlap.
func createFromTemplate(ctx context.Context, admin *pgx.Conn, name, template string) error {
	stmt := "CREATE DATABASE " + pgx.Identifier{name}.Sanitize() + " TEMPLATE " + pgx.Identifier{template}.Sanitize()
	for attempt := 0; ; attempt++ {
		_, err := admin.Exec(ctx, stmt)
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "55006" || attempt == 50 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func schemaHash() (string, error) {
	h := sha256.New()
	err := fs.WalkDir(migrations.FS, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(migrations.FS, path)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\n%s\n", path, b)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash migrations: %w", err)
	}
	rm, err := rivermigrate.New(riverpgxv5.New(nil), nil)
	if err != nil {
		return "", fmt.Errorf("list river migrations: %w", err)
	}
	for _, m := range rm.AllVersions() {
		fmt.Fprintf(h, "river %d %s\n%s\n", m.Version, m.Name, m.SQLUp)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func withDatabase(rawURL, name string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		panic(fmt.Sprintf("dbtest: DATABASE_URL is not a URL: %v", redactedErr(err)))
	}
	u.Path = "/" + name
	return u.String()
}

func redact(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "(unparseable URL)"
	}
	return u.Redacted()
}

func redactedErr(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return "invalid URL"
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

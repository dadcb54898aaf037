package db_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/dbtest"
)

// testDB is a migrated database of one test, with the targets "territory",
// "billing" and "ledger" in place. Its sessions use Asia/Kathmandu (UTC+5:45),
// so a view that bucketed hours in the session's zone instead of UTC would
// put fixtures in the wrong hour and fail.
type testDB struct {
	URL  string
	Pool *pgxpool.Pool
}

func newTestDB(t *testing.T) testDB {
	t.Helper()
	u := dbtest.InTimeZone(t, dbtest.NewDatabase(t), "Asia/Kathmandu")
	pool, err := db.NewPool(t.Context(), u, 8)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	_, err = pool.Exec(t.Context(), `INSERT INTO stagesync.targets (name, base_url, item_path)
		VALUES ('territory', 'http://127.0.0.1:1', '/assignments/{id}'),
		       ('billing', 'http://127.0.0.1:1', '/accounts/{id}'),
		       ('ledger', 'http://127.0.0.1:1', '/entries/{id}')`)
	require.NoError(t, err)
	return testDB{URL: u, Pool: pool}
}

// conn opens a dedicated connection, closed when the test ends. With a role
// it runs SET ROLE first: privileges then are the role's, while session_user
// stays the login.
func (d testDB) conn(t *testing.T, role string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(t.Context(), d.URL)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(context.Background()) })
	if role != "" {
		_, err = c.Exec(t.Context(), "SET ROLE "+pgx.Identifier{role}.Sanitize())
		require.NoError(t, err)
	}
	return c
}

// change is a row of stagesync.changes as the tests write it as the owner;
// zero values get the defaults below.
type change struct {
	Target      string // "territory"
	ResourceID  string // "r1"
	Op          string // "update"
	Fields      string // {"name": "x"}, or {} for a delete
	Source      string // "crm"
	Status      string // "pending"
	Attempts    int
	LastError   string // NULL if empty
	AppliedETag string // NULL if empty
	CreatedAt   time.Time
	FinishedAt  time.Time // NULL if zero
}

func insertChange(t *testing.T, q db.DBTX, c change) int64 {
	t.Helper()
	if c.Target == "" {
		c.Target = "territory"
	}
	if c.ResourceID == "" {
		c.ResourceID = "r1"
	}
	if c.Op == "" {
		c.Op = "update"
	}
	if c.Fields == "" {
		c.Fields = `{"name": "x"}`
		if c.Op == "delete" {
			c.Fields = `{}`
		}
	}
	if c.Source == "" {
		c.Source = "crm"
	}
	if c.Status == "" {
		c.Status = "pending"
	}
	var id int64
	err := q.QueryRow(t.Context(), `INSERT INTO stagesync.changes
		(target, resource_id, op, fields, source, status, attempts, last_error, applied_etag,
		 created_at, finished_at)
		VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, nullif($8, ''), nullif($9, ''),
		        coalesce($10, now()), $11)
		RETURNING id`,
		c.Target, c.ResourceID, c.Op, c.Fields, c.Source, c.Status, c.Attempts, c.LastError,
		c.AppliedETag, timeOrNull(c.CreatedAt), timeOrNull(c.FinishedAt)).Scan(&id)
	require.NoError(t, err)
	return id
}

// attempt is a row of stagesync.attempts; zero values get the defaults below.
type attempt struct {
	Target       string // "territory"
	ResourceID   string // "r1"
	ChangeIDs    []int64
	Method       string // "PATCH"
	StatusCode   int    // NULL if 0
	IfMatch      string // NULL if empty
	ResponseETag string // NULL if empty
	DurationMs   float64
	Outcome      string
	CreatedAt    time.Time
}

func insertAttempt(t *testing.T, q db.DBTX, a attempt) int64 {
	t.Helper()
	if a.Target == "" {
		a.Target = "territory"
	}
	if a.ResourceID == "" {
		a.ResourceID = "r1"
	}
	if a.Method == "" {
		a.Method = "PATCH"
	}
	if a.ChangeIDs == nil {
		a.ChangeIDs = []int64{}
	}
	var id int64
	err := q.QueryRow(t.Context(), `INSERT INTO stagesync.attempts
		(target, resource_id, change_ids, method, url, status_code, if_match, response_etag,
		 duration_ms, outcome, created_at)
		VALUES ($1, $2, $3, $4, 'http://127.0.0.1:1/assignments/' || $2, nullif($5, 0),
		        nullif($6, ''), nullif($7, ''), $8, $9, coalesce($10, now()))
		RETURNING id`,
		a.Target, a.ResourceID, a.ChangeIDs, a.Method, a.StatusCode, a.IfMatch, a.ResponseETag,
		a.DurationMs, a.Outcome, timeOrNull(a.CreatedAt)).Scan(&id)
	require.NoError(t, err)
	return id
}

// insertMerge writes a merge of changeIDs on territory/resourceID.
func insertMerge(t *testing.T, q db.DBTX, resourceID string, changeIDs []int64, outcome string, at time.Time) int64 {
	t.Helper()
	var id int64
	err := q.QueryRow(t.Context(), `INSERT INTO stagesync.merges
		(target, resource_id, change_ids, base, ours, theirs, result, decisions, outcome, created_at)
		VALUES ('territory', $1, $2, '{"name": "a"}', '{"name": "b"}', '{"name": "a", "zip": "1"}',
		        '{"name": "b", "zip": "1"}', '{"name": "took_ours", "zip": "kept_theirs"}', $3, $4)
		RETURNING id`,
		resourceID, changeIDs, outcome, at).Scan(&id)
	require.NoError(t, err)
	return id
}

func timeOrNull(ts time.Time) *time.Time {
	if ts.IsZero() {
		return nil
	}
	return &ts
}

func countRows(t *testing.T, q db.DBTX, table string) int {
	t.Helper()
	var n int
	require.NoError(t, q.QueryRow(t.Context(), "SELECT count(*) FROM "+table).Scan(&n))
	return n
}

// requirePgError asserts err is a PostgreSQL error with SQLSTATE code.
func requirePgError(t *testing.T, err error, code string) *pgconn.PgError {
	t.Helper()
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr, "want a PostgreSQL error %s", code)
	require.Equal(t, code, pgErr.Code, "SQLSTATE of %q", pgErr.Message)
	return pgErr
}

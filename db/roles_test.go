package db_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// rolesFixture writes, as the owner, a row in every table a role might read:
// a pending change from the source "crm", a dead change, an attempt, a merge,
// a resource and an admin action. It returns the dead change's id.
func rolesFixture(t *testing.T, d testDB) int64 {
	t.Helper()
	ctx := t.Context()
	pending := insertChange(t, d.Pool, change{ResourceID: "r1"})
	dead := insertChange(t, d.Pool, change{ResourceID: "r2", Status: "dead", Attempts: 5,
		LastError: "412 five times", FinishedAt: time.Now()})
	insertAttempt(t, d.Pool, attempt{ResourceID: "r2", ChangeIDs: []int64{dead}, StatusCode: 412,
		Outcome: "conflict", DurationMs: 12})
	insertMerge(t, d.Pool, "r1", []int64{pending}, "merged", time.Now())
	_, err := d.Pool.Exec(ctx, `INSERT INTO stagesync.resources (target, resource_id, etag, snapshot)
		VALUES ('territory', 'r1', '"v1"', '{"name": "a"}')`)
	require.NoError(t, err)
	_, err = d.Pool.Exec(ctx, `INSERT INTO stagesync.admin_actions (action, params, affected)
		VALUES ('note', '{}', 0)`)
	require.NoError(t, err)
	return dead
}

// refusal is a statement a role may not run, and the error it must get.
type refusal struct{ name, sql, wantMessage string }

// requireRefused runs each refusal in its own subtest on a connection as role.
func requireRefused(t *testing.T, d testDB, role string, refusals []refusal) {
	t.Helper()
	for _, r := range refusals {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			_, err := d.conn(t, role).Exec(t.Context(), r.sql)
			pgErr := requirePgError(t, err, "42501")
			require.Equal(t, r.wantMessage, pgErr.Message)
		})
	}
}

// reads are what stagesync_reporting and stagesync_admin may run: a name
// and a statement.
func reads(changeID int64) [][2]string {
	reads := [][2]string{}
	for _, rel := range []string{"conflict_rates", "backlog", "dead_letters", "changes", "targets",
		"resources", "attempts", "merges", "admin_actions"} {
		reads = append(reads, [2]string{"reads " + rel, "SELECT * FROM stagesync." + rel})
	}
	return append(reads, [2]string{"calls change_history", fmt.Sprintf("SELECT * FROM stagesync.change_history(%d)", changeID)})
}

// writeRefusals are the writes no reader may make.
func writeRefusals(changeID int64) []refusal {
	return []refusal{
		{"insert a change", `INSERT INTO stagesync.changes (target, resource_id, fields)
			VALUES ('territory', 'r9', '{"a": 1}')`, "permission denied for table changes"},
		{"update a change", fmt.Sprintf("UPDATE stagesync.changes SET status = 'pending', finished_at = NULL WHERE id = %d", changeID),
			"permission denied for table changes"},
		{"delete a change", fmt.Sprintf("DELETE FROM stagesync.changes WHERE id = %d", changeID),
			"permission denied for table changes"},
		{"truncate changes", "TRUNCATE stagesync.changes", "permission denied for table changes"},
		{"insert an attempt", `INSERT INTO stagesync.attempts (target, method, url, duration_ms, outcome)
			VALUES ('territory', 'GET', 'http://x', 1, 'fetched')`, "permission denied for table attempts"},
		{"delete attempts", "DELETE FROM stagesync.attempts", "permission denied for table attempts"},
		{"insert a merge", `INSERT INTO stagesync.merges (target, resource_id, change_ids, ours, result, decisions, outcome)
			VALUES ('territory', 'r1', '{1}', '{}', '{}', '{}', 'noop')`, "permission denied for table merges"},
		{"update a resource", "UPDATE stagesync.resources SET etag = 'x'", "permission denied for table resources"},
		{"insert an admin action", "INSERT INTO stagesync.admin_actions (action, affected) VALUES ('forged', 0)",
			"permission denied for table admin_actions"},
		{"delete admin actions", "DELETE FROM stagesync.admin_actions", "permission denied for table admin_actions"},
		{"insert a target", `INSERT INTO stagesync.targets (name, base_url, item_path)
			VALUES ('rogue', 'http://x', '/{id}')`, "permission denied for table targets"},
	}
}

func TestUpstreamRole(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	deadID := rolesFixture(t, d)
	const role = "stagesync_upstream"

	t.Run("inserts a change and reads it back", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		c := d.conn(t, role)
		var id int64
		var source, status string
		require.NoError(t, c.QueryRow(ctx, `INSERT INTO stagesync.changes (target, resource_id, op, fields, idempotency_key)
			VALUES ('territory', 'u1', 'update', '{"name": "b"}', 'u-1') RETURNING id, source, status`).
			Scan(&id, &source, &status))
		require.Equal(t, role, source, "source must default to current_user")
		require.Equal(t, "pending", status)

		var resourceID string
		require.NoError(t, c.QueryRow(ctx, "SELECT resource_id FROM stagesync.changes WHERE id = $1", id).Scan(&resourceID))
		require.Equal(t, "u1", resourceID)
	})

	t.Run("retries an insert with on conflict do nothing", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		c := d.conn(t, role)
		const insert = `INSERT INTO stagesync.changes (target, resource_id, fields, idempotency_key)
			VALUES ('territory', 'u2', '{"name": "b"}', 'u-2') ON CONFLICT DO NOTHING`
		for range 2 {
			_, err := c.Exec(ctx, insert)
			require.NoError(t, err)
		}
		var n int
		require.NoError(t, c.QueryRow(ctx, "SELECT count(*) FROM stagesync.changes WHERE idempotency_key = 'u-2'").Scan(&n))
		require.Equal(t, 1, n)
	})

	t.Run("sees only its own changes", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		c := d.conn(t, role)
		var others, dead int
		require.NoError(t, c.QueryRow(ctx, `SELECT count(*) FILTER (WHERE source <> current_user),
			count(*) FILTER (WHERE id = $1) FROM stagesync.changes`, deadID).Scan(&others, &dead))
		require.Equal(t, 0, others)
		require.Equal(t, 0, dead, "the owner's change from source crm must be invisible")
	})

	t.Run("is refused", func(t *testing.T) {
		t.Parallel()
		requireRefused(t, d, role, []refusal{
			{"an insert as another source", `INSERT INTO stagesync.changes (target, resource_id, fields, source)
				VALUES ('territory', 'u3', '{"a": 1}', 'crm')`, `new row violates row-level security policy for table "changes"`},
			{"an insert setting status", `INSERT INTO stagesync.changes (target, resource_id, fields, status, finished_at)
				VALUES ('territory', 'u3', '{"a": 1}', 'applied', now())`, "permission denied for table changes"},
			{"an insert setting attempts", `INSERT INTO stagesync.changes (target, resource_id, fields, attempts)
				VALUES ('territory', 'u3', '{"a": 1}', 0)`, "permission denied for table changes"},
			{"an insert setting created_at", `INSERT INTO stagesync.changes (target, resource_id, fields, created_at)
				VALUES ('territory', 'u3', '{"a": 1}', now())`, "permission denied for table changes"},
			{"an update of a change", "UPDATE stagesync.changes SET fields = '{\"a\": 2}'", "permission denied for table changes"},
			{"a delete of a change", "DELETE FROM stagesync.changes", "permission denied for table changes"},
			{"truncating changes", "TRUNCATE stagesync.changes", "permission denied for table changes"},
			{"reading attempts", "SELECT * FROM stagesync.attempts", "permission denied for table attempts"},
			{"reading merges", "SELECT * FROM stagesync.merges", "permission denied for table merges"},
			{"reading resources", "SELECT * FROM stagesync.resources", "permission denied for table resources"},
			{"reading admin actions", "SELECT * FROM stagesync.admin_actions", "permission denied for table admin_actions"},
			{"reading conflict_rates", "SELECT * FROM stagesync.conflict_rates", "permission denied for view conflict_rates"},
			{"reading backlog", "SELECT * FROM stagesync.backlog", "permission denied for view backlog"},
			{"reading dead_letters", "SELECT * FROM stagesync.dead_letters", "permission denied for view dead_letters"},
			{"calling change_history", fmt.Sprintf("SELECT * FROM stagesync.change_history(%d)", deadID),
				"permission denied for function change_history"},
			{"calling requeue", "SELECT stagesync.requeue()", "permission denied for function requeue"},
			{"reading targets", "SELECT * FROM stagesync.targets", "permission denied for table targets"},
			{"inserting a target", `INSERT INTO stagesync.targets (name, base_url, item_path)
				VALUES ('rogue', 'http://x', '/{id}')`, "permission denied for table targets"},
		})
	})

	t.Run("changed nothing it was refused", func(t *testing.T) {
		t.Parallel()
		var status string
		require.NoError(t, d.Pool.QueryRow(t.Context(),
			"SELECT status FROM stagesync.changes WHERE id = $1", deadID).Scan(&status))
		require.Equal(t, "dead", status)
	})
}

func TestReportingRole(t *testing.T) {
	t.Parallel()
	testReader(t, "stagesync_reporting")
}

func TestAdminRole(t *testing.T) {
	t.Parallel()
	testReader(t, "stagesync_admin")

	// The actor is the login (session_user), not the role in effect nor the
	// function's owner: with SET ROLE the login stays the test's; a session
	// authorized as the role stands for a login that is a member of it.
	tests := []struct {
		name, setup string
		wantActor   string // empty: the test's login
	}{
		{"requeues under set role and records the login", "SET ROLE stagesync_admin", ""},
		{"requeues as its own session and records it", "SET SESSION AUTHORIZATION stagesync_admin", "stagesync_admin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			ctx := t.Context()
			deadID := rolesFixture(t, d)
			c := d.conn(t, "")
			wantActor := tt.wantActor
			if wantActor == "" {
				require.NoError(t, c.QueryRow(ctx, "SELECT session_user").Scan(&wantActor))
			}
			_, err := c.Exec(ctx, tt.setup)
			require.NoError(t, err)

			var moved int
			require.NoError(t, c.QueryRow(ctx, "SELECT stagesync.requeue(include_rejected => true)").Scan(&moved))
			require.Equal(t, 1, moved)

			var status string
			var attempts int
			require.NoError(t, d.Pool.QueryRow(ctx, "SELECT status, attempts FROM stagesync.changes WHERE id = $1",
				deadID).Scan(&status, &attempts))
			require.Equal(t, "pending", status)
			require.Equal(t, 0, attempts)

			var actor, sessionUser, currentUser string
			var affected int
			require.NoError(t, c.QueryRow(ctx, `SELECT actor, affected, session_user, current_user
				FROM stagesync.admin_actions WHERE action = 'requeue'`).Scan(&actor, &affected, &sessionUser, &currentUser))
			require.Equal(t, "stagesync_admin", currentUser)
			require.Equal(t, sessionUser, actor)
			require.Equal(t, wantActor, actor)
			require.Equal(t, 1, affected)
		})
	}
}

// testReader checks what stagesync_reporting and stagesync_admin share: they
// read every view and audit table and every source's changes, and write
// nothing.
func testReader(t *testing.T, role string) {
	d := newTestDB(t)
	deadID := rolesFixture(t, d)
	// A change from another source: readers see all of them.
	insertChange(t, d.Pool, change{Source: "erp"})

	for _, read := range reads(deadID) {
		t.Run(read[0], func(t *testing.T) {
			t.Parallel()
			rows, err := d.conn(t, role).Query(t.Context(), read[1])
			require.NoError(t, err)
			n := 0
			for rows.Next() {
				n++
			}
			require.NoError(t, rows.Err())
			require.Positive(t, n, "the fixture gives every relation at least one row")
		})
	}

	t.Run("sees every source's changes", func(t *testing.T) {
		t.Parallel()
		rows, err := d.conn(t, role).Query(t.Context(), "SELECT DISTINCT source FROM stagesync.changes ORDER BY 1")
		require.NoError(t, err)
		sources, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		require.Equal(t, []string{"crm", "erp"}, sources)
	})

	t.Run("reads queue depths past a temporary river_job", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		_, err := d.Pool.Exec(ctx, `INSERT INTO river_job (kind, args, queue, state)
			VALUES ('stagesync_apply', '{}', 'stagesync_territory', 'available')`)
		require.NoError(t, err)
		c := d.conn(t, role)
		// A temporary table is searched before the schemas unless pg_temp is
		// named in search_path; the SECURITY DEFINER function must read River's.
		_, err = c.Exec(ctx, `CREATE TEMP TABLE river_job (queue text, state text);
			INSERT INTO river_job VALUES ('forged', 'available')`)
		require.NoError(t, err)
		rows, err := c.Query(ctx, "SELECT queue, state, jobs FROM stagesync.river_queue_depth()")
		require.NoError(t, err)
		type depth struct {
			Queue, State string
			Jobs         int64
		}
		got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[depth])
		require.NoError(t, err)
		require.Equal(t, []depth{{"stagesync_territory", "available", 1}}, got)
	})

	t.Run("is refused", func(t *testing.T) {
		t.Parallel()
		refusals := writeRefusals(deadID)
		if role == "stagesync_reporting" {
			refusals = append(refusals, refusal{"calling requeue", "SELECT stagesync.requeue()",
				"permission denied for function requeue"})
		}
		requireRefused(t, d, role, refusals)
	})
}

// 00003 revokes PUBLIC's EXECUTE on the functions that exist by then; each
// later migration must revoke it on its own functions (PostgreSQL grants it
// on every new function, and a per-schema ALTER DEFAULT PRIVILEGES cannot
// take that global default away).
func TestFunctionsAreNotPublic(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	rows, err := d.Pool.Query(t.Context(), `SELECT p.oid::regprocedure::text
		FROM pg_proc p
		JOIN pg_namespace n ON n.oid = p.pronamespace
		CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
		WHERE n.nspname = 'stagesync' AND a.grantee = 0 AND a.privilege_type = 'EXECUTE'
		ORDER BY 1`)
	require.NoError(t, err)
	public, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Empty(t, public, "functions PUBLIC may execute")
}

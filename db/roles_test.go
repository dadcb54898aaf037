package db_test

import (
	"context"
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
		var login string
		require.NoError(t, c.QueryRow(ctx, "SELECT session_user").Scan(&login))
		require.Equal(t, login, source, "source must default to the login (session_user), not the role")
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
		require.NoError(t, c.QueryRow(ctx, `SELECT count(*) FILTER (WHERE source <> session_user),
			count(*) FILTER (WHERE id = $1) FROM stagesync.changes`, deadID).Scan(&others, &dead))
		require.Equal(t, 0, others)
		require.Equal(t, 0, dead, "the owner's change from source crm must be invisible")
	})

	t.Run("is refused", func(t *testing.T) {
		t.Parallel()
		requireRefused(t, d, role, []refusal{
			{"an insert as another source", `INSERT INTO stagesync.changes (target, resource_id, fields, source)
				VALUES ('territory', 'u3', '{"a": 1}', 'crm')`, `source must be your login "postgres" (or left out); got "crm"`},
			{"an insert as the role's name", `INSERT INTO stagesync.changes (target, resource_id, fields, source)
				VALUES ('territory', 'u3', '{"a": 1}', 'stagesync_upstream')`,
				`source must be your login "postgres" (or left out); got "stagesync_upstream"`},
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
			{"calling requeue", "SELECT stagesync.requeue(ids => ARRAY[1::bigint])", "permission denied for function requeue"},
			{"calling lift_pause", "SELECT stagesync.lift_pause('territory')", "permission denied for function lift_pause"},
			{"calling river_queue_depth", "SELECT * FROM stagesync.river_queue_depth()", "permission denied for function river_queue_depth"},
			{"calling reset_orphaned_changes", "SELECT stagesync.reset_orphaned_changes('2000-01-01')",
				"permission denied for function reset_orphaned_changes"},
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
			require.NoError(t, c.QueryRow(ctx, "SELECT stagesync.requeue(everything => true, include_rejected => true)").Scan(&moved))
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
		refusals := append(writeRefusals(deadID),
			refusal{"calling reset_orphaned_changes", "SELECT stagesync.reset_orphaned_changes('2000-01-01')",
				"permission denied for function reset_orphaned_changes"},
			refusal{"calling changes_explain_source", "SELECT stagesync.changes_explain_source('x')",
				"permission denied for function changes_explain_source"},
			refusal{"calling changes_explain_refusal", "SELECT stagesync.changes_explain_refusal(c) FROM stagesync.changes c",
				"permission denied for function changes_explain_refusal"})
		if role == "stagesync_reporting" {
			refusals = append(refusals, refusal{"calling requeue", "SELECT stagesync.requeue(everything => true)",
				"permission denied for function requeue"},
				refusal{"calling lift_pause", "SELECT stagesync.lift_pause('territory')",
					"permission denied for function lift_pause"})
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

// newRole creates a cluster-wide role for one test, named prefix plus a
// random suffix (roles outlive databases and tests run in parallel), with
// the given options (e.g. "LOGIN IN ROLE stagesync_upstream"). When the test
// ends it drops what the role owns or was granted in d, then the role.
func newRole(t *testing.T, d testDB, prefix, options string) string {
	t.Helper()
	var suffix string
	require.NoError(t, d.Pool.QueryRow(t.Context(), "SELECT md5(random()::text)").Scan(&suffix))
	name := prefix + "_" + suffix[:10]
	_, err := d.Pool.Exec(t.Context(), "CREATE ROLE "+pgx.Identifier{name}.Sanitize()+" "+options)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, d.URL)
		if err != nil {
			t.Errorf("connect to drop role %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		ident := pgx.Identifier{name}.Sanitize()
		if _, err := c.Exec(ctx, "DROP OWNED BY "+ident); err != nil {
			t.Errorf("drop what role %s owns: %v", name, err)
		}
		if _, err := c.Exec(ctx, "DROP ROLE "+ident); err != nil {
			t.Errorf("drop role %s: %v", name, err)
		}
	})
	return name
}

// loginConn connects to d as login (trust authentication, as on the test
// server) and, with setRole, runs SET ROLE setRole. It is closed before
// the roles are dropped.
func loginConn(t *testing.T, d testDB, login, setRole string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(d.URL)
	require.NoError(t, err)
	cfg.User = login
	c, err := pgx.ConnectConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(context.Background()) })
	if setRole != "" {
		_, err = c.Exec(t.Context(), "SET ROLE "+pgx.Identifier{setRole}.Sanitize())
		require.NoError(t, err)
	}
	return c
}

// Two upstream logins share the group role stagesync_upstream. Whether they
// act through membership or SET ROLE stagesync_upstream, each writes its
// own login as source, has its own idempotency namespace and sees only its
// own rows (issue 8 §4).
func TestUpstreamLoginsAreSeparate(t *testing.T) {
	t.Parallel()
	for _, setRole := range []string{"", "stagesync_upstream"} {
		name := "as members"
		if setRole != "" {
			name = "after set role " + setRole
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			ctx := t.Context()
			insertChange(t, d.Pool, change{Source: "crm", ResourceID: "owner-row"})
			logins := []string{
				newRole(t, d, "stagesync_test_crm_eu", "LOGIN IN ROLE stagesync_upstream"),
				newRole(t, d, "stagesync_test_crm_us", "LOGIN IN ROLE stagesync_upstream"),
			}
			const insert = `INSERT INTO stagesync.changes (target, resource_id, fields, idempotency_key)
				VALUES ('territory', $1, '{"status": "active"}', 'batch-1/1') ON CONFLICT DO NOTHING RETURNING source`
			conns := make([]*pgx.Conn, len(logins))
			for i, login := range logins {
				conns[i] = loginConn(t, d, login, setRole)
				var source string
				require.NoError(t, conns[i].QueryRow(ctx, insert, "from-"+login).Scan(&source),
					"the same idempotency key from another login must insert")
				require.Equal(t, login, source)
			}

			// A retry by the first login inserts nothing: its own key.
			err := conns[0].QueryRow(ctx, insert, "retry").Scan(new(string))
			require.ErrorIs(t, err, pgx.ErrNoRows, "got a second row for the same login and key; want none")

			for i, login := range logins {
				rows, err := conns[i].Query(ctx, "SELECT source, resource_id FROM stagesync.changes ORDER BY id")
				require.NoError(t, err)
				got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
					var v [2]string
					return v, r.Scan(&v[0], &v[1])
				})
				require.NoError(t, err)
				require.Equal(t, [][2]string{{login, "from-" + login}}, got, "rows %s sees", login)
			}

			// Forging the other login's source is refused, naming both.
			_, err = conns[0].Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields, source)
				VALUES ('territory', 'forged', '{"a": 1}', $1)`, logins[1])
			pgErr := requirePgError(t, err, "42501")
			require.Equal(t, "changes_upstream_insert", pgErr.ConstraintName)
			require.Equal(t, fmt.Sprintf("source must be your login %q (or left out); got %q", logins[0], logins[1]),
				pgErr.Message)
			require.Equal(t, 3, countRows(t, d.Pool, "stagesync.changes"))
		})
	}
}

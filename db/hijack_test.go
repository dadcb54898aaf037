package db_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// hijackTraps are what a role allowed to create objects in public (the
// default before PostgreSQL 15) defines there to run its code with the
// rights of whoever calls it: operators and a function that match their
// arguments better than, or as well as, pg_catalog's, each recording
// current_user in public.hijack_log and then doing the built-in's work.
// River's river_job_state has only anyenum's = in pg_catalog, arrays only
// anyarray's @>, and numeric / bigint needs a cast: an exact match wins.
const hijackTraps = `
CREATE FUNCTION public.trap_enum_eq(a public.river_job_state, b public.river_job_state) RETURNS boolean
LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'river_job_state = river_job_state');
    RETURN a::text OPERATOR(pg_catalog.=) b::text;
END $$;
CREATE OPERATOR public.= (LEFTARG = public.river_job_state, RIGHTARG = public.river_job_state,
    FUNCTION = public.trap_enum_eq);
CREATE FUNCTION public.trap_array_contains(a bigint[], b bigint[]) RETURNS boolean
LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'bigint[] @> bigint[]');
    RETURN a OPERATOR(pg_catalog.@>) b;
END $$;
CREATE OPERATOR public.@> (LEFTARG = bigint[], RIGHTARG = bigint[], FUNCTION = public.trap_array_contains);
CREATE FUNCTION public.trap_divide(a numeric, b bigint) RETURNS numeric
LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'numeric / bigint');
    RETURN a OPERATOR(pg_catalog./) b::numeric;
END $$;
CREATE OPERATOR public./ (LEFTARG = numeric, RIGHTARG = bigint, FUNCTION = public.trap_divide);
CREATE FUNCTION public.now() RETURNS timestamptz
LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'now()');
    RETURN pg_catalog.now();
END $$;
CREATE FUNCTION public.btrim(s text) RETURNS text
LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'btrim(text)');
    RETURN pg_catalog.btrim(s);
END $$;
`

// TestFunctionsResistSearchPathHijack plays issue 8 §4's attack: an
// unprivileged role plants operators and functions in public, and the
// callers of every stagesync function (the owner, the three roles) use a
// search_path that puts public first. Nothing planted may run: not as the
// owner inside a SECURITY DEFINER function (a privilege escalation), nor as
// a caller. A control function written as 00004 wrote river_queue_depth
// proves the traps work.
func TestFunctionsResistSearchPathHijack(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()

	// Rows that make every function evaluate the planted operators' targets.
	done := time.Now().Add(-time.Hour)
	processing := insertChange(t, d.Pool, change{ResourceID: "p1", Status: "processing"})
	_, err := d.Pool.Exec(ctx, "UPDATE stagesync.changes SET updated_at = '2000-01-01' WHERE id = $1", processing)
	require.NoError(t, err)
	dead := insertChange(t, d.Pool, change{ResourceID: "r1", Status: "dead", Attempts: 3, FinishedAt: done})
	insertChange(t, d.Pool, change{ResourceID: "r2", Status: "rejected", Attempts: 1, FinishedAt: done})
	insertAttempt(t, d.Pool, attempt{ResourceID: "r1", ChangeIDs: []int64{dead}, StatusCode: 412, Outcome: "conflict", CreatedAt: done})
	insertMerge(t, d.Pool, "r1", []int64{dead}, "needs_review", done)
	_, err = d.Pool.Exec(ctx, `INSERT INTO river_job (kind, args, queue, state)
		VALUES ('stagesync_apply', '{"target": "territory", "resource_ids": ["other"]}', 'stagesync_territory', 'available')`)
	require.NoError(t, err)

	attacker := newRole(t, d, "stagesync_test_attacker", "NOLOGIN")
	ident := pgx.Identifier{attacker}.Sanitize()
	_, err = d.Pool.Exec(ctx, `CREATE TABLE public.hijack_log (who text, what text);
		GRANT INSERT ON public.hijack_log TO PUBLIC;
		GRANT USAGE, CREATE ON SCHEMA public TO `+ident)
	require.NoError(t, err)
	plant := d.conn(t, attacker)
	_, err = plant.Exec(ctx, hijackTraps)
	require.NoError(t, err)

	// The control: 00004's river_queue_depth, SECURITY DEFINER with public
	// on its path, runs the planted = as its owner when reporting calls it.
	_, err = d.Pool.Exec(ctx, `CREATE FUNCTION public.old_river_queue_depth() RETURNS bigint
		LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
		SELECT count(*) FROM river_job j WHERE j.state IN ('available', 'running') $$`)
	require.NoError(t, err)
	hostile := func(t *testing.T, role string) *pgx.Conn {
		c := d.conn(t, role)
		_, err := c.Exec(ctx, "SET search_path = public, pg_catalog, stagesync")
		require.NoError(t, err)
		return c
	}
	_, err = hostile(t, "stagesync_reporting").Exec(ctx, "SELECT public.old_river_queue_depth()")
	require.NoError(t, err)
	var owner string
	require.NoError(t, d.Pool.QueryRow(ctx, "SELECT current_user").Scan(&owner))
	require.Equal(t, [][2]string{{owner, "river_job_state = river_job_state"}}, hijacked(t, d),
		"the control must be hijacked, or the traps prove nothing")
	_, err = d.Pool.Exec(ctx, "TRUNCATE public.hijack_log")
	require.NoError(t, err)

	calls := []struct{ role, sql string }{
		{"stagesync_reporting", "SELECT * FROM stagesync.river_queue_depth()"},
		{"stagesync_reporting", fmt.Sprintf("SELECT * FROM stagesync.change_history(%d)", dead)},
		{"stagesync_reporting", "SELECT * FROM stagesync.conflict_rates"},
		{"stagesync_reporting", "SELECT * FROM stagesync.conflict_rates_since('2000-01-01')"},
		{"stagesync_reporting", "SELECT * FROM stagesync.hot_resources"},
		{"stagesync_reporting", "SELECT * FROM stagesync.hot_resources_since('2000-01-01', 10)"},
		{"stagesync_reporting", "SELECT * FROM stagesync.resource_history('territory', 'u1')"},
		{"stagesync_admin", fmt.Sprintf("SELECT stagesync.requeue(ids => ARRAY[%d::bigint])", dead)},
		{"stagesync_admin", "SELECT stagesync.requeue(target => 'territory', include_rejected => true)"},
		{"stagesync_admin", "SELECT stagesync.lift_pause('territory')"},
		{"stagesync_upstream", `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'u1', '{"a": {"b": 1}}')`},
		{"", "SELECT stagesync.reset_orphaned_changes('2100-01-01')"},
		{"", "SELECT * FROM stagesync.river_queue_depth()"},
		{"", fmt.Sprintf("SELECT * FROM stagesync.change_history(%d)", dead)},
		{"", "SELECT * FROM stagesync.conflict_rates"},
		{"", "SELECT * FROM stagesync.hot_resources_since('2000-01-01')"},
		{"", "SELECT * FROM stagesync.resource_history('territory', 'u1')"},
		{"", "SELECT stagesync.requeue(everything => true)"},
		{"", "UPDATE stagesync.changes SET attempts = attempts + 1"},
		{"", `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'o1', '{"a": [1]}')`},
	}
	for _, c := range calls {
		_, err := hostile(t, c.role).Exec(ctx, c.sql)
		require.NoError(t, err, "%s as %q", c.sql, c.role)
	}
	// Refused inserts run the explaining functions and the statement
	// trigger's error paths.
	refused := []string{
		`INSERT INTO stagesync.changes (target, resource_id, op, fields) VALUES ('territory', 'u2', 'upsert', '{"a": 1}')`,
		`INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('nowhere', 'u2', '{"a": 1}')`,
		`INSERT INTO stagesync.changes (target, resource_id, fields, source) VALUES ('territory', 'u2', '{"a": 1}', 'forged')`,
		`INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', ' ', '{"a": 1}')`,
	}
	for _, sql := range refused {
		_, err := hostile(t, "stagesync_upstream").Exec(ctx, sql)
		require.Error(t, err, sql)
	}
	require.Empty(t, hijacked(t, d), "planted code ran (who, what)")
}

func hijacked(t *testing.T, d testDB) [][2]string {
	t.Helper()
	rows, err := d.Pool.Query(t.Context(), "SELECT who, what FROM public.hijack_log ORDER BY 1, 2")
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([2]string, error) {
		var v [2]string
		return v, r.Scan(&v[0], &v[1])
	})
	require.NoError(t, err)
	return got
}

// Every function in schema stagesync pins search_path, so the next function
// added is held to TestFunctionsResistSearchPathHijack's rule too. The two
// trigger functions that run for every written row name pg_catalog's
// functions instead (a SET clause would cost each row).
func TestFunctionsPinTheirSearchPath(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	rows, err := d.Pool.Query(t.Context(), `SELECT p.oid::regprocedure::text
		FROM pg_proc p
		JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = 'stagesync'
		  AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)
		ORDER BY 1`)
	require.NoError(t, err)
	unpinned, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{"stagesync.notify_changes()", "stagesync.touch_updated_at()"}, unpinned,
		"functions without search_path = pg_catalog, pg_temp")
}

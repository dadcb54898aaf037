package db_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// stagesync.lift_pause ends a target's pause at once for an admin: the
// pause is cleared and its lift time set (processes read it), the target's
// apply jobs scheduled for later run now, other targets' jobs stay, and an
// admin_actions row says who lifted what. An unknown target is an error.
func TestLiftPauseResumesTheTargetAtOnce(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	_, err := d.Pool.Exec(ctx, `
		INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ('other', 'http://o', '/{id}');
		UPDATE stagesync.targets SET paused_until = now() + interval '1 hour',
			pause_reason = '401 Unauthorized: check the credential' WHERE name = 'territory';
		INSERT INTO river_job (kind, args, queue, state, scheduled_at) VALUES
			('stagesync_apply', '{"target": "territory", "resource_ids": ["a"]}', 'stagesync_territory', 'scheduled', now() + interval '1 hour'),
			('stagesync_apply', '{"target": "other", "resource_ids": ["b"]}', 'stagesync_other', 'scheduled', now() + interval '1 hour')`)
	require.NoError(t, err)

	var was bool
	var login string
	admin := d.conn(t, "stagesync_admin")
	require.NoError(t, admin.QueryRow(ctx, "SELECT stagesync.lift_pause('territory'), session_user").Scan(&was, &login))
	require.True(t, was, "lift_pause of a paused target: got false; want true")
	var paused, lifted bool
	require.NoError(t, d.Pool.QueryRow(ctx, `SELECT paused_until IS NOT NULL, pause_lifted_at IS NOT NULL
		FROM stagesync.targets WHERE name = 'territory'`).Scan(&paused, &lifted))
	require.False(t, paused, "paused_until after lift_pause: got set; want NULL")
	require.True(t, lifted, "pause_lifted_at after lift_pause: got NULL; want set")
	rows, err := d.Pool.Query(ctx, `SELECT queue || ':' || state::text FROM river_job ORDER BY queue`)
	require.NoError(t, err)
	var states []string
	for rows.Next() {
		var s string
		require.NoError(t, rows.Scan(&s))
		states = append(states, s)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, []string{"stagesync_other:scheduled", "stagesync_territory:available"}, states)
	var actor, reason string
	var affected int
	require.NoError(t, d.Pool.QueryRow(ctx, `SELECT actor, params->>'pause_reason', affected
		FROM stagesync.admin_actions WHERE action = 'lift_pause'`).Scan(&actor, &reason, &affected))
	require.Equal(t, login, actor, "actor: got %q; want the login %q", actor, login)
	require.Equal(t, "401 Unauthorized: check the credential", reason)
	require.Equal(t, 1, affected, "jobs woken: got %d; want 1", affected)

	require.NoError(t, d.Pool.QueryRow(ctx, "SELECT stagesync.lift_pause('territory')").Scan(&was))
	require.False(t, was, "lift_pause of a target not paused: got true; want false")
	_, err = d.Pool.Exec(ctx, "SELECT stagesync.lift_pause('nowhere')")
	pgErr := requirePgError(t, err, "22023")
	require.Equal(t, "lift_pause: unknown target 'nowhere'", pgErr.Message)
}

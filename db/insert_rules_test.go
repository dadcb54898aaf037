package db_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// deepFields is a fields object holding a value inside depth objects and
// arrays, alternating.
func deepFields(depth int) string {
	var b strings.Builder
	for i := range depth - 1 {
		if i%2 == 0 {
			b.WriteString(`{"a": `)
		} else {
			b.WriteString(`[`)
		}
	}
	b.WriteString(`{"leaf": 1}`)
	for i := depth - 2; i >= 0; i-- {
		if i%2 == 0 {
			b.WriteString(`}`)
		} else {
			b.WriteString(`]`)
		}
	}
	return b.String()
}

// One bad row refuses the whole statement, whatever its position, and the
// error names it: the upstream learns which row to fix.
func TestChangesRefusesAStatementWithOneBadRow(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name                                  string
		target, resourceID, fields            string
		wantCode, wantConstraint, wantMessage string
	}{
		{
			// Issue 8 §1: Go's decoder stops at 10,000 levels; this row
			// passed every CHECK and stopped whole jobs.
			name: "fields nested 10,001 levels", target: "territory", resourceID: "poison", fields: deepFields(10001),
			wantCode: "23514", wantConstraint: "changes_fields_too_deep",
			wantMessage: `fields of resource "poison" nests objects and arrays more than 32 levels deep`,
		},
		{
			name: "fields nested 33 levels", target: "territory", resourceID: "deep", fields: deepFields(33),
			wantCode: "23514", wantConstraint: "changes_fields_too_deep",
			wantMessage: `fields of resource "deep" nests objects and arrays more than 32 levels deep`,
		},
		{
			name: "a resource_id of spaces", target: "territory", resourceID: "    ", fields: `{"a": 1}`,
			wantCode: "23514", wantConstraint: "changes_resource_id_not_empty",
			wantMessage: `resource_id must not be empty or only spaces; got "    "`,
		},
		{
			// Unicode spaces look as blank as ASCII ones wherever the id is shown.
			name: "a resource_id of Unicode spaces", target: "territory", resourceID: "\u00a0\u3000\u200b\ufeff", fields: `{"a": 1}`,
			wantCode: "23514", wantConstraint: "changes_resource_id_not_empty",
			wantMessage: "resource_id must not be empty or only spaces; got \"\u00a0\u3000\u200b\ufeff\"",
		},
		{
			name: "a resource_id of invisible fillers", target: "territory", resourceID: "\u00ad\u2800\u3164", fields: `{"a": 1}`,
			wantCode: "23514", wantConstraint: "changes_resource_id_not_empty",
			wantMessage: "resource_id must not be empty or only spaces; got \"\u00ad\u2800\u3164\"",
		},
		{
			// Shown as "1-CCA" by a terminal or a browser.
			name: "a resource_id with a right-to-left override", target: "territory", resourceID: "\u202eACC-1", fields: `{"a": 1}`,
			wantCode: "23514", wantConstraint: "changes_resource_id_no_bidi",
			wantMessage: "resource_id must not contain bidi controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C): they reorder how it is shown; got \"\u202eACC-1\"",
		},
		{
			name: "an unknown target", target: "teritory", resourceID: "r1", fields: `{"a": 1}`,
			wantCode: "23503", wantConstraint: "changes_target_known",
			wantMessage: `unknown target "teritory"; the configured targets are: billing, ledger, territory`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			targets, ids, fields := make([]string, 500), make([]string, 500), make([]string, 500)
			for i := range targets {
				targets[i], ids[i], fields[i] = "territory", fmt.Sprintf("good-%d", i), deepFields(32)
			}
			targets[317], ids[317], fields[317] = tt.target, tt.resourceID, tt.fields

			_, err := d.conn(t, "stagesync_upstream").Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields)
				SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])`, targets, ids, fields)
			pgErr := requirePgError(t, err, tt.wantCode)
			require.Equal(t, tt.wantConstraint, pgErr.ConstraintName)
			require.Equal(t, tt.wantMessage, pgErr.Message)
			require.Equal(t, 0, countRows(t, d.Pool, "stagesync.changes"), "no row of a refused statement may be stored")

			// COPY, which the owner may use, is held to the same rules.
			rows := make([][]any, len(ids))
			for i := range ids {
				rows[i] = []any{targets[i], ids[i], fields[i]}
			}
			_, err = d.Pool.CopyFrom(t.Context(), pgx.Identifier{"stagesync", "changes"},
				[]string{"target", "resource_id", "fields"}, pgx.CopyFromRows(rows))
			pgErr = requirePgError(t, err, tt.wantCode)
			require.Equal(t, tt.wantConstraint, pgErr.ConstraintName)
			require.Equal(t, 0, countRows(t, d.Pool, "stagesync.changes"))
		})
	}
}

func TestChangesUnknownTargetBeforeAnyIsConfigured(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	_, err := d.Pool.Exec(t.Context(), "DELETE FROM stagesync.targets")
	require.NoError(t, err)
	_, err = d.conn(t, "stagesync_upstream").Exec(t.Context(),
		`INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'r1', '{"a": 1}')`)
	pgErr := requirePgError(t, err, "23503")
	require.Equal(t, "changes_target_known", pgErr.ConstraintName)
	require.Equal(t, `unknown target "territory": no target is configured yet`, pgErr.Message)
	require.Equal(t, "stagesync run registers the targets of its config file when it starts.", pgErr.Hint)
}

// The foreign key still guards the reference: deferred behind the
// statement trigger, it refuses an unknown target at commit when the
// trigger is not there, and a target in use cannot be deleted.
func TestChangesTargetForeignKeyStillHolds(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	insertChange(t, d.Pool, change{Target: "billing"})
	_, err := d.Pool.Exec(ctx, "DELETE FROM stagesync.targets WHERE name = 'billing'")
	pgErr := requirePgError(t, err, "23503")
	require.Equal(t, "changes_target_known", pgErr.ConstraintName)

	_, err = d.Pool.Exec(ctx, "ALTER TABLE stagesync.changes DISABLE TRIGGER changes_check_inserted")
	require.NoError(t, err)
	tx, err := d.Pool.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(ctx) })
	_, err = tx.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('nowhere', 'r1', '{"a": 1}')`)
	require.NoError(t, err, "the check is deferred to the commit")
	pgErr = requirePgError(t, tx.Commit(ctx), "23503")
	require.Equal(t, "changes_target_known", pgErr.ConstraintName)
	require.Equal(t, 1, countRows(t, d.Pool, "stagesync.changes"))
}

// The depth and blank-id rules bind inserted rows only: a row staged before
// 00006 that breaks them must still be claimable, end rejected (how the
// processor disposes of a row it cannot decode) and be requeued, or one old
// row would stop every claim and every requeue that touches it.
func TestChangesRowsStagedBeforeTheNewRulesCanStillBeUpdated(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	// Staged as before 00006: without the statement trigger.
	_, err := d.Pool.Exec(ctx, "ALTER TABLE stagesync.changes DISABLE TRIGGER changes_check_inserted")
	require.NoError(t, err)
	deep := insertChange(t, d.Pool, change{ResourceID: "old-deep", Fields: deepFields(10001)})
	blank := insertChange(t, d.Pool, change{ResourceID: "  "})
	_, err = d.Pool.Exec(ctx, "ALTER TABLE stagesync.changes ENABLE TRIGGER changes_check_inserted")
	require.NoError(t, err)
	good := insertChange(t, d.Pool, change{ResourceID: "new"})

	for _, step := range []string{
		`UPDATE stagesync.changes SET status = 'processing' WHERE status = 'pending' OR id = ANY ($1)`,
		`UPDATE stagesync.changes SET status = 'rejected', finished_at = now(), last_error = 'cannot decode fields'
			WHERE id = ANY ($1)`,
		`SELECT stagesync.requeue(ids => $1, include_rejected => true)`,
	} {
		_, err := d.Pool.Exec(ctx, step, []int64{deep, blank})
		require.NoError(t, err, step)
	}
	states := changeStates(t, d.Pool)
	require.Equal(t, "pending", states[deep].Status)
	require.Equal(t, "pending", states[blank].Status)
	require.Equal(t, "processing", states[good].Status)
}

// A row's refusal is checked as the upstream writes, also while the owner
// works on the table: nothing here waits on a lock (the trigger reads only
// the statement's own rows and the targets).
func TestChangesChecksDoNotWaitForTheProcessor(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	ctx := t.Context()
	id := insertChange(t, d.Pool, change{})
	tx, err := d.Pool.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(ctx) })
	// The processor holds the target's row (a TargetUpsert at start) and a
	// change's row (a claim).
	_, err = tx.Exec(ctx, `UPDATE stagesync.targets SET updated_at = now() WHERE name = 'territory';
		UPDATE stagesync.changes SET status = 'processing' WHERE id = `+fmt.Sprint(id))
	require.NoError(t, err)

	c := d.conn(t, "stagesync_upstream")
	_, err = c.Exec(ctx, "SET lock_timeout = '2s'")
	require.NoError(t, err)
	start := time.Now()
	_, err = c.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'r2', '{"a": 1}')`)
	require.NoError(t, err, "an insert must not wait for the processor's locks (took %v)", time.Since(start))
	_, err = c.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('nowhere', 'r2', '{"a": 1}')`)
	pgErr := requirePgError(t, err, "23503")
	require.Equal(t, "changes_target_known", pgErr.ConstraintName)
}

// A statement of many rows refused by a per-row rule says which row broke
// it: the DETAIL names its target and resource_id.
func TestChangesRefusalNamesTheRow(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	for rule, bad := range map[string]string{
		"changes_fields_no_id":     `'{"id": 1}'`,
		"changes_fields_is_object": `'[1]'`,
		"changes_op_valid":         `'{"a": 1}'`,
	} {
		op := "update"
		if rule == "changes_op_valid" {
			op = "upsert"
		}
		_, err := d.Pool.Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, op, fields) VALUES
			('territory', 'fine-1', 'update', '{"a": 1}'),
			('territory', 'THE-BAD-ROW-42', '`+op+`', `+bad+`),
			('territory', 'fine-2', 'update', '{"a": 2}')`)
		pgErr := requirePgError(t, err, "23514")
		require.Equal(t, rule, pgErr.ConstraintName)
		require.Contains(t, pgErr.Detail, `resource_id "THE-BAD-ROW-42"`, "%s: detail %q", rule, pgErr.Detail)
		require.Contains(t, pgErr.Detail, `target "territory"`, "%s: detail %q", rule, pgErr.Detail)
	}
}

// Only an id of nothing but spaces is blank: one with a Unicode space inside
// (or around a visible character) is stored.
func TestChangesUnicodeSpacesInsideAnIdAreFine(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	_, err := d.conn(t, "stagesync_upstream").Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields)
		VALUES ('territory', $1, '{"a": 1}'), ('territory', $2, '{"a": 1}')`, "ACC\u00a01", "\u3000x\u3000")
	require.NoError(t, err)
	require.Equal(t, 2, countRows(t, d.Pool, "stagesync.changes"))
}

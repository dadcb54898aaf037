package db_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// upstreamColumns are the columns stagesync_upstream may write.
var upstreamColumns = map[string]bool{
	"target": true, "resource_id": true, "op": true, "fields": true, "source": true, "idempotency_key": true,
}

func TestChangesRefusesMalformedRows(t *testing.T) {
	t.Parallel()
	// Each case names the columns and SQL values of one INSERT. The error must
	// name the problem and what is allowed, in the message the upstream sees
	// (row-level security hides PostgreSQL's own details from it), under the
	// constraint name clients match on; NOT NULL and type errors are
	// PostgreSQL's own. Cases that write only the upstream's columns run
	// both as the owner and as stagesync_upstream.
	tests := []struct {
		name, cols, vals string
		wantCode         string
		wantConstraint   string
		wantColumn       string
		wantMessage      string // exact for stagesync's errors, a substring for PostgreSQL's
		// the upstream's row breaks the insert policy first: its source is
		// not the login
		upstreamIsSourceError bool
	}{
		{
			name: "target is null", cols: "target, resource_id, fields", vals: `NULL, 'r1', '{"a": 1}'`,
			wantCode: "23502", wantColumn: "target", wantMessage: `column "target"`,
		},
		{
			name: "target is empty", cols: "target, resource_id, fields", vals: `'', 'r1', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_target_not_empty", wantColumn: "target",
			wantMessage: "target must not be empty",
		},
		{
			name: "target is unknown", cols: "target, resource_id, fields", vals: `'nowhere', 'r1', '{"a": 1}'`,
			wantCode: "23503", wantConstraint: "changes_target_known", wantColumn: "target",
			wantMessage: `unknown target "nowhere"; the configured targets are: billing, ledger, territory`,
		},
		{
			name: "resource_id is null", cols: "target, resource_id, fields", vals: `'territory', NULL, '{"a": 1}'`,
			wantCode: "23502", wantColumn: "resource_id", wantMessage: `column "resource_id"`,
		},
		{
			name: "resource_id is missing", cols: "target, fields", vals: `'territory', '{"a": 1}'`,
			wantCode: "23502", wantColumn: "resource_id", wantMessage: `column "resource_id"`,
		},
		{
			name: "resource_id is empty", cols: "target, resource_id, fields", vals: `'territory', '', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_resource_id_not_empty", wantColumn: "resource_id",
			wantMessage: `resource_id must not be empty or only spaces; got ""`,
		},
		{
			name: "resource_id is only spaces", cols: "target, resource_id, fields", vals: `'territory', '   ', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_resource_id_not_empty", wantColumn: "resource_id",
			wantMessage: `resource_id must not be empty or only spaces; got "   "`,
		},
		{
			name: "resource_id has a newline", cols: "target, resource_id, fields", vals: `'territory', E'r\n1', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_resource_id_no_control_chars", wantColumn: "resource_id",
			wantMessage: `resource_id must not contain control characters (newline, tab, escape, ...); got "r\n1"`,
		},
		{
			name: "resource_id has an escape character", cols: "target, resource_id, fields", vals: `'territory', 'r' || chr(27), '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_resource_id_no_control_chars", wantColumn: "resource_id",
			wantMessage: `resource_id must not contain control characters (newline, tab, escape, ...); got "r\u001b"`,
		},
		{
			// 257 characters but 513 bytes: the limit is on bytes.
			name: "resource_id is over 512 bytes", cols: "target, resource_id, fields", vals: `'territory', repeat('é', 256) || 'x', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_resource_id_too_long", wantColumn: "resource_id",
			wantMessage: "resource_id is 513 bytes long; the limit is 512 bytes",
		},
		{
			name: "fields is null", cols: "target, resource_id, fields", vals: `'territory', 'r1', NULL`,
			wantCode: "23502", wantColumn: "fields", wantMessage: `column "fields"`,
		},
		{
			name: "fields is an array", cols: "target, resource_id, fields", vals: `'territory', 'r1', '[{"a": 1}]'`,
			wantCode: "23514", wantConstraint: "changes_fields_is_object", wantColumn: "fields",
			wantMessage: `fields must be a JSON object like {"status": "active"}; got a JSON array`,
		},
		{
			name: "fields is a number", cols: "target, resource_id, fields", vals: `'territory', 'r1', '1'`,
			wantCode: "23514", wantConstraint: "changes_fields_is_object", wantColumn: "fields",
			wantMessage: `fields must be a JSON object like {"status": "active"}; got a JSON number`,
		},
		{
			name: "fields is a string", cols: "target, resource_id, fields", vals: `'territory', 'r1', '"name=x"'`,
			wantCode: "23514", wantConstraint: "changes_fields_is_object", wantColumn: "fields",
			wantMessage: `fields must be a JSON object like {"status": "active"}; got a JSON string`,
		},
		{
			name: "fields is JSON null", cols: "target, resource_id, fields", vals: `'territory', 'r1', 'null'::jsonb`,
			wantCode: "23514", wantConstraint: "changes_fields_is_object", wantColumn: "fields",
			wantMessage: `fields must be a JSON object like {"status": "active"}; got a JSON null`,
		},
		{
			// {"note": "…"} is 12 bytes plus the string: 65537 in all.
			name: "fields is over 64 KiB", cols: "target, resource_id, fields", vals: `'territory', 'r1', jsonb_build_object('note', repeat('x', 65525))`,
			wantCode: "23514", wantConstraint: "changes_fields_too_large", wantColumn: "fields",
			wantMessage: "fields is 65537 bytes as JSON text; the limit is 65536 bytes (64 KiB)",
		},
		{
			name: "fields is nested 33 levels deep", cols: "target, resource_id, fields",
			vals:     `'territory', 'r1', (repeat('{"a": ', 32) || '[1]' || repeat('}', 32))::jsonb`,
			wantCode: "23514", wantConstraint: "changes_fields_too_deep", wantColumn: "fields",
			wantMessage: `fields of resource "r1" nests objects and arrays more than 32 levels deep`,
		},
		{
			name: "fields is not valid JSON", cols: "target, resource_id, fields", vals: `'territory', 'r1', '{"a": }'`,
			wantCode: "22P02", wantMessage: "invalid input syntax for type json",
		},
		{
			name: "fields sets the id", cols: "target, resource_id, fields", vals: `'territory', 'r1', '{"id": "r2", "name": "x"}'`,
			wantCode: "23514", wantConstraint: "changes_fields_no_id", wantColumn: "fields",
			wantMessage: `fields must not contain "id": the id of the resource goes in resource_id`,
		},
		{
			name: "op is invalid", cols: "target, resource_id, op, fields", vals: `'territory', 'r1', 'upsert', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_op_valid", wantColumn: "op",
			wantMessage: `op must be update, create or delete; got "upsert"`,
		},
		{
			name: "op is upper case", cols: "target, resource_id, op, fields", vals: `'territory', 'r1', 'UPDATE', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_op_valid", wantColumn: "op",
			wantMessage: `op must be update, create or delete; got "UPDATE"`,
		},
		{
			name: "op is null", cols: "target, resource_id, op, fields", vals: `'territory', 'r1', NULL, '{"a": 1}'`,
			wantCode: "23502", wantColumn: "op", wantMessage: `column "op"`,
		},
		{
			name: "update has no fields", cols: "target, resource_id, op, fields", vals: `'territory', 'r1', 'update', '{}'`,
			wantCode: "23514", wantConstraint: "changes_update_has_fields", wantColumn: "fields",
			wantMessage: "op update needs at least one field; fields is {}",
		},
		{
			name: "update has no fields by default", cols: "target, resource_id", vals: `'territory', 'r1'`,
			wantCode: "23514", wantConstraint: "changes_update_has_fields", wantColumn: "fields",
			wantMessage: "op update needs at least one field; fields is {}",
		},
		{
			name: "delete has fields", cols: "target, resource_id, op, fields", vals: `'territory', 'r1', 'delete', '{"a": 1}'`,
			wantCode: "23514", wantConstraint: "changes_delete_has_no_fields", wantColumn: "fields",
			wantMessage: "op delete takes no fields; fields must be {} (or left out)",
		},
		{
			name: "source is empty", cols: "target, resource_id, fields, source", vals: `'territory', 'r1', '{"a": 1}', ''`,
			wantCode: "23514", wantConstraint: "changes_source_not_empty", wantColumn: "source",
			wantMessage: "source must not be empty", upstreamIsSourceError: true,
		},
		{
			name: "idempotency key is empty", cols: "target, resource_id, fields, idempotency_key", vals: `'territory', 'r1', '{"a": 1}', ''`,
			wantCode: "23514", wantConstraint: "changes_idempotency_key_not_blank", wantColumn: "idempotency_key",
			wantMessage: `idempotency_key must be NULL or contain a visible character; got ""`,
		},
		{
			name: "idempotency key is blank", cols: "target, resource_id, fields, idempotency_key", vals: `'territory', 'r1', '{"a": 1}', '   '`,
			wantCode: "23514", wantConstraint: "changes_idempotency_key_not_blank", wantColumn: "idempotency_key",
			wantMessage: `idempotency_key must be NULL or contain a visible character; got "   "`,
		},
		{
			name: "idempotency key is only a tab", cols: "target, resource_id, fields, idempotency_key", vals: `'territory', 'r1', '{"a": 1}', E'\t'`,
			wantCode: "23514", wantConstraint: "changes_idempotency_key_no_control_chars", wantColumn: "idempotency_key",
			wantMessage: `idempotency_key must not contain control characters (newline, tab, escape, ...); got "\t"`,
		},
		{
			name: "idempotency key has a newline", cols: "target, resource_id, fields, idempotency_key", vals: `'territory', 'r1', '{"a": 1}', E'k\n'`,
			wantCode: "23514", wantConstraint: "changes_idempotency_key_no_control_chars", wantColumn: "idempotency_key",
			wantMessage: `idempotency_key must not contain control characters (newline, tab, escape, ...); got "k\n"`,
		},
		{
			name: "idempotency key is over 200 bytes", cols: "target, resource_id, fields, idempotency_key", vals: `'territory', 'r1', '{"a": 1}', repeat('k', 201)`,
			wantCode: "23514", wantConstraint: "changes_idempotency_key_too_long", wantColumn: "idempotency_key",
			wantMessage: "idempotency_key is 201 bytes long; the limit is 200 bytes",
		},
		{
			// finished_at is set so that only the status is wrong.
			name: "status is unknown", cols: "target, resource_id, fields, status, finished_at", vals: `'territory', 'r1', '{"a": 1}', 'done', now()`,
			wantCode: "23514", wantConstraint: "changes_status_valid",
		},
		{
			name: "attempts is negative", cols: "target, resource_id, fields, attempts", vals: `'territory', 'r1', '{"a": 1}', -1`,
			wantCode: "23514", wantConstraint: "changes_attempts_not_negative",
		},
		{
			name: "attempts is not a number", cols: "target, resource_id, fields, attempts", vals: `'territory', 'r1', '{"a": 1}', 'three'`,
			wantCode: "22P02", wantMessage: "invalid input syntax for type integer",
		},
		{
			name: "pending with finished_at", cols: "target, resource_id, fields, finished_at", vals: `'territory', 'r1', '{"a": 1}', now()`,
			wantCode: "23514", wantConstraint: "changes_finished_iff_terminal",
		},
		{
			name: "id is given", cols: "id, target, resource_id, fields", vals: `1, 'territory', 'r1', '{"a": 1}'`,
			wantCode: "428C9", wantMessage: `column "id"`,
		},
	}
	for _, tt := range tests {
		roles := []string{""}
		upstreamCols := true
		for col := range strings.SplitSeq(tt.cols, ",") {
			upstreamCols = upstreamCols && upstreamColumns[strings.TrimSpace(col)]
		}
		if upstreamCols {
			roles = append(roles, "stagesync_upstream")
		}
		for _, role := range roles {
			name := tt.name + " as the owner"
			if role != "" {
				name = tt.name + " as " + role
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				d := newTestDB(t)
				ctx := t.Context()

				// A valid row written concurrently in another transaction
				// must be unaffected by the refused one.
				tx, err := d.Pool.Begin(ctx)
				require.NoError(t, err)
				t.Cleanup(func() { _ = tx.Rollback(ctx) })
				goodID := insertChange(t, tx, change{ResourceID: "good"})

				_, err = d.conn(t, role).Exec(ctx, fmt.Sprintf("INSERT INTO stagesync.changes (%s) VALUES (%s)", tt.cols, tt.vals))
				code, constraint, column, message := tt.wantCode, tt.wantConstraint, tt.wantColumn, tt.wantMessage
				if role != "" && tt.upstreamIsSourceError {
					code, constraint, column = "42501", "changes_upstream_insert", "source"
					message = `source must be your login "postgres" (or left out); got ""`
				}
				pgErr := requirePgError(t, err, code)
				require.Equal(t, constraint, pgErr.ConstraintName)
				if column != "" {
					require.Equal(t, column, pgErr.ColumnName)
				}
				switch {
				case constraint == "":
					require.Contains(t, pgErr.Message, message)
				case message == "":
					// The owner-only columns keep PostgreSQL's message.
					require.Contains(t, pgErr.Message, `"`+constraint+`"`)
				default:
					require.Equal(t, message, pgErr.Message)
					require.Contains(t, pgErr.Detail, constraint, "the detail names the rule")
					require.Equal(t, "changes", pgErr.TableName)
				}
				require.Equal(t, 0, countRows(t, d.Pool, "stagesync.changes"), "the refused row must not be stored")

				require.NoError(t, tx.Commit(ctx))
				require.Equal(t, 1, countRows(t, d.Pool, "stagesync.changes"))
				var resourceID, status string
				require.NoError(t, d.Pool.QueryRow(ctx,
					"SELECT resource_id, status FROM stagesync.changes WHERE id = $1", goodID).Scan(&resourceID, &status))
				require.Equal(t, "good", resourceID)
				require.Equal(t, "pending", status)
			})
		}
	}
}

func TestChangesAcceptsRowsAtTheLimits(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	tests := []struct{ name, cols, vals string }{
		{"resource_id of 512 bytes", "target, resource_id, fields", `'territory', repeat('é', 256), '{"a": 1}'`},
		{"resource_id with spaces, slashes and unicode", "target, resource_id, fields", `'territory', 'a/b c ü', '{"a": 1}'`},
		{"fields of exactly 64 KiB", "target, resource_id, fields", `'territory', 'r1', jsonb_build_object('note', repeat('x', 65524))`},
		{"fields with a nested id", "target, resource_id, fields", `'territory', 'r1', '{"owner": {"id": 7}}'`},
		{"fields nested 32 levels deep", "target, resource_id, fields", `'territory', 'r1', (repeat('{"a": ', 31) || '[1]' || repeat('}', 31))::jsonb`},
		{"resource_id with spaces around it", "target, resource_id, fields", `'territory', ' r1 ', '{"a": 1}'`},
		{"fields with null values", "target, resource_id, fields", `'territory', 'r1', '{"phone": null}'`},
		{"create with fields", "target, resource_id, op, fields", `'territory', 'r1', 'create', '{"a": 1}'`},
		{"delete without fields", "target, resource_id, op", `'territory', 'r1', 'delete'`},
		{"idempotency key of 200 bytes", "target, resource_id, fields, idempotency_key", `'territory', 'r1', '{"a": 1}', repeat('k', 200)`},
		{"terminal status with finished_at", "target, resource_id, fields, status, finished_at", `'territory', 'r1', '{"a": 1}', 'applied', now()`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var id int64
			err := d.Pool.QueryRow(t.Context(),
				fmt.Sprintf("INSERT INTO stagesync.changes (%s) VALUES (%s) RETURNING id", tt.cols, tt.vals)).Scan(&id)
			require.NoError(t, err)
			require.Positive(t, id)
		})
	}
}

func TestChangesIdempotencyKey(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	const insert = `INSERT INTO stagesync.changes (target, resource_id, fields, source, idempotency_key)
		VALUES ('territory', 'r1', $1, $2, $3)`

	countKey := func(t *testing.T, key string) int {
		t.Helper()
		var n int
		require.NoError(t, d.Pool.QueryRow(t.Context(),
			"SELECT count(*) FROM stagesync.changes WHERE idempotency_key = $1", key).Scan(&n))
		return n
	}

	t.Run("a retry with on conflict do nothing leaves one row", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		var firstID int64
		require.NoError(t, d.Pool.QueryRow(ctx, insert+" ON CONFLICT DO NOTHING RETURNING id",
			`{"name": "first"}`, "crm", "retry-1").Scan(&firstID))
		var secondID int64
		err := d.Pool.QueryRow(ctx, insert+" ON CONFLICT DO NOTHING RETURNING id",
			`{"name": "second"}`, "crm", "retry-1").Scan(&secondID)
		require.ErrorIs(t, err, pgx.ErrNoRows, "the retry must insert nothing")

		require.Equal(t, 1, countKey(t, "retry-1"))
		var name string
		require.NoError(t, d.Pool.QueryRow(ctx,
			"SELECT fields->>'name' FROM stagesync.changes WHERE id = $1", firstID).Scan(&name))
		require.Equal(t, "first", name, "the retry must not overwrite the first row")
	})

	t.Run("a retry without on conflict fails on the unique key", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		_, err := d.Pool.Exec(ctx, insert, `{"a": 1}`, "crm", "retry-2")
		require.NoError(t, err)
		_, err = d.Pool.Exec(ctx, insert, `{"a": 1}`, "crm", "retry-2")
		pgErr := requirePgError(t, err, "23505")
		require.Equal(t, "changes_idempotency_key_unique", pgErr.ConstraintName)
		require.Equal(t, 1, countKey(t, "retry-2"))
	})

	t.Run("the same key from another source is allowed", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		_, err := d.Pool.Exec(ctx, insert, `{"a": 1}`, "crm", "shared-key")
		require.NoError(t, err)
		_, err = d.Pool.Exec(ctx, insert, `{"a": 1}`, "erp", "shared-key")
		require.NoError(t, err)
		require.Equal(t, 2, countKey(t, "shared-key"))
	})

	t.Run("rows without a key never conflict", func(t *testing.T) {
		t.Parallel()
		ctx := t.Context()
		for range 2 {
			_, err := d.Pool.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields, source)
				VALUES ('territory', 'r1', '{"a": 1}', 'keyless') ON CONFLICT DO NOTHING`)
			require.NoError(t, err)
		}
		var n int
		require.NoError(t, d.Pool.QueryRow(ctx,
			"SELECT count(*) FROM stagesync.changes WHERE source = 'keyless'").Scan(&n))
		require.Equal(t, 2, n)
	})
}

func TestUpdatedAtIsTouchedOnUpdate(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	past := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct{ name, insert, update string }{
		{
			name: "changes",
			insert: `INSERT INTO stagesync.changes (target, resource_id, fields, created_at, updated_at)
				VALUES ('territory', 'r1', '{"a": 1}', $1, $1) RETURNING id::text`,
			update: `UPDATE stagesync.changes SET status = 'processing', updated_at = '2000-01-01'
				WHERE id = $1::bigint RETURNING created_at, updated_at, now()`,
		},
		{
			name: "targets",
			insert: `INSERT INTO stagesync.targets (name, base_url, item_path, created_at, updated_at)
				VALUES ('touched', 'http://127.0.0.1:1', '/x/{id}', $1, $1) RETURNING name`,
			update: `UPDATE stagesync.targets SET base_url = 'http://127.0.0.1:2', updated_at = '2000-01-01'
				WHERE name = $1 RETURNING created_at, updated_at, now()`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			var key string
			require.NoError(t, d.Pool.QueryRow(ctx, tt.insert, past).Scan(&key))

			var createdAt, updatedAt, now time.Time
			require.NoError(t, d.Pool.QueryRow(ctx, tt.update, key).Scan(&createdAt, &updatedAt, &now))
			require.True(t, updatedAt.Equal(now), "updated_at = %v; want the updating transaction's now() %v", updatedAt, now)
			require.True(t, createdAt.Equal(past), "created_at = %v; want it unchanged at %v", createdAt, past)
		})
	}
}

func TestChangesFinishedAtIffTerminal(t *testing.T) {
	t.Parallel()
	d := newTestDB(t)
	statuses := []struct {
		status   string
		terminal bool
	}{
		{"pending", false}, {"processing", false},
		{"applied", true}, {"merged", true}, {"noop", true}, {"dead", true}, {"rejected", true},
	}
	for _, s := range statuses {
		for _, finished := range []bool{false, true} {
			name := fmt.Sprintf("%s without finished_at", s.status)
			if finished {
				name = fmt.Sprintf("%s with finished_at", s.status)
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				var finishedAt *time.Time
				if finished {
					ts := time.Now()
					finishedAt = &ts
				}
				_, err := d.Pool.Exec(t.Context(), `INSERT INTO stagesync.changes
					(target, resource_id, fields, status, finished_at)
					VALUES ('territory', 'r1', '{"a": 1}', $1, $2)`, s.status, finishedAt)
				if finished == s.terminal {
					require.NoError(t, err)
					return
				}
				pgErr := requirePgError(t, err, "23514")
				require.Equal(t, "changes_finished_iff_terminal", pgErr.ConstraintName)
			})
		}
	}

	t.Run("finishing without setting finished_at is refused", func(t *testing.T) {
		t.Parallel()
		id := insertChange(t, d.Pool, change{Status: "processing"})
		_, err := d.Pool.Exec(t.Context(), "UPDATE stagesync.changes SET status = 'applied' WHERE id = $1", id)
		pgErr := requirePgError(t, err, "23514")
		require.Equal(t, "changes_finished_iff_terminal", pgErr.ConstraintName)
	})

	t.Run("reopening without clearing finished_at is refused", func(t *testing.T) {
		t.Parallel()
		id := insertChange(t, d.Pool, change{Status: "dead", FinishedAt: time.Now()})
		_, err := d.Pool.Exec(t.Context(), "UPDATE stagesync.changes SET status = 'pending' WHERE id = $1", id)
		pgErr := requirePgError(t, err, "23514")
		require.Equal(t, "changes_finished_iff_terminal", pgErr.ConstraintName)
	})

	t.Run("finishing with finished_at is accepted", func(t *testing.T) {
		t.Parallel()
		id := insertChange(t, d.Pool, change{Status: "processing"})
		tag, err := d.Pool.Exec(t.Context(),
			"UPDATE stagesync.changes SET status = 'merged', finished_at = now() WHERE id = $1", id)
		require.NoError(t, err)
		require.Equal(t, int64(1), tag.RowsAffected())
	})
}

package db_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// notifications returns the payloads a listener on stagesync_changes receives
// up to a marker sent after act has returned. Notifications are delivered in
// commit order, so the marker bounds what act caused without guessing at a
// quiet period.
func notifications(t *testing.T, d testDB, act func(t *testing.T)) []string {
	t.Helper()
	ctx := t.Context()
	listener := d.conn(t, "")
	_, err := listener.Exec(ctx, "LISTEN stagesync_changes")
	require.NoError(t, err)

	act(t)
	const marker = "test-marker"
	_, err = d.Pool.Exec(ctx, "SELECT pg_notify('stagesync_changes', $1)", marker)
	require.NoError(t, err)

	payloads := []string{}
	for {
		waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := listener.WaitForNotification(waitCtx)
		cancel()
		require.NoError(t, err, "no notification within 10s; got %q so far", payloads)
		require.Equal(t, "stagesync_changes", n.Channel)
		if n.Payload == marker {
			return payloads
		}
		payloads = append(payloads, n.Payload)
	}
}

func TestChangesInsertNotifies(t *testing.T) {
	t.Parallel()
	const insert = `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'r1', '{"a": 1}')`
	tests := []struct {
		name string
		act  func(t *testing.T, d testDB)
		want []string
	}{
		{
			name: "a single-row insert",
			act: func(t *testing.T, d testDB) {
				_, err := d.Pool.Exec(t.Context(), insert)
				require.NoError(t, err)
			},
			want: []string{"INSERT"},
		},
		{
			name: "a multi-row insert notifies once",
			act: func(t *testing.T, d testDB) {
				_, err := d.Pool.Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields)
					SELECT 'territory', 'r' || i, '{"a": 1}' FROM generate_series(1, 500) i`)
				require.NoError(t, err)
			},
			want: []string{"INSERT"},
		},
		{
			name: "a copy notifies once",
			act: func(t *testing.T, d testDB) {
				rows := [][]any{{"territory", "r1", `{"a": 1}`}, {"territory", "r2", `{"a": 2}`}, {"billing", "r3", `{"a": 3}`}}
				n, err := d.Pool.CopyFrom(t.Context(), pgx.Identifier{"stagesync", "changes"},
					[]string{"target", "resource_id", "fields"}, pgx.CopyFromRows(rows))
				require.NoError(t, err)
				require.Equal(t, int64(3), n)
			},
			want: []string{"INSERT"},
		},
		{
			name: "two inserts in two transactions notify twice",
			act: func(t *testing.T, d testDB) {
				for range 2 {
					_, err := d.Pool.Exec(t.Context(), insert)
					require.NoError(t, err)
				}
			},
			want: []string{"INSERT", "INSERT"},
		},
		{
			name: "a refused insert does not notify",
			act: func(t *testing.T, d testDB) {
				_, err := d.Pool.Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields)
					VALUES ('territory', 'r1', '[]')`)
				requirePgError(t, err, "23514")
			},
			want: []string{},
		},
		{
			name: "a rolled back insert does not notify",
			act: func(t *testing.T, d testDB) {
				tx, err := d.Pool.Begin(t.Context())
				require.NoError(t, err)
				_, err = tx.Exec(t.Context(), insert)
				require.NoError(t, err)
				require.NoError(t, tx.Rollback(t.Context()))
			},
			want: []string{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			got := notifications(t, d, func(t *testing.T) { tt.act(t, d) })
			require.Equal(t, tt.want, got)
		})
	}
}

func TestRequeueNotifies(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		target    string
		wantMoved int
		want      []string
	}{
		{"a requeue that moves rows", "territory", 1, []string{"REQUEUE"}},
		{"a requeue that moves nothing", "billing", 0, []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := newTestDB(t)
			insertChange(t, d.Pool, change{Target: "territory", Status: "dead", FinishedAt: time.Now()})
			insertChange(t, d.Pool, change{Target: "billing", Status: "rejected", FinishedAt: time.Now()})

			got := notifications(t, d, func(t *testing.T) {
				var moved int
				require.NoError(t, d.Pool.QueryRow(t.Context(),
					"SELECT stagesync.requeue(target => $1)", tt.target).Scan(&moved))
				require.Equal(t, tt.wantMoved, moved)
			})
			require.Equal(t, tt.want, got)
		})
	}
}

package db_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/dbtest"
)

// BenchmarkUpstreamInsert measures what an upstream pays to stage changes as
// stagesync_upstream, through everything an insert runs: the CHECK
// constraints, row-level security, the foreign key, the unique idempotency
// index and the statement triggers. Issue 10 §3 bounds what clearer errors
// may cost: within 10% of the schema before them.
//
//   - bulk: one INSERT … SELECT FROM unnest(…) of 10,000 rows per statement.
//   - single rows: 1,000 one-row INSERT statements sent as one pgx batch
//     (one round trip; what an upstream writing row by row pays at best).
//
// Every row carries an idempotency key, as a careful upstream's do. The
// table grows by each iteration's rows, so compare runs of the same
// -benchtime (e.g. -benchtime 20x).
func BenchmarkUpstreamInsert(b *testing.B) {
	b.Run("bulk", func(b *testing.B) {
		const rows = 10000
		b.Logf("settings: one INSERT … SELECT FROM unnest of %d rows per statement, as a login granted stagesync_upstream (checks, RLS and triggers included)", rows)
		conn := upstreamConn(b)
		ids, fields, keys := make([]string, rows), make([]string, rows), make([]string, rows)
		batch := 0
		for b.Loop() {
			batch++
			for i := range rows {
				ids[i] = fmt.Sprintf("ACC-%06d", (batch*rows+i)%50000)
				fields[i] = fmt.Sprintf(`{"owner": "user%d", "status": "s%d", "region": "emea"}`, i, i%7)
				keys[i] = fmt.Sprintf("crm-batch-%d/%d", batch, i)
			}
			tag, err := conn.Exec(b.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields, idempotency_key)
				SELECT 'territory', u.r, u.f, u.k FROM unnest($1::text[], $2::jsonb[], $3::text[]) AS u (r, f, k)`,
				ids, fields, keys)
			require.NoError(b, err)
			require.Equal(b, int64(rows), tag.RowsAffected())
		}
		b.ReportMetric(float64(b.N*rows)/b.Elapsed().Seconds(), "rows/s")
	})

	b.Run("single rows", func(b *testing.B) {
		const rows = 1000
		b.Logf("settings: %d single-row INSERTs per round trip (a pgx batch), as a login granted stagesync_upstream", rows)
		conn := upstreamConn(b)
		batch := 0
		for b.Loop() {
			batch++
			var pb pgx.Batch
			for i := range rows {
				pb.Queue(`INSERT INTO stagesync.changes (target, resource_id, fields, idempotency_key)
					VALUES ('territory', $1, $2, $3)`,
					fmt.Sprintf("ACC-%06d", (batch*rows+i)%50000),
					fmt.Sprintf(`{"owner": "user%d", "status": "s%d", "region": "emea"}`, i, i%7),
					fmt.Sprintf("crm-single-%d/%d", batch, i))
			}
			require.NoError(b, conn.SendBatch(b.Context(), &pb).Close())
		}
		b.ReportMetric(float64(b.N*rows)/b.Elapsed().Seconds(), "rows/s")
	})
}

// upstreamConn returns a connection to a fresh database with the target
// territory, as stagesync_upstream.
func upstreamConn(b *testing.B) *pgx.Conn {
	b.Helper()
	url := dbtest.NewDatabase(b)
	ctx := b.Context()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(b, err)
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	_, err = conn.Exec(ctx, `INSERT INTO stagesync.targets (name, base_url, item_path)
		VALUES ('territory', 'http://127.0.0.1:1', '/assignments/{id}')`)
	require.NoError(b, err)
	_, err = conn.Exec(ctx, "SET ROLE stagesync_upstream")
	require.NoError(b, err)
	return conn
}

package processor

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/db"
	"github.com/stagesync/stagesync/test/dbtest"
)

// Intents queued while a write is in progress are written together, in
// one statement (one transaction), and each caller learns its own row.
func TestOutboxGroupCommitsConcurrentIntents(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	o := newOutbox(pool)
	// A write is in progress: everyone who arrives now queues.
	o.mu.Lock()
	o.writing = true
	o.mu.Unlock()

	const n = 50
	ids := make([]int64, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ids[i], errs[i] = o.add(t.Context(), "crm", request{method: "GET", url: "http://remote/x", changeIDs: []int64{int64(i)}})
		})
	}
	for {
		o.mu.Lock()
		queued := len(o.queue)
		if queued == n {
			// The write in progress ends and hands over to the first.
			o.queue[0].lead <- struct{}{}
		}
		o.mu.Unlock()
		if queued == n {
			break
		}
	}
	wg.Wait()
	seen := map[int64]bool{}
	for i := range n {
		require.NoError(t, errs[i], "intent %d", i)
		require.NotZero(t, ids[i], "intent %d: got id 0; want its row's id", i)
		require.False(t, seen[ids[i]], "id %d given twice", ids[i])
		seen[ids[i]] = true
	}
	var rows, txs int
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*), count(DISTINCT xmin::text) FROM stagesync.outbox`).Scan(&rows, &txs))
	require.Equal(t, n, rows, "outbox rows: got %d; want %d", rows, n)
	require.Equal(t, 1, txs, "transactions that wrote them: got %d; want 1 (group commit)", txs)
	// Each id is its own request's row.
	for i := range n {
		var cids []int64
		require.NoError(t, pool.QueryRow(t.Context(), `SELECT change_ids FROM stagesync.outbox WHERE id = $1`, ids[i]).Scan(&cids))
		require.Equal(t, []int64{int64(i)}, cids, "row %d: got change_ids %v; want [%d]", ids[i], cids, i)
	}
	o.mu.Lock()
	require.False(t, o.writing, "writing after the queue drained: got true; want false")
	o.mu.Unlock()
}

// Intents are written through the job's own session, the one holding its
// resource locks: once that session is gone (terminated, like a failover
// would), the locks are gone too, another job may hold them, and no
// request may leave. An If-Match that is not valid UTF-8 is kept byte for
// byte beside a readable form.
func TestOutboxRefusesRequestsOnceTheLockSessionIsGone(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	q := db.New()
	holder, err := pool.Acquire(t.Context())
	require.NoError(t, err)
	defer holder.Release()
	locks, err := q.ResourceLocksTry(t.Context(), holder, db.ResourceLocksTryParams{Target: "crm", ResourceIDs: []string{"acct-1"}})
	require.NoError(t, err)
	require.True(t, locks[0].Locked)
	o := newOutbox(holder)
	write := request{method: "PATCH", resourceID: "acct-1", url: "http://remote/acct-1", ifMatch: "\"e1\xff\"",
		body: map[string]any{"status": "won"}, key: "k1"}

	id, err := o.add(t.Context(), "crm", write)
	require.NoError(t, err, "with the lock session alive")
	require.NotZero(t, id)
	var ifMatch string
	var raw []byte
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT if_match, if_match_raw FROM stagesync.outbox WHERE id = $1`, id).Scan(&ifMatch, &raw))
	require.Equal(t, `"e1\xff"`, ifMatch, "readable If-Match: got %q", ifMatch)
	require.Equal(t, []byte("\"e1\xff\""), raw, "raw If-Match bytes: got %q", raw)

	var ended bool
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT pg_terminate_backend($1)`, int32(holder.Conn().PgConn().PID())).Scan(&ended))
	require.True(t, ended)
	_, err = o.add(t.Context(), "crm", write)
	require.Error(t, err, "after the lock session ended: got nil; want an error (the request must not be sent)")
	var rows int
	require.NoError(t, pool.QueryRow(t.Context(), `SELECT count(*) FROM stagesync.outbox`).Scan(&rows))
	require.Equal(t, 1, rows, "outbox rows: got %d; want 1 (the first request only)", rows)
}

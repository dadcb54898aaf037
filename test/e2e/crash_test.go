package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// The promise, under everything at once: two `stagesync run` processes,
// repeated kill -9 of either, pg_terminate_backend of their database
// sessions, a remote that drops 2% of connections after committing the
// write, people editing the same fields in the remote, and upstream
// transactions that commit late (out of id order). Every change carries a
// value used nowhere else, so the remote's history shows exactly which
// change each write carried. Afterwards:
//
//   - every change is terminal;
//   - no change was written twice: no value is written by two API writes,
//     and no API write sets a value the field already held before (which
//     is also how a person's edit would be reverted);
//   - per field, API writes carry values of increasing change ids: never an
//     older value after a newer one;
//   - the audit holds an attempts row for every request the remote saw
//     (an 'unknown' one where the answer was lost), and no durable intent
//     is left unresolved.
func TestExactlyOnceInOrderAcrossCrashes(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("kills and restarts processes for half a minute")
	}
	h := newHarness(t, remotesim.Options{Latency: 5 * time.Millisecond, ConflictStatus: 412, DropAfterCommitRate: 0.02, Seed: 11})
	ids := resourceIDs("crash", 60)
	fields := []string{"status", "owner", "region"}
	h.seed(ids, map[string]any{"status": "s0", "owner": "o0", "region": "r0"})
	cfg := h.writeConfig(configYAML(
		map[string]string{"poll_interval": "500ms", "shutdown_grace": "1s"},
		map[string]string{"batch_size": "10", "workers": "4", "concurrency": "8", "timeout": "1s",
			"max_attempts": "200", "merge": "{default: ours, fields: {owner: theirs}}"}))
	const app = "stagesync-crash"
	procs := []*runProc{h.startRunAs("run-a", cfg, app), h.startRunAs("run-b", cfg, app)}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopUsers := h.sim.StartOtherUsers(ctx, 15, fields)
	defer stopUsers()

	// Upstream writers: each transaction inserts one to four changes and
	// commits 0–300ms later, three writers at once, so ids commit out of
	// order all the time.
	var (
		mu      sync.Mutex
		valueOf = map[string]int64{} // a change's value → the change's id
		seq     atomic.Int64
		staged  atomic.Int64
		wg      sync.WaitGroup
	)
	writeErr := make(chan error, 3)
	for w := range 3 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			for ctx.Err() == nil {
				if err := stageLate(ctx, h, rng, ids, fields, &seq, &mu, valueOf); err != nil {
					if ctx.Err() == nil {
						writeErr <- err
					}
					return
				}
				staged.Add(1)
			}
		})
	}

	// Chaos while they write: kill -9 one process and start it again, or
	// terminate every database session of both.
	rng := rand.New(rand.NewPCG(3, 3))
	kills, terminated := 0, 0
	deadline := time.Now().Add(12 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		time.Sleep(time.Duration(600+rng.IntN(900)) * time.Millisecond)
		if i%3 == 2 {
			terminated += h.terminateSessions(app)
			continue
		}
		k := rng.IntN(len(procs))
		procs[k].kill()
		kills++
		time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
		procs[k] = h.startRunAs(fmt.Sprintf("%s-%d", procs[k].name[:5], i), cfg, app)
	}
	cancel()
	wg.Wait()
	close(writeErr)
	for err := range writeErr {
		require.NoError(t, err, "upstream writer")
	}
	h.waitDrained(3 * time.Minute)
	stopUsers()
	h.waitSimSettled()
	h.waitFor("every durable intent resolved", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.outbox`) == 0
	})

	counts := h.statusCounts()
	total := 0
	for _, n := range counts {
		total += n
	}
	t.Logf("%d upstream transactions, %d changes, %d kills, %d sessions terminated; outcomes %v; %d unknown attempts",
		staged.Load(), total, kills, terminated, counts, h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'unknown'`))
	for reason, n := range deadReasons(t, h) {
		t.Logf("%d dead: %s", n, reason)
	}
	require.Greater(t, kills, 3, "kills: got %d; want several", kills)
	require.Greater(t, terminated, 0, "terminated sessions: got %d; want some", terminated)
	changeIDs := map[int64]bool{}
	for _, id := range valueOf {
		changeIDs[id] = true
	}
	require.Equal(t, len(changeIDs), total, "changes: got %d; want the %d staged", total, len(changeIDs))
	require.Zero(t, counts["pending"]+counts["processing"], "open changes: got %v; want none", counts)

	writes := 0
	for _, id := range ids {
		writes += requireWrittenOnceInOrder(t, h, id, fields, valueOf)
	}
	require.Greater(t, writes, len(ids), "api writes: got %d; want the changes to have reached the remote", writes)
	requireAttemptForEveryRequest(t, h)
}

// stageLate inserts one to four changes in one transaction, each field a
// fresh value, and commits after a random pause.
func stageLate(ctx context.Context, h *harness, rng *rand.Rand, ids, fields []string, seq *atomic.Int64, mu *sync.Mutex, valueOf map[string]int64) error {
	tx, err := h.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	staged := map[string]int64{}
	for range 1 + rng.IntN(4) {
		f := map[string]any{}
		for _, name := range fields {
			if rng.IntN(2) == 0 || len(f) == 0 && name == fields[len(fields)-1] {
				f[name] = fmt.Sprintf("v%d", seq.Add(1))
			}
		}
		b, err := json.Marshal(f)
		if err != nil {
			return err
		}
		var id int64
		if err := tx.QueryRow(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ($1, $2, $3::jsonb) RETURNING id`,
			target, ids[rng.IntN(len(ids))], string(b)).Scan(&id); err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		for _, v := range f {
			staged[v.(string)] = id
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(time.Duration(rng.IntN(300)) * time.Millisecond):
	}
	// Committed whatever happens to ctx, so that every change that exists
	// is one whose values are known.
	if err := tx.Commit(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	mu.Lock()
	defer mu.Unlock()
	for v, id := range staged {
		valueOf[v] = id
	}
	return nil
}

// requireWrittenOnceInOrder checks a resource's history: each API write
// sets values of changes (Version.Written), never a value the field held
// before (no duplicate, no revert) and, per field, values of increasing
// change ids. It returns the number of API writes.
func requireWrittenOnceInOrder(t *testing.T, h *harness, id string, fields []string, valueOf map[string]int64) int {
	t.Helper()
	held := map[string]map[any]bool{} // field → every value it ever held
	lastID := map[string]int64{}
	var prev map[string]any
	writes := 0
	for n, v := range h.sim.History(id) {
		if v.Writer == "api" && !v.Deleted {
			writes++
			for _, f := range fields {
				val, ok := v.Written[f]
				if !ok {
					continue
				}
				s, _ := val.(string)
				cid, ours := valueOf[s]
				require.True(t, ours, "%s version %d: api write set %s = %v, not a value of any change", id, n, f, val)
				require.False(t, held[f][val], "%s version %d: api write set %s = %v, which the field already held before: written twice%s",
					id, n, f, val, reverted(prev, f))
				require.Greater(t, cid, lastID[f], "%s version %d: %s = %v of change %d written after change %d's value: an older value after a newer",
					id, n, f, val, cid, lastID[f])
				lastID[f] = cid
			}
		}
		for _, f := range fields {
			if held[f] == nil {
				held[f] = map[any]bool{}
			}
			held[f][v.Fields[f]] = true
		}
		prev = v.Fields
	}
	return writes
}

// reverted names a person's edit the write replaced, for a failure message.
func reverted(prev map[string]any, f string) string {
	if s, _ := prev[f].(string); strings.HasPrefix(s, "user-edit-") {
		return fmt.Sprintf(" (and it reverted a person's edit %q)", s)
	}
	return ""
}

// deadReasons counts dead changes by the start of their last_error.
func deadReasons(t *testing.T, h *harness) map[string]int {
	t.Helper()
	rows, err := h.pool.Query(context.Background(), `SELECT left(last_error, 90), count(*) FROM stagesync.changes WHERE status = 'dead' GROUP BY 1`)
	require.NoError(t, err)
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var r string
		var n int
		require.NoError(t, rows.Scan(&r, &n))
		out[r] = n
	}
	require.NoError(t, rows.Err())
	return out
}

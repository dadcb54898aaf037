package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// Two `stagesync run` processes on one database share the work, and the
// remote never sees two requests in flight for one resource.
func TestTwoProcessesNeverOverlapOnAResource(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 5 * time.Millisecond})
	ids := resourceIDs("shared", 40)
	base := map[string]any{"seq": -1, "owner": "seed"}
	h.seed(ids, base)
	cfg := h.writeConfig(configYAML(map[string]string{"poll_interval": "500ms"},
		map[string]string{"batch_size": "5", "workers": "4", "concurrency": "8"}))
	a := h.startRun("run-a", cfg)
	b := h.startRun("run-b", cfg)

	var cs []change
	for w := range 15 {
		var wave []change
		for i, id := range ids {
			wave = append(wave, change{resource: id, fields: map[string]any{"seq": w, "owner": fmt.Sprintf("crm-%d-%d", w, i)}})
		}
		h.insert(wave...)
		cs = append(cs, wave...)
		// Insert the next wave while this one is being worked on.
		before := h.sim.Stats().Patches
		h.waitFor("progress", 30*time.Second, func() bool { return h.sim.Stats().Patches >= before+10 })
	}
	h.waitDrained(60 * time.Second)
	a.stop(t)
	b.stop(t)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(cs)}, counts, "status counts: got %v; want all %d applied", counts, len(cs))
	h.requireRemote(expected(base, ids, cs))
	for _, id := range ids {
		h.requireIncreasing(id, "seq")
	}
	st := h.sim.Stats()
	require.Equal(t, 1, st.MaxInFlightPerResource, "max in flight per resource: got %d; want 1", st.MaxInFlightPerResource)
	require.Equal(t, 0, st.Conflicts, "conflicts: got %d; want 0 (each process sees the other's stored ETags)", st.Conflicts)
	var clients int
	require.NoError(t, h.pool.QueryRow(context.Background(), `
		SELECT count(DISTINCT c) FROM river_job, unnest(attempted_by) AS c WHERE kind = 'stagesync_apply'`).Scan(&clients))
	require.Equal(t, 2, clients, "processes that ran apply jobs: got %d; want 2", clients)
	h.requireAuditMatchesRemote()
}

// kill -9 mid-drain, then a restart (which hands the dead process's
// running jobs back by liveness, with the default rescue_after), while
// more changes arrive for some resources. The writes the dead process made
// but never recorded were made durable before they left: each becomes an
// 'unknown' attempts row and puts its resource in doubt, and the restart
// resends that very request (the remote replays it by its Idempotency-Key)
// instead of looking the ETag up again. Every change ends terminal, no
// write reaches the remote twice, and nothing is left in doubt.
func TestCrashMidDrainAndRestart(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 20 * time.Millisecond, IdempotencyCache: true})
	ids := resourceIDs("crash", 200)
	base := map[string]any{"seq": -1, "w0": -1, "w1": -1, "w2": -1}
	h.seed(ids, base)
	cfg := h.writeConfig(configYAML(
		map[string]string{"poll_interval": "1s", "shutdown_grace": "2s"},
		map[string]string{"batch_size": "50", "workers": "4", "concurrency": "4", "timeout": "1s"}))
	first := h.startRun("run-1", cfg)

	const waves = 10
	var cs []change
	// insertWaves stages waves [from, to) for ids in one transaction, so a
	// job sees all of them or none.
	insertWaves := func(from, to int, ids []string) {
		var batch []change
		for w := from; w < to; w++ {
			for _, id := range ids {
				batch = append(batch, change{resource: id, fields: map[string]any{"seq": w, fmt.Sprintf("w%d", w%3): w}})
			}
		}
		h.insert(batch...)
		cs = append(cs, batch...)
	}
	insertWaves(0, 1, ids)
	h.waitDrained(30 * time.Second)
	insertWaves(1, 6, ids)
	before := h.sim.Stats().Patches
	h.waitFor("60 more writes", 30*time.Second, func() bool { return h.sim.Stats().Patches >= before+60 })
	first.kill()
	open := h.count(`SELECT count(*) FROM stagesync.changes WHERE status IN ('pending', 'processing')`)
	require.Greater(t, open, 0, "open changes at the kill: got 0; want some (the kill must land mid-drain)")
	h.waitSimSettled()
	// Writes the remote took but the dead process never recorded: the
	// remote's ETag is not the stored one.
	stored := h.storedResources()
	var unrecorded []string
	for _, id := range ids {
		if _, etag, _ := h.sim.Get(id); etag != stored[id].etag {
			unrecorded = append(unrecorded, id)
		}
	}
	require.GreaterOrEqual(t, len(unrecorded), 2, "unrecorded writes at the kill: got %d; want ≥ 2", len(unrecorded))
	t.Logf("killed with %d open changes and %d unrecorded writes, after %d PATCHes", open, len(unrecorded), h.sim.Stats().Patches)
	// More changes arrive while no process runs, for every other resource
	// with an unrecorded write and half of the rest.
	var more []string
	for i, id := range ids {
		if i%2 == 0 {
			more = append(more, id)
		}
	}
	insertWaves(6, waves, more)
	h.startRun("run-2", cfg)
	h.waitDrained(90 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, 0, counts["dead"]+counts["rejected"], "status counts: got %v; want only applied, merged, noop", counts)
	require.Equal(t, len(cs), counts["applied"]+counts["merged"]+counts["noop"], "terminal changes: got %v; want %d", counts, len(cs))
	h.requireRemote(expected(base, ids, cs))
	for _, id := range ids {
		seq := h.requireIncreasing(id, "seq")
		require.LessOrEqual(t, len(seq), waves, "api writes of %q: got %d; want ≤ %d", id, len(seq), waves)
	}
	// Each unrecorded write is in the audit as a request with an unknown
	// outcome, and was resolved: the stored state matches the remote.
	for _, id := range unrecorded {
		n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE resource_id = $1 AND outcome = 'unknown'`, id)
		require.GreaterOrEqual(t, n, 1, "unknown attempts of %q (written, never recorded): got %d; want ≥ 1", id, n)
	}
	stored = h.storedResources()
	for _, id := range ids {
		_, etag, _ := h.sim.Get(id)
		require.Equal(t, etag, stored[id].etag, "stored ETag of %q: got %q; want %q", id, stored[id].etag, etag)
	}
	require.Zero(t, h.count(`SELECT count(*) FROM stagesync.resources WHERE in_doubt IS NOT NULL`), "resources in doubt: got some; want none")
	require.Equal(t, 1, h.sim.Stats().MaxInFlightPerResource, "max in flight per resource: got %d; want 1", h.sim.Stats().MaxInFlightPerResource)
	h.waitFor("every durable intent resolved", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.outbox`) == 0
	})
	requireAttemptForEveryRequest(t, h)
	t.Logf("after restart: %v; sim stats %+v", counts, h.sim.Stats())
}

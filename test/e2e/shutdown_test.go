package e2e

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// SIGTERM while jobs are mid-round and changes keep arriving: after a
// restart every change finishes. Nothing may be left processing without a
// job that resumes it (SPEC §6), and no write may reach the remote twice.
func TestGracefulStopMidRoundThenRestart(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 40 * time.Millisecond, IdempotencyCache: true})
	ids := resourceIDs("term", 60)
	base := map[string]any{"seq": -1}
	h.seed(ids, base)
	// A round of a job (30 resources, 2 at a time, 40ms each) lasts ~600ms,
	// much longer than the grace, so the stop lands mid-round.
	cfg := h.writeConfig(configYAML(
		map[string]string{"poll_interval": "1s", "shutdown_grace": "300ms"},
		map[string]string{"batch_size": "30", "workers": "2", "concurrency": "2"}))
	first := h.startRun("run-1", cfg)

	var (
		mu   sync.Mutex
		cs   []change
		wave int
	)
	insertWave := func() error {
		mu.Lock()
		defer mu.Unlock()
		var w []change
		for _, id := range ids {
			w = append(w, change{resource: id, fields: map[string]any{"seq": wave}})
		}
		if _, err := h.tryInsert(w...); err != nil {
			return err
		}
		wave++
		cs = append(cs, w...)
		return nil
	}
	require.NoError(t, insertWave())
	h.waitFor("the first writes", 30*time.Second, func() bool { return h.sim.Stats().Patches >= 10 })

	// Keep inserting, every 50ms, across the stop.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if err := insertWave(); err != nil {
					t.Errorf("insert a wave: %v", err)
					return
				}
			}
		}
	})
	h.waitFor("more writes", 30*time.Second, func() bool { return h.sim.Stats().Patches >= 40 })
	require.NoError(t, first.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-first.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("run-1 did not exit within 60s of SIGTERM")
	}
	require.NoError(t, first.waitErr, "run-1 exit after SIGTERM: got %v; want a clean exit", first.waitErr)
	cancel()
	wg.Wait()

	h.startRun("run-2", cfg)
	h.waitDrained(60 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, len(cs), counts["applied"]+counts["merged"]+counts["noop"],
		"status counts: got %v; want all %d applied, merged or noop", counts, len(cs))
	h.requireRemote(expected(base, ids, cs))
	for _, id := range ids {
		h.requireIncreasing(id, "seq")
	}
	require.Equal(t, 1, h.sim.Stats().MaxInFlightPerResource, "max in flight per resource: got %d; want 1", h.sim.Stats().MaxInFlightPerResource)
	h.requireAuditCoversRemote()
	t.Logf("%d waves; final %v", wave, counts)
}

// requireNoPhantomAttempts checks that attempts rows stand for requests the
// remote saw: per method, at most slack more rows than requests (a request
// cancelled in the instant between leaving the client and reaching the
// handler). A request given up before it was sent is not an attempt.
func requireNoPhantomAttempts(t *testing.T, h *harness, slack int) {
	t.Helper()
	_, seen := h.simAnswers()
	rows := map[string]int{}
	for k, n := range h.attemptsByMethodStatus() {
		rows[k.method] += n
	}
	for m, n := range rows {
		require.LessOrEqual(t, n, seen[m]+slack, "%s attempts rows: got %d; want ≤ %d (the simulator saw %d requests; rows for requests never sent?)", m, n, seen[m]+slack, seen[m])
	}
}

// A stop that cancels a job mid-round must not spend the attempt budget
// of changes whose request was never sent, nor record such a request as an
// attempt: with max_attempts 1, only a change whose request reached the
// remote may end dead.
func TestStopNeverSpendsAttemptsOnUnsentRequests(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 100 * time.Millisecond})
	ids := resourceIDs("budget", 20)
	h.seed(ids, map[string]any{"owner": "seed"})
	cfg := h.writeConfig(configYAML(
		map[string]string{"shutdown_grace": "150ms"},
		map[string]string{"batch_size": "20", "workers": "1", "concurrency": "1", "max_attempts": "1"}))
	first := h.startRun("run-1", cfg)
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	changeIDs := h.insert(cs...)
	h.waitFor("the first write", 30*time.Second, func() bool { return h.sim.Stats().Patches >= 1 })
	first.stop(t)
	h.waitSimSettled()
	sent := map[string]bool{}
	for _, r := range h.sim.Requests() {
		sent[r.ID] = true
	}
	require.Less(t, len(sent), len(ids), "resources sent a request before the stop: got %d; want fewer than %d", len(sent), len(ids))
	h.startRun("run-2", cfg)
	h.waitDrained(60 * time.Second)

	var unsentDead []string
	for _, r := range h.changes(changeIDs) {
		if r.status == "dead" && !sent[r.resource] {
			unsentDead = append(unsentDead, fmt.Sprintf("%s (%s)", r.resource, r.lastError))
		}
	}
	slices.Sort(unsentDead)
	require.Empty(t, unsentDead, "changes dead without a request ever sent: got %d %v; want none", len(unsentDead), unsentDead)
	h.requireAuditCoversRemote()
	requireNoPhantomAttempts(t, h, 1)
}

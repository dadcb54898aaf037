package e2e

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A fault at each point between "the request left" and "its outcome is
// recorded", on a resource whose ETag is stored:
//
//   - the process is killed (kill -9) while the remote holds the request,
//     before it commits;
//   - the process is killed right after the remote committed the write and
//     before its answer left;
//   - the remote commits the write and drops the connection;
//   - the answer arrives, but the processor's database sessions are
//     terminated first, so the round can't be recorded.
//
// In each case a person may then edit the same field before stagesync
// works the resource again. The remote's history must show the change
// written once, a person's edit never reverted (the change ends dead,
// needs_review, under policy ours), an untouched resource's change
// applied, and an 'unknown' attempts row for the request whose answer was
// lost.
func TestEveryCrashPointWritesAtMostOnce(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts and kills processes")
	}
	points := []string{"killed before commit", "killed after commit", "dropped after commit", "sessions terminated after commit"}
	for _, point := range points {
		for _, personEdits := range []bool{false, true} {
			name := point
			if personEdits {
				name += " then a person edits"
			}
			t.Run(strings.ReplaceAll(name, " ", "_"), func(t *testing.T) {
				t.Parallel()
				crashPoint(t, point, personEdits)
			})
		}
	}
}

func crashPoint(t *testing.T, point string, personEdits bool) {
	const app = "stagesync-crashpoint"
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	h.sim.Put("acct", map[string]any{"status": "open", "owner": "seed"})
	cfg := h.writeConfig(configYAML(
		map[string]string{"poll_interval": "500ms", "shutdown_grace": "1s"},
		map[string]string{"timeout": "2s", "max_attempts": "50"}))
	proc := h.startRunAs("run-1", cfg, app)
	// Wave 1 stores the ETag: the next write goes out at once with If-Match.
	h.insert(change{resource: "acct", fields: map[string]any{"note": "w1"}})
	h.waitDrained(30 * time.Second)

	var (
		once    sync.Once
		crashed = make(chan struct{})
	)
	crash := func() {
		if personEdits {
			h.sim.Edit("acct", map[string]any{"status": "person"}, "other-user")
		}
		switch point {
		case "killed after commit":
			proc.kill()
		case "sessions terminated after commit":
			// Not h.terminateSessions: this runs on the remote's goroutine.
			_, err := h.pool.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
				WHERE datname = current_database() AND application_name = $1`, app)
			if err != nil {
				t.Errorf("terminate the processor's sessions: %v", err)
			}
		}
		close(crashed)
	}
	switch point {
	case "killed before commit":
		// The remote holds every request for a second: the process dies
		// while its write is in the remote's hands, which commits it after.
		h.sim.SetFaults(remotesim.Faults{Latency: time.Second})
		h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(context.Context, remotesim.Commit) { once.Do(crash) }})
	case "dropped after commit":
		h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(_ context.Context, c remotesim.Commit) {
			if c.Request.Fault != "" {
				once.Do(crash)
			}
		}})
		h.sim.SetFaults(remotesim.Faults{DropAfterCommitRate: 1})
	default:
		h.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(context.Context, remotesim.Commit) { once.Do(crash) }})
	}
	ids := h.insert(change{resource: "acct", fields: map[string]any{"status": "crm"}})
	if point == "killed before commit" {
		h.waitFor("the write to be made durable", 30*time.Second, func() bool {
			return h.count(`SELECT count(*) FROM stagesync.outbox WHERE method = 'PATCH'`) > 0
		})
		time.Sleep(200 * time.Millisecond) // in the remote's hands
		proc.kill()
	}
	select {
	case <-crashed:
	case <-time.After(30 * time.Second):
		t.Fatalf("the write never reached the remote")
	}
	h.sim.SetHooks(remotesim.Hooks{})
	h.sim.SetFaults(remotesim.Faults{})
	if point == "killed before commit" || point == "killed after commit" {
		h.startRunAs("run-2", cfg, app)
	}
	h.waitDrained(2 * time.Minute)
	h.waitSimSettled()

	row := h.changes(ids)[ids[0]]
	got, _, _ := h.sim.Get("acct")
	var crmWrites int
	for _, v := range h.apiVersions("acct") {
		if v.Written["status"] == "crm" {
			crmWrites++
		}
	}
	require.Equal(t, 1, crmWrites, "api writes carrying the change: got %d; want 1", crmWrites)
	if personEdits {
		require.Equal(t, "dead", row.status, "change: got %s; want dead (last_error %q)", row.status, row.lastError)
		require.Contains(t, row.lastError, "needs_review", "last_error: got %q; want needs_review", row.lastError)
		require.Equal(t, "person", got["status"], "remote status: got %v; want the person's edit, never reverted", got["status"])
	} else {
		require.Equal(t, "applied", row.status, "change: got %s; want applied (last_error %q)", row.status, row.lastError)
		require.Equal(t, "crm", got["status"], "remote status: got %v; want crm", got["status"])
	}
	unknown := h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND outcome = 'unknown'`)
	require.GreaterOrEqual(t, unknown, 1, "PATCH attempts with an unknown outcome: got %d; want ≥ 1", unknown)
	require.Zero(t, h.count(`SELECT count(*) FROM stagesync.outbox`), "outbox rows left: got some; want none")
	requireAttemptForEveryRequest(t, h)
	t.Logf("%s: %s; %d unknown attempts", point, row.status, unknown)
}

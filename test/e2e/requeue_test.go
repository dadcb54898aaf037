package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A change that cannot finish ends dead or rejected; once the remote is
// fixed, stagesync.requeue brings it back and it finishes applied.
func TestDeadFixRequeue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		batchPath  string // "" = no batch endpoint: single GETs
		faults     remotesim.Faults
		missing    bool // the resource does not exist until fixed
		wantStatus string
		wantError  string
		attempts   int
	}{
		{name: "missing_batch_lookup", batchPath: "/assignments", missing: true, wantStatus: "rejected", wantError: "not found", attempts: 0},
		{name: "missing_single_get", missing: true, wantStatus: "rejected", wantError: "not found", attempts: 0},
		// Single GETs: the simulator alternates 500 and 503, and a 503 is
		// throttling (no attempt); with a batch lookup taking every 500,
		// each GET would get a 503 and the change wait for give_up_after.
		{name: "remote_down", faults: remotesim.Faults{ErrorRate: 1}, wantStatus: "dead", wantError: "gave up after 2 attempts", attempts: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			if !tt.missing {
				h.sim.Put("acct-1", map[string]any{"owner": "seed", "status": "open"})
			}
			h.sim.SetFaults(tt.faults)
			h.startProcessor(configYAML(nil, map[string]string{"batch_etag_path": tt.batchPath, "max_attempts": "2"}))
			ids := h.insert(change{resource: "acct-1", fields: map[string]any{"owner": "crm"}})
			h.waitDrained(30 * time.Second)
			r := h.changes(ids)[ids[0]]
			require.Equal(t, tt.wantStatus, r.status, "status before the fix: got %s; want %s (last_error %q)", r.status, tt.wantStatus, r.lastError)
			require.Contains(t, r.lastError, tt.wantError, "last_error: got %q; want it to contain %q", r.lastError, tt.wantError)
			require.Equal(t, tt.attempts, r.attempts, "attempts: got %d; want %d", r.attempts, tt.attempts)
			var deadLetters int
			require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT count(*) FROM stagesync.dead_letters`).Scan(&deadLetters))
			require.Equal(t, 1, deadLetters, "dead_letters rows: got %d; want 1", deadLetters)

			// Fix the remote, then requeue.
			h.sim.SetFaults(remotesim.Faults{})
			if tt.missing {
				h.sim.Put("acct-1", map[string]any{"owner": "seed", "status": "open"})
			}
			var moved int
			require.NoError(t, h.pool.QueryRow(context.Background(),
				`SELECT stagesync.requeue(ids => $1::bigint[], include_rejected => true)`, ids).Scan(&moved))
			require.Equal(t, 1, moved, "requeue moved: got %d; want 1", moved)
			h.waitDrained(30 * time.Second)
			r = h.changes(ids)[ids[0]]
			require.Equal(t, "applied", r.status, "status after requeue: got %s; want applied (last_error %q)", r.status, r.lastError)
			require.Equal(t, 1, r.attempts, "attempts after requeue: got %d; want 1 (the budget was reset)", r.attempts)
			h.requireRemote(map[string]map[string]any{"acct-1": {"owner": "crm", "status": "open"}})
			require.Len(t, h.apiVersions("acct-1"), 1, "api writes: got %d; want 1", len(h.apiVersions("acct-1")))
			n := h.count(`SELECT count(*) FROM stagesync.admin_actions WHERE action = 'requeue' AND affected = 1`)
			require.Equal(t, 1, n, "admin_actions requeue rows: got %d; want 1", n)
			h.requireAuditMatchesRemote()
		})
	}
}

// A manual-policy conflict ends dead with needs_review and writes nothing;
// requeueing it is the operator's decision for the upstream value, which
// is then written over the person's edit. If the person edits the field
// again before the requeue, the merge runs again and asks again.
func TestRequeueDecidesANeedsReviewChange(t *testing.T) {
	t.Parallel()
	for _, editedAgain := range []bool{false, true} {
		name := "requeued as is"
		if editedAgain {
			name = "edited again before the requeue"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{})
			h.sim.Put("acct-1", map[string]any{"region": "north", "status": "open"})
			h.startProcessor(configYAML(nil, map[string]string{"merge": "{default: ours, fields: {region: manual}}"}))
			first := h.insert(change{resource: "acct-1", fields: map[string]any{"status": "synced"}})
			h.waitDrained(30 * time.Second)
			require.Equal(t, "applied", h.changes(first)[first[0]].status)

			h.sim.Edit("acct-1", map[string]any{"region": "a person's"}, "other-user")
			ids := h.insert(change{resource: "acct-1", fields: map[string]any{"region": "crm's"}})
			h.waitDrained(30 * time.Second)
			r := h.changes(ids)[ids[0]]
			require.Equal(t, "dead", r.status, "status: got %s; want dead (last_error %q)", r.status, r.lastError)
			require.Contains(t, r.lastError, "needs_review")
			fields, _, _ := h.sim.Get("acct-1")
			require.Equal(t, "a person's", fields["region"], "region before the requeue: got %v; want the person's", fields["region"])

			wantStatus, wantRegion := "applied", "crm's"
			if editedAgain {
				h.sim.Edit("acct-1", map[string]any{"region": "a person's second"}, "other-user")
				wantStatus, wantRegion = "dead", "a person's second"
			}
			var moved int
			require.NoError(t, h.pool.QueryRow(context.Background(),
				`SELECT stagesync.requeue(ids => $1::bigint[])`, ids).Scan(&moved))
			require.Equal(t, 1, moved)
			h.waitDrained(30 * time.Second)
			r = h.changes(ids)[ids[0]]
			require.Equal(t, wantStatus, r.status, "status after requeue: got %s; want %s (last_error %q)", r.status, wantStatus, r.lastError)
			fields, _, _ = h.sim.Get("acct-1")
			require.Equal(t, wantRegion, fields["region"], "region after the requeue: got %v; want %v", fields["region"], wantRegion)
			h.requireAuditMatchesRemote()
		})
	}
}

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A write that landed but whose answer was lost (the client timed out while
// the remote applied it) is never sent again as a new write. Its resource
// is in doubt; the retry resends the very same request, which now
// conflicts, reads the resource and merges under the in-doubt rules: a
// value a person set after our write is never reverted (policy ours ends
// needs_review), a value our own write put there ends the change applied.
func TestAnswerLostWriteIsNeverSentTwice(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	ids := []string{"edited-status", "untouched", "edited-owner"}
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"timeout": "150ms", "max_attempts": "100",
		"merge": "{default: ours, fields: {owner: theirs}}"}))

	// Wave 1 stores ETags, so wave 2 writes at once with If-Match.
	var wave1 []change
	for _, id := range ids {
		wave1 = append(wave1, change{resource: id, fields: map[string]any{"note": "w1"}})
	}
	h.insert(wave1...)
	h.waitDrained(30 * time.Second)
	before := map[string]int{}
	for _, id := range ids {
		before[id] = len(h.apiVersions(id))
	}

	// Every answer now comes after the client gave up; the writes still
	// land (the simulator reads a write's body only after its latency).
	h.sim.SetFaults(remotesim.Faults{Latency: 400 * time.Millisecond})
	var wave2 []change
	for _, id := range ids {
		wave2 = append(wave2, change{resource: id, fields: map[string]any{"status": "crm-" + id}})
	}
	changeIDs := h.insert(wave2...)
	h.waitFor("the three writes to land", 30*time.Second, func() bool {
		for _, id := range ids {
			if len(h.apiVersions(id)) == before[id] {
				return false
			}
		}
		return true
	})
	// People edit after our writes landed, before stagesync knows.
	_, ok := h.sim.Edit("edited-status", map[string]any{"status": "person"}, "other-user")
	require.True(t, ok)
	_, ok = h.sim.Edit("edited-owner", map[string]any{"owner": "person"}, "other-user")
	require.True(t, ok)
	h.waitFor("the lost answers recorded", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code IS NULL AND method = 'PATCH'`) >= len(ids)
	})
	h.sim.SetFaults(remotesim.Faults{})
	h.waitDrained(60 * time.Second)
	h.waitSimSettled()

	rows := h.changes(changeIDs)
	want := map[string]struct{ status, remoteStatus, remoteOwner string }{
		"edited-status": {"dead", "person", "seed"},
		"untouched":     {"applied", "crm-untouched", "seed"},
		"edited-owner":  {"applied", "crm-edited-owner", "person"},
	}
	for i, id := range ids {
		r := rows[changeIDs[i]]
		w := want[id]
		require.Equal(t, w.status, r.status, "change of %q: got %s; want %s (last_error %q)", id, r.status, w.status, r.lastError)
		got, _, _ := h.sim.Get(id)
		require.Equal(t, w.remoteStatus, got["status"], "remote status of %q: got %v; want %v", id, got["status"], w.remoteStatus)
		require.Equal(t, w.remoteOwner, got["owner"], "remote owner of %q: got %v; want %v", id, got["owner"], w.remoteOwner)
		// Our value reached the remote exactly once.
		n := 0
		for _, v := range h.apiVersions(id)[before[id]:] {
			if v.Fields["status"] == "crm-"+id {
				n++
			}
		}
		writes := len(h.apiVersions(id)) - before[id]
		require.Equal(t, 1, writes, "api writes of %q after the lost answer: got %d; want 1 (never sent twice)", id, writes)
		require.Equal(t, 1, n, "api writes of %q carrying crm-%s: got %d; want 1", id, id, n)
	}
	require.Contains(t, rows[changeIDs[0]].lastError, "needs_review", "the person's status edit: got last_error %q; want needs_review", rows[changeIDs[0]].lastError)
	require.Equal(t, "written by an earlier request whose answer was lost; the remote shows its values", h.outcomeDetail(changeIDs[1]))
	require.Zero(t, h.count(`SELECT count(*) FROM stagesync.resources WHERE in_doubt IS NOT NULL`), "resources still in doubt: got some; want none")
	require.Zero(t, h.count(`SELECT count(*) FROM stagesync.outbox`), "outbox rows left: got some; want none")
	requireAttemptForEveryRequest(t, h)
}

// requireAttemptForEveryRequest checks that the audit holds a row for every
// request the remote saw, per resource and method (a batch lookup under
// the empty resource): as many attempts rows at least (an 'unknown' row may
// stand for a request that never left), and no more rows with a given
// status than the remote sent that status.
func requireAttemptForEveryRequest(t *testing.T, h *harness) {
	t.Helper()
	type key struct{ resource, method string }
	type skey struct {
		key
		status int
	}
	seen, answered := map[key]int{}, map[skey]int{}
	for _, r := range h.sim.Requests() {
		k := key{r.ID, r.Method}
		seen[k]++
		if r.Status != 0 && r.Status != 499 {
			answered[skey{k, r.Status}]++
		}
	}
	rows, err := h.pool.Query(context.Background(), `
		SELECT coalesce(resource_id, ''), method, coalesce(status_code, 0), count(*)
		FROM stagesync.attempts GROUP BY 1, 2, 3`)
	require.NoError(t, err)
	defer rows.Close()
	recorded, recordedStatus := map[key]int{}, map[skey]int{}
	for rows.Next() {
		var k key
		var status, n int
		require.NoError(t, rows.Scan(&k.resource, &k.method, &status, &n))
		recorded[k] += n
		if status != 0 {
			recordedStatus[skey{k, status}] += n
		}
	}
	require.NoError(t, rows.Err())
	for k, n := range seen {
		require.GreaterOrEqual(t, recorded[k], n, "attempts rows for %s %q: got %d; want ≥ %d (requests the remote saw)", k.method, k.resource, recorded[k], n)
	}
	for k, n := range recordedStatus {
		require.LessOrEqual(t, n, answered[k], "attempts rows for %s %q with status %d: got %d; want ≤ %d answers the remote sent", k.method, k.resource, k.status, n, answered[k])
	}
	t.Logf("audit covers the remote's %d requests; %d attempts have an unknown outcome",
		len(h.sim.Requests()), h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'unknown'`))
}

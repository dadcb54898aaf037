package e2e

import (
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// op create sends PUT with If-None-Match: * (an update right after it rides
// along); a create of a resource that exists merges into it; op delete
// sends DELETE with the ETag; deleting what is already gone is a noop.
func TestCreateAndDeleteOps(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("exists", map[string]any{"owner": "seed", "status": "open"})
	h.sim.Put("doomed", map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, nil))

	ids := h.insert(
		change{resource: "fresh", op: "create", fields: map[string]any{"owner": "crm", "status": "new"}},
		change{resource: "fresh", fields: map[string]any{"status": "assigned"}},
		change{resource: "exists", op: "create", fields: map[string]any{"owner": "crm"}},
		change{resource: "doomed", op: "delete"},
		change{resource: "never-was", op: "delete"},
	)
	h.waitDrained(30 * time.Second)
	rows := h.changes(ids)
	want := []string{"applied", "applied", "merged", "applied", "noop"}
	for i, id := range ids {
		require.Equal(t, want[i], rows[id].status, "change %d on %q: got %s; want %s (last_error %q)", id, rows[id].resource, rows[id].status, want[i], rows[id].lastError)
	}
	h.requireRemote(map[string]map[string]any{
		"fresh":  {"owner": "crm", "status": "assigned"},
		"exists": {"owner": "crm", "status": "open"},
	})
	_, _, ok := h.sim.Get("doomed")
	require.False(t, ok, "doomed exists after its delete: got true; want false")
	hist := h.sim.History("doomed")
	require.True(t, hist[len(hist)-1].Deleted && hist[len(hist)-1].Writer == "api", "last version of doomed: got %+v; want an api deletion", hist[len(hist)-1])

	var creates, deletes int
	for _, r := range h.sim.Requests() {
		switch {
		case r.Method == http.MethodPut && r.IfNoneMatch == "*":
			creates++
		case r.Method == http.MethodDelete:
			deletes++
			require.NotEmpty(t, r.IfMatch, "DELETE %s without If-Match", r.Path)
		}
	}
	require.Equal(t, 2, creates, "PUT If-None-Match: * requests: got %d; want 2 (fresh, exists)", creates)
	require.Equal(t, 1, deletes, "DELETE requests: got %d; want 1 (never-was is gone already)", deletes)
	st := h.sim.Stats()
	require.Equal(t, 1, st.Creates, "creates: got %d; want 1", st.Creates)
	require.Equal(t, 0, st.PreconditionRequired, "428 answers: got %d; want 0", st.PreconditionRequired)
	stored := h.storedResources()
	require.True(t, stored["doomed"].deleted, "stored doomed deleted: got false; want true")
	_, etag, _ := h.sim.Get("fresh")
	require.Equal(t, etag, stored["fresh"].etag, "stored ETag of fresh: got %q; want %q", stored["fresh"].etag, etag)
	h.requireAuditMatchesRemote()
}

// A delete whose stored ETag is stale (a person edited the resource since
// stagesync last wrote it) refetches; with the default policy ours the
// delete goes through with the fresh ETag, with manual it ends dead for a
// person to decide and the resource stays.
func TestDeleteAfterARemoteEdit(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		policy     string
		wantStatus string
		wantGone   bool
	}{
		{policy: "ours", wantStatus: "applied", wantGone: true},
		{policy: "manual", wantStatus: "dead", wantGone: false},
	} {
		t.Run("default policy "+tc.policy, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: http.StatusPreconditionFailed})
			h.sim.Put("acct", map[string]any{"owner": "seed"})
			h.startProcessor(configYAML(nil, map[string]string{"merge": "{default: " + tc.policy + "}"}))

			// Store an ETag and snapshot by writing once.
			first := h.insert(change{resource: "acct", fields: map[string]any{"status": "open"}})
			h.waitDrained(30 * time.Second)
			require.Equal(t, "applied", h.changes(first)[first[0]].status)
			h.sim.Edit("acct", map[string]any{"owner": "a person"}, "other-user")

			ids := h.insert(change{resource: "acct", op: "delete"})
			h.waitDrained(30 * time.Second)
			row := h.changes(ids)[ids[0]]
			require.Equal(t, tc.wantStatus, row.status, "delete after a remote edit: got %s; want %s (last_error %q)", row.status, tc.wantStatus, row.lastError)
			_, _, exists := h.sim.Get("acct")
			require.Equal(t, !tc.wantGone, exists, "resource exists: got %v; want %v", exists, !tc.wantGone)

			var deletes, conflicts int
			for _, r := range h.sim.Requests() {
				if r.Method == http.MethodDelete {
					deletes++
					if r.Status == http.StatusPreconditionFailed {
						conflicts++
					}
				}
			}
			wantDeletes := 1
			if tc.wantGone {
				wantDeletes = 2 // the stale one, then the one with the fresh ETag
			} else {
				require.Contains(t, row.lastError, "needs_review")
			}
			require.Equal(t, wantDeletes, deletes, "DELETE requests: got %d; want %d", deletes, wantDeletes)
			require.Equal(t, 1, conflicts, "DELETEs answered 412: got %d; want 1", conflicts)
			h.requireAuditMatchesRemote()
		})
	}
}

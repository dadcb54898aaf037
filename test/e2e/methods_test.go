package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// PUT full-replace and PATCH targets against 409 and 412 servers, with
// strong and weak ETags: fields are applied, other fields preserved, a
// user's edit survives a conflict, and ETags round-trip byte for byte.
func TestUpdateMethodsConflictStatusesAndWeakETags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		method   string
		conflict int
		weak     bool
	}{
		{"PUT 409 weak", http.MethodPut, http.StatusConflict, true},
		{"PUT 412 strong", http.MethodPut, http.StatusPreconditionFailed, false},
		{"PATCH 409 weak", http.MethodPatch, http.StatusConflict, true},
		{"PATCH 412 weak", http.MethodPatch, http.StatusPreconditionFailed, true},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: tt.conflict, WeakETags: tt.weak})
			ids := resourceIDs("doc", 20)
			base := map[string]any{"status": "draft", "owner": "seed", "extra": "keep", "nested": map[string]any{"a": 1, "b": []any{"x", "y"}}}
			h.seed(ids, base)
			h.startProcessor(configYAML(nil, map[string]string{
				"update_method": tt.method,
				"merge":         "{default: ours, fields: {owner: theirs}}",
			}))
			put := tt.method == http.MethodPut

			// Wave 1: no stored ETag.
			var wave1 []change
			for i, id := range ids {
				wave1 = append(wave1,
					change{resource: id, fields: map[string]any{"status": "review"}},
					change{resource: id, fields: map[string]any{"title": fmt.Sprintf("t%d", i)}})
			}
			h.insert(wave1...)
			h.waitDrained(30 * time.Second)
			require.Equal(t, map[string]int{"applied": 40}, h.statusCounts(), "wave 1: got %v; want 40 applied", h.statusCounts())
			want := expected(base, ids, wave1)
			h.requireRemote(want)
			st := h.sim.Stats()
			if put {
				// PUT needs the body: one GET per resource, no batch.
				require.Equal(t, 20, st.Gets, "GETs: got %d; want 20", st.Gets)
				require.Equal(t, 0, st.BatchGets, "batch GETs: got %d; want 0", st.BatchGets)
				require.Equal(t, 20, st.Puts, "PUTs: got %d; want 20", st.Puts)
				require.Equal(t, 0, st.Patches, "PATCHes: got %d; want 0", st.Patches)
			} else {
				require.Equal(t, 0, st.Gets, "GETs: got %d; want 0", st.Gets)
				require.Equal(t, 1, st.BatchGets, "batch GETs: got %d; want 1", st.BatchGets)
				require.Equal(t, 20, st.Patches, "PATCHes: got %d; want 20", st.Patches)
				require.Equal(t, 0, st.Puts, "PUTs: got %d; want 0", st.Puts)
			}
			for _, id := range ids {
				v := h.apiVersions(id)
				require.Len(t, v, 1, "api writes of %q: got %d; want 1", id, len(v))
				require.Equal(t, tt.method, v[0].Method, "write method of %q: got %s; want %s", id, v[0].Method, tt.method)
				// A full replace keeps every field it did not change.
				require.Equal(t, jsonNorm(want[id]), v[0].Fields, "fields after the write to %q: got %v; want %v", id, v[0].Fields, want[id])
			}

			// Users edit the owner of half the resources; wave 2 sets
			// status (and owner) everywhere.
			edited := map[string]string{}
			for i, id := range ids {
				if i%2 == 0 {
					edited[id] = fmt.Sprintf("user-%d", i)
					_, ok := h.sim.Edit(id, map[string]any{"owner": edited[id]}, "other-user")
					require.True(t, ok)
				}
			}
			var wave2 []change
			for i, id := range ids {
				wave2 = append(wave2, change{resource: id, fields: map[string]any{"status": "final", "owner": fmt.Sprintf("crm-%d", i)}})
			}
			h.insert(wave2...)
			h.waitDrained(30 * time.Second)
			counts := h.statusCounts()
			require.Equal(t, map[string]int{"applied": 50, "merged": 10}, counts, "after wave 2: got %v; want 50 applied, 10 merged", counts)
			for i, id := range ids {
				got, _, _ := h.sim.Get(id)
				w := jsonNorm(want[id])
				w["status"] = "final"
				w["owner"] = fmt.Sprintf("crm-%d", i)
				if o, ok := edited[id]; ok {
					w["owner"] = o
				}
				require.Equal(t, w, got, "remote %q after wave 2: got %v; want %v", id, got, w)
			}
			st2 := h.sim.Stats()
			require.Equal(t, 10, st2.Conflicts, "conflicts: got %d; want 10", st2.Conflicts)
			require.Equal(t, st.Gets+10, st2.Gets, "GETs after wave 2: got %d; want %d (one per conflict)", st2.Gets, st.Gets+10)

			// The conflicts as audited: the server's status, outcome conflict.
			n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code = $1 AND outcome = 'conflict' AND method = $2`, tt.conflict, tt.method)
			require.Equal(t, 10, n, "conflict attempts with status %d: got %d; want 10", tt.conflict, n)

			// ETags round-trip: stored exactly as served, sent back as stored.
			stored := h.storedResources()
			for _, id := range ids {
				_, etag, _ := h.sim.Get(id)
				require.Equal(t, etag, stored[id].etag, "stored ETag of %q: got %q; want %q", id, stored[id].etag, etag)
				require.Equal(t, tt.weak, strings.HasPrefix(etag, `W/"`), "ETag %q weak: got %v; want %v", etag, !tt.weak, tt.weak)
			}
			for _, r := range h.sim.Requests() {
				if r.Method == tt.method {
					require.Equal(t, tt.weak, strings.HasPrefix(r.IfMatch, `W/"`), "If-Match %q of %s %s weak: got %v; want %v", r.IfMatch, r.Method, r.Path, !tt.weak, tt.weak)
				}
			}
			require.Equal(t, 0, h.sim.Stats().PreconditionRequired, "428 answers: got %d; want 0", h.sim.Stats().PreconditionRequired)
			h.requireAuditMatchesRemote()
		})
	}
}

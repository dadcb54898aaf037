package e2e

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A person who edits a field between stagesync's read and its merged write
// is not overwritten by the retry: the read showed the field already holding
// ours, so that change ends at once (or, if it has other values still to
// write, its retry drops the settled field), and the retry of the others
// merges against the read. Before, the retry merged against the older stored base,
// took ours and wrote the value the field had held before the person's edit.
func TestPersonEditAfterTheReadIsNotRevertedByTheRetry(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		changes []map[string]any
		// settledAtOnce: the change whose only value the read found there
		// ends at once, noop.
		settledAtOnce bool
	}{
		{"a change of only the value already there", []map[string]any{{"status": "S"}, {"owner": "O"}, {"region": "R"}}, true},
		// Its other value is still to write: the retry drops the settled
		// field (changes.settled) rather than merge it again.
		{"a change with that value and another", []map[string]any{{"status": "S", "owner": "O"}, {"region": "R"}}, false},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, remotesim.Options{ConflictStatus: 412})
			h.sim.Put("acct", map[string]any{"status": "c8", "owner": "seed"})
			// A person edits status right after stagesync's first read of acct.
			var once sync.Once
			var arm bool
			var mu sync.Mutex
			front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				h.sim.ServeHTTP(w, r)
				mu.Lock()
				fire := arm && r.Method == http.MethodGet && r.URL.Path == "/assignments/acct"
				mu.Unlock()
				if fire {
					once.Do(func() { h.sim.Edit("acct", map[string]any{"status": "X"}, "person") })
				}
			}))
			t.Cleanup(front.Close)
			h.env = map[string]string{"FRONT_URL": front.URL}
			h.startProcessor(configYAML(nil, map[string]string{"base_url": "${FRONT_URL}", "max_attempts": "10",
				"merge": "{default: ours, fields: {owner: theirs}}"}))
			h.insert(change{resource: "acct", fields: map[string]any{"note": "w0"}})
			h.waitDrained(30 * time.Second)

			// A person sets status to S; the CRM then sends S too, and more.
			h.sim.Edit("acct", map[string]any{"status": "S"}, "person")
			mu.Lock()
			arm = true
			mu.Unlock()
			var cs []change
			for _, f := range tc.changes {
				cs = append(cs, change{resource: "acct", fields: f})
			}
			ids := h.insert(cs...)
			h.waitDrained(30 * time.Second)

			got, _, _ := h.sim.Get("acct")
			require.Equal(t, "X", got["status"], "the person's edit after stagesync's read was reverted")
			require.Equal(t, "O", got["owner"])
			require.Equal(t, "R", got["region"])
			for _, v := range h.apiVersions("acct") {
				require.NotEqual(t, "S", v.Written["status"], "an API write repeated status S: %v", v.Written)
			}
			rows := h.changes(ids)
			for _, id := range ids {
				require.Contains(t, []string{"merged", "applied", "noop"}, rows[id].status, "change #%d: %s (%q)", id, rows[id].status, rows[id].lastError)
			}
			if tc.settledAtOnce {
				require.Equal(t, "noop", rows[ids[0]].status)
			} else {
				require.Contains(t, h.outcomeDetail(ids[0]), "the remote already held status")
			}
			require.Zero(t, h.count(`SELECT count(*) FROM stagesync.changes WHERE settled IS NOT NULL`), "settled is cleared when a change ends")
		})
	}
}

// A combined write whose answer is lost (the remote refused it 422, a person
// then edited owner, the connection dropped) is resolved by a read, merged
// (owner kept from the person, policy theirs) and refused again; the split
// then sends each change alone with the read's ETag and the ETag each write
// leaves, so no change costs a conflict of stagesync's own making, only the
// culprit is rejected, and the person's owner is never overwritten.
func TestSplitAfterALostRefusalKeepsThePersonsEditAndFreshETags(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	h.sim.Put("acct", map[string]any{"owner": "seed", "tier": "t0"})
	var mu sync.Mutex
	var armed bool
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		drop := armed && r.Method == http.MethodPatch && r.URL.Path == "/assignments/acct"
		armed = armed && !drop
		mu.Unlock()
		if !drop {
			h.sim.ServeHTTP(w, r)
			return
		}
		// The remote answers (422), a person edits owner, and the answer
		// never reaches stagesync.
		h.sim.ServeHTTP(httptest.NewRecorder(), r)
		h.sim.Edit("acct", map[string]any{"owner": "P-person"}, "person")
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	}))
	t.Cleanup(front.Close)
	h.env = map[string]string{"FRONT_URL": front.URL}
	h.startProcessor(configYAML(nil, map[string]string{"base_url": "${FRONT_URL}", "max_attempts": "4",
		"merge": "{default: ours, fields: {owner: theirs}}"}))
	h.insert(change{resource: "acct", fields: map[string]any{"note": "w0"}})
	h.waitDrained(30 * time.Second)

	mu.Lock()
	armed = true
	mu.Unlock()
	ids := h.insert(
		change{resource: "acct", fields: map[string]any{"tier": "g1"}},
		change{resource: "acct", fields: map[string]any{"region": "INVALID"}},
		change{resource: "acct", fields: map[string]any{"color": "g3", "owner": "o3"}},
	)
	h.waitDrained(30 * time.Second)

	rows := h.changes(ids)
	require.Equal(t, "applied", rows[ids[0]].status, "tier (last_error %q)", rows[ids[0]].lastError)
	require.Equal(t, "rejected", rows[ids[1]].status, "the culprit (last_error %q)", rows[ids[1]].lastError)
	require.Contains(t, rows[ids[1]].lastError, "422")
	require.Equal(t, "merged", rows[ids[2]].status, "color and owner (last_error %q)", rows[ids[2]].lastError)
	got, _, _ := h.sim.Get("acct")
	require.Equal(t, "P-person", got["owner"], "the person's owner was overwritten")
	require.Equal(t, "g3", got["color"])
	require.Equal(t, "g1", got["tier"])
	conflicts := 0
	for _, r := range h.sim.Requests() {
		if r.Method == http.MethodPatch && r.Status == http.StatusPreconditionFailed {
			conflicts++
		}
	}
	require.Equal(t, 1, conflicts, "PATCHes answered 412: got %d; want 1 (the resend of the lost write)", conflicts)
}

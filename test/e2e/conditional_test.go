package e2e

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// staleFront answers the next PATCH of resource id with 412 itself, as an
// odd remote would (its ETag unchanged), and passes everything else on.
type staleFront struct {
	next http.Handler
	mu   sync.Mutex
	id   string
}

func (f *staleFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	refuse := r.Method == http.MethodPatch && f.id != "" && r.URL.Path == "/assignments/"+f.id
	if refuse {
		f.id = ""
	}
	f.mu.Unlock()
	if refuse {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusPreconditionFailed)
		_, _ = w.Write([]byte(`{"error":"ETag mismatch"}`))
		return
	}
	f.next.ServeHTTP(w, r)
}

// The GET after a conflict is conditional: it carries the stored ETag in
// If-None-Match (recorded in attempts.if_none_match). When a person has
// changed the resource, the remote answers 200 with the new version and
// the merge goes on as before. When the remote answers 304, the stored
// version is current: after a 412 to that very ETag the remote contradicts
// itself, and the change ends rejected with the reason, after exactly one
// conditional GET (no loop). 304s are counted apart: attempts outcome
// not_modified and stagesync_remote_requests_total{outcome="not_modified"}.
func TestConditionalGetAfterAConflict(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	front := &staleFront{next: h.sim}
	srv := httptest.NewServer(front)
	t.Cleanup(srv.Close)
	h.env = map[string]string{"FRONT_URL": srv.URL}
	ids := resourceIDs("cond", 2)
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	reg := prometheus.NewRegistry()
	h.runProcessor(configYAML(nil, map[string]string{"base_url": "${FRONT_URL}", "merge": "{default: ours, fields: {owner: theirs}}"}), processor.NewMetrics(reg))
	h.storeETags(ids)
	edited, odd := ids[0], ids[1]
	_, stored, _ := h.sim.Get(edited)
	_, oddETag, _ := h.sim.Get(odd)

	// A person edits one resource; the remote refuses the other's write
	// although its ETag is current.
	_, ok := h.sim.Edit(edited, map[string]any{"owner": "person"}, "person")
	require.True(t, ok)
	front.mu.Lock()
	front.id = odd
	front.mu.Unlock()
	before := len(h.sim.Requests())
	// The edited resource's change also sets owner (policy theirs), so its
	// conflict is resolved by reading the resource (with only ours fields
	// it would be written again unread).
	changeIDs := h.insert(
		change{resource: edited, fields: map[string]any{"status": "won", "owner": "crm"}},
		change{resource: odd, fields: map[string]any{"status": "won"}},
	)
	h.waitDrained(30 * time.Second)

	rows := h.changes(changeIDs)
	require.Equal(t, "merged", rows[changeIDs[0]].status, "change of the edited resource: got %s (%s)", rows[changeIDs[0]].status, rows[changeIDs[0]].lastError)
	got, _, _ := h.sim.Get(edited)
	require.Equal(t, map[string]any{"status": "won", "owner": "person", "phase": float64(1)}, got)
	require.Equal(t, "rejected", rows[changeIDs[1]].status, "change of the contradicting remote: got %s (%s)", rows[changeIDs[1]].status, rows[changeIDs[1]].lastError)
	require.Contains(t, rows[changeIDs[1]].lastError, "which is its current ETag")

	var gets []remotesim.Request
	for _, r := range h.sim.Requests()[before:] {
		if r.Method == http.MethodGet && r.ID != "" {
			gets = append(gets, r)
		}
	}
	require.Len(t, gets, 2, "GETs after the conflicts: got %d; want one per resource", len(gets))
	for _, g := range gets {
		switch g.ID {
		case edited:
			require.Equal(t, stored, g.IfNoneMatch, "If-None-Match of the GET of %q: got %q; want the stored ETag", g.ID, g.IfNoneMatch)
			require.Equal(t, http.StatusOK, g.Status)
		case odd:
			require.Equal(t, oddETag, g.IfNoneMatch, "If-None-Match of the GET of %q: got %q; want the stored ETag", g.ID, g.IfNoneMatch)
			require.Equal(t, http.StatusNotModified, g.Status)
		}
	}
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'not_modified' AND status_code = 304 AND resource_id = $1 AND if_none_match = $2`, odd, oddETag)
	require.Equal(t, 1, n, "not_modified attempts rows: got %d; want 1", n)
	n = h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'GET' AND resource_id = $1 AND if_none_match = $2 AND status_code = 200`, edited, stored)
	require.Equal(t, 1, n, "conditional GET answered 200 in attempts: got %d; want 1", n)
	n = h.count(`SELECT attempts FROM stagesync.changes WHERE id = $1`, changeIDs[1])
	require.Equal(t, 1, n, "attempts of the rejected change: got %d; want 1 (the 412; the 304 is no failure)", n)

	mfs, err := reg.Gather()
	require.NoError(t, err)
	var notModified float64
	for _, mf := range mfs {
		if mf.GetName() != "stagesync_remote_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == "not_modified" {
					notModified += m.GetCounter().GetValue()
				}
			}
		}
	}
	require.Equal(t, 1.0, notModified, `stagesync_remote_requests_total{outcome="not_modified"}: got %v; want 1`, notModified)
	var detail string
	require.NoError(t, h.pool.QueryRow(context.Background(),
		`SELECT coalesce(string_agg(outcome, ','), '') FROM (SELECT outcome FROM stagesync.attempts WHERE resource_id = $1 ORDER BY id) x`, odd).Scan(&detail))
	require.True(t, strings.HasSuffix(detail, "conflict,not_modified"), "attempts of %q: got %s; want the 412 and the 304 last, nothing after", odd, detail)
}

package e2e

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// remoteGate sits in front of the simulator: before the first PATCH of
// each resource it has a person edit status (so the PATCH conflicts), and
// it can rewrite batch lookups as a remote that ignores the field list
// would see them.
type remoteGate struct {
	sim        *remotesim.Sim
	ignoreList bool
	mu         sync.Mutex
	patched    map[string]bool
	lookups    []string // batch lookups' field lists, as asked
}

func (g *remoteGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPatch:
		id, _ := url.PathUnescape(strings.TrimPrefix(r.URL.EscapedPath(), "/assignments/"))
		g.mu.Lock()
		first := !g.patched[id]
		g.patched[id] = true
		g.mu.Unlock()
		if first {
			g.sim.Edit(id, map[string]any{"status": "person"}, "other-user")
		}
	case r.Method == http.MethodGet && r.URL.Query().Has("ids"):
		q := r.URL.Query()
		g.mu.Lock()
		g.lookups = append(g.lookups, q.Get("fields"))
		g.mu.Unlock()
		if g.ignoreList {
			q.Set("fields", "id,etag")
			r.URL.RawQuery = q.Encode()
		}
	}
	g.sim.ServeHTTP(w, r)
}

// gateRemote puts a remoteGate in front of the harness's simulator. Call it
// before starting a processor.
func gateRemote(h *harness) *remoteGate {
	g := &remoteGate{sim: h.sim, patched: map[string]bool{}}
	h.srv.Config.Handler = g
	return g
}

// A resource known only from a batch lookup still has a merge base for the
// fields whose policy needs one: the lookup asks for them. A person's edit
// of status between the lookup and the write makes the write conflict, and
// the merge knows that owner (policy theirs) was not touched, so the CRM's
// owner is written rather than silently dropped.
func TestBatchLookupBringsTheMergeBase(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	g := gateRemote(h)
	ids := []string{"acct-1", "acct-2"}
	h.seed(ids, map[string]any{"status": "open", "owner": "seed", "region": "north"})
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "100", "merge": mergePolicies}))

	cs := []change{
		{resource: "acct-1", fields: map[string]any{"owner": "crm-owner-1"}},
		{resource: "acct-2", fields: map[string]any{"owner": "crm-owner-2", "status": "crm"}},
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(30 * time.Second)

	rows := h.changes(changeIDs)
	for i, id := range ids {
		r := rows[changeIDs[i]]
		require.Equal(t, "merged", r.status, "change of %q: got %s; want merged (last_error %q)", id, r.status, r.lastError)
		got, _, _ := h.sim.Get(id)
		require.Equal(t, cs[i].fields["owner"], got["owner"], "remote owner of %q: got %v; want the CRM's %v (the lookup showed it untouched)", id, got["owner"], cs[i].fields["owner"])
	}
	got, _, _ := h.sim.Get("acct-2")
	require.Equal(t, "crm", got["status"], "remote status of acct-2 (policy ours): got %v; want crm", got["status"])
	var decisions map[string]string
	require.NoError(t, h.pool.QueryRow(context.Background(),
		`SELECT decisions FROM stagesync.merges WHERE resource_id = 'acct-1'`).Scan(&decisions))
	require.Equal(t, map[string]string{"owner": "took_ours"}, decisions, "merge decisions of acct-1: got %v; want owner took_ours", decisions)
	require.NotEmpty(t, g.lookups, "batch lookups: got none; want one")
	require.Equal(t, "id,etag,owner,region", g.lookups[0], "fields asked by the batch lookup: got %q; want the theirs and manual fields", g.lookups[0])
}

// A remote that ignores the batch lookup's field list sends ids and ETags
// only: the base of owner stays unknown. When a conflict then shows the
// remote's owner differing from the CRM's, nobody can tell whether a
// person changed it, so the change asks for review (dead, needs_review)
// instead of silently keeping the remote's value; the other change of the
// resource is written.
func TestUnknownMergeBaseNeverDropsAValueSilently(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412})
	g := gateRemote(h)
	g.ignoreList = true
	ids := []string{"acct"}
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "100", "merge": mergePolicies}))

	cs := []change{
		{resource: "acct", fields: map[string]any{"owner": "crm-owner"}},
		{resource: "acct", fields: map[string]any{"note": "crm-note"}},
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(30 * time.Second)

	rows := h.changes(changeIDs)
	owner, note := rows[changeIDs[0]], rows[changeIDs[1]]
	require.Equal(t, "dead", owner.status, "owner change with an unknown base: got %s; want dead (needs_review), never a silent keep", owner.status)
	require.True(t, strings.HasPrefix(owner.lastError, "needs_review:"), "last_error: got %q; want needs_review", owner.lastError)
	require.Contains(t, owner.lastError, "does not know the remote's value before this change", "last_error: got %q; want it to say the base is unknown", owner.lastError)
	require.Equal(t, "merged", note.status, "the other change: got %s; want merged", note.status)
	got, _, _ := h.sim.Get("acct")
	require.Equal(t, "seed", got["owner"], "remote owner: got %v; want seed (nothing written for it)", got["owner"])
	require.Equal(t, "crm-note", got["note"], "remote note: got %v; want crm-note", got["note"])
	require.Equal(t, "person", got["status"], "remote status: got %v; want the person's", got["status"])
}

// Values the stored snapshot already shows (under the stored ETag) are not
// written again: the change ends noop without a request, saying why, and
// people editing the record see no new ETag.
func TestValuesAlreadyOnTheRemoteAreNotWrittenAgain(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := []string{"same", "folded-same", "differs"}
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, nil))
	var wave1 []change
	for _, id := range ids {
		wave1 = append(wave1, change{resource: id, fields: map[string]any{"status": "won", "owner": "crm"}})
	}
	h.insert(wave1...)
	h.waitDrained(30 * time.Second)
	requests := h.sim.Stats().Requests

	changeIDs := h.insert(
		change{resource: "same", fields: map[string]any{"status": "won"}},
		change{resource: "folded-same", fields: map[string]any{"status": "lost"}},
		change{resource: "folded-same", fields: map[string]any{"status": "won", "owner": "crm"}},
		change{resource: "differs", fields: map[string]any{"status": "won", "owner": "crm-2"}},
	)
	h.waitDrained(30 * time.Second)
	rows := h.changes(changeIDs)
	for i, want := range []string{"noop", "noop", "noop", "applied"} {
		require.Equal(t, want, rows[changeIDs[i]].status, "change %d: got %s; want %s", changeIDs[i], rows[changeIDs[i]].status, want)
	}
	require.Contains(t, h.outcomeDetail(changeIDs[0]), "nothing sent: the stored state of the remote (ETag ", "outcome_detail: got %q", h.outcomeDetail(changeIDs[0]))
	require.Equal(t, requests+1, h.sim.Stats().Requests, "requests after wave 2: got %d; want %d (one PATCH, for differs)", h.sim.Stats().Requests, requests+1)
	for _, id := range []string{"same", "folded-same"} {
		require.Len(t, h.apiVersions(id), 1, "api writes of %q: got %d; want 1 (wave 1 only)", id, len(h.apiVersions(id)))
	}
	h.requireAuditMatchesRemote()
}

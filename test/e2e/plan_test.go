package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// stagesync plan describes what the next run sends, and the next run then
// sends exactly that: per resource the same method, URL, If-Match (or the
// lookup or in-doubt resolution it said comes first), If-None-Match,
// Idempotency-Key and body after coalescing, and nothing for changes it
// said end without a request (already on the remote, superseded by a newer
// change). Planning sends nothing and changes no row.
func TestPlanShowsWhatTheNextRunSends(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	synced := []string{"p-coalesce", "p-same", "p-superseded", "p-delete", "p-update-delete", "p-doubt"}
	h.seed(synced, map[string]any{"status": "open", "owner": "seed"})
	h.seed([]string{"p-new"}, map[string]any{"status": "open", "owner": "seed"})
	cfgText := configYAML(nil, nil)

	// A first run stores every synced resource's ETag and snapshot. Meanwhile
	// an older change of p-superseded commits after a newer one was applied.
	_, stop := h.runProcessor(cfgText, nil)
	var wave1 []change
	for _, id := range synced {
		wave1 = append(wave1, change{resource: id, fields: map[string]any{"status": "v1"}})
	}
	h.insert(wave1...)
	h.waitDrained(30 * time.Second)
	late, err := h.pool.Begin(context.Background())
	require.NoError(t, err)
	defer late.Rollback(context.Background()) //nolint:errcheck // committed below
	var olderID int64
	require.NoError(t, late.QueryRow(context.Background(), `INSERT INTO stagesync.changes (target, resource_id, fields)
		VALUES ($1, 'p-superseded', '{"status": "older"}') RETURNING id`, target).Scan(&olderID))
	newer := h.insert(change{resource: "p-superseded", fields: map[string]any{"status": "newer"}})
	h.waitDrained(30 * time.Second)
	stop()
	require.NoError(t, late.Commit(context.Background()))

	// Open changes of every kind, staged while no processor runs.
	ids := h.insert(
		change{resource: "p-coalesce", fields: map[string]any{"status": "a"}},
		change{resource: "p-coalesce", fields: map[string]any{"owner": "b", "status": "c"}},
		change{resource: "p-same", fields: map[string]any{"status": "v1"}},
		change{resource: "p-delete", op: "delete"},
		change{resource: "p-update-delete", fields: map[string]any{"status": "x"}},
		change{resource: "p-update-delete", op: "delete"},
		change{resource: "p-new", fields: map[string]any{"status": "n"}},
		change{resource: "p-create", op: "create", fields: map[string]any{"status": "c", "owner": "crm"}},
		change{resource: "p-doubt", fields: map[string]any{"status": "d"}},
	)
	stored := h.storedResources()
	// p-doubt's write of ids[8] may have landed without its answer being
	// recorded (as a killed process leaves it).
	doubt := map[string]any{"method": "PATCH", "url": h.srv.URL + "/assignments/p-doubt", "if_match": stored["p-doubt"].etag,
		"idempotency_key": "stagesync-in-doubt-key", "body": map[string]any{"status": "d"}, "change_ids": []int64{ids[8]}, "at": time.Now()}
	raw, err := json.Marshal(doubt)
	require.NoError(t, err)
	_, err = h.pool.Exec(context.Background(), `UPDATE stagesync.resources SET in_doubt = $1 WHERE resource_id = 'p-doubt'`, raw)
	require.NoError(t, err)

	before, sentBefore := h.stateDigest(), h.sim.Stats().Requests
	steps, err := processor.Plan(context.Background(), h.pool, h.config(cfgText), processor.PlanOptions{})
	require.NoError(t, err)
	require.Equal(t, before, h.stateDigest(), "database state after plan: changed; want no row changed")
	require.Equal(t, sentBefore, h.sim.Stats().Requests, "requests during plan: got %d; want none", h.sim.Stats().Requests-sentBefore)

	item := func(id string) string { return h.srv.URL + "/assignments/" + id }
	want := []processor.PlannedStep{
		{ResourceID: "p-superseded", ChangeIDs: []int64{olderID}, Outcome: "noop",
			Note: fmt.Sprintf("superseded: field status was set by newer change #%d", newer[0])},
		{ResourceID: "p-coalesce", ChangeIDs: ids[0:2], Method: "PATCH", URL: item("p-coalesce"), IfMatch: stored["p-coalesce"].etag,
			Body: map[string]any{"status": "c", "owner": "b"}},
		{ResourceID: "p-same", ChangeIDs: ids[2:3], Outcome: "noop",
			Note: fmt.Sprintf("nothing sent: the stored state of the remote (ETag %s) already shows these values", stored["p-same"].etag)},
		{ResourceID: "p-delete", ChangeIDs: ids[3:4], Method: "DELETE", URL: item("p-delete"), IfMatch: stored["p-delete"].etag},
		{ResourceID: "p-update-delete", ChangeIDs: ids[4:5], Method: "PATCH", URL: item("p-update-delete"), IfMatch: stored["p-update-delete"].etag,
			Body: map[string]any{"status": "x"}},
		{ResourceID: "p-update-delete", ChangeIDs: ids[5:6], Method: "DELETE", URL: item("p-update-delete"), First: processor.PlanAfterPrevious},
		{ResourceID: "p-new", ChangeIDs: ids[6:7], Method: "PATCH", URL: item("p-new"), First: processor.PlanLookupFirst,
			Body: map[string]any{"status": "n"}},
		{ResourceID: "p-create", ChangeIDs: ids[7:8], Method: "PUT", URL: item("p-create"), IfNoneMatch: "*",
			Body: map[string]any{"status": "c", "owner": "crm"}},
		{ResourceID: "p-doubt", ChangeIDs: ids[8:9], Method: "PATCH", URL: item("p-doubt"), IfMatch: stored["p-doubt"].etag,
			IdempotencyKey: "stagesync-in-doubt-key", Body: map[string]any{"status": "d"}},
	}
	require.Len(t, steps, len(want), "plan steps: got %d (%+v); want %d", len(steps), steps, len(want))
	for i, w := range want {
		got := steps[i]
		w.Target = target
		if w.IdempotencyKey == "" {
			w.IdempotencyKey = got.IdempotencyKey // derived; compared with the request sent below
		}
		if w.Note == "" {
			w.Note = got.Note
		}
		w.Body, got.Body = jsonNorm(w.Body), jsonNorm(got.Body)
		require.Equal(t, w, got, "plan step %d: got %+v; want %+v", i, got, w)
	}

	// The next run sends exactly what the plan said.
	versionsBefore := map[string]int{}
	for _, s := range steps {
		versionsBefore[s.ResourceID] = len(h.apiVersions(s.ResourceID))
	}
	_, stop = h.runProcessor(cfgText, nil)
	h.waitDrained(30 * time.Second)
	stop()
	sent := map[string][]remotesim.Request{}
	for _, r := range h.sim.Requests()[sentBefore:] {
		sent[r.ID] = append(sent[r.ID], r)
	}
	byResource := map[string][]processor.PlannedStep{}
	for _, s := range steps {
		byResource[s.ResourceID] = append(byResource[s.ResourceID], s)
	}
	for id, planned := range byResource {
		var reqs []processor.PlannedStep
		for _, s := range planned {
			if s.Method != "" {
				reqs = append(reqs, s)
			}
		}
		got := sent[id]
		require.Len(t, got, len(reqs), "requests to %s: got %v; want the plan's %+v", id, got, reqs)
		// Each write the run made is a new version, in order.
		versions := h.apiVersions(id)[versionsBefore[id]:]
		require.Len(t, versions, len(reqs), "versions written to %s: got %d; want one per planned request", id, len(versions))
		for i, s := range reqs {
			r := got[i]
			require.Equal(t, s.Method, r.Method, "%s request %d: got method %s; want %s", id, i, r.Method, s.Method)
			require.Equal(t, s.URL, h.srv.URL+r.Path, "%s request %d: got URL %s; want %s", id, i, h.srv.URL+r.Path, s.URL)
			require.Equal(t, s.IfNoneMatch, r.IfNoneMatch, "%s request %d: got If-None-Match %q; want %q", id, i, r.IfNoneMatch, s.IfNoneMatch)
			if s.First == "" {
				require.Equal(t, s.IfMatch, r.IfMatch, "%s request %d: got If-Match %q; want %q", id, i, r.IfMatch, s.IfMatch)
				require.Equal(t, s.IdempotencyKey, r.IdempotencyKey, "%s request %d: got Idempotency-Key %q; want %q", id, i, r.IdempotencyKey, s.IdempotencyKey)
			}
			require.Less(t, r.Status, 300, "%s request %d: got status %d; want it applied (nobody edited)", id, i, r.Status)
			if s.Body != nil {
				written := versions[i].Written
				require.Equal(t, jsonNorm(s.Body), jsonNorm(written), "%s request %d: body written %v; want the plan's %v", id, i, written, s.Body)
			}
		}
	}
	var lookups int
	for _, r := range sent[""] {
		if r.Method == http.MethodGet {
			lookups++
		}
	}
	require.Equal(t, 1, lookups, "batch ETag lookups: got %d; want 1 (for p-new, as planned)", lookups)
	counts := h.statusCounts()
	require.Zero(t, counts["dead"]+counts["rejected"]+counts["pending"]+counts["processing"], "status counts: got %v; want every change ended well", counts)
}

// stateDigest is a digest of every row stagesync's processing writes.
func (h *harness) stateDigest() string {
	h.t.Helper()
	var d string
	require.NoError(h.t, h.pool.QueryRow(context.Background(), `SELECT md5(
		(SELECT coalesce(string_agg(c::text, '|' ORDER BY c.id), '') FROM stagesync.changes c) ||
		(SELECT coalesce(string_agg(r::text, '|' ORDER BY r.resource_id), '') FROM stagesync.resources r) ||
		(SELECT coalesce(string_agg(o::text, '|' ORDER BY o.id), '') FROM stagesync.outbox o) ||
		(SELECT coalesce(string_agg(a::text, '|' ORDER BY a.id), '') FROM stagesync.attempts a) ||
		(SELECT coalesce(string_agg(m::text, '|' ORDER BY m.id), '') FROM stagesync.merges m) ||
		(SELECT count(*)::text FROM river_job))`).Scan(&d))
	return d
}

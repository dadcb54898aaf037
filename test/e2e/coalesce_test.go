package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// 1,000 changes over 200 resources with no stored ETags: everything is
// applied with one PATCH per resource, the ETags come from ⌈200/100⌉ batch
// requests, and a second wave, with ETags stored, makes no GET at all.
func TestCoalescesAndStoresETags(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("terr", 200)
	// Ids that need escaping in the path and the batch query.
	ids[7], ids[77], ids[177] = "terr/007 ä", "terr?077&x=1", "terr%177"
	base := map[string]any{"status": "open", "owner": "seed", "territory": "T0", "score": 0}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, map[string]string{"batch_size": "100", "concurrency": "16"}))

	var wave1 []change
	for i := range 1000 {
		id := ids[i%200]
		var f map[string]any
		switch (i / 200) % 3 {
		case 0:
			f = map[string]any{"status": fmt.Sprintf("s%d", i)}
		case 1:
			f = map[string]any{"owner": fmt.Sprintf("o%d", i), "score": i}
		default:
			f = map[string]any{"territory": fmt.Sprintf("T%d", i), "status": fmt.Sprintf("s%d", i)}
		}
		wave1 = append(wave1, change{resource: id, fields: f})
	}
	changeIDs := h.insert(wave1...)
	h.waitDrained(60 * time.Second)

	require.Equal(t, map[string]int{"applied": 1000}, h.statusCounts(), "status counts: got %v; want all 1000 applied", h.statusCounts())
	want := expected(base, ids, wave1)
	h.requireRemote(want)

	st := h.sim.Stats()
	require.Equal(t, 2, st.BatchGets, "batch GETs: got %d; want ⌈200/100⌉ = 2", st.BatchGets)
	require.Equal(t, 0, st.Gets, "single GETs: got %d; want 0 (ETags come from the batch endpoint)", st.Gets)
	require.Equal(t, 200, st.Patches, "PATCHes: got %d; want 200 (one per resource: 5 changes coalesced into each)", st.Patches)
	require.Equal(t, 0, st.Conflicts, "conflicts: got %d; want 0", st.Conflicts)
	require.Equal(t, 202, st.Requests, "requests: got %d; want 202", st.Requests)
	require.Equal(t, 1, st.MaxInFlightPerResource, "max in flight per resource: got %d; want 1", st.MaxInFlightPerResource)

	outcomes := h.attemptsByOutcome()
	require.Equal(t, map[string]int{"applied": 200, "fetched": 2}, outcomes, "attempts by outcome: got %v; want 200 applied, 2 fetched", outcomes)
	// Every PATCH carried all 5 changes of its resource.
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PATCH' AND cardinality(change_ids) = 5`)
	require.Equal(t, 200, n, "PATCH attempts carrying 5 changes: got %d; want 200", n)

	// Stored ETags and snapshots are the remote's; every change records the
	// ETag of the write that carried it.
	stored := h.storedResources()
	require.Len(t, stored, 200, "stored resources: got %d; want 200", len(stored))
	rows := h.changes(changeIDs)
	for _, id := range ids {
		fields, etag, _ := h.sim.Get(id)
		s := stored[id]
		require.Equal(t, etag, s.etag, "stored ETag of %q: got %q; want %q", id, s.etag, etag)
		fields["id"] = id
		require.Equal(t, fields, s.snapshot, "stored snapshot of %q: got %v; want %v", id, s.snapshot, fields)
	}
	for cid, r := range rows {
		_, etag, _ := h.sim.Get(r.resource)
		require.Equal(t, etag, r.appliedETag, "applied_etag of change %d: got %q; want %q", cid, r.appliedETag, etag)
	}

	// Second wave: ETags are stored, so not a single GET of any kind.
	var wave2 []change
	for i, id := range ids {
		wave2 = append(wave2,
			change{resource: id, fields: map[string]any{"status": "closed"}},
			change{resource: id, fields: map[string]any{"score": 1000 + i}})
	}
	h.insert(wave2...)
	h.waitDrained(60 * time.Second)
	require.Equal(t, map[string]int{"applied": 1400}, h.statusCounts(), "status counts: got %v; want all 1400 applied", h.statusCounts())
	h.requireRemote(expected(base, ids, append(wave1, wave2...)))
	st2 := h.sim.Stats()
	require.Equal(t, st.Gets, st2.Gets, "single GETs after the second wave: got %d; want %d (no new GET)", st2.Gets, st.Gets)
	require.Equal(t, st.BatchGets, st2.BatchGets, "batch GETs after the second wave: got %d; want %d (no new GET)", st2.BatchGets, st.BatchGets)
	require.Equal(t, st.Patches+200, st2.Patches, "PATCHes after the second wave: got %d; want %d", st2.Patches, st.Patches+200)
	require.Equal(t, 0, st2.Conflicts, "conflicts: got %d; want 0", st2.Conflicts)
	h.requireAuditMatchesRemote()
}

// N resources without stored ETags cost ⌈N/batch⌉ batch requests and no
// single GET; a resource the batch answer leaves out is confirmed missing
// by one GET (404) and ends rejected.
func TestBatchPrefetch(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("acct", 250)
	h.seed(ids, map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"batch_size": "100", "concurrency": "16"}))

	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": fmt.Sprintf("crm-%d", i)}})
		if i == 120 {
			cs = append(cs, change{resource: "ghost", fields: map[string]any{"owner": "nobody"}})
		}
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(60 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": 250, "rejected": 1}, counts, "status counts: got %v; want 250 applied, 1 rejected", counts)
	st := h.sim.Stats()
	require.Equal(t, 3, st.BatchGets, "batch GETs: got %d; want ⌈251/100⌉ = 3", st.BatchGets)
	require.Equal(t, 1, st.Gets, "single GETs: got %d; want 1 (the ghost's, answered 404)", st.Gets)
	require.Equal(t, 250, st.Patches, "PATCHes: got %d; want 250", st.Patches)
	for _, r := range h.changes(changeIDs) {
		if r.resource == "ghost" {
			require.Equal(t, "rejected", r.status, "ghost change: got %s; want rejected", r.status)
			require.Contains(t, r.lastError, "not found", "ghost last_error: got %q; want it to say not found", r.lastError)
		}
	}
	require.Len(t, h.sim.History("ghost"), 0, "ghost history: got %d versions; want 0", len(h.sim.History("ghost")))

	// The batch requests, as audited: GETs without a resource, each asking
	// for at most 100 ids, 251 in all.
	rows, err := h.pool.Query(t.Context(),
		`SELECT url, outcome, status_code FROM stagesync.attempts WHERE method = 'GET' AND resource_id IS NULL ORDER BY id`)
	require.NoError(t, err)
	var asked int
	var n int
	for rows.Next() {
		var url, outcome string
		var status int
		require.NoError(t, rows.Scan(&url, &outcome, &status))
		require.Equal(t, "fetched", outcome, "batch attempt outcome: got %s; want fetched", outcome)
		require.Equal(t, 200, status, "batch attempt status: got %d; want 200", status)
		_, q, _ := strings.Cut(url, "ids=")
		q, _, _ = strings.Cut(q, "&")
		k := strings.Count(q, "%2C") + 1
		require.LessOrEqual(t, k, 100, "ids in one batch request: got %d; want ≤ 100", k)
		asked += k
		n++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 3, n, "batch GET attempts rows: got %d; want 3", n)
	require.Equal(t, 251, asked, "ids asked in batch requests: got %d; want 251", asked)
	h.requireAuditMatchesRemote()
}

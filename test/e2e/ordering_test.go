package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// Many small transactions to a few resources, interleaved, while the
// processor works against a remote that fails 10% of requests: the remote
// ends with the last inserted values, and its history never shows an older
// value after a newer one.
func TestOrderingUnderInterleavedInserts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 2 * time.Millisecond, ErrorRate: 0.1, Seed: 5})
	ids := []string{"hot-a", "hot-b", "hot-c"}
	base := map[string]any{"seq": -1, "f0": -1, "f1": -1}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "100", "batch_size": "2"}))

	const n = 300
	var cs []change
	for i := range n {
		c := change{resource: ids[i%len(ids)], fields: map[string]any{"seq": i, fmt.Sprintf("f%d", i%2): i}}
		cs = append(cs, c)
		b, err := json.Marshal(c.fields)
		require.NoError(t, err)
		// One transaction per change, committed in id order.
		_, err = h.pool.Exec(context.Background(),
			`INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ($1, $2, $3::jsonb)`, target, c.resource, string(b))
		require.NoError(t, err)
		if i%25 == 24 {
			// Let the processor catch up now and then, so that inserts land
			// on resources whose jobs are running or retrying.
			before := h.sim.Stats().Requests
			h.waitFor("some progress", 30*time.Second, func() bool { return h.sim.Stats().Requests > before })
		}
	}
	h.waitDrained(60 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": n}, counts, "status counts: got %v; want all %d applied", counts, n)
	h.requireRemote(expected(base, ids, cs))
	writes := 0
	for _, id := range ids {
		seq := h.requireIncreasing(id, "seq")
		writes += len(seq)
	}
	require.Less(t, writes, n, "api writes: got %d; want fewer than %d changes (coalescing)", writes, n)
	require.Equal(t, 1, h.sim.Stats().MaxInFlightPerResource, "max in flight per resource: got %d; want 1", h.sim.Stats().MaxInFlightPerResource)
	h.requireAuditMatchesRemote()
}

// A backlog deeper than one round of a job (5,000 changes) is worked in
// bounded rounds: a resource cut off by the round's limit gets its older
// changes first and the rest in the next round, so the remote still ends
// with the newest values and never sees an older one after a newer.
func TestDeepBacklogIsWorkedInBoundedRoundsInOrder(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	ids := []string{"deep-a", "deep-b"}
	h.seed(ids, map[string]any{"seq": -1})
	_, err := h.pool.Exec(context.Background(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ($1, 'http://127.0.0.1:1', '/x/{id}')`, target)
	require.NoError(t, err)
	// 3,500 changes each, staged before the processor starts so that one
	// job finds all 7,000 open: deep-a fits in the first round, deep-b is
	// cut after 1,500.
	const perResource = 3500
	_, err = h.pool.Exec(context.Background(), `INSERT INTO stagesync.changes (target, resource_id, fields)
		SELECT $1, r, jsonb_build_object('seq', g) FROM generate_series(0, $2::int - 1) g, unnest($3::text[]) r
		ORDER BY g, r`, target, perResource, ids)
	require.NoError(t, err)
	h.startProcessor(configYAML(nil, nil))
	h.waitDrained(60 * time.Second)

	require.Equal(t, map[string]int{"applied": 2 * perResource}, h.statusCounts())
	for _, id := range ids {
		seq := h.requireIncreasing(id, "seq")
		require.Equal(t, float64(perResource-1), seq[len(seq)-1], "last seq of %s: got %v; want %d", id, seq[len(seq)-1], perResource-1)
	}
	require.Len(t, h.apiVersions("deep-a"), 1, "deep-a: all its changes fit one round, one PATCH")
	require.Len(t, h.apiVersions("deep-b"), 2, "deep-b: cut by the round limit, two PATCHes in id order")
}

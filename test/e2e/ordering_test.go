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

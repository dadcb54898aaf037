package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A deep backlog stays pending instead of being claimed all at once: the
// claimer stops once the busy target's queue holds enough jobs for its
// workers, even while another configured target sits idle, and claims more
// as jobs finish.
func TestClaimsRunAheadOnlyAsFarAsTheWorkers(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{Latency: 10 * time.Millisecond})
	const n = 400
	ids := resourceIDs("deep", n)
	h.seed(ids, map[string]any{"status": "open"})
	h.startProcessor(`
dispatch:
  claim_batch: 50
  poll_interval: 1h
targets:
  ` + target + `:
    base_url: ${SIM_URL}
    item_path: /assignments/{id}
    batch_size: 10
    workers: 1
    concurrency: 2
  idle:
    base_url: ${SIM_URL}
    item_path: /assignments/{id}
`)
	cs := make([]change, 0, n)
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	h.insert(cs...)

	maxProcessing := 0
	deadline := time.Now().Add(2 * time.Minute)
	for h.count(`SELECT count(*) FROM stagesync.changes WHERE status IN ('pending', 'processing')`) > 0 {
		require.True(t, time.Now().Before(deadline), "backlog not drained in 2 minutes: %v", h.statusCounts())
		maxProcessing = max(maxProcessing, h.count(`SELECT count(*) FROM stagesync.changes WHERE status = 'processing'`))
		time.Sleep(20 * time.Millisecond)
	}
	require.Equal(t, map[string]int{"applied": n}, h.statusCounts())
	// One worker, two queued jobs of 10 resources, plus what one claim of
	// 50 adds before the queue is seen full: well under the 400 staged.
	require.LessOrEqual(t, maxProcessing, 150, "changes processing at once: got %d; want the claimer to stop ahead of the workers", maxProcessing)
	require.Greater(t, maxProcessing, 0)
}

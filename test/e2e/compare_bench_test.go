package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// defaultsConfig is a one-target config with nothing but what a target
// needs: every other setting is stagesync's default.
const defaultsConfig = `targets:
  crm:
    base_url: ${SIM_URL}
    item_path: /assignments/{id}
    batch_etag_path: /assignments
`

// batchConfig is defaultsConfig for a remote that offers OData JSON batch
// writes: batch_write with its defaults.
const batchConfig = defaultsConfig + `    batch_write: {}
`

// BenchmarkAgainstSeedRecipe runs SPEC §8.1's comparison in one run against
// one simulator (20 ms latency, people editing about 5% of the accounts per
// second on fields the CRM does not send): the seed workload of 500
// territory changes applied by the seeds' GET→PATCH recipe with one worker
// and with eight, and by stagesync with its default settings. Two shapes:
// one change per account, and the demo's mix of 500 changes over 200
// accounts, staged in account order. It reports each one's time, requests
// per change, and upstream values lost (an older value landed last),
// dropped (never written) or written twice, and stagesync's ratios.
func BenchmarkAgainstSeedRecipe(b *testing.B) {
	for _, tc := range []struct {
		name     string
		accounts int
		batch    bool
	}{
		{"one change per account", 500, false},
		{"500 changes over 200 accounts", 200, false},
		{"one change per account, batch writes", 500, true},
	} {
		b.Run(tc.name, func(b *testing.B) { benchAgainstSeedRecipe(b, 500, tc.accounts, tc.batch) })
	}
}

func benchAgainstSeedRecipe(b *testing.B, n, accounts int, batch bool) {
	h := newHarness(b, remotesim.Options{Latency: 20 * time.Millisecond, RequestLogSize: -1, BatchWrites: batch})
	if batch {
		b.Logf("settings: defaults + batch_write: {} (the remote offers OData JSON $batch; the recipe does not use it)")
		h.startProcessor(batchConfig)
	} else {
		b.Logf("settings: defaults")
		h.startProcessor(defaultsConfig)
	}

	type outcome struct {
		elapsed                   time.Duration
		requests                  int
		lost, dropped, duplicated int
		failed                    int
	}
	workload := func(prefix string) []change {
		ids := resourceIDs(prefix, accounts)
		h.seed(ids, map[string]any{"territory": "T0", "owner": "seed", "status": "open", "notes": ""})
		cs := make([]change, 0, n)
		for i := range n {
			cs = append(cs, change{resource: ids[i%accounts], fields: map[string]any{
				"territory": fmt.Sprintf("%s-T%d", prefix, i), "owner": fmt.Sprintf("%s-rep-%d", prefix, i)}})
		}
		return cs
	}
	people := func(ctx context.Context) func() {
		return h.sim.StartOtherUsers(ctx, 0.05*float64(accounts), []string{"notes", "status"})
	}
	recipe := func(prefix string, workers int) outcome {
		cs := workload(prefix)
		before := h.sim.Stats().Requests
		stop := people(b.Context())
		res := h.newSeedRecipe(workers).run(b.Context(), cs)
		stop()
		lost, dropped, dup := h.valueAudit(cs, nil)
		return outcome{elapsed: res.elapsed, requests: h.sim.Stats().Requests - before,
			lost: lost, dropped: dropped, duplicated: dup, failed: res.failed}
	}
	var naive1, naive8, ours outcome
	iter := 0
	for b.Loop() {
		b.StopTimer()
		iter++
		naive1 = recipe(fmt.Sprintf("n1-%d", iter), 1)
		naive8 = recipe(fmt.Sprintf("n8-%d", iter), 8)

		cs := workload(fmt.Sprintf("ss-%d", iter))
		before := h.sim.Stats().Requests
		stop := people(b.Context())
		b.StartTimer()
		start := time.Now()
		ids := h.insert(cs...)
		h.waitDrained(5 * time.Minute)
		elapsed := time.Since(start)
		b.StopTimer()
		stop()
		flagged := map[string]bool{}
		failed := 0
		for _, r := range h.changes(ids) {
			if r.status == "dead" || r.status == "rejected" {
				flagged[r.resource] = true
				failed++
			}
		}
		lost, dropped, dup := h.valueAudit(cs, flagged)
		ours = outcome{elapsed: elapsed, requests: h.sim.Stats().Requests - before,
			lost: lost, dropped: dropped, duplicated: dup, failed: failed}
		b.StartTimer()
	}
	require.Zero(b, ours.lost+ours.dropped+ours.duplicated,
		"stagesync: %d upstream values lost, %d dropped, %d written twice; want none", ours.lost, ours.dropped, ours.duplicated)
	for name, o := range map[string]outcome{"stagesync": ours, "recipe-1": naive1, "recipe-8": naive8} {
		b.ReportMetric(o.elapsed.Seconds(), name+"-s")
		b.ReportMetric(float64(o.requests)/float64(n), name+"-req/change")
		b.ReportMetric(float64(o.lost), name+"-lost")
		b.ReportMetric(float64(o.dropped), name+"-dropped")
		b.ReportMetric(float64(o.duplicated), name+"-dup")
		b.ReportMetric(float64(o.failed), name+"-failed")
	}
	b.ReportMetric(naive8.elapsed.Seconds()/ours.elapsed.Seconds(), "x-faster-than-recipe-8")
	b.ReportMetric(naive1.elapsed.Seconds()/ours.elapsed.Seconds(), "x-faster-than-recipe-1")
	b.ReportMetric(float64(ours.requests)/float64(naive8.requests), "requests-vs-recipe-8")
}

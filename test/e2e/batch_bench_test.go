package e2e

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkBatchWrites measures OData JSON batch writes (SPEC §8.1: ≤ 0.05
// requests per change where the remote offers $batch; ≥ 10,000 changes/s at
// one change per resource) next to one request per write, against the same
// simulator: the seed workload (500 territory changes, one per account,
// against a 20 ms remote) and one change per resource for 10,000 resources
// at zero latency. Requests are HTTP requests as the remote counts them (a
// batch POST once, batch ETag lookups included); inserts are timed.
func BenchmarkBatchWrites(b *testing.B) {
	workloads := []struct {
		name      string
		resources int
		latency   time.Duration
	}{
		{"seed workload", 500, 20 * time.Millisecond},
		{"one change per resource", 10000, 0},
	}
	modes := []struct {
		name   string
		target map[string]string
	}{
		{"batch writes", map[string]string{"batch_write": "{path: /$batch, max_requests: 50}"}},
		{"batch writes, larger jobs", map[string]string{"batch_write": "{path: /$batch, max_requests: 100}", "batch_size": "500", "workers": "8"}},
		{"single requests", nil},
	}
	for _, w := range workloads {
		b.Run(w.name, func(b *testing.B) {
			for _, m := range modes {
				b.Run(m.name, func(b *testing.B) {
					h := newHarness(b, remotesim.Options{Latency: w.latency, BatchWrites: true, RequestLogSize: -1})
					h.startProcessor(configYAML(nil, m.target))
					b.Logf("settings: %d changes over %d resources (one each), remote latency %s; target defaults except %s; batch ETag lookups on; backoff 10ms–200ms",
						w.resources, w.resources, w.latency, settingsOf(m.target))
					iter := 0
					var total time.Duration
					for b.Loop() {
						b.StopTimer()
						ids := resourceIDs(fmt.Sprintf("bw%d", iter), w.resources)
						h.seed(ids, map[string]any{"territory": "T0", "owner": "seed", "status": "open"})
						cs := make([]change, 0, len(ids))
						for i, id := range ids {
							cs = append(cs, change{resource: id, fields: map[string]any{"territory": fmt.Sprintf("T%d", i%37), "owner": fmt.Sprintf("rep-%d", i%11)}})
						}
						iter++
						b.StartTimer()
						start := time.Now()
						h.insert(cs...)
						h.waitDrained(5 * time.Minute)
						total += time.Since(start)
						b.StopTimer()
						if st := h.statusCounts(); st["applied"] != len(cs)*iter {
							b.Fatalf("status counts: got %v; want %d applied", st, len(cs)*iter)
						}
						b.StartTimer()
					}
					n := float64(w.resources * iter)
					b.ReportMetric(n/total.Seconds(), "changes/s")
					b.ReportMetric(float64(h.sim.Stats().Requests)/n, "requests/change")
					b.ReportMetric(total.Seconds()/float64(iter), "s/workload")
				})
			}
		})
	}
}

// settingsOf names the target keys a benchmark sets beyond configYAML's.
func settingsOf(target map[string]string) string {
	if len(target) == 0 {
		return "no batch_write (one request per write)"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(target)) {
		parts = append(parts, k+": "+target[k])
	}
	return strings.Join(parts, ", ")
}

package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkThroughput drains 20,000 changes over 5,000 resources (no stored
// ETags: batch lookups, then one PATCH per resource) against a remote with
// no latency, inserts included, and reports changes/s and requests/change.
func BenchmarkThroughput(b *testing.B) {
	const (
		resources = 5000
		changes   = 20000
	)
	h := newHarness(b, remotesim.Options{RequestLogSize: -1})
	h.startProcessor(configYAML(
		map[string]string{"claim_batch": "20000"},
		map[string]string{"batch_size": "250", "workers": "8", "concurrency": "64"}))
	iter := 0
	var total time.Duration
	for b.Loop() {
		b.StopTimer()
		ids := resourceIDs(fmt.Sprintf("tp%d", iter), resources)
		h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
		cs := make([]change, 0, changes)
		for i := range changes {
			cs = append(cs, change{resource: ids[i%resources], fields: map[string]any{"status": fmt.Sprintf("s%d", i), "score": i}})
		}
		iter++
		b.StartTimer()
		start := time.Now()
		h.insert(cs...)
		h.waitDrained(5 * time.Minute)
		total += time.Since(start)
	}
	st := h.sim.Stats()
	b.ReportMetric(float64(changes*iter)/total.Seconds(), "changes/s")
	b.ReportMetric(float64(st.Requests)/float64(changes*iter), "requests/change")
}

// BenchmarkSeedWorkload is SPEC §8's seed workload: 500 territory changes
// against a remote with 20 ms latency; the bar is under one second.
func BenchmarkSeedWorkload(b *testing.B) {
	const n = 500
	h := newHarness(b, remotesim.Options{Latency: 20 * time.Millisecond, RequestLogSize: -1})
	h.startProcessor(configYAML(nil, map[string]string{"batch_size": "100", "workers": "8", "concurrency": "64"}))
	iter := 0
	var total time.Duration
	for b.Loop() {
		b.StopTimer()
		ids := resourceIDs(fmt.Sprintf("assign%d", iter), n)
		h.seed(ids, map[string]any{"territory": "T0", "owner": "seed", "status": "open"})
		cs := make([]change, 0, n)
		for i, id := range ids {
			cs = append(cs, change{resource: id, fields: map[string]any{"territory": fmt.Sprintf("T%d", i%37), "owner": fmt.Sprintf("rep-%d", i%11)}})
		}
		iter++
		b.StartTimer()
		start := time.Now()
		h.insert(cs...)
		h.waitDrained(5 * time.Minute)
		total += time.Since(start)
	}
	b.ReportMetric(total.Seconds()/float64(iter), "s/workload")
	b.ReportMetric(float64(h.sim.Stats().Requests)/float64(n*iter), "requests/change")
}

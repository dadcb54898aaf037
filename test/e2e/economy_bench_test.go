package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkAPIEconomy measures SPEC §8's API economy with the default
// settings: remote requests per change when 5% of the resources are edited
// by people between two syncs (their stored ETags are stale, so each costs
// a conflict and a second write; every field stagesync sends has policy
// ours, so the conflict's ETag is used without a GET). It reports two
// upstream shapes: every resource changed once, and every resource changed
// four times (coalesced into one request). It also counts the GETs, and
// those that were not caused by a conflict: with ETags stored there must
// be none.
func BenchmarkAPIEconomy(b *testing.B) {
	for _, perResource := range []int{1, 4} {
		b.Run(fmt.Sprintf("%d changes per resource", perResource), func(b *testing.B) {
			const resources = 1000
			h := newHarness(b, remotesim.Options{RequestLogSize: -1})
			h.startProcessor(defaultsConfig)
			b.Logf("settings: defaults")
			iter := 0
			var requests, changes, gets, conflicts int
			for b.Loop() {
				b.StopTimer()
				ids := resourceIDs(fmt.Sprintf("eco%d", iter), resources)
				h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
				first := make([]change, 0, resources)
				for _, id := range ids {
					first = append(first, change{resource: id, fields: map[string]any{"status": "synced"}})
				}
				h.insert(first...) // stores every ETag and snapshot
				h.waitDrained(5 * time.Minute)
				for i := 0; i < resources; i += 20 { // 5% edited by people
					h.sim.Edit(ids[i], map[string]any{"owner": "a person"}, "other-user")
				}
				before := h.sim.Stats()
				wave := make([]change, 0, resources*perResource)
				for k := range perResource {
					for _, id := range ids {
						wave = append(wave, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", k)}})
					}
				}
				iter++
				b.StartTimer()
				h.waitFinished(h.insert(wave...), 5*time.Minute)
				b.StopTimer()
				after := h.sim.Stats()
				requests += after.Requests - before.Requests
				changes += len(wave)
				gets += after.Gets - before.Gets
				conflicts += after.Conflicts - before.Conflicts
				b.StartTimer()
			}
			b.ReportMetric(float64(requests)/float64(changes), "requests/change")
			b.ReportMetric(float64(gets), "GETs")
			b.ReportMetric(float64(conflicts), "conflicts")
			b.ReportMetric(float64(max(0, gets-conflicts)), "GETs-not-after-conflict")
		})
	}
}

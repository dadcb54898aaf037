package e2e

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkThroughput drains a backlog against a remote with no latency
// (no stored ETags: batch lookups, then one PATCH per resource), inserts
// included, with the default settings, and reports changes/s and
// requests/change: 20,000 changes over 5,000 resources (coalesced four to
// a request) and 10,000 changes over 10,000 resources (one request each,
// the worst case for the bar).
func BenchmarkThroughput(b *testing.B) {
	for _, tc := range []struct{ changes, resources int }{{20000, 5000}, {10000, 10000}} {
		b.Run(fmt.Sprintf("%d changes over %d resources", tc.changes, tc.resources), func(b *testing.B) {
			h := newHarness(b, remotesim.Options{RequestLogSize: -1})
			h.startProcessor(defaultsConfig)
			b.Logf("settings: defaults")
			iter := 0
			var total time.Duration
			for b.Loop() {
				b.StopTimer()
				ids := resourceIDs(fmt.Sprintf("tp%d", iter), tc.resources)
				h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
				cs := make([]change, 0, tc.changes)
				for i := range tc.changes {
					cs = append(cs, change{resource: ids[i%tc.resources], fields: map[string]any{"status": fmt.Sprintf("s%d", i), "score": i}})
				}
				iter++
				b.StartTimer()
				start := time.Now()
				h.waitFinished(h.insert(cs...), 5*time.Minute)
				total += time.Since(start)
			}
			st := h.sim.Stats()
			b.ReportMetric(float64(tc.changes*iter)/total.Seconds(), "changes/s")
			b.ReportMetric(float64(st.Requests)/float64(tc.changes*iter), "requests/change")
		})
	}
}

// BenchmarkSeedWorkload is SPEC §8's seed workload with the default
// settings (SPEC §8.1): 500 territory changes, one per account, against a
// remote with 20 ms latency; the bar is under 0.5 s. It also reports
// insert → terminal latency per change (p50, p99, max) and the record lag:
// from the answer to a change's last request to its terminal state. Each
// resource is recorded within milliseconds of its answer, not when its
// job's slowest resource is done.
func BenchmarkSeedWorkload(b *testing.B) {
	const n = 500
	h := newHarness(b, remotesim.Options{Latency: 20 * time.Millisecond, RequestLogSize: -1})
	h.startProcessor(defaultsConfig)
	b.Logf("settings: defaults")
	// A processor runs long before a workload arrives: a few changes first
	// open its database connections (a fresh backend reads its catalog on
	// first use), without growing the in-flight limit.
	warm := resourceIDs("warm", 8)
	h.seed(warm, map[string]any{"owner": "seed"})
	for _, id := range warm {
		h.insert(change{resource: id, fields: map[string]any{"owner": "warm"}})
	}
	h.waitDrained(time.Minute)
	warmRequests := h.sim.Stats().Requests
	iter := 0
	var total time.Duration
	var lat, lag []float64
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
		changeIDs := h.insert(cs...)
		h.waitFinished(changeIDs, 5*time.Minute)
		total += time.Since(start)
		b.StopTimer()
		lat = append(lat, h.latencies(changeIDs)...)
		lag = append(lag, h.recordLags(changeIDs)...)
		b.StartTimer()
	}
	b.ReportMetric(total.Seconds()/float64(iter), "s/workload")
	b.ReportMetric(float64(h.sim.Stats().Requests-warmRequests)/float64(n*iter), "requests/change")
	slices.Sort(lat)
	b.ReportMetric(percentile(lat, 0.5)*1000, "p50-ms")
	b.ReportMetric(percentile(lat, 0.99)*1000, "p99-ms")
	b.ReportMetric(lat[len(lat)-1]*1000, "max-ms")
	slices.Sort(lag)
	b.ReportMetric(percentile(lag, 0.5)*1000, "record-lag-p50-ms")
	b.ReportMetric(percentile(lag, 0.99)*1000, "record-lag-p99-ms")
}

// recordLags returns, per change, the seconds from the answer to the last
// request that carried it to its terminal state being recorded: how long a
// finished change waits for its recording.
func (h *harness) recordLags(ids []int64) []float64 {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), `
		SELECT extract(epoch FROM c.finished_at - max(a.created_at + a.duration_ms * interval '1 millisecond'))::float8
		FROM stagesync.changes c
		JOIN stagesync.attempts a ON a.target = c.target AND a.resource_id = c.resource_id AND a.change_ids @> ARRAY[c.id]
		WHERE c.id = ANY ($1::bigint[]) AND c.finished_at IS NOT NULL
		GROUP BY c.id, c.finished_at`, ids)
	require.NoError(h.t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[float64])
	require.NoError(h.t, err)
	return out
}

// waitFinished waits until every change of ids (inserted together, so
// their ids are one range) has ended. It polls every 20 ms like
// waitDrained, but each poll reads only from the lowest id still open (an
// index range scan that stops at the first open change) instead of
// counting the whole table: a benchmark should not spend a fifth of a core
// watching itself.
func (h *harness) waitFinished(ids []int64, timeout time.Duration) {
	h.t.Helper()
	if len(ids) == 0 {
		return
	}
	lo, hi := slices.Min(ids), slices.Max(ids)
	deadline := time.Now().Add(timeout)
	for {
		var open int64
		err := h.pool.QueryRow(context.Background(), `
			SELECT id FROM stagesync.changes
			WHERE id >= $1 AND status IN ('pending', 'processing')
			ORDER BY id LIMIT 1`, lo).Scan(&open)
		if errors.Is(err, pgx.ErrNoRows) || err == nil && open > hi {
			return
		}
		require.NoError(h.t, err)
		lo = open
		if time.Now().After(deadline) {
			h.waitDrained(0) // fails listing the open changes
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// latencies returns finished_at - created_at of the changes, in seconds.
func (h *harness) latencies(ids []int64) []float64 {
	h.t.Helper()
	rows, err := h.pool.Query(context.Background(), `
		SELECT extract(epoch FROM finished_at - created_at)::float8
		FROM stagesync.changes WHERE id = ANY ($1::bigint[]) AND finished_at IS NOT NULL`, ids)
	require.NoError(h.t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[float64])
	require.NoError(h.t, err)
	return out
}

// percentile of sorted values (nearest rank).
func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// BenchmarkIdleLatency is SPEC §8's latency bar with the default
// settings: on an idle processor, single inserts (one every 50 ms, each its
// own transaction) reach their terminal state within milliseconds thanks
// to LISTEN/NOTIFY. It reports p50 and p99 of finished_at - created_at.
func BenchmarkIdleLatency(b *testing.B) {
	const n = 60
	h := newHarness(b, remotesim.Options{RequestLogSize: -1})
	ids := resourceIDs("lat", n)
	h.seed(ids, map[string]any{"status": "open"})
	h.startProcessor(defaultsConfig)
	b.Logf("settings: defaults")
	var p50, p99 float64
	for b.Loop() {
		b.StopTimer()
		_, err := h.pool.Exec(b.Context(), `DELETE FROM stagesync.changes`)
		require.NoError(b, err)
		b.StartTimer()
		for i := range n {
			h.insert(change{resource: ids[i], fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
			time.Sleep(50 * time.Millisecond)
		}
		h.waitDrained(time.Minute)
		require.NoError(b, h.pool.QueryRow(b.Context(), `SELECT
			percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
			percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
			FROM stagesync.changes`).Scan(&p50, &p99))
	}
	b.ReportMetric(p50*1000, "p50-ms")
	b.ReportMetric(p99*1000, "p99-ms")
}

// BenchmarkRecoveryAfterKill is SPEC §8.1's recovery bar with the default
// liveness settings: two `stagesync run` processes drain 300 changes against a
// remote with 250 ms latency; one is killed -9 mid-drain. It reports the
// seconds from the kill until the last change the killed process held is
// terminal on the survivor (bar: 15 s), and until PostgreSQL has ended the
// killed process's sessions and released its locks.
func BenchmarkRecoveryAfterKill(b *testing.B) {
	b.Logf("settings: two processes with batch_size 10, workers 2, concurrency 4 (so the killed one holds work), poll_interval 5s; remote latency 250 ms")
	var finished, sessions time.Duration
	iter := 0
	for b.Loop() {
		h := newHarness(b, remotesim.Options{Latency: 250 * time.Millisecond, IdempotencyCache: true, RequestLogSize: -1})
		rec, _ := killMidDrain(b, h, 300)
		finished += rec.finished
		sessions += rec.sessionsGone
		iter++
	}
	b.ReportMetric(finished.Seconds()/float64(iter), "recovery-s")
	b.ReportMetric(sessions.Seconds()/float64(iter), "sessions-gone-s")
}

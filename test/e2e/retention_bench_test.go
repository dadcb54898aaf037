package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkDrainDuringCleanup measures whether retention's cleanup stalls
// processing (issue 10 §5): 1,000,000 changes finished 40 days ago and
// 1,000,000 attempts made 100 days ago are past the default periods (30d,
// 90d); the processor starts, its retention job begins deleting them
// (5,000 rows per statement, 100ms apart), and 20,000 new changes over 5,000
// resources are drained meanwhile. Reported: the drain's changes/s, with
// the cleanup running and with retention off, and the cleanup's rows/s.
func BenchmarkDrainDuringCleanup(b *testing.B) {
	const expired, drain, resources = 1_000_000, 20000, 5000
	for _, tc := range []struct {
		name      string
		retention string
	}{
		{"retention off", `{finished: "off", audit: "off"}`},
		{"cleanup running", `{finished: 30d, audit: 90d}`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			h := newHarness(b, remotesim.Options{RequestLogSize: -1})
			_, err := h.pool.Exec(ctx, `INSERT INTO stagesync.targets (name, base_url, item_path)
				VALUES ($1, 'http://127.0.0.1:1', '/assignments/{id}')`, target)
			require.NoError(b, err)
			b.Logf("settings: retention %s; claim_batch 20000, batch_size 250, workers 8, concurrency 64; %d expired rows, %d changes over %d resources to drain", tc.retention, expired, drain, resources)
			iter := 0
			var drained time.Duration
			var deleted int
			var cleanup time.Duration
			for b.Loop() {
				b.StopTimer()
				seedExpired(b, h, expired)
				h.startProcessor("retention: " + tc.retention + "\n" + configYAML(
					map[string]string{"claim_batch": "20000"},
					map[string]string{"batch_size": "250", "workers": "8", "concurrency": "64"}))
				cleanupStart := time.Now()
				if tc.retention != `{finished: "off", audit: "off"}` {
					h.waitFor("the cleanup to begin", time.Minute, func() bool {
						return h.count(`SELECT count(*) FROM stagesync.admin_actions WHERE action = 'retention'`) > 0 ||
							h.count(`SELECT count(*) FROM river_job WHERE kind = 'stagesync_retention' AND state = 'running'`) > 0
					})
				}
				ids := resourceIDs(fmt.Sprintf("dc%d", iter), resources)
				h.seed(ids, map[string]any{"status": "open"})
				cs := make([]change, 0, drain)
				for i := range drain {
					cs = append(cs, change{resource: ids[i%resources], fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
				}
				iter++
				b.StartTimer()
				start := time.Now()
				h.insert(cs...)
				h.waitDrained(5 * time.Minute)
				drained += time.Since(start)
				b.StopTimer()
				if tc.retention != `{finished: "off", audit: "off"}` {
					left := func() int {
						return h.count(`SELECT count(*) FROM stagesync.changes WHERE finished_at < now() - interval '30 days'`) +
							h.count(`SELECT count(*) FROM stagesync.attempts WHERE created_at < now() - interval '90 days'`)
					}
					deleted += 2*expired - left()
					h.waitFor("the cleanup to finish", 10*time.Minute, func() bool { return left() == 0 })
					cleanup += time.Since(cleanupStart)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(drain*iter)/drained.Seconds(), "changes/s")
			if cleanup > 0 {
				b.ReportMetric(float64(2*expired*iter)/cleanup.Seconds(), "deleted-rows/s")
				b.ReportMetric(float64(deleted)/float64(iter), "deleted-during-drain")
			}
		})
	}
}

// seedExpired writes n changes that finished 40 days ago and n attempts
// made 100 days ago, as the owner, in statements of 100,000 rows.
func seedExpired(b *testing.B, h *harness, n int) {
	b.Helper()
	ctx := context.Background()
	for start := 0; start < n; start += 100000 {
		_, err := h.pool.Exec(ctx, `INSERT INTO stagesync.changes (target, resource_id, fields, status, attempts, finished_at, created_at)
			SELECT $1, 'old-' || g, jsonb_build_object('status', 'old', 'n', g), 'applied', 1,
			       now() - interval '40 days' - g * interval '1 ms', now() - interval '41 days'
			FROM generate_series($2::int, $2::int + 99999) g`, target, start)
		require.NoError(b, err)
		_, err = h.pool.Exec(ctx, `INSERT INTO stagesync.attempts (target, resource_id, change_ids, method, url,
				status_code, duration_ms, outcome, created_at)
			SELECT $1, 'old-' || g, ARRAY[g::bigint], 'PATCH', 'http://127.0.0.1:1/assignments/old-' || g,
			       200, 2, 'applied', now() - interval '100 days' - g * interval '1 ms'
			FROM generate_series($2::int, $2::int + 99999) g`, target, start)
		require.NoError(b, err)
	}
	_, err := h.pool.Exec(ctx, "ANALYZE stagesync.changes; ANALYZE stagesync.attempts")
	require.NoError(b, err)
}

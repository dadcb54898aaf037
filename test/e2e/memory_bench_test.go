package e2e

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkBacklogMemory is SPEC §8's memory bar: a `stagesync run` process
// drains a backlog of 1,000,000 changes (over 10,000 resources) and its
// peak RSS (VmHWM) must stay flat, under 150 MB. It reports the peak, the
// drain rate and requests per change. Set STAGESYNC_BENCH_BACKLOG to use
// another size.
func BenchmarkBacklogMemory(b *testing.B) {
	total := 1_000_000
	if v := os.Getenv("STAGESYNC_BENCH_BACKLOG"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err, "STAGESYNC_BENCH_BACKLOG")
		total = n
	}
	const resources = 10_000
	h := newHarness(b, remotesim.Options{RequestLogSize: -1})
	ids := resourceIDs("mem", resources)
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	// The target must exist before the backlog is staged; the process
	// registers it again at start.
	_, err := h.pool.Exec(b.Context(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ($1, $2, '/assignments/{id}')`, target, h.srv.URL)
	require.NoError(b, err)
	_, err = h.pool.Exec(b.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields)
		SELECT $1, 'mem-' || lpad((g % $2)::text, 4, '0'), jsonb_build_object('status', 's' || g, 'score', g)
		FROM generate_series(1, $3::int) g`, target, resources, total)
	require.NoError(b, err)
	require.Equal(b, ids[0], "mem-0000", "resource ids must match the staged ones")

	cfg := h.writeConfig(configYAML(map[string]string{"poll_interval": "1s"},
		map[string]string{"workers": "8", "concurrency": "32", "batch_size": "250"}))
	b.Logf("settings: a `run` process; workers 8, concurrency 32, batch_size 250, poll_interval 1s; %d changes over %d resources staged before it starts", total, resources)
	for b.Loop() {
		start := time.Now()
		p := h.startRun("backlog", cfg)
		h.waitDrained(30 * time.Minute)
		elapsed := time.Since(start)
		peak := peakRSS(b, p.cmd.Process.Pid)
		p.stop(b)
		b.ReportMetric(float64(peak)/(1<<20), "peak-RSS-MB")
		b.ReportMetric(float64(total)/elapsed.Seconds(), "changes/s")
		b.ReportMetric(float64(h.sim.Stats().Requests)/float64(total), "requests/change")
	}
}

// peakRSS reads the high-water mark of a process's resident set.
func peakRSS(b *testing.B, pid int) int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(b, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			require.NoError(b, err)
			return kb << 10
		}
	}
	b.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// BenchmarkHugeAnswersMemory is issue 8 §4's case: a remote answers every
// request with a 100 MB body, and a `stagesync run` process makes eight
// requests at once. The process reads at most 8 MiB of an answer and at
// most 32 MiB of answers at once, so its peak RSS stays far below the
// 299 MB it reached before. It reports the peak.
func BenchmarkHugeAnswersMemory(b *testing.B) {
	const resources = 8
	h := newHarness(b, remotesim.Options{RequestLogSize: -1,
		Misbehavior: remotesim.Misbehavior{PadBodyBytes: 100 << 20}})
	cfg := h.writeConfig(configYAML(nil, map[string]string{"concurrency": "8", "workers": "8", "batch_size": "1"}))
	b.Logf("settings: concurrency 8, workers 8, batch_size 1 (one job per resource)")
	for b.Loop() {
		ids := resourceIDs(fmt.Sprintf("huge%d", b.N), resources)
		h.seed(ids, map[string]any{"status": "open"})
		p := h.startRun("huge", cfg)
		var cs []change
		for _, id := range ids {
			cs = append(cs, change{resource: id, fields: map[string]any{"status": "closed"}})
		}
		h.insert(cs...)
		h.waitDrained(5 * time.Minute)
		peak := peakRSS(b, p.cmd.Process.Pid)
		p.stop(b)
		b.ReportMetric(float64(peak)/(1<<20), "peak-RSS-MB")
	}
}

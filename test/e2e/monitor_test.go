package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// jsonLog collects a JSON logger's records, safe for concurrent use.
type jsonLog struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *jsonLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// records returns the records whose msg is msg.
func (l *jsonLog) records(t testing.TB, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	text := l.buf.String()
	l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &rec), "log line %q", sc.Text())
		if rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// gathered returns one series of a gauge with a target label from reg.
func gathered(t testing.TB, reg *prometheus.Registry, name, target string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "target" && l.GetValue() == target {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

// Other users edit the resources stagesync writes, so a good share of its
// writes conflict: the monitor's gauge shows the database's ratio, one
// WARN says the target crossed its alert (naming the hot resources), and
// progress lines follow the drain and stop once the target is idle.
func TestConflictAlertAndProgressLinesEndToEnd(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{ConflictStatus: 412, Seed: 11})
	ids := resourceIDs("hot", 8)
	h.seed(ids, map[string]any{"status": "open", "owner": "seed-owner"})

	cfg := h.config(configYAML(nil, map[string]string{
		"merge":        "{default: ours, fields: {owner: theirs}}",
		"max_attempts": "100",
		"alert":        "{conflict_rate: 0.05, window: 1m}",
	}))
	logs := &jsonLog{}
	reg := prometheus.NewRegistry()
	p, err := processor.New(cfg, processor.Options{
		Pool: h.pool, Logger: slog.New(slog.NewJSONHandler(logs, nil)), Metrics: processor.NewMetrics(reg),
		MonitorEvery: 50 * time.Millisecond, ProgressEvery: 100 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done, "processor.Run")
	})
	h.waitFor("the processor registered", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.processes WHERE client_id = $1`, p.ClientID()) == 1
	})

	h.sim.SetFaults(remotesim.Faults{Latency: 5 * time.Millisecond})
	stopUsers := h.sim.StartOtherUsers(context.Background(), 400, []string{"owner", "status"})
	for wave := range 6 {
		var cs []change
		for _, id := range ids {
			cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("w%d", wave)}})
		}
		h.insert(cs...)
		h.waitDrained(60 * time.Second)
	}
	stopUsers()

	// The alert: one WARN with the window's figures and the hot resources.
	const warn = "conflict rate above the alert threshold"
	h.waitFor("the WARN of the conflict-rate alert", 30*time.Second, func() bool { return len(logs.records(t, warn)) > 0 })
	var requests, conflicts int
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE outcome = 'conflict')
		FROM stagesync.attempts WHERE target = $1`, target).Scan(&requests, &conflicts))
	require.GreaterOrEqual(t, requests, processor.ConflictAlertMinRequests, "requests made")
	require.Greater(t, float64(conflicts)/float64(requests), 0.05, "conflict rate of the run: got %d of %d; want above 5%%", conflicts, requests)
	w := logs.records(t, warn)
	require.Len(t, w, 1, "WARN lines of the alert")
	require.Equal(t, target, w[0]["target"])
	require.Equal(t, "5%", w[0]["threshold"])
	require.Equal(t, "1m0s", w[0]["window"])
	require.Contains(t, w[0]["hot_resources"], "hot-", "WARN's hot resources")

	// Nothing has left the 1m window yet: once the monitor has read the
	// last request, the gauge is exactly the database's ratio.
	want := float64(conflicts) / float64(requests)
	h.waitFor(fmt.Sprintf("stagesync_conflict_ratio = %d/%d", conflicts, requests), 30*time.Second, func() bool {
		v, ok := gathered(t, reg, "stagesync_conflict_ratio", target)
		return ok && v == want
	})
	n, _ := gathered(t, reg, "stagesync_conflict_window_requests", target)
	require.Equal(t, float64(requests), n, "stagesync_conflict_window_requests")

	// Progress lines while draining, with the finished changes and the
	// interval's conflicts; silence once idle.
	h.waitFor("progress lines to cover every change", 30*time.Second, func() bool {
		finished := 0.0
		for _, l := range logs.records(t, "progress") {
			finished += l["finished"].(float64)
		}
		return finished == float64(6*len(ids))
	})
	// Consecutive intervals: every change and every request counted once.
	var lineRequests, lineConflicts float64
	for _, l := range logs.records(t, "progress") {
		require.Equal(t, target, l["target"])
		lineRequests += l["requests"].(float64)
		lineConflicts += l["conflicts"].(float64)
	}
	require.Equal(t, float64(requests), lineRequests, "requests counted by the progress lines")
	require.Equal(t, float64(conflicts), lineConflicts, "conflicts counted by the progress lines")
	h.waitFor("progress lines to stop once idle", 60*time.Second, func() bool {
		before := len(logs.records(t, "progress"))
		time.Sleep(time.Second) // ten progress intervals
		return len(logs.records(t, "progress")) == before
	})
	last := logs.records(t, "progress")
	l := last[len(last)-1]
	require.Equal(t, 0.0, l["pending"], "last progress line's pending")
	require.Equal(t, 0.0, l["processing"], "last progress line's processing")
}

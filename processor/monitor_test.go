package processor

import (
	"bufio"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/dbtest"
)

// monitorConfig has targets t (the default alert: 5% over 15m) and u (10%
// over 1h).
const monitorConfig = `
targets:
  t:
    base_url: http://127.0.0.1:1
    item_path: /items/{id}
  u:
    base_url: http://127.0.0.1:1
    item_path: /items/{id}
    alert: {conflict_rate: 0.1, window: 1h}
`

// logLines collects a JSON logger's records.
type logLines struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// records returns the records whose msg is msg.
func (l *logLines) records(t *testing.T, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	text := l.buf.String()
	l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		var rec map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &rec), "log line %q", sc.Text())
		if rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// newMonitored builds a processor of monitorConfig on pool that logs JSON
// to the returned lines; with live, it also registers as a live process
// (so it may be the one that logs). Nothing runs in the background: tests
// call checkConflicts and logProgress themselves.
func newMonitored(t *testing.T, pool *pgxpool.Pool, live bool) (*Processor, *logLines) {
	t.Helper()
	cfg, err := ParseConfig([]byte(monitorConfig), func(string) string { return "" })
	require.NoError(t, err)
	logs := &logLines{}
	p, err := New(cfg, Options{Pool: pool, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	require.NoError(t, err)
	require.NoError(t, p.RegisterTargets(t.Context()))
	if live {
		require.NoError(t, p.live.start(t.Context()))
		t.Cleanup(func() { p.live.stop(context.Background()) })
	}
	return p, logs
}

// insertAttempts writes n attempts rows of target made ago, the first
// conflicts of them answered 412 (outcome conflict), the rest 200, each
// for resource prefix+i.
func insertAttempts(t *testing.T, pool *pgxpool.Pool, target, prefix string, n, conflicts int, ago time.Duration) {
	t.Helper()
	_, err := pool.Exec(t.Context(), `
		INSERT INTO stagesync.attempts (target, resource_id, method, url, status_code, duration_ms, outcome, created_at)
		SELECT $1, $2 || i, 'PATCH', 'http://127.0.0.1:1/items/' || $2 || i,
		       CASE WHEN i <= $4 THEN 412 ELSE 200 END, 5,
		       CASE WHEN i <= $4 THEN 'conflict' ELSE 'applied' END,
		       now() - make_interval(secs => $5)
		FROM generate_series(1, $3) AS i`, target, prefix, n, conflicts, ago.Seconds())
	require.NoError(t, err)
}

// gaugeSeries returns a gauge vector's series: label value → value.
func gaugeSeries(t *testing.T, vec *prometheus.GaugeVec) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(vec))
	mfs, err := reg.Gather()
	require.NoError(t, err)
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			out[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
		}
	}
	return out
}

// gaugeValue is one series' value of a gauge vector with one label; it
// fails the test when the series does not exist.
func gaugeValue(t *testing.T, vec *prometheus.GaugeVec, label string) float64 {
	t.Helper()
	v, ok := gaugeSeries(t, vec)[label]
	require.True(t, ok, "no series %q", label)
	return v
}

func TestConflictRatioGaugeIsConflictsOverRequestsInTheWindow(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	p, _ := newMonitored(t, pool, false)
	_, err := pool.Exec(t.Context(), `INSERT INTO stagesync.targets (name, base_url, item_path) VALUES ('elsewhere', 'http://127.0.0.1:1', '/i/{id}')`)
	require.NoError(t, err)

	// t, window 15m: 36 requests 5 minutes ago (6 conflicts), and 4 GETs
	// after conflicts (requests too); 10 conflicts 20 minutes ago are
	// outside the window.
	insertAttempts(t, pool, "t", "a", 36, 6, 5*time.Minute)
	_, err = pool.Exec(t.Context(), `INSERT INTO stagesync.attempts (target, resource_id, method, url, status_code, duration_ms, outcome)
		SELECT 't', 'a' || i, 'GET', 'http://127.0.0.1:1/items/a' || i, 200, 3, 'fetched' FROM generate_series(1, 4) i`)
	require.NoError(t, err)
	insertAttempts(t, pool, "t", "old", 10, 10, 20*time.Minute)
	// u, window 1h: 8 requests 30 minutes ago, 2 of them conflicts; 5
	// conflicts 2 hours ago are outside.
	insertAttempts(t, pool, "u", "b", 8, 2, 30*time.Minute)
	insertAttempts(t, pool, "u", "old", 5, 5, 2*time.Hour)
	insertAttempts(t, pool, "elsewhere", "c", 10, 10, time.Minute)

	require.NoError(t, p.checkConflicts(t.Context()))
	for _, c := range []struct {
		target                     string
		ratio, requests, threshold float64
	}{
		{"t", 6.0 / 40, 40, 0.05},
		{"u", 2.0 / 8, 8, 0.1},
	} {
		require.InDelta(t, c.ratio, gaugeValue(t, p.metrics.conflictRatio, c.target), 1e-9,
			"stagesync_conflict_ratio{target=%q}", c.target)
		require.Equal(t, c.requests, gaugeValue(t, p.metrics.conflictRequests, c.target),
			"stagesync_conflict_window_requests{target=%q}", c.target)
		require.Equal(t, c.threshold, gaugeValue(t, p.metrics.conflictThreshold, c.target),
			"stagesync_conflict_ratio_threshold{target=%q}", c.target)
		require.Equal(t, 0.0, gaugeValue(t, p.metrics.paused, c.target), "stagesync_target_paused{target=%q}", c.target)
	}
	require.Equal(t, 2, len(gaugeSeries(t, p.metrics.conflictRatio)), "series of stagesync_conflict_ratio: only this process's targets")

	// The same figures for `status`, which also sees the target no process
	// of this config serves (with the default alert).
	var alerts []ConflictAlert
	require.NoError(t, pgx.BeginTxFunc(t.Context(), pool, pgx.TxOptions{}, func(tx pgx.Tx) error {
		alerts, err = ReadConflictAlerts(t.Context(), tx)
		return err
	}))
	require.Equal(t, []ConflictAlert{
		{Target: "elsewhere", Threshold: 0.05, Window: 15 * time.Minute, Requests: 10, Conflicts: 10},
		{Target: "t", Threshold: 0.05, Window: 15 * time.Minute, Requests: 40, Conflicts: 6},
		{Target: "u", Threshold: 0.1, Window: time.Hour, Requests: 8, Conflicts: 2},
	}, alerts)
	require.True(t, alerts[1].Over(), "t: 15%% of 40 requests over a 5%% alert: got not over; want over")
	require.False(t, alerts[2].Over(), "u: 25%% of 8 requests: got over; want not over (fewer than %d requests)", ConflictAlertMinRequests)

	// A pause shows in stagesync_target_paused.
	_, err = pool.Exec(t.Context(), `UPDATE stagesync.targets SET paused_until = now() + interval '1 minute' WHERE name = 'u'`)
	require.NoError(t, err)
	require.NoError(t, p.checkConflicts(t.Context()))
	require.Equal(t, 1.0, gaugeValue(t, p.metrics.paused, "u"), "stagesync_target_paused{target=\"u\"} while paused")
}

func TestConflictAlertWarnsOnceWhenCrossingAndInfoOnceOnRecovery(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	p, logs := newMonitored(t, pool, true)
	const warn, info = "conflict rate above the alert threshold", "conflict rate back under the alert threshold"
	check := func(wantWarns, wantInfos int, when string) {
		t.Helper()
		require.NoError(t, p.checkConflicts(t.Context()))
		require.Len(t, logs.records(t, warn), wantWarns, "WARN lines %s", when)
		require.Len(t, logs.records(t, info), wantInfos, "INFO lines %s", when)
	}

	// 19 requests, all conflicts (hot-1 twice): fewer than the minimum.
	insertAttempts(t, pool, "t", "hot-", 18, 18, time.Minute)
	insertAttempts(t, pool, "t", "hot-", 1, 1, time.Minute)
	check(0, 0, "with 19 conflicts in 19 requests (under the minimum of 20)")

	// The 20th request: 95% of 20.
	insertAttempts(t, pool, "t", "ok-", 1, 0, time.Minute)
	check(1, 0, "after crossing")
	w := logs.records(t, warn)[0]
	require.Equal(t, "WARN", w["level"])
	for k, want := range map[string]any{"target": "t", "conflict_rate": "95%", "threshold": "5%", "window": "15m0s",
		"requests": 20.0, "conflicts": 19.0} {
		require.Equal(t, want, w[k], "WARN's %s: got %v; want %v", k, w[k], want)
	}
	require.True(t, strings.HasPrefix(w["hot_resources"].(string), "hot-1 (2 conflicts in 2 requests), "),
		"WARN's hot_resources: got %q; want hot-1 first", w["hot_resources"])
	require.Equal(t, 3, strings.Count(w["hot_resources"].(string), " conflicts in "), "hot resources named: got %q; want 3", w["hot_resources"])

	check(1, 0, "on the next check while still above")
	insertAttempts(t, pool, "t", "ok-", 200, 0, time.Minute) // 19 of 220: 8.6%
	check(1, 0, "while still above at 8.6%")
	insertAttempts(t, pool, "t", "ok-", 220, 0, time.Minute) // 19 of 440: 4.3%
	check(1, 0, "at 4.3%: under the 5% alert but not under its 80% (4%)")
	insertAttempts(t, pool, "t", "ok-", 60, 0, time.Minute) // 19 of 500: 3.8%
	check(1, 1, "after recovering to 3.8%")
	i := logs.records(t, info)[0]
	require.Equal(t, "INFO", i["level"])
	require.Equal(t, "3.8%", i["conflict_rate"], "INFO's conflict_rate")
	require.Equal(t, 500.0, i["requests"], "INFO's requests")
	check(1, 1, "on the next check after recovering")

	// A new episode warns again.
	insertAttempts(t, pool, "t", "hot-", 100, 100, time.Minute) // 119 of 600
	check(2, 1, "after crossing a second time")
}

func TestOnlyTheOldestLiveProcessLogsTheAlert(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	a, aLogs := newMonitored(t, pool, true)
	b, bLogs := newMonitored(t, pool, true) // started second
	const warn, info = "conflict rate above the alert threshold", "conflict rate back under the alert threshold"
	both := func() {
		t.Helper()
		require.NoError(t, a.checkConflicts(t.Context()))
		require.NoError(t, b.checkConflicts(t.Context()))
	}

	insertAttempts(t, pool, "t", "r", 40, 20, time.Minute)
	both()
	require.Len(t, aLogs.records(t, warn), 1, "WARN lines of the first process")
	require.Empty(t, bLogs.records(t, warn), "WARN lines of the second process: got some; want none (the first logs)")
	require.Equal(t, 0.5, gaugeValue(t, b.metrics.conflictRatio, "t"), "the second process's gauge")
	require.Equal(t, 0.5, gaugeValue(t, a.metrics.conflictRatio, "t"), "the first process's gauge")

	// The first process stops: the second takes over, knowing the target
	// is above already (no second WARN), and logs the recovery.
	a.live.stop(t.Context())
	both()
	require.Empty(t, bLogs.records(t, warn), "WARN lines of the second process after taking over")
	insertAttempts(t, pool, "t", "ok", 1000, 0, time.Minute)
	both()
	require.Len(t, bLogs.records(t, info), 1, "INFO lines of the second process after the recovery")
	require.Nil(t, bLogs.records(t, info)[0]["reason"], "a recovery with requests to judge by gives no reason")
	require.Empty(t, aLogs.records(t, info), "INFO lines of the stopped process")
}

func TestProgressLinesWhileThereIsWorkAndSilenceWhenIdle(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	p, logs := newMonitored(t, pool, true)
	p.mon.settle = 0 // rows written before a call belong to its interval
	ctx := t.Context()
	exec := func(sql string) {
		t.Helper()
		_, err := pool.Exec(ctx, sql)
		require.NoError(t, err)
	}
	progress := func() []map[string]any {
		t.Helper()
		require.NoError(t, p.checkConflicts(ctx)) // learns that it logs for t and u
		require.NoError(t, p.logProgress(ctx))
		return logs.records(t, "progress")
	}

	require.Empty(t, progress(), "progress lines of the first call (it only finds where the interval starts)")
	require.Empty(t, progress(), "progress lines with nothing to do")

	exec(`INSERT INTO stagesync.changes (target, resource_id, fields, created_at)
		SELECT 't', 'r' || i, '{"a": 1}', now() - interval '42 seconds' FROM generate_series(1, 5) i`)
	lines := progress()
	require.Len(t, lines, 1, "progress lines with 5 changes pending")
	l := lines[0]
	for k, want := range map[string]any{"target": "t", "finished": 0.0, "pending": 5.0, "processing": 0.0, "rate": "0/s", "requests": 0.0, "conflict_rate": "0%"} {
		require.Equal(t, want, l[k], "line's %s: got %v; want %v", k, l[k], want)
	}
	require.Contains(t, []string{"42s", "43s"}, l["oldest_pending"], "line's oldest_pending")

	// Three finish (two applied, one merged after a conflict), two are
	// being worked.
	exec(`UPDATE stagesync.changes SET status = 'processing' WHERE resource_id IN ('r4', 'r5')`)
	exec(`UPDATE stagesync.changes SET status = CASE WHEN resource_id = 'r3' THEN 'merged' ELSE 'applied' END, finished_at = now()
		WHERE resource_id IN ('r1', 'r2', 'r3')`)
	insertAttempts(t, pool, "t", "r", 4, 1, 0)
	lines = progress()
	require.Len(t, lines, 2, "progress lines after three changes finished")
	l = lines[1]
	for k, want := range map[string]any{"target": "t", "finished": 3.0, "applied": 2.0, "merged": 1.0, "noop": 0.0, "dead": 0.0, "rejected": 0.0,
		"pending": 0.0, "processing": 2.0, "oldest_pending": "-", "requests": 4.0, "conflicts": 1.0, "conflict_rate": "25%"} {
		require.Equal(t, want, l[k], "line's %s: got %v; want %v", k, l[k], want)
	}
	require.NotEqual(t, "0/s", l["rate"], "line's rate with 3 finished")

	// The last two finish: one more line, then silence.
	exec(`UPDATE stagesync.changes SET status = 'dead', finished_at = now() WHERE resource_id IN ('r4', 'r5')`)
	lines = progress()
	require.Len(t, lines, 3, "progress lines after the last changes finished")
	require.Equal(t, 2.0, lines[2]["dead"], "last line's dead")
	require.Equal(t, 0.0, lines[2]["processing"], "last line's processing")
	require.Len(t, progress(), 3, "progress lines once idle: got a new one; want silence")
	require.Len(t, progress(), 3, "progress lines once idle, again")
}

func TestProgressLinesComeFromTheLoggingProcessOnly(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	a, aLogs := newMonitored(t, pool, true)
	b, bLogs := newMonitored(t, pool, true)
	_, err := pool.Exec(t.Context(), `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('t', 'r1', '{"a": 1}')`)
	require.NoError(t, err)
	for range 3 {
		for _, p := range []*Processor{a, b} {
			require.NoError(t, p.checkConflicts(t.Context()))
			require.NoError(t, p.logProgress(t.Context()))
		}
	}
	require.Len(t, aLogs.records(t, "progress"), 2, "progress lines of the first process (its first call only finds the interval)")
	require.Empty(t, bLogs.records(t, "progress"), "progress lines of the second process")
}

func TestFormatShareAndRate(t *testing.T) {
	t.Parallel()
	for f, want := range map[float64]string{0: "0%", 0.05: "5%", 0.0723: "7.2%", 1: "100%", 0.0005: "0.1%"} {
		require.Equal(t, want, formatShare(f), "formatShare(%v)", f)
	}
	for r, want := range map[float64]string{0: "0/s", 0.44: "0.4/s", 12.34: "12.3/s", 1250.4: "1250/s"} {
		require.Equal(t, want, formatPerSecond(r), "formatPerSecond(%v)", r)
	}
}

// A target whose requests stopped is not called healed: the INFO line that
// ends its alert says there were too few requests to judge by.
func TestAlertEndedByQuietSaysSo(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	p, logs := newMonitored(t, pool, true)
	const warn, info = "conflict rate above the alert threshold", "conflict rate back under the alert threshold"
	insertAttempts(t, pool, "t", "r", 40, 20, time.Minute)
	require.NoError(t, p.checkConflicts(t.Context()))
	require.Len(t, logs.records(t, warn), 1)

	_, err := pool.Exec(t.Context(), `DELETE FROM stagesync.attempts`)
	require.NoError(t, err)
	require.NoError(t, p.checkConflicts(t.Context()))
	lines := logs.records(t, info)
	require.Len(t, lines, 1)
	require.Equal(t, "fewer than 20 requests in the window to judge by", lines[0]["reason"])
}

// A process that missed the notification of stagesync.lift_pause finds the
// lift on its next poll (targets.pause_lifted_at) and sends again.
func TestMissedLiftNotificationIsFoundByThePoll(t *testing.T) {
	t.Parallel()
	pool := dbtest.NewPool(t)
	p, logs := newMonitored(t, pool, true)
	ctx := t.Context()
	require.NoError(t, p.applyPauses(ctx), "the first poll learns the lifts made before it")
	g := p.remotes["t"].gate
	g.pauseFromPeer(time.Now().Add(time.Hour), "401 Unauthorized: the remote refused the credential")
	_, paused := g.paused()
	require.True(t, paused)

	// The operator lifts the pause; this process listens to nothing.
	_, err := pool.Exec(ctx, `SELECT stagesync.lift_pause('t')`)
	require.NoError(t, err)
	require.NoError(t, p.applyPauses(ctx))
	_, paused = g.paused()
	require.False(t, paused, "the pause is still on after the poll")
	require.Len(t, logs.records(t, "target pause lifted by an operator (stagesync.lift_pause): sending again"), 1)
	_, paused = p.remotes["u"].gate.paused()
	require.False(t, paused)
}

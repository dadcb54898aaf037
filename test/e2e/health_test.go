package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/processor"
	"github.com/stagesync/stagesync/test/remotesim"
)

// healthRow is a stagesync.target_health row.
type healthRow struct {
	inflightLimit, concurrency, consecutive int
	rateShare                               *float64
	lastSuccess, lastErrorAt                *time.Time
	lastError                               *string
}

func (h *harness) targetHealth(clientID string) (healthRow, bool) {
	h.t.Helper()
	var r healthRow
	err := h.pool.QueryRow(context.Background(), `
		SELECT inflight_limit, concurrency, consecutive_failures, rate_share, last_success_at, last_error_at, last_error
		FROM stagesync.target_health WHERE target = $1 AND client_id = $2`, target, clientID).
		Scan(&r.inflightLimit, &r.concurrency, &r.consecutive, &r.rateShare, &r.lastSuccess, &r.lastErrorAt, &r.lastError)
	if err != nil {
		return r, false
	}
	return r, true
}

// A remote that fails every request (500, its error body echoing the
// credential) and then recovers: the log has one WARN naming the target,
// the first error (credential redacted) and the count, then one INFO on
// recovery, and none of River's INFO lines; target_health follows (failures
// counted, last error and its time, then the last success), and
// /metrics shows the in-flight limit.
func TestTargetHealthAndLogLinesFollowAFailingRemote(t *testing.T) {
	t.Parallel()
	const secret = "s3cret-credential-7f3a9"
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("health", 5)
	h.seed(ids, map[string]any{"owner": "seed"})
	front, frontURL := newFrontDoor(t, h.sim)
	front.setFailing(true)
	h.env = map[string]string{"FRONT_URL": frontURL, "CRM_TOKEN": secret}
	reg := prometheus.NewRegistry()
	p, _ := h.runProcessor(configYAML(nil, map[string]string{
		"base_url": "${FRONT_URL}", "auth": `{env: CRM_TOKEN, prefix: "Bearer "}`, "max_attempts": "1000", "concurrency": "8",
	}), processor.NewMetrics(reg))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)

	var failing healthRow
	h.waitFor("target_health to count failures", 20*time.Second, func() bool {
		r, ok := h.targetHealth(p.ClientID())
		failing = r
		return ok && r.consecutive >= 3
	})
	require.Nil(t, failing.lastSuccess, "last_success_at while failing: got %v; want NULL", failing.lastSuccess)
	require.NotNil(t, failing.lastErrorAt, "last_error_at while failing: got NULL; want a time")
	require.NotNil(t, failing.lastError, "last_error while failing: got NULL; want the error")
	require.Contains(t, *failing.lastError, "500", "last_error: got %q; want the status", *failing.lastError)
	require.Contains(t, *failing.lastError, "[redacted]", "last_error: got %q; want the echoed credential redacted", *failing.lastError)
	require.NotContains(t, *failing.lastError, secret, "last_error holds the credential")
	require.Equal(t, 8, failing.inflightLimit, "inflight_limit: got %d; want 8 (500s do not halve it)", failing.inflightLimit)
	require.Equal(t, 8, failing.concurrency, "concurrency: got %d; want 8", failing.concurrency)
	require.Nil(t, failing.rateShare, "rate_share without a rate limit: got %v; want NULL", failing.rateShare)

	front.setFailing(false)
	h.waitDrained(30 * time.Second)
	var healthy healthRow
	h.waitFor("target_health to show the recovery", 10*time.Second, func() bool {
		r, ok := h.targetHealth(p.ClientID())
		healthy = r
		return ok && r.consecutive == 0 && r.lastSuccess != nil
	})
	require.NotNil(t, healthy.lastErrorAt, "last_error_at after recovery: got NULL; want the last error's time kept")
	require.True(t, healthy.lastSuccess.After(*healthy.lastErrorAt), "last success %s; want after the last error %s", healthy.lastSuccess, healthy.lastErrorAt)

	logs := h.logs.tail(1 << 20)
	require.NotContains(t, logs, secret, "the log holds the credential")
	var warns, infos []string
	for _, line := range strings.Split(logs, "\n") {
		switch {
		case strings.Contains(line, `msg="requests to the target are failing"`):
			warns = append(warns, line)
		case strings.Contains(line, `msg="requests to the target succeed again"`):
			infos = append(infos, line)
		case strings.Contains(line, "component=river") && !strings.Contains(line, "level=WARN") && !strings.Contains(line, "level=ERROR"):
			t.Errorf("River log line below WARN at processor level info: %s", line)
		}
	}
	require.Len(t, warns, 1, "WARN lines for the failing target: got %d (%q); want 1", len(warns), warns)
	for _, want := range []string{"level=WARN", "target=crm", "500", "Bearer [redacted]", "failed_requests=1"} {
		require.Contains(t, warns[0], want, "WARN line: got %q; want it to contain %q", warns[0], want)
	}
	require.Len(t, infos, 1, "INFO lines for the recovery: got %d (%q); want 1", len(infos), infos)
	require.Contains(t, infos[0], "level=INFO")
	require.Contains(t, infos[0], "target=crm")

	mfs, err := reg.Gather()
	require.NoError(t, err)
	var limit float64 = -1
	for _, mf := range mfs {
		if mf.GetName() == "stagesync_inflight_limit" {
			for _, m := range mf.GetMetric() {
				limit = m.GetGauge().GetValue()
			}
		}
	}
	require.Equal(t, 8.0, limit, "stagesync_inflight_limit{target=crm}: got %v; want 8", limit)
}

package e2e

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A remote that first times out, then answers 20% 500/503 and 10% 429 with
// Retry-After: every change still finishes, every request the remote
// answered has its attempts row, and no resource is asked again before its
// Retry-After has passed.
func TestFaultsTimeoutsAndRetryAfter(t *testing.T) {
	t.Parallel()
	const retryAfter = time.Second
	// Requests sleep far longer than the target's timeout at first.
	h := newHarness(t, remotesim.Options{Latency: 2 * time.Second, RetryAfter: retryAfter, Seed: 42})
	ids := resourceIDs("flaky", 30)
	base := map[string]any{"status": "open", "n": 0}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, map[string]string{
		"timeout":      "250ms",
		"max_attempts": "40",
		"concurrency":  "8",
		"workers":      "8",
	}))
	var cs []change
	for w := range 3 {
		for i, id := range ids {
			cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("w%d", w), "n": w*100 + i}})
		}
	}
	h.insert(cs...)
	h.waitFor("10 timed-out requests", 30*time.Second, func() bool {
		return h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'transport_error'`) >= 10
	})
	h.sim.SetFaults(remotesim.Faults{ErrorRate: 0.2, RateLimitRate: 0.1, Latency: 2 * time.Millisecond})
	h.waitDrained(75 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, 0, counts["pending"]+counts["processing"]+counts["dead"]+counts["rejected"],
		"status counts: got %v; want only applied, merged, noop", counts)
	h.requireRemote(expected(base, ids, cs))

	// Every request the remote answered is an attempts row with its method
	// and status; every request it saw the client abandon (499) is a
	// transport_error row.
	simByKey := map[attemptKey]int{}
	abandoned := 0
	for _, r := range h.sim.Requests() {
		switch r.Status {
		case 0, 499:
			abandoned++
		default:
			simByKey[attemptKey{r.Method, r.Status}]++
		}
	}
	dbByKey := h.attemptsByMethodStatus()
	transport := dbByKey[attemptKey{"GET", 0}] + dbByKey[attemptKey{"PATCH", 0}]
	delete(dbByKey, attemptKey{"GET", 0})
	delete(dbByKey, attemptKey{"PATCH", 0})
	require.Equal(t, simByKey, dbByKey, "requests by method and status: attempts rows got %v; want the simulator's %v", dbByKey, simByKey)
	require.Equal(t, abandoned, transport, "transport_error attempts: got %d; want %d (requests the simulator saw abandoned)", transport, abandoned)
	require.GreaterOrEqual(t, abandoned, 10, "timed-out requests: got %d; want ≥ 10", abandoned)
	outcomes := h.attemptsByOutcome()
	st := h.sim.Stats()
	require.Equal(t, st.Faults, outcomes["retryable"], "retryable attempts: got %d; want the simulator's %d faults", outcomes["retryable"], st.Faults)
	require.Greater(t, simByKey[attemptKey{"PATCH", http.StatusTooManyRequests}]+simByKey[attemptKey{"GET", http.StatusTooManyRequests}], 0, "429 answers: got 0; want some")

	// Retry-After: after a 429 or 503 for a resource, its next request
	// starts at least Retry-After after that answer.
	reqs := h.sim.Requests()
	checked := 0
	for i, r := range reqs {
		if r.ID == "" || (r.Status != http.StatusTooManyRequests && r.Status != http.StatusServiceUnavailable) {
			continue
		}
		for _, n := range reqs[i+1:] {
			if n.ID != r.ID {
				continue
			}
			gap := n.Start.Sub(r.End)
			require.GreaterOrEqual(t, gap, retryAfter, "%s %s answered %d at %s; next %s at %s: gap got %s; want ≥ %s",
				r.Method, r.Path, r.Status, r.End.Format("15:04:05.000"), n.Method, n.Start.Format("15:04:05.000"), gap, retryAfter)
			checked++
			break
		}
	}
	require.Greater(t, checked, 0, "429/503 answers followed by a retry: got 0; want some")

	require.Equal(t, 1, st.MaxInFlightPerResource, "max in flight per resource: got %d; want 1", st.MaxInFlightPerResource)
}

// Retries wait what the target's backoff (or the remote's Retry-After)
// says, not more: after a 500 the next attempt comes within backoff.max,
// after a 503 with Retry-After: 1 within that second, plus scheduling slack.
// Only the 500s count as attempts: a 503 is throttling.
func TestRetryDelaysFollowBackoffAndRetryAfter(t *testing.T) {
	t.Parallel()
	const (
		backoffMax = 200 * time.Millisecond
		retryAfter = time.Second
		slack      = 750 * time.Millisecond
	)
	// Every request fails: 500, 503, 500, 503 (the simulator alternates).
	h := newHarness(t, remotesim.Options{ErrorRate: 1, RetryAfter: retryAfter})
	h.sim.Put("acct-1", map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"batch_etag_path": "", "max_attempts": "4"}))
	ids := h.insert(change{resource: "acct-1", fields: map[string]any{"owner": "crm"}})
	h.waitDrained(60 * time.Second)
	r := h.changes(ids)[ids[0]]
	require.Equal(t, "dead", r.status, "status: got %s; want dead", r.status)
	require.Equal(t, 4, r.attempts, "attempts: got %d; want 4", r.attempts)

	reqs := h.sim.Requests()
	require.Len(t, reqs, 7, "requests: got %d; want 7 (4 counted 500s, 3 uncounted 503s between them)", len(reqs))
	var seen []string
	for i := 1; i < len(reqs); i++ {
		seen = append(seen, fmt.Sprintf("after %d: %s", reqs[i-1].Status, reqs[i].Start.Sub(reqs[i-1].End).Round(time.Millisecond)))
	}
	t.Logf("retry gaps: %v", seen)
	for i := 1; i < len(reqs); i++ {
		prev, next := reqs[i-1], reqs[i]
		gap := next.Start.Sub(prev.End)
		wait := backoffMax
		if prev.Status == http.StatusServiceUnavailable {
			wait = retryAfter
			require.GreaterOrEqual(t, gap, retryAfter, "retry %d after a 503 with Retry-After: got %s; want ≥ %s", i, gap, retryAfter)
		}
		require.LessOrEqual(t, gap, wait+slack, "retry %d after a %d waited %s; want ≤ %s (%s + %s slack)",
			i, prev.Status, gap.Round(time.Millisecond), wait+slack, wait, slack)
	}
}

// rate_limit caps this process's requests per second to the target.
func TestRateLimit(t *testing.T) {
	t.Parallel()
	const perSecond, burst = 20, 2 // burst: rate_limit/10, at least 1
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("slow", 30)
	h.seed(ids, map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"rate_limit": fmt.Sprint(perSecond), "concurrency": "16"}))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)
	h.waitDrained(30 * time.Second)
	require.Equal(t, map[string]int{"applied": 30}, h.statusCounts(), "status counts: got %v; want 30 applied", h.statusCounts())

	reqs := h.sim.Requests()
	require.Len(t, reqs, 31, "requests: got %d; want 31 (1 batch GET, 30 PATCHes)", len(reqs))
	for i, r := range reqs {
		n := 0
		for _, o := range reqs[i:] {
			if o.Start.Sub(r.Start) < time.Second {
				n++
			}
		}
		require.LessOrEqual(t, n, perSecond+burst, "requests in the second from %s: got %d; want ≤ %d", r.Start.Format("15:04:05.000"), n, perSecond+burst)
	}
	span := reqs[len(reqs)-1].Start.Sub(reqs[0].Start)
	minSpan := time.Duration(len(reqs)-burst) * time.Second / perSecond
	require.GreaterOrEqual(t, span, minSpan-50*time.Millisecond, "span of %d requests: got %s; want ≥ %s", len(reqs), span, minSpan)
}

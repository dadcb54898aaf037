package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A 429 with Retry-After pauses the target in every process: after process
// A is answered 429 (Retry-After: 2), no request from A, and none from
// process B (which was never throttled itself), reaches the remote until
// the two seconds have passed. A's in-flight limit halves (target_health)
// and grows back; B's stays. The throttled change is not charged an
// attempt.
func TestThrottlingPausesEveryProcessUntilRetryAfter(t *testing.T) {
	t.Parallel()
	const retryAfter = 2 * time.Second
	h := newHarness(t, remotesim.Options{Latency: 20 * time.Millisecond})
	ids := resourceIDs("pause", 240)
	h.seed(ids, map[string]any{"owner": "seed"})
	front, frontURL := newFrontDoor(t, h.sim)
	// A reaches the remote through the front door and sends an
	// Authorization header, so the simulator's log tells its requests from
	// B's.
	h.env = map[string]string{"FRONT_URL": frontURL, "A_TOKEN": "token-of-process-a"}
	tgt := map[string]string{"concurrency": "4", "workers": "2", "batch_size": "10"}
	a, _ := h.runProcessor(configYAML(nil, withKeys(tgt, map[string]string{"base_url": "${FRONT_URL}", "auth": "{env: A_TOKEN}"})), nil)
	b, _ := h.runProcessor(configYAML(nil, tgt), nil)

	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)
	h.waitFor("both processes writing", 30*time.Second, func() bool {
		var fromA, fromB int
		for _, r := range h.sim.Requests() {
			if r.Method == http.MethodPatch && r.Authorization != "" {
				fromA++
			} else if r.Method == http.MethodPatch {
				fromB++
			}
		}
		return fromA >= 10 && fromB >= 10
	})
	front.arm(retryAfter, isPatch)
	h.waitFor("the front door's 429", 30*time.Second, func() bool { return len(front.throttledAt()) == 1 })
	at := front.throttledAt()[0]
	h.waitFor("A's halved in-flight limit in target_health", 10*time.Second, func() bool {
		return h.count(`SELECT coalesce(max(inflight_limit), 0) FROM stagesync.target_health WHERE client_id = $1`, a.ClientID()) == 2
	})
	h.waitDrained(90 * time.Second)

	// A is told at once; B through the database within milliseconds.
	// Requests that left before a process knew are allowed for: slackA and
	// slackB after the answer.
	const slackA, slackB = 20 * time.Millisecond, 250 * time.Millisecond
	var early, beforeB, afterB int
	for _, r := range h.sim.Requests() {
		fromA := r.Authorization != ""
		off := r.Start.Sub(at)
		slack := slackB
		if fromA {
			slack = slackA
		}
		switch {
		case off >= 0 && off < slack:
			early++
		case off >= slack && off < retryAfter:
			t.Errorf("%s %s from process %s reached the remote %s after the 429; want none before Retry-After %s",
				r.Method, r.Path, map[bool]string{true: "A", false: "B"}[fromA], off.Round(time.Millisecond), retryAfter)
		case !fromA && off < 0 && off > -time.Second:
			beforeB++
		case !fromA && off >= retryAfter:
			afterB++
		}
	}
	t.Logf("requests in flight or sent before the pause was known: %d", early)
	require.Greater(t, beforeB, 0, "B's requests in the second before the 429: got 0; want some (B must have been busy)")
	require.Greater(t, afterB, 0, "B's requests after the pause: got 0; want some")

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(ids)}, counts, "status counts: got %v; want all %d applied", counts, len(ids))
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code = 429`)
	require.Equal(t, 1, n, "429 attempts rows: got %d; want 1", n)
	n = h.count(`SELECT max(attempts) FROM stagesync.changes`)
	require.Equal(t, 1, n, "most attempts of a change: got %d; want 1 (the 429 is not an attempt)", n)
	var reason string
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT coalesce(pause_reason, '') FROM stagesync.targets WHERE name = $1`, target).Scan(&reason))
	require.Contains(t, reason, "429", "targets.pause_reason: got %q; want the 429", reason)
	h.waitFor("A's in-flight limit back to its concurrency", 15*time.Second, func() bool {
		return h.count(`SELECT inflight_limit FROM stagesync.target_health WHERE client_id = $1`, a.ClientID()) == 4
	})
	n = h.count(`SELECT inflight_limit FROM stagesync.target_health WHERE client_id = $1`, b.ClientID())
	require.Equal(t, 4, n, "B's in-flight limit: got %d; want 4 (B was never answered 429)", n)
}

// The seeds' storm: when the batch ETag lookup is answered 429, nothing
// else goes out before Retry-After has passed (today every resource of the
// batch was GET at once); then everything is applied, with no attempt
// charged for the 429.
func TestThrottledBatchLookupSendsNothingUntilRetryAfter(t *testing.T) {
	t.Parallel()
	const retryAfter = 2 * time.Second
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("storm", 50)
	h.seed(ids, map[string]any{"owner": "seed"})
	front, frontURL := newFrontDoor(t, h.sim)
	front.arm(retryAfter, isBatchGet)
	h.env = map[string]string{"FRONT_URL": frontURL}
	h.startProcessor(configYAML(nil, map[string]string{"base_url": "${FRONT_URL}"}))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)

	require.Len(t, front.throttledAt(), 1, "429s given: got %d; want 1", len(front.throttledAt()))
	at := front.throttledAt()[0]
	for _, r := range h.sim.Requests() {
		if off := r.Start.Sub(at); off < retryAfter {
			t.Errorf("%s %s reached the remote %s after the batch lookup's 429; want nothing before Retry-After %s",
				r.Method, r.Path, off.Round(time.Millisecond), retryAfter)
		}
	}
	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(ids)}, counts, "status counts: got %v; want all applied", counts)
	n := h.count(`SELECT max(attempts) FROM stagesync.changes`)
	require.Equal(t, 1, n, "most attempts of a change: got %d; want 1", n)
	// After the pause the resources are retried together: one batch lookup
	// serves them (not one lookup, or GET, each).
	lookups, gets := 0, 0
	for _, r := range h.sim.Requests() {
		switch {
		case r.Method == http.MethodGet && r.Path == "/assignments":
			lookups++
		case r.Method == http.MethodGet:
			gets++
		}
	}
	require.LessOrEqual(t, lookups, 2, "batch lookups after the pause: got %d; want one (a job of 50 resources)", lookups)
	require.Zero(t, gets, "single GETs: got %d; want none", gets)
}

// Throttling never uses up max_attempts: with max_attempts 1 and a remote
// answering a fifth of requests 429, every change is applied.
func TestThrottlingNeverUsesUpMaxAttempts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{RateLimitRate: 0.2, RetryAfter: time.Second, Seed: 7})
	ids := resourceIDs("limited", 12)
	h.seed(ids, map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"max_attempts": "1"}))
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)
	h.waitDrained(90 * time.Second)
	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(ids)}, counts, "status counts: got %v; want all %d applied", counts, len(ids))
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code = 429`)
	require.Greater(t, n, 0, "429 answers: got 0; want some")
}

// A change the remote throttles forever ends dead once give_up_after has
// passed since it was staged, with a reason that says so and no attempt
// counted; its retries wait for each Retry-After.
func TestGiveUpAfterEndsAChangeTheRemoteKeepsThrottling(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{RateLimitRate: 1, RetryAfter: time.Second})
	h.sim.Put("acct-1", map[string]any{"owner": "seed"})
	h.startProcessor(configYAML(nil, map[string]string{"give_up_after": "3s", "max_attempts": "2", "batch_etag_path": ""}))
	ids := h.insert(change{resource: "acct-1", fields: map[string]any{"owner": "crm"}})
	h.waitDrained(60 * time.Second)
	r := h.changes(ids)[ids[0]]
	require.Equal(t, "dead", r.status, "status: got %s; want dead", r.status)
	require.Equal(t, 0, r.attempts, "attempts: got %d; want 0 (429s are not attempts)", r.attempts)
	require.Contains(t, r.lastError, "give_up_after (3s)", "last_error: got %q; want the give_up_after reason", r.lastError)
	require.Contains(t, r.lastError, "429", "last_error: got %q; want the last answer", r.lastError)
	reqs := h.sim.Requests()
	require.GreaterOrEqual(t, len(reqs), 3, "requests: got %d; want ≥ 3 (one per second for 3s)", len(reqs))
	require.LessOrEqual(t, len(reqs), 5, "requests: got %d; want ≤ 5 (one per Retry-After)", len(reqs))
	for i := 1; i < len(reqs); i++ {
		gap := reqs[i].Start.Sub(reqs[i-1].End)
		require.GreaterOrEqual(t, gap, time.Second, "gap before request %d: got %s; want ≥ Retry-After 1s", i, gap)
	}
}

// A conflict that never clears (a person edits the resource before every
// write) ends dead after exactly max_attempts attempts: attempts equals
// max_attempts, and that many writes reached the remote.
func TestConflictThatNeverClearsEndsDeadAfterExactlyMaxAttempts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{})
	h.sim.Put("acct-1", map[string]any{"owner": "seed", "note": "n0"})
	front, frontURL := newFrontDoor(t, h.sim)
	var edits atomic.Int32
	front.beforePatch = func(id string) {
		h.sim.Edit(id, map[string]any{"note": fmt.Sprintf("person-%d", edits.Add(1))}, "person")
	}
	h.env = map[string]string{"FRONT_URL": frontURL}
	h.startProcessor(configYAML(nil, map[string]string{"base_url": "${FRONT_URL}", "max_attempts": "3"}))
	ids := h.insert(change{resource: "acct-1", fields: map[string]any{"owner": "crm"}})
	h.waitDrained(60 * time.Second)
	r := h.changes(ids)[ids[0]]
	require.Equal(t, "dead", r.status, "status: got %s; want dead", r.status)
	require.Equal(t, 3, r.attempts, "attempts: got %d; want 3 (max_attempts)", r.attempts)
	require.True(t, strings.HasPrefix(r.lastError, "gave up after 3 attempts: "), "last_error: got %q; want it to start with \"gave up after 3 attempts: \"", r.lastError)
	st := h.sim.Stats()
	require.Equal(t, 3, st.Patches, "writes: got %d; want 3", st.Patches)
	require.Equal(t, 3, st.Conflicts, "conflicts: got %d; want 3", st.Conflicts)
}

// rate_limit is a budget for the target across processes: two processes
// with rate_limit 20 take 10 each (target_health.rate_share), together
// never sending more than 20 a second plus their bursts; when one stops,
// the other takes the whole budget.
func TestRateLimitIsABudgetAcrossProcesses(t *testing.T) {
	t.Parallel()
	const budget, bursts = 20, 2 // each process's burst: a tenth of its share, at least 1
	h := newHarness(t, remotesim.Options{})
	ids := resourceIDs("budget", 100)
	h.seed(ids, map[string]any{"owner": "seed"})
	cfg := configYAML(nil, map[string]string{"rate_limit": fmt.Sprint(budget), "concurrency": "16", "batch_size": "10", "workers": "2"})
	a, _ := h.runProcessor(cfg, nil)
	b, stopB := h.runProcessor(cfg, nil)
	shares := func() map[string]float64 {
		out := map[string]float64{}
		rows, err := h.pool.Query(context.Background(), `SELECT client_id, coalesce(rate_share, 0) FROM stagesync.target_health`)
		require.NoError(t, err)
		defer rows.Close()
		for rows.Next() {
			var id string
			var s float64
			require.NoError(t, rows.Scan(&id, &s))
			out[id] = s
		}
		return out
	}
	h.waitFor("both processes at a rate share of 10", 15*time.Second, func() bool {
		s := shares()
		return s[a.ClientID()] == budget/2 && s[b.ClientID()] == budget/2
	})
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"owner": "crm"}})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)
	require.Equal(t, map[string]int{"applied": len(ids)}, h.statusCounts(), "status counts: got %v; want all applied", h.statusCounts())

	reqs := h.sim.Requests()
	most := 0
	for i, r := range reqs {
		n := 0
		for _, o := range reqs[i:] {
			if o.Start.Sub(r.Start) < time.Second {
				n++
			}
		}
		most = max(most, n)
		require.LessOrEqual(t, n, budget+bursts, "requests in the second from %s: got %d; want ≤ %d (budget %d + bursts)", r.Start.Format("15:04:05.000"), n, budget+bursts, budget)
	}
	span := reqs[len(reqs)-1].Start.Sub(reqs[0].Start)
	minSpan := time.Duration(len(reqs)-bursts) * time.Second / budget
	require.GreaterOrEqual(t, span, minSpan-50*time.Millisecond, "span of %d requests: got %s; want ≥ %s", len(reqs), span, minSpan)
	t.Logf("%d requests in %s; busiest second: %d", len(reqs), span.Round(time.Millisecond), most)

	stopB()
	h.waitFor("A's rate share back to the whole budget", 10*time.Second, func() bool {
		return shares()[a.ClientID()] == budget
	})
}

// withKeys returns base with more keys set.
func withKeys(base, more map[string]string) map[string]string {
	out := maps.Clone(base)
	maps.Copy(out, more)
	return out
}

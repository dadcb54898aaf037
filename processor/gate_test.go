package processor

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeClock is a settable clock for the gate's AIMD and pause logic.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time      { return c.t }
func (c *fakeClock) add(d time.Duration) { c.t = c.t.Add(d) }
func newFakeClock() *fakeClock           { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }
func testTarget(concurrency int) *TargetConfig {
	return &TargetConfig{Name: "crm", Concurrency: concurrency,
		Backoff: BackoffConfig{Base: Duration(time.Second), Max: Duration(time.Minute)}}
}

func newTestGate(t *testing.T, tc *TargetConfig) (*gate, *fakeClock) {
	t.Helper()
	g := newGate(tc)
	c := newFakeClock()
	g.now = c.now
	return g, c
}

// A burst of 429s for requests that were all in flight together halves
// the limit once, pauses the target for Retry-After, and the limit grows
// back by one per second without throttling, never above concurrency.
func TestGateHalvesOncePerBurstAndGrowsBackOnePerWindow(t *testing.T) {
	t.Parallel()
	g, clock := newTestGate(t, testTarget(8))
	var releases []func(response)
	for range 8 {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err)
		releases = append(releases, rel)
	}
	clock.add(10 * time.Millisecond)
	for _, rel := range releases {
		rel(response{status: http.StatusTooManyRequests, retryAfter: 2 * time.Second})
	}
	require.Equal(t, 4, g.state().limit, "limit after one burst of 429s: got %d; want 4 (halved once)", g.state().limit)

	_, err := g.acquire(t.Context())
	var p *pausedError
	require.ErrorAs(t, err, &p, "acquire while paused: got %v; want a *pausedError", err)
	require.Equal(t, clock.now().Add(2*time.Second), p.until, "pause end: got %s; want Retry-After from the answer", p.until)
	require.Contains(t, p.reason, "429", "pause reason: got %q; want the status", p.reason)

	clock.add(2 * time.Second)
	require.Equal(t, 4, g.state().limit, "limit at the pause's end: got %d; want 4 (growth starts when the pause ends)", g.state().limit)
	rel, err := g.acquire(t.Context())
	require.NoError(t, err, "acquire after the pause")
	rel(response{status: http.StatusOK})
	clock.add(time.Second)
	require.Equal(t, 5, g.state().limit, "limit one window later: got %d; want 5", g.state().limit)
	clock.add(2500 * time.Millisecond)
	require.Equal(t, 7, g.state().limit, "limit 3.5 windows later: got %d; want 7", g.state().limit)
	clock.add(time.Minute)
	require.Equal(t, 8, g.state().limit, "limit much later: got %d; want 8 (never above concurrency)", g.state().limit)
}

// A 429 for a request sent after the last cut halves again, down to 1; a
// 503 without Retry-After pauses for the backoff, doubled for each
// throttling event in a row.
func TestGateCutsToOneAndPausesByBackoffWithoutRetryAfter(t *testing.T) {
	t.Parallel()
	g, clock := newTestGate(t, testTarget(8))
	wantPauses := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}
	wantLimits := []int{4, 2, 1, 1}
	for i := range wantPauses {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err, "acquire %d", i)
		clock.add(time.Millisecond)
		rel(response{status: http.StatusServiceUnavailable})
		until, paused := g.paused()
		require.True(t, paused, "paused after 503 #%d: got false; want true", i+1)
		require.Equal(t, wantPauses[i], until.Sub(clock.now()), "pause after 503 #%d: got %s; want %s", i+1, until.Sub(clock.now()), wantPauses[i])
		require.Equal(t, wantLimits[i], g.state().limit, "limit after 503 #%d: got %d; want %d", i+1, g.state().limit, wantLimits[i])
		clock.add(wantPauses[i])
	}
	// A success resets the backoff of the next pause.
	rel, err := g.acquire(t.Context())
	require.NoError(t, err)
	rel(response{status: http.StatusOK})
	rel, err = g.acquire(t.Context())
	require.NoError(t, err)
	rel(response{status: http.StatusServiceUnavailable})
	until, _ := g.paused()
	require.Equal(t, time.Second, until.Sub(clock.now()), "pause after a success and a 503: got %s; want the base 1s", until.Sub(clock.now()))
}

// At the in-flight limit a request waits for a slot (until its context
// ends), and gets one as soon as another request is answered.
func TestGateWaitsForASlotAtTheLimit(t *testing.T) {
	t.Parallel()
	g, _ := newTestGate(t, testTarget(1))
	rel, err := g.acquire(t.Context())
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err = g.acquire(ctx)
	require.ErrorIs(t, err, context.Canceled, "acquire at the limit with a cancelled context: got %v; want context.Canceled", err)

	got := make(chan error, 1)
	go func() {
		r, err := g.acquire(t.Context())
		if err == nil {
			r(response{status: http.StatusOK})
		}
		got <- err
	}()
	rel(response{status: http.StatusOK})
	require.NoError(t, <-got, "acquire once the slot was freed")
}

// A pause another process started (read from the database) refuses
// requests here too, and never shortens a longer local pause.
func TestGatePauseFromPeer(t *testing.T) {
	t.Parallel()
	g, clock := newTestGate(t, testTarget(4))
	g.pauseFromPeer(clock.now().Add(3*time.Second), "429 Too Many Requests, Retry-After 3s")
	_, err := g.acquire(t.Context())
	var p *pausedError
	require.ErrorAs(t, err, &p)
	g.pauseFromPeer(clock.now().Add(time.Second), "shorter")
	until, _ := g.paused()
	require.Equal(t, clock.now().Add(3*time.Second), until, "pause end after a shorter peer pause: got %s; want unchanged", until)
	require.Equal(t, 4, g.state().limit, "a peer's pause leaves this process's limit: got %d; want 4", g.state().limit)
	clock.add(3 * time.Second)
	rel, err := g.acquire(t.Context())
	require.NoError(t, err, "acquire after the peer's pause")
	rel(response{status: http.StatusOK})
}

// A target starts failing: one WARN with the first error (credential
// redacted) and the count; further failures within warnEvery log nothing;
// recovery logs one INFO; a new episode within warnEvery stays quiet, and
// the next WARN counts every failure since the previous WARN.
func TestHealthLogsOneWarnPerEpisodeRateLimitedAndInfoOnRecovery(t *testing.T) {
	t.Parallel()
	tc := testTarget(8)
	tc.authValue = "tok-s3cret-value"
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, nil))
	g, clock := newTestGate(t, tc)
	g.attach(logger, nil, nil)
	answer := func(resp response) {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err)
		rel(resp)
		clock.add(time.Second)
	}
	fail := response{status: http.StatusInternalServerError, err: errors.New("PATCH http://x/a/1: 500 echo: Bearer tok-s3cret-value")}
	answer(fail)
	answer(response{err: errors.New("dial tcp 127.0.0.1:1: connect: connection refused")})
	answer(fail)
	answer(response{status: http.StatusPreconditionFailed}) // a conflict: the remote works
	answer(fail)                                            // a new episode within a minute: quiet
	answer(response{status: http.StatusOK})
	clock.add(time.Minute)
	answer(fail)

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	require.Len(t, lines, 3, "log lines: got %q; want WARN, INFO, WARN", lines)
	require.Contains(t, lines[0], `level=WARN msg="requests to the target are failing" target=crm`)
	require.Contains(t, lines[0], "failed_requests=1")
	require.Contains(t, lines[0], "[redacted]", "first WARN: got %q; want the credential redacted", lines[0])
	require.Contains(t, lines[1], `level=INFO msg="requests to the target succeed again" target=crm failed_requests=3`)
	require.Contains(t, lines[2], `level=WARN msg="requests to the target are failing"`)
	require.Contains(t, lines[2], "failed_requests=4", "second WARN: got %q; want every failure since the first WARN (the quiet episode's too)", lines[2])
	require.NotContains(t, buf.String(), "tok-s3cret-value", "logs must not hold the credential")

	st := g.state().health
	require.Equal(t, 1, st.consecutive, "consecutive failures: got %d; want 1", st.consecutive)
	require.Contains(t, st.lastError, "[redacted]")
	require.NotContains(t, st.lastError, "s3cret")
}

// River's records below WARN pass only when the processor logs at debug.
func TestRiverLogsAtWarnUnlessDebug(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		level    slog.Level
		wantInfo bool
	}{{slog.LevelInfo, false}, {slog.LevelDebug, true}} {
		var buf bytes.Buffer
		logger := slog.New(riverLogHandler{slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: tt.level})})
		logger.Info("Producer job counts")
		logger.Warn("job failed")
		require.Equal(t, tt.wantInfo, strings.Contains(buf.String(), "Producer job counts"),
			"River INFO at processor level %s: got %q", tt.level, buf.String())
		require.Contains(t, buf.String(), "job failed", "River WARN at processor level %s", tt.level)
	}
}

func TestGiveUpAfterDefaultsAndIsValidated(t *testing.T) {
	t.Parallel()
	base := "targets:\n  territory:\n    base_url: http://x.test\n    item_path: /a/{id}\n"
	cfg, err := ParseConfig([]byte(base), func(string) string { return "" })
	require.NoError(t, err)
	got := cfg.Targets["territory"].GiveUpAfter.D()
	require.Equal(t, 24*time.Hour, got, "give_up_after default: got %s; want 24h", got)
	_, err = ParseConfig([]byte(base+"    give_up_after: 10ms\n"), func(string) string { return "" })
	require.ErrorContains(t, err, "targets.territory.give_up_after: must be at least 1s")
}

// Slow start: the limit starts at initialLimit and grows by one per good
// answer while requests wait, so a round trip of answers doubles it, up to
// concurrency; without waiting requests it does not grow.
func TestGateSlowStartDoublesPerRoundTripUpToConcurrency(t *testing.T) {
	t.Parallel()
	g, _ := newTestGate(t, testTarget(40))
	require.Equal(t, initialLimit, g.state().limit, "first limit: got %d; want %d", g.state().limit, initialLimit)

	// One request at a time: no pressure, no growth.
	for range 50 {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err)
		rel(response{status: http.StatusOK})
	}
	require.Equal(t, initialLimit, g.state().limit, "limit after 50 lone requests: got %d; want %d (no growth without pressure)", g.state().limit, initialLimit)

	// A backlog: every slot in use and more waiting.
	var releases []func(response)
	for range initialLimit {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err)
		releases = append(releases, rel)
	}
	waiting := make(chan func(response), 100)
	for range 100 {
		go func() {
			rel, err := g.acquire(t.Context())
			if err == nil {
				waiting <- rel
			}
		}()
	}
	require.Eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.waiters) == 100 }, 5*time.Second, time.Millisecond)
	for _, rel := range releases {
		rel(response{status: http.StatusOK})
	}
	require.Equal(t, 2*initialLimit, g.state().limit, "limit after one round trip of good answers: got %d; want %d", g.state().limit, 2*initialLimit)
	for range 2 * initialLimit {
		(<-waiting)(response{status: http.StatusPreconditionFailed}) // a conflict is a good answer too
	}
	require.Equal(t, 40, g.state().limit, "limit after two round trips: got %d; want concurrency 40", g.state().limit)
	for len(waiting) > 0 || func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.inflight > 0 }() {
		select {
		case rel := <-waiting:
			rel(response{status: http.StatusOK})
		case <-time.After(10 * time.Millisecond):
		}
	}
	require.Equal(t, 40, g.state().limit, "limit: got %d; want never above concurrency", g.state().limit)
}

// A 5xx or a failed exchange ends the fast growth (no cut); from then on
// the limit grows by one per window, as after throttling.
func TestGateFailureEndsSlowStart(t *testing.T) {
	t.Parallel()
	g, clock := newTestGate(t, testTarget(64))
	var releases []func(response)
	for range initialLimit {
		rel, err := g.acquire(t.Context())
		require.NoError(t, err)
		releases = append(releases, rel)
	}
	releases[0](response{status: http.StatusInternalServerError})
	for _, rel := range releases[1:] {
		rel(response{status: http.StatusOK})
	}
	require.Equal(t, initialLimit, g.state().limit, "limit after a 500 and good answers: got %d; want %d (fast growth over, no cut)", g.state().limit, initialLimit)
	clock.add(2 * time.Second)
	require.Equal(t, initialLimit+2, g.state().limit, "limit two windows later: got %d; want %d", g.state().limit, initialLimit+2)
}

// After idleRestart without a request in flight the limit starts again
// from initialLimit; the fast growth may take it back up.
func TestGateRestartsFromTheInitialLimitAfterIdle(t *testing.T) {
	t.Parallel()
	g, clock := newTestGate(t, testTarget(64))
	g.mu.Lock()
	g.limit = 64
	g.mu.Unlock()
	rel, err := g.acquire(t.Context())
	require.NoError(t, err)
	rel(response{status: http.StatusOK})
	clock.add(idleRestart - time.Millisecond)
	rel, err = g.acquire(t.Context())
	require.NoError(t, err)
	require.Equal(t, 64, g.state().limit, "limit after a short pause: got %d; want 64", g.state().limit)
	rel(response{status: http.StatusOK})
	clock.add(idleRestart)
	rel, err = g.acquire(t.Context())
	require.NoError(t, err)
	rel(response{status: http.StatusOK})
	require.Equal(t, initialLimit, g.state().limit, "limit after %s idle: got %d; want %d", idleRestart, g.state().limit, initialLimit)
}

// Waiting requests get slots in arrival order, and a pause that begins
// while they wait refuses them all.
func TestGateGrantsSlotsInArrivalOrderAndAPauseRefusesWaiters(t *testing.T) {
	t.Parallel()
	g, _ := newTestGate(t, testTarget(1))
	rel, err := g.acquire(t.Context())
	require.NoError(t, err)
	order := make(chan int, 3)
	for i := range 3 {
		go func() {
			r, err := g.acquire(t.Context())
			if err == nil {
				order <- i
				r(response{status: http.StatusOK})
			}
		}()
		require.Eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.waiters) == i+1 }, 5*time.Second, time.Millisecond)
	}
	rel(response{status: http.StatusOK})
	for want := range 3 {
		require.Equal(t, want, <-order, "slot order: got another; want arrival order")
	}

	rel, err = g.acquire(t.Context())
	require.NoError(t, err)
	refused := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := g.acquire(t.Context())
			refused <- err
		}()
	}
	require.Eventually(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return len(g.waiters) == 2 }, 5*time.Second, time.Millisecond)
	rel(response{status: http.StatusTooManyRequests, retryAfter: time.Minute})
	for range 2 {
		var p *pausedError
		require.ErrorAs(t, <-refused, &p, "a waiter when the pause began: got another error; want a *pausedError")
	}
}

package processor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// gate admits requests to one target from this process. Three things hold
// a request back, checked in this order:
//
//   - A pause. A 429 or 503 pauses the whole target until the time the
//     remote named (Retry-After) or, without one, a backoff has passed: in
//     this process at once, and in every other process through
//     stagesync.targets (throttle.go). A paused gate refuses at once with
//     a *pausedError instead of waiting, so no worker sleeps: the caller
//     schedules the resource for the pause's end, and nothing was sent.
//   - The adaptive in-flight limit. It starts at initialLimit (or the
//     target's concurrency, if lower) and, like TCP's slow start, grows by
//     one for each good answer while requests wait for a slot: it doubles
//     every round trip while the remote keeps up, up to concurrency. A 429
//     or 503 halves it (not below 1) and ends the fast growth; from then
//     on it grows by one per aimdWindow without one (AIMD), never above
//     concurrency. A 5xx or a failed exchange ends the fast growth without
//     a cut, and the limit grows only a whole aimdWindow after the last. After idleRestart with nothing in flight it starts again from
//     initialLimit, so a burst after a quiet spell is not sent at the old
//     limit at once. Waiting requests get slots in arrival order.
//   - This process's share of the target's rate limit: rate_limit divided
//     by the live processes serving the target (throttle.go keeps it
//     current).
//
// The gate also observes every answer (release) for the target's health:
// consecutive failures, the last error, log lines (health.go).
type gate struct {
	t   *TargetConfig
	now func() time.Time

	mu       sync.Mutex
	limit    int // the adaptive in-flight limit
	inflight int
	// waiters are the requests waiting for a slot, oldest first. A slot
	// goes to the oldest (one wake-up per slot, not one per waiter); a
	// pause wakes them all to be refused.
	waiters []*slotWaiter
	// ssthresh ends the fast growth: below it the limit grows by one per
	// good answer, from it by one per aimdWindow. It starts at
	// concurrency; a throttling answer sets it to the halved limit, a
	// failure to the current one.
	ssthresh int
	// idleSince is when the last request in flight was answered (zero
	// while requests are in flight).
	idleSince time.Time
	// epoch starts the current growth window: the last throttling answer
	// or failure (or the end of the fast growth). Once the limit is at
	// ssthresh it grows by one for each whole aimdWindow since then (or
	// since the pause ended, if later).
	epoch time.Time
	// lastCut is when the limit was last halved. A throttling answer to a
	// request sent before it does not halve again: the requests in flight
	// when the remote started refusing are one signal, not eight.
	lastCut     time.Time
	throttles   int // throttling events in a row, for pauses without Retry-After
	pausedUntil time.Time
	pauseReason string
	// credPause: the pause in force is a refused credential's (401, 407).
	// Answers to requests that were in flight when it began neither
	// extend it nor log again.
	credPause bool
	limiter   *rate.Limiter // nil: no rate limit
	share     float64       // requests/s this process may send; 0: no rate limit
	health    targetHealth

	logger  *slog.Logger
	metrics *Metrics
	// onPause, if set, is told about each pause this process starts, to
	// share it with the other processes. It must not block.
	onPause func(target string, d time.Duration, reason string)
}

// aimdWindow is how long the in-flight limit must go without a 429 or 503
// before it grows by one. Remotes enforce rate limits per second (and
// Retry-After has whole-second resolution), so a one-second window tells
// whether the last step up was tolerated before taking the next, while a
// limit halved from the default 8 to 1 is back in seven seconds.
const aimdWindow = time.Second

// maxPause bounds a pause, whatever Retry-After says.
const maxPause = time.Hour

// initialLimit is where the in-flight limit starts (and starts again after
// idleRestart): what stagesync used to send at once by default, a load
// any API that accepts concurrent clients takes. With a good answer per
// request it doubles every round trip: 16, 32, 64, 128 in flight within
// four round trips.
const initialLimit = 16

// idleRestart is how long the target must go without a request in flight
// before the limit starts again from initialLimit: the remote's capacity
// seen before a quiet spell is old news.
const idleRestart = 5 * time.Second

func newGate(t *TargetConfig) *gate {
	g := &gate{
		t:        t,
		now:      time.Now,
		limit:    min(initialLimit, t.Concurrency),
		ssthresh: t.Concurrency,
		logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	g.setShare(t.RateLimit)
	return g
}

// slotWaiter is a request waiting for an in-flight slot. ready is closed
// when it was given one (granted) or must look again (a pause began).
type slotWaiter struct {
	ready   chan struct{}
	granted bool
}

// attach gives the gate the process's logger, metrics and pause sharing.
func (g *gate) attach(logger *slog.Logger, m *Metrics, onPause func(string, time.Duration, string)) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.logger, g.metrics, g.onPause = logger, m, onPause
	m.setInflightLimit(g.t.Name, g.limit)
	if g.share > 0 {
		m.setRateShare(g.t.Name, g.share)
	}
}

// pausedError is the answer of a paused gate: nothing was sent.
type pausedError struct {
	until  time.Time
	reason string
}

func (e *pausedError) Error() string {
	return fmt.Sprintf("not sent: target paused until %s (%s)", e.until.UTC().Format(time.RFC3339), e.reason)
}

// pausedBy returns the pause that refused resp's request, or nil.
func pausedBy(resp response) *pausedError {
	var p *pausedError
	if resp.notSent && errors.As(resp.err, &p) {
		return p
	}
	return nil
}

// acquire waits for an in-flight slot and the rate limiter, and returns
// the function that gives the slot back with the request's answer. It
// fails at once with a *pausedError while the target is paused, and when
// ctx ends (or its deadline comes before the rate limiter would admit the
// request).
func (g *gate) acquire(ctx context.Context) (release func(response), err error) {
	if err := g.takeSlot(ctx); err != nil {
		return nil, err
	}
	g.mu.Lock()
	start := g.now()
	lim := g.limiter
	g.mu.Unlock()
	release = func(resp response) { g.release(ctx, start, resp) }

	if lim == nil {
		return release, nil
	}
	res := lim.Reserve()
	if d := res.Delay(); d > 0 {
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d {
			res.Cancel()
			release(response{notSent: true})
			return nil, fmt.Errorf("rate limit: the next slot in %s comes after the job's deadline", d.Round(time.Millisecond))
		}
		timer := time.NewTimer(d)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			res.Cancel()
			release(response{notSent: true})
			return nil, ctx.Err()
		}
		// A pause may have begun while this request waited its turn.
		g.mu.Lock()
		p := g.pausedLocked(g.now())
		g.mu.Unlock()
		if p != nil {
			release(response{notSent: true})
			g.metrics.observeRefused(g.t.Name)
			return nil, p
		}
	}
	return release, nil
}

// takeSlot waits for an in-flight slot, in arrival order. It fails with a
// *pausedError while the target is paused, or when ctx ends.
func (g *gate) takeSlot(ctx context.Context) error {
	for {
		g.mu.Lock()
		now := g.now()
		if p := g.pausedLocked(now); p != nil {
			g.mu.Unlock()
			g.metrics.observeRefused(g.t.Name)
			return p
		}
		g.restartIfIdleLocked(now)
		g.growLocked(now)
		if len(g.waiters) == 0 && g.inflight < g.limit {
			g.inflight++
			g.idleSince = time.Time{}
			g.mu.Unlock()
			return nil
		}
		w := &slotWaiter{ready: make(chan struct{})}
		g.waiters = append(g.waiters, w)
		g.mu.Unlock()
		select {
		case <-w.ready:
			if w.granted {
				return nil
			}
			// A pause began: look again (and be refused).
		case <-ctx.Done():
			g.mu.Lock()
			if w.granted {
				// Given a slot just as ctx ended: pass it on.
				g.inflight--
				g.grantLocked()
			} else if i := slices.Index(g.waiters, w); i >= 0 {
				g.waiters = slices.Delete(g.waiters, i, i+1)
			}
			g.mu.Unlock()
			return ctx.Err()
		}
	}
}

// grantLocked hands free slots to the oldest waiters.
func (g *gate) grantLocked() {
	for len(g.waiters) > 0 && g.inflight < g.limit {
		w := g.waiters[0]
		g.waiters[0] = nil
		g.waiters = g.waiters[1:]
		g.inflight++
		g.idleSince = time.Time{}
		w.granted = true
		close(w.ready)
	}
}

// wakeAllLocked sends every waiter back to look again (a pause began).
func (g *gate) wakeAllLocked() {
	for _, w := range g.waiters {
		close(w.ready)
	}
	g.waiters = nil
}

// restartIfIdleLocked starts the limit again from initialLimit after
// idleRestart without a request in flight. The fast growth may take it
// back to where it was (or to concurrency, if it was never throttled).
func (g *gate) restartIfIdleLocked(now time.Time) {
	start := min(initialLimit, g.t.Concurrency)
	if g.inflight > 0 || g.idleSince.IsZero() || now.Sub(g.idleSince) < idleRestart || g.limit <= start {
		return
	}
	g.ssthresh = max(g.ssthresh, g.limit)
	g.limit = start
	g.idleSince = now
	g.metrics.setInflightLimit(g.t.Name, g.limit)
}

// pausedNow returns the pause in force, or nil: a request admitted
// before a pause began must not leave during it.
func (g *gate) pausedNow() *pausedError {
	g.mu.Lock()
	p := g.pausedLocked(g.now())
	g.mu.Unlock()
	if p != nil {
		g.metrics.observeRefused(g.t.Name)
	}
	return p
}

func (g *gate) pausedLocked(now time.Time) *pausedError {
	if now.Before(g.pausedUntil) {
		return &pausedError{until: g.pausedUntil, reason: g.pauseReason}
	}
	return nil
}

// growLocked adds one to the limit per whole aimdWindow without throttling,
// once the fast growth has ended (the limit is at ssthresh).
func (g *gate) growLocked(now time.Time) {
	if g.limit >= g.t.Concurrency || g.limit < g.ssthresh {
		return
	}
	from := g.epoch
	if g.pausedUntil.After(from) {
		from = g.pausedUntil
	}
	n := int(now.Sub(from) / aimdWindow)
	if n <= 0 {
		return
	}
	g.limit = min(g.t.Concurrency, g.limit+n)
	g.epoch = from.Add(time.Duration(n) * aimdWindow)
	g.metrics.setInflightLimit(g.t.Name, g.limit)
	g.grantLocked()
}

// slowStartLocked grows the limit by one for a good answer while it is
// what holds requests back (some wait, or at least half the slots are in
// use): one round trip of good answers doubles it, up to ssthresh.
func (g *gate) slowStartLocked(now time.Time) {
	if g.limit >= g.ssthresh || (len(g.waiters) == 0 && g.inflight < g.limit/2) {
		return
	}
	g.limit++
	if g.limit >= g.ssthresh {
		g.epoch = now // slower growth from here
	}
	g.metrics.setInflightLimit(g.t.Name, g.limit)
}

// release gives back a slot and observes the answer of the request sent
// at start: a 429 or 503 halves the limit and pauses the target; any
// answer updates the target's health.
func (g *gate) release(ctx context.Context, start time.Time, resp response) {
	g.mu.Lock()
	now := g.now()
	if resp.notSent {
		g.inflight--
		g.idleLocked(now)
		g.grantLocked()
		g.mu.Unlock()
		return
	}
	var (
		paused    bool
		pause     time.Duration
		reason    string
		credLogAt time.Time
	)
	switch {
	case credentialRefused(resp.status):
		// Not one change's problem but every request's: the target pauses
		// (in every process) until the credential is fixed and the pause
		// lifted (stagesync.lift_pause), or for backoff.max, after which
		// one request probes (the limit is 1) and a refusal pauses again.
		g.limit, g.epoch = 1, now
		g.metrics.setInflightLimit(g.t.Name, g.limit)
		if g.credPause && now.Before(g.pausedUntil) {
			break
		}
		pause, reason = min(g.t.Backoff.Max.D(), maxPause), credentialPauseReason(g.t, resp.status)
		if until := now.Add(pause); until.After(g.pausedUntil) {
			g.pausedUntil, g.pauseReason, paused = until, reason, true
		}
		g.credPause, credLogAt = true, g.pausedUntil
		g.wakeAllLocked()
	case throttling(resp.status):
		g.epoch = now
		if start.After(g.lastCut) {
			g.limit = max(1, g.limit/2)
			g.ssthresh = g.limit
			g.lastCut = now
			g.throttles++
			g.metrics.setInflightLimit(g.t.Name, g.limit)
		}
		pause, reason = g.pauseFor(resp)
		if until := now.Add(pause); until.After(g.pausedUntil) {
			g.pausedUntil, g.pauseReason, paused = until, reason, true
			g.credPause = false
			g.wakeAllLocked()
		}
	case resp.status == 0 || resp.status >= 500 || resp.status == http.StatusRequestTimeout:
		// The remote struggles: no growth while it does (no cut either;
		// only throttling answers ask for one).
		g.ssthresh, g.epoch = min(g.ssthresh, g.limit), now
	default:
		g.slowStartLocked(now)
	}
	if resp.status != 0 && !throttling(resp.status) && !targetFailure(resp) {
		g.throttles = 0
	}
	g.inflight--
	g.idleLocked(now)
	g.grantLocked()
	line := g.health.observe(now, resp, g.t)
	onPause, logger := g.onPause, g.logger
	g.mu.Unlock()

	if paused {
		g.metrics.observePause(g.t.Name)
		if onPause != nil {
			onPause(g.t.Name, pause, reason)
		}
	}
	if !credLogAt.IsZero() && logger != nil {
		logger.WarnContext(ctx, "the remote refused the credential: target paused for every process; its changes wait (no attempt counted, give_up_after still applies)",
			"target", g.t.Name, "status", resp.status, "paused_until", credLogAt.UTC().Format(time.RFC3339),
			"action", fmt.Sprintf("check the credential, then SELECT stagesync.lift_pause('%s') to resume at once", g.t.Name))
	}
	line.log(ctx, logger, g.t.Name)
}

// credentialPauseReason is the pause_reason of a refused credential: what
// happened and what to do.
func credentialPauseReason(t *TargetConfig, status int) string {
	who := "the remote refused the credential"
	if status == http.StatusProxyAuthRequired {
		who = "a proxy in front of the remote refused the credential"
	}
	check := "check the credential"
	if t.Auth != nil {
		check += fmt.Sprintf(" (header %s from environment variable %s)", t.Auth.Header, t.Auth.Env)
	} else {
		check += " (no auth is configured for this target: add auth)"
	}
	return fmt.Sprintf("%d %s: %s; %s, then SELECT stagesync.lift_pause('%s') to resume at once",
		status, http.StatusText(status), who, check, t.Name)
}

// lift ends the pause in force (stagesync.lift_pause): whatever paused the
// target, an operator said it may go on. The in-flight limit grows back
// from where the pause left it.
func (g *gate) lift() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	was := g.now().Before(g.pausedUntil)
	g.pausedUntil, g.pauseReason, g.credPause, g.throttles = time.Time{}, "", false, 0
	g.grantLocked()
	return was
}

// idleLocked notes when the last request in flight was answered.
func (g *gate) idleLocked(now time.Time) {
	if g.inflight == 0 {
		g.idleSince = now
	}
}

// pauseFor is how long a throttling answer pauses the target: Retry-After
// when the remote gave one, else the target's backoff doubled for each
// throttling event in a row (no jitter: the target pauses as one).
func (g *gate) pauseFor(resp response) (time.Duration, string) {
	status := fmt.Sprintf("%d %s", resp.status, http.StatusText(resp.status))
	if resp.retryAfter > 0 {
		d := min(resp.retryAfter, maxPause)
		return d, fmt.Sprintf("%s, Retry-After %s", status, d)
	}
	d := g.t.Backoff.Base.D()
	for i := 1; i < g.throttles && d < g.t.Backoff.Max.D(); i++ {
		d *= 2
	}
	d = min(d, g.t.Backoff.Max.D(), maxPause)
	return d, fmt.Sprintf("%s without Retry-After, backoff %s", status, d)
}

// pauseFromPeer applies a pause another process started (read from
// stagesync.targets). It never shortens a pause.
func (g *gate) pauseFromPeer(until time.Time, reason string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if until.After(g.pausedUntil) {
		g.pausedUntil, g.pauseReason = until, reason
		g.credPause = strings.Contains(reason, "refused the credential")
		g.wakeAllLocked()
	}
}

// paused reports whether the target is paused now, and until when.
func (g *gate) paused() (time.Time, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pausedUntil, g.now().Before(g.pausedUntil)
}

// setShare sets this process's requests/s to the target (0: unlimited).
// The burst stays a tenth of a second's worth (at least one request), as
// it was for a whole rate limit.
func (g *gate) setShare(share float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if share == g.share && (share == 0) == (g.limiter == nil) {
		return
	}
	g.share = share
	if share <= 0 || math.IsInf(share, 1) {
		g.share, g.limiter = 0, nil
		return
	}
	burst := max(1, int(share/10))
	if g.limiter == nil {
		g.limiter = rate.NewLimiter(rate.Limit(share), burst)
	} else {
		g.limiter.SetLimit(rate.Limit(share))
		g.limiter.SetBurst(burst)
	}
	g.metrics.setRateShare(g.t.Name, share)
}

// gateState is a snapshot of a gate for target_health and the gauges.
type gateState struct {
	limit  int
	share  float64 // 0: no rate limit
	health targetHealth
}

func (g *gate) state() gateState {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.growLocked(g.now())
	return gateState{limit: g.limit, share: g.share, health: g.health}
}

// throttling reports whether a status asks the client to slow down.
func throttling(status int) bool {
	return status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable
}

package processor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
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
//   - The adaptive in-flight limit (AIMD): it starts at the target's
//     concurrency, halves on a 429 or 503 (not below 1) and grows by one
//     per aimdWindow without one, never above concurrency.
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
	limit    int // the AIMD in-flight limit
	inflight int
	// changed is closed (and replaced) when a slot frees, the limit grows
	// or a pause starts, waking the requests waiting for a slot.
	changed chan struct{}
	// epoch starts the current growth window: the last throttling answer.
	// The limit grows by one for each whole aimdWindow since then (or
	// since the pause ended, if later).
	epoch time.Time
	// lastCut is when the limit was last halved. A throttling answer to a
	// request sent before it does not halve again: the requests in flight
	// when the remote started refusing are one signal, not eight.
	lastCut     time.Time
	throttles   int // throttling events in a row, for pauses without Retry-After
	pausedUntil time.Time
	pauseReason string
	limiter     *rate.Limiter // nil: no rate limit
	share       float64       // requests/s this process may send; 0: no rate limit
	health      targetHealth

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

func newGate(t *TargetConfig) *gate {
	g := &gate{
		t:       t,
		now:     time.Now,
		limit:   t.Concurrency,
		changed: make(chan struct{}),
		logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	g.setShare(t.RateLimit)
	return g
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
	for {
		g.mu.Lock()
		now := g.now()
		if p := g.pausedLocked(now); p != nil {
			g.mu.Unlock()
			g.metrics.observeRefused(g.t.Name)
			return nil, p
		}
		g.growLocked(now)
		if g.inflight < g.limit {
			g.inflight++
			break
		}
		wait := g.changed
		g.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
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

func (g *gate) pausedLocked(now time.Time) *pausedError {
	if now.Before(g.pausedUntil) {
		return &pausedError{until: g.pausedUntil, reason: g.pauseReason}
	}
	return nil
}

// growLocked adds one to the limit per whole aimdWindow without throttling.
func (g *gate) growLocked(now time.Time) {
	if g.limit >= g.t.Concurrency {
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
	g.wakeLocked()
}

func (g *gate) wakeLocked() {
	close(g.changed)
	g.changed = make(chan struct{})
}

// release gives back a slot and observes the answer of the request sent
// at start: a 429 or 503 halves the limit and pauses the target; any
// answer updates the target's health.
func (g *gate) release(ctx context.Context, start time.Time, resp response) {
	g.mu.Lock()
	g.inflight--
	g.wakeLocked()
	if resp.notSent {
		g.mu.Unlock()
		return
	}
	now := g.now()
	var (
		paused bool
		pause  time.Duration
		reason string
	)
	if throttling(resp.status) {
		g.epoch = now
		if start.After(g.lastCut) {
			g.limit = max(1, g.limit/2)
			g.lastCut = now
			g.throttles++
			g.metrics.setInflightLimit(g.t.Name, g.limit)
		}
		pause, reason = g.pauseFor(resp)
		if until := now.Add(pause); until.After(g.pausedUntil) {
			g.pausedUntil, g.pauseReason, paused = until, reason, true
			g.wakeLocked()
		}
	} else if resp.status != 0 && !targetFailure(resp) {
		g.throttles = 0
	}
	line := g.health.observe(now, resp, g.t)
	onPause, logger := g.onPause, g.logger
	g.mu.Unlock()

	if paused {
		g.metrics.observePause(g.t.Name)
		if onPause != nil {
			onPause(g.t.Name, pause, reason)
		}
	}
	line.log(ctx, logger, g.t.Name)
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
		g.wakeLocked()
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

package processor

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/stagesync/stagesync/db"
)

// Throttling across processes. A pause one process's gate starts (a 429
// or 503) is written to stagesync.targets.paused_until and notified on
// stagesync_coord; every process applies it to its own gate at once, and
// also reads the paused targets every second (rescueEvery, with the
// liveness check) in case a notification was missed (listener
// reconnecting). A target's rate_limit is a budget for
// all live processes: each takes rate_limit / n, n being the live
// processes serving the target (stagesync.live_processes), read every
// healthEvery and whenever a process comes or goes.

// coordChannel carries "processes" (one came or went) and "pause <target>".
const coordChannel = "stagesync_coord"

// pauseShare queues the pauses this process starts for publishing. A gate
// must not block on the database, so it only records the pause here; the
// publisher writes it moments later. Pauses of one target coalesce.
type pauseShare struct {
	mu      sync.Mutex
	pending map[string]pendingPause
	signal  chan struct{}
}

type pendingPause struct {
	until  time.Time
	reason string
}

func newPauseShare() *pauseShare {
	return &pauseShare{pending: map[string]pendingPause{}, signal: make(chan struct{}, 1)}
}

// add records a pause of target for d; it never blocks.
func (s *pauseShare) add(target string, d time.Duration, reason string) {
	until := time.Now().Add(d)
	s.mu.Lock()
	if cur, ok := s.pending[target]; !ok || until.After(cur.until) {
		s.pending[target] = pendingPause{until: until, reason: reason}
	}
	s.mu.Unlock()
	select {
	case s.signal <- struct{}{}:
	default:
	}
}

func (s *pauseShare) take() map[string]pendingPause {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.pending
	s.pending = map[string]pendingPause{}
	return out
}

// publishPauses writes the pauses this process starts until ctx ends.
func (p *Processor) publishPauses(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.pauses.signal:
		}
		batch := p.pauses.take()
		for _, name := range slices.Sorted(maps.Keys(batch)) {
			pp := batch[name]
			left := time.Until(pp.until)
			if left <= 0 {
				continue
			}
			err := p.q.TargetPause(ctx, p.pool, db.TargetPauseParams{Name: name, Seconds: left.Seconds(), Reason: pp.reason})
			if err != nil && ctx.Err() == nil {
				// This process is paused anyway; the others find out
				// from their own answers.
				p.logger.WarnContext(ctx, "could not share a target pause with the other processes", "target", name, "error", err)
			}
		}
	}
}

// applyPauses reads the paused targets and pauses the gates of this
// process that are not paused as long. First it lifts the pauses an
// operator lifted (stagesync.lift_pause) since its last read: the
// notification 'lift <target>' brings it here at once, and the poll finds
// one it missed.
func (p *Processor) applyPauses(ctx context.Context) error {
	lifts, err := p.q.TargetsPauseLifts(ctx, p.pool, p.cfg.TargetNames())
	if err != nil {
		return fmt.Errorf("read lifted target pauses: %w", err)
	}
	seen := make(map[string]time.Time, len(lifts))
	for _, l := range lifts {
		if l.PauseLiftedAt == nil {
			continue
		}
		seen[l.Name] = *l.PauseLiftedAt
		rem, ok := p.remotes[l.Name]
		// The first read only learns the lifts that happened before this
		// process started.
		if !ok || p.lifts == nil || p.lifts[l.Name].Equal(*l.PauseLiftedAt) {
			continue
		}
		if rem.gate.lift() {
			p.logger.InfoContext(ctx, "target pause lifted by an operator (stagesync.lift_pause): sending again", "target", l.Name)
		}
		p.wakeClaimer()
		if _, err := p.q.TargetWakeJobs(ctx, p.pool, l.Name); err != nil {
			return fmt.Errorf("wake the jobs of target %q after its pause was lifted: %w", l.Name, err)
		}
		if p.rewake == nil {
			p.rewake = map[string]time.Time{}
		}
		p.rewake[l.Name] = time.Now().Add(time.Second)
	}
	p.lifts = seen
	for name, at := range p.rewake {
		if time.Now().Before(at) {
			continue
		}
		if _, err := p.q.TargetWakeJobs(ctx, p.pool, name); err != nil {
			return fmt.Errorf("wake the jobs of target %q after its pause was lifted: %w", name, err)
		}
		delete(p.rewake, name)
	}
	rows, err := p.q.TargetsPaused(ctx, p.pool, p.cfg.TargetNames())
	if err != nil {
		return fmt.Errorf("read target pauses: %w", err)
	}
	now := time.Now()
	for _, r := range rows {
		if rem, ok := p.remotes[r.Name]; ok && r.RemainingSeconds > 0 {
			rem.gate.pauseFromPeer(now.Add(time.Duration(r.RemainingSeconds*float64(time.Second))), r.PauseReason)
		}
	}
	return nil
}

// refreshShares gives each rate-limited target's gate this process's share
// of the limit: rate_limit / (other live processes serving it + 1).
func (p *Processor) refreshShares(ctx context.Context) error {
	rows, err := p.q.ProcessesLivePerTarget(ctx, p.pool, p.live.clientID)
	if err != nil {
		return fmt.Errorf("count live processes per target: %w", err)
	}
	others := map[string]int{}
	for _, r := range rows {
		others[r.Target] = int(r.Others)
	}
	for name, t := range p.cfg.Targets {
		if t.RateLimit > 0 {
			p.remotes[name].gate.setShare(t.RateLimit / float64(others[name]+1))
		}
	}
	return nil
}

// pausedTargets reports which targets' gates are paused now.
func (p *Processor) pausedTargets() map[string]bool {
	out := map[string]bool{}
	for name, r := range p.remotes {
		if _, ok := r.gate.paused(); ok {
			out[name] = true
		}
	}
	return out
}

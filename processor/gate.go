package processor

import (
	"context"
	"fmt"

	"golang.org/x/time/rate"
)

// gate admits requests to one target: at most Concurrency in flight and at
// most RateLimit per second from this process.
type gate struct {
	sem     chan struct{}
	limiter *rate.Limiter
}

func newGate(t *TargetConfig) *gate {
	lim := rate.NewLimiter(rate.Inf, 0)
	if t.RateLimit > 0 {
		lim = rate.NewLimiter(rate.Limit(t.RateLimit), max(1, int(t.RateLimit/10)))
	}
	return &gate{sem: make(chan struct{}, t.Concurrency), limiter: lim}
}

// acquire waits for a slot and the rate limiter; release gives the slot
// back. It fails only when ctx ends first.
func (g *gate) acquire(ctx context.Context) (release func(), err error) {
	select {
	case g.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	release = func() { <-g.sem }
	if err := g.limiter.Wait(ctx); err != nil {
		release()
		return nil, fmt.Errorf("rate limiter: %w", err)
	}
	return release, nil
}

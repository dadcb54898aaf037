package processor

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
)

// waker makes this process's scheduled retry jobs available on time.
// River's scheduler promotes scheduled jobs only every 5 s, far too coarse
// for a 200 ms backoff or a 1 s Retry-After. The job row stays the durable
// record: if this process dies, River's scheduler still runs the job, at
// most a few seconds late.
type waker struct {
	client *river.Client[pgx.Tx]
	logger *slog.Logger

	mu      sync.Mutex
	ctx     context.Context // nil until start, and after stop
	timers  map[int64]*time.Timer
	running sync.WaitGroup
}

func newWaker(logger *slog.Logger) *waker {
	return &waker{logger: logger, timers: map[int64]*time.Timer{}}
}

// start enables wake-ups; they use ctx for their database calls.
func (w *waker) start(ctx context.Context, client *river.Client[pgx.Tx]) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ctx, w.client = ctx, client
}

// schedulerSlack is River's scheduler interval: a retry due later than
// this is left to River, whose lateness is then small in proportion (and a
// long outage does not pile up one timer per resource).
const schedulerSlack = 5 * time.Second

// at makes job id available at t, if it is still scheduled then.
func (w *waker) at(id int64, t time.Time) {
	if time.Until(t) > schedulerSlack {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ctx == nil {
		return // not started or stopping: River's scheduler will do it
	}
	if old, ok := w.timers[id]; ok && old.Stop() {
		w.running.Done()
	}
	w.running.Add(1)
	w.timers[id] = time.AfterFunc(time.Until(t), func() {
		defer w.running.Done()
		w.wake(id)
	})
}

func (w *waker) wake(id int64) {
	w.mu.Lock()
	ctx, client := w.ctx, w.client
	delete(w.timers, id)
	w.mu.Unlock()
	if ctx == nil {
		return
	}
	// Bounded, so stop() never waits long on an unreachable database.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// Only a job still waiting is promoted: JobRetry would also re-run a
	// job that already completed, which is harmless but wasted work.
	job, err := client.JobGet(ctx, id)
	if err != nil || job.State != rivertype.JobStateScheduled {
		return
	}
	if _, err := client.JobRetry(ctx, id); err != nil && ctx.Err() == nil {
		w.logger.WarnContext(ctx, "could not make a retry job available early; River's scheduler will", "job_id", id, "error", err)
	}
}

// stop cancels pending wake-ups and waits for running ones.
func (w *waker) stop() {
	w.mu.Lock()
	w.ctx = nil
	for id, t := range w.timers {
		if t.Stop() {
			w.running.Done()
		}
		delete(w.timers, id)
	}
	w.mu.Unlock()
	w.running.Wait()
}

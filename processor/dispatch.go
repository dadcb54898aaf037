package processor

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"

	"github.com/stagesync/stagesync/db"
)

// notifyChannel is where inserts into stagesync.changes (and requeues)
// notify, from the changes_notify trigger and stagesync.requeue.
const notifyChannel = "stagesync_changes"

// DispatchArgs is the periodic safety-net job: it claims whatever is
// pending in case a notification was missed (listener reconnecting,
// process starting), and returns to pending any processing change whose
// job no longer exists.
type DispatchArgs struct{}

// Kind implements river.JobArgs.
func (DispatchArgs) Kind() string { return "stagesync_dispatch" }

type dispatchWorker struct {
	river.WorkerDefaults[DispatchArgs]
	p *Processor
}

func (w *dispatchWorker) Work(ctx context.Context, _ *river.Job[DispatchArgs]) error {
	p := w.p
	cutoff := time.Now().Add(-p.cfg.Dispatch.RescueAfter.D())
	n, err := p.q.ChangesResetOrphaned(ctx, p.pool, cutoff)
	if err != nil {
		return fmt.Errorf("reset orphaned changes: %w", err)
	}
	if n > 0 {
		p.logger.WarnContext(ctx, "processing changes had no live job; returned to pending", "changes", n)
	}
	p.SweepLookups(ctx) // t1: batch lookups of ended job attempts become 'unknown' attempts
	_, err = p.Claim(ctx)
	return err
}

// Claim turns pending changes into apply jobs: each
// round claims up to ClaimBatch changes with FOR UPDATE SKIP LOCKED, marks
// them processing and inserts their jobs in the same transaction, so a
// claimed change always has a job (or is covered by one already queued for
// its resource). It returns how many changes it claimed.
//
// It claims only for targets whose queue is short (fewer than claimAhead
// available jobs per worker): a deep backlog stays pending, cheap to hold
// and to scan, and is claimed as jobs finish (each finished job wakes the
// claimer).
func (p *Processor) Claim(ctx context.Context) (int, error) {
	total := 0
	for {
		targets, err := p.targetsWithRoom(ctx)
		if err != nil || len(targets) == 0 {
			return total, err
		}
		n, err := p.claimOnce(ctx, targets)
		total += n
		if err != nil || n < p.cfg.Dispatch.ClaimBatch {
			return total, err
		}
	}
}

// claimAhead is how many queued apply jobs per worker are enough to keep
// the workers busy until the next claim.
const claimAhead = 2

// targetsWithRoom lists the targets that are not paused and whose queue
// holds fewer available jobs than their workers can start soon.
func (p *Processor) targetsWithRoom(ctx context.Context) ([]string, error) {
	depth, err := p.q.RiverQueueDepth(ctx, p.pool)
	if err != nil {
		return nil, fmt.Errorf("read queue depth: %w", err)
	}
	available := map[string]int64{}
	for _, d := range depth {
		if d.State == "available" {
			available[d.Queue] = d.Jobs
		}
	}
	paused := p.pausedTargets()
	var room []string
	for _, name := range p.cfg.TargetNames() {
		// A paused target's changes wait pending, cheaply, rather than
		// becoming jobs that would only be refused and rescheduled; the
		// coordination loop wakes the claimer when the pause ends.
		if paused[name] {
			continue
		}
		if available[QueueName(name)] < int64(claimAhead*p.cfg.Targets[name].Workers) {
			room = append(room, name)
		}
	}
	return room, nil
}

// wakeClaimer asks the claimer to run; wake-ups coalesce.
func (p *Processor) wakeClaimer() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// claimOnce runs one claim transaction for the given targets and returns
// how many changes it claimed.
func (p *Processor) claimOnce(ctx context.Context, targetNames []string) (int, error) {
	var claimed int
	err := pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		rows, err := p.q.ChangesClaimPending(ctx, tx, db.ChangesClaimPendingParams{
			Targets: targetNames, Max: int32(p.cfg.Dispatch.ClaimBatch),
		})
		if err != nil {
			return fmt.Errorf("claim pending changes: %w", err)
		}
		claimed = len(rows)
		if claimed == 0 {
			return nil
		}
		// Resources in first-claimed order per target; a resource whose
		// earlier changes are still processing is left to that job. This
		// "covered" check stands in for River's unique options, which work
		// on a job's whole argument list, not on the resources in it.
		type key struct{ target, id string }
		seen := make(map[key]bool, len(rows))
		perTarget := map[string][]string{}
		var targets []string
		counts := map[string]int{}
		for _, r := range rows {
			counts[r.Target]++
			k := key{r.Target, r.ResourceID}
			if seen[k] || r.Covered {
				seen[k] = true
				continue
			}
			seen[k] = true
			if _, ok := perTarget[r.Target]; !ok {
				targets = append(targets, r.Target)
			}
			perTarget[r.Target] = append(perTarget[r.Target], r.ResourceID)
		}
		var jobs []river.InsertManyParams
		for _, name := range targets {
			t := p.cfg.Targets[name]
			ids := perTarget[name]
			for start := 0; start < len(ids); start += t.BatchSize {
				end := min(start+t.BatchSize, len(ids))
				jobs = append(jobs, river.InsertManyParams{
					Args:       ApplyArgs{Target: name, ResourceIDs: ids[start:end]},
					InsertOpts: &river.InsertOpts{Queue: QueueName(name)},
				})
			}
		}
		if len(jobs) > 0 {
			if _, err := p.client.InsertManyTx(ctx, tx, jobs); err != nil {
				return fmt.Errorf("insert %d apply jobs: %w", len(jobs), err)
			}
		}
		for name, n := range counts {
			p.metrics.observeClaimed(name, n)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return claimed, nil
}

// listen LISTENs for inserts on a dedicated connection and wakes the
// claimer. Notifications are coalesced: a burst of 5,000 single-row inserts
// causes a handful of claims, not 5,000. It reconnects with backoff until
// ctx ends; the periodic dispatch job covers the gaps.
func (p *Processor) listen(ctx context.Context) {
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := p.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		p.logger.WarnContext(ctx, "change listener lost its connection; reconnecting", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(delay*2, 10*time.Second)
	}
}

func (p *Processor) listenOnce(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, p.pool.Config().ConnConfig.Copy())
	if err != nil {
		return fmt.Errorf("connect listener: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := p.q.ListenChanges(ctx, conn); err != nil {
		return fmt.Errorf("listen on %s: %w", notifyChannel, err)
	}
	if err := p.q.ListenCoordination(ctx, conn); err != nil {
		return fmt.Errorf("listen on %s: %w", coordChannel, err)
	}
	// Anything inserted, paused or started while we were not listening.
	p.wakeClaimer()
	signal(p.pausesNow)
	signal(p.sharesNow)
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("wait for notification: %w", err)
		}
		switch {
		case n.Channel != coordChannel:
			p.wakeClaimer()
		case strings.HasPrefix(n.Payload, "pause "), strings.HasPrefix(n.Payload, "lift "):
			signal(p.pausesNow)
		default:
			signal(p.sharesNow)
		}
	}
}

// claimLoop claims on every wake-up until ctx ends.
func (p *Processor) claimLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		}
		if _, err := p.Claim(ctx); err != nil && ctx.Err() == nil {
			p.logger.ErrorContext(ctx, "claim failed; the periodic dispatch will retry", "error", err)
		}
	}
}

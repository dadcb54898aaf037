package processor

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"

	"github.com/stagesync/stagesync/db"
)

// ApplyArgs is the River job that applies the open changes of a batch of
// resources of one target.
type ApplyArgs struct {
	Target      string   `json:"target"`
	ResourceIDs []string `json:"resource_ids"`
	// Busy counts how often these resources were found locked by another
	// job in a row; the follow-up waits longer each time.
	Busy int `json:"busy,omitempty"`
}

// Kind implements river.JobArgs.
func (ApplyArgs) Kind() string { return "stagesync_apply" }

// QueueName is the River queue of a target: one queue per target, so a slow
// remote never starves the others.
func QueueName(target string) string { return "stagesync_" + target }

// maxRounds bounds how often one job re-checks its locked resources for
// changes that arrived while it worked; leftovers get a follow-up job.
const maxRounds = 20

// maxChangesPerRound bounds the changes one job holds in memory at once,
// so draining a deep backlog keeps a flat footprint.
const maxChangesPerRound = 5000

// busyRetryDelay is when a job retries resources whose lock another job
// held. The holder takes every open change it finds, so this retry usually
// finds nothing left to do.
const busyRetryDelay = 250 * time.Millisecond

type applyWorker struct {
	river.WorkerDefaults[ApplyArgs]
	p *Processor
}

// Timeout allows every resource of the job a few requests' worth of the
// target's timeout at its concurrency, plus slack for the database, but
// ends well before RescueAfter. A job that times out records what it did and
// leaves the rest to a follow-up job.
func (w *applyWorker) Timeout(job *river.Job[ApplyArgs]) time.Duration {
	t := w.p.cfg.Targets[job.Args.Target]
	if t == nil {
		return time.Minute
	}
	waves := (len(job.Args.ResourceIDs) + t.Concurrency - 1) / t.Concurrency
	rescue := w.p.cfg.Dispatch.RescueAfter.D()
	// Room below RescueAfter for recording after a timeout (up to 30s), so
	// River never rescues a job that is still finishing.
	return min(time.Duration(waves*4)*t.Timeout.D()+30*time.Second, rescue-min(45*time.Second, rescue/4))
}

// Work serializes on the resources with advisory locks, applies their open
// changes and records everything in one transaction per round.
func (w *applyWorker) Work(ctx context.Context, job *river.Job[ApplyArgs]) error {
	p := w.p
	t := p.cfg.Targets[job.Args.Target]
	if t == nil {
		// Another process may serve this target; retrying lets River hand
		// it there rather than losing the changes.
		return fmt.Errorf("target %q is not configured in this process", job.Args.Target)
	}
	log := p.logger.With("job_id", job.ID, "target", t.Name)
	conn, err := p.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire connection: %w", err)
	}
	// Session-level advisory locks rather than transaction-level: they must
	// span the HTTP requests and several short transactions without holding
	// a transaction (and its snapshot) open across the network. They belong
	// to this connection's session, so a crashed process releases them when
	// PostgreSQL notices the dead connection: no TTL, no stale lock. Here
	// they are released before the connection returns to the pool; if that
	// fails the connection is closed rather than reused with locks held.
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := p.q.ResourceLocksReleaseAll(rctx, conn); err != nil {
			log.WarnContext(rctx, "release resource locks failed; closing the connection", "error", err)
			_ = conn.Conn().Close(rctx)
		}
		conn.Release()
	}()

	ids := slices.Compact(slices.Sorted(slices.Values(job.Args.ResourceIDs)))
	locks, err := p.q.ResourceLocksTry(ctx, conn, db.ResourceLocksTryParams{Target: t.Name, ResourceIDs: ids})
	if err != nil {
		return fmt.Errorf("lock resources: %w", err)
	}
	var locked, busy []string
	for _, l := range locks {
		if l.Locked {
			locked = append(locked, l.ResourceID)
		} else {
			busy = append(busy, l.ResourceID)
		}
	}

	a := &applier{t: t, r: p.remotes[t.Name], now: time.Now}
	todo := locked
	for round := 0; len(todo) > 0; round++ {
		if round == maxRounds || ctx.Err() != nil {
			// Stopping early: changes claimed meanwhile as "covered" by this
			// job must not be left processing without one.
			busy = append(busy, todo...)
			break
		}
		runs, err := p.loadRuns(ctx, conn, t, todo)
		if err != nil {
			return err
		}
		if len(runs) == 0 {
			break
		}
		// A job River runs again (its process died, or recording failed)
		// may have written without recording it. Its resources are then
		// fetched one by one instead: a GET brings the body, so values
		// already written end noop rather than being written twice under
		// a freshly looked-up ETag.
		if job.Attempt <= 1 {
			p.prefetchETags(ctx, a, runs)
		}
		var wg sync.WaitGroup
		for _, rr := range runs {
			wg.Go(func() { a.run(ctx, rr) })
		}
		wg.Wait()
		// The remote has answered: record it even if the job is being
		// cancelled, or a retry would repeat requests already made.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		err = p.record(rctx, conn, t, job.ID, runs)
		cancel()
		if err != nil {
			p.metrics.observeJob(t.Name, "error")
			return err
		}
		// Resources waiting for a retry job are done here; the others are
		// checked again for changes that arrived meanwhile or did not fit
		// in this round.
		retrying := map[string]bool{}
		for _, rr := range runs {
			if !rr.retryAt.IsZero() {
				retrying[rr.id] = true
			}
		}
		todo = slices.DeleteFunc(todo, func(id string) bool { return retrying[id] })
	}
	if len(busy) > 0 {
		delay := busyRetryDelay << min(job.Args.Busy, 5) // 250ms … 8s
		res, err := p.client.Insert(context.WithoutCancel(ctx),
			ApplyArgs{Target: t.Name, ResourceIDs: busy, Busy: job.Args.Busy + 1},
			&river.InsertOpts{Queue: QueueName(t.Name), ScheduledAt: time.Now().Add(delay)})
		if err != nil {
			return fmt.Errorf("schedule %d busy resources: %w", len(busy), err)
		}
		p.waker.at(res.Job.ID, res.Job.ScheduledAt)
		log.DebugContext(ctx, "resources locked by another job; retry scheduled", "resources", len(busy))
	}
	p.metrics.observeJob(t.Name, "done")
	// A finished job makes room in the queue: claim more of a backlog.
	p.wakeClaimer()
	return nil
}

// loadRuns reads the open changes and stored state of the resources.
func (p *Processor) loadRuns(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, ids []string) ([]*resourceRun, error) {
	rows, err := p.q.ChangesListOpen(ctx, conn, db.ChangesListOpenParams{Target: t.Name, ResourceIDs: ids, Max: maxChangesPerRound})
	if err != nil {
		return nil, fmt.Errorf("list open changes: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	stored, err := p.q.ResourcesGet(ctx, conn, db.ResourcesGetParams{Target: t.Name, ResourceIDs: ids})
	if err != nil {
		return nil, fmt.Errorf("read stored resources: %w", err)
	}
	states := make(map[string]resourceState, len(stored))
	for _, s := range stored {
		st := resourceState{deleted: s.Deleted}
		if s.ETag != nil {
			st.etag = *s.ETag
		}
		if len(s.Snapshot) > 0 {
			if st.snapshot, err = decodeObject(s.Snapshot); err != nil {
				return nil, fmt.Errorf("resource %q snapshot: %w", s.ResourceID, err)
			}
		}
		states[s.ResourceID] = st
	}
	var runs []*resourceRun
	var cur *resourceRun
	for _, r := range rows {
		if cur == nil || cur.id != r.ResourceID {
			cur = newResourceRun(r.ResourceID, nil, states[r.ResourceID])
			runs = append(runs, cur)
		}
		fields, err := decodeObject(r.Fields)
		if err != nil {
			return nil, fmt.Errorf("change %d: %w", r.ID, err)
		}
		cur.changes = append(cur.changes, openChange{id: r.ID, op: r.Op, fields: fields, attempts: r.Attempts, stagedAt: r.CreatedAt})
	}
	return runs, nil
}

// prefetchETags looks up, with one batch request per BatchSize resources,
// the ETags of resources about to be updated with none stored. Only PATCH
// targets benefit: PUT needs the whole body, which a single GET brings.
func (p *Processor) prefetchETags(ctx context.Context, a *applier, runs []*resourceRun) {
	t := a.t
	if t.BatchETagPath == "" || t.UpdateMethod != "PATCH" {
		return
	}
	var need []*resourceRun
	for _, rr := range runs {
		// Ids with a comma can't travel in the comma-separated list.
		if rr.state.etag == "" && !rr.state.deleted && rr.changes[0].op == "update" && !strings.Contains(rr.id, ",") {
			need = append(need, rr)
		}
	}
	for chunk := range slices.Chunk(need, t.BatchSize) {
		ids := make([]string, len(chunk))
		var cids []int64
		for i, rr := range chunk {
			ids[i] = rr.id
			cids = append(cids, changeIDs(rr.changes)...)
		}
		etags, resp := a.r.batchETags(ctx, ids, cids)
		if resp.notSent {
			return
		}
		// The batch request is recorded once, with the first resource's run.
		chunk[0].attempts = append(chunk[0].attempts, resp.attempt)
		if etags == nil {
			continue // single GETs will follow
		}
		for _, rr := range chunk {
			if e, ok := etags[rr.id]; ok {
				rr.state.etag = e
			} else {
				rr.state.missing = true
			}
		}
	}
}

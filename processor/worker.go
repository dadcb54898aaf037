package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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
	// lastSweep (unix nanoseconds) spaces out sweeps of unrecorded batch
	// lookups.
	lastSweep atomic.Int64
}

// sweepEvery is how often a process sweeps the outbox for batch lookups
// whose job attempt ended without recording them.
const sweepEvery = 5 * time.Second

// Timeout allows every resource of the job a few requests' worth of the
// target's timeout at its share of the concurrency (the workers' jobs share
// the target's in-flight limit), plus slack for the database, but ends
// well before RescueAfter. A job that times out records what it did and
// leaves the rest to a follow-up job.
func (w *applyWorker) Timeout(job *river.Job[ApplyArgs]) time.Duration {
	t := w.p.cfg.Targets[job.Args.Target]
	if t == nil {
		return time.Minute
	}
	share := max(1, t.Concurrency/t.Workers)
	waves := (len(job.Args.ResourceIDs) + share - 1) / share
	rescue := w.p.cfg.Dispatch.RescueAfter.D()
	// Room below RescueAfter for recording after a timeout (up to 30s), so
	// River never rescues a job that is still finishing.
	return min(time.Duration(waves*4)*t.Timeout.D()+30*time.Second, rescue-min(45*time.Second, rescue/4))
}

// Work serializes on the resources with advisory locks, applies their open
// changes and records each resource as it finishes (group committed with
// the others finishing meanwhile: one transaction per flush). When its
// last attempt fails (an error or a panic), River gives the job up: its
// resources' processing changes end dead with the error rather than wait
// for a job that will never come.
func (w *applyWorker) Work(ctx context.Context, job *river.Job[ApplyArgs]) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("apply job panicked: %v\n%s", r, debug.Stack())
		}
		if err != nil && job.Attempt >= job.MaxAttempts {
			if gerr := w.p.giveUp(ctx, job, err); gerr != nil {
				err = errors.Join(err, gerr)
			}
		}
	}()
	w.sweep(ctx)
	return w.work(ctx, job)
}

// sweep runs SweepLookups at most every sweepEvery per process.
func (w *applyWorker) sweep(ctx context.Context) {
	now := time.Now().UnixNano()
	last := w.lastSweep.Load()
	if now-last < int64(sweepEvery) || !w.lastSweep.CompareAndSwap(last, now) {
		return
	}
	w.p.SweepLookups(ctx)
}

// SweepLookups turns batch lookups that were sent but never recorded (their
// job attempt ended first) into 'unknown' attempts rows. Requests for a
// resource are found when a job next locks it; a batch lookup names no
// resource, so this is how the audit gets its row. Apply jobs run it as
// they start, and the periodic dispatch job so that a quiet process still
// does. Failures are logged: the next sweep retries.
func (p *Processor) SweepLookups(ctx context.Context) {
	n, err := p.q.OutboxSweepLookups(ctx, p.pool)
	switch {
	case err != nil && ctx.Err() == nil:
		p.logger.WarnContext(ctx, "sweep of unrecorded batch lookups failed; the next sweep retries it", "error", err)
	case n > 0:
		p.logger.InfoContext(ctx, "batch lookups sent by ended job attempts recorded as unknown", "requests", n)
	}
}

// giveUp ends dead the processing changes of a job River will not run
// again, for each of its resources no other job holds (a holder works them
// itself).
func (p *Processor) giveUp(ctx context.Context, job *river.Job[ApplyArgs], cause error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	conn, err := p.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("give up job %d: acquire connection: %w", job.ID, err)
	}
	defer func() {
		if err := p.q.ResourceLocksReleaseAll(ctx, conn); err != nil {
			_ = conn.Conn().Close(ctx)
		}
		conn.Release()
	}()
	ids := slices.Compact(slices.Sorted(slices.Values(job.Args.ResourceIDs)))
	locks, err := p.q.ResourceLocksTry(ctx, conn, db.ResourceLocksTryParams{Target: job.Args.Target, ResourceIDs: ids})
	if err != nil {
		return fmt.Errorf("give up job %d: lock resources: %w", job.ID, err)
	}
	var locked []string
	for _, l := range locks {
		if l.Locked {
			locked = append(locked, l.ResourceID)
		}
	}
	reason := cleanText(fmt.Sprintf("gave up: apply job %d failed on its last attempt (%d of %d): %v",
		job.ID, job.Attempt, job.MaxAttempts, cause), maxErrorText)
	n, err := p.q.ChangesGiveUp(ctx, conn, db.ChangesGiveUpParams{Target: job.Args.Target, ResourceIDs: locked, Reason: reason})
	if err != nil {
		return fmt.Errorf("give up job %d: end its changes dead: %w", job.ID, err)
	}
	p.logger.WarnContext(ctx, "apply job given up after its last attempt; its changes end dead",
		"job_id", job.ID, "target", job.Args.Target, "changes", n, "resources_held_elsewhere", len(ids)-len(locked))
	return nil
}

func (w *applyWorker) work(ctx context.Context, job *river.Job[ApplyArgs]) error {
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

	// Requests are made durable through this connection, the session that
	// holds the locks: one whose session ended can send nothing. The
	// outbox and the recorder share it, one statement at a time.
	sc := &sessionConn{conn: conn}
	a := &applier{t: t, r: p.remotes[t.Name], now: time.Now, outbox: newOutbox(sc), jobID: job.ID}
	rec := &recorder{p: p, sc: sc, t: t, jobID: job.ID}
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
		// A write that may have landed unrecorded left its resource in
		// doubt (loadRuns found its outbox row): such a resource gets no
		// batch lookup, whose fresh ETag would hide that write.
		p.prefetchETags(ctx, a, runs)
		// Each resource is recorded soon after it is done, with the others
		// finishing meanwhile (see recorder), so a change's terminal state
		// does not wait for the slowest resource of the job.
		rec.start(len(runs))
		var wg sync.WaitGroup
		for _, rr := range runs {
			wg.Go(func() {
				a.run(ctx, rr)
				rec.add(ctx, rr)
			})
		}
		wg.Wait()
		if err := rec.failed(); err != nil {
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

// loadRuns reads the open changes, stored state and leftover requests of
// the resources. A change whose fields can't be read ends rejected alone; a
// snapshot that can't be read is an unknown merge base.
func (p *Processor) loadRuns(ctx context.Context, conn db.DBTX, t *TargetConfig, ids []string) ([]*resourceRun, error) {
	return loadRuns(ctx, p.q, conn, t, ids)
}

// loadRuns is Processor.loadRuns for any reader (plan reads in a read-only
// transaction).
func loadRuns(ctx context.Context, q *db.Queries, conn db.DBTX, t *TargetConfig, ids []string) ([]*resourceRun, error) {
	rows, err := q.ChangesListOpen(ctx, conn, db.ChangesListOpenParams{Target: t.Name, ResourceIDs: ids, Max: maxChangesPerRound})
	if err != nil {
		return nil, fmt.Errorf("list open changes: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	stored, err := q.ResourcesGet(ctx, conn, db.ResourcesGetParams{Target: t.Name, ResourceIDs: ids})
	if err != nil {
		return nil, fmt.Errorf("read stored resources: %w", err)
	}
	byID := make(map[string]db.ResourcesGetRow, len(stored))
	for _, s := range stored {
		byID[s.ResourceID] = s
	}
	var runs []*resourceRun
	var cur *resourceRun
	for _, r := range rows {
		if cur == nil || cur.id != r.ResourceID {
			cur = storedRun(r.ResourceID, byID[r.ResourceID])
			runs = append(runs, cur)
		}
		c := openChange{id: r.ID, op: r.Op, attempts: r.Attempts, stagedAt: r.CreatedAt}
		fields, err := decodeObject(r.Fields)
		if err != nil {
			cur.changes = append(cur.changes, c)
			cur.finish([]openChange{c}, statusRejected, "stagesync cannot read this change's fields: "+err.Error(), "")
			continue
		}
		c.fields, c.carried = fields, slices.Sorted(maps.Keys(fields))
		if len(r.Settled) > 0 {
			// Written by stagesync itself (changes.settled); unreadable, it
			// is only lost guidance: the fields merge again.
			_ = json.Unmarshal(r.Settled, &c.settled)
		}
		cur.changes = append(cur.changes, c)
	}

	// Requests made durable for these resources but never recorded: the
	// remote may have seen them. Each becomes an 'unknown' attempts row in
	// this round's transaction, and the newest write puts the resource in
	// doubt.
	runIDs := make([]string, len(runs))
	byRun := make(map[string]*resourceRun, len(runs))
	for i, rr := range runs {
		runIDs[i] = rr.id
		byRun[rr.id] = rr
	}
	left, err := q.OutboxLeftovers(ctx, conn, db.OutboxLeftoversParams{Target: t.Name, ResourceIDs: runIDs})
	if err != nil {
		return nil, fmt.Errorf("read leftover requests: %w", err)
	}
	for _, row := range left {
		rr := byRun[deref(row.ResourceID)]
		if rr == nil {
			continue
		}
		lo := leftoverFrom(t.Name, row)
		rr.attempts = append(rr.attempts, lo.attempt)
		rr.outboxIDs = append(rr.outboxIDs, lo.id)
		if lo.write != nil {
			rr.setDoubt(lo.write) // rows come in id order: the newest wins
		}
	}
	return runs, nil
}

// storedRun starts a resource's run from its stagesync.resources row.
func storedRun(id string, s db.ResourcesGetRow) *resourceRun {
	st := resourceState{deleted: s.Deleted}
	switch {
	case s.ETagRaw != nil:
		st.etag = string(s.ETagRaw)
	case s.ETag != nil:
		st.etag = *s.ETag
	}
	if len(s.Snapshot) > 0 {
		// A snapshot that can't be read leaves the base unknown.
		if snap, err := decodeObject(s.Snapshot); err == nil {
			st.snapshot = snap
			if s.SnapshotFields != nil {
				st.covers = make(map[string]bool, len(s.SnapshotFields))
				for _, f := range s.SnapshotFields {
					st.covers[f] = true
				}
			}
		}
	}
	rr := newResourceRun(id, nil, st)
	rr.fieldVersions = map[string]int64{}
	if len(s.FieldVersions) > 0 {
		// Unreadable versions (edited by hand) count as none.
		_ = json.Unmarshal(s.FieldVersions, &rr.fieldVersions)
	}
	if s.WriteVersion != nil {
		rr.writeVersion = *s.WriteVersion
	}
	if s.DeleteVersion != nil {
		rr.deleteVersion = *s.DeleteVersion
	}
	rr.inDoubt = decodeInDoubt(s.InDoubt)
	return rr
}

// batchLookup reports whether the resource's ETag is looked up by the
// job's batch request before anything is written (see prefetchETags).
func (a *applier) batchLookup(rr *resourceRun) bool {
	t := a.t
	// Ids with a comma can't travel in the comma-separated list.
	return t.BatchETagPath != "" && t.UpdateMethod == http.MethodPatch &&
		rr.state.etag == "" && !rr.state.deleted && rr.inDoubt == nil && rr.changes[0].op == "update" && !strings.Contains(rr.id, ",")
}

// prefetchETags looks up, with one batch request per BatchSize resources,
// the ETags of resources about to be updated with none stored, with the
// fields the merge needs as their base. Only PATCH targets benefit: PUT
// needs the whole body, which a single GET brings. A resource in doubt is
// never looked up: its in-doubt write is resolved first.
func (p *Processor) prefetchETags(ctx context.Context, a *applier, runs []*resourceRun) {
	t := a.t
	var need []*resourceRun
	for _, rr := range runs {
		if a.batchLookup(rr) {
			need = append(need, rr)
		}
	}
	fields, all := t.mergeFields()
	for chunk := range slices.Chunk(need, t.BatchSize) {
		ids := make([]string, len(chunk))
		var cids []int64
		for i, rr := range chunk {
			ids[i] = rr.id
			cids = append(cids, changeIDs(rr.changes)...)
		}
		items, resp := a.r.batchETags(ctx, request{changeIDs: cids, outbox: a.outbox, jobID: a.jobID}, ids, fields, all)
		// The batch request is recorded once, with the first resource's run.
		if resp.outboxID != 0 {
			chunk[0].outboxIDs = append(chunk[0].outboxIDs, resp.outboxID)
		}
		if resp.notSent {
			return
		}
		chunk[0].attempts = append(chunk[0].attempts, resp.attempt)
		if items == nil {
			continue // single GETs will follow
		}
		for _, rr := range chunk {
			if it, ok := items[rr.id]; ok {
				rr.setState(resourceState{etag: it.etag, snapshot: it.fields, covers: it.covers})
			} else {
				rr.state.missing = true
			}
		}
	}
}

package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river/rivertype"

	"github.com/stagesync/stagesync/db"
)

// recorder records a job's resources as they finish, in flushes: one
// transaction (one pipelined round trip, see recordRuns) for every
// resource finished since the last. A flush starts flushLinger after the
// first resource waiting for it finished, or at once when none of the
// round's resources is still working; resources finishing while it
// commits wait for the next. So a change's terminal state waits a few
// milliseconds for its neighbours, never for the slowest resource of the
// job, and the job's lock session (which its requests' outbox rows also
// need) carries one recording statement per flush, not one per resource.
type recorder struct {
	p     *Processor
	sc    *sessionConn
	t     *TargetConfig
	jobID int64

	mu       sync.Mutex
	queue    []*resourceRun
	since    time.Time // when the oldest queued resource finished
	working  int       // resources of the round not finished yet
	settled  chan struct{}
	flushing bool
	err      error
}

// flushLinger is how long a finished resource may wait for others to share
// its flush.
const flushLinger = 5 * time.Millisecond

// maxFlush bounds the resources of one flush.
const maxFlush = 1000

// start begins a round of n resources.
func (r *recorder) start(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.working = n
	r.settled = make(chan struct{})
}

// add queues a finished run. Unless a flush is under way, the caller
// becomes the flusher: it flushes the queue, and what arrives meanwhile,
// itself. After an error nothing more is recorded: the job fails and its
// outbox rows tell the next worker what was sent.
func (r *recorder) add(ctx context.Context, rr *resourceRun) {
	r.mu.Lock()
	if len(r.queue) == 0 {
		r.since = time.Now()
	}
	r.queue = append(r.queue, rr)
	if r.working--; r.working == 0 {
		close(r.settled)
	}
	if r.flushing || r.err != nil {
		r.mu.Unlock()
		return
	}
	r.flushing = true
	for len(r.queue) > 0 && r.err == nil {
		if wait := flushLinger - time.Since(r.since); r.working > 0 && len(r.queue) < maxFlush && wait > 0 {
			settled := r.settled
			r.mu.Unlock()
			timer := time.NewTimer(wait)
			select {
			case <-timer.C:
			case <-settled:
				timer.Stop()
			}
			r.mu.Lock()
		}
		n := min(len(r.queue), maxFlush)
		batch := r.queue[:n:n]
		r.queue = r.queue[n:]
		r.since = time.Now()
		r.mu.Unlock()
		err := r.flush(ctx, batch)
		r.mu.Lock()
		r.err = err
	}
	r.flushing = false
	r.mu.Unlock()
}

// flush records runs in one transaction on the job's lock session. The
// remote has answered: it records even if the job is being cancelled, or a
// retry would repeat requests already made.
func (r *recorder) flush(ctx context.Context, runs []*resourceRun) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	r.sc.mu.Lock()
	defer r.sc.mu.Unlock()
	return r.p.record(rctx, r.sc.conn, r.t, r.jobID, runs)
}

// failed returns the error that stopped the recording, if any.
func (r *recorder) failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// sessionConn is a job's lock session shared by its outbox and its
// recorder: a connection runs one statement at a time, so each use holds
// mu (a transaction holds it throughout).
type sessionConn struct {
	mu   sync.Mutex
	conn *pgxpool.Conn
}

// Exec implements db.DBTX.
func (s *sessionConn) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn.Exec(ctx, sql, args...)
}

// Query implements db.DBTX; the session is held until the rows are
// closed.
func (s *sessionConn) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	s.mu.Lock()
	rows, err := s.conn.Query(ctx, sql, args...)
	if err != nil {
		s.mu.Unlock()
		return rows, err
	}
	return &sessionRows{Rows: rows, unlock: sync.OnceFunc(s.mu.Unlock)}, nil
}

// QueryRow implements db.DBTX; the session is held until Scan.
func (s *sessionConn) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	s.mu.Lock()
	return sessionRow{row: s.conn.QueryRow(ctx, sql, args...), unlock: s.mu.Unlock}
}

// CopyFrom implements db.DBTX.
func (s *sessionConn) CopyFrom(ctx context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn.CopyFrom(ctx, table, columns, src)
}

type sessionRows struct {
	pgx.Rows
	unlock func()
}

func (r *sessionRows) Close() {
	r.Rows.Close()
	r.unlock()
}

type sessionRow struct {
	row    pgx.Row
	unlock func()
}

func (r sessionRow) Scan(dest ...any) error {
	defer r.unlock()
	return r.row.Scan(dest...)
}

// record writes the results of finished resources in one transaction:
// attempts, merges, resource state, change states, retry jobs, and the
// deletion of their requests' durable intents. If that transaction fails, each resource is
// recorded alone, so an answer PostgreSQL can't take costs only its own
// resource (see recordUnrecordable).
func (p *Processor) record(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	err := p.recordRuns(ctx, conn, t, jobID, runs)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil || conn.Conn().IsClosed() || !recordable(err) {
		// No database to record in: the job fails, and its outbox rows
		// make the next worker resolve what it sent.
		return err
	}
	if len(runs) == 1 {
		if uerr := p.recordUnrecordable(ctx, conn, t, jobID, runs[0], err); uerr != nil {
			return errors.Join(err, uerr)
		}
		return nil
	}
	p.logger.WarnContext(ctx, "recording a round failed; recording its resources one by one", "target", t.Name, "resources", len(runs), "error", err)
	for _, rr := range runs {
		err := p.recordRuns(ctx, conn, t, jobID, []*resourceRun{rr})
		if err == nil {
			continue
		}
		if ctx.Err() != nil || conn.Conn().IsClosed() {
			return err
		}
		if uerr := p.recordUnrecordable(ctx, conn, t, jobID, rr, err); uerr != nil {
			return errors.Join(err, uerr)
		}
	}
	return nil
}

// recordable is false for errors where recording again would not help.
func recordable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr)
}

// recordRuns records runs in one transaction.
func (p *Processor) recordRuns(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, runs []*resourceRun) error {
	var (
		attempts  []db.AttemptsInsertParams
		merges    []db.MergesInsertParams
		resources = db.ResourcesUpsertParams{Target: t.Name}
		changes   db.ChangesRecordParams
		revive    = db.ChangesReviveNotFoundParams{Target: t.Name}
		retries   []scheduledRetry
		outboxIDs []int64
		sent      [][]attemptRecord
		finished  = map[string]int{}
	)
	for _, rr := range runs {
		for _, at := range rr.attempts {
			attempts = append(attempts, attemptParams(t.Name, jobID, at))
		}
		sent = append(sent, rr.attempts)
		outboxIDs = append(outboxIDs, rr.outboxIDs...)
		for _, m := range rr.merges {
			mp, err := mergeParams(t.Name, rr.id, m)
			if err != nil {
				return err
			}
			merges = append(merges, mp)
		}
		versions, moved := settledVersions(rr)
		exist, existMoved := settledExistence(rr)
		if rr.stateDirty || moved || existMoved {
			if err := addResource(&resources, rr, versions, exist); err != nil {
				return err
			}
		}
		for _, c := range rr.changes {
			o := rr.outcome(c.id)
			changes.IDs = append(changes.IDs, c.id)
			changes.Statuses = append(changes.Statuses, o.status)
			changes.AddAttempts = append(changes.AddAttempts, o.addAttempts)
			changes.LastErrors = append(changes.LastErrors, cleanText(o.errText, maxErrorText))
			etag, _ := storedETag(o.etag)
			changes.AppliedETags = append(changes.AppliedETags, etag)
			changes.OutcomeDetails = append(changes.OutcomeDetails, cleanText(o.detail, maxErrorText))
			changes.NotFounds = append(changes.NotFounds, o.notFound)
			changes.Settled = append(changes.Settled, o.settledJSON())
			if o.status != statusProcessing {
				finished[o.status]++
			}
		}
		if !rr.retryAt.IsZero() {
			retries = append(retries, scheduledRetry{resourceID: rr.id, at: rr.retryAt})
		}
		if id := createdBy(rr); id != 0 {
			revive.ResourceIDs = append(revive.ResourceIDs, rr.id)
			revive.CreateIDs = append(revive.CreateIDs, id)
		}
	}
	jobs := retryJobs(t, retries, time.Now())
	envs := batchEnvelopes(sent...)

	// Every statement is queued in one pipelined batch: one round trip.
	// Sent alone, the batch runs as one implicit transaction; with retry
	// jobs to schedule, it runs inside an explicit one with River's insert.
	var pl pipeline
	var err error
	if len(envs) > 0 {
		err = errors.Join(err, p.q.BatchRequestsInsert(ctx, &pl, batchParams(t.Name, envs)))
	}
	if len(attempts) > 0 {
		err = errors.Join(err, p.q.AttemptsInsertMany(ctx, &pl, attemptsMany(t.Name, jobID, attempts)))
	}
	if len(outboxIDs) > 0 {
		err = errors.Join(err, p.q.OutboxDelete(ctx, &pl, outboxIDs))
	}
	if len(merges) > 0 {
		err = errors.Join(err, p.q.MergesInsertMany(ctx, &pl, mergesMany(t.Name, merges)))
	}
	if len(resources.ResourceIDs) > 0 {
		err = errors.Join(err, p.q.ResourcesUpsert(ctx, &pl, resources))
	}
	if len(changes.IDs) > 0 {
		err = errors.Join(err, p.q.ChangesRecord(ctx, &pl, changes))
	}
	if len(revive.ResourceIDs) > 0 {
		err = errors.Join(err, p.q.ChangesReviveNotFound(ctx, &pl, revive))
	}
	if err != nil {
		return fmt.Errorf("queue the recording of %d resources: %w", len(runs), err)
	}
	var inserted []*rivertype.JobInsertResult
	if len(jobs) == 0 {
		err = pl.send(ctx, conn)
	} else {
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if err := pl.send(ctx, tx); err != nil {
				return err
			}
			var err error
			if inserted, err = p.client.InsertManyTx(ctx, tx, jobs); err != nil {
				return fmt.Errorf("schedule retries: %w", err)
			}
			return nil
		})
	}
	if err != nil {
		return fmt.Errorf("record results of %d resources: %w", len(runs), err)
	}
	for _, r := range inserted {
		p.waker.at(r.Job.ID, r.Job.ScheduledAt)
	}
	for status, n := range finished {
		p.metrics.observeFinished(t.Name, status, n)
	}
	if len(retries) > 0 {
		p.logger.DebugContext(ctx, "retries scheduled", "target", t.Name, "resources", len(retries), "jobs", len(jobs))
	}
	return nil
}

// settledVersions returns the resource's field_versions once this round's
// changes are recorded: for each field of a change that ended applied,
// merged or noop, the highest such change id. Dead and rejected changes
// settle nothing, except one an in-doubt write may have put on the remote.
// moved says it differs from the stored one.
func settledVersions(rr *resourceRun) (map[string]int64, bool) {
	versions, moved := rr.fieldVersions, false
	for _, c := range rr.changes {
		o := rr.outcome(c.id)
		switch o.status {
		case statusApplied, statusMerged, statusNoop:
		default:
			if !o.mayHaveLanded {
				continue
			}
		}
		for _, f := range c.carried {
			if versions[f] >= c.id {
				continue
			}
			if !moved {
				versions, moved = maps.Clone(versions), true
				if versions == nil {
					versions = map[string]int64{}
				}
			}
			versions[f] = c.id
		}
	}
	return versions, moved
}

// createdBy returns the id of the oldest create of the round that applied
// (or was merged, or found its values there), or 0. Changes of the
// resource with a higher id that were rejected only because it did not
// exist yet are then worked again (ChangesReviveNotFound): the create
// committed late, after them.
func createdBy(rr *resourceRun) int64 {
	for _, c := range rr.changes {
		if c.op != "create" {
			continue
		}
		switch o := rr.outcome(c.id); o.status {
		case statusApplied, statusMerged, statusNoop:
			if !o.superseded {
				return c.id
			}
		}
	}
	return 0
}

// existence is a resource's write_version and delete_version.
type existence struct{ write, delete int64 }

// settledExistence returns the resource's write_version and delete_version
// once this round's changes are recorded: the highest id of a create or
// update, and of a delete, that ended applied, merged or noop (or dead
// after an in-doubt write that may have landed). A change superseded by a
// newer one settles nothing. moved says they differ from the stored ones.
func settledExistence(rr *resourceRun) (existence, bool) {
	e := existence{write: rr.writeVersion, delete: rr.deleteVersion}
	for _, c := range rr.changes {
		o := rr.outcome(c.id)
		switch o.status {
		case statusApplied, statusMerged, statusNoop:
			if o.superseded {
				continue
			}
		default:
			if !o.mayHaveLanded {
				continue
			}
		}
		if c.op == "delete" {
			e.delete = max(e.delete, c.id)
		} else {
			e.write = max(e.write, c.id)
		}
	}
	return e, e.write != rr.writeVersion || e.delete != rr.deleteVersion
}

// pipeline queues the :exec statements sqlc generates into one pgx.Batch
// instead of running them, so that several named queries travel in one
// round trip. Only Exec can be queued: a statement whose result is read
// can't wait for the batch.
type pipeline struct{ b pgx.Batch }

var errNotPipelined = errors.New("only statements without results can be pipelined")

// Exec implements db.DBTX by queueing the statement.
func (pl *pipeline) Exec(_ context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	pl.b.Queue(sql, args...)
	return pgconn.CommandTag{}, nil
}

// Query implements db.DBTX; it can't be pipelined.
func (pl *pipeline) Query(context.Context, string, ...any) (pgx.Rows, error) {
	return nil, errNotPipelined
}

// QueryRow implements db.DBTX; it can't be pipelined.
func (pl *pipeline) QueryRow(context.Context, string, ...any) pgx.Row { return errRow{} }

// CopyFrom implements db.DBTX; it can't be pipelined.
func (pl *pipeline) CopyFrom(context.Context, pgx.Identifier, []string, pgx.CopyFromSource) (int64, error) {
	return 0, errNotPipelined
}

type errRow struct{}

func (errRow) Scan(...any) error { return errNotPipelined }

// send runs the queued statements in one round trip and returns the first
// error. Outside a transaction they form one implicit transaction: all or
// nothing.
func (pl *pipeline) send(ctx context.Context, conn interface {
	SendBatch(context.Context, *pgx.Batch) pgx.BatchResults
}) error {
	if pl.b.Len() == 0 {
		return nil
	}
	return conn.SendBatch(ctx, &pl.b).Close()
}

// attemptsMany turns attempts rows into the parallel arrays of
// AttemptsInsertMany.
func attemptsMany(target string, jobID int64, rows []db.AttemptsInsertParams) db.AttemptsInsertManyParams {
	n := len(rows)
	m := db.AttemptsInsertManyParams{
		Target: target, JobID: jobID,
		ResourceIDs: make([]string, n), ChangeIDs: make([]string, n), Methods: make([]string, n),
		URLs: make([]string, n), IfMatches: make([]string, n), IfNoneMatches: make([]string, n), StatusCodes: make([]int32, n),
		ResponseETags: make([]string, n), DurationsMs: make([]float64, n), Outcomes: make([]string, n),
		Errors: make([]string, n), BatchIDs: make([]int64, n), CreatedAts: make([]time.Time, n),
	}
	for i, a := range rows {
		m.ResourceIDs[i] = deref(a.ResourceID)
		m.ChangeIDs[i] = int64Array(a.ChangeIDs)
		m.Methods[i], m.URLs[i] = a.Method, a.URL
		m.IfMatches[i], m.IfNoneMatches[i] = deref(a.IfMatch), deref(a.IfNoneMatch)
		if a.StatusCode != nil {
			m.StatusCodes[i] = *a.StatusCode
		}
		m.ResponseETags[i] = deref(a.ResponseETag)
		m.DurationsMs[i], m.Outcomes[i] = a.DurationMs, a.Outcome
		m.Errors[i] = deref(a.Error)
		if a.BatchID != nil {
			m.BatchIDs[i] = *a.BatchID
		}
		m.CreatedAts[i] = a.CreatedAt
	}
	return m
}

// mergesMany turns merges rows into the parallel arrays of
// MergesInsertMany.
func mergesMany(target string, rows []db.MergesInsertParams) db.MergesInsertManyParams {
	n := len(rows)
	m := db.MergesInsertManyParams{
		Target:      target,
		ResourceIDs: make([]string, n), ChangeIDs: make([]string, n), Bases: make([]string, n),
		Ours: make([]string, n), Theirs: make([]string, n), Results: make([]string, n),
		Decisions: make([]string, n), Outcomes: make([]string, n), CreatedAts: make([]time.Time, n),
	}
	for i, r := range rows {
		m.ResourceIDs[i], m.ChangeIDs[i] = r.ResourceID, int64Array(r.ChangeIDs)
		m.Bases[i], m.Ours[i], m.Theirs[i] = string(r.Base), string(r.Ours), string(r.Theirs)
		m.Results[i], m.Decisions[i] = string(r.Result), string(r.Decisions)
		m.Outcomes[i], m.CreatedAts[i] = r.Outcome, r.CreatedAt
	}
	return m
}

// recordUnrecordable records what it can of a resource whose results the
// database refused (cause): its attempts without the remote's details, its
// changes dead with the reason (those refused or dead for a reason of
// their own keep it), and, when a write of the round may have
// landed, that write as the resource's in-doubt write, so the next worker
// checks it rather than forget it. The round's intents are deleted with it.
func (p *Processor) recordUnrecordable(ctx context.Context, conn *pgxpool.Conn, t *TargetConfig, jobID int64, rr *resourceRun, cause error) error {
	reason := cleanText("stagesync could not record the remote's answer for this resource: "+cause.Error(), maxErrorText)
	var attempts []db.AttemptsInsertParams
	for _, at := range rr.attempts {
		at.responseETag, at.errText = "", "not recorded in full: "+cause.Error()
		attempts = append(attempts, attemptParams(t.Name, jobID, at))
	}
	doubt := rr.inDoubt
	for _, at := range rr.attempts {
		if at.method != http.MethodGet && at.statusCode >= 200 && at.statusCode < 300 {
			// A write landed: its outcome is known but not recorded.
			doubt = &inDoubtWrite{Method: at.method, URL: at.url, ChangeIDs: at.changeIDs, At: at.at}
			doubt.setIfMatch(at.ifMatch)
		}
	}
	var changes db.ChangesRecordParams
	for _, c := range rr.changes {
		o := rr.outcome(c.id)
		status, lastError := statusDead, reason
		if o.status == statusRejected || o.status == statusDead {
			// Refused or given up for its own reason, which still holds.
			status, lastError = o.status, cleanText(o.errText, maxErrorText)
		}
		changes.IDs = append(changes.IDs, c.id)
		changes.Statuses = append(changes.Statuses, status)
		changes.AddAttempts = append(changes.AddAttempts, o.addAttempts)
		changes.LastErrors = append(changes.LastErrors, lastError)
		changes.AppliedETags = append(changes.AppliedETags, "")
		changes.OutcomeDetails = append(changes.OutcomeDetails, "")
		changes.NotFounds = append(changes.NotFounds, false)
		changes.Settled = append(changes.Settled, "")
	}
	inDoubt, err := doubt.encode()
	if err != nil {
		return err
	}
	envs := batchEnvelopes(rr.attempts)
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if len(envs) > 0 {
			if err := p.q.BatchRequestsInsert(ctx, tx, batchParams(t.Name, envs)); err != nil {
				return fmt.Errorf("insert batch requests: %w", err)
			}
		}
		if len(attempts) > 0 {
			if _, err := p.q.AttemptsInsert(ctx, tx, attempts); err != nil {
				return fmt.Errorf("insert attempts: %w", err)
			}
		}
		if len(rr.outboxIDs) > 0 {
			if err := p.q.OutboxDelete(ctx, tx, rr.outboxIDs); err != nil {
				return fmt.Errorf("delete recorded intents: %w", err)
			}
		}
		if inDoubt != "" {
			if err := p.q.ResourceMarkInDoubt(ctx, tx, db.ResourceMarkInDoubtParams{Target: t.Name, ResourceID: rr.id, InDoubt: []byte(inDoubt)}); err != nil {
				return fmt.Errorf("mark in doubt: %w", err)
			}
		}
		if err := p.q.ChangesRecord(ctx, tx, changes); err != nil {
			return fmt.Errorf("record change states: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record resource %q after its results were refused: %w", rr.id, err)
	}
	p.logger.WarnContext(ctx, "a resource's results could not be recorded; its changes end dead", "target", t.Name, "resource_id", rr.id, "error", cause)
	p.metrics.observeFinished(t.Name, statusDead, len(rr.changes))
	return nil
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// maxErrorText bounds error text in attempts and changes rows.
const maxErrorText = 2000

func attemptParams(target string, jobID int64, a attemptRecord) db.AttemptsInsertParams {
	ifMatch, _ := storedETag(a.ifMatch)
	respETag, _ := storedETag(a.responseETag)
	ifNoneMatch, _ := storedETag(a.ifNoneMatch)
	ap := db.AttemptsInsertParams{
		Target: target, ResourceID: a.resourceID, ChangeIDs: a.changeIDs, Method: a.method, URL: cleanText(a.url, maxErrorText),
		IfMatch: nonEmpty(cleanText(ifMatch, maxErrorText)), IfNoneMatch: nonEmpty(cleanText(ifNoneMatch, maxErrorText)),
		ResponseETag: nonEmpty(cleanText(respETag, maxErrorText)),
		DurationMs:   float64(a.duration.Microseconds()) / 1000, Outcome: a.outcome, Error: nonEmpty(cleanText(a.errText, maxErrorText)),
		JobID: &jobID, CreatedAt: a.at,
	}
	if ap.ChangeIDs == nil {
		ap.ChangeIDs = []int64{}
	}
	if a.statusCode != 0 {
		sc := int32(a.statusCode)
		ap.StatusCode = &sc
	}
	if n := len(a.batches); n > 0 && a.batches[n-1].id != 0 {
		ap.BatchID = &a.batches[n-1].id
	}
	return ap
}

func mergeParams(target, resourceID string, m mergeRecord) (db.MergesInsertParams, error) {
	mp := db.MergesInsertParams{Target: target, ResourceID: resourceID, ChangeIDs: m.changeIDs, Outcome: m.outcome, CreatedAt: m.at}
	var err error
	enc := func(v any) []byte {
		if err != nil {
			return nil
		}
		var b []byte
		b, err = json.Marshal(pgSafe(v))
		if err == nil && len(b) > maxSnapshotBytes {
			// The audit keeps the decisions; a representation this large
			// is summarized.
			b, err = json.Marshal(map[string]string{"stagesync_note": fmt.Sprintf("not stored: %d bytes, over the %d KiB limit", len(b), maxSnapshotBytes>>10)})
		}
		return b
	}
	if m.base != nil {
		mp.Base = enc(m.base)
	}
	mp.Ours = enc(m.ours)
	if m.theirs != nil {
		mp.Theirs = enc(m.theirs)
	}
	mp.Result = enc(m.result)
	mp.Decisions = enc(m.decisions)
	if err != nil {
		return mp, fmt.Errorf("encode merge of %q: %w", resourceID, err)
	}
	return mp, nil
}

// addResource appends a resource's state to the set-based upsert. What the
// remote sent is bounded and made storable here: an ETag that is not valid
// UTF-8 is kept as raw bytes beside a readable form; a snapshot field
// jsonb can't hold exactly (U+0000, a number beyond numeric's range, deep
// nesting) is left out and its base becomes unknown; a snapshot over
// maxSnapshotBytes is not stored (the base is unknown).
func addResource(p *db.ResourcesUpsertParams, rr *resourceRun, versions map[string]int64, exist existence) error {
	st := rr.state
	snap, fields := "", ""
	if st.snapshot != nil {
		s, covers := storableSnapshot(st.snapshot, st.covers)
		b, err := json.Marshal(s)
		if err != nil {
			return fmt.Errorf("encode snapshot of %q: %w", rr.id, err)
		}
		if len(b) <= maxSnapshotBytes {
			snap = string(b)
			if covers != nil {
				f, _ := json.Marshal(sortedKeys(covers))
				fields = string(f)
			}
		}
	}
	fv, err := json.Marshal(versions)
	if err != nil {
		return fmt.Errorf("encode field versions of %q: %w", rr.id, err)
	}
	if versions == nil {
		fv = []byte("{}")
	}
	doubt, err := rr.inDoubt.encode()
	if err != nil {
		return fmt.Errorf("resource %q: %w", rr.id, err)
	}
	var last int64
	if n := len(rr.changes); n > 0 {
		last = rr.changes[n-1].id
	}
	etag, raw := storedETag(st.etag)
	p.ResourceIDs = append(p.ResourceIDs, rr.id)
	p.ETags = append(p.ETags, etag)
	p.ETagRaws = append(p.ETagRaws, raw)
	p.Snapshots = append(p.Snapshots, snap)
	p.SnapshotFields = append(p.SnapshotFields, fields)
	p.Deleted = append(p.Deleted, st.deleted)
	p.LastChangeIDs = append(p.LastChangeIDs, last)
	p.FieldVersions = append(p.FieldVersions, string(fv))
	p.InDoubts = append(p.InDoubts, doubt)
	p.WriteVersions = append(p.WriteVersions, exist.write)
	p.DeleteVersions = append(p.DeleteVersions, exist.delete)
	return nil
}

// storableSnapshot drops the fields jsonb can't hold exactly; the result
// covers the fields it keeps (nil: all, when nothing was dropped from a
// whole representation).
func storableSnapshot(snap map[string]any, covers map[string]bool) (map[string]any, map[string]bool) {
	var bad []string
	for f, v := range snap {
		if strings.Contains(f, "\x00") || !storable(v, 1) {
			bad = append(bad, f)
		}
	}
	if len(bad) == 0 {
		return snap, covers
	}
	out := maps.Clone(snap)
	if covers == nil {
		covers = make(map[string]bool, len(snap))
		for f := range snap {
			covers[f] = true
		}
	} else {
		covers = maps.Clone(covers)
	}
	for _, f := range bad {
		delete(out, f)
		delete(covers, f)
	}
	return out, covers
}

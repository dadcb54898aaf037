package processor

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"time"
)

// Change states (stagesync.changes.status).
const (
	statusProcessing = "processing"
	statusApplied    = "applied"
	statusMerged     = "merged"
	statusNoop       = "noop"
	statusDead       = "dead"
	statusRejected   = "rejected"
)

// openChange is one pending or processing change of a locked resource.
type openChange struct {
	id       int64
	op       string
	fields   map[string]any
	attempts int32
	stagedAt time.Time // created_at: give_up_after counts from here
}

// resourceState is what stagesync knows of the remote resource.
type resourceState struct {
	etag     string         // "" = unknown: fetch before writing
	snapshot map[string]any // nil = body unknown (merge base unknown)
	deleted  bool
	// missing is set when a batch ETag lookup found no such resource.
	missing bool
}

// changeOutcome is the fate of one change in this job.
type changeOutcome struct {
	status      string // a terminal state, or processing when a retry is scheduled
	errText     string
	etag        string
	addAttempts int32
}

// mergeRecord becomes one stagesync.merges row.
type mergeRecord struct {
	changeIDs []int64
	base      map[string]any
	ours      map[string]any
	theirs    map[string]any
	result    map[string]any
	decisions map[string]Decision
	outcome   string
	at        time.Time
}

// resourceRun collects everything one job did to one resource, so that it
// is recorded in the job's single transaction.
type resourceRun struct {
	id         string
	changes    []openChange
	state      resourceState // what to store in stagesync.resources
	stateDirty bool
	attempts   []attemptRecord
	merges     []mergeRecord
	outcomes   map[int64]*changeOutcome
	retryAt    time.Time // non-zero: a retry job is scheduled for this resource
}

func newResourceRun(id string, changes []openChange, st resourceState) *resourceRun {
	return &resourceRun{id: id, changes: changes, state: st, outcomes: make(map[int64]*changeOutcome, len(changes))}
}

func (rr *resourceRun) outcome(id int64) *changeOutcome {
	o := rr.outcomes[id]
	if o == nil {
		o = &changeOutcome{status: statusProcessing}
		rr.outcomes[id] = o
	}
	return o
}

func (rr *resourceRun) finish(cs []openChange, status, errText, etag string) {
	for _, c := range cs {
		o := rr.outcome(c.id)
		o.status, o.errText, o.etag = status, errText, etag
	}
}

func (rr *resourceRun) setState(st resourceState) {
	rr.state = st
	rr.stateDirty = true
}

// applier runs the write protocol of SPEC §4 for one target.
type applier struct {
	t   *TargetConfig
	r   *remote
	now func() time.Time
}

// run applies a resource's open changes, segment by segment, in id order.
// It stops at the first segment that has to wait for a retry: later
// changes must not overtake it.
func (a *applier) run(ctx context.Context, rr *resourceRun) {
	for _, seg := range segments(rr.changes) {
		var done bool
		switch seg[0].op {
		case "create":
			done = a.create(ctx, rr, seg)
		case "delete":
			done = a.delete(ctx, rr, seg)
		default:
			done = a.update(ctx, rr, seg)
		}
		if !done {
			return
		}
	}
}

// segments coalesces changes: consecutive updates fold into one request,
// updates right after a create fold into the create, a delete stands alone.
func segments(cs []openChange) [][]openChange {
	var out [][]openChange
	for _, c := range cs {
		n := len(out)
		if c.op == "update" && n > 0 && out[n-1][0].op != "delete" {
			out[n-1] = append(out[n-1], c)
			continue
		}
		out = append(out, []openChange{c})
	}
	return out
}

// fold merges the fields of changes in order: later values win.
func fold(cs []openChange) map[string]any {
	m := make(map[string]any)
	for _, c := range cs {
		maps.Copy(m, c.fields)
	}
	return m
}

func changeIDs(cs []openChange) []int64 {
	ids := make([]int64, len(cs))
	for i, c := range cs {
		ids[i] = c.id
	}
	return ids
}

// update writes the folded fields with the stored ETag. No GET is made when
// an ETag is stored; without one (or, for PUT, without a body to send) the
// resource is fetched first.
func (a *applier) update(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	st := rr.state
	if st.missing {
		rr.finish(seg, statusRejected, "resource not found on the remote (batch ETag lookup)", "")
		return true
	}
	if st.etag == "" || st.deleted || (a.t.UpdateMethod == http.MethodPut && st.snapshot == nil) {
		cur := a.fetch(ctx, rr, seg)
		switch {
		case cur.status == http.StatusNotFound:
			rr.setState(resourceState{deleted: true})
			rr.finish(seg, statusRejected, "resource not found on the remote: "+errText(cur.err), "")
			return true
		case cur.status == http.StatusOK && a.t.UpdateMethod == http.MethodPut && cur.body == nil:
			// PUT replaces the whole document: without it, nothing safe
			// can be sent.
			rr.finish(seg, statusRejected, "GET "+a.r.itemURL(rr.id)+" returned no JSON object to apply the fields to (update_method PUT)", "")
			return true
		case cur.status != http.StatusOK || cur.etag == "":
			return a.failure(rr, seg, cur)
		}
		st = a.stateFrom(cur)
		rr.setState(st)
		if cur.body != nil && shows(cur.body, fold(seg)) {
			// Already there: a write made before a crash that was never
			// recorded (the retry has no stored ETag to conflict on), or
			// simply the same values. Writing again would be a second
			// effect.
			rr.finish(seg, statusNoop, "", "")
			return true
		}
	}
	resp := a.write(ctx, rr, seg, st, fold(seg))
	switch {
	case resp.status >= 200 && resp.status < 300:
		a.succeed(rr, seg, resp, st, fold(seg), nil)
		return true
	case a.t.isConflict(resp.status):
		if a.outOfAttempts(rr, seg) {
			return a.retryLater(rr, seg, resp)
		}
		cur := a.fetch(ctx, rr, seg)
		return a.mergeAndWrite(ctx, rr, seg, st.snapshot, cur)
	default:
		return a.failure(rr, seg, resp)
	}
}

// create sends PUT with If-None-Match: *. If the resource already exists
// (a retry after a crash, or someone else made it), its current state is
// merged like a conflict with an unknown base.
func (a *applier) create(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	fields := fold(seg)
	resp := a.r.do(ctx, request{
		method: http.MethodPut, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(seg),
		ifNoneMatch: "*", body: fields, idemKey: true,
	})
	a.count(rr, seg, resp)
	switch {
	case resp.status >= 200 && resp.status < 300:
		// What was created is exactly the fields sent (plus whatever the
		// remote adds, which a representation in the response shows).
		a.succeed(rr, seg, resp, resourceState{snapshot: map[string]any{}}, fields, nil)
		return true
	case resp.status == http.StatusPreconditionFailed || a.t.isConflict(resp.status):
		if a.outOfAttempts(rr, seg) {
			return a.retryLater(rr, seg, resp)
		}
		cur := a.fetch(ctx, rr, seg)
		return a.mergeAndWrite(ctx, rr, seg, nil, cur)
	default:
		return a.failure(rr, seg, resp)
	}
}

// delete sends DELETE with the stored ETag. A resource already gone is a
// noop. If the remote changed it since, the target's default policy
// decides: manual leaves it for a person, otherwise the delete is retried
// with the fresh ETag.
func (a *applier) delete(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	st := rr.state
	if st.etag == "" || st.deleted || st.missing {
		cur, settled, verdict := a.fetchForDelete(ctx, rr, seg)
		if settled {
			return verdict
		}
		st = a.stateFrom(cur)
		rr.setState(st)
	}
	for round := 0; ; round++ {
		resp := a.r.do(ctx, request{
			method: http.MethodDelete, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(seg),
			ifMatch: st.etag, idemKey: true,
		})
		a.count(rr, seg, resp)
		switch {
		case resp.status >= 200 && resp.status < 300, resp.status == http.StatusNotFound:
			status := statusApplied
			if resp.status == http.StatusNotFound {
				status = statusNoop
			}
			rr.setState(resourceState{deleted: true})
			rr.finish(seg, status, "", "")
			return true
		case a.t.isConflict(resp.status):
			if round > 0 || a.outOfAttempts(rr, seg) {
				return a.retryLater(rr, seg, resp)
			}
			cur, settled, verdict := a.fetchForDelete(ctx, rr, seg)
			if settled {
				return verdict
			}
			if a.t.Merge.Default == PolicyManual {
				rr.setState(a.stateFrom(cur))
				rr.finish(seg, statusDead, "needs_review: the resource was changed on the remote since it was last seen; delete not applied (policy manual)", "")
				return true
			}
			st = a.stateFrom(cur)
		default:
			return a.failure(rr, seg, resp)
		}
	}
}

// fetchForDelete GETs a resource about to be deleted. It settles the
// segment (settled, with run's verdict) when the resource is already gone
// (a noop) or the GET failed; otherwise the delete goes on with cur.
func (a *applier) fetchForDelete(ctx context.Context, rr *resourceRun, seg []openChange) (cur response, settled, verdict bool) {
	cur = a.fetch(ctx, rr, seg)
	switch {
	case cur.status == http.StatusNotFound:
		rr.setState(resourceState{deleted: true})
		rr.finish(seg, statusNoop, "", "")
		return cur, true, true
	case cur.status != http.StatusOK || cur.etag == "":
		return cur, true, a.failure(rr, seg, cur)
	}
	return cur, false, false
}

// mergeAndWrite resolves a conflict: three-way merge of base, ours and the
// current representation, a merges row, then one immediate write with the
// fresh ETag. A second conflict backs off through a scheduled retry job;
// the stored base is left as it was, so the retry merges against it again
// rather than mistaking the remote edit for the base.
func (a *applier) mergeAndWrite(ctx context.Context, rr *resourceRun, live []openChange, base map[string]any, cur response) bool {
	switch {
	case cur.status == http.StatusNotFound:
		rr.setState(resourceState{deleted: true})
		rr.finish(live, statusRejected, "resource was deleted on the remote", "")
		return true
	case cur.status != http.StatusOK || cur.etag == "" || cur.body == nil:
		if cur.err == nil {
			cur.err = fmt.Errorf("GET %s after a conflict returned %d without a JSON body and ETag", a.r.itemURL(rr.id), cur.status)
		}
		return a.failure(rr, live, cur)
	}
	theirs := cur.body
	ours := fold(live)
	first := merge(a.t, base, ours, theirs)

	// A change touching a needs_review field ends dead as a whole. The rest
	// are folded and merged again without it, until no change is left
	// touching one (dropping a change can change another field's folded
	// value, and so its decision).
	// The audit row shows every field with its last decision: the one that
	// let it be written, or the one that sent its change to review.
	decisions := maps.Clone(first.decisions)
	m, remaining, dead := first, live, 0
	for {
		var keep []openChange
		for _, c := range remaining {
			if reason := reviewNeeded(c, m, theirs); reason != "" {
				rr.finish([]openChange{c}, statusDead, reason, "")
				dead++
				continue
			}
			keep = append(keep, c)
		}
		if len(keep) == len(remaining) {
			break
		}
		remaining = keep
		m = merge(a.t, base, fold(remaining), theirs)
		maps.Copy(decisions, m.decisions)
	}
	outcome := statusMerged
	switch {
	case dead > 0:
		outcome = "needs_review"
	case len(m.write) == 0:
		outcome = statusNoop
	}
	rr.merges = append(rr.merges, mergeRecord{
		changeIDs: changeIDs(live), base: base, ours: ours, theirs: theirs,
		result: m.write, decisions: decisions, outcome: outcome, at: a.now(),
	})
	a.r.metrics.observeMerge(a.t.Name, outcome)

	curState := a.stateFrom(cur)
	if len(remaining) == 0 || len(m.write) == 0 {
		rr.setState(curState)
		rr.finish(remaining, statusNoop, "", "")
		return true
	}
	resp := a.write(ctx, rr, remaining, curState, m.write)
	switch {
	case resp.status >= 200 && resp.status < 300:
		a.succeed(rr, remaining, resp, curState, m.write, m.decisions)
		return true
	case a.t.isConflict(resp.status):
		return a.retryLater(rr, remaining, resp)
	default:
		return a.failure(rr, remaining, resp)
	}
}

// reviewNeeded explains why c must wait for a person, or returns "".
func reviewNeeded(c openChange, m mergeResult, theirs map[string]any) string {
	for _, f := range slices.Sorted(maps.Keys(c.fields)) {
		if m.decisions[f] == NeedsReview {
			return reviewReason(f, c.fields[f], theirs[f])
		}
	}
	return ""
}

// write sends the fields: PATCH with just them, or PUT of the known
// representation with them applied.
func (a *applier) write(ctx context.Context, rr *resourceRun, live []openChange, st resourceState, fields map[string]any) response {
	body := fields
	if a.t.UpdateMethod == http.MethodPut {
		body = applyFields(st.snapshot, fields)
	}
	resp := a.r.do(ctx, request{
		method: a.t.UpdateMethod, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(live),
		ifMatch: st.etag, body: body, idemKey: true,
	})
	a.count(rr, live, resp)
	return resp
}

// succeed records a successful write. With merge decisions, a change none
// of whose fields was written (all already equal or kept theirs) is a noop.
func (a *applier) succeed(rr *resourceRun, live []openChange, resp response, st resourceState, written map[string]any, decisions map[string]Decision) {
	rr.setState(resourceState{etag: resp.etag, snapshot: a.newSnapshot(resp, st, written)})
	for _, c := range live {
		status := statusApplied
		if decisions != nil {
			status = statusNoop
			for f := range c.fields {
				if decisions[f] == TookOurs {
					status = statusMerged
					break
				}
			}
		}
		etag := resp.etag
		if status == statusNoop {
			etag = ""
		}
		rr.finish([]openChange{c}, status, "", etag)
	}
}

// newSnapshot is the merge base after a successful write. A response body
// is trusted as the new representation only if it shows what was written
// (CouchDB, say, answers a PUT with {"ok","id","rev"}, which is no
// document). Otherwise a PUT's base is the body it sent, and a PATCH's the
// old base with the fields applied; with no old base it stays unknown
// rather than becoming a partial one that would make every other field
// look changed by the remote.
func (a *applier) newSnapshot(resp response, st resourceState, written map[string]any) map[string]any {
	if resp.body != nil && shows(resp.body, written) {
		return resp.body
	}
	if st.snapshot == nil && a.t.UpdateMethod != http.MethodPut {
		return nil
	}
	return applyFields(st.snapshot, written)
}

// shows reports whether body holds every written field's value (a null
// written field: absent).
func shows(body, written map[string]any) bool {
	for k, v := range written {
		bv, ok := body[k]
		if v == nil && ok || v != nil && (!ok || !jsonEqual(bv, v)) {
			return false
		}
	}
	return true
}

// failure handles a non-conflict error: transport errors, 429, 408 and 5xx
// retry later; any other status means the remote refused the change.
func (a *applier) failure(rr *resourceRun, live []openChange, resp response) bool {
	if resp.notSent {
		if pausedBy(resp) != nil {
			// The target is paused: nothing was sent or counted; the
			// resource waits for the pause's end.
			return a.retryLater(rr, live, resp)
		}
		// The job is stopping; its follow-up job sends this. The changes
		// stay processing with nothing counted against them.
		return false
	}
	if resp.status == 0 || retryableStatus(resp.status) {
		return a.retryLater(rr, live, resp)
	}
	reason := errText(resp.err)
	if reason == "" {
		reason = fmt.Sprintf("unexpected status %d", resp.status)
	}
	rr.finish(live, statusRejected, reason, "")
	return true
}

// retryLater schedules the resource for a retry job: at the end of the
// target's pause after a throttling answer (or a request the pause
// refused), else exponential backoff with jitter. Changes whose attempts
// are used up end dead instead, and throttled changes staged longer than
// give_up_after ago (attempts.go has the counting rules).
func (a *applier) retryLater(rr *resourceRun, live []openChange, resp response) bool {
	reason := errText(resp.err)
	if reason == "" {
		reason = fmt.Sprintf("status %d", resp.status)
	}
	th := throttled(resp)
	var waiting []openChange
	var maxAttempts int32
	for _, c := range live {
		o := rr.outcome(c.id)
		if th && !resp.notSent {
			// count() or fetch() counted this answer for every change it
			// carried; a throttling answer is not an attempt.
			o.addAttempts--
		}
		total := c.attempts + o.addAttempts
		switch {
		case int(total) >= a.t.MaxAttempts:
			o.status, o.errText = statusDead, fmt.Sprintf("gave up after %d attempts: %s", total, reason)
		case th && a.givenUp(c):
			o.status, o.errText = statusDead, a.givenUpText(reason)
		default:
			o.status, o.errText = statusProcessing, reason
			waiting = append(waiting, c)
			maxAttempts = max(maxAttempts, total)
		}
	}
	if len(waiting) == 0 {
		return true
	}
	var at time.Time
	if th {
		at = a.throttleRetryAt(resp, maxAttempts)
	} else {
		at = a.now().Add(min(backoff(a.t.Backoff.Base.D(), a.t.Backoff.Max.D(), int(maxAttempts)), time.Hour))
	}
	if at.After(rr.retryAt) {
		rr.retryAt = at
	}
	return false
}

// backoff is base·2^(attempt-1), capped at ceiling, with "equal jitter"
// (half fixed, half random) so hot resources don't retry in lockstep.
func backoff(base, ceiling time.Duration, attempt int) time.Duration {
	d := base
	for i := 1; i < attempt && d < ceiling; i++ {
		d *= 2
	}
	d = min(d, ceiling)
	half := d / 2
	return half + rand.N(half+1)
}

// fetch GETs the resource, counting a failed GET as an attempt so that an
// unreachable remote exhausts the budget like failed writes do.
func (a *applier) fetch(ctx context.Context, rr *resourceRun, live []openChange) response {
	resp := a.r.fetch(ctx, rr.id, changeIDs(live))
	if resp.notSent {
		return resp
	}
	rr.attempts = append(rr.attempts, resp.attempt)
	if resp.status != http.StatusOK && resp.status != http.StatusNotFound {
		for _, c := range live {
			rr.outcome(c.id).addAttempts++
		}
	}
	return resp
}

// count records a write request and counts it for each change it carried.
func (a *applier) count(rr *resourceRun, live []openChange, resp response) {
	if resp.notSent {
		return
	}
	rr.attempts = append(rr.attempts, resp.attempt)
	for _, c := range live {
		rr.outcome(c.id).addAttempts++
	}
}

func (a *applier) stateFrom(resp response) resourceState {
	return resourceState{etag: resp.etag, snapshot: resp.body}
}

// applyFields returns a copy of snap with fields set; a null field removes
// the key, as in a JSON merge patch.
func applyFields(snap, fields map[string]any) map[string]any {
	out := make(map[string]any, len(snap)+len(fields))
	maps.Copy(out, snap)
	for k, v := range fields {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

package processor

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
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
	id int64
	op string
	// fields are the values it still asks for: fields a newer change
	// already settled are dropped (see applier.live).
	fields map[string]any
	// carried names every field it set, for field_versions.
	carried  []string
	attempts int32
	// detail says which fields were dropped and why.
	detail string
	// keptTheirs: a merge set some of its values aside (policy theirs), so
	// it ends merged, not applied, when the rest is written.
	keptTheirs bool
	// settled are its fields a read already decided while it stayed open
	// (changes.settled): already_equal or kept_theirs. They are not merged
	// or written again.
	settled  map[string]Decision
	stagedAt time.Time // created_at: give_up_after counts from here
}

// resourceState is what stagesync knows of the remote resource.
type resourceState struct {
	etag     string         // "" = unknown: fetch before writing
	snapshot map[string]any // nil = body unknown (merge base unknown)
	// covers, when non-nil, lists the only fields snapshot speaks for (a
	// batch lookup's partial answer); nil with a snapshot: all of them.
	covers  map[string]bool
	deleted bool
	// missing is set when a batch ETag lookup did not list the resource.
	// That proves nothing (a stale index, a page limit, a remote ignoring
	// ids): an update GETs the resource, and only a 404 rejects it.
	missing bool
}

func (s resourceState) base() mergeBase { return mergeBase{fields: s.snapshot, covers: s.covers} }

// holds reports whether the stored state already shows every value of
// fields, with an ETag to vouch for it: writing them would change nothing
// but the ETag.
func (s resourceState) holds(fields map[string]any) bool {
	if s.etag == "" || s.deleted || s.snapshot == nil {
		return false
	}
	b := s.base()
	for f, v := range fields {
		bv, has, known := b.get(f)
		if !known || !sameValue(v, true, bv, has) {
			return false
		}
	}
	return true
}

// changeOutcome is the fate of one change in this job.
type changeOutcome struct {
	status      string // a terminal state, or processing when a retry is scheduled
	errText     string
	etag        string
	detail      string // outcome_detail
	addAttempts int32
	// mayHaveLanded marks a change ended dead whose values an in-doubt
	// write may have put on the remote: its fields' versions still
	// advance, so no older change overwrites them.
	mayHaveLanded bool
	// notFound marks a change rejected only because the remote had no such
	// resource: an older create that commits late puts it back to work.
	notFound bool
	// superseded marks a change ended noop because a newer change had
	// already decided it (see applier.live): it settles nothing.
	superseded bool
	// settled, for a change left open, are the fields a read decided
	// (see openChange.settled); recorded in changes.settled.
	settled map[string]Decision
}

// settledJSON is o.settled for changes.settled, or "" to keep what is
// stored.
func (o *changeOutcome) settledJSON() string {
	if len(o.settled) == 0 {
		return ""
	}
	b, err := json.Marshal(o.settled)
	if err != nil {
		return ""
	}
	return string(b)
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
	// fieldVersions is resources.field_versions: field → id of the newest
	// change whose value stagesync settled.
	fieldVersions map[string]int64
	// writeVersion and deleteVersion are resources.write_version and
	// delete_version: the ids of the newest create or update, and of the
	// newest delete, that stagesync settled (0: none).
	writeVersion, deleteVersion int64
	// inDoubt is the resource's unresolved in-doubt write, if any; verify
	// is a resolved one whose check waits for the first write.
	inDoubt   *inDoubtWrite
	verify    *verification
	attempts  []attemptRecord
	outboxIDs []int64
	merges    []mergeRecord
	outcomes  map[int64]*changeOutcome
	retryAt   time.Time // non-zero: a retry job is scheduled for this resource
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
	rr.finishDetail(cs, status, errText, etag, "")
}

// finishDetail ends changes with an outcome_detail, after what each change
// already says about its dropped fields.
func (rr *resourceRun) finishDetail(cs []openChange, status, errText, etag, detail string) {
	for _, c := range cs {
		o := rr.outcome(c.id)
		o.status, o.errText, o.etag = status, errText, etag
		if status == statusApplied && c.keptTheirs {
			o.status = statusMerged
		}
		o.detail = joinDetail(c.detail, detail)
	}
}

// rejectNotFound ends changes rejected because the remote has no such
// resource (see changeOutcome.notFound).
func (rr *resourceRun) rejectNotFound(cs []openChange, reason string) {
	rr.finish(cs, statusRejected, reason, "")
	for _, c := range cs {
		rr.outcome(c.id).notFound = true
	}
}

func joinDetail(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "; " + b
}

func (rr *resourceRun) setState(st resourceState) {
	rr.state = st
	rr.stateDirty = true
}

func (rr *resourceRun) setDoubt(w *inDoubtWrite) {
	rr.inDoubt = w
	rr.stateDirty = true
}

// applier runs the write protocol of SPEC §4 for one target, in one job.
type applier struct {
	t   *TargetConfig
	r   *remote
	now func() time.Time
	// outbox makes each of the job's requests durable before it leaves;
	// jobID goes with its rows.
	outbox *outbox
	jobID  int64
}

// do sends a request of this job.
func (a *applier) do(ctx context.Context, req request) response {
	req.outbox, req.jobID = a.outbox, a.jobID
	return a.r.do(ctx, req)
}

// run applies a resource's open changes, segment by segment, in id order.
// A write left in doubt by an earlier job is resolved first. It stops at the
// first segment that has to wait for a retry: later changes must not
// overtake it.
func (a *applier) run(ctx context.Context, rr *resourceRun) {
	// The target's batcher counts the goroutines that may still write.
	a.r.batch.enter()
	defer a.r.batch.leave()
	live := a.live(rr)
	if rr.inDoubt != nil {
		var ok bool
		if live, ok = a.resolveInDoubt(ctx, rr, live); !ok {
			return
		}
	}
	for _, seg := range segments(live, a.t.MaxCoalesce) {
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

// live returns the changes still to apply. Ids are the upstream's intended
// order, and per field the highest id wins: a change that committed late
// (a lower id made visible after a higher one was applied) loses every
// field a newer change already settled. One left with nothing ends noop;
// one left with some fields applies those, and says what it lost.
// Existence obeys the same rule: a create or update older than a settled
// delete lost all its values to it, and a delete older than a settled
// create, update or delete was decided by that newer change; either ends
// noop, naming it.
//
// A write in doubt counts as settled for this: the fields it carried for
// its open changes are theirs before any older change is looked at, so an
// older change committed late never writes over a value that may be on
// the remote, whatever the in-doubt write turns out to be.
func (a *applier) live(rr *resourceRun) []openChange {
	live := make([]openChange, 0, len(rr.changes))
	versions := rr.doubtVersions()
	for _, c := range rr.changes {
		if o := rr.outcomes[c.id]; o != nil && o.status != statusProcessing {
			continue // ended already (e.g. its fields could not be read)
		}
		if by := rr.existenceSupersedes(c); by != "" {
			c.detail = "superseded: " + by
			rr.finish([]openChange{c}, statusNoop, "", "")
			rr.outcome(c.id).superseded = true
			continue
		}
		if len(c.settled) > 0 && c.op != "delete" {
			var done bool
			if c, done = rr.dropSettled(a.t, c); done {
				continue
			}
		}
		var dropped []string
		if c.op != "delete" {
			for f := range c.fields {
				if versions[f] > c.id {
					dropped = append(dropped, f)
				}
			}
		}
		if len(dropped) == 0 {
			live = append(live, c)
			continue
		}
		slices.Sort(dropped)
		parts := make([]string, len(dropped))
		for i, f := range dropped {
			parts[i] = fmt.Sprintf("field %s was set by newer change #%d", f, versions[f])
		}
		c.detail = "superseded: " + strings.Join(parts, "; ")
		if len(dropped) == len(c.fields) {
			rr.finish([]openChange{c}, statusNoop, "", "")
			rr.outcome(c.id).superseded = true
			continue
		}
		c.fields = maps.Clone(c.fields)
		for _, f := range dropped {
			delete(c.fields, f)
		}
		live = append(live, c)
	}
	return live
}

// keptDetail is the outcome_detail of fields whose remote value a policy
// kept over the change's.
func keptDetail(t *TargetConfig, kept []string) string {
	kept = slices.Sorted(slices.Values(kept))
	parts := make([]string, len(kept))
	for i, f := range kept {
		parts[i] = fmt.Sprintf("%s (policy %s)", f, t.policy(f))
	}
	return "kept the remote's value for " + strings.Join(parts, ", ")
}

// dropSettled takes from c the fields a read already decided while it
// stayed open (a merged write that conflicted again): they are not merged
// again against a newer read, where a person's later edit would look like
// something to undo. A change left with nothing ends as that read found it
// (done).
func (rr *resourceRun) dropSettled(t *TargetConfig, c openChange) (openChange, bool) {
	fields := maps.Clone(c.fields)
	var kept, there []string
	for f, d := range c.settled {
		if _, ok := fields[f]; !ok {
			continue
		}
		switch d {
		case KeptTheirs:
			kept = append(kept, f)
		case AlreadyEqual:
			there = append(there, f)
		default:
			continue
		}
		delete(fields, f)
	}
	slices.Sort(kept)
	slices.Sort(there)
	var notes []string
	if len(there) > 0 {
		notes = append(notes, "the remote already held "+strings.Join(there, ", ")+" (read before a second conflict)")
	}
	if len(kept) > 0 {
		notes = append(notes, keptDetail(t, kept))
		c.keptTheirs = true
	}
	if len(notes) > 0 {
		c.detail = joinDetail(c.detail, strings.Join(notes, "; "))
	}
	c.fields = fields
	if len(fields) > 0 {
		return c, false
	}
	status := statusNoop
	if c.keptTheirs {
		status = statusMerged
	}
	rr.finish([]openChange{c}, status, "", "")
	return c, true
}

// doubtVersions is fieldVersions with the fields of the open changes the
// resource's in-doubt write carried (those it sent, when its body is
// known) counted as set by them.
func (rr *resourceRun) doubtVersions() map[string]int64 {
	d := rr.inDoubt
	if d == nil || len(d.ChangeIDs) == 0 {
		return rr.fieldVersions
	}
	versions := maps.Clone(rr.fieldVersions)
	if versions == nil {
		versions = map[string]int64{}
	}
	for _, c := range d.carried(rr.changes) {
		for f := range c.fields {
			if _, sent := d.Body[f]; d.Body != nil && !sent {
				continue
			}
			versions[f] = max(versions[f], c.id)
		}
	}
	return versions
}

// existenceSupersedes names the newer settled change that decided whether
// the resource exists after c, or returns "": for a create or update, a
// newer delete (which erased its values); for a delete, a newer create,
// update or delete.
func (rr *resourceRun) existenceSupersedes(c openChange) string {
	if c.op != "delete" {
		if rr.deleteVersion > c.id {
			return fmt.Sprintf("resource was deleted by newer change #%d", rr.deleteVersion)
		}
		return ""
	}
	switch {
	case rr.writeVersion > c.id && rr.writeVersion > rr.deleteVersion:
		return fmt.Sprintf("resource was written by newer change #%d", rr.writeVersion)
	case rr.deleteVersion > c.id:
		return fmt.Sprintf("resource was deleted by newer change #%d", rr.deleteVersion)
	}
	return ""
}

// segments coalesces changes: consecutive updates fold into one request,
// updates right after a create fold into the create, a delete stands alone.
// A segment holds at most most changes (max_coalesce), so a resource with
// thousands pending is written in bounded requests, still in id order.
func segments(cs []openChange, most int) [][]openChange {
	var out [][]openChange
	for _, c := range cs {
		n := len(out)
		if c.op == "update" && n > 0 && out[n-1][0].op != "delete" && len(out[n-1]) < most {
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
// resource is fetched first. Values the stored snapshot already shows are
// not written again.
func (a *applier) update(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	if v := rr.verify; v != nil {
		rr.verify = nil
		return a.mergeAndWrite(ctx, rr, seg, v.base, v.cur, v.doubt)
	}
	st := rr.state
	fields := fold(seg)
	if st.holds(fields) {
		rr.finishDetail(seg, statusNoop, "", "", fmt.Sprintf("nothing sent: the stored state of the remote (ETag %s) already shows these values", cleanText(st.etag, 100)))
		return true
	}
	if a.fetchFirst(st) {
		cur := a.fetch(ctx, rr, seg)
		switch {
		case cur.status == http.StatusNotFound:
			rr.setState(resourceState{deleted: true})
			rr.rejectNotFound(seg, "resource not found on the remote: "+errText(cur.err))
			return true
		case cur.status != http.StatusOK:
			return a.failure(rr, seg, cur)
		case cur.etag == "":
			a.noETag(rr, seg, cur)
			return true
		case a.t.UpdateMethod == http.MethodPut && cur.body == nil:
			// PUT replaces the whole document: without it, nothing safe
			// can be sent.
			rr.finish(seg, statusRejected, fmt.Sprintf("GET %s answered %d with %s, not a JSON object: a PUT needs the resource's document to apply the fields to (update_method PUT)%s",
				a.r.itemURL(rr.id), cur.status, describeBody(cur), notTheAPI(cur)), "")
			return true
		}
		st = a.stateFrom(cur)
		rr.setState(st)
		if cur.body != nil && shows(cur.body, fields) {
			rr.finishDetail(seg, statusNoop, "", "", "nothing sent: the remote already held these values")
			return true
		}
	}
	if a.refusesRedactedPut(rr, seg, st.snapshot, fields) {
		return true
	}
	resp := a.write(ctx, rr, seg, st, fields, nil)
	switch {
	case resp.status >= 200 && resp.status < 300:
		a.succeed(rr, seg, resp, st, fields, nil, nil)
		return true
	case a.t.isConflict(resp.status):
		if a.outOfAttempts(rr, seg) {
			return a.retryLater(rr, seg, resp)
		}
		if a.canRewriteUnread(rr, fields, st, resp) {
			return a.rewriteUnread(ctx, rr, seg, st, fields, resp)
		}
		cur := a.fetch(ctx, rr, seg)
		if a.refusesOwnETag(rr, seg, st.etag, cur) {
			return true
		}
		return a.mergeAndWrite(ctx, rr, seg, st.base(), cur, nil)
	default:
		return a.refused(ctx, rr, seg, resp)
	}
}

// refused handles a write that failed other than by a conflict. A refusal
// of a write that coalesced several updates (422, 400, 413: something in
// the body) does not say which change carries what the remote won't take,
// so the changes are sent again one at a time, in id order, each with the
// ETag and state the one before left (and so by update's own rules: noop,
// conflict and merge included): only the culprits end rejected, with the
// remote's reason, and per field the highest id that applies wins. That
// costs at most one request per change (max_coalesce bounds them), and a
// change refused alone is rejected as before. Statuses about the resource,
// the method or the target (404, 405, 410, 415, 401, 403, 407) would only
// be repeated, and a write in doubt is never re-cut: failure decides.
func (a *applier) refused(ctx context.Context, rr *resourceRun, seg []openChange, resp response) bool {
	if !splittable(seg, resp) || rr.inDoubt != nil {
		return a.failure(rr, seg, resp)
	}
	return a.oneByOne(ctx, rr, seg)
}

// oneByOne sends the changes alone, in id order, each by update's rules
// with the state the one before left.
func (a *applier) oneByOne(ctx context.Context, rr *resourceRun, cs []openChange) bool {
	for _, c := range cs {
		if !a.update(ctx, rr, []openChange{c}) {
			// It waits for a retry: the later ones must not overtake it.
			return false
		}
	}
	return true
}

// splittable reports whether a refused write of seg is worth sending again
// change by change (see refused).
func splittable(seg []openChange, resp response) bool {
	if len(seg) < 2 || resp.notSent || resp.status < 400 || resp.status >= 500 || retryableStatus(resp.status) || credentialRefused(resp.status) {
		return false
	}
	switch resp.status {
	case http.StatusForbidden, http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusGone, http.StatusUnsupportedMediaType:
		return false
	}
	for _, c := range seg {
		if c.op != "update" {
			return false
		}
	}
	return true
}

// fetchFirst reports whether an update must GET the resource before
// writing: no ETag is stored, the resource was seen deleted, or a PUT has
// no document to apply the fields to.
func (a *applier) fetchFirst(st resourceState) bool {
	return st.etag == "" || st.deleted || (a.t.UpdateMethod == http.MethodPut && st.snapshot == nil)
}

// canRewriteUnread reports whether a conflict can be answered by writing
// the same fields again at once with the ETag the conflict answer carried,
// without a GET: every field to write has policy ours (whatever the remote
// holds, the merge writes ours), the write is a PATCH (it touches only our
// fields, so a person's edit of any other field stays), the resource is
// not in doubt (an in-doubt write is judged by reading the remote), and the
// answer named an ETag other than the one just refused.
func (a *applier) canRewriteUnread(rr *resourceRun, fields map[string]any, st resourceState, conflict response) bool {
	if a.t.UpdateMethod != http.MethodPatch || rr.inDoubt != nil || conflict.etag == "" || conflict.etag == st.etag {
		return false
	}
	for f := range fields {
		if a.t.policy(f) != PolicyOurs {
			return false
		}
	}
	return true
}

// rewriteUnread writes fields again with the ETag of the conflict answer,
// recording a merges row without theirs (decisions took_ours_unread). The
// old snapshot is no longer a base (someone changed the resource), so the
// new one is the answer's body if it shows the written values, else
// unknown. If the rewrite conflicts too (the ETag was not current after
// all, or someone edited again), the resource is read and merged as usual.
func (a *applier) rewriteUnread(ctx context.Context, rr *resourceRun, seg []openChange, st resourceState, fields map[string]any, conflict response) bool {
	decisions := make(map[string]Decision, len(fields))
	for f := range fields {
		decisions[f] = TookOursUnread
	}
	rr.merges = append(rr.merges, mergeRecord{
		changeIDs: changeIDs(seg), base: st.snapshot, ours: fields,
		result: fields, decisions: decisions, outcome: statusMerged, at: a.now(),
	})
	a.r.metrics.observeMerge(a.t.Name, statusMerged)
	fresh := resourceState{etag: conflict.etag}
	resp := a.writeMerged(ctx, rr, seg, fresh, fields, nil)
	switch {
	case resp.status >= 200 && resp.status < 300:
		a.succeed(rr, seg, resp, fresh, fields, nil, nil)
		rr.finishDetail(seg, statusMerged, "", resp.etag, unreadDetail)
		return true
	case a.t.isConflict(resp.status):
		if a.outOfAttempts(rr, seg) {
			return a.retryLater(rr, seg, resp)
		}
		cur := a.fetch(ctx, rr, seg)
		if a.refusesOwnETag(rr, seg, fresh.etag, cur) {
			return true
		}
		return a.mergeAndWrite(ctx, rr, seg, st.base(), cur, nil)
	default:
		return a.refused(ctx, rr, seg, resp)
	}
}

// unreadDetail is the outcome_detail of a change written by rewriteUnread.
const unreadDetail = "written again at once after a conflict, with the ETag the conflict answer carried: every field it sets has policy ours, so the remote's values (not read) could not change what to write; a PATCH leaves the remote's other fields as they are"

// create sends PUT with If-None-Match: *. If the resource already exists
// (someone else made it), its current state is merged like a conflict
// with an unknown base.
func (a *applier) create(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	if v := rr.verify; v != nil {
		rr.verify = nil
		return a.mergeAndWrite(ctx, rr, seg, v.base, v.cur, v.doubt)
	}
	fields := fold(seg)
	resp := a.do(ctx, a.createRequest(rr, seg, fields))
	a.count(rr, seg, resp, nil)
	switch {
	case resp.status >= 200 && resp.status < 300:
		// What was created is exactly the fields sent (plus whatever the
		// remote adds, which a representation in the response shows).
		a.succeed(rr, seg, resp, resourceState{snapshot: map[string]any{}}, fields, nil, nil)
		return true
	case resp.status == http.StatusPreconditionFailed || a.t.isConflict(resp.status):
		if a.outOfAttempts(rr, seg) {
			return a.retryLater(rr, seg, resp)
		}
		cur := a.fetch(ctx, rr, seg)
		return a.mergeAndWrite(ctx, rr, seg, mergeBase{}, cur, nil)
	default:
		return a.failure(rr, seg, resp)
	}
}

// createRequest is the PUT with If-None-Match: * that creates the resource.
func (a *applier) createRequest(rr *resourceRun, seg []openChange, fields map[string]any) request {
	return request{
		method: http.MethodPut, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(seg),
		ifNoneMatch: "*", body: fields, idemKey: true,
	}
}

// delete sends DELETE with the stored ETag. A resource already gone is a
// noop. If the remote changed it since, the target's default policy
// decides: manual leaves it for a person, otherwise the delete is retried
// with the fresh ETag.
func (a *applier) delete(ctx context.Context, rr *resourceRun, seg []openChange) bool {
	// A doubt resolved by reading the resource needs no merge for a
	// delete: it is sent with the fresh ETag.
	rr.verify = nil
	st := rr.state
	if deleteFetchFirst(st) {
		cur, settled, verdict := a.fetchForDelete(ctx, rr, seg)
		if settled {
			return verdict
		}
		st = a.stateFrom(cur)
		rr.setState(st)
	}
	for round := 0; ; round++ {
		resp := a.do(ctx, a.deleteRequest(rr, seg, st))
		a.count(rr, seg, resp, nil)
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
			if a.refusesOwnETag(rr, seg, st.etag, cur) {
				return true
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

// deleteFetchFirst reports whether a delete must GET the resource first:
// no ETag is stored, or the stored state says it is gone or missing.
func deleteFetchFirst(st resourceState) bool {
	return st.etag == "" || st.deleted || st.missing
}

// deleteRequest is the DELETE with the ETag of st. No Idempotency-Key: with
// one, Go's transport would resend a bodiless DELETE on its own after a
// failed connection, and its If-Match already makes a second copy harmless
// and visible.
func (a *applier) deleteRequest(rr *resourceRun, seg []openChange, st resourceState) request {
	return request{
		method: http.MethodDelete, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(seg),
		ifMatch: st.etag,
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
	case cur.status != http.StatusOK:
		return cur, true, a.failure(rr, seg, cur)
	case cur.etag == "":
		a.noETag(rr, seg, cur)
		return cur, true, true
	}
	return cur, false, false
}

// describeBody says what an answer's body was, for errors about it.
func describeBody(resp response) string {
	switch {
	case len(resp.rawBody) == 0:
		return "no body"
	case resp.contentType != "":
		return fmt.Sprintf("a %s body of %d bytes", resp.contentType, len(resp.rawBody))
	}
	return fmt.Sprintf("a body of %d bytes", len(resp.rawBody))
}

// notTheAPI is the advice for a 2xx whose body is a web page: something
// other than the API answered.
func notTheAPI(resp response) string {
	if strings.Contains(resp.contentType, "html") {
		return ". A web page where the API should answer is usually a login page or a proxy's: check base_url and auth"
	}
	return ""
}

// noETag rejects changes whose resource the remote serves without an ETag:
// without one no write can be conditional, and an unconditional write
// could overwrite a person's edit.
func (a *applier) noETag(rr *resourceRun, live []openChange, cur response) {
	if cur.etagSecret {
		rr.finish(live, statusRejected, fmt.Sprintf("the remote put the credential stagesync sends into this resource's ETag (GET %s); "+
			"stagesync never stores or sends its credential back, so it cannot make a conditional write here: the remote's ETags must not contain the credential", a.r.itemURL(rr.id)), "")
		return
	}
	rr.finish(live, statusRejected, fmt.Sprintf("the remote sent no ETag; stagesync needs one to write safely (GET %s answered %d without an ETag header)", a.r.itemURL(rr.id), cur.status), "")
}

// refusesRedactedPut rejects changes whose PUT would carry the [redacted]
// placeholder: the remote's copy holds the credential (a person pasted it
// into a field), stagesync stored that field redacted, and a PUT of the
// stored document would write the placeholder over it.
func (a *applier) refusesRedactedPut(rr *resourceRun, live []openChange, snap, fields map[string]any) bool {
	if a.t.UpdateMethod != http.MethodPut {
		return false
	}
	f := a.t.redactedField(snap, fields)
	if f == "" {
		return false
	}
	rr.finish(live, statusRejected, fmt.Sprintf("not sent: the remote's copy of this resource holds the credential stagesync sends, which stagesync keeps only as %s; "+
		"a PUT would write that placeholder onto the remote (field %s). Remove the credential from that field on the remote and requeue, or use update_method PATCH", redacted, cleanText(f, 100)), "")
	return true
}

// refusesOwnETag handles a conflict answered to an If-Match that is the
// remote's current ETag, as the GET after it shows: retrying could never
// succeed. A weak ETag is the usual cause: a server comparing If-Match
// strongly (RFC 9110 §13.1.1) never matches W/"…", even its own.
func (a *applier) refusesOwnETag(rr *resourceRun, live []openChange, sent string, cur response) bool {
	if sent == "" || cur.status != http.StatusOK || cur.etag != sent {
		return false
	}
	reason := fmt.Sprintf("the remote answered a conflict to If-Match %s, which is its current ETag; stagesync cannot write to it safely", cleanText(sent, 100))
	if isWeakETag(sent) {
		reason = fmt.Sprintf("the remote refuses weak ETags in If-Match: it answered a conflict to If-Match %s although that is its current ETag (it compares strongly, RFC 9110 §13.1.1), so no conditional write can succeed", cleanText(sent, 100))
	}
	rr.setState(a.stateFrom(cur))
	rr.finish(live, statusRejected, reason, "")
	return true
}

// mergeAndWrite resolves a conflict: three-way merge of base, ours and the
// current representation, a merges row, then one immediate write with the
// fresh ETag. A second conflict backs off through a scheduled retry job,
// which starts from what the read showed (see conflictedAgainState). With
// doubt, the merge follows the in-doubt rules (see merge).
func (a *applier) mergeAndWrite(ctx context.Context, rr *resourceRun, live []openChange, base mergeBase, cur response, doubt *inDoubtWrite) bool {
	switch {
	case cur.status == http.StatusNotFound:
		rr.setState(resourceState{deleted: true})
		rr.rejectNotFound(live, "resource was deleted on the remote")
		return true
	case cur.status == http.StatusOK && cur.etag == "":
		a.noETag(rr, live, cur)
		return true
	case cur.status != http.StatusOK || cur.body == nil:
		if cur.err == nil && !cur.notSent {
			cur.err = fmt.Errorf("GET %s after a conflict answered %d with %s, not a JSON object: the merge needs the remote's current document%s",
				a.r.itemURL(rr.id), cur.status, describeBody(cur), notTheAPI(cur))
		}
		return a.failure(rr, live, cur)
	}
	theirs := cur.body
	ours := fold(live)
	first := merge(a.t, base, ours, theirs, doubt, strictFields(live, doubt))

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
			if reason := reviewNeeded(c, m); reason != "" {
				rr.finish([]openChange{c}, statusDead, reason, "")
				rr.outcome(c.id).mayHaveLanded = doubt != nil && slices.Contains(doubt.ChangeIDs, c.id)
				dead++
				continue
			}
			keep = append(keep, c)
		}
		if len(keep) == len(remaining) {
			break
		}
		remaining = keep
		m = merge(a.t, base, fold(remaining), theirs, doubt, strictFields(remaining, doubt))
		maps.Copy(decisions, m.decisions)
	}
	outcome := statusMerged
	switch {
	case dead > 0:
		outcome = "needs_review"
	case len(m.write) == 0 && !slices.Contains(slices.Collect(maps.Values(m.decisions)), KeptTheirs):
		outcome = statusNoop
	}
	rr.merges = append(rr.merges, mergeRecord{
		changeIDs: changeIDs(live), base: base.fields, ours: ours, theirs: theirs,
		result: m.write, decisions: decisions, outcome: outcome, at: a.now(),
	})
	a.r.metrics.observeMerge(a.t.Name, outcome)

	curState := a.stateFrom(cur)
	if len(remaining) == 0 || len(m.write) == 0 {
		rr.setState(curState)
		a.settle(rr, remaining, m.decisions, cur.etag, doubt)
		return true
	}
	if a.refusesRedactedPut(rr, remaining, curState.snapshot, m.write) {
		return true
	}
	resp := a.writeMerged(ctx, rr, remaining, curState, m.write, theirs)
	switch {
	case resp.status >= 200 && resp.status < 300:
		a.succeed(rr, remaining, resp, curState, m.write, m.decisions, doubt)
		return true
	case a.t.isConflict(resp.status):
		// A change the read settled (its values there, or kept from the
		// remote) ends now: a retry would merge it again against a person's
		// newer edit and write its value over that edit.
		rr.setState(conflictedAgainState(curState, base, m.decisions))
		shown, sent := splitByRead(a.t, remaining, m.decisions)
		a.settle(rr, shown, m.decisions, cur.etag, doubt)
		// What the read decided of the others is kept for their retry
		// (from remaining: sent lacks the fields kept from the remote).
		rr.noteSettled(remaining, m.decisions)
		return a.retryLater(rr, sent, resp)
	default:
		return a.refusedMerged(ctx, rr, remaining, resp, m.decisions, base, cur, doubt)
	}
}

// refusedMerged handles a merged write the remote refused for good (a 4xx
// other than a conflict, throttling or a refused credential; the rest is
// retried as it is). The read before the merge already settled some of it:
// a change whose every value the remote showed (its in-doubt write landed,
// or a person set the same value) or a policy kept from the remote ends as
// the read found it, never rejected for a value it does not carry. The
// others go on without the fields the merge kept from the remote (sent
// alone, they must not undo the merge's decision) and are split as any
// refused write is, so only the culprit ends rejected.
func (a *applier) refusedMerged(ctx context.Context, rr *resourceRun, remaining []openChange, resp response, decisions map[string]Decision, base mergeBase, cur response, doubt *inDoubtWrite) bool {
	if resp.notSent || resp.status == 0 || retryableStatus(resp.status) || credentialRefused(resp.status) {
		return a.failure(rr, remaining, resp)
	}
	shown, sent := splitByRead(a.t, remaining, decisions)
	a.settle(rr, shown, decisions, cur.etag, doubt)
	rr.noteSettled(remaining, decisions)
	if !splittable(sent, resp) {
		return a.failure(rr, sent, resp)
	}
	// Nothing was written: the read is the remote's state, so the changes
	// go alone with its ETag (not the one the remote refused before it), and
	// the merge's decisions stand for its base.
	rr.setState(conflictedAgainState(a.stateFrom(cur), base, decisions))
	if doubt != nil {
		// A change the in-doubt write carried is judged alone by the
		// in-doubt rules first (its own value against what the read showed;
		// a newer change's value decided the combined write): a person's
		// edit after it landed sends it to review, and it is never sent
		// alone as if nothing were in doubt.
		var plain []openChange
		for _, c := range sent {
			if !slices.Contains(doubt.ChangeIDs, c.id) {
				plain = append(plain, c)
				continue
			}
			own := merge(a.t, base, c.fields, cur.body, doubt, strictFields([]openChange{c}, doubt))
			if reason := reviewNeeded(c, own); reason != "" {
				rr.finish([]openChange{c}, statusDead, reason, "")
				rr.outcome(c.id).mayHaveLanded = true
				continue
			}
			rr.noteSettled([]openChange{c}, own.decisions)
			if shownAlone, sentAlone := splitByRead(a.t, []openChange{c}, own.decisions); len(sentAlone) == 0 {
				a.settle(rr, shownAlone, own.decisions, cur.etag, doubt)
			} else {
				plain = append(plain, sentAlone...)
			}
		}
		sent = plain
	}
	return a.oneByOne(ctx, rr, sent)
}

// noteSettled keeps, for each open change of cs, what a read decided of its
// fields (already there, or kept from the remote), so that its retry drops
// them (changes.settled) rather than merge them again.
func (rr *resourceRun) noteSettled(cs []openChange, decisions map[string]Decision) {
	for _, c := range cs {
		for f := range c.fields {
			d := decisions[f]
			if d != AlreadyEqual && d != KeptTheirs {
				continue
			}
			o := rr.outcome(c.id)
			if o.settled == nil {
				o.settled = maps.Clone(c.settled)
				if o.settled == nil {
					o.settled = map[string]Decision{}
				}
			}
			o.settled[f] = d
		}
	}
}

// splitByRead parts the changes of a merged write by what the read before
// it settled: shown are those it wrote nothing for (every value already
// there, or kept from the remote); sent the others, without the fields
// the merge kept from the remote (marked keptTheirs, so they end merged).
func splitByRead(t *TargetConfig, remaining []openChange, decisions map[string]Decision) (shown, sent []openChange) {
	for _, c := range remaining {
		var kept []string
		took := false
		for f := range c.fields {
			switch decisions[f] {
			case TookOurs:
				took = true
			case KeptTheirs:
				kept = append(kept, f)
			}
		}
		if !took {
			shown = append(shown, c)
			continue
		}
		if len(kept) > 0 {
			c.fields = maps.Clone(c.fields)
			for _, f := range kept {
				delete(c.fields, f)
			}
			c.detail = joinDetail(c.detail, keptDetail(t, kept))
			c.keptTheirs = true
		}
		sent = append(sent, c)
	}
	return shown, sent
}

// conflictedAgainState is what stagesync keeps after a merged write
// conflicted again (a person edited between the read and the write): the
// read's ETag and document are the retry's base, so a field the read showed
// already holding ours and a person changed since is seen as the person's
// edit, not as ours against an older base (which would write ours over it,
// with an If-Match already refused). A field the merge kept from the remote
// keeps its older base: the upstream value set aside must lose again.
func conflictedAgainState(cur resourceState, base mergeBase, decisions map[string]Decision) resourceState {
	st := resourceState{etag: cur.etag, snapshot: maps.Clone(cur.snapshot), covers: maps.Clone(cur.covers)}
	if st.snapshot == nil {
		st.snapshot = map[string]any{}
	}
	for f, d := range decisions {
		if d != KeptTheirs {
			continue
		}
		v, has, known := base.get(f)
		switch {
		case !known:
			if st.covers == nil {
				st.covers = make(map[string]bool, len(st.snapshot))
				for k := range st.snapshot {
					st.covers[k] = true
				}
			}
			delete(st.covers, f)
			delete(st.snapshot, f)
		case has:
			st.snapshot[f] = v
		default:
			delete(st.snapshot, f)
		}
		if known && st.covers != nil {
			st.covers[f] = true
		}
	}
	return st
}

// strictFields are the fields whose folded value comes from a change the
// in-doubt write carried: those merge under the in-doubt rules.
func strictFields(cs []openChange, doubt *inDoubtWrite) map[string]bool {
	if doubt == nil {
		return nil
	}
	from := map[string]int64{}
	for _, c := range cs {
		for f := range c.fields {
			from[f] = c.id
		}
	}
	strict := map[string]bool{}
	for f, id := range from {
		// Without a readable request, every change may have been in it.
		if doubt.Method == "" || slices.Contains(doubt.ChangeIDs, id) {
			strict[f] = true
		}
	}
	return strict
}

// reviewNeeded explains why c must wait for a person, or returns "".
func reviewNeeded(c openChange, m mergeResult) string {
	for _, f := range slices.Sorted(maps.Keys(c.fields)) {
		if m.decisions[f] == NeedsReview {
			return m.reasons[f]
		}
	}
	return ""
}

// write sends the fields: PATCH with just them, or PUT of the known
// representation with them applied. base is what the write is made
// against when it is not the stored snapshot (after a merge), kept with
// the write if its outcome turns out unknown.
func (a *applier) write(ctx context.Context, rr *resourceRun, live []openChange, st resourceState, fields, base map[string]any) response {
	resp := a.do(ctx, a.writeRequest(rr, live, st, fields))
	a.count(rr, live, resp, base)
	return resp
}

// writeMerged is write for the fields of a merge: if its outcome is
// unknown, the in-doubt write is marked merged, so that its changes end
// merged (as their merges row says) once it is known to have landed.
func (a *applier) writeMerged(ctx context.Context, rr *resourceRun, live []openChange, st resourceState, fields, base map[string]any) response {
	resp := a.write(ctx, rr, live, st, fields, base)
	if resp.unknown && rr.inDoubt != nil {
		rr.inDoubt.Merged = true
	}
	return resp
}

// writeRequest is the update of fields against st: PATCH with just them,
// or PUT of st's document with them applied, with st's ETag.
func (a *applier) writeRequest(rr *resourceRun, live []openChange, st resourceState, fields map[string]any) request {
	body := fields
	if a.t.UpdateMethod == http.MethodPut {
		body = applyFields(st.snapshot, fields)
	}
	return request{
		method: a.t.UpdateMethod, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(live),
		ifMatch: st.etag, body: body, idemKey: true,
	}
}

// succeed records a successful write. With merge decisions, each change
// ends merged or noop by what the merge did with its fields (see settle).
func (a *applier) succeed(rr *resourceRun, live []openChange, resp response, st resourceState, written map[string]any, decisions map[string]Decision, doubt *inDoubtWrite) {
	if resp.etag == "" {
		// Written, but with no ETag to write with next time: the next
		// write GETs one first.
		rr.setState(resourceState{snapshot: nil})
	} else {
		snap, covers := a.newSnapshot(resp, st, written)
		rr.setState(resourceState{etag: resp.etag, snapshot: snap, covers: covers})
	}
	if decisions == nil {
		rr.finish(live, statusApplied, "", resp.etag)
		return
	}
	a.settle(rr, live, decisions, resp.etag, doubt)
}

// settle ends merged changes: merged when a value of theirs was written or
// set aside by a policy (outcome_detail names the fields kept from the
// remote), noop only when the remote already held every value, applied
// when that value is there because the change's own in-doubt write (doubt)
// landed.
func (a *applier) settle(rr *resourceRun, live []openChange, decisions map[string]Decision, etag string, doubt *inDoubtWrite) {
	for _, c := range live {
		took := false
		var kept []string
		for f := range c.fields {
			switch decisions[f] {
			case TookOurs:
				took = true
			case KeptTheirs:
				kept = append(kept, f)
			}
		}
		switch {
		case !took && len(kept) == 0 && doubt != nil && slices.Contains(doubt.ChangeIDs, c.id):
			// Its in-doubt write landed: the remote shows every value.
			if doubt.Merged {
				rr.finishDetail([]openChange{c}, statusMerged, "", "", mergedDoubtDetail)
				continue
			}
			rr.finishDetail([]openChange{c}, statusApplied, "", "", "written by an earlier request whose answer was lost; the remote shows its values")
		case len(kept) > 0:
			rr.finishDetail([]openChange{c}, statusMerged, "", etag, keptDetail(a.t, kept))
		case took:
			rr.finish([]openChange{c}, statusMerged, "", etag)
		default:
			rr.finishDetail([]openChange{c}, statusNoop, "", "", "nothing sent: the remote already held these values")
		}
	}
}

// newSnapshot is the merge base after a successful write, and the fields
// it covers (nil: all). A response body is trusted as the new
// representation only if it shows what was written (CouchDB, say, answers
// a PUT with {"ok","id","rev"}, which is no document). Otherwise a PUT's
// base is the body it sent, and a PATCH's the old base with the fields
// applied; with no old base it stays unknown rather than becoming a partial
// one that would make every other field look changed by the remote.
func (a *applier) newSnapshot(resp response, st resourceState, written map[string]any) (map[string]any, map[string]bool) {
	if resp.body != nil && shows(resp.body, written) {
		return resp.body, nil
	}
	if st.snapshot == nil && a.t.UpdateMethod != http.MethodPut {
		return nil, nil
	}
	var covers map[string]bool
	if st.covers != nil {
		covers = maps.Clone(st.covers)
		for f := range written {
			covers[f] = true
		}
	}
	return applyFields(st.snapshot, written), covers
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
// retry later, and so do 401 and 407 (the credential was refused: the gate
// paused the target, and the changes wait for the pause's end like
// throttled ones); any other status means the remote refused the change.
//
// 403 is the change's: Forbidden names a credential the remote knows but
// that may not touch this resource (record-level permissions, another
// organisation's record), so pausing the target for it would let one
// protected record stop every change. A credential that may touch nothing
// ends each change rejected with words that say so, and target_health
// counts 403 as a failure of the target.
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
	if resp.status == 0 || retryableStatus(resp.status) || credentialRefused(resp.status) {
		return a.retryLater(rr, live, resp)
	}
	reason := refusalText(resp)
	if resp.status == http.StatusNotFound {
		rr.rejectNotFound(live, reason)
		return true
	}
	rr.finish(live, statusRejected, reason, "")
	return true
}

// refusalText is the last_error of a change the remote refused: the
// request and the remote's answer, and for the answers that are about the
// resource, the URL or the setup rather than the change's values, what
// happened and what to do.
func refusalText(resp response) string {
	reason := errText(resp.err)
	method, url := resp.req.method, resp.req.url
	if reason == "" {
		reason = fmt.Sprintf("%s %s: unexpected status %d", method, url, resp.status)
	}
	var advice string
	switch s := resp.status; {
	case s >= 300 && s < 400:
		to := resp.location
		if to == "" {
			to = "an address it did not name"
		}
		reason = fmt.Sprintf("%s %s: %d %s", method, url, s, http.StatusText(s))
		advice = fmt.Sprintf("the remote answered with a redirect to %s; stagesync never follows redirects (they would carry the credential and the body elsewhere): set base_url to the address the remote redirects to", to)
	case s == http.StatusNotFound && method != http.MethodGet:
		advice = "the resource does not exist on the remote (deleted since stagesync last saw it, or item_path is wrong): stage a change with op create to make it again"
	case s == http.StatusGone:
		advice = "the remote says the resource is gone for good: stage a change with op create if it should exist again"
	case s == http.StatusForbidden:
		advice = "the remote knows the credential, but it may not change this resource: check the credential's permissions for it on the remote, then requeue the change (include_rejected)"
	case s == http.StatusMethodNotAllowed:
		advice = fmt.Sprintf("the remote does not allow %s at this URL", method)
		if resp.allow != "" {
			advice += " (Allow: " + resp.allow + ")"
		}
		switch method {
		case http.MethodPatch:
			advice += "; if it takes PUT of the whole document, set update_method: PUT; else check item_path"
		case http.MethodPut:
			advice += "; if it takes PATCH, set update_method: PATCH; else check item_path"
		default:
			advice += "; check item_path"
		}
	case s == http.StatusUnsupportedMediaType:
		advice = "the remote refused the body's media type: stagesync sends Content-Type: application/json (a JSON merge patch), and this remote wants another"
	}
	if advice == "" {
		return reason
	}
	return reason + " — " + advice
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
			o.status, o.errText = statusDead, a.givenUpText(resp, reason)
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
// unreachable remote exhausts the budget like failed writes do. When the
// whole representation is stored, the GET is conditional (If-None-Match:
// the stored ETag), and a 304 comes back as the stored representation.
func (a *applier) fetch(ctx context.Context, rr *resourceRun, live []openChange) response {
	req := request{method: http.MethodGet, resourceID: rr.id, url: a.r.itemURL(rr.id), changeIDs: changeIDs(live)}
	st := rr.state
	if st.etag != "" && st.snapshot != nil && st.covers == nil && !st.deleted {
		req.ifNoneMatch = st.etag
	}
	resp := a.do(ctx, req)
	if resp.outboxID != 0 {
		rr.outboxIDs = append(rr.outboxIDs, resp.outboxID)
	}
	if resp.notSent {
		return resp
	}
	rr.attempts = append(rr.attempts, resp.attempt)
	if resp.status == http.StatusNotModified && req.ifNoneMatch != "" {
		resp = notModified(resp, st)
	}
	if resp.status != http.StatusOK && resp.status != http.StatusNotFound {
		for _, c := range live {
			rr.outcome(c.id).addAttempts++
		}
	}
	return resp
}

// count records a write request and counts it for each change it carried.
// A write whose outcome is unknown makes the resource in doubt; base is
// what it was made against when that is not the stored snapshot.
func (a *applier) count(rr *resourceRun, live []openChange, resp response, base map[string]any) {
	if resp.outboxID != 0 {
		rr.outboxIDs = append(rr.outboxIDs, resp.outboxID)
	}
	if resp.notSent {
		return
	}
	rr.attempts = append(rr.attempts, resp.attempt)
	for _, c := range live {
		rr.outcome(c.id).addAttempts++
	}
	if resp.unknown {
		rr.setDoubt(inDoubtFrom(resp.req, base, resp.attempt.at))
	}
}

// notModified is a 304's meaning: the stored representation is the
// remote's current one (its ETag is the one the 304 names, or the one
// asked about). After a conflict on that very ETag the remote contradicts
// itself (a weak ETag compared strongly in If-Match, say):
// refusesOwnETag then ends the changes with the reason instead of writing
// again and again.
func notModified(resp response, st resourceState) response {
	resp.status = http.StatusOK
	if resp.etag == "" {
		resp.etag = st.etag
	}
	resp.body = maps.Clone(st.snapshot)
	resp.rawBody = nil
	return resp
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

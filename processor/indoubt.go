package processor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"time"
)

// inDoubtWrite is a write that may have reached the remote without its
// answer being recorded (stagesync.resources.in_doubt): a timeout or a
// dropped connection after the request was written, or a durable intent
// left over by a process or database session that ended first. The next
// worker of the resource resolves it before anything else.
type inDoubtWrite struct {
	Method string `json:"method"`
	URL    string `json:"url"`
	// IfMatch is readable; IfMatchRaw (base64 in JSON) holds the exact
	// bytes when they are not valid UTF-8.
	IfMatch        string         `json:"if_match,omitempty"`
	IfMatchRaw     []byte         `json:"if_match_raw,omitempty"`
	IfNoneMatch    string         `json:"if_none_match,omitempty"`
	IdempotencyKey string         `json:"idempotency_key,omitempty"`
	Body           map[string]any `json:"body,omitempty"`
	// Base is the representation the write was made against, when known
	// and other than the stored snapshot (a write after a merge).
	Base      map[string]any `json:"base,omitempty"`
	ChangeIDs []int64        `json:"change_ids"`
	At        time.Time      `json:"at"`
	// Merged marks a write made after a conflict's merge, whose merges row
	// was recorded with it: its changes end merged once it is known to
	// have landed, not applied. (A leftover outbox row never has it: the
	// recording that would have kept the merges row was lost with it.)
	Merged bool `json:"merged,omitempty"`
}

// inDoubtFrom describes an unknown write for stagesync.resources.in_doubt.
func inDoubtFrom(req request, base map[string]any, at time.Time) *inDoubtWrite {
	w := &inDoubtWrite{
		Method: req.method, URL: req.url, IfNoneMatch: req.ifNoneMatch, IdempotencyKey: req.key,
		ChangeIDs: slices.Clone(req.changeIDs), Base: base, At: at,
	}
	w.setIfMatch(req.ifMatch)
	if m, ok := req.body.(map[string]any); ok {
		w.Body = m
	}
	return w
}

func (w *inDoubtWrite) setIfMatch(e string) {
	w.IfMatch, w.IfMatchRaw = storedETag(e)
}

func (w *inDoubtWrite) ifMatch() string {
	if w.IfMatchRaw != nil {
		return string(w.IfMatchRaw)
	}
	return w.IfMatch
}

// request is the in-doubt request, to send again exactly: a remote that
// honours Idempotency-Key replays its answer, one that does not answers by
// If-Match.
func (w *inDoubtWrite) request(resourceID string) request {
	req := request{
		method: w.Method, resourceID: resourceID, url: w.URL, changeIDs: w.ChangeIDs,
		ifMatch: w.ifMatch(), ifNoneMatch: w.IfNoneMatch, key: w.IdempotencyKey,
	}
	if w.Body != nil {
		req.body = w.Body
	}
	return req
}

// explains reports whether a remote value of f is accounted for by this
// write: the value it sent, or (for a field it sent) the value it was made
// against, which no one has changed since.
func (w *inDoubtWrite) explains(f string, v any, has bool) bool {
	bv, sent := w.Body[f]
	if !sent {
		return false
	}
	if w.Method == http.MethodPatch && bv == nil {
		// A JSON merge patch's null removes the field.
		if !has {
			return true
		}
	} else if has && jsonEqual(bv, v) {
		return true
	}
	if w.Base != nil {
		baseV, baseHas := w.Base[f]
		return sameValue(baseV, baseHas, v, has)
	}
	return false
}

// encode is the in_doubt column's value; "" stands for NULL.
func (w *inDoubtWrite) encode() (string, error) {
	if w == nil {
		return "", nil
	}
	c := *w
	if c.Body != nil {
		c.Body, _ = pgSafe(c.Body).(map[string]any)
	}
	if c.Base != nil {
		c.Base, _ = pgSafe(c.Base).(map[string]any)
	}
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("encode in-doubt write: %w", err)
	}
	if len(b) > 2*maxSnapshotBytes && c.Base != nil {
		// The base is a refinement; the request itself must be kept.
		c.Base = nil
		if b, err = json.Marshal(c); err != nil {
			return "", fmt.Errorf("encode in-doubt write: %w", err)
		}
	}
	return string(b), nil
}

// decodeInDoubt reads the in_doubt column. One that can't be read still
// means a write may have landed: it comes back with no request to resend,
// and the resource is resolved by reading it.
func decodeInDoubt(raw []byte) *inDoubtWrite {
	if len(raw) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var w inDoubtWrite
	if err := dec.Decode(&w); err != nil || w.Method == "" {
		return &inDoubtWrite{}
	}
	return &w
}

// verification is a resolved doubt waiting for the resource's first
// write: the remote's state after the in-doubt write, and what stagesync
// knew before it.
type verification struct {
	doubt *inDoubtWrite
	base  mergeBase
	cur   response
}

// resolveInDoubt settles an in-doubt write before anything else is sent
// for the resource (no batch lookup, no write with a stored ETag). It sends
// the very same request again while any change it carried is still open:
// 2xx means it is written now (or its answer was replayed); a conflict
// means the remote moved on, so the resource is read and its first write
// merges under the in-doubt rules (see merge). Without an open change to
// resend, or after a conflict, a GET decides. It returns the changes left
// to apply and whether to go on.
func (a *applier) resolveInDoubt(ctx context.Context, rr *resourceRun, live []openChange) ([]openChange, bool) {
	d := rr.inDoubt
	open := d.carried(live)
	if len(open) > 0 && d.Method != "" {
		resp := a.do(ctx, d.request(rr.id))
		a.count(rr, open, resp, d.Base)
		switch {
		case resp.notSent:
			// Paused (a retry at its end) or the job is stopping.
			return nil, a.failure(rr, open, resp)
		case resp.status >= 200 && resp.status < 300,
			resp.status == http.StatusNotFound && d.Method == http.MethodDelete:
			rr.setDoubt(nil)
			if d.Method == http.MethodDelete {
				rr.setState(resourceState{deleted: true})
				rr.finish(open, statusApplied, "", "")
			} else {
				if resp.etag == "" {
					// Written, but the next write needs an ETag a GET brings.
					rr.setState(resourceState{snapshot: resp.body})
				} else {
					snap, covers := a.newSnapshot(resp, rr.state, d.Body)
					rr.setState(resourceState{etag: resp.etag, snapshot: snap, covers: covers})
				}
				if d.Merged {
					rr.finishDetail(open, statusMerged, "", resp.etag, mergedDoubtDetail)
				} else {
					rr.finish(open, statusApplied, "", resp.etag)
				}
			}
			return without(live, open), true
		case a.t.isConflict(resp.status), resp.status == http.StatusPreconditionFailed && d.IfNoneMatch == "*":
			// Read below.
		case resp.status == 0 || retryableStatus(resp.status):
			// Still unknown (or the remote is failing): try again later.
			return nil, a.failure(rr, open, resp)
		default:
			// Refused as invalid: the write never took effect.
			rr.setDoubt(nil)
			a.failure(rr, open, resp)
			return without(live, open), true
		}
	}
	cur := a.fetch(ctx, rr, live)
	switch {
	case cur.notSent:
		return nil, a.failure(rr, live, cur)
	case cur.status == http.StatusNotFound:
		rr.setDoubt(nil)
		rr.setState(resourceState{deleted: true})
		if d.Method == http.MethodDelete {
			// The delete landed (or someone else deleted it): either way
			// the resource is gone, as the change wanted.
			rr.finish(open, statusApplied, "", "")
			return without(live, open), true
		}
		return live, true
	case cur.status != http.StatusOK:
		return nil, a.failure(rr, live, cur)
	case cur.etag == "":
		a.noETag(rr, live, cur)
		return nil, true
	case a.refusesOwnETag(rr, live, d.ifMatch(), cur):
		return nil, true
	}
	prior := rr.state.base()
	rr.setDoubt(nil)
	rr.setState(a.stateFrom(cur))
	if d.Method != http.MethodDelete {
		// The first write merges under the in-doubt rules; a delete that
		// did not land is simply sent again with the fresh ETag.
		rr.verify = &verification{doubt: d, base: prior, cur: cur}
	}
	return live, true
}

// mergedDoubtDetail is the outcome_detail of a change whose merged write's
// answer was lost and which is now known to have landed.
const mergedDoubtDetail = "written after a merge by an earlier request whose answer was lost; the remote shows its values (the merges row has the decisions)"

// carried returns the changes of live that the in-doubt write carried.
func (w *inDoubtWrite) carried(live []openChange) []openChange {
	var open []openChange
	for _, c := range live {
		if slices.Contains(w.ChangeIDs, c.id) {
			open = append(open, c)
		}
	}
	return open
}

// without returns live minus the changes in done.
func without(live, done []openChange) []openChange {
	out := make([]openChange, 0, len(live))
	for _, c := range live {
		if !slices.ContainsFunc(done, func(d openChange) bool { return d.id == c.id }) {
			out = append(out, c)
		}
	}
	return out
}

package remotesim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// Fixed bodies, encoded once.
var (
	bodyNotFound           = []byte(`{"error":"not found"}`)
	bodyMethodNotAllowed   = []byte(`{"error":"method not allowed"}`)
	bodyIfMatchRequired    = []byte(`{"error":"If-Match required"}`)
	bodyIDReadOnly         = []byte(`{"error":"id is read-only"}`)
	bodyNotObject          = []byte(`{"error":"body must be a JSON object"}`)
	bodyTooLarge           = []byte(`{"error":"body too large"}`)
	bodyIDsRequired        = []byte(`{"error":"ids required"}`)
	bodyRateLimited        = []byte(`{"error":"rate limited"}`)
	bodyInternalError      = []byte(`{"error":"internal error"}`)
	bodyServiceUnavailable = []byte(`{"error":"service unavailable"}`)
	bodyNestedBatch        = []byte(`{"error":"a $batch item cannot be another $batch"}`)
)

// invalidValue is the field value the Sim rejects with 422, so tests can provoke a
// validation failure on demand.
const invalidValue = "INVALID"

// errorBody encodes {"error": msg}.
func errorBody(msg string) []byte {
	b, _ := json.Marshal(struct { // a struct of strings always encodes
		Error string `json:"error"`
	}{msg})
	return b
}

// conflictResponse answers a stale If-Match (or a create over an existing resource) with
// the current ETag in both the header and the body, so a client can re-read or retry.
func conflictResponse(status int, msg, current string) response {
	b, _ := json.Marshal(struct { // a struct of strings always encodes
		Error string `json:"error"`
		ETag  string `json:"etag"`
	}{msg, current})
	return response{status: status, etag: current, body: b}
}

func (s *Sim) serveGet(id, ifNoneMatch string) response {
	s.mu.Lock()
	res := s.resources[id]
	if res == nil {
		s.mu.Unlock()
		return response{status: http.StatusNotFound, body: bodyNotFound}
	}
	etag, body := res.etag, res.body
	s.mu.Unlock()
	if ifNoneMatch != "" && noneMatch(ifNoneMatch, etag) {
		return response{status: http.StatusNotModified, etag: etag}
	}
	return response{status: http.StatusOK, etag: etag, body: body, item: true}
}

// ifMatchFails judges If-Match against the existing res: a stale ETag is answered
// ConflictStatus, and with StrictIfMatch a weak entity tag always 412.
func (s *Sim) ifMatchFails(res *resource, ifMatch string) (response, bool) {
	if s.opts.StrictIfMatch && strings.HasPrefix(ifMatch, "W/") {
		return conflictResponse(http.StatusPreconditionFailed, "weak entity tag in If-Match: If-Match compares strongly, so it never matches", res.etag), true
	}
	if res.etag != ifMatch {
		return conflictResponse(s.opts.ConflictStatus, "etag mismatch", res.etag), true
	}
	return response{}, false
}

// noneMatch reports whether an If-None-Match header value matches etag, so that a GET is
// answered 304: "*" matches any current representation, and each entity tag of the list
// is compared weakly (RFC 9110 §13.1.2: W/"x" matches "x").
func noneMatch(header, etag string) bool {
	want := strings.TrimPrefix(etag, "W/")
	h := header
	for {
		h = strings.TrimLeft(h, " \t,")
		if h == "" {
			return false
		}
		if h[0] == '*' {
			return true
		}
		h = strings.TrimPrefix(h, "W/")
		if h == "" || h[0] != '"' {
			return false // malformed: matches nothing
		}
		end := strings.IndexByte(h[1:], '"')
		if end < 0 {
			return false
		}
		if h[:end+2] == want {
			return true
		}
		h = h[end+2:]
	}
}

// servePatch merges the body into the resource. Preconditions are judged before the body,
// as RFC 9110 §13.2.1 orders it: 413, 428, 404, stale ETag, then 400 and 422.
func (s *Sim) servePatch(x *exchange) {
	if x.tooLarge {
		x.resp = response{status: http.StatusRequestEntityTooLarge, body: bodyTooLarge}
		return
	}
	if x.rec.IfMatch == "" {
		x.resp = response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}
		return
	}
	fields, invalid := parseFields(x.body, x.id)

	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[x.id]
	if res == nil {
		x.resp = response{status: http.StatusNotFound, body: bodyNotFound}
		return
	}
	if x.resp, x.conflict = s.ifMatchFails(res, x.rec.IfMatch); x.conflict {
		return
	}
	if invalid != nil {
		x.resp = *invalid
		return
	}
	v := s.commitLocked(x.id, merge(res.fields, fields), fields, writerAPI, http.MethodPatch)
	x.committed = &v
	x.resp = response{status: http.StatusOK, etag: v.ETag, body: res.body, item: true}
}

// servePut creates the resource (If-None-Match: *) or replaces all its fields (If-Match).
func (s *Sim) servePut(x *exchange) {
	if x.tooLarge {
		x.resp = response{status: http.StatusRequestEntityTooLarge, body: bodyTooLarge}
		return
	}
	create := x.rec.IfNoneMatch == "*"
	if !create && x.rec.IfMatch == "" {
		x.resp = response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}
		return
	}
	// PUT replaces: a null is stored as a value, not treated as a removal.
	fields, invalid := parseFields(x.body, x.id)

	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[x.id]
	status := http.StatusOK
	switch {
	case create && res != nil:
		x.resp, x.conflict = conflictResponse(http.StatusPreconditionFailed, "resource exists", res.etag), true
		return
	case create:
		status = http.StatusCreated
	case res == nil:
		x.resp = response{status: http.StatusNotFound, body: bodyNotFound}
		return
	default:
		if x.resp, x.conflict = s.ifMatchFails(res, x.rec.IfMatch); x.conflict {
			return
		}
	}
	if invalid != nil {
		x.resp = *invalid
		return
	}
	v := s.commitLocked(x.id, fields, fields, writerAPI, http.MethodPut)
	x.committed = &v
	x.resp = response{status: status, etag: v.ETag, body: s.resources[x.id].body, item: true}
}

func (s *Sim) serveDelete(x *exchange) {
	if x.rec.IfMatch == "" {
		x.resp = response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[x.id]
	if res == nil {
		x.resp = response{status: http.StatusNotFound, body: bodyNotFound}
		return
	}
	if x.resp, x.conflict = s.ifMatchFails(res, x.rec.IfMatch); x.conflict {
		return
	}
	v := s.deleteLocked(x.id, writerAPI)
	x.committed = &v
	x.resp = response{status: http.StatusNoContent}
}

// batchEntry is one resource found by a batch GET, copied out of the lock.
type batchEntry struct {
	id, etag string
	fields   map[string]any // immutable once stored
}

// serveBatchGet answers GET ItemPrefix?ids=a,b,c&fields=id,etag,owner with the requested
// fields of the resources that exist, in the requested order. Ids are split on "," after
// query decoding, so an id containing a comma cannot be asked for in a batch. Repeated ids
// are answered once. In fields, "id" and "etag" name the id and the current ETag and other
// names select resource fields (absent from an item that lacks them); without fields, or
// with "*" among them, each item is its whole representation plus "id" and "etag" (the
// ETag wins over a resource field named "etag").
func (s *Sim) serveBatchGet(q url.Values, mb *misbehavior) response {
	idsParam, ok := q["ids"]
	if !ok {
		return response{status: http.StatusBadRequest, body: bodyIDsRequired}
	}
	var ids []string
	for _, p := range idsParam {
		for id := range strings.SplitSeq(p, ",") {
			if id != "" {
				ids = append(ids, id)
			}
		}
	}
	if len(ids) > maxBatchIDs {
		return response{status: http.StatusBadRequest, body: errorBody(fmt.Sprintf("too many ids: %d > %d", len(ids), maxBatchIDs))}
	}
	var want []string // nil: the whole representation
	if f := q.Get("fields"); f != "" {
		for name := range strings.SplitSeq(f, ",") {
			name = strings.TrimSpace(name)
			if name == "*" {
				want = nil
				break
			}
			if name != "" {
				want = append(want, name)
			}
		}
	}

	found := make([]batchEntry, 0, len(ids))
	s.mu.Lock()
	for i, id := range ids {
		if slices.Contains(ids[:i], id) {
			continue
		}
		if res := s.resources[id]; res != nil && !(mb.OmitFromBatchLookup && mb.appliesTo(id)) {
			found = append(found, batchEntry{id: id, etag: res.etag, fields: res.fields})
		}
	}
	s.mu.Unlock()

	out := make([]map[string]any, len(found))
	for i, e := range found {
		if want == nil {
			m := make(map[string]any, len(e.fields)+2)
			for k, v := range e.fields {
				m[k] = v
			}
			m["id"], m["etag"] = e.id, e.etag
			if mb.HugeNumberField != "" && mb.appliesTo(e.id) {
				m[mb.HugeNumberField] = json.Number(HugeNumber)
			}
			out[i] = m
			continue
		}
		m := make(map[string]any, len(want))
		for _, name := range want {
			switch name {
			case "id":
				m["id"] = e.id
			case "etag":
				m["etag"] = e.etag
			case mb.HugeNumberField:
				if mb.appliesTo(e.id) {
					m[name] = json.Number(HugeNumber)
				} else if v, ok := e.fields[name]; ok {
					m[name] = v
				}
			default:
				if v, ok := e.fields[name]; ok {
					m[name] = v
				}
			}
		}
		out[i] = m
	}
	body, err := json.Marshal(out)
	if err != nil {
		return response{status: http.StatusInternalServerError, body: errorBody(err.Error())}
	}
	return response{status: http.StatusOK, body: body}
}

// readBody reads the request body up to limit; tooLarge reports a larger body.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) (raw []byte, tooLarge bool) {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		_, tooLarge = errors.AsType[*http.MaxBytesError](err)
		// A broken body is reported as a malformed one by parseFields.
		return nil, tooLarge
	}
	return raw, false
}

// parseFields decodes a JSON object body and validates it against the path id. The
// returned response is the 400 or 422 to send if the body is unacceptable. A matching "id"
// field is dropped: the id lives in the path.
func parseFields(raw []byte, id string) (map[string]any, *response) {
	var fields map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&fields); err != nil || fields == nil {
		return nil, &response{status: http.StatusBadRequest, body: bodyNotObject}
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &response{status: http.StatusBadRequest, body: bodyNotObject}
	}
	if v, ok := fields["id"]; ok {
		if v != id {
			return nil, &response{status: http.StatusUnprocessableEntity, body: bodyIDReadOnly}
		}
		delete(fields, "id")
	}
	var bad []string
	for k, v := range fields {
		if v == invalidValue {
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		// The first in sorted order, so the same body is always rejected the same way.
		k := slices.Min(bad)
		return nil, &response{status: http.StatusUnprocessableEntity, body: errorBody(fmt.Sprintf("field %s: value %s is not allowed", k, invalidValue))}
	}
	return fields, nil
}

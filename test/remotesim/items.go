package remotesim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
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
	if ifNoneMatch != "" && ifNoneMatch == etag {
		return response{status: http.StatusNotModified, etag: etag}
	}
	return response{status: http.StatusOK, etag: etag, body: body}
}

// servePatch merges the body into the resource. Preconditions are judged before the body,
// as RFC 9110 §13.2.1 orders it: 413, 428, 404, stale ETag, then 400 and 422.
func (s *Sim) servePatch(w http.ResponseWriter, r *http.Request, id string) (response, bool) {
	raw, tooLarge := readBody(w, r, s.opts.MaxBodyBytes)
	if tooLarge != nil {
		return *tooLarge, false
	}
	ifMatch := r.Header.Get("If-Match")
	if ifMatch == "" {
		return response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}, false
	}
	fields, invalid := parseFields(raw, id)

	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[id]
	if res == nil {
		return response{status: http.StatusNotFound, body: bodyNotFound}, false
	}
	if res.etag != ifMatch {
		return conflictResponse(s.opts.ConflictStatus, "etag mismatch", res.etag), true
	}
	if invalid != nil {
		return *invalid, false
	}
	etag := s.commitLocked(id, merge(res.fields, fields), writerAPI, http.MethodPatch)
	return response{status: http.StatusOK, etag: etag, body: res.body}, false
}

// servePut creates the resource (If-None-Match: *) or replaces all its fields (If-Match).
func (s *Sim) servePut(w http.ResponseWriter, r *http.Request, id string) (response, bool) {
	raw, tooLarge := readBody(w, r, s.opts.MaxBodyBytes)
	if tooLarge != nil {
		return *tooLarge, false
	}
	create := r.Header.Get("If-None-Match") == "*"
	ifMatch := r.Header.Get("If-Match")
	if !create && ifMatch == "" {
		return response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}, false
	}
	// PUT replaces: a null is stored as a value, not treated as a removal.
	fields, invalid := parseFields(raw, id)

	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[id]
	if create {
		if res != nil {
			return conflictResponse(http.StatusPreconditionFailed, "resource exists", res.etag), true
		}
		if invalid != nil {
			return *invalid, false
		}
		etag := s.commitLocked(id, fields, writerAPI, http.MethodPut)
		return response{status: http.StatusCreated, etag: etag, body: s.resources[id].body}, false
	}
	if res == nil {
		return response{status: http.StatusNotFound, body: bodyNotFound}, false
	}
	if res.etag != ifMatch {
		return conflictResponse(s.opts.ConflictStatus, "etag mismatch", res.etag), true
	}
	if invalid != nil {
		return *invalid, false
	}
	etag := s.commitLocked(id, fields, writerAPI, http.MethodPut)
	return response{status: http.StatusOK, etag: etag, body: res.body}, false
}

func (s *Sim) serveDelete(id, ifMatch string) (response, bool) {
	if ifMatch == "" {
		return response{status: http.StatusPreconditionRequired, body: bodyIfMatchRequired}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[id]
	if res == nil {
		return response{status: http.StatusNotFound, body: bodyNotFound}, false
	}
	if res.etag != ifMatch {
		return conflictResponse(s.opts.ConflictStatus, "etag mismatch", res.etag), true
	}
	s.deleteLocked(id, writerAPI)
	return response{status: http.StatusNoContent}, false
}

// batchEntry is one resource found by a batch GET, copied out of the lock.
type batchEntry struct {
	id, etag string
	fields   map[string]any // immutable once stored
}

// serveBatchGet answers GET ItemPrefix?ids=a,b,c&fields=id,etag with the requested fields
// of the resources that exist, in the requested order. Ids are split on "," after query
// decoding, so an id containing a comma cannot be asked for in a batch. Repeated ids are
// answered once. fields defaults to "id,etag"; other names select resource fields.
func (s *Sim) serveBatchGet(r *http.Request) response {
	q := r.URL.Query()
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
	want := []string{"id", "etag"}
	if f := q.Get("fields"); f != "" {
		want = strings.Split(f, ",")
	}

	found := make([]batchEntry, 0, len(ids))
	s.mu.Lock()
	for i, id := range ids {
		if slices.Contains(ids[:i], id) {
			continue
		}
		if res := s.resources[id]; res != nil {
			found = append(found, batchEntry{id: id, etag: res.etag, fields: res.fields})
		}
	}
	s.mu.Unlock()

	out := make([]map[string]any, len(found))
	for i, e := range found {
		m := make(map[string]any, len(want))
		for _, name := range want {
			switch name {
			case "id":
				m["id"] = e.id
			case "etag":
				m["etag"] = e.etag
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

// readBody reads the request body up to limit; a larger body yields a 413 response.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, *response) {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, &response{status: http.StatusRequestEntityTooLarge, body: bodyTooLarge}
		}
		// A broken body is reported as a malformed one by parseFields.
		return nil, nil
	}
	return raw, nil
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

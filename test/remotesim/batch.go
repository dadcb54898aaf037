package remotesim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// batchEnvelope is the body of an OData 4.01 JSON batch request.
type batchEnvelope struct {
	Requests *[]batchItem `json:"requests"`
}

// batchItem is one request of a $batch, as sent. Header names are matched without regard
// to case.
type batchItem struct {
	ID             string            `json:"id"`
	Method         string            `json:"method"`
	URL            string            `json:"url"`
	Headers        map[string]string `json:"headers"`
	Body           json.RawMessage   `json:"body"`
	AtomicityGroup json.RawMessage   `json:"atomicityGroup"`
	DependsOn      json.RawMessage   `json:"dependsOn"`
}

// batchAnswer is the body of the answer to a $batch.
type batchAnswer struct {
	Responses []batchItemAnswer `json:"responses"`
}

// batchItemAnswer is the answer to one item of a $batch.
type batchItemAnswer struct {
	ID      string            `json:"id"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers,omitempty"`
	Body    json.RawMessage   `json:"body,omitempty"`
}

// itemRequest is a validated $batch item, routed like a single request.
type itemRequest struct {
	reqID   string // the item's "id" in the batch
	method  string
	path    string // escaped absolute path
	query   string
	headers map[string]string // lower-case names
	body    []byte
	kind    kind
	id      string
	resp    response // the 404 or 405 of an unroutable item
}

// serveBatch answers a $batch POST into x.resp: it reads and validates the whole batch
// (400, 413), then runs each item in order exactly as a single request (faults, idempotency
// cache, ETag checks, AfterCommitFunc), and answers 200 with the items' answers.
func (s *Sim) serveBatch(w http.ResponseWriter, r *http.Request, x *exchange) {
	limit := s.opts.MaxBodyBytes * int64(s.opts.MaxBatchRequests)
	raw, tooLarge := readBody(w, r, limit)
	if tooLarge {
		x.resp = response{status: http.StatusRequestEntityTooLarge, body: errorBody(fmt.Sprintf("batch body larger than %d bytes", limit))}
		return
	}
	items, problem := s.parseBatch(raw)
	if problem != nil {
		x.resp = *problem
		return
	}

	// Every item is in flight from now until it is done, so that two batches (or a batch and
	// a single request) touching one resource at once show in MaxInFlightPerResource.
	s.mu.Lock()
	for _, it := range items {
		if it.id != "" {
			n := s.inflight[it.id] + 1
			s.inflight[it.id] = n
			s.stats.MaxInFlightPerResource = max(s.stats.MaxInFlightPerResource, n)
		}
	}
	s.mu.Unlock()

	answers := make([]batchItemAnswer, 0, len(items))
	for i := range items {
		if a, ok := s.serveBatchItem(r.Context(), x, &items[i]); ok {
			answers = append(answers, a)
		}
	}
	if s.opts.ShuffleBatchResponses {
		s.mu.Lock()
		s.rng.Shuffle(len(answers), func(i, j int) { answers[i], answers[j] = answers[j], answers[i] })
		s.mu.Unlock()
	}
	body, err := json.Marshal(batchAnswer{Responses: answers})
	if err != nil {
		x.resp = response{status: http.StatusInternalServerError, body: errorBody(err.Error())}
		return
	}
	x.resp = response{status: http.StatusOK, body: body}
}

// parseBatch decodes and validates a $batch body. A problem with any item refuses the whole
// batch, naming the item, before anything is applied.
func (s *Sim) parseBatch(raw []byte) ([]itemRequest, *response) {
	bad := func(format string, args ...any) *response {
		return &response{status: http.StatusBadRequest, body: errorBody(fmt.Sprintf(format, args...))}
	}
	var env batchEnvelope
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&env); err != nil || env.Requests == nil {
		return nil, bad(`batch body must be a JSON object with a "requests" array`)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, bad(`batch body must be a JSON object with a "requests" array`)
	}
	reqs := *env.Requests
	if len(reqs) > s.opts.MaxBatchRequests {
		return nil, &response{status: http.StatusRequestEntityTooLarge, body: errorBody(fmt.Sprintf("too many requests in batch: %d > %d", len(reqs), s.opts.MaxBatchRequests))}
	}
	items := make([]itemRequest, len(reqs))
	seen := make(map[string]bool, len(reqs))
	for i, it := range reqs {
		switch {
		case it.ID == "":
			return nil, bad("requests[%d]: id required", i)
		case seen[it.ID]:
			return nil, bad("request id %q appears more than once", it.ID)
		case it.AtomicityGroup != nil:
			return nil, bad("request %q: atomicityGroup is not supported: each request stands alone", it.ID)
		case it.DependsOn != nil:
			return nil, bad("request %q: dependsOn is not supported: each request stands alone", it.ID)
		case it.Method == "":
			return nil, bad("request %q: method required", it.ID)
		case it.URL == "":
			return nil, bad("request %q: url required", it.ID)
		}
		seen[it.ID] = true
		headers := make(map[string]string, len(it.Headers))
		for k, v := range it.Headers {
			lk := strings.ToLower(k)
			if _, dup := headers[lk]; dup {
				return nil, bad("request %q: header %q given more than once", it.ID, lk)
			}
			headers[lk] = v
		}
		ir := itemRequest{reqID: it.ID, method: strings.ToUpper(it.Method), headers: headers}
		ir.path, ir.query = s.itemTarget(it.URL)
		if len(it.Body) > 0 && !bytes.Equal(it.Body, []byte("null")) {
			ir.body = it.Body
		}
		ir.kind, ir.id, ir.resp = s.route(ir.method, ir.path)
		if ir.path == s.batchPath {
			ir.kind, ir.resp = kindNone, response{status: http.StatusBadRequest, body: bodyNestedBatch}
		}
		items[i] = ir
	}
	return items, nil
}

// itemTarget splits an item's url into the escaped absolute path and the query. A url may
// be absolute ("http://host/items/a"), an absolute path ("/items/a"), or relative to the
// service root, the folder of BatchPath ("items/a"). Dot segments are not resolved, as for
// single requests, so "items/../x" is no item.
func (s *Sim) itemTarget(raw string) (path, query string) {
	if i := strings.IndexByte(raw, '#'); i >= 0 {
		raw = raw[:i]
	}
	if l := strings.ToLower(raw); strings.HasPrefix(l, "http://") || strings.HasPrefix(l, "https://") {
		if u, err := url.Parse(raw); err == nil {
			return u.EscapedPath(), u.RawQuery
		}
	}
	path, query, _ = strings.Cut(raw, "?")
	if !strings.HasPrefix(path, "/") {
		path = s.batchRoot + path
	}
	return path, query
}

// serveBatchItem runs one item of the $batch post as a request of its own, logged and
// counted like one. It reports false when the item's answer is left out.
func (s *Sim) serveBatchItem(ctx context.Context, post *exchange, it *itemRequest) (batchItemAnswer, bool) {
	x := exchange{
		kind: it.kind, id: it.id, resp: it.resp, body: it.body, inflight: it.id != "", item: true,
		mb: post.mb, auth: post.auth,
		rec: Request{
			Method: it.method, Path: it.path, ID: it.id,
			IfMatch: it.headers["if-match"], IfNoneMatch: it.headers["if-none-match"],
			IdempotencyKey: it.headers["idempotency-key"], Authorization: post.rec.Authorization,
			Batch: post.rec.Batch, BatchItem: it.reqID, Start: time.Now(),
		},
	}
	x.tooLarge = int64(len(x.body)) > s.opts.MaxBodyBytes

	s.mu.Lock()
	x.rec.Fault = s.drawItemFaultLocked(x.kind)
	x.slot = s.log.reserve(&x.rec)
	s.mu.Unlock()

	switch x.rec.Fault {
	case faultError:
		x.resp = s.errorFault()
	case faultRateLimit:
		x.resp = response{status: http.StatusTooManyRequests, body: bodyRateLimited, retryAfter: true}
	case faultMissing:
		// Left out before it touched state.
	default:
		if x.kind == kindBatchGet {
			q, err := url.ParseQuery(it.query)
			if err != nil {
				x.kind, x.resp = kindNone, response{status: http.StatusBadRequest, body: errorBody("malformed query: " + err.Error())}
				break
			}
			x.query = q
		}
		if x.kind != kindNone {
			s.apply(&x)
		}
	}
	if x.committed != nil {
		s.afterCommit(ctx, &x)
	}

	answered := true
	switch x.rec.Fault {
	case faultMissing, faultMissingApplied:
		answered = false
	case faultDropAfterCommit:
		if x.committed != nil {
			answered = false
		} else {
			x.rec.Fault = "" // nothing changed, so there is nothing to drop
		}
	}
	if answered {
		x.rec.Status = x.resp.status
	}
	x.rec.End = time.Now()
	s.finish(&x)
	if !answered {
		return batchItemAnswer{}, false
	}

	resp := present(&x, x.resp)
	a := batchItemAnswer{ID: it.reqID, Status: resp.status, Body: resp.body}
	if resp.etag != "" || resp.retryAfter || resp.body != nil {
		a.Headers = make(map[string]string, 3)
	}
	if resp.etag != "" {
		a.Headers["etag"] = resp.etag
	}
	if resp.retryAfter {
		a.Headers["retry-after"] = s.retryAfter
	}
	if resp.body != nil {
		a.Headers["content-type"] = "application/json"
	}
	return a, true
}

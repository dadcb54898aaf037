package processor

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/riverqueue/river"

	"github.com/stagesync/stagesync/db"
)

// Batch writes: the OData 4.01 JSON batch format ($batch), without
// atomicity groups, so each write in a batch stands alone.
//
// The write protocol of apply.go does not know about batches: a resource
// goroutine calls remote.do for each write and gets that write's own
// response, exactly as for a single request (status, ETag, body, attempts
// row). Below do, a target with batch_write makes the write durable (its
// outbox row, as for a single request) and queues it in the target's
// batcher. The writes waiting there leave together in one POST as soon as
//
//   - max_requests of them are waiting, or
//   - every resource goroutine of the target in this process is waiting
//     for an answer (no other write can join: the goroutines are counted
//     by applier.run), or
//   - the oldest has waited batchLinger while other goroutines of the
//     target are busy with something else (a GET after a conflict) and
//     none is about to join (writing its outbox row: those are waited
//     for, up to batchMaxLinger).
//
// The POST is one request for the gate: one in-flight slot, one share of
// the rate budget, refused as a whole while the target is paused. Writes
// waiting in the queue hold no slot, and a batch takes every write that
// joined while it waited for its slot, so batches fill while the remote is
// busy. The POST's answer is then split into each write's response, matched
// by id (answers may come in any order).
//
// Failure model, per write: its own status (409/412 → GET → merge → a new
// write, in a later batch; 422 → rejected; 429/503 → the target pauses); no
// answer for it in the batch's answer → outcome unknown (in doubt, never
// success). Per POST: a 413 halves max_requests for the target (for the
// life of the process) and the writes go again at once, within it; another
// non-200 status fails each write with it, retried as any failed write is
// (a 4xx of the batch is not the write's fault: retried, not rejected); a
// transport error once the POST was written, or an answer that can't be
// read, leaves every write's outcome unknown (in doubt).

// batchLinger is how long the oldest waiting write waits for writes of
// goroutines busy with something else (a GET after a conflict). Writes
// about to join (their outbox rows are being committed, as a group) are
// waited for: they come as soon as the commit is done, and sending without
// them would cut a batch in pieces whenever the database is slow.
// batchMaxLinger only bounds that wait, for a commit that hangs.
const (
	batchLinger    = 2 * time.Millisecond
	batchMaxLinger = 250 * time.Millisecond
)

// batchIDBlock is how many batch_requests ids one nextval hands out (the
// sequence's INCREMENT BY, migration 00011).
const batchIDBlock = 64

// batcher queues the writes of one target and sends them in batches.
type batcher struct {
	r *remote
	// url is the batch endpoint; origin is base_url's scheme://host, so
	// items are sent as absolute paths.
	url    string
	origin string
	ids    *batchIDs
	logger *slog.Logger
	// linger and maxLinger are batchLinger and batchMaxLinger (tests
	// lengthen them to make timing irrelevant).
	linger, maxLinger time.Duration

	mu sync.Mutex
	// max is the most writes per POST: max_requests, halved by each 413.
	max int
	// active counts the target's resource goroutines running in this
	// process (applier.run); joining those between the pause check and
	// the queue (writing their outbox row); inflight the writes taken into
	// a batch and not yet answered.
	active   int
	joining  int
	inflight int
	queue    []*batchCall
}

// batchCall is one write waiting in, or sent by, the batcher.
type batchCall struct {
	ctx    context.Context
	req    request
	joined time.Time
	// wake asks the goroutine waiting for this call to look again (it may
	// be the oldest now, or a batch may be due).
	wake  chan struct{}
	done  chan struct{}
	resp  response
	taken bool
}

func newBatcher(r *remote) *batcher {
	bw := r.t.BatchWrite
	b := &batcher{r: r, url: r.t.BaseURL + bw.Path, max: bw.MaxRequests, ids: &batchIDs{},
		logger: slog.New(slog.NewTextHandler(io.Discard, nil)), linger: batchLinger, maxLinger: batchMaxLinger}
	b.origin = originOf(r.t.BaseURL)
	return b
}

// originOf is a base URL's scheme://host[:port].
func originOf(base string) string {
	if u, err := url.Parse(base); err == nil && u.Host != "" {
		return u.Scheme + "://" + u.Host
	}
	return ""
}

// itemRef is how a batch item names its url: an absolute path, resolved
// against the batch request's scheme, host and port (OData 4.01 JSON §19.1)
// whatever the service root; the full URL if it is on another origin.
func itemRef(origin, u string) string {
	if p, ok := strings.CutPrefix(u, origin); ok && origin != "" && strings.HasPrefix(p, "/") {
		return p
	}
	return u
}

// attachBatch gives a batch-writing remote the process's logger and the
// database its batch ids come from. A remote without batch_write ignores
// it.
func (r *remote) attachBatch(logger *slog.Logger, conn db.DBTX) {
	if r.batch == nil {
		return
	}
	r.batch.logger = logger
	q := db.New()
	r.batch.ids.fetch = func(ctx context.Context) (int64, error) { return q.BatchRequestIDBlock(ctx, conn) }
	r.metrics.setBatchMax(r.t.Name, r.batch.max)
}

// batchable reports whether req travels in a batch: a write of one
// resource. Reads (GETs, batch lookups) are sent on their own.
func batchable(req request) bool {
	return req.method != http.MethodGet && req.resourceID != ""
}

// enter and leave count a resource goroutine of the target (applier.run),
// so the batcher knows when no other write can join a batch. Safe on a
// nil batcher.
func (b *batcher) enter() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.active++
	b.mu.Unlock()
}

func (b *batcher) leave() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.active--
	b.nudgeLocked()
	b.mu.Unlock()
}

// do sends one write in a batch and returns its own response. Like
// remote.do it refuses at once while the target is paused, and makes the
// write durable before it can leave.
func (b *batcher) do(ctx context.Context, req request) response {
	if p := b.r.gate.refusing(); p != nil {
		return response{notSent: true, err: p, req: req}
	}
	req, err := b.r.prepare(req)
	if err != nil {
		return b.r.failed(req, time.Now(), err, false)
	}
	b.mu.Lock()
	b.joining++
	b.mu.Unlock()
	id, err := req.outbox.add(ctx, b.r.t.Name, req)
	if err != nil {
		b.mu.Lock()
		b.joining--
		b.nudgeLocked()
		b.mu.Unlock()
		return response{notSent: true, err: err, req: req}
	}
	resp := b.wait(ctx, req)
	resp.outboxID = id
	return resp
}

// wait queues the write and waits for its answer. The goroutine that finds
// a batch due sends it itself, its own write first, so no goroutine of the
// batcher's own is needed: the callers' goroutines do the work.
func (b *batcher) wait(ctx context.Context, req request) response {
	c := &batchCall{ctx: ctx, req: req, joined: time.Now(), wake: make(chan struct{}, 1), done: make(chan struct{})}
	ctxDone := ctx.Done()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()

	b.mu.Lock()
	b.joining--
	b.queue = append(b.queue, c)
	for {
		var linger <-chan time.Time
		if !c.taken {
			due, after := b.dueLocked(time.Now())
			if due {
				calls := b.takeLocked(c, b.max)
				b.mu.Unlock()
				b.send(calls)
				<-c.done
				return c.resp
			}
			if b.queue[0] == c {
				// The oldest write keeps the time.
				if timer == nil {
					timer = time.NewTimer(after)
				} else {
					timer.Reset(after)
				}
				linger = timer.C
			}
		}
		b.mu.Unlock()
		select {
		case <-c.done:
			return c.resp
		case <-c.wake:
		case <-linger:
		case <-ctxDone:
			b.mu.Lock()
			if !c.taken {
				// Never sent: the job is ending.
				b.queue = slices.DeleteFunc(b.queue, func(q *batchCall) bool { return q == c })
				b.nudgeLocked()
				b.mu.Unlock()
				return response{notSent: true, err: ctx.Err(), req: req}
			}
			b.mu.Unlock()
			// Taken into a batch: its answer is what the job records.
			ctxDone = nil
		}
		b.mu.Lock()
	}
}

// dueLocked reports whether the waiting writes should leave now, or how
// long the oldest may still wait for others.
func (b *batcher) dueLocked(now time.Time) (bool, time.Duration) {
	n := len(b.queue)
	if n == 0 {
		return false, 0
	}
	if n >= b.max {
		return true, 0
	}
	// Goroutines neither queued nor waiting for an answer could still
	// write; none (or none counted, for writes outside applier.run): send.
	if b.active-n-b.inflight <= 0 {
		return true, 0
	}
	limit := b.linger
	if b.joining > 0 {
		limit = b.maxLinger
	}
	waited := now.Sub(b.queue[0].joined)
	if waited >= limit {
		return true, 0
	}
	return false, limit - waited
}

// takeLocked takes first (if it is queued) and the oldest other waiting
// writes, up to n in all, into a batch.
func (b *batcher) takeLocked(first *batchCall, n int) []*batchCall {
	var calls []*batchCall
	if first != nil && !first.taken {
		calls = append(calls, first)
		first.taken = true
	}
	keep := b.queue[:0]
	for _, q := range b.queue {
		switch {
		case q.taken:
		case len(calls) < n:
			q.taken = true
			calls = append(calls, q)
		default:
			keep = append(keep, q)
		}
	}
	clear(b.queue[len(keep):])
	b.queue = keep
	b.inflight += len(calls)
	b.nudgeLocked()
	return calls
}

// nudgeLocked wakes the oldest waiting write's goroutine to look again:
// something changed that may make a batch due, or change its deadline.
func (b *batcher) nudgeLocked() {
	if len(b.queue) == 0 {
		return
	}
	select {
	case b.queue[0].wake <- struct{}{}:
	default:
	}
}

// finish hands each call its response and counts the calls answered.
func (b *batcher) finish(calls []*batchCall, resps []response) {
	b.mu.Lock()
	b.inflight -= len(calls)
	b.nudgeLocked()
	b.mu.Unlock()
	for i, c := range calls {
		c.resp = resps[i]
		close(c.done)
	}
}

// notSent answers calls whose batch never left.
func (b *batcher) notSent(calls []*batchCall, err error) {
	resps := make([]response, len(calls))
	for i, c := range calls {
		resps[i] = response{notSent: true, err: err, req: c.req}
	}
	b.finish(calls, resps)
}

// send waits for the gate to admit one request, adds the writes that
// joined meanwhile, and posts the batch.
func (b *batcher) send(calls []*batchCall) {
	bctx := newBatchContext()
	defer bctx.stop()
	bctx.add(calls)
	b.sendAs(bctx, calls, nil)
}

// sendAs is send for calls already taken, after the envelopes in prior
// (413s) carried them.
func (b *batcher) sendAs(bctx *batchContext, calls []*batchCall, prior []*batchRecord) {
	release, err := b.r.gate.acquire(bctx.ctx)
	if err != nil {
		// The target is paused (each write is retried at its end), or
		// every job waiting for these writes has ended.
		b.notSent(calls, err)
		return
	}
	if prior == nil {
		b.mu.Lock()
		if room := b.max - len(calls); room > 0 && len(b.queue) > 0 {
			more := b.takeLocked(nil, room)
			calls = append(calls, more...)
			bctx.add(more)
		}
		b.mu.Unlock()
	}
	b.post(bctx, calls, prior, release)
}

// batchRecord is one batch POST: a stagesync.batch_requests row.
type batchRecord struct {
	id       int64 // 0: no id could be had; not recorded
	url      string
	items    int
	status   int
	duration time.Duration
	outcome  string
	errText  string
	at       time.Time
}

// Batch POST outcomes (stagesync.batch_requests.outcome).
const (
	batchAnswered       = "answered"
	batchTooLarge       = "too_large"
	batchFailed         = "failed"
	batchTransportError = "transport_error"
	batchUnknown        = "unknown"
)

// odataRequest and odataResponse are one item of a JSON batch request
// and of its answer.
type odataRequest struct {
	ID      string            `json:"id"`
	Method  string            `json:"method"`
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers,omitempty"`
	Body    json.RawMessage   `json:"body,omitempty"`
}

type odataResponse struct {
	ID      string          `json:"id"`
	Status  int             `json:"status"`
	Headers map[string]any  `json:"headers"`
	Body    json.RawMessage `json:"body"`
}

// encode builds the batch body. Items are numbered from 1 in the order of
// calls; answers are matched back by that id.
func (b *batcher) encode(calls []*batchCall) ([]byte, error) {
	items := make([]odataRequest, len(calls))
	for i, c := range calls {
		r := c.req
		h := map[string]string{}
		if r.ifMatch != "" {
			h["if-match"] = r.ifMatch
		}
		if r.ifNoneMatch != "" {
			h["if-none-match"] = r.ifNoneMatch
		}
		if r.key != "" {
			h["idempotency-key"] = r.key
		}
		it := odataRequest{ID: strconv.Itoa(i + 1), Method: r.method, URL: itemRef(b.origin, r.url), Headers: h}
		if r.payload != nil {
			h["content-type"] = "application/json"
			it.Body = r.payload
		}
		items[i] = it
	}
	return json.Marshal(map[string]any{"requests": items})
}

// post makes the HTTP exchange of one batch and answers its calls. release
// gives back the gate's slot with what the gate should observe.
func (b *batcher) post(bctx *batchContext, calls []*batchCall, prior []*batchRecord, release func(response)) {
	ctx := bctx.ctx
	env := &batchRecord{id: b.ids.take(ctx, b.logger, b.r.t.Name), url: b.url, items: len(calls)}
	travelled := append(slices.Clone(prior), env)
	payload, err := b.encode(calls)
	if err != nil {
		// Bodies were encoded once already; this can't fail in practice.
		release(response{notSent: true})
		resps := make([]response, len(calls))
		for i, c := range calls {
			resps[i] = b.r.failed(c.req, time.Now(), fmt.Errorf("encode batch: %w", err), false)
		}
		b.finish(calls, resps)
		return
	}

	rctx, cancel := context.WithTimeout(ctx, b.r.t.Timeout.D())
	defer cancel()
	var wrote, answered atomic.Bool
	rctx = httptrace.WithClientTrace(rctx, &httptrace.ClientTrace{
		WroteHeaders:         func() { wrote.Store(true) },
		GotFirstResponseByte: func() { answered.Store(true) },
	})
	hreq, err := http.NewRequestWithContext(rctx, http.MethodPost, b.url, bytes.NewReader(payload))
	if err != nil {
		release(response{notSent: true})
		b.notSent(calls, fmt.Errorf("build batch request: %w", err))
		return
	}
	// A POST without Idempotency-Key is never replayed by Go's transport;
	// a rewind after the request was written is refused all the same.
	hreq.GetBody = func() (io.ReadCloser, error) {
		if wrote.Load() && !answered.Load() {
			return nil, errNotResent
		}
		return io.NopCloser(bytes.NewReader(payload)), nil
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "application/json")
	hreq.Header.Set("OData-Version", "4.01")
	if b.r.t.Auth != nil {
		hreq.Header.Set(b.r.t.Auth.Header, b.r.t.Auth.Prefix+b.r.t.authValue)
	}

	start := time.Now()
	env.at = start
	hresp, err := b.r.client.Do(hreq)
	if err != nil {
		sent := wrote.Load()
		if !sent && ctx.Err() != nil {
			// Every job waiting for these writes ended before anything left.
			release(response{notSent: true})
			b.notSent(calls, ctx.Err())
			return
		}
		err = scrubURLError(err)
		env.duration, env.errText = time.Since(start), err.Error()
		env.outcome = batchTransportError
		if sent {
			env.outcome = batchUnknown
		}
		b.r.metrics.observeBatch(b.r.t.Name, 0, len(calls))
		resps := make([]response, len(calls))
		for i, c := range calls {
			resps[i] = b.r.failed(c.req, start, fmt.Errorf("batch POST %s: %w", b.url, err), sent)
			resps[i].attempt.batches = travelled
		}
		release(response{err: err})
		b.finish(calls, resps)
		return
	}
	defer hresp.Body.Close()
	// Read within the process's body budget like any answer, with room for
	// a representation per write, and with the credential redacted before
	// anything is decoded.
	limit := int64(maxResponseBody) + int64(len(calls))*maxSnapshotBytes
	raw, truncated, releaseBody, rerr := b.r.bodies.read(rctx, hresp.Body, hresp.ContentLength, limit)
	defer releaseBody()
	raw = b.r.t.redactBytes(raw)
	env.duration, env.status = time.Since(start), hresp.StatusCode
	b.r.metrics.observeBatch(b.r.t.Name, hresp.StatusCode, len(calls))
	reason := remoteReason(raw, hresp.Status)
	retryAfter := parseRetryAfter(hresp.Header.Get("Retry-After"), start)

	switch {
	case hresp.StatusCode == http.StatusRequestEntityTooLarge && len(calls) > 1:
		env.outcome, env.errText = batchTooLarge, fmt.Sprintf("POST %s: 413 %s", b.url, reason)
		release(response{status: hresp.StatusCode})
		// Nothing was applied: the same writes go again at once, in POSTs
		// of at most the new limit (halves of an odd batch would exceed it).
		for chunk := range slices.Chunk(calls, b.tooLarge(len(calls), reason)) {
			b.sendAs(bctx, chunk, travelled)
		}
		return

	case hresp.StatusCode < 200 || hresp.StatusCode > 299:
		// The batch as a whole was refused: no write was applied. The
		// write itself was not refused, so a status that would reject it
		// (a 4xx) is passed on as a failure to retry.
		env.outcome = batchFailed
		e := fmt.Errorf("POST %s: %d %s (the remote refused the whole batch of %d writes; this one was not applied)", b.url, hresp.StatusCode, reason, len(calls))
		if hresp.StatusCode == http.StatusRequestEntityTooLarge {
			e = fmt.Errorf("POST %s: 413 %s (the remote refuses even a batch holding only this write as too large)", b.url, reason)
		}
		env.errText = e.Error()
		status := hresp.StatusCode
		outcome := outcomeRetryable
		switch {
		case status == http.StatusRequestEntityTooLarge:
			outcome = outcomeFatal
		case credentialRefused(status):
			// The target pauses (the gate sees the POST's status) and the
			// writes wait for its end, uncounted, as for a single write.
		case !retryableStatus(status):
			status = 0
		}
		resps := make([]response, len(calls))
		for i, c := range calls {
			resps[i] = response{status: status, retryAfter: retryAfter, err: e, req: c.req,
				attempt: b.r.attempt(c.req, start, hresp.StatusCode, "", outcome, e.Error())}
			resps[i].attempt.batches = travelled
		}
		release(response{status: hresp.StatusCode, retryAfter: retryAfter, err: e})
		b.finish(calls, resps)
		return
	}

	answers, derr := decodeBatchAnswer(raw, rerr, truncated)
	env.outcome = batchAnswered
	if derr != nil {
		env.outcome, env.errText = batchUnknown, derr.Error()
	}
	resps := make([]response, len(calls))
	gateSaw := response{status: hresp.StatusCode}
	for i, c := range calls {
		id := strconv.Itoa(i + 1)
		a, ok := answers[id]
		switch {
		case derr != nil:
			resps[i] = b.r.failed(c.req, start, fmt.Errorf("batch POST %s answered %d, but %w", b.url, hresp.StatusCode, derr), true)
		case !ok || a.Status < 100 || a.Status > 599:
			resps[i] = b.r.failed(c.req, start, fmt.Errorf("batch POST %s answered %d without an answer for this write (id %s)", b.url, hresp.StatusCode, id), true)
		default:
			resps[i] = b.itemResponse(c.req, a, start)
			gateSaw = worseForGate(gateSaw, resps[i])
		}
		resps[i].attempt.batches = travelled
	}
	release(gateSaw)
	b.finish(calls, resps)
}

// worseForGate is what the gate observes of a batch: its worst item
// answer. A refused credential (401, 407) pauses the target until it is
// fixed; a throttling answer (429, 503) pauses it, the longest Retry-After
// winning; failing that, a failure of the remote (5xx) counts against its
// health; else the batch shows the remote working.
func worseForGate(seen, item response) response {
	rank := func(r response) int {
		switch {
		case credentialRefused(r.status):
			return 3
		case throttling(r.status):
			return 2
		case targetFailure(r):
			return 1
		}
		return 0
	}
	if rank(item) > rank(seen) || rank(item) == 2 && item.retryAfter > seen.retryAfter {
		return response{status: item.status, retryAfter: item.retryAfter, err: item.err}
	}
	return seen
}

// decodeBatchAnswer reads a batch's answer into its items by id; the first
// answer for an id counts.
func decodeBatchAnswer(raw []byte, readErr error, truncated bool) (map[string]odataResponse, error) {
	switch {
	case readErr != nil:
		return nil, fmt.Errorf("its answer could not be read (%v): the outcome of its writes is unknown", readErr)
	case truncated:
		return nil, errors.New("its answer is larger than stagesync reads: the outcome of its writes is unknown")
	}
	var body struct {
		Responses []odataResponse `json:"responses"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&body); err != nil || body.Responses == nil {
		return nil, errors.New(`its answer is not a JSON batch answer ({"responses": [...]}): the outcome of its writes is unknown`)
	}
	out := make(map[string]odataResponse, len(body.Responses))
	for _, a := range body.Responses {
		if _, dup := out[a.ID]; !dup {
			out[a.ID] = a
		}
	}
	return out, nil
}

// itemResponse turns one item's answer into the response a single request
// with that answer would have given.
func (b *batcher) itemResponse(req request, a odataResponse, start time.Time) response {
	header := func(name string) string {
		for k, v := range a.Headers {
			if strings.EqualFold(k, name) {
				if s, ok := v.(string); ok {
					return s
				}
				return fmt.Sprint(v)
			}
		}
		return ""
	}
	resp := response{status: a.Status, etag: header("ETag"), req: req}
	recordedETag := resp.etag
	if b.r.t.secretETag(resp.etag) {
		resp.etag, resp.etagSecret, recordedETag = "", true, b.r.t.redact(resp.etag)
	}
	raw := []byte(bytes.TrimSpace(a.Body))
	if len(raw) > 0 && raw[0] == '"' {
		// A body that is not JSON comes as a string (OData 4.01 JSON §19.2).
		var s string
		if json.Unmarshal(raw, &s) == nil {
			raw = []byte(s)
		}
	}
	if string(raw) == "null" {
		raw = nil
	}
	resp.rawBody = raw
	if len(raw) > 0 && raw[0] == '{' {
		if m, err := decodeObject(raw); err == nil {
			resp.body = m
		}
	}
	var note string
	if len(raw) > maxSnapshotBytes && a.Status < 300 {
		note = fmt.Sprintf("response body of %d bytes is over the %d KiB stagesync keeps as a merge base: not stored", len(raw), maxSnapshotBytes>>10)
	}
	resp.retryAfter = parseRetryAfter(header("Retry-After"), start)
	if a.Status >= 400 {
		resp.err = fmt.Errorf("%s %s: %d %s", req.method, req.url, a.Status, remoteReason(raw, strconv.Itoa(a.Status)+" "+http.StatusText(a.Status)))
	}
	text := errText(resp.err)
	if text == "" {
		text = note
	}
	resp.attempt = b.r.attempt(req, start, a.Status, recordedETag, b.r.classify(req.method, a.Status), text)
	return resp
}

// tooLarge halves max_requests after the remote refused a batch of n
// writes as too large, and returns the limit now in force. It stays halved for the life of the process: the
// remote's limit is a setting of the remote, and probing upwards would
// cost a 413 each time.
func (b *batcher) tooLarge(n int, reason string) int {
	b.mu.Lock()
	next := max(1, n/2)
	changed := next < b.max
	if changed {
		b.max = next
	}
	limit := b.max
	b.mu.Unlock()
	if !changed {
		return limit
	}
	b.r.metrics.setBatchMax(b.r.t.Name, next)
	b.logger.Warn("the remote refused a batch as too large (413); batches to this target now carry at most half as many writes until the process restarts",
		"target", b.r.t.Name, "writes", n, "max_requests", next, "reason", cleanText(reason, 200),
		"hint", fmt.Sprintf("set batch_write.max_requests to %d or less", next))
	return limit
}

// batchContext is the context of a batch POST: it ends only when every job
// waiting for one of its writes has ended, so one job's cancellation never
// cuts the POST of writes other jobs wait for.
type batchContext struct {
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	open   int
	stops  []func() bool
}

func newBatchContext() *batchContext {
	ctx, cancel := context.WithCancel(context.Background())
	return &batchContext{ctx: ctx, cancel: cancel}
}

func (bc *batchContext) add(calls []*batchCall) {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	for _, c := range calls {
		bc.open++
		bc.stops = append(bc.stops, context.AfterFunc(c.ctx, func() {
			bc.mu.Lock()
			bc.open--
			last := bc.open == 0
			bc.mu.Unlock()
			if last {
				bc.cancel()
			}
		}))
	}
}

func (bc *batchContext) stop() {
	bc.mu.Lock()
	stops := bc.stops
	bc.mu.Unlock()
	for _, s := range stops {
		s()
	}
	bc.cancel()
}

// batchIDs hands out batch_requests ids a block at a time, so a POST costs
// no round trip to the database.
type batchIDs struct {
	fetch func(context.Context) (int64, error) // nil: no ids (unit tests)

	mu         sync.Mutex
	next, end  int64
	lastWarned time.Time
}

// take returns the next id, or 0 when none could be had (the POST's writes
// are then recorded without a batch id).
func (a *batchIDs) take(ctx context.Context, logger *slog.Logger, target string) int64 {
	if a == nil || a.fetch == nil {
		return 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next < a.end {
		id := a.next
		a.next++
		return id
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	first, err := a.fetch(fctx)
	if err != nil {
		if time.Since(a.lastWarned) > time.Minute {
			a.lastWarned = time.Now()
			logger.Warn("no batch id from the database; batch POSTs are sent and their writes recorded without one", "target", target, "error", err)
		}
		return 0
	}
	a.next, a.end = first+1, first+batchIDBlock
	return first
}

// refusing returns the target's pause, if it is paused now. A batched write
// takes no slot of its own (its batch does), so it checks the pause here
// before it is made durable, as acquire does for a single request.
func (g *gate) refusing() *pausedError {
	g.mu.Lock()
	p := g.pausedLocked(g.now())
	g.mu.Unlock()
	if p != nil {
		g.metrics.observeRefused(g.t.Name)
	}
	return p
}

// scheduledRetry is a resource to try again at a time.
type scheduledRetry struct {
	resourceID string
	at         time.Time
}

// retryJobs makes a round's retry jobs. Without batch writes each resource
// gets a job of its own, except that resources due at the very same time
// (the end of the target's pause, which throttling and a refused credential
// give every waiting resource) share jobs of up to batch_size, so that
// after the pause one batch ETag lookup serves them all rather than one
// lookup each, and nothing is tried before its time. With batch writes, resources due close together
// share a job (up to batch_size resources, scheduled at the latest of
// their times), so that their writes travel in one batch again rather than
// one job (and one small batch) each: above all the writes of a batch that
// failed as a whole or was answered 429, which all retry at the pause's
// end or after a backoff with jitter. A retry's delay is between half and
// all of its backoff, so a group takes the times up to twice the earliest
// delay; no resource is tried before its own time.
func retryJobs(t *TargetConfig, retries []scheduledRetry, now time.Time) []river.InsertManyParams {
	job := func(ids []string, at time.Time) river.InsertManyParams {
		return river.InsertManyParams{
			Args:       ApplyArgs{Target: t.Name, ResourceIDs: ids},
			InsertOpts: &river.InsertOpts{Queue: QueueName(t.Name), ScheduledAt: at},
		}
	}
	out := make([]river.InsertManyParams, 0, len(retries))
	sorted := slices.SortedStableFunc(slices.Values(retries), func(a, b scheduledRetry) int { return a.at.Compare(b.at) })
	if t.BatchWrite == nil {
		for len(sorted) > 0 {
			n := 1
			for n < len(sorted) && n < t.BatchSize && sorted[n].at.Equal(sorted[0].at) {
				n++
			}
			ids := make([]string, n)
			for i, r := range sorted[:n] {
				ids[i] = r.resourceID
			}
			out = append(out, job(ids, sorted[0].at))
			sorted = sorted[n:]
		}
		return out
	}
	for len(sorted) > 0 {
		first := sorted[0]
		until := first.at.Add(max(first.at.Sub(now), 0))
		n := 1
		for n < len(sorted) && n < t.BatchSize && !sorted[n].at.After(until) {
			n++
		}
		ids := make([]string, n)
		for i, r := range sorted[:n] {
			ids[i] = r.resourceID
		}
		out = append(out, job(ids, sorted[n-1].at))
		sorted = sorted[n:]
	}
	return out
}

// batchEnvelopes returns the batch POSTs the attempts travelled in, each
// once, by id.
func batchEnvelopes(attempts ...[]attemptRecord) []*batchRecord {
	seen := map[int64]*batchRecord{}
	for _, list := range attempts {
		for _, a := range list {
			for _, e := range a.batches {
				if e.id != 0 {
					seen[e.id] = e
				}
			}
		}
	}
	return slices.SortedFunc(maps.Values(seen), func(a, b *batchRecord) int { return cmp.Compare(a.id, b.id) })
}

// batchParams is the BatchRequestsInsert of envelopes.
func batchParams(target string, envs []*batchRecord) db.BatchRequestsInsertParams {
	p := db.BatchRequestsInsertParams{Target: target}
	for _, e := range envs {
		p.IDs = append(p.IDs, e.id)
		p.URLs = append(p.URLs, cleanText(e.url, maxErrorText))
		p.Items = append(p.Items, int32(e.items))
		p.StatusCodes = append(p.StatusCodes, int32(e.status))
		p.DurationsMs = append(p.DurationsMs, float64(e.duration.Microseconds())/1000)
		p.Outcomes = append(p.Outcomes, e.outcome)
		p.Errors = append(p.Errors, cleanText(e.errText, maxErrorText))
		p.CreatedAts = append(p.CreatedAts, e.at)
	}
	return p
}

// batchMetrics count batch POSTs. The writes they carry are counted in
// stagesync_remote_requests_total like single requests, one per write,
// as in stagesync.attempts.
type batchMetrics struct {
	posts  *prometheus.CounterVec
	writes *prometheus.CounterVec
	max    *prometheus.GaugeVec
}

func newBatchMetrics(reg prometheus.Registerer) batchMetrics {
	bm := batchMetrics{
		posts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_batch_requests_total",
			Help: "OData JSON batch POSTs sent (HTTP requests), by target and status class (2xx, 4xx, 5xx, error). The writes they carried are counted in stagesync_remote_requests_total.",
		}, []string{"target", "status_class"}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "stagesync_batch_writes_total",
			Help: "Writes sent inside batch POSTs; divided by stagesync_batch_requests_total, the mean batch size.",
		}, []string{"target"}),
		max: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "stagesync_batch_max_requests",
			Help: "The most writes this process puts in one batch POST to the target: batch_write.max_requests, halved by each 413 answer.",
		}, []string{"target"}),
	}
	if reg != nil {
		reg.MustRegister(bm.posts, bm.writes, bm.max)
	}
	return bm
}

func (m *Metrics) observeBatch(target string, status, writes int) {
	if m == nil {
		return
	}
	class := "error"
	if status > 0 {
		class = strconv.Itoa(status/100) + "xx"
	}
	m.batch.posts.WithLabelValues(target, class).Inc()
	m.batch.writes.WithLabelValues(target).Add(float64(writes))
}

func (m *Metrics) setBatchMax(target string, n int) {
	if m != nil {
		m.batch.max.WithLabelValues(target).Set(float64(n))
	}
}

// ProbeBatchWrite checks t's batch write endpoint (batch_write) without
// writing anything: it POSTs a batch holding one GET of resourceID (or, with
// no id known, an empty batch) and expects a JSON batch answer, with the
// item's ETag. A GET inside a batch is what an OData service must accept
// (an OPTIONS or a HEAD of the endpoint is not). Details never contain the
// credential.
func ProbeBatchWrite(ctx context.Context, client *http.Client, t *TargetConfig, resourceID string) ProbeResult {
	const check = "batch write"
	if t.BatchWrite == nil {
		return ProbeResult{check, ProbeSkipped, "batch_write not configured (one request per write)"}
	}
	p := prober{client: client, t: t}
	u := t.BaseURL + t.BatchWrite.Path
	what := "an empty batch"
	items := []odataRequest{}
	if resourceID != "" {
		items = append(items, odataRequest{ID: "1", Method: http.MethodGet,
			URL: itemRef(originOf(t.BaseURL), (&remote{t: t}).itemURL(resourceID)), Headers: map[string]string{"accept": "application/json"}})
		what = fmt.Sprintf("a batch holding one GET of %q", resourceID)
	}
	body, err := json.Marshal(map[string]any{"requests": items})
	if err != nil {
		return ProbeResult{check, ProbeFailed, "encode the probe: " + err.Error()}
	}
	a := p.post(ctx, u, body)
	var ans map[string]odataResponse
	switch {
	case a.err != nil:
		return ProbeResult{check, ProbeFailed, "POST " + u + ": " + a.err.Error()}
	case a.status == http.StatusNotFound || a.status == http.StatusMethodNotAllowed || a.status == http.StatusNotImplemented:
		return ProbeResult{check, ProbeFailed, fmt.Sprintf("POST %s (%s) answered %d: no JSON batch endpoint there; check batch_write.path (%s)", u, what, a.status, a.reason)}
	case a.status != http.StatusOK:
		return ProbeResult{check, ProbeFailed, fmt.Sprintf("POST %s (%s) answered %d: %s", u, what, a.status, a.reason)}
	default:
		if ans, err = decodeBatchAnswer(a.body, nil, false); err != nil {
			return ProbeResult{check, ProbeFailed, fmt.Sprintf(`POST %s (%s) answered 200, but not with an OData JSON batch answer ({"responses": [...]})`, u, what)}
		}
	}
	if resourceID == "" {
		return ProbeResult{check, ProbeOK, fmt.Sprintf("POST %s (%s) answered 200 in %s", u, what, a.took)}
	}
	it, ok := ans["1"]
	if !ok {
		return ProbeResult{check, ProbeWarning, fmt.Sprintf("POST %s (%s) answered 200 without an answer for the GET", u, what)}
	}
	b := &batcher{r: &remote{t: t}}
	resp := b.itemResponse(request{method: http.MethodGet}, it, time.Now())
	switch {
	case it.Status != http.StatusOK:
		return ProbeResult{check, ProbeWarning, fmt.Sprintf("POST %s (%s) answered 200; the GET inside answered %d: %s", u, what, it.Status,
			p.redact(errors.New(remoteReason(resp.rawBody, strconv.Itoa(it.Status)))).Error())}
	case resp.etag == "":
		return ProbeResult{check, ProbeWarning, fmt.Sprintf("POST %s (%s) answered 200; the GET inside answered 200 without an ETag header, so writes in batches can't be told their new ETag", u, what)}
	}
	return ProbeResult{check, ProbeOK, fmt.Sprintf("POST %s (%s) answered 200; the GET inside answered 200, ETag %s, in %s", u, what, resp.etag, a.took)}
}

// post sends one POST of a JSON body with the target's credential and
// timeout.
func (p prober) post(ctx context.Context, u string, body []byte) probeAnswer {
	ctx, cancel := context.WithTimeout(ctx, p.t.Timeout.D())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return probeAnswer{err: fmt.Errorf("build request: %w", err)}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("OData-Version", "4.01")
	if p.t.Auth != nil {
		req.Header.Set(p.t.Auth.Header, p.t.Auth.Prefix+p.t.authValue)
	}
	start := time.Now()
	resp, err := p.client.Do(req)
	if err != nil {
		return probeAnswer{err: p.redact(scrubURLError(err))}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return probeAnswer{err: p.redact(fmt.Errorf("read response body: %w", scrubURLError(err)))}
	}
	a := probeAnswer{status: resp.StatusCode, header: resp.Header, body: raw, took: fmt.Sprintf("%.1fms", float64(time.Since(start).Microseconds())/1000)}
	a.reason = p.redact(fmt.Errorf("%s", remoteReason(raw, resp.Status))).Error()
	return a
}

package processor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// remote talks to one target over a shared keep-alive http.Client. It makes
// exactly one HTTP request per call and reports it as an attempt; deciding
// what to do next is the worker's job.
type remote struct {
	// bodies bounds the response bytes read at once by the whole process.
	bodies  *bodyBudget
	t       *TargetConfig
	client  *http.Client
	gate    *gate
	metrics *Metrics
	// batch sends the target's writes in OData JSON batches (batch.go);
	// nil without batch_write.
	batch *batcher
}

func newRemote(t *TargetConfig, client *http.Client, m *Metrics) *remote {
	r := &remote{bodies: processBodies, t: t, client: client, gate: newGate(t), metrics: m}
	if t.BatchWrite != nil {
		r.batch = newBatcher(r)
	}
	return r
}

// response is one HTTP exchange, success or not.
type response struct {
	status     int // 0 on a transport error
	etag       string
	body       map[string]any // decoded JSON object body, if any
	rawBody    []byte
	retryAfter time.Duration
	err        error // transport error, or the remote's error text for 4xx/5xx
	attempt    attemptRecord
	// notSent: the request never left (the job ended while it waited for
	// the gate, or its durable intent could not be written). No attempt was
	// made, so none is recorded or counted.
	notSent bool
	// allow, location and contentType are the answer's headers of those
	// names (Location redacted), for clear words about odd answers.
	allow, location, contentType string
	// etagSecret: the answer's ETag held the credential; etag is "" (see
	// TargetConfig.secretETag).
	etagSecret bool
	// unknown: the request may have reached the remote, but no answer came
	// (a transport error once it was written, a timeout). A write with an
	// unknown outcome makes the resource in doubt.
	unknown bool
	// req is the request as sent (its Idempotency-Key filled in), so an
	// unknown write can be sent again exactly.
	req request
	// outboxID is the request's durable intent, deleted when the round is
	// recorded; 0 when none was written.
	outboxID int64
}

// attemptRecord becomes one stagesync.attempts row.
type attemptRecord struct {
	resourceID   *string
	changeIDs    []int64
	method       string
	url          string
	ifMatch      string
	ifNoneMatch  string
	statusCode   int
	responseETag string
	duration     time.Duration
	outcome      string
	errText      string
	at           time.Time
	// batches are the batch POSTs the request travelled in, the one that
	// answered it last (earlier ones were refused as too large); none for
	// a request sent on its own.
	batches []*batchRecord
}

// Attempt outcomes (stagesync.attempts.outcome).
const (
	outcomeApplied        = "applied"
	outcomeFetched        = "fetched"
	outcomeNotModified    = "not_modified"
	outcomeConflict       = "conflict"
	outcomeRetryable      = "retryable"
	outcomeFatal          = "fatal"
	outcomeTransportError = "transport_error"
	outcomeUnknown        = "unknown"
)

// itemURL builds the URL of one resource. The id is path-escaped (and "."
// and ".." are escaped too) so no id can reach another path.
func (r *remote) itemURL(id string) string {
	esc := url.PathEscape(id)
	switch esc {
	case ".":
		esc = "%2E"
	case "..":
		esc = "%2E%2E"
	}
	return r.t.BaseURL + strings.Replace(r.t.ItemPath, "{id}", esc, 1)
}

type request struct {
	method      string
	resourceID  string
	url         string
	changeIDs   []int64
	ifMatch     string
	ifNoneMatch string
	body        any
	// idemKey asks for an Idempotency-Key derived from the request; key,
	// when set, is sent as it is (resending an in-doubt request).
	idemKey bool
	key     string
	// outbox makes the request durable before it leaves (nil: it is sent
	// without, as in unit tests of the exchange alone); jobID goes with
	// its row.
	outbox *outbox
	jobID  int64
	// payload is the encoded body, made once by do.
	payload []byte
}

// do sends one request once the target's gate admits it. With batch_write
// a write goes in a batch instead (batch.go), with the same response.
func (r *remote) do(ctx context.Context, req request) response {
	if r.batch != nil && batchable(req) {
		return r.batch.do(ctx, req)
	}
	release, err := r.gate.acquire(ctx)
	if err != nil {
		// The target is paused (a *pausedError), or the job is ending
		// (cancelled, or its deadline comes before the gate would let this
		// request go).
		return response{notSent: true, err: err}
	}
	req, err = r.prepare(req)
	if err != nil {
		resp := r.failed(req, time.Now(), err, false)
		release(resp)
		return resp
	}
	// The intent is durable before the request leaves, so after any crash
	// the resource's next worker knows the remote may have seen it (t1).
	id, err := req.outbox.add(ctx, r.t.Name, req)
	if err != nil {
		resp := response{notSent: true, err: err, req: req}
		release(resp)
		return resp
	}
	if p := r.gate.pausedNow(); p != nil {
		// The target was paused while the intent was written: nothing
		// leaves before the pause ends. The row is deleted with the round.
		resp := response{notSent: true, err: p, req: req, outboxID: id}
		release(resp)
		return resp
	}
	resp := r.send(ctx, req)
	resp.outboxID = id
	release(resp) // the gate observes the answer: pauses, AIMD, health
	return resp
}

// prepare encodes the body and fills in the Idempotency-Key once, so the
// durable intent and the request sent agree byte for byte.
func (r *remote) prepare(req request) (request, error) {
	if req.body != nil && req.payload == nil {
		b, err := json.Marshal(req.body)
		if err != nil {
			return req, fmt.Errorf("encode request body: %w", err)
		}
		req.payload = b
	}
	if req.idemKey && req.key == "" {
		req.key = idempotencyKey(r.t.Name, req)
	}
	return req, nil
}

// send makes the HTTP exchange of one request and describes it as an
// attempt.
func (r *remote) send(ctx context.Context, req request) response {
	req, err := r.prepare(req)
	if err != nil {
		return r.failed(req, time.Now(), err, false)
	}
	var body io.Reader
	if req.payload != nil {
		body = bytes.NewReader(req.payload)
	}
	rctx, cancel := context.WithTimeout(ctx, r.t.Timeout.D())
	defer cancel()
	// Once the headers are written the remote may act on the request, so a
	// failure after that point leaves its outcome unknown.
	var wrote, answered atomic.Bool
	rctx = httptrace.WithClientTrace(rctx, &httptrace.ClientTrace{
		WroteHeaders:         func() { wrote.Store(true) },
		GotFirstResponseByte: func() { answered.Store(true) },
	})
	hreq, err := http.NewRequestWithContext(rctx, req.method, req.url, body)
	if err != nil {
		return r.failed(req, time.Now(), fmt.Errorf("build request: %w", err), false)
	}
	if body != nil {
		// Go's transport resends a request carrying an Idempotency-Key on
		// its own when a reused connection fails before the answer: the
		// remote may then apply it twice, or answer the second copy with a
		// conflict that hides that the first landed. A copy is allowed
		// only if nothing was sent yet; otherwise the outcome is unknown,
		// and stagesync resolves it. (An answer that came, such as a
		// redirect, may rewind the body: it is recorded, not followed.)
		payload := req.payload
		hreq.GetBody = func() (io.ReadCloser, error) {
			if wrote.Load() && !answered.Load() {
				return nil, errNotResent
			}
			return io.NopCloser(bytes.NewReader(payload)), nil
		}
	}
	hreq.Header.Set("Accept", "application/json")
	if body != nil {
		hreq.Header.Set("Content-Type", "application/json")
	}
	if req.ifMatch != "" {
		hreq.Header.Set("If-Match", req.ifMatch)
	}
	if req.ifNoneMatch != "" {
		hreq.Header.Set("If-None-Match", req.ifNoneMatch)
	}
	if req.key != "" {
		hreq.Header.Set("Idempotency-Key", req.key)
	}
	if r.t.Auth != nil {
		hreq.Header.Set(r.t.Auth.Header, r.t.Auth.Prefix+r.t.authValue)
	}

	start := time.Now()
	hresp, err := r.client.Do(hreq)
	if err != nil {
		if !wrote.Load() && ctx.Err() != nil {
			// The job was cancelled before anything left: not an attempt.
			return response{notSent: true, err: ctx.Err(), req: req}
		}
		return r.failed(req, start, scrubURLError(err), wrote.Load())
	}
	defer hresp.Body.Close()
	raw, truncated, release, err := r.bodies.read(rctx, hresp.Body, hresp.ContentLength, maxResponseBody)
	// The reservation covers reading and decoding; what is kept afterwards
	// is bounded per request (decoded values, capped snapshots).
	defer release()
	if err != nil {
		// The status arrived, so the remote acted on the request; only the
		// body is missing. Go on without it.
		raw = nil
	}
	// A remote may echo the request's credential (a gateway's error page,
	// a debug body): it goes no further than here.
	raw = r.t.redactBytes(raw)
	resp := response{status: hresp.StatusCode, etag: hresp.Header.Get("ETag"), rawBody: raw, req: req,
		allow: cleanText(hresp.Header.Get("Allow"), 100), location: cleanText(r.t.redact(hresp.Header.Get("Location")), 200),
		contentType: cleanText(hresp.Header.Get("Content-Type"), 100)}
	recordedETag := resp.etag
	if r.t.secretETag(resp.etag) {
		resp.etag, resp.etagSecret, recordedETag = "", true, r.t.redact(resp.etag)
	}
	var note string
	switch {
	case truncated:
		// Only a prefix was read: not JSON, and not worth decoding.
		note = fmt.Sprintf("response body over the %d MiB stagesync reads: ignored", maxResponseBody>>20)
	case len(raw) > 0 && raw[0] == '{':
		if m, err := decodeObject(raw); err == nil {
			resp.body = m
		}
	}
	if !truncated && len(raw) > maxSnapshotBytes && hresp.StatusCode < 300 {
		note = fmt.Sprintf("response body of %d bytes is over the %d KiB stagesync keeps as a merge base: not stored", len(raw), maxSnapshotBytes>>10)
	}
	resp.retryAfter = parseRetryAfter(hresp.Header.Get("Retry-After"), start)
	if hresp.StatusCode >= 400 {
		resp.err = fmt.Errorf("%s %s: %d %s", req.method, req.url, hresp.StatusCode, remoteReason(raw, hresp.Status))
	}
	text := errText(resp.err)
	if text == "" {
		text = note
	}
	resp.attempt = r.attempt(req, start, hresp.StatusCode, recordedETag, r.classify(req.method, hresp.StatusCode), text)
	return resp
}

// errNotResent ends a request whose connection failed after it was sent.
var errNotResent = errors.New("the connection failed after the request was sent (not resent automatically)")

// maxResponseBody bounds what is read of one answer.
const maxResponseBody = 8 << 20

// failed describes a request that got no answer. sent says it may have
// reached the remote: a write's outcome is then unknown.
func (r *remote) failed(req request, start time.Time, err error, sent bool) response {
	outcome := outcomeTransportError
	unknown := sent && req.method != http.MethodGet
	if unknown {
		outcome = outcomeUnknown
		err = fmt.Errorf("outcome unknown, the request may have been applied: %w", err)
	}
	return response{err: err, unknown: unknown, req: req, attempt: r.attempt(req, start, 0, "", outcome, err.Error())}
}

func (r *remote) attempt(req request, start time.Time, status int, etag, outcome, errText string) attemptRecord {
	d := time.Since(start)
	r.metrics.observeRequest(r.t.Name, req.method, status, outcome, d)
	a := attemptRecord{
		changeIDs: req.changeIDs, method: req.method, url: req.url, ifMatch: req.ifMatch, ifNoneMatch: req.ifNoneMatch,
		statusCode: status, responseETag: etag, duration: d, outcome: outcome, errText: errText, at: start,
	}
	if req.resourceID != "" {
		id := req.resourceID
		a.resourceID = &id
	}
	return a
}

// classify maps a status to the attempts.outcome vocabulary.
func (r *remote) classify(method string, status int) string {
	switch {
	case status == http.StatusNotModified && method == http.MethodGet:
		return outcomeNotModified
	case status >= 200 && status < 300 || status == http.StatusNotModified:
		if method == http.MethodGet {
			return outcomeFetched
		}
		return outcomeApplied
	case r.t.isConflict(status):
		return outcomeConflict
	case retryableStatus(status):
		return outcomeRetryable
	default:
		return outcomeFatal
	}
}

func retryableStatus(status int) bool {
	return status == http.StatusTooManyRequests || status == http.StatusRequestTimeout || status >= 500
}

// idempotencyKey is stable for the same write of the same changes against
// the same ETag, so a retry after a crash replays instead of applying twice,
// while a retry with a fresh ETag (after a merge) is a new request.
func idempotencyKey(target string, req request) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00%s\x00%s\x00", target, req.resourceID, req.method, req.ifMatch, req.ifNoneMatch)
	for _, id := range req.changeIDs {
		fmt.Fprintf(h, "%d,", id)
	}
	return "stagesync-" + hex.EncodeToString(h.Sum(nil))[:32]
}

// parseRetryAfter reads delta-seconds or an HTTP date; 0 when absent.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// remoteReason extracts the remote's explanation from an error body.
func remoteReason(raw []byte, status string) string {
	var m map[string]any
	if json.Unmarshal(raw, &m) == nil {
		for _, k := range []string{"error", "message", "detail", "reason"} {
			if s, ok := m[k].(string); ok && s != "" {
				return cleanText(s, 300)
			}
		}
	}
	s := strings.TrimSpace(string(raw))
	if s == "" {
		return status
	}
	return cleanText(s, 300)
}

// scrubURLError drops the *url.Error wrapper's operation and URL, which we
// record separately, so error text stays short.
func scrubURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		if ue.Timeout() {
			return fmt.Errorf("timeout: %w", ue.Err)
		}
		return ue.Err
	}
	return err
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// batchItem is one resource in a batch lookup's answer: its ETag and the
// fields the answer carried (the merge base of those fields).
type batchItem struct {
	etag   string
	fields map[string]any
	// covers lists the fields the answer speaks for (present, or asked
	// for and absent); nil: the whole representation.
	covers map[string]bool
}

// batchETags asks the batch endpoint for the ETags of ids, with the fields
// the merge needs as their base: fields, or all of them. An id missing from
// the answer (or listed without a usable ETag) is unclear, not missing: a
// GET of it decides.
func (r *remote) batchETags(ctx context.Context, req request, ids []string, fields []string, all bool) (map[string]batchItem, response) {
	q := url.Values{}
	q.Set("ids", strings.Join(ids, ","))
	// "*" asks for the whole representation; a remote that does not know
	// it still sends id and etag.
	asked := "id,etag,*"
	if !all {
		asked = strings.Join(append([]string{"id", "etag"}, fields...), ",")
	}
	q.Set("fields", asked)
	req.method, req.url = http.MethodGet, r.t.BaseURL+r.t.BatchETagPath+"?"+q.Encode()
	resp := r.do(ctx, req)
	if resp.err != nil || resp.status != http.StatusOK {
		return nil, resp
	}
	items, err := decodeBatch(resp.rawBody, fields, all)
	if err != nil {
		// The exchange itself succeeded (and was counted so); the error
		// says why its answer is unusable, and single GETs follow.
		resp.err = err
		resp.attempt.errText = err.Error()
		return nil, resp
	}
	for id, it := range items {
		if r.t.secretETag(it.etag) {
			delete(items, id) // unclear: its GET decides, and refuses it
		}
	}
	return items, resp
}

// decodeBatch reads a batch lookup's answer: a JSON array of objects with
// "id", "etag" and the fields asked for. A remote that ignores the field
// list sends more, which is kept; one that sends only id and etag gives no
// base at all.
func decodeBatch(raw []byte, fields []string, all bool) (map[string]batchItem, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var list []map[string]any
	if err := dec.Decode(&list); err != nil {
		return nil, fmt.Errorf("batch ETag response is not a JSON array of objects with id and etag: %w", err)
	}
	out := make(map[string]batchItem, len(list))
	for _, m := range list {
		id, _ := m["id"].(string)
		etag, _ := m["etag"].(string)
		if id == "" || etag == "" {
			continue
		}
		delete(m, "etag")
		it := batchItem{etag: etag, fields: m, covers: map[string]bool{"id": true}}
		if len(m) > 1 {
			// The answer carries representation fields, so it honoured the
			// field list: an asked field that is absent is absent remotely.
			if all {
				it.covers = nil
			} else {
				for _, f := range fields {
					it.covers[f] = true
				}
			}
		}
		if it.covers != nil {
			for f := range m {
				it.covers[f] = true
			}
		}
		out[id] = it
	}
	return out, nil
}

// isWeakETag reports whether an ETag is weak (W/"…"), which a server
// comparing If-Match strongly (RFC 9110 §13.1.1) never matches.
func isWeakETag(e string) bool { return strings.HasPrefix(e, "W/") }

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

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
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// remote talks to one target over a shared keep-alive http.Client. It makes
// exactly one HTTP request per call and reports it as an attempt; deciding
// what to do next is the worker's job.
type remote struct {
	t       *TargetConfig
	client  *http.Client
	gate    *gate
	metrics *Metrics
}

func newRemote(t *TargetConfig, client *http.Client, m *Metrics) *remote {
	return &remote{t: t, client: client, gate: newGate(t), metrics: m}
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
	// notSent: the job ended before the request left (waiting for a
	// concurrency slot or the rate limiter). No attempt was made, so none
	// is recorded or counted.
	notSent bool
}

// attemptRecord becomes one stagesync.attempts row.
type attemptRecord struct {
	resourceID   *string
	changeIDs    []int64
	method       string
	url          string
	ifMatch      string
	statusCode   int
	responseETag string
	duration     time.Duration
	outcome      string
	errText      string
	at           time.Time
}

// Attempt outcomes (stagesync.attempts.outcome).
const (
	outcomeApplied        = "applied"
	outcomeFetched        = "fetched"
	outcomeConflict       = "conflict"
	outcomeRetryable      = "retryable"
	outcomeFatal          = "fatal"
	outcomeTransportError = "transport_error"
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
	idemKey     bool
}

// do sends one request once the target's gate admits it.
func (r *remote) do(ctx context.Context, req request) response {
	release, err := r.gate.acquire(ctx)
	if err != nil {
		// The target is paused (a *pausedError), or the job is ending
		// (cancelled, or its deadline comes before the gate would let this
		// request go).
		return response{notSent: true, err: err}
	}
	resp := r.send(ctx, req)
	release(resp) // the gate observes the answer: pauses, AIMD, health
	return resp
}

// send makes the HTTP exchange of one request and describes it as an
// attempt.
func (r *remote) send(ctx context.Context, req request) response {
	var body io.Reader
	if req.body != nil {
		b, err := json.Marshal(req.body)
		if err != nil {
			return r.failed(req, time.Now(), fmt.Errorf("encode request body: %w", err))
		}
		body = bytes.NewReader(b)
	}
	rctx, cancel := context.WithTimeout(ctx, r.t.Timeout.D())
	defer cancel()
	hreq, err := http.NewRequestWithContext(rctx, req.method, req.url, body)
	if err != nil {
		return r.failed(req, time.Now(), fmt.Errorf("build request: %w", err))
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
	if req.idemKey {
		hreq.Header.Set("Idempotency-Key", idempotencyKey(r.t.Name, req))
	}
	if r.t.Auth != nil {
		hreq.Header.Set(r.t.Auth.Header, r.t.Auth.Prefix+r.t.authValue)
	}

	start := time.Now()
	hresp, err := r.client.Do(hreq)
	if err != nil {
		return r.failed(req, start, scrubURLError(err))
	}
	defer hresp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(hresp.Body, 8<<20))
	if err != nil {
		return r.failed(req, start, fmt.Errorf("read response body: %w", scrubURLError(err)))
	}
	resp := response{status: hresp.StatusCode, etag: hresp.Header.Get("ETag"), rawBody: raw}
	if len(raw) > 0 && raw[0] == '{' {
		if m, err := decodeObject(raw); err == nil {
			resp.body = m
		}
	}
	resp.retryAfter = parseRetryAfter(hresp.Header.Get("Retry-After"), start)
	if hresp.StatusCode >= 400 {
		resp.err = fmt.Errorf("%s %s: %d %s", req.method, req.url, hresp.StatusCode, remoteReason(raw, hresp.Status))
	}
	resp.attempt = r.attempt(req, start, hresp.StatusCode, resp.etag, r.classify(req.method, hresp.StatusCode), errText(resp.err))
	return resp
}

func (r *remote) failed(req request, start time.Time, err error) response {
	return response{err: err, attempt: r.attempt(req, start, 0, "", outcomeTransportError, err.Error())}
}

func (r *remote) attempt(req request, start time.Time, status int, etag, outcome, errText string) attemptRecord {
	d := time.Since(start)
	r.metrics.observeRequest(r.t.Name, req.method, status, outcome, d)
	a := attemptRecord{
		changeIDs: req.changeIDs, method: req.method, url: req.url, ifMatch: req.ifMatch,
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

// fetch GETs one resource.
func (r *remote) fetch(ctx context.Context, id string, changeIDs []int64) response {
	return r.do(ctx, request{method: http.MethodGet, resourceID: id, url: r.itemURL(id), changeIDs: changeIDs})
}

// batchETags asks the batch endpoint for the ETags of ids. Ids missing from
// the answer do not exist remotely.
func (r *remote) batchETags(ctx context.Context, ids []string, changeIDs []int64) (map[string]string, response) {
	q := url.Values{}
	q.Set("ids", strings.Join(ids, ","))
	q.Set("fields", "id,etag")
	u := r.t.BaseURL + r.t.BatchETagPath + "?" + q.Encode()
	resp := r.do(ctx, request{method: http.MethodGet, url: u, changeIDs: changeIDs})
	if resp.err != nil || resp.status != http.StatusOK {
		return nil, resp
	}
	var items []struct {
		ID   string `json:"id"`
		ETag string `json:"etag"`
	}
	if err := json.Unmarshal(resp.rawBody, &items); err != nil {
		// The exchange itself succeeded (and was counted so); the error
		// says why its answer is unusable, and single GETs follow.
		resp.err = fmt.Errorf("batch ETag response is not a JSON array of {id, etag}: %w", err)
		resp.attempt.errText = resp.err.Error()
		return nil, resp
	}
	out := make(map[string]string, len(items))
	for _, it := range items {
		if it.ETag != "" {
			out[it.ID] = it.ETag
		}
	}
	return out, resp
}

package remotesim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"
)

// HugeNumber is the value Misbehavior.HugeNumberField adds: valid JSON, but beyond the range
// of PostgreSQL's numeric (and of float64).
const HugeNumber = "1e200000"

// padField is the field Misbehavior.PadBodyBytes adds to JSON object answers.
const padField = "_pad"

// maxPadBodyBytes bounds PadBodyBytes (1 GiB), enough for any memory test.
const maxPadBodyBytes = 1 << 30

// padChunk is written repeatedly to pad a body, so padding costs no memory per request.
var padChunk = bytes.Repeat([]byte{'x'}, 32<<10)

// Misbehavior makes the Sim answer the way odd or hostile remotes do, so that a client's
// handling of them can be tested. The zero value behaves. Set it in Options.Misbehavior or,
// while serving, with SetMisbehavior. Only API answers misbehave, never /_sim/.
type Misbehavior struct {
	// IDs limits the modes to answers about these resources: item requests and $batch items
	// addressing them, their entries in batch lookups and the ETags issued for them.
	// Answers about no single resource (batch lookups, the $batch envelope) are padded,
	// slowed and echo the Authorization header only when IDs is empty. Empty means every
	// resource.
	IDs []string

	// NoETag leaves the ETag header out of every answer (and "etag" out of $batch item
	// headers). The ETag is still enforced, and batch lookups and conflict bodies still
	// carry it, so a client can write but is never told the ETag its write produced.
	NoETag bool

	// HugeNumberField, if set, adds this field with the number 1e200000 (HugeNumber) to
	// every representation of a resource served: GET, write answers, batch lookup entries
	// (when the field is asked for or the whole representation is), $batch item bodies.
	// The stored fields are unchanged.
	HugeNumberField string

	// InvalidUTF8ETags issues ETags that end in the bytes 0xFF 0xFE inside the quotes: valid
	// HTTP (obs-text), but not UTF-8. They are exact in headers; JSON bodies (conflict
	// answers, batch lookups, $batch item headers) cannot carry them and show U+FFFD
	// instead. It applies to ETags issued from then on.
	InvalidUTF8ETags bool

	// EchoAuthorization copies the request's Authorization header into every error body
	// (status >= 400, including injected faults and $batch items) as "authorization", as
	// some gateways do. The value is only echoed: it is never logged or stored.
	EchoAuthorization bool

	// PadBodyBytes, if > 0, pads every JSON object answer (including errors and the $batch
	// envelope) to this many bytes with a string field "_pad" added last, streamed from a
	// fixed buffer: a huge body that costs the Sim no memory. Bodies already that large are
	// sent as they are. At most 1 GiB.
	PadBodyBytes int64

	// SlowBodyBytesPerSec, if > 0, sends the status and headers at once and then the body
	// at this many bytes per second, in chunks every 50ms (or one byte at a time below 20
	// bytes per second). The trickle stops when the client goes away.
	SlowBodyBytesPerSec int64

	// OmitFromBatchLookup leaves the resources the modes apply to out of batch lookup
	// answers, although they exist (a GET finds them), as a remote with a stale index or
	// a page limit does. With IDs empty every entry is left out: the answer is [], as from
	// a remote that ignores the ids parameter.
	OmitFromBatchLookup bool

	// Status, if set, answers the single API requests the modes apply to (not $batch
	// items) with this status and a JSON error body, before touching state: 401, 403,
	// 405, 407, 410, 415 and so on. A 3xx carries "Location: /elsewhere" and no body.
	// StatusMethods limits it to these methods; empty means every method.
	Status        int
	StatusMethods []string

	// HTMLBody replaces the body of 2xx answers with a text/html page (a login page or a
	// proxy's page), keeping their status and ETag.
	HTMLBody bool

	// ETagEchoesAuthorization puts the request's Authorization header into the ETag of
	// answers that carry one, quoted (a debug gateway's way to make ETags per client).
	// The resource's real ETag is still enforced.
	ETagEchoesAuthorization bool
}

// htmlBody is what HTMLBody sends.
var htmlBody = []byte("<!DOCTYPE html><html><body><h1>Please sign in</h1></body></html>")

// problem describes what is wrong with m, or returns "".
func (m *Misbehavior) problem() string {
	switch {
	case m.PadBodyBytes < 0 || m.PadBodyBytes > maxPadBodyBytes:
		return fmt.Sprintf("Misbehavior.PadBodyBytes %d: must be in [0,%d]", m.PadBodyBytes, maxPadBodyBytes)
	case m.SlowBodyBytesPerSec < 0:
		return fmt.Sprintf("Misbehavior.SlowBodyBytesPerSec %d: must not be negative", m.SlowBodyBytesPerSec)
	case m.Status != 0 && (m.Status < 200 || m.Status > 599):
		return fmt.Sprintf("Misbehavior.Status %d: must be a status from 200 to 599", m.Status)
	}
	return ""
}

// misbehavior is an immutable snapshot of a Misbehavior, shared by the requests that
// arrived while it was in force.
type misbehavior struct {
	Misbehavior
	ids map[string]bool
}

func newMisbehavior(m Misbehavior) *misbehavior {
	if p := m.problem(); p != "" {
		panic("remotesim: " + p)
	}
	m.IDs = slices.Clone(m.IDs)
	m.StatusMethods = slices.Clone(m.StatusMethods)
	mb := &misbehavior{Misbehavior: m}
	if len(m.IDs) > 0 {
		mb.ids = make(map[string]bool, len(m.IDs))
		for _, id := range m.IDs {
			mb.ids[id] = true
		}
	}
	return mb
}

// appliesTo reports whether the modes apply to an answer about resource id ("" for an answer
// about no single resource).
func (m *misbehavior) appliesTo(id string) bool {
	return m.ids == nil || m.ids[id]
}

// refusal returns the answer Status gives the single request x, if it applies.
func (m *misbehavior) refusal(x *exchange) (response, bool) {
	if m.Status == 0 || x.kind == kindBatch || !m.appliesTo(x.id) ||
		len(m.StatusMethods) > 0 && !slices.Contains(m.StatusMethods, x.rec.Method) {
		return response{}, false
	}
	if m.Status >= 300 && m.Status < 400 {
		return response{status: m.Status, location: "/elsewhere"}, true
	}
	return response{status: m.Status, body: errorBody(http.StatusText(m.Status))}, true
}

// SetMisbehavior replaces the misbehaving modes for requests that arrive from now on. It
// panics if PadBodyBytes is outside [0, 1 GiB] or SlowBodyBytesPerSec is negative.
func (s *Sim) SetMisbehavior(m Misbehavior) {
	mb := newMisbehavior(m)
	s.mu.Lock()
	s.mb = mb
	s.mu.Unlock()
}

// present applies the per-answer modes (no ETag, huge number, echoed Authorization) to resp,
// an answer to x. resp's body is never modified in place: it may be cached or shared.
func present(x *exchange, resp response) response {
	mb := x.mb
	if !mb.appliesTo(x.id) {
		return resp
	}
	if mb.NoETag {
		resp.etag = ""
	}
	if mb.ETagEchoesAuthorization && resp.etag != "" && x.auth != "" {
		resp.etag = `"` + x.auth + `"`
	}
	if mb.HTMLBody && resp.status >= 200 && resp.status < 300 && resp.body != nil {
		resp.body, resp.contentType, resp.item = htmlBody, "text/html; charset=utf-8", false
	}
	if mb.HugeNumberField != "" && resp.item {
		resp.body = withField(resp.body, mb.HugeNumberField, []byte(HugeNumber))
	}
	if mb.EchoAuthorization && resp.status >= 400 && x.auth != "" {
		v, _ := json.Marshal(x.auth) // a string always encodes
		resp.body = withField(resp.body, "authorization", v)
	}
	return resp
}

// withField returns a copy of the JSON object body with name: rawValue added last; other
// bodies are returned as they are.
func withField(body []byte, name string, rawValue []byte) []byte {
	if len(body) < 2 || body[0] != '{' || body[len(body)-1] != '}' {
		return body
	}
	k, _ := json.Marshal(name) // a string always encodes
	out := make([]byte, 0, len(body)+len(k)+len(rawValue)+2)
	out = append(out, body[:len(body)-1]...)
	if len(bytes.TrimSpace(body[1:len(body)-1])) > 0 {
		out = append(out, ',')
	}
	out = append(out, k...)
	out = append(out, ':')
	out = append(out, rawValue...)
	return append(out, '}')
}

// answer sends x.resp as the answer to an API request, misbehaving as x.mb says.
func (s *Sim) answer(w http.ResponseWriter, r *http.Request, x *exchange) {
	resp := present(x, x.resp)
	var padTo, rate int64
	if x.mb.appliesTo(x.id) {
		padTo, rate = x.mb.PadBodyBytes, x.mb.SlowBodyBytesPerSec
	}
	h := w.Header()
	if resp.etag != "" {
		h.Set("ETag", resp.etag) // sent byte for byte, invalid UTF-8 included
	}
	if resp.retryAfter {
		h.Set("Retry-After", s.retryAfter)
	}
	if resp.allow != "" {
		h.Set("Allow", resp.allow)
	}
	if resp.location != "" {
		h.Set("Location", resp.location)
	}
	if resp.body == nil {
		w.WriteHeader(resp.status)
		return
	}
	pad := padLength(resp.body, padTo)
	size := int64(len(resp.body))
	if pad >= 0 {
		size = padTo
	}
	ct := resp.contentType
	if ct == "" {
		ct = "application/json"
	}
	h.Set("Content-Type", ct)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	w.WriteHeader(resp.status)
	var out io.Writer = w
	if rate > 0 {
		rc := http.NewResponseController(w)
		_ = rc.Flush() // the headers go at once; only the body trickles
		out = &slowWriter{ctx: r.Context(), w: w, rc: rc, rate: rate}
	}
	// A write error means the client went away; there is no one left to tell.
	_ = writePadded(out, resp.body, pad)
}

// padOverhead is the length of `"_pad":""`.
var padOverhead = int64(len(`"` + padField + `":""`))

// padLength is how many padding bytes bring the JSON object body to exactly padTo bytes,
// or -1 if it is not an object or too large to add the pad field.
func padLength(body []byte, padTo int64) int64 {
	if padTo <= 0 || len(body) < 2 || body[0] != '{' {
		return -1
	}
	overhead := padOverhead
	if len(body) > 2 {
		overhead++ // the comma
	}
	return max(-1, padTo-int64(len(body))-overhead)
}

// writePadded writes body with a "_pad" field of pad bytes added last; pad < 0 writes
// body as it is.
func writePadded(w io.Writer, body []byte, pad int64) error {
	if pad < 0 {
		_, err := w.Write(body)
		return err
	}
	head := body[:len(body)-1]
	if len(body) > 2 {
		head = append(head[:len(head):len(head)], ',') // a copy: body may be shared
	}
	if _, err := w.Write(head); err != nil {
		return err
	}
	if _, err := io.WriteString(w, `"`+padField+`":"`); err != nil {
		return err
	}
	for pad > 0 {
		n := min(pad, int64(len(padChunk)))
		if _, err := w.Write(padChunk[:n]); err != nil {
			return err
		}
		pad -= n
	}
	_, err := io.WriteString(w, `"}`)
	return err
}

// slowWriter trickles writes to the client at rate bytes per second.
type slowWriter struct {
	ctx  context.Context // the request's: the trickle stops when the client goes away
	w    io.Writer
	rc   *http.ResponseController
	rate int64
}

// slowTick is how often a slow body sends a chunk.
const slowTick = 50 * time.Millisecond

func (sw *slowWriter) Write(p []byte) (int, error) {
	chunk := max(1, sw.rate*int64(slowTick)/int64(time.Second))
	written := 0
	for len(p) > 0 {
		n := int(min(chunk, int64(len(p))))
		m, err := sw.w.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		if err := sw.rc.Flush(); err != nil {
			return written, err
		}
		p = p[n:]
		t := time.NewTimer(time.Duration(int64(n) * int64(time.Second) / sw.rate))
		select {
		case <-t.C:
		case <-sw.ctx.Done():
			t.Stop()
			return written, sw.ctx.Err()
		}
	}
	return written, nil
}

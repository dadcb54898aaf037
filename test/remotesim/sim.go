// Package remotesim simulates a remote REST API that enforces ETags, so clients that write
// to remote systems can be tested against optimistic concurrency, idempotency keys, other
// users' edits, OData JSON batches, injected faults and misbehaving answers over real HTTP.
package remotesim

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	defaultItemPrefix       = "/items"
	defaultBatchPath        = "/$batch"
	defaultMaxBatchRequests = 100
	defaultMaxBodyBytes     = 1 << 20
	defaultRequestLogSize   = 1_000_000

	// maxHistoryPerResource bounds History per resource so other users editing for hours
	// cannot grow memory without limit; the oldest versions are dropped first.
	maxHistoryPerResource = 10_000

	// maxIdempotencyEntries bounds the idempotency cache; the oldest keys are forgotten first.
	maxIdempotencyEntries = 100_000

	// maxBatchIDs is the most ids one batch GET may ask for.
	maxBatchIDs = 500

	// adminPrefix is where the inspection endpoints live, whatever the ItemPrefix.
	adminPrefix = "/_sim/"

	// writerAPI is the Version.Writer of changes made through HTTP.
	writerAPI = "api"

	// writerSeed is the Version.Writer of Put and Delete.
	writerSeed = "seed"

	// statusClientClosed is logged (never sent) when the client went away during Latency,
	// following nginx's convention.
	statusClientClosed = 499
)

// Options configures a Sim. The zero value is usable: every field has a default.
type Options struct {
	// ItemPrefix is the path of the collection, e.g. "/assignments". Items live at
	// ItemPrefix+"/"+url.PathEscape(id). It must not be "/" or start with "/_sim".
	// Defaults to "/items".
	ItemPrefix string

	// ConflictStatus is the status answered for a stale If-Match: 409 or 412.
	// Defaults to 412.
	ConflictStatus int

	// WeakETags serves ETags as W/"…". If-Match is compared as an exact opaque string either
	// way, so a client must echo the ETag it was given, prefix included.
	WeakETags bool

	// StrictIfMatch refuses every If-Match holding a weak entity tag (W/"…") with 412, as
	// RFC 9110 §13.1.1 requires (If-Match compares strongly, and a weak tag never matches
	// strongly). With WeakETags, no conditional write can ever succeed: the remote a
	// client must recognise and report instead of retrying.
	StrictIfMatch bool

	// IdempotencyCache replays the stored response (status, ETag header and body) of a
	// completed 2xx PATCH, PUT or DELETE when the same method, path and Idempotency-Key
	// arrive again, without touching state. A duplicate arriving while the first is still in
	// progress is not held back: it runs against state like any request. The cache keeps
	// the latest 100,000 keys.
	IdempotencyCache bool

	// Latency is added to every API request, honouring the request context.
	// Go's server notices a departed client only once the body is read, so
	// a write whose client gave up during the sleep is still applied: the
	// realistic "outcome unknown" case a client must survive.
	Latency time.Duration

	// ErrorRate is the fraction in [0,1] of API requests answered 500 or 503 (alternately)
	// before touching state.
	ErrorRate float64

	// RateLimitRate is the fraction in [0,1] of API requests answered 429 with a
	// Retry-After header before touching state.
	RateLimitRate float64

	// RetryAfter is sent as Retry-After on 429 and 503 responses, rounded up to whole
	// seconds and at least 1. Defaults to 1s.
	RetryAfter time.Duration

	// ResetRate is the fraction in [0,1] of API requests whose connection is reset without
	// any response.
	ResetRate float64

	// DropAfterCommitRate is the fraction in [0,1] of writes (PATCH, PUT, DELETE) that
	// change state and then have their connection reset without an answer, so the client
	// cannot know that its write landed. The write is in History, its answer is stored in
	// the idempotency cache (if enabled) as if it had been sent, and the request log shows
	// it with Fault "drop-after-commit", Committed true and Status 0. A write drawn for
	// this fault that changes nothing (a conflict, a 428) is answered normally.
	DropAfterCommitRate float64

	// Hooks are run at exact points of requests; see Hooks. SetHooks replaces them.
	Hooks Hooks

	// Misbehavior makes answers odd or hostile; see Misbehavior. SetMisbehavior replaces it.
	Misbehavior Misbehavior

	// BatchWrites serves OData 4.01 JSON batch requests at BatchPath: POST
	// {"requests": [{"id", "method", "url", "headers", "body"}]} answered 200
	// {"responses": [{"id", "status", "headers", "body"}]}. Each item is handled exactly as
	// the same single request would be (If-Match, idempotency cache, faults, hooks) and is
	// logged and counted as one; Latency is waited once per batch. Items stand alone:
	// atomicityGroup and dependsOn are refused with 400.
	BatchWrites bool

	// BatchPath is the path of the $batch endpoint; item urls without a leading "/" are
	// relative to its folder (the service root). It must not be under ItemPrefix or /_sim.
	// Defaults to "/$batch".
	BatchPath string

	// MaxBatchRequests is the most items one $batch may hold; more are answered 413 before
	// any is applied. A $batch body may be up to MaxBatchRequests × MaxBodyBytes.
	// Defaults to 100.
	MaxBatchRequests int

	// ShuffleBatchResponses answers a $batch's items in a random order (deterministic under
	// Seed) instead of the order they were sent; a client must match answers by id.
	ShuffleBatchResponses bool

	// BatchErrorRate, BatchRateLimitRate and BatchResetRate are the fractions in [0,1] of
	// $batch POSTs answered 500/503, answered 429, or reset, as a whole and before any item
	// is processed. The single-request rates apply to each item instead; see Faults.
	BatchErrorRate     float64
	BatchRateLimitRate float64
	BatchResetRate     float64

	// BatchMissingRate is the fraction in [0,1] of $batch items left out of the answer, and
	// BatchMissingAppliedRate the fraction in [0,1] of those that were applied to state
	// first; see Faults.
	BatchMissingRate        float64
	BatchMissingAppliedRate float64

	// Seed seeds the random source of faults and of StartOtherUsers. Zero means a
	// time-based seed.
	Seed int64

	// MaxBodyBytes caps request bodies; larger ones are answered 413. Defaults to 1 MiB.
	MaxBodyBytes int64

	// RequestLogSize is how many requests the log keeps (the latest ones), so a long demo
	// cannot grow memory without limit. Negative disables the log. Defaults to 1,000,000.
	RequestLogSize int
}

// Sim is an in-memory REST API of JSON objects that enforces ETags. It implements
// http.Handler; serve it with httptest.NewServer or an http.Server. All methods are safe for
// concurrent use.
type Sim struct {
	opts       Options
	prefix     string // escaped ItemPrefix, e.g. "/items"
	itemPrefix string // prefix + "/"
	retryAfter string // Retry-After header value in whole seconds
	batchPath  string // escaped BatchPath, e.g. "/$batch"; "" when BatchWrites is off
	batchRoot  string // the folder of batchPath, e.g. "/"

	// mu guards everything below. One mutex is enough: critical sections are short and
	// never include Latency or I/O.
	mu         sync.Mutex
	rng        *rand.Rand
	faults     Faults
	hooks      Hooks
	mb         *misbehavior // replaced, never modified
	batchSeq   int64        // numbers $batch POSTs, never reset
	errorCount uint64       // alternates injected errors between 500 and 503
	resources  map[string]*resource
	ids        []string // the keys of resources, for O(1) random picks
	history    map[string][]Version
	etagSeq    uint64 // never reset, so ETags never repeat
	editSeq    uint64 // numbers the values written by StartOtherUsers
	inflight   map[string]int
	stats      Stats
	log        requestLog
	idem       idempotencyCache
}

// New returns a Sim configured by opts. It panics if opts are invalid (ConflictStatus other
// than 0, 409 or 412; a rate outside [0,1]; a negative Latency; an ItemPrefix of "/" or
// under "/_sim"), since that is a programming error to be caught at start-up.
func New(opts Options) *Sim {
	if opts.ItemPrefix == "" {
		opts.ItemPrefix = defaultItemPrefix
	}
	if !strings.HasPrefix(opts.ItemPrefix, "/") {
		opts.ItemPrefix = "/" + opts.ItemPrefix
	}
	opts.ItemPrefix = strings.TrimRight(opts.ItemPrefix, "/")
	if opts.ItemPrefix == "" || opts.ItemPrefix == "/_sim" || strings.HasPrefix(opts.ItemPrefix, adminPrefix) {
		panic(fmt.Sprintf("remotesim: ItemPrefix %q: must be a path other than / and outside /_sim", opts.ItemPrefix))
	}
	switch opts.ConflictStatus {
	case 0:
		opts.ConflictStatus = http.StatusPreconditionFailed
	case http.StatusConflict, http.StatusPreconditionFailed:
	default:
		panic(fmt.Sprintf("remotesim: ConflictStatus %d: must be 409 or 412", opts.ConflictStatus))
	}
	faults := Faults{
		ErrorRate: opts.ErrorRate, RateLimitRate: opts.RateLimitRate, ResetRate: opts.ResetRate,
		DropAfterCommitRate: opts.DropAfterCommitRate, Latency: opts.Latency,
		BatchErrorRate: opts.BatchErrorRate, BatchRateLimitRate: opts.BatchRateLimitRate,
		BatchResetRate: opts.BatchResetRate, BatchMissingRate: opts.BatchMissingRate,
		BatchMissingAppliedRate: opts.BatchMissingAppliedRate,
	}
	if p := faults.problem(); p != "" {
		panic("remotesim: " + p)
	}
	if opts.RetryAfter <= 0 {
		opts.RetryAfter = time.Second
	}
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = defaultMaxBodyBytes
	}
	if opts.RequestLogSize == 0 {
		opts.RequestLogSize = defaultRequestLogSize
	}
	if opts.MaxBatchRequests < 0 {
		panic(fmt.Sprintf("remotesim: MaxBatchRequests %d: must not be negative", opts.MaxBatchRequests))
	}
	if opts.MaxBatchRequests == 0 {
		opts.MaxBatchRequests = defaultMaxBatchRequests
	}
	if opts.BatchPath == "" {
		opts.BatchPath = defaultBatchPath
	}
	if !strings.HasPrefix(opts.BatchPath, "/") {
		opts.BatchPath = "/" + opts.BatchPath
	}
	if b := opts.BatchPath; b == "/" || b == opts.ItemPrefix || strings.HasPrefix(b, opts.ItemPrefix+"/") ||
		b == "/_sim" || strings.HasPrefix(b, adminPrefix) {
		panic(fmt.Sprintf("remotesim: BatchPath %q: must be a path other than /, outside ItemPrefix and /_sim", b))
	}
	mb := newMisbehavior(opts.Misbehavior)
	seed := opts.Seed
	if seed == 0 {
		seed = time.Now().UnixNano()
	}
	prefix := (&url.URL{Path: opts.ItemPrefix}).EscapedPath()
	var batchPath, batchRoot string
	if opts.BatchWrites {
		batchPath = (&url.URL{Path: opts.BatchPath}).EscapedPath()
		batchRoot = batchPath[:strings.LastIndexByte(batchPath, '/')+1]
	}
	return &Sim{
		opts:       opts,
		prefix:     prefix,
		itemPrefix: prefix + "/",
		batchPath:  batchPath,
		batchRoot:  batchRoot,
		mb:         mb,
		retryAfter: strconv.FormatInt(max(1, int64(math.Ceil(opts.RetryAfter.Seconds()))), 10),
		rng:        rand.New(rand.NewPCG(uint64(seed), uint64(seed)^0x9e3779b97f4a7c15)),
		faults:     faults,
		hooks:      opts.Hooks,
		resources:  make(map[string]*resource),
		history:    make(map[string][]Version),
		inflight:   make(map[string]int),
		log:        requestLog{max: opts.RequestLogSize},
		idem:       idempotencyCache{max: maxIdempotencyEntries},
	}
}

// kind classifies an API request for routing and Stats.
type kind int

const (
	kindNone kind = iota // unknown path or method: answered 404 or 405
	kindGet
	kindBatchGet
	kindPatch
	kindPut
	kindDelete
	kindBatch // a $batch POST
)

// writes reports whether requests of kind k may change state.
func (k kind) writes() bool {
	return k == kindPatch || k == kindPut || k == kindDelete
}

// response is everything the Sim sends back; handlers return it so that logging, stats and
// the idempotency cache see the exact status, ETag and body. Bodies are never modified
// once built: they may be cached and shared.
type response struct {
	status     int
	etag       string
	body       []byte
	retryAfter bool
	allow      string
	location   string // a redirect's Location (Misbehavior.Status)
	// contentType replaces application/json (Misbehavior.HTMLBody).
	contentType string
	item        bool // body is a resource's representation
}

// exchange is one API request in progress. Handlers read the request from rec, body and
// query, never from the HTTP request, so that a $batch item is handled by the same code.
type exchange struct {
	kind      kind
	id        string
	body      []byte     // the body of a write, read up to MaxBodyBytes
	tooLarge  bool       // the body was larger than MaxBodyBytes
	query     url.Values // the query of a batch GET
	idemKey   string     // method+path+Idempotency-Key when the cache applies
	conflict  bool       // the answer was a stale If-Match or an existing resource on create
	handled   bool       // reached the handler: not faulted, not replayed, client still there
	committed *Version   // the version this request wrote, if it changed state
	inflight  bool       // counted in Sim.inflight under id until finish
	item      bool       // a $batch item
	mb        *misbehavior
	auth      string // the Authorization header, kept only while EchoAuthorization needs it
	resp      response
	rec       Request
	slot      logSlot // the request's place in the log, taken on arrival
}

// ServeHTTP serves the item API under ItemPrefix and the inspection endpoints under /_sim/.
//
// An API request is handled in this order: route, count it in flight for its resource,
// sleep Latency, inject a fault (reset, error, rate limit), replay an idempotent response,
// run the method against state, run Hooks.AfterCommitFunc if state changed, then answer
// (or drop the connection after the commit), misbehaving as Misbehavior says. A $batch
// POST runs each of its items through the same steps after its own Latency and fault.
func (s *Sim) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.EscapedPath()
	if strings.HasPrefix(path, adminPrefix) {
		s.serveAdmin(w, r, path)
		return
	}

	x := exchange{rec: Request{
		Method:         r.Method,
		Path:           path,
		IfMatch:        r.Header.Get("If-Match"),
		IfNoneMatch:    r.Header.Get("If-None-Match"),
		IdempotencyKey: r.Header.Get("Idempotency-Key"),
		Start:          time.Now(),
	}}
	if r.Header.Get("Authorization") != "" {
		// Only the fact is kept: the simulator must never hold a credential.
		x.rec.Authorization = "present"
	}
	x.kind, x.id, x.resp = s.route(r.Method, path)
	x.rec.ID = x.id

	s.mu.Lock()
	x.mb = s.mb
	x.rec.Fault = s.drawFaultLocked(x.kind)
	latency := s.faults.Latency
	if x.id != "" {
		x.inflight = true
		n := s.inflight[x.id] + 1
		s.inflight[x.id] = n
		s.stats.MaxInFlightPerResource = max(s.stats.MaxInFlightPerResource, n)
	}
	if x.kind == kindBatch {
		s.batchSeq++
		x.rec.Batch = s.batchSeq
	}
	x.slot = s.log.reserve(&x.rec)
	s.mu.Unlock()
	if x.mb.EchoAuthorization || x.mb.ETagEchoesAuthorization {
		x.auth = r.Header.Get("Authorization")
	}

	if latency > 0 && !sleep(r, latency) {
		x.rec.Status = statusClientClosed
		x.rec.End = time.Now()
		s.finish(&x)
		return
	}

	switch x.rec.Fault {
	case faultReset:
		x.rec.End = time.Now()
		s.finish(&x)
		resetConn(w)
		return
	case faultError:
		x.resp = s.errorFault()
	case faultRateLimit:
		x.resp = response{status: http.StatusTooManyRequests, body: bodyRateLimited, retryAfter: true}
	default:
		if refused, ok := x.mb.refusal(&x); ok {
			x.resp = refused
		} else if x.kind != kindNone {
			s.handle(w, r, &x)
		}
	}

	if x.committed != nil {
		s.afterCommit(r.Context(), &x)
	}
	if x.rec.Fault == faultDropAfterCommit {
		if x.committed != nil {
			x.rec.End = time.Now()
			s.finish(&x)
			resetConn(w)
			return
		}
		x.rec.Fault = "" // nothing changed, so there is nothing to drop
	}

	s.answer(w, r, &x)
	x.rec.Status = x.resp.status
	x.rec.End = time.Now()
	s.finish(&x)
}

// route maps a method and escaped path to a kind and decoded id. For kindNone it also
// returns the 404 or 405 to send.
func (s *Sim) route(method, path string) (kind, string, response) {
	if s.batchPath != "" && path == s.batchPath {
		if method != http.MethodPost {
			return kindNone, "", response{status: http.StatusMethodNotAllowed, body: bodyMethodNotAllowed, allow: http.MethodPost}
		}
		return kindBatch, "", response{}
	}
	if path == s.prefix {
		if method != http.MethodGet {
			return kindNone, "", response{status: http.StatusMethodNotAllowed, body: bodyMethodNotAllowed, allow: http.MethodGet}
		}
		return kindBatchGet, "", response{}
	}
	seg, ok := strings.CutPrefix(path, s.itemPrefix)
	// The id is exactly one escaped segment: a raw "/" after the prefix is another path, so
	// an id can never address a different resource.
	if !ok || seg == "" || strings.Contains(seg, "/") {
		return kindNone, "", response{status: http.StatusNotFound, body: bodyNotFound}
	}
	id, err := url.PathUnescape(seg)
	if err != nil || id == "" {
		return kindNone, "", response{status: http.StatusNotFound, body: bodyNotFound}
	}
	switch method {
	case http.MethodGet:
		return kindGet, id, response{}
	case http.MethodPatch:
		return kindPatch, id, response{}
	case http.MethodPut:
		return kindPut, id, response{}
	case http.MethodDelete:
		return kindDelete, id, response{}
	default:
		return kindNone, "", response{status: http.StatusMethodNotAllowed, body: bodyMethodNotAllowed, allow: "GET, PATCH, PUT, DELETE"}
	}
}

// handle reads what the handlers need from r and applies x.
func (s *Sim) handle(w http.ResponseWriter, r *http.Request, x *exchange) {
	switch {
	case x.kind == kindBatch:
		x.handled = true
		s.serveBatch(w, r, x)
		return
	case x.kind == kindBatchGet:
		x.query = r.URL.Query()
	case x.kind == kindPatch || x.kind == kindPut:
		x.body, x.tooLarge = readBody(w, r, s.opts.MaxBodyBytes)
	}
	s.apply(x)
}

// apply answers a routed, unfaulted API request into x.resp: it replays an idempotent
// response or runs the method against state.
func (s *Sim) apply(x *exchange) {
	if x.kind.writes() {
		if s.opts.IdempotencyCache && x.rec.IdempotencyKey != "" {
			x.idemKey = x.rec.Method + " " + x.rec.Path + " " + x.rec.IdempotencyKey
			s.mu.Lock()
			cached, ok := s.idem.get(x.idemKey)
			s.mu.Unlock()
			if ok {
				x.resp = cached
				x.rec.Replayed = true
				return
			}
		}
	}
	x.handled = true
	switch x.kind {
	case kindGet:
		x.resp = s.serveGet(x.id, x.rec.IfNoneMatch)
	case kindBatchGet:
		x.resp = s.serveBatchGet(x.query, x.mb)
	case kindPatch:
		s.servePatch(x)
	case kindPut:
		s.servePut(x)
	case kindDelete:
		s.serveDelete(x)
	}
	x.rec.Committed = x.committed != nil
}

// finish ends an API request: it leaves the in-flight count, updates Stats, caches an
// idempotent response and appends the request log, all in one critical section.
func (s *Sim) finish(x *exchange) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if x.inflight {
		if n := s.inflight[x.id] - 1; n > 0 {
			s.inflight[x.id] = n
		} else {
			delete(s.inflight, x.id)
		}
	}
	st := &s.stats
	if x.item {
		st.BatchItems++
	} else {
		st.Requests++
	}
	if x.rec.Fault != "" {
		st.Faults++
	}
	if x.rec.Fault == faultDropAfterCommit {
		st.DroppedAfterCommit++
	}
	switch {
	case x.rec.Fault != "" && !x.handled:
		// Answered by the fault alone.
	case x.rec.Replayed:
		st.Replays++
	case x.handled:
		switch x.kind {
		case kindGet:
			st.Gets++
		case kindBatchGet:
			st.BatchGets++
		case kindPatch:
			st.Patches++
		case kindPut:
			st.Puts++
		case kindDelete:
			st.Deletes++
		case kindBatch:
			st.BatchPosts++
		}
		if x.resp.status == http.StatusCreated {
			st.Creates++
		}
		if x.resp.status == http.StatusPreconditionRequired {
			st.PreconditionRequired++
		}
		if x.resp.status == http.StatusNotModified {
			st.NotModified++
		}
		if x.conflict {
			st.Conflicts++
		}
		if x.idemKey != "" && x.resp.status >= 200 && x.resp.status < 300 {
			s.idem.put(x.idemKey, x.resp)
		}
	}
	s.log.complete(x.slot, &x.rec)
}

// write sends resp as it is, for the inspection endpoints. Bodies are always JSON.
func (s *Sim) write(w http.ResponseWriter, resp *response) {
	h := w.Header()
	if resp.etag != "" {
		h.Set("ETag", resp.etag)
	}
	if resp.retryAfter {
		h.Set("Retry-After", s.retryAfter)
	}
	if resp.allow != "" {
		h.Set("Allow", resp.allow)
	}
	if resp.body != nil {
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(resp.body)))
	}
	w.WriteHeader(resp.status)
	if resp.body != nil {
		// A write error means the client went away; there is no one left to tell.
		_, _ = w.Write(resp.body)
	}
}

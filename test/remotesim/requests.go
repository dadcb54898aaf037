package remotesim

import "time"

// Request is one API request as the Sim saw it: a single HTTP request, a $batch POST, or
// one item of a $batch (logged after its POST, in the order the items were run). Requests
// to /_sim/ are not recorded.
type Request struct {
	Method string `json:"method"`
	// Path is the escaped request path (of a $batch item: its url as an absolute path,
	// without the query).
	Path string `json:"path"`
	// ID is the decoded resource id of an item request; empty otherwise.
	ID             string `json:"id"`
	IfMatch        string `json:"if_match"`
	IfNoneMatch    string `json:"if_none_match"`
	IdempotencyKey string `json:"idempotency_key"`
	// Authorization is "present" if the request carried an Authorization header, else
	// empty. The value itself is never kept.
	Authorization string `json:"authorization"`
	// Status is the status sent; 0 for a reset connection (also after a commit), 499 if
	// the client went away during Latency (nothing is sent then).
	Status int `json:"status"`
	// Fault is the injected fault: "", "error", "ratelimit", "reset", "drop-after-commit",
	// or for a $batch item "missing" (left out of the answer unprocessed) or
	// "missing-applied" (processed, then left out). An item without an answer has Status 0.
	Fault string `json:"fault"`
	// Committed reports that the request changed state: its version is in History, whether
	// or not its answer reached the client.
	Committed bool `json:"committed"`
	// Start is when the request arrived; End is when its response was written (or the
	// connection reset), so End-Start includes Latency.
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	// Replayed marks a response replayed from the idempotency cache.
	Replayed bool `json:"replayed"`
	// Batch numbers the $batch POST (1, 2, …) on the POST itself and on each of its items;
	// 0 for single requests.
	Batch int64 `json:"batch"`
	// BatchItem is the "id" of a $batch item; empty for the POST and single requests.
	BatchItem string `json:"batch_item"`
}

// Stats counts API requests since New or Reset. Requests to /_sim/ are not counted. A
// $batch item is counted like the same single request in every counter but Requests.
type Stats struct {
	// Requests counts every HTTP request to the API, including faulted ones, unknown paths
	// and $batch POSTs (once each, whatever they hold): the requests a client paid for.
	Requests int `json:"requests"`
	// BatchPosts counts $batch POSTs that reached the batch logic (not faulted as a whole);
	// BatchItems counts the items run inside them.
	BatchPosts int `json:"batch_posts"`
	BatchItems int `json:"batch_items"`
	// Gets, BatchGets, Patches, Puts and Deletes count requests of that kind that reached
	// the resource logic, whatever their status: faulted and replayed requests are not
	// included. Puts includes creates.
	Gets      int `json:"gets"`
	BatchGets int `json:"batch_gets"`
	Patches   int `json:"patches"`
	Puts      int `json:"puts"`
	// Creates counts PUTs with If-None-Match: * that created a resource (201).
	Creates int `json:"creates"`
	Deletes int `json:"deletes"`
	// Conflicts counts stale If-Match answers (ConflictStatus) and creates refused because
	// the resource exists (412).
	Conflicts int `json:"conflicts"`
	// PreconditionRequired counts writes refused for lack of If-Match (428).
	PreconditionRequired int `json:"precondition_required"`
	// NotModified counts GETs answered 304 because If-None-Match matched.
	NotModified int `json:"not_modified"`
	// Faults counts requests with an injected fault: answered by the fault (error, rate
	// limit), reset, or dropped after their commit.
	Faults int `json:"faults"`
	// DroppedAfterCommit counts writes that changed state and then had their connection
	// reset without an answer (DropAfterCommitRate). They are also counted in Faults and in
	// their kind (Patches, Puts, Deletes).
	DroppedAfterCommit int `json:"dropped_after_commit"`
	// Replays counts responses replayed from the idempotency cache.
	Replays int `json:"replays"`
	// MaxInFlightPerResource is the most requests ever in progress at once for a single
	// resource, counted from routing until the handler returns (Latency included); a $batch
	// item counts from the moment its batch is read until the item is done. 1 proves a
	// client never overlapped requests to one resource.
	MaxInFlightPerResource int `json:"max_in_flight_per_resource"`
}

// Requests returns a copy of the request log in arrival order. Requests still in progress
// are left out until they finish. Only the latest Options.RequestLogSize requests are kept.
func (s *Sim) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.snapshot()
}

// Stats returns the counters since New or Reset.
func (s *Sim) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// requestLog is a ring buffer of the latest max requests. A request takes its slot when it
// arrives, so the log is in arrival order, and fills it in when it finishes.
type requestLog struct {
	max   int
	buf   []Request
	total uint64 // requests ever reserved since the last reset
	gen   uint64 // bumped by reset, so a request that began before it cannot write after
}

// logSlot identifies a reserved entry.
type logSlot struct {
	gen, seq uint64
	ok       bool
}

// reserve takes the next slot for r, evicting the oldest entry once the log is full.
func (l *requestLog) reserve(r *Request) logSlot {
	if l.max <= 0 {
		return logSlot{}
	}
	seq := l.total
	l.total++
	if len(l.buf) < l.max {
		l.buf = append(l.buf, *r)
	} else {
		l.buf[seq%uint64(l.max)] = *r
	}
	return logSlot{gen: l.gen, seq: seq, ok: true}
}

// complete stores the finished r in its slot, unless the slot was evicted or reset since.
func (l *requestLog) complete(slot logSlot, r *Request) {
	if !slot.ok || slot.gen != l.gen || l.total-slot.seq > uint64(len(l.buf)) {
		return
	}
	l.buf[slot.seq%uint64(l.max)] = *r
}

// snapshot copies the finished entries, oldest first. An entry is finished once End is set.
func (l *requestLog) snapshot() []Request {
	out := make([]Request, 0, len(l.buf))
	oldest := 0
	if len(l.buf) == l.max && l.max > 0 {
		oldest = int(l.total % uint64(l.max))
	}
	for _, part := range [][]Request{l.buf[oldest:], l.buf[:oldest]} {
		for i := range part {
			if !part[i].End.IsZero() {
				out = append(out, part[i])
			}
		}
	}
	return out
}

func (l *requestLog) reset() {
	l.buf = nil
	l.total = 0
	l.gen++
}

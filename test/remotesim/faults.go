package remotesim

import (
	"fmt"
	"net"
	"net/http"
	"time"
)

// Fault names, as recorded in Request.Fault.
const (
	faultReset     = "reset"
	faultError     = "error"
	faultRateLimit = "ratelimit"
	// faultDropAfterCommit is a write that changed state and whose connection was then
	// reset without an answer.
	faultDropAfterCommit = "drop-after-commit"
	// faultMissing is a $batch item left out of the answer without being processed.
	faultMissing = "missing"
	// faultMissingApplied is a $batch item processed against state (it may or may not have
	// changed it) and then left out of the answer.
	faultMissingApplied = "missing-applied"
)

// Faults are the fault-injection settings that can change while the Sim serves; see the
// fields of the same names in Options. A $batch item is a request like any other: it draws
// ErrorRate, RateLimitRate and DropAfterCommitRate (never ResetRate: it has no connection of
// its own), then BatchMissingRate. The $batch POST itself draws only the Batch… rates of
// the POST.
type Faults struct {
	// ErrorRate is the fraction in [0,1] of API requests and $batch items answered 500 or
	// 503.
	ErrorRate float64
	// RateLimitRate is the fraction in [0,1] of API requests and $batch items answered 429.
	RateLimitRate float64
	// ResetRate is the fraction in [0,1] of single API requests whose connection is reset.
	ResetRate float64
	// DropAfterCommitRate is the fraction in [0,1] of writes (single or $batch item) that
	// change state and then go unanswered: a reset connection, or an item missing from the
	// $batch answer.
	DropAfterCommitRate float64
	// Latency is added to every API request; a $batch POST waits it once, not per item.
	Latency time.Duration

	// BatchErrorRate is the fraction in [0,1] of $batch POSTs answered 500 or 503 as a
	// whole, before any item is processed.
	BatchErrorRate float64
	// BatchRateLimitRate is the fraction in [0,1] of $batch POSTs answered 429 as a whole.
	BatchRateLimitRate float64
	// BatchResetRate is the fraction in [0,1] of $batch POSTs whose connection is reset
	// before any item is processed.
	BatchResetRate float64
	// BatchMissingRate is the fraction in [0,1] of $batch items left out of the answer
	// (logged with Fault "missing" or "missing-applied").
	BatchMissingRate float64
	// BatchMissingAppliedRate is the fraction in [0,1] of those missing items that were
	// processed against state before being left out ("missing-applied"); the others were
	// never processed ("missing").
	BatchMissingAppliedRate float64
}

// problem describes what is wrong with f, or returns "" if f is valid. It is a string,
// not an error, because invalid Faults are a programming error reported by panic.
func (f Faults) problem() string {
	for _, r := range []struct {
		name string
		v    float64
	}{
		{"ErrorRate", f.ErrorRate}, {"RateLimitRate", f.RateLimitRate}, {"ResetRate", f.ResetRate},
		{"DropAfterCommitRate", f.DropAfterCommitRate}, {"BatchErrorRate", f.BatchErrorRate},
		{"BatchRateLimitRate", f.BatchRateLimitRate}, {"BatchResetRate", f.BatchResetRate},
		{"BatchMissingRate", f.BatchMissingRate}, {"BatchMissingAppliedRate", f.BatchMissingAppliedRate},
	} {
		if !(r.v >= 0 && r.v <= 1) { // also rejects NaN
			return fmt.Sprintf("%s %v: must be in [0,1]", r.name, r.v)
		}
	}
	if f.Latency < 0 {
		return fmt.Sprintf("Latency %v: must not be negative", f.Latency)
	}
	return ""
}

// SetFaults replaces the fault rates and latency for requests that arrive from now on. It
// panics if a rate is outside [0,1] or Latency is negative.
func (s *Sim) SetFaults(f Faults) {
	if p := f.problem(); p != "" {
		panic("remotesim: SetFaults: " + p)
	}
	s.mu.Lock()
	s.faults = f
	s.mu.Unlock()
}

// drawFaultLocked decides the fault for one request of kind k, in the order reset, error,
// rate limit, drop after commit (writes only). A zero rate draws nothing, so enabling one
// fault does not shift the others' sequence. A drop after commit is only a candidate: it
// happens only if the write changes state.
func (s *Sim) drawFaultLocked(k kind) string {
	f := &s.faults
	if k == kindBatch {
		return s.drawBatchFaultLocked()
	}
	switch {
	case f.ResetRate > 0 && s.rng.Float64() < f.ResetRate:
		return faultReset
	case f.ErrorRate > 0 && s.rng.Float64() < f.ErrorRate:
		return faultError
	case f.RateLimitRate > 0 && s.rng.Float64() < f.RateLimitRate:
		return faultRateLimit
	case k.writes() && f.DropAfterCommitRate > 0 && s.rng.Float64() < f.DropAfterCommitRate:
		return faultDropAfterCommit
	}
	return ""
}

// drawBatchFaultLocked decides the fault of a $batch POST as a whole, in the order reset,
// error, rate limit.
func (s *Sim) drawBatchFaultLocked() string {
	f := &s.faults
	switch {
	case f.BatchResetRate > 0 && s.rng.Float64() < f.BatchResetRate:
		return faultReset
	case f.BatchErrorRate > 0 && s.rng.Float64() < f.BatchErrorRate:
		return faultError
	case f.BatchRateLimitRate > 0 && s.rng.Float64() < f.BatchRateLimitRate:
		return faultRateLimit
	}
	return ""
}

// drawItemFaultLocked decides the fault of one $batch item of kind k, in the order error,
// rate limit, drop after commit (writes only), missing.
func (s *Sim) drawItemFaultLocked(k kind) string {
	f := &s.faults
	switch {
	case f.ErrorRate > 0 && s.rng.Float64() < f.ErrorRate:
		return faultError
	case f.RateLimitRate > 0 && s.rng.Float64() < f.RateLimitRate:
		return faultRateLimit
	case k.writes() && f.DropAfterCommitRate > 0 && s.rng.Float64() < f.DropAfterCommitRate:
		return faultDropAfterCommit
	case f.BatchMissingRate > 0 && s.rng.Float64() < f.BatchMissingRate:
		if f.BatchMissingAppliedRate > 0 && s.rng.Float64() < f.BatchMissingAppliedRate {
			return faultMissingApplied
		}
		return faultMissing
	}
	return ""
}

// errorFault answers an injected error: 500 and 503 alternately, starting with 500.
func (s *Sim) errorFault() response {
	s.mu.Lock()
	s.errorCount++
	n := s.errorCount
	s.mu.Unlock()
	if n%2 == 1 {
		return response{status: http.StatusInternalServerError, body: bodyInternalError}
	}
	return response{status: http.StatusServiceUnavailable, body: bodyServiceUnavailable, retryAfter: true}
}

// resetConn drops the connection without a response. Linger 0 makes the close a TCP RST,
// which is what a crashing load balancer looks like to the client.
func resetConn(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// Not hijackable (e.g. HTTP/2): the server aborts the stream instead.
		panic(http.ErrAbortHandler)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // best effort: a plain close still ends the exchange
	}
	_ = conn.Close()
}

// sleep waits d or until the request's context ends; it reports whether d elapsed.
func sleep(r *http.Request, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

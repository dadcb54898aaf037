package processor

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Attempt accounting (changes.attempts). An attempt is a request that
// carried the change and failed in a way that counts: a conflict (409/412),
// a transport error, a 5xx other than 503, a 408, or a failed GET of the
// resource. Throttling answers (429, 503) and requests a paused target
// refused (never sent) do not count: a throttled change is bounded by time
// instead (give_up_after). The count is exact: after max_attempts counted
// attempts the change ends dead with attempts = max_attempts, and no
// further request is sent for it.

// throttled reports whether resp is a throttling answer, a refused
// credential (the target pauses for it alike) or a refusal by a paused
// target: none uses up max_attempts, give_up_after bounds them instead.
func throttled(resp response) bool {
	return pausedBy(resp) != nil || !resp.notSent && (throttling(resp.status) || credentialRefused(resp.status))
}

// outOfAttempts reports whether a change of live has used all its
// attempts, counting those made in this round. Checked after a conflict,
// before the GET and rewrite it would lead to, so a change never gets one
// attempt more than max_attempts.
func (a *applier) outOfAttempts(rr *resourceRun, live []openChange) bool {
	for _, c := range live {
		n := c.attempts
		if o := rr.outcomes[c.id]; o != nil {
			n += o.addAttempts
		}
		if int(n) >= a.t.MaxAttempts {
			return true
		}
	}
	return false
}

// givenUp reports whether a change the remote keeps throttling has waited
// longer than give_up_after since it was staged.
func (a *applier) givenUp(c openChange) bool {
	return !c.stagedAt.IsZero() && a.now().Sub(c.stagedAt) >= a.t.GiveUpAfter.D()
}

// givenUpText is the last_error of a change ended by give_up_after.
func (a *applier) givenUpText(resp response, reason string) string {
	what := "the remote kept throttling"
	if p := pausedBy(resp); credentialRefused(resp.status) || p != nil && strings.Contains(p.reason, "refused the credential") {
		what = "the remote kept refusing the credential"
	}
	return fmt.Sprintf("gave up: %s for longer than give_up_after (%s) since the change was staged: %s",
		what, a.t.GiveUpAfter.D(), reason)
}

// throttleRetryAt is when a throttled resource is tried again: when the
// target's pause ends (the gate paused the target on the answer, or
// refused the request because it was paused), else after a backoff.
func (a *applier) throttleRetryAt(resp response, attempts int32) time.Time {
	// The gate's pause, not the one that refused the request: an operator
	// may have lifted that one since (stagesync.lift_pause).
	if until, paused := a.r.gate.paused(); paused {
		return until
	}
	if pausedBy(resp) != nil {
		return a.now() // the pause that refused it is over
	}
	d := resp.retryAfter
	if d <= 0 || resp.status != http.StatusTooManyRequests && resp.status != http.StatusServiceUnavailable {
		d = backoff(a.t.Backoff.Base.D(), a.t.Backoff.Max.D(), int(attempts))
	}
	return a.now().Add(min(d, maxPause))
}

// credentialRefused reports whether a status says the remote (401) or a
// proxy in front of it (407) refused the credential: a problem of the
// target, not of the change the request carried.
func credentialRefused(status int) bool {
	return status == http.StatusUnauthorized || status == http.StatusProxyAuthRequired
}

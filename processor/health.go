package processor

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/stagesync/stagesync/db"
)

// targetHealth is what this process sees of a target's answers, kept by
// its gate, written to stagesync.target_health every healthEvery and
// logged on change.
//
// A failure is an answer that says the target, not one resource, is in
// trouble: a transport error, a 5xx, 429, 408, or 401/403/407 (credentials).
// Any other answer, 404, 409, 412 and 422 included, shows the remote
// working and counts as a success.
type targetHealth struct {
	lastSuccess time.Time
	lastErrorAt time.Time
	lastError   string
	consecutive int

	// Log state: a WARN opens an episode of failures and an INFO closes
	// it; at most one WARN per target per warnEvery.
	warned     bool      // a WARN was logged for the current episode
	lastWarn   time.Time // when the last WARN was logged
	sinceWarn  int       // failures since the last WARN
	episodeAt  time.Time // first failure of the current episode
	firstError string    // its error text
}

// warnEvery rate-limits the WARN lines per target: a flapping remote makes
// at most one a minute, and each counts the failures since the last.
const warnEvery = time.Minute

// maxHealthError bounds last_error in target_health and the log lines.
const maxHealthError = 500

// targetFailure reports whether an answer (sent) counts against the
// target's health.
func targetFailure(resp response) bool {
	switch resp.status {
	case 0, http.StatusRequestTimeout, http.StatusTooManyRequests,
		http.StatusUnauthorized, http.StatusForbidden, http.StatusProxyAuthRequired:
		return true
	}
	return resp.status >= 500
}

// healthLine is a log line owed after an answer, logged outside the
// gate's lock; the zero value logs nothing.
type healthLine struct {
	level slog.Level
	msg   string
	attrs []any
}

func (l healthLine) log(ctx context.Context, logger *slog.Logger, target string) {
	if l.msg == "" || logger == nil {
		return
	}
	logger.Log(ctx, l.level, l.msg, append([]any{"target", target}, l.attrs...)...)
}

// observe records one answer and returns the log line it calls for.
func (h *targetHealth) observe(now time.Time, resp response, t *TargetConfig) healthLine {
	if !targetFailure(resp) {
		h.lastSuccess = now
		var line healthLine
		if h.consecutive > 0 && h.warned {
			line = healthLine{level: slog.LevelInfo, msg: "requests to the target succeed again", attrs: []any{
				"failed_requests", h.consecutive,
				"failing_for", now.Sub(h.episodeAt).Round(time.Millisecond).String(),
			}}
		}
		h.consecutive, h.warned = 0, false
		return line
	}
	text := healthErrorText(resp, t)
	h.lastErrorAt, h.lastError = now, text
	h.consecutive++
	h.sinceWarn++
	if h.consecutive == 1 {
		h.episodeAt, h.firstError = now, text
	}
	if !h.lastWarn.IsZero() && now.Sub(h.lastWarn) < warnEvery {
		return healthLine{}
	}
	line := healthLine{level: slog.LevelWarn, attrs: []any{
		"error", h.firstError,
		"failed_requests", h.sinceWarn,
		"consecutive_failures", h.consecutive,
	}}
	if h.warned {
		line.msg = "requests to the target are still failing"
		line.attrs[1] = text
		line.attrs = append(line.attrs, "failing_for", now.Sub(h.episodeAt).Round(time.Millisecond).String())
	} else {
		line.msg = "requests to the target are failing"
	}
	h.warned, h.lastWarn, h.sinceWarn = true, now, 0
	return line
}

// healthErrorText is an answer's error for logs and target_health:
// bounded, cleaned, and with the target's credential redacted (a remote
// may echo the request's headers in its error body).
func healthErrorText(resp response, t *TargetConfig) string {
	s := errText(resp.err)
	if s == "" {
		s = fmt.Sprintf("status %d", resp.status)
	}
	return cleanText(t.redact(s), maxHealthError)
}

// healthEvery is how often each process writes its target_health rows and
// refreshes its gauges.
const healthEvery = 2 * time.Second

// writeHealth upserts this process's target_health row of every target
// and refreshes the in-flight and rate-share gauges.
func (p *Processor) writeHealth(ctx context.Context) error {
	for _, name := range p.cfg.TargetNames() {
		t := p.cfg.Targets[name]
		st := p.remotes[name].gate.state()
		p.metrics.setInflightLimit(name, st.limit)
		arg := db.TargetHealthUpsertParams{
			Target: name, ClientID: p.live.clientID,
			InflightLimit: int32(st.limit), Concurrency: int32(t.Concurrency),
			ConsecutiveFailures: int32(st.health.consecutive),
		}
		if st.share > 0 {
			arg.RateShare = pgtype.Float8{Float64: st.share, Valid: true}
		}
		if !st.health.lastSuccess.IsZero() {
			arg.LastSuccessAt = &st.health.lastSuccess
		}
		if !st.health.lastErrorAt.IsZero() {
			arg.LastErrorAt = &st.health.lastErrorAt
			arg.LastError = &st.health.lastError
		}
		if err := p.q.TargetHealthUpsert(ctx, p.pool, arg); err != nil {
			return fmt.Errorf("write health of target %q: %w", name, err)
		}
	}
	return nil
}

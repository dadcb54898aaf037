package processor

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"regexp"
	"strconv"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"
	"go.yaml.in/yaml/v3"

	"github.com/stagesync/stagesync/db"
)

// RetentionConfig says how long stagesync keeps finished changes and audit
// rows (issue 10 §5), and how its periodic cleanup deletes the older ones.
// Without it, changes, attempts and merges grow forever. resources rows are
// state, never deleted.
type RetentionConfig struct {
	// Finished is how long a change is kept once it reached a terminal state
	// (applied, merged, noop, dead or rejected), counted from finished_at.
	// Pending and processing changes are never deleted. An idempotency key
	// is remembered as long as its change is kept. Defaults to 30d.
	Finished RetentionPeriod `yaml:"finished"`
	// Audit is how long attempts and merges rows are kept, counted from
	// created_at. Defaults to 90d.
	Audit RetentionPeriod `yaml:"audit"`
	// Interval is how often the cleanup runs (in one process of those
	// sharing the database: River's leader schedules it). Defaults to 1h.
	Interval Duration `yaml:"interval" zero:"default"`
	// BatchSize is the most rows one DELETE statement removes, each in its
	// own short transaction. Defaults to 5000.
	BatchSize int `yaml:"batch_size" zero:"default"`
	// Pause is the wait between two full batches, which leaves the database
	// to the processor; between 1ms and 1m. Defaults to 100ms.
	Pause Duration `yaml:"pause" zero:"default"`
}

// TargetRetention overrides the global periods for one target's rows; a
// key left out follows the global one.
type TargetRetention struct {
	// Finished overrides RetentionConfig.Finished.
	Finished RetentionPeriod `yaml:"finished"`
	// Audit overrides RetentionConfig.Audit.
	Audit RetentionPeriod `yaml:"audit"`
}

// RetentionPeriod is how long rows are kept: a whole number of days (30d),
// a Go duration (12h, 90m), or off (also 0) to keep them forever. A period
// is at least an hour.
type RetentionPeriod struct {
	raw  string
	set  bool
	keep time.Duration
}

// UnmarshalYAML keeps the text; validation parses it, so that an error can
// name the key.
func (p *RetentionPeriod) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: a retention period is a value like 30d, 12h or off", n.Line)
	}
	p.raw, p.set = n.Value, true
	return nil
}

// Keep returns the period; 0 means the rows are kept forever.
func (p RetentionPeriod) Keep() time.Duration { return p.keep }

// String returns the period as configured: off, or days when whole.
func (p RetentionPeriod) String() string {
	switch {
	case p.keep == 0:
		return "off"
	case p.keep%(24*time.Hour) == 0:
		return strconv.FormatInt(int64(p.keep/(24*time.Hour)), 10) + "d"
	default:
		return p.keep.String()
	}
}

var daysRE = regexp.MustCompile(`^([0-9]+)d$`)

// minRetention keeps a typo (10s for 10d) from emptying the tables.
const minRetention = time.Hour

func (p *RetentionPeriod) parse() error {
	switch p.raw {
	case "off", "0":
		p.keep = 0
		return nil
	}
	if m := daysRE.FindStringSubmatch(p.raw); m != nil {
		days, err := strconv.ParseInt(m[1], 10, 64)
		if err != nil || days > math.MaxInt64/int64(24*time.Hour) {
			return fmt.Errorf("%q is too long a period", p.raw)
		}
		p.keep = time.Duration(days) * 24 * time.Hour
	} else {
		d, err := time.ParseDuration(p.raw)
		if err != nil {
			return fmt.Errorf("%q is not a period like 30d, 12h or off", p.raw)
		}
		p.keep = d
	}
	if p.keep < minRetention {
		return fmt.Errorf("must be off or at least 1h, got %s", p.raw)
	}
	return nil
}

// validate applies the defaults and checks the global retention.
func (r *RetentionConfig) validate() []keyError {
	var errs []keyError
	for _, f := range []struct {
		key string
		p   *RetentionPeriod
		def string
	}{{"finished", &r.Finished, "30d"}, {"audit", &r.Audit, "90d"}} {
		if !f.p.set {
			*f.p = RetentionPeriod{raw: f.def, set: true}
		}
		if err := f.p.parse(); err != nil {
			errs = append(errs, keyError{f.key, err.Error()})
		}
	}
	defaultDuration(&r.Interval, time.Hour)
	if r.Interval.D() < time.Minute {
		errs = append(errs, keyError{"interval", "must be at least 1m"})
	}
	defaultInt(&r.BatchSize, 5000)
	if r.BatchSize < 1 || r.BatchSize > 100000 {
		errs = append(errs, keyError{"batch_size", "must be between 1 and 100000"})
	}
	defaultDuration(&r.Pause, 100*time.Millisecond)
	if r.Pause.D() < time.Millisecond || r.Pause.D() > time.Minute {
		errs = append(errs, keyError{"pause", "must be between 1ms and 1m"})
	}
	return errs
}

// validate checks a target's overrides; keys are relative to the target.
func (r *TargetRetention) validate() []keyError {
	var errs []keyError
	for _, f := range []struct {
		key string
		p   *RetentionPeriod
	}{{"retention.finished", &r.Finished}, {"retention.audit", &r.Audit}} {
		if !f.p.set {
			continue
		}
		if err := f.p.parse(); err != nil {
			errs = append(errs, keyError{f.key, err.Error()})
		}
	}
	return errs
}

// retentionFor returns the periods that apply to a target's rows: its
// overrides, else the global ones (also for a registered target that this
// process does not configure).
func (c *Config) retentionFor(target string) (finished, audit time.Duration) {
	finished, audit = c.Retention.Finished.Keep(), c.Retention.Audit.Keep()
	if t := c.Targets[target]; t != nil {
		if t.Retention.Finished.set {
			finished = t.Retention.Finished.Keep()
		}
		if t.Retention.Audit.set {
			audit = t.Retention.Audit.Keep()
		}
	}
	return finished, audit
}

// retentionEnabled says whether any period deletes anything.
func (c *Config) retentionEnabled() bool {
	if c.Retention.Finished.Keep() > 0 || c.Retention.Audit.Keep() > 0 {
		return true
	}
	for name := range c.Targets {
		if f, a := c.retentionFor(name); f > 0 || a > 0 {
			return true
		}
	}
	return false
}

// RetentionArgs is the periodic cleanup job.
type RetentionArgs struct{}

// Kind implements river.JobArgs.
func (RetentionArgs) Kind() string { return "stagesync_retention" }

// retentionPeriodicJobs returns the cleanup's periodic job, or none when
// every period is off. At most one cleanup job is live at a time, whichever
// process inserted it.
func retentionPeriodicJobs(cfg *Config) []*river.PeriodicJob {
	if !cfg.retentionEnabled() {
		return nil
	}
	return []*river.PeriodicJob{river.NewPeriodicJob(
		river.PeriodicInterval(cfg.Retention.Interval.D()),
		func() (river.JobArgs, *river.InsertOpts) {
			return RetentionArgs{}, &river.InsertOpts{UniqueOpts: river.UniqueOpts{ByState: []rivertype.JobState{
				rivertype.JobStateAvailable, rivertype.JobStatePending, rivertype.JobStateRetryable,
				rivertype.JobStateRunning, rivertype.JobStateScheduled,
			}}}
		},
		&river.PeriodicJobOpts{RunOnStart: true})}
}

type retentionWorker struct {
	river.WorkerDefaults[RetentionArgs]
	p *Processor
}

// retentionBudget bounds one run, well inside the job timeout
// (dispatch.rescue_after); a run that stops with rows left snoozes and
// goes on shortly, so a large first cleanup finishes in slices.
func (w *retentionWorker) retentionBudget() time.Duration {
	return min(w.p.cfg.Dispatch.RescueAfter.D()/2, time.Minute)
}

func (w *retentionWorker) Work(ctx context.Context, _ *river.Job[RetentionArgs]) error {
	rep, err := w.p.cleanup(ctx, time.Now(), time.Now().Add(w.retentionBudget()))
	if err != nil {
		return err
	}
	if rep.More {
		return river.JobSnooze(w.p.cfg.Retention.Pause.D())
	}
	return nil
}

// retentionCounts are the rows one cleanup run deleted for one target.
type retentionCounts struct {
	Changes  int64 `json:"changes"`
	Attempts int64 `json:"attempts"`
	Merges   int64 `json:"merges"`
	// BatchRequests are batch POSTs (stagesync.batch_requests), audit
	// rows like attempts.
	BatchRequests int64 `json:"batch_requests"`
	// FinishedBefore and AuditBefore are the cutoffs; absent when off.
	FinishedBefore *time.Time `json:"finished_before,omitempty"`
	AuditBefore    *time.Time `json:"audit_before,omitempty"`
}

// retentionReport is one cleanup run, as recorded in admin_actions.
type retentionReport struct {
	Targets map[string]*retentionCounts `json:"targets"`
	// More says the run stopped at its time budget with rows left.
	More bool `json:"more,omitempty"`
}

func (r *retentionReport) total() int64 {
	var n int64
	for _, c := range r.Targets {
		n += c.Changes + c.Attempts + c.Merges + c.BatchRequests
	}
	return n
}

// cleanup deletes, target by target, the finished changes and the audit
// rows older than the target's periods at now, oldest first, in batches of
// Retention.BatchSize rows with Retention.Pause between full batches,
// until nothing is left or deadline has passed. It records the run in
// admin_actions.
func (p *Processor) cleanup(ctx context.Context, now, deadline time.Time) (*retentionReport, error) {
	names, err := p.q.RetentionTargets(ctx, p.pool)
	if err != nil {
		return nil, fmt.Errorf("retention: list targets: %w", err)
	}
	rep := &retentionReport{Targets: map[string]*retentionCounts{}}
	batch := int32(p.cfg.Retention.BatchSize)
	err = func() error {
		for _, name := range names {
			finished, audit := p.cfg.retentionFor(name)
			c := &retentionCounts{}
			rep.Targets[name] = c
			type step struct {
				keep time.Duration
				n    *int64
				at   **time.Time
				del  func(ctx context.Context, cutoff time.Time) (int64, error)
			}
			steps := []step{
				{finished, &c.Changes, &c.FinishedBefore, func(ctx context.Context, cutoff time.Time) (int64, error) {
					return p.q.RetentionDeleteChanges(ctx, p.pool, db.RetentionDeleteChangesParams{Target: name, Cutoff: cutoff, Max: batch})
				}},
				{audit, &c.Attempts, &c.AuditBefore, func(ctx context.Context, cutoff time.Time) (int64, error) {
					return p.q.RetentionDeleteAttempts(ctx, p.pool, db.RetentionDeleteAttemptsParams{Target: name, Cutoff: cutoff, Max: batch})
				}},
				{audit, &c.Merges, &c.AuditBefore, func(ctx context.Context, cutoff time.Time) (int64, error) {
					return p.q.RetentionDeleteMerges(ctx, p.pool, db.RetentionDeleteMergesParams{Target: name, Cutoff: cutoff, Max: batch})
				}},
				{audit, &c.BatchRequests, &c.AuditBefore, func(ctx context.Context, cutoff time.Time) (int64, error) {
					return p.q.RetentionDeleteBatchRequests(ctx, p.pool, db.RetentionDeleteBatchRequestsParams{Target: name, Cutoff: cutoff, Max: batch})
				}},
			}
			for _, s := range steps {
				if s.keep <= 0 {
					continue
				}
				cutoff := now.Add(-s.keep)
				*s.at = &cutoff
				more, err := p.deleteInBatches(ctx, deadline, s.n, func(ctx context.Context) (int64, error) { return s.del(ctx, cutoff) })
				if err != nil {
					return fmt.Errorf("retention: target %q: %w", name, err)
				}
				if more {
					rep.More = true
					return nil
				}
			}
		}
		return nil
	}()
	// What was deleted is recorded even when a later batch failed; a run
	// that found nothing to delete leaves no row (admin_actions would
	// otherwise gain one every interval forever).
	if rep.total() > 0 || rep.More {
		if rerr := p.recordRetention(context.WithoutCancel(ctx), rep); rerr != nil && err == nil {
			err = rerr
		}
	}
	if err != nil {
		return rep, err
	}
	level := slog.LevelDebug
	if rep.total() > 0 {
		level = slog.LevelInfo
	}
	p.logger.Log(ctx, level, "retention: deleted old rows", "rows", rep.total(), "more", rep.More)
	return rep, nil
}

// deleteInBatches runs del until it deletes less than a full batch. It adds
// what each batch deleted to *n and reports whether it stopped at the
// deadline with rows possibly left.
func (p *Processor) deleteInBatches(ctx context.Context, deadline time.Time, n *int64, del func(context.Context) (int64, error)) (bool, error) {
	for {
		deleted, err := del(ctx)
		if err != nil {
			return false, err
		}
		*n += deleted
		if deleted < int64(p.cfg.Retention.BatchSize) {
			return false, nil
		}
		if !time.Now().Before(deadline) {
			return true, nil
		}
		t := time.NewTimer(p.cfg.Retention.Pause.D())
		select {
		case <-ctx.Done():
			t.Stop()
			return false, ctx.Err()
		case <-t.C:
		}
	}
}

func (p *Processor) recordRetention(ctx context.Context, rep *retentionReport) error {
	params, err := json.Marshal(rep)
	if err != nil {
		return fmt.Errorf("retention: encode report: %w", err)
	}
	total := rep.total()
	if total > math.MaxInt32 {
		total = math.MaxInt32
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := p.q.RetentionRecord(ctx, p.pool, db.RetentionRecordParams{Params: params, Affected: int32(total)}); err != nil {
		return fmt.Errorf("retention: record the run: %w", err)
	}
	return nil
}

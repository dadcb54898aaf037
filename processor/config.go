package processor

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is the processor's configuration, read from one YAML file.
type Config struct {
	// DatabaseURL is the PostgreSQL URL. Flags and DATABASE_URL override it.
	DatabaseURL string `yaml:"database_url"`
	// Listen is the address of /metrics, /healthz, /readyz and the status
	// page. Defaults to 127.0.0.1:9090 (loopback: the page is not for the
	// internet).
	Listen string `yaml:"listen"`
	// LogFormat is text or json. Defaults to text.
	LogFormat string `yaml:"log_format"`
	// Dispatch tunes how pending changes become jobs.
	Dispatch DispatchConfig `yaml:"dispatch"`
	// Retention says how long finished changes and audit rows are kept.
	Retention RetentionConfig `yaml:"retention"`
	// Targets are the remote endpoints, by name (the changes.target value).
	Targets map[string]*TargetConfig `yaml:"targets"`
}

// DispatchConfig tunes claiming.
type DispatchConfig struct {
	// ClaimBatch is the most changes claimed per transaction. Defaults to 2000.
	ClaimBatch int `yaml:"claim_batch" zero:"default"`
	// PollInterval is how often the safety-net periodic job claims pending
	// changes in case a notification was missed. Defaults to 5s.
	PollInterval Duration `yaml:"poll_interval" zero:"default"`
	// RescueAfter is how long a job may run before River assumes its process
	// died and runs it again. Must exceed the longest job. Defaults to 5m.
	RescueAfter Duration `yaml:"rescue_after" zero:"default"`
	// ShutdownGrace bounds how long in-flight work may finish on SIGTERM
	// before it is cancelled (and its changes left for a retry job).
	// Defaults to 30s.
	ShutdownGrace Duration `yaml:"shutdown_grace" zero:"default"`
}

// TargetConfig configures one remote endpoint.
type TargetConfig struct {
	// Name is the map key in Config.Targets.
	Name string `yaml:"-"`
	// BaseURL is scheme://host[:port][/prefix], no credentials, no query.
	BaseURL string `yaml:"base_url"`
	// ItemPath is the path of one resource with an {id} placeholder, e.g.
	// /assignments/{id}. The id is path-escaped into it.
	ItemPath string `yaml:"item_path"`
	// UpdateMethod is PATCH (send the changed fields) or PUT (send the
	// stored snapshot with the fields applied). Defaults to PATCH.
	UpdateMethod string `yaml:"update_method"`
	// BatchETagPath, if set, is a collection path answering
	// GET path?ids=a,b,c&fields=id,etag with [{"id":…,"etag":…}].
	BatchETagPath string `yaml:"batch_etag_path"`
	// BatchSize is the most resources per job and per batch ETag request.
	// Defaults to 100 (a lookup's URL stays short, and a backlog spreads
	// over several jobs' database sessions).
	BatchSize int `yaml:"batch_size" zero:"default"`
	// MaxCoalesce is the most changes of one resource folded into one
	// request, 1 to 10000. A resource with more pending changes is written
	// in several requests, in id order, so no body grows without bound and
	// a refusal costs at most this many changes a second request each.
	// Defaults to 100.
	MaxCoalesce int `yaml:"max_coalesce" zero:"default"`
	// ConflictStatuses are the statuses that mean "ETag mismatch".
	// Defaults to [409, 412].
	ConflictStatuses []int `yaml:"conflict_statuses" zero:"default"`
	// Auth names an environment variable whose value is sent in a header.
	// The value is never written to the database, logs or errors.
	Auth *AuthConfig `yaml:"auth"`
	// Concurrency is the most requests in flight to this target per
	// process: the ceiling of the adaptive in-flight limit. That limit
	// starts at 16 (or Concurrency, if lower) and, like TCP's slow start,
	// doubles every round trip while the remote answers well and requests
	// wait; a 429 or 503 halves it and from then on it grows by one a
	// second; a 5xx or a failed exchange stops the fast growth; after 5s
	// without a request in flight it starts at 16 again. Defaults to 128:
	// the seed workload (500 changes, a 20 ms remote) needs about that many
	// in flight to finish in a quarter of a second, and the limit only
	// gets there while the remote keeps answering in time. Set a remote's
	// documented limit here (e.g. 8) to never exceed it.
	Concurrency int `yaml:"concurrency" zero:"default"`
	// Workers is the most jobs of this target run at once per process;
	// each holds one database connection (the session holding its
	// resources' locks, through which its requests' outbox rows and
	// results are written). Defaults to 8: a claim of the seed workload
	// (500 resources, BatchSize 100) runs as five jobs at once, and jobs
	// share the target's in-flight limit, so more workers add database
	// sessions, not requests.
	Workers int `yaml:"workers" zero:"default"`
	// RateLimit is requests per second to this target from all live
	// processes together; each takes an equal share. 0 means unlimited.
	RateLimit float64 `yaml:"rate_limit"`
	// Timeout bounds one HTTP request. Defaults to 10s.
	Timeout Duration `yaml:"timeout" zero:"default"`
	// MaxAttempts is how many write attempts a change gets before it ends
	// dead. Defaults to 10.
	MaxAttempts int `yaml:"max_attempts" zero:"default"`
	// Backoff is the retry delay: base·2^(attempt-1) with jitter, capped.
	// A 429 or 503 without Retry-After pauses the target for base,
	// doubling for each such answer in a row, up to max.
	Backoff BackoffConfig `yaml:"backoff"`
	// GiveUpAfter bounds how long a change the remote keeps throttling
	// (429, 503: these never use up MaxAttempts) is retried, counted from
	// when it was staged; then it ends dead. Defaults to 24h.
	GiveUpAfter Duration `yaml:"give_up_after" zero:"default"`
	// Merge holds the field policies of the three-way merge.
	Merge MergeConfig `yaml:"merge"`
	// Alert says when the target's conflict rate is too high: the status
	// page draws the threshold on the conflict-rate chart.
	Alert AlertConfig `yaml:"alert"`
	// Retention overrides the global retention for this target's rows.
	Retention TargetRetention `yaml:"retention"`
	// BatchWrite, if set, sends writes as OData 4.01 JSON batches: the
	// writes of up to MaxRequests resources in one POST (batch.go). Unset:
	// one request per write.
	BatchWrite *BatchWriteConfig `yaml:"batch_write"`

	// authValue is the resolved secret.
	authValue string
}

// ownHeaders are the headers stagesync sets on its requests, in canonical
// form; the credential may not travel in one of them.
var ownHeaders = []string{"Accept", "Content-Type", "Content-Length", "Host", "If-Match", "If-None-Match",
	"Idempotency-Key", "Odata-Version", "Transfer-Encoding", "Connection"}

// AuthConfig sends Header: Prefix + $Env on every request.
type AuthConfig struct {
	// Header defaults to Authorization.
	Header string `yaml:"header"`
	// Env is the environment variable holding the credential.
	Env string `yaml:"env"`
	// Prefix is prepended to the value, e.g. "Bearer ".
	Prefix string `yaml:"prefix"`
}

// BackoffConfig bounds retry delays.
type BackoffConfig struct {
	// Base defaults to 1s.
	Base Duration `yaml:"base" zero:"default"`
	// Max defaults to 5m.
	Max Duration `yaml:"max" zero:"default"`
}

// MergeConfig holds field policies: ours, theirs or manual.
type MergeConfig struct {
	// Default applies to fields not listed. Defaults to ours.
	Default Policy `yaml:"default"`
	// Fields overrides the policy per field name.
	Fields map[string]Policy `yaml:"fields"`
}

// AlertConfig is a target's conflict-rate alert: the seed's "alert when the
// conflict rate exceeds 5% of requests".
type AlertConfig struct {
	// ConflictRate is the share of requests answered with a conflict status
	// (409/412) above which the target needs attention, in (0, 1].
	// Defaults to 0.05.
	ConflictRate float64 `yaml:"conflict_rate" zero:"default"`
	// Window is the span the rate is measured over, 1m to 24h. Defaults
	// to 15m.
	Window Duration `yaml:"window" zero:"default"`
}

// BatchWriteConfig is a target's OData 4.01 JSON batch endpoint
// (batch_write: {path: /$batch, max_requests: 50}). Each write in a batch
// stands alone (no atomicity groups): its own If-Match, its own answer.
type BatchWriteConfig struct {
	// Path is the batch endpoint, under base_url. Defaults to /$batch.
	Path string `yaml:"path"`
	// MaxRequests is the most writes in one batch POST, 1 to 1000. A 413
	// answer halves it for the rest of the process's life. Defaults to 50.
	MaxRequests int `yaml:"max_requests" zero:"default"`
}

// validate applies the defaults and reports bad values by key.
func (b *BatchWriteConfig) validate(bad func(key, msg string, args ...any)) {
	if b.Path == "" {
		b.Path = "/$batch"
	}
	if !strings.HasPrefix(b.Path, "/") || strings.ContainsAny(b.Path, "?#") {
		bad("batch_write.path", "must be a path starting with / and without a query, like /$batch; got %q", b.Path)
	}
	defaultInt(&b.MaxRequests, 50)
	if b.MaxRequests < 1 || b.MaxRequests > 1000 {
		bad("batch_write.max_requests", "must be between 1 and 1000, got %d", b.MaxRequests)
	}
}

// Duration is a time.Duration written as "10s" in YAML.
type Duration time.Duration

// UnmarshalYAML parses Go duration syntax.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration like 500ms or 10s", s)
	}
	*d = Duration(v)
	return nil
}

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// LoadConfig reads and validates a YAML config file. ${VAR} references are
// expanded from getenv first.
func LoadConfig(path string, getenv func(string) string) (*Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := ParseConfig(raw, getenv)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig parses and validates YAML config text, applying defaults.
// ${VAR} references in values are replaced from getenv after parsing, so a
// value never changes the document's structure whatever characters it
// holds; "$" alone is left as it is.
func ParseConfig(raw []byte, getenv func(string) string) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(raw, &root); err != nil {
		return nil, syntaxErrorAt(raw, err)
	}
	var missing []string
	env := envValues{}
	expandEnv(&root, func(name string) string {
		v := getenv(name)
		if v == "" && !slices.Contains(missing, name) {
			missing = append(missing, name)
		}
		env.add(name, v)
		return v
	})
	if len(missing) > 0 {
		return nil, fmt.Errorf("environment variables referenced but not set: %s", strings.Join(missing, ", "))
	}
	// Checked and decoded from the parsed (and expanded) nodes, never from
	// re-encoded text, so every error names the line of the file.
	if errs := checkYAML(&root); len(errs) > 0 {
		return nil, env.hide(errors.Join(errs...))
	}
	var cfg Config
	if len(root.Content) > 0 {
		if err := root.Content[0].Decode(&cfg); err != nil {
			return nil, env.hide(decodeError(err))
		}
	}
	if err := cfg.validate(getenv); err != nil {
		return nil, env.hide(withLines(&root, err))
	}
	return &cfg, nil
}

// envValues are the values ${VAR} references expanded to, by value. A
// config error quotes the value it refuses; one that came from the
// environment (a credential in the wrong key, say) is shown as its ${VAR}
// instead. Values under 4 bytes are left alone: they would blank out
// ordinary text, and nothing secret is that short.
type envValues map[string]string

func (e envValues) add(name, value string) {
	if len(value) >= 4 {
		e[value] = "${" + name + "}"
	}
}

// hide replaces the expanded values in err's text, longest first.
func (e envValues) hide(err error) error {
	if err == nil || len(e) == 0 {
		return err
	}
	text := err.Error()
	for _, v := range slices.SortedFunc(maps.Keys(e), func(a, b string) int { return len(b) - len(a) }) {
		text = strings.ReplaceAll(text, v, e[v])
	}
	if text == err.Error() {
		return err
	}
	return errors.New(text)
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// expandEnv replaces ${VAR} in every scalar value (not in keys). An
// expanded scalar loses its string tag so that `rate_limit: ${RATE}` reads
// as a number.
func expandEnv(n *yaml.Node, lookup func(string) string) {
	if n.Kind == yaml.ScalarNode && strings.Contains(n.Value, "${") {
		n.Value = envRef.ReplaceAllStringFunc(n.Value, func(ref string) string {
			return lookup(envRef.FindStringSubmatch(ref)[1])
		})
		if n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) == 0 {
			n.Tag = ""
		}
		return
	}
	for i, c := range n.Content {
		if n.Kind == yaml.MappingNode && i%2 == 0 {
			continue // a key
		}
		expandEnv(c, lookup)
	}
}

// checkListen reports whether addr is a host:port a listener can bind,
// so that check and run refuse the same addresses before anything starts.
func checkListen(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("must be host:port, like 127.0.0.1:9090, got %q", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("port must be a number from 0 to 65535, got %q", port)
	}
	return nil
}

var targetNameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,62}$`)

func (c *Config) validate(getenv func(string) string) error {
	var errs []error
	bad := func(key, msg string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(msg, args...)))
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:9090"
	}
	if err := checkListen(c.Listen); err != nil {
		bad("listen", "%v", err)
	}
	switch c.LogFormat {
	case "":
		c.LogFormat = "text"
	case "text", "json":
	default:
		bad("log_format", "must be text or json, got %q", c.LogFormat)
	}
	d := &c.Dispatch
	defaultInt(&d.ClaimBatch, 2000)
	defaultDuration(&d.PollInterval, 5*time.Second)
	defaultDuration(&d.RescueAfter, 5*time.Minute)
	defaultDuration(&d.ShutdownGrace, 30*time.Second)
	if d.ClaimBatch < 1 || d.ClaimBatch > 100000 {
		bad("dispatch.claim_batch", "must be between 1 and 100000")
	}
	if d.PollInterval.D() < 100*time.Millisecond {
		bad("dispatch.poll_interval", "must be at least 100ms")
	}
	if d.RescueAfter.D() < time.Second {
		bad("dispatch.rescue_after", "must be at least 1s")
	}
	if d.ShutdownGrace.D() < 0 {
		bad("dispatch.shutdown_grace", "must not be negative")
	}
	for _, e := range c.Retention.validate() {
		bad("retention."+e.key, "%s", e.msg)
	}
	if len(c.Targets) == 0 {
		bad("targets", "at least one target is required")
	}
	for _, name := range slices.Sorted(maps.Keys(c.Targets)) {
		t := c.Targets[name]
		key := "targets." + name
		if t == nil {
			bad(key, "is empty")
			continue
		}
		t.Name = name
		if !targetNameRE.MatchString(name) {
			bad(key, "target names must match %s", targetNameRE)
		}
		for _, e := range t.validate(getenv) {
			bad(key+"."+e.key, "%s", e.msg)
		}
	}
	return errors.Join(errs...)
}

type keyError struct{ key, msg string }

func (t *TargetConfig) validate(getenv func(string) string) []keyError {
	var errs []keyError
	bad := func(key, msg string, args ...any) {
		errs = append(errs, keyError{key, fmt.Sprintf(msg, args...)})
	}
	u, err := url.Parse(t.BaseURL)
	switch {
	case t.BaseURL == "":
		bad("base_url", "is required")
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		bad("base_url", "must be an http:// or https:// URL with a host")
	case u.User != nil:
		bad("base_url", "must not contain credentials; use auth.env")
	case u.RawQuery != "" || u.Fragment != "":
		bad("base_url", "must not have a query or fragment")
	}
	t.BaseURL = strings.TrimRight(t.BaseURL, "/")
	switch {
	case !strings.HasPrefix(t.ItemPath, "/") || strings.Count(t.ItemPath, "{id}") != 1:
		bad("item_path", "must start with / and contain {id} exactly once, like /assignments/{id}")
	case strings.ContainsAny(t.ItemPath, "?#"):
		// A query could carry a credential into attempts rows and logs.
		bad("item_path", "must not contain a query or fragment; use auth for credentials")
	}
	switch t.UpdateMethod {
	case "":
		t.UpdateMethod = http.MethodPatch
	case http.MethodPatch, http.MethodPut:
	default:
		bad("update_method", "must be PATCH or PUT, got %q", t.UpdateMethod)
	}
	if t.BatchETagPath != "" && (!strings.HasPrefix(t.BatchETagPath, "/") || strings.ContainsAny(t.BatchETagPath, "?#")) {
		bad("batch_etag_path", "must be a path starting with / and without a query")
	}
	defaultInt(&t.BatchSize, 100)
	if t.BatchSize < 1 || t.BatchSize > 500 {
		bad("batch_size", "must be between 1 and 500")
	}
	defaultInt(&t.MaxCoalesce, 100)
	if t.MaxCoalesce < 1 || t.MaxCoalesce > 10000 {
		bad("max_coalesce", "must be between 1 and 10000, got %d", t.MaxCoalesce)
	}
	if len(t.ConflictStatuses) == 0 {
		t.ConflictStatuses = []int{http.StatusConflict, http.StatusPreconditionFailed}
	}
	for _, s := range t.ConflictStatuses {
		if s < 400 || s > 499 || s == http.StatusTooManyRequests || s == http.StatusNotFound {
			bad("conflict_statuses", "%d is not a conflict status (want 4xx other than 404 and 429)", s)
		}
	}
	if t.Auth != nil {
		if t.Auth.Header == "" {
			t.Auth.Header = "Authorization"
		}
		if t.Auth.Env == "" {
			bad("auth.env", "is required: name the environment variable that holds the credential")
		} else if t.authValue = getenv(t.Auth.Env); t.authValue == "" {
			bad("auth.env", "environment variable %s is not set, or empty", t.Auth.Env)
		} else if !validHeaderValue(t.Auth.Prefix + t.authValue) {
			// Caught here, or every request would fail at the transport
			// and every change would end dead. The value is not echoed.
			bad("auth.env", "environment variable %s holds a control character (a newline?); not a valid header value", t.Auth.Env)
		}
		if strings.ContainsAny(t.Auth.Header, " :\r\n") {
			bad("auth.header", "is not a valid header name")
		} else if slices.Contains(ownHeaders, http.CanonicalHeaderKey(t.Auth.Header)) {
			// The credential is set last: it would replace this header on
			// every request (If-Match: * overwrites any version) while the
			// audit records the header stagesync meant to send.
			bad("auth.header", "must not be %s: stagesync sets that header itself; name the header the remote reads the credential from, like Authorization", http.CanonicalHeaderKey(t.Auth.Header))
		}
	}
	defaultInt(&t.Concurrency, 128)
	if t.Concurrency < 1 || t.Concurrency > 1024 {
		bad("concurrency", "must be between 1 and 1024")
	}
	defaultInt(&t.Workers, 8)
	if t.Workers < 1 || t.Workers > 256 {
		bad("workers", "must be between 1 and 256")
	}
	if t.RateLimit < 0 {
		bad("rate_limit", "must be >= 0 (0 means unlimited)")
	}
	defaultDuration(&t.Timeout, 10*time.Second)
	if t.Timeout.D() < time.Millisecond {
		bad("timeout", "must be at least 1ms")
	}
	defaultInt(&t.MaxAttempts, 10)
	if t.MaxAttempts < 1 || t.MaxAttempts > 1000 {
		bad("max_attempts", "must be between 1 and 1000")
	}
	defaultDuration(&t.Backoff.Base, time.Second)
	defaultDuration(&t.Backoff.Max, 5*time.Minute)
	if t.Backoff.Base.D() <= 0 {
		bad("backoff.base", "must be > 0")
	}
	if t.Backoff.Max.D() < t.Backoff.Base.D() {
		bad("backoff.max", "must be >= backoff.base")
	}
	defaultDuration(&t.GiveUpAfter, 24*time.Hour)
	if t.GiveUpAfter.D() < time.Second {
		bad("give_up_after", "must be at least 1s (it bounds how long throttled changes are retried)")
	}
	if t.Merge.Default == "" {
		t.Merge.Default = PolicyOurs
	}
	if !t.Merge.Default.valid() {
		bad("merge.default", "must be ours, theirs or manual, got %q", t.Merge.Default)
	}
	for _, f := range slices.Sorted(maps.Keys(t.Merge.Fields)) {
		if p := t.Merge.Fields[f]; !p.valid() {
			bad("merge.fields."+f, "must be ours, theirs or manual, got %q", p)
		}
	}
	if t.Alert.ConflictRate == 0 {
		t.Alert.ConflictRate = 0.05
	}
	if !(t.Alert.ConflictRate > 0 && t.Alert.ConflictRate <= 1) {
		bad("alert.conflict_rate", "must be a share of requests in (0, 1], like 0.05 for 5%%, got %v", t.Alert.ConflictRate)
	}
	defaultDuration(&t.Alert.Window, 15*time.Minute)
	if t.Alert.Window.D() < time.Minute || t.Alert.Window.D() > 24*time.Hour {
		bad("alert.window", "must be between 1m and 24h, got %v", t.Alert.Window.D())
	}
	if t.BatchWrite != nil {
		t.BatchWrite.validate(bad)
	}
	return append(errs, t.Retention.validate()...)
}

// validHeaderValue allows visible characters, spaces and tabs (RFC 9110
// field-value), nothing that could split or end a header.
func validHeaderValue(v string) bool {
	for _, r := range v {
		if r != '\t' && (r < 0x20 || r == 0x7f) {
			return false
		}
	}
	return true
}

// policy returns the merge policy of a field.
func (t *TargetConfig) policy(field string) Policy {
	if p, ok := t.Merge.Fields[field]; ok {
		return p
	}
	return t.Merge.Default
}

func (t *TargetConfig) isConflict(status int) bool {
	return slices.Contains(t.ConflictStatuses, status)
}

// Settings is the non-secret part of the target's config, stored in
// stagesync.targets for operators. The credential itself never appears.
func (t *TargetConfig) Settings() map[string]any {
	s := map[string]any{
		"batch_etag_path":   t.BatchETagPath,
		"batch_size":        t.BatchSize,
		"max_coalesce":      t.MaxCoalesce,
		"conflict_statuses": t.ConflictStatuses,
		"concurrency":       t.Concurrency,
		"workers":           t.Workers,
		"rate_limit":        t.RateLimit,
		"timeout":           t.Timeout.D().String(),
		"max_attempts":      t.MaxAttempts,
		"backoff":           map[string]string{"base": t.Backoff.Base.D().String(), "max": t.Backoff.Max.D().String()},
		"give_up_after":     t.GiveUpAfter.D().String(),
		"merge":             map[string]any{"default": t.Merge.Default, "fields": t.Merge.Fields},
		"alert":             map[string]any{"conflict_rate": t.Alert.ConflictRate, "window": t.Alert.Window.D().String()},
	}
	if t.Auth != nil {
		s["auth"] = map[string]string{"header": t.Auth.Header, "env": t.Auth.Env}
	}
	if t.BatchWrite != nil {
		s["batch_write"] = map[string]any{"path": t.BatchWrite.Path, "max_requests": t.BatchWrite.MaxRequests}
	}
	return s
}

// TargetNames returns the configured target names, sorted.
func (c *Config) TargetNames() []string {
	return slices.Sorted(maps.Keys(c.Targets))
}

func defaultInt(v *int, d int) {
	if *v == 0 {
		*v = d
	}
}

func defaultDuration(v *Duration, d time.Duration) {
	if *v == 0 {
		*v = Duration(d)
	}
}

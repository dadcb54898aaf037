package processor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/stagesync/stagesync/db"
)

// RegisterTargets writes cfg's targets to stagesync.targets (name, URL, item
// path, method and the non-secret settings), so the upstream's inserts can
// reference them. `run` does it at start; `targets sync` and `migrate up
// --config` do it before any process runs.
func RegisterTargets(ctx context.Context, conn db.DBTX, cfg *Config) error {
	q := db.New()
	for _, name := range cfg.TargetNames() {
		t := cfg.Targets[name]
		settings, err := json.Marshal(t.Settings())
		if err != nil {
			return fmt.Errorf("encode settings of target %q: %w", name, err)
		}
		err = q.TargetUpsert(ctx, conn, db.TargetUpsertParams{
			Name: name, BaseURL: t.BaseURL, ItemPath: t.ItemPath, UpdateMethod: t.UpdateMethod, Settings: settings,
		})
		if err != nil {
			return fmt.Errorf("register target %q: %w", name, err)
		}
	}
	return nil
}

// ProbeStatus is the verdict of one probe.
type ProbeStatus string

// Probe verdicts. Only ProbeFailed makes `stagesync check` fail.
const (
	ProbeOK      ProbeStatus = "ok"
	ProbeWarning ProbeStatus = "warning"
	ProbeFailed  ProbeStatus = "FAILED"
	ProbeSkipped ProbeStatus = "skipped"
)

// ProbeResult is one check of a target.
type ProbeResult struct {
	// Check names what was checked: "base URL", "credential", "item GET",
	// "batch ETag".
	Check  string
	Status ProbeStatus
	// Detail says what was sent and answered, or what to do.
	Detail string
}

// ProbeTarget checks that t is reachable and usable, with GET requests only
// (nothing is written): the base URL answers, the credential is not refused,
// a GET of resourceID returns an ETag, and the batch ETag endpoint (if
// configured) answers with a JSON array. With resourceID empty the item GET
// is skipped. client should not follow redirects (NewHTTPClient). Details
// never contain the credential.
func ProbeTarget(ctx context.Context, client *http.Client, t *TargetConfig, resourceID string) []ProbeResult {
	p := prober{client: client, t: t}
	var out []ProbeResult
	var refused []string // authenticated requests answered 401 or 403

	base := t.BaseURL
	if u, err := url.Parse(base); err == nil && u.Path == "" {
		base += "/"
	}
	a := p.get(ctx, base)
	switch {
	case a.err != nil:
		out = append(out, ProbeResult{"base URL", ProbeFailed, "GET " + base + ": " + a.err.Error()})
	default:
		out = append(out, ProbeResult{"base URL", ProbeOK, fmt.Sprintf("GET %s answered %d in %s", base, a.status, a.took)})
		if a.refused() {
			refused = append(refused, fmt.Sprintf("GET %s: %d", base, a.status))
		}
	}

	item := ProbeResult{Check: "item GET", Status: ProbeSkipped,
		Detail: "no resource id known for this target (none staged or stored yet): pass --resource ID"}
	if resourceID != "" {
		u := (&remote{t: t}).itemURL(resourceID)
		a := p.get(ctx, u)
		etag := a.header.Get("ETag")
		switch {
		case a.err != nil:
			item = ProbeResult{"item GET", ProbeFailed, "GET " + u + ": " + a.err.Error()}
		case a.refused():
			refused = append(refused, fmt.Sprintf("GET %s: %d", u, a.status))
			item = ProbeResult{"item GET", ProbeFailed, fmt.Sprintf("GET %s answered %d: %s", u, a.status, a.reason)}
		case a.status == http.StatusNotFound:
			item = ProbeResult{"item GET", ProbeFailed, fmt.Sprintf("GET %s answered 404: no resource %q at item_path; check item_path or pass --resource with an id that exists", u, resourceID)}
		case a.status != http.StatusOK:
			item = ProbeResult{"item GET", ProbeFailed, fmt.Sprintf("GET %s answered %d: %s", u, a.status, a.reason)}
		case etag == "":
			item = ProbeResult{"item GET", ProbeFailed, fmt.Sprintf("GET %s answered 200 without an ETag header; stagesync needs one to write safely", u)}
		case strings.HasPrefix(etag, "W/"):
			item = ProbeResult{"item GET", ProbeWarning, fmt.Sprintf("GET %s answered 200 with a weak ETag %s; a server that compares If-Match strongly will refuse it", u, etag)}
		default:
			item = ProbeResult{"item GET", ProbeOK, fmt.Sprintf("GET %s answered 200, ETag %s, in %s", u, etag, a.took)}
		}
	}

	batch := ProbeResult{Check: "batch ETag", Status: ProbeSkipped, Detail: "batch_etag_path not configured (ETags are fetched one GET at a time)"}
	if t.BatchETagPath != "" {
		q := url.Values{}
		q.Set("ids", resourceID)
		q.Set("fields", "id,etag")
		u := t.BaseURL + t.BatchETagPath + "?" + q.Encode()
		a := p.get(ctx, u)
		var items []struct {
			ID   string `json:"id"`
			ETag string `json:"etag"`
		}
		switch {
		case a.err != nil:
			batch = ProbeResult{"batch ETag", ProbeFailed, "GET " + u + ": " + a.err.Error()}
		case a.status != http.StatusOK:
			if a.refused() {
				refused = append(refused, fmt.Sprintf("GET %s: %d", u, a.status))
			}
			batch = ProbeResult{"batch ETag", ProbeFailed, fmt.Sprintf("GET %s answered %d: %s", u, a.status, a.reason)}
		case json.Unmarshal(a.body, &items) != nil:
			batch = ProbeResult{"batch ETag", ProbeFailed, fmt.Sprintf("GET %s answered 200 but not with a JSON array of {id, etag}", u)}
		default:
			found := 0
			for _, it := range items {
				if it.ID == resourceID && it.ETag != "" {
					found++
				}
			}
			batch = ProbeResult{"batch ETag", ProbeOK, fmt.Sprintf("GET %s answered 200 with %d item(s) in %s", u, len(items), a.took)}
			switch {
			case resourceID == "":
				// Asked for no id, the answer shows the endpoint answers, not
				// that it gives ETags.
				batch.Status = ProbeWarning
				batch.Detail += ", asked for no id (none staged or stored yet): only reachability was checked; pass --resource ID"
			case found == 0:
				batch.Status = ProbeWarning
				batch.Detail = fmt.Sprintf("GET %s answered 200 but without an ETag for %q", u, resourceID)
			}
		}
	}

	cred := ProbeResult{"credential", ProbeOK, "not refused (no 401 or 403)"}
	switch {
	case len(refused) > 0 && t.Auth == nil:
		cred = ProbeResult{"credential", ProbeFailed, "the remote wants one (" + strings.Join(refused, "; ") + "): configure auth"}
	case len(refused) > 0:
		cred = ProbeResult{"credential", ProbeFailed, "refused (" + strings.Join(refused, "; ") + "): check $" + t.Auth.Env}
	case t.Auth == nil:
		cred = ProbeResult{"credential", ProbeSkipped, "no auth configured, and no request was refused"}
	case resourceID == "" && t.BatchETagPath == "":
		cred.Detail = "not refused by GET of the base URL (no item to try)"
	}
	return append(out, cred, item, batch)
}

type prober struct {
	client *http.Client
	t      *TargetConfig
}

type probeAnswer struct {
	status int
	header http.Header
	body   []byte
	reason string
	took   string // like 12.3ms
	err    error
}

func (a probeAnswer) refused() bool {
	return a.status == http.StatusUnauthorized || a.status == http.StatusForbidden
}

// get sends one GET with the target's credential and timeout.
func (p prober) get(ctx context.Context, u string) probeAnswer {
	ctx, cancel := context.WithTimeout(ctx, p.t.Timeout.D())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return probeAnswer{err: fmt.Errorf("build request: %w", err)}
	}
	req.Header.Set("Accept", "application/json")
	if p.t.Auth != nil {
		req.Header.Set(p.t.Auth.Header, p.t.Auth.Prefix+p.t.authValue)
	}
	start := time.Now()
	resp, err := p.client.Do(req)
	if err != nil {
		return probeAnswer{err: p.redact(scrubURLError(err))}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return probeAnswer{err: p.redact(fmt.Errorf("read response body: %w", scrubURLError(err)))}
	}
	a := probeAnswer{status: resp.StatusCode, header: resp.Header, body: body, took: fmt.Sprintf("%.1fms", float64(time.Since(start).Microseconds())/1000)}
	a.reason = p.redact(fmt.Errorf("%s", remoteReason(body, resp.Status))).Error()
	return a
}

// redact removes the credential from text that may echo it (an error body
// repeating the request's headers).
func (p prober) redact(err error) error {
	if r := p.t.redact(err.Error()); r != err.Error() {
		return errors.New(r)
	}
	return err
}

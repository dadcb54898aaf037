package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"
)

// seedRecipe is the integration the seeds describe and stagesync replaces:
// for every change, GET the resource for its ETag, then PATCH the fields
// with If-Match; on 409/412 back off exponentially and start over with a
// fresh GET; 429/503 wait for Retry-After; 5xx and transport errors back
// off. Workers take changes from one queue in order. It exists to be
// measured against in the same run, on the same simulator.
type seedRecipe struct {
	baseURL  string // e.g. http://127.0.0.1:1234/assignments
	workers  int
	client   *http.Client
	backoff  time.Duration // first backoff after a conflict; doubles, capped at 2s
	attempts int           // per change, then it is given up
}

// seedRecipeResult is what one run did.
type seedRecipeResult struct {
	elapsed  time.Duration
	failed   int // changes given up after attempts
	requests int // requests this client sent
}

func (s *seedRecipe) run(ctx context.Context, cs []change) seedRecipeResult {
	queue := make(chan change)
	var (
		mu  sync.Mutex
		res seedRecipeResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	for range s.workers {
		wg.Go(func() {
			for c := range queue {
				n, ok := s.apply(ctx, c)
				mu.Lock()
				res.requests += n
				if !ok {
					res.failed++
				}
				mu.Unlock()
			}
		})
	}
	for _, c := range cs {
		queue <- c
	}
	close(queue)
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// apply makes one change; it returns the requests sent and whether the
// change was written.
func (s *seedRecipe) apply(ctx context.Context, c change) (requests int, ok bool) {
	u := s.baseURL + "/" + url.PathEscape(c.resource)
	body, err := json.Marshal(c.fields)
	if err != nil {
		return 0, false
	}
	wait := s.backoff
	for range s.attempts {
		requests++
		etag, status, retryAfter := s.do(ctx, http.MethodGet, u, "", nil)
		if status == http.StatusOK && etag != "" {
			requests++
			_, status, retryAfter = s.do(ctx, http.MethodPatch, u, etag, body)
			if status >= 200 && status < 300 {
				return requests, true
			}
		}
		if status >= 400 && status < 500 && status != http.StatusConflict &&
			status != http.StatusPreconditionFailed && status != http.StatusTooManyRequests {
			return requests, false
		}
		d := wait/2 + rand.N(wait/2+1)
		if retryAfter > 0 {
			d = retryAfter
		}
		select {
		case <-ctx.Done():
			return requests, false
		case <-time.After(d):
		}
		wait = min(2*wait, 2*time.Second)
	}
	return requests, false
}

// do sends one request and returns the ETag, the status (0 on a transport
// error) and Retry-After.
func (s *seedRecipe) do(ctx context.Context, method, u, ifMatch string, body []byte) (etag string, status int, retryAfter time.Duration) {
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	if err != nil {
		return "", 0, 0
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if ifMatch != "" {
		req.Header.Set("If-Match", ifMatch)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return "", 0, 0
	}
	defer resp.Body.Close()
	var sink bytes.Buffer
	_, _ = sink.ReadFrom(resp.Body)
	if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil {
		retryAfter = time.Duration(secs) * time.Second
	}
	return resp.Header.Get("ETag"), resp.StatusCode, retryAfter
}

// newSeedRecipe returns the recipe against the harness's simulator.
func (h *harness) newSeedRecipe(workers int) *seedRecipe {
	return &seedRecipe{
		baseURL:  h.srv.URL + "/assignments",
		workers:  workers,
		client:   &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}},
		backoff:  100 * time.Millisecond,
		attempts: 20,
	}
}

// valueAudit checks, from the simulator's state and history, what became of
// the upstream values of cs (in slice order, later values of a field
// superseding earlier ones), for fields no person edits: lost counts fields
// whose remote value is not the newest upstream value (an older value
// landed last, or none did); dropped counts newest upstream values that no
// API write ever carried; duplicated counts newest upstream values that API
// writes carried more than once. flagged resources (dead or rejected
// changes, set aside for a person) are not counted as lost or dropped.
func (h *harness) valueAudit(cs []change, flagged map[string]bool) (lost, dropped, duplicated int) {
	type key struct{ resource, field string }
	final := map[key]any{}
	for _, c := range cs {
		for f, v := range c.fields {
			final[key{c.resource, f}] = v
		}
	}
	written := map[key][]any{}
	for k := range final {
		if _, seen := written[key{k.resource, ""}]; seen {
			continue
		}
		written[key{k.resource, ""}] = nil
		for _, v := range h.apiVersions(k.resource) {
			for f, val := range v.Written {
				written[key{k.resource, f}] = append(written[key{k.resource, f}], val)
			}
		}
	}
	remote := map[string]map[string]any{}
	for k, want := range final {
		w := jsonNorm(map[string]any{"v": want})["v"]
		if _, ok := remote[k.resource]; !ok {
			remote[k.resource], _, _ = h.sim.Get(k.resource)
		}
		if fmt.Sprint(remote[k.resource][k.field]) != fmt.Sprint(w) && !flagged[k.resource] {
			lost++
		}
		n := 0
		for _, got := range written[k] {
			if fmt.Sprint(got) == fmt.Sprint(w) {
				n++
			}
		}
		switch {
		case n == 0 && !flagged[k.resource]:
			dropped++
		case n > 1:
			duplicated++
		}
	}
	return lost, dropped, duplicated
}

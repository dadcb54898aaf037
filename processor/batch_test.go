package processor

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// batchServer is a $batch endpoint for the batcher's unit tests: it
// records each POST's items and answers them with answer (by default 200
// with an ETag naming the item's url), in reverse order so that matching
// by id is needed.
type batchServer struct {
	t      *testing.T
	srv    *httptest.Server
	mu     sync.Mutex
	posts  [][]odataRequest
	answer func(post int, items []odataRequest, w http.ResponseWriter) bool // true: answered
}

func newBatchServer(t *testing.T) *batchServer {
	bs := &batchServer{t: t}
	bs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/api/$batch" {
			http.Error(w, "not the batch endpoint", http.StatusNotFound)
			return
		}
		var env struct {
			Requests []odataRequest `json:"requests"`
		}
		if err := json.NewDecoder(r.Body).Decode(&env); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		bs.mu.Lock()
		bs.posts = append(bs.posts, env.Requests)
		n := len(bs.posts)
		answer := bs.answer
		bs.mu.Unlock()
		if answer != nil && answer(n, env.Requests, w) {
			return
		}
		writeBatchAnswer(w, env.Requests, nil)
	}))
	t.Cleanup(bs.srv.Close)
	return bs
}

// writeBatchAnswer answers every item 200 with ETag "<url>", in reverse
// order, except those status overrides (0: left out).
func writeBatchAnswer(w http.ResponseWriter, items []odataRequest, status map[string]int) {
	var out []map[string]any
	for _, it := range slices.Backward(items) {
		st, ok := status[it.ID]
		if !ok {
			st = http.StatusOK
		}
		if st == 0 {
			continue
		}
		a := map[string]any{"id": it.ID, "status": st, "headers": map[string]string{"ETag": `"` + it.URL + `"`}}
		if st >= 400 {
			a["body"] = map[string]string{"error": fmt.Sprintf("refused %s", it.URL)}
		} else {
			a["body"] = json.RawMessage(it.Body)
		}
		out = append(out, a)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"responses": out})
}

func (bs *batchServer) sizes() []int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	var out []int
	for _, p := range bs.posts {
		out = append(out, len(p))
	}
	return out
}

// batchRemote is a remote writing to bs in batches of at most max. Its
// linger is long, so a batch leaves only when max writes wait or every
// writer waits: what the tests assert does not depend on timing.
func batchRemote(t *testing.T, bs *batchServer, max int) *remote {
	t.Helper()
	tc := &TargetConfig{Name: "crm", BaseURL: bs.srv.URL + "/api", ItemPath: "/items/{id}", UpdateMethod: http.MethodPatch,
		Concurrency: 8, Timeout: Duration(5 * time.Second), ConflictStatuses: []int{409, 412}, MaxAttempts: 5,
		Backoff: BackoffConfig{Base: Duration(time.Second), Max: Duration(time.Minute)}, BatchSize: 100,
		BatchWrite: &BatchWriteConfig{Path: "/$batch", MaxRequests: max}}
	r := newRemote(tc, NewHTTPClient(), nil)
	r.batch.linger, r.batch.maxLinger = time.Minute, time.Minute
	return r
}

// writeAll makes n resource goroutines (counted as the applier counts
// them) each send one PATCH, and returns their responses by resource id.
func writeAll(t *testing.T, r *remote, n int) map[string]response {
	t.Helper()
	for range n {
		r.batch.enter()
	}
	var mu sync.Mutex
	out := map[string]response{}
	var wg sync.WaitGroup
	for i := range n {
		id := fmt.Sprintf("r%02d", i)
		wg.Go(func() {
			defer r.batch.leave()
			resp := r.do(t.Context(), request{method: http.MethodPatch, resourceID: id, url: r.itemURL(id),
				changeIDs: []int64{int64(i + 1)}, ifMatch: `"v1"`, body: map[string]any{"n": i}, idemKey: true})
			mu.Lock()
			out[id] = resp
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// Every writer waiting makes the batch leave at once: ten writes, one
// POST, each write with its own answer matched by id (the server answers
// in reverse order), its own If-Match, Idempotency-Key and body, and an
// attempts row naming the batch.
func TestBatcherSendsOneBatchWhenEveryWriterWaits(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	r := batchRemote(t, bs, 50)
	resps := writeAll(t, r, 10)

	require.Equal(t, []int{10}, bs.sizes(), "batch POST sizes: got %v; want one POST of 10", bs.sizes())
	for _, it := range bs.posts[0] {
		require.Equal(t, http.MethodPatch, it.Method)
		require.True(t, strings.HasPrefix(it.URL, "/api/items/r"), "item url %q: want an absolute path under the base URL", it.URL)
		require.Equal(t, `"v1"`, it.Headers["if-match"], "item %s if-match", it.ID)
		require.True(t, strings.HasPrefix(it.Headers["idempotency-key"], "stagesync-"), "item %s idempotency-key: got %q", it.ID, it.Headers["idempotency-key"])
		require.Equal(t, "application/json", it.Headers["content-type"])
	}
	for id, resp := range resps {
		require.NoError(t, resp.err, "write %s", id)
		require.Equal(t, http.StatusOK, resp.status, "write %s status", id)
		require.Equal(t, `"/api/items/`+id+`"`, resp.etag, "write %s: got the ETag of another item's answer", id)
		require.Equal(t, outcomeApplied, resp.attempt.outcome)
		require.Len(t, resp.attempt.batches, 1, "write %s: batches travelled in", id)
		require.Equal(t, 10, resp.attempt.batches[0].items)
		require.Equal(t, batchAnswered, resp.attempt.batches[0].outcome)
		require.NotNil(t, resp.body, "write %s: the item's body is decoded", id)
	}
}

// A batch leaves as soon as max_requests writes wait: ten writers with
// max_requests 4 send 4, 4 and (once everyone else is answered or waits) 2.
func TestBatcherFlushesAtMaxRequests(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	r := batchRemote(t, bs, 4)
	resps := writeAll(t, r, 10)
	sizes := bs.sizes()
	slices.Sort(sizes)
	require.Equal(t, []int{2, 4, 4}, sizes, "batch POST sizes: got %v; want 4, 4 and 2", sizes)
	require.Len(t, resps, 10)
	for id, resp := range resps {
		require.Equal(t, http.StatusOK, resp.status, "write %s", id)
	}
}

// A goroutine busy with something else (a GET, a merge) holds a batch back
// for the linger at most: two of three goroutines write, the third never
// does, and the two still leave, together.
func TestBatcherLingersForBusyGoroutinesThenSends(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	r := batchRemote(t, bs, 50)
	r.batch.linger = 20 * time.Millisecond
	r.batch.enter() // busy, never writes
	defer r.batch.leave()
	resps := writeAll(t, r, 2)
	require.Equal(t, []int{2}, bs.sizes(), "batch POST sizes: got %v; want one POST of both writes", bs.sizes())
	for id, resp := range resps {
		require.Equal(t, http.StatusOK, resp.status, "write %s", id)
	}
}

// The flush decision itself: full, everyone waiting, busy goroutines (the
// linger), writes about to join (the longer linger).
func TestBatcherDueDecision(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	b := &batcher{max: 3, linger: 2 * time.Millisecond, maxLinger: 250 * time.Millisecond}
	queued := func(n int, at time.Time) {
		b.queue = nil
		for range n {
			b.queue = append(b.queue, &batchCall{joined: at})
		}
	}
	tests := []struct {
		name                    string
		queued, active, joining int
		inflight                int
		waited                  time.Duration
		wantDue                 bool
		wantAfter               time.Duration
	}{
		{name: "nothing waits", queued: 0, active: 5},
		{name: "max_requests wait", queued: 3, active: 10, wantDue: true},
		{name: "every goroutine waits", queued: 2, active: 5, inflight: 3, wantDue: true},
		{name: "a busy goroutine, linger not over", queued: 2, active: 3, waited: time.Millisecond, wantAfter: time.Millisecond},
		{name: "a busy goroutine, linger over", queued: 2, active: 3, waited: 2 * time.Millisecond, wantDue: true},
		{name: "a write about to join", queued: 2, active: 3, joining: 1, waited: 50 * time.Millisecond, wantAfter: 200 * time.Millisecond},
		{name: "a write about to join, long linger over", queued: 2, active: 3, joining: 1, waited: 250 * time.Millisecond, wantDue: true},
		{name: "writes of uncounted goroutines", queued: 1, active: 0, wantDue: true},
	}
	for _, tt := range tests {
		queued(tt.queued, now.Add(-tt.waited))
		b.active, b.joining, b.inflight = tt.active, tt.joining, tt.inflight
		due, after := b.dueLocked(now)
		require.Equal(t, tt.wantDue, due, "%s: due: got %v; want %v", tt.name, due, tt.wantDue)
		require.Equal(t, tt.wantAfter, after, "%s: wait: got %s; want %s", tt.name, after, tt.wantAfter)
	}
}

// Answers may come in any order and some may be missing: a write without
// an answer has an unknown outcome (it may have been applied), never a
// success; the others keep their own status.
func TestBatcherMissingAnswerIsUnknown(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, items []odataRequest, w http.ResponseWriter) bool {
		status := map[string]int{}
		for _, it := range items {
			switch it.URL {
			case "/api/items/r01":
				status[it.ID] = 0 // left out
			case "/api/items/r02":
				status[it.ID] = http.StatusPreconditionFailed
			case "/api/items/r03":
				status[it.ID] = http.StatusUnprocessableEntity
			}
		}
		writeBatchAnswer(w, items, status)
		return true
	}
	r := batchRemote(t, bs, 50)
	resps := writeAll(t, r, 4)
	require.Equal(t, []int{4}, bs.sizes())

	require.True(t, resps["r01"].unknown, "write without an answer: unknown got false; want true")
	require.Equal(t, 0, resps["r01"].status)
	require.Equal(t, outcomeUnknown, resps["r01"].attempt.outcome)
	require.Contains(t, resps["r01"].err.Error(), "without an answer for this write")

	require.Equal(t, http.StatusPreconditionFailed, resps["r02"].status)
	require.Equal(t, outcomeConflict, resps["r02"].attempt.outcome)
	require.Equal(t, http.StatusUnprocessableEntity, resps["r03"].status)
	require.Equal(t, outcomeFatal, resps["r03"].attempt.outcome)
	require.Contains(t, resps["r03"].err.Error(), "refused /api/items/r03", "the item's own reason")
	require.Equal(t, http.StatusOK, resps["r00"].status)
	require.False(t, resps["r00"].unknown)
}

// A 413 halves max_requests for the target (and it stays halved) and the
// same writes go again in halves at once: the remote takes at most 3.
func TestBatcherHalvesOn413(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, items []odataRequest, w http.ResponseWriter) bool {
		if len(items) > 3 {
			http.Error(w, "too many requests in batch", http.StatusRequestEntityTooLarge)
			return true
		}
		return false
	}
	r := batchRemote(t, bs, 8)
	resps := writeAll(t, r, 8)
	require.Equal(t, []int{8, 4, 2, 2, 4, 2, 2}, bs.sizes(), "batch POST sizes: got %v", bs.sizes())
	require.Equal(t, 2, r.batch.max, "max_requests after 413s: got %d; want 2", r.batch.max)
	for id, resp := range resps {
		require.Equal(t, http.StatusOK, resp.status, "write %s", id)
		var outcomes []string
		for _, e := range resp.attempt.batches {
			outcomes = append(outcomes, fmt.Sprintf("%d:%s", e.items, e.outcome))
		}
		require.Equal(t, []string{"8:too_large", "4:too_large", "2:answered"}, outcomes, "write %s travelled in", id)
	}

	// Later writes go two at a time.
	more := writeAll(t, r, 3)
	require.Len(t, more, 3)
	later := bs.sizes()[7:]
	slices.Sort(later)
	require.Equal(t, []int{1, 2}, later, "batch POST sizes after halving: got %v", bs.sizes())
}

// A batch refused as a whole fails each write with the batch's status: a
// 5xx is retried like a single write's 5xx; a 4xx of the batch is not the
// write's fault, so it is a failure to retry (status 0), never a rejection.
func TestBatcherWholeBatchFailure(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status, wantStatus int
	}{{http.StatusInternalServerError, http.StatusInternalServerError}, {http.StatusBadRequest, 0}, {http.StatusTooManyRequests, http.StatusTooManyRequests}} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			t.Parallel()
			bs := newBatchServer(t)
			bs.answer = func(_ int, _ []odataRequest, w http.ResponseWriter) bool {
				if tc.status == http.StatusTooManyRequests {
					w.Header().Set("Retry-After", "3")
				}
				http.Error(w, "nope", tc.status)
				return true
			}
			r := batchRemote(t, bs, 50)
			resps := writeAll(t, r, 3)
			for id, resp := range resps {
				require.Equal(t, tc.wantStatus, resp.status, "write %s status", id)
				require.False(t, resp.unknown, "write %s: a refused batch applied nothing", id)
				require.Equal(t, tc.status, resp.attempt.statusCode, "write %s: attempts row status", id)
				require.Equal(t, outcomeRetryable, resp.attempt.outcome)
				require.Contains(t, resp.err.Error(), "refused the whole batch of 3 writes")
				require.Equal(t, batchFailed, resp.attempt.batches[0].outcome)
			}
			_, paused := r.gate.paused()
			require.Equal(t, tc.status == http.StatusTooManyRequests, paused, "target paused: got %v", paused)
		})
	}
}

// An item answered 429 pauses the whole target (the gate observes the
// batch's worst answer): the next write is refused before it is sent.
func TestBatcherItem429PausesTheTarget(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, items []odataRequest, w http.ResponseWriter) bool {
		var out []map[string]any
		for _, it := range items {
			out = append(out, map[string]any{"id": it.ID, "status": 429, "headers": map[string]string{"retry-after": "30"}})
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"responses": out})
		return true
	}
	r := batchRemote(t, bs, 50)
	resps := writeAll(t, r, 2)
	for id, resp := range resps {
		require.Equal(t, http.StatusTooManyRequests, resp.status, "write %s", id)
		require.Equal(t, 30*time.Second, resp.retryAfter, "write %s Retry-After", id)
	}
	until, paused := r.gate.paused()
	require.True(t, paused, "target paused after an item's 429: got false; want true")
	require.WithinDuration(t, time.Now().Add(30*time.Second), until, 5*time.Second)

	again := writeAll(t, r, 1)
	require.NotNil(t, pausedBy(again["r00"]), "a write while paused: got %v; want refused by the pause", again["r00"].err)
	require.Equal(t, []int{2}, bs.sizes(), "POSTs: got %v; want none while paused", bs.sizes())
}

// A POST whose connection fails after it was written leaves every write's
// outcome unknown: they are in doubt, never successes.
func TestBatcherLostAnswerMakesEveryWriteUnknown(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, _ []odataRequest, w http.ResponseWriter) bool {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			_ = conn.Close()
		}
		return true
	}
	r := batchRemote(t, bs, 50)
	resps := writeAll(t, r, 3)
	require.Equal(t, []int{3}, bs.sizes(), "the POST is not resent")
	for id, resp := range resps {
		require.True(t, resp.unknown, "write %s unknown: got false; want true (%v)", id, resp.err)
		require.Equal(t, outcomeUnknown, resp.attempt.outcome)
		require.Equal(t, batchUnknown, resp.attempt.batches[0].outcome)
	}
}

// A write whose job ends while it waits in the queue is never sent.
func TestBatcherWriteLeavesTheQueueWhenItsJobEnds(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	r := batchRemote(t, bs, 50)
	r.batch.enter()
	r.batch.enter() // a second goroutine that never writes: nothing is due
	defer r.batch.leave()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan response, 1)
	go func() {
		defer r.batch.leave()
		done <- r.do(ctx, request{method: http.MethodPatch, resourceID: "x", url: r.itemURL("x"), ifMatch: `"1"`, body: map[string]any{"a": 1}})
	}()
	require.Eventually(t, func() bool {
		r.batch.mu.Lock()
		defer r.batch.mu.Unlock()
		return len(r.batch.queue) == 1
	}, 10*time.Second, time.Millisecond)
	cancel()
	resp := <-done
	require.True(t, resp.notSent, "write of an ended job: notSent got false; want true")
	require.Empty(t, bs.sizes(), "POSTs: got %v; want none", bs.sizes())
}

// Retries of a batch-writing target due close together share a job, so
// their writes travel in one batch again; without batch writes each
// resource has its own job, as before.
func TestRetryJobsGroupResourcesDueTogether(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	retries := []scheduledRetry{
		{"a", now.Add(600 * time.Millisecond)}, {"b", now.Add(900 * time.Millisecond)}, {"c", now.Add(time.Second)},
		{"d", now.Add(1300 * time.Millisecond)}, {"e", now.Add(10 * time.Second)}, {"f", now.Add(10 * time.Second)},
	}
	tc := &TargetConfig{Name: "crm", BatchSize: 100}
	// Without batch writes only resources due at the very same time (a
	// pause's end) share a job: one batch lookup serves them after it.
	var got []string
	for _, j := range retryJobs(tc, retries, now) {
		got = append(got, fmt.Sprintf("%v@%s", j.Args.(ApplyArgs).ResourceIDs, j.InsertOpts.ScheduledAt.Sub(now)))
	}
	require.Equal(t, []string{"[a]@600ms", "[b]@900ms", "[c]@1s", "[d]@1.3s", "[e f]@10s"}, got, "jobs without batch writes: got %v", got)

	tc.BatchWrite = &BatchWriteConfig{Path: "/$batch", MaxRequests: 50}
	jobs := retryJobs(tc, retries, now)
	got = nil
	for _, j := range jobs {
		got = append(got, fmt.Sprintf("%v@%s", j.Args.(ApplyArgs).ResourceIDs, j.InsertOpts.ScheduledAt.Sub(now)))
	}
	require.Equal(t, []string{"[a b c]@1s", "[d]@1.3s", "[e f]@10s"}, got, "jobs: got %v", got)

	tc.BatchSize = 2
	require.Len(t, retryJobs(tc, retries, now), 3, "jobs of at most batch_size resources: [a b] [c d] [e f]")
}

// batch_write is validated, with defaults, and errors name the key.
func TestBatchWriteConfig(t *testing.T) {
	t.Parallel()
	base := "targets:\n  crm:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n"
	cfg, err := ParseConfig([]byte(base+"    batch_write: {}\n"), func(string) string { return "" })
	require.NoError(t, err)
	require.Equal(t, &BatchWriteConfig{Path: "/$batch", MaxRequests: 50}, cfg.Targets["crm"].BatchWrite)
	require.Equal(t, map[string]any{"path": "/$batch", "max_requests": 50}, cfg.Targets["crm"].Settings()["batch_write"])

	cfg, err = ParseConfig([]byte(base), func(string) string { return "" })
	require.NoError(t, err)
	require.Nil(t, cfg.Targets["crm"].BatchWrite, "without batch_write: no batches")

	for text, want := range map[string]string{
		"    batch_write: {max_requests: 0}\n":    "targets.crm.batch_write.max_requests: must not be 0; leave the key out for the default",
		"    batch_write: {max_requests: 1001}\n": "targets.crm.batch_write.max_requests: must be between 1 and 1000, got 1001",
		"    batch_write: {max_requests: -1}\n":   "targets.crm.batch_write.max_requests: must be between 1 and 1000, got -1",
		"    batch_write: {path: batch}\n":        `targets.crm.batch_write.path: must be a path starting with / and without a query, like /$batch; got "batch"`,
		"    batch_write: {path: '/b?x=1'}\n":     `targets.crm.batch_write.path: must be a path starting with / and without a query`,
		"    batch_write: {size: 3}\n":            "batch_write.size: unknown key",
	} {
		_, err := ParseConfig([]byte(base+text), func(string) string { return "" })
		if want == "" {
			require.NoError(t, err, "%s", text)
			continue
		}
		require.ErrorContains(t, err, want, "%s", text)
	}
}

// A remote that echoes the credential in a batch's answer (an item's error
// body, or the refused batch's) never gets it past the batcher: errors,
// bodies and attempts rows show [redacted].
func TestBatcherRedactsTheCredentialInAnswers(t *testing.T) {
	t.Parallel()
	const secret = "s3cret-token-0042"
	for _, whole := range []bool{false, true} {
		t.Run(fmt.Sprintf("whole batch %v", whole), func(t *testing.T) {
			t.Parallel()
			bs := newBatchServer(t)
			bs.answer = func(_ int, items []odataRequest, w http.ResponseWriter) bool {
				if whole {
					http.Error(w, `{"error":"bad request from Bearer `+secret+`"}`, http.StatusBadRequest)
					return true
				}
				var out []map[string]any
				for _, it := range items {
					out = append(out, map[string]any{"id": it.ID, "status": 422, "body": map[string]string{"error": "invalid; you sent Bearer " + secret}})
				}
				_ = json.NewEncoder(w).Encode(map[string]any{"responses": out})
				return true
			}
			r := batchRemote(t, bs, 50)
			r.t.Auth, r.t.authValue = &AuthConfig{Header: "Authorization", Prefix: "Bearer "}, secret
			resps := writeAll(t, r, 2)
			for id, resp := range resps {
				require.NotContains(t, resp.err.Error(), secret, "write %s error", id)
				require.Contains(t, resp.err.Error(), "[redacted]", "write %s error", id)
				require.NotContains(t, string(resp.rawBody), secret, "write %s body", id)
				require.NotContains(t, resp.attempt.errText, secret, "write %s attempts row", id)
				for _, e := range resp.attempt.batches {
					require.NotContains(t, e.errText, secret, "write %s batch row", id)
				}
			}
		})
	}
}

// After a 413 the writes go again in POSTs of at most the new limit: the
// halves of an odd batch would exceed it (13 of a refused 25 when the remote
// takes 12) and cost another 413.
func TestBatcher413ResendsWithinTheNewLimit(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, items []odataRequest, w http.ResponseWriter) bool {
		if len(items) > 12 {
			http.Error(w, "too many requests in batch", http.StatusRequestEntityTooLarge)
			return true
		}
		return false
	}
	r := batchRemote(t, bs, 25)
	resps := writeAll(t, r, 25)
	require.Len(t, resps, 25)
	for id, resp := range resps {
		require.Equal(t, http.StatusOK, resp.status, "write %s", id)
	}
	sizes := bs.sizes()
	require.Equal(t, 25, sizes[0])
	rest := slices.Clone(sizes[1:])
	slices.Sort(rest)
	require.Equal(t, []int{1, 12, 12}, rest, "one 413, then POSTs within the limit: got %v", sizes)
	require.Equal(t, 12, r.batch.max)
}

// A 413 for a batch holding a single write is that write's answer: the
// remote refuses it as too large, so its change is rejected (with the
// reason), not retried forever.
func TestBatcher413ForOneWriteRejectsIt(t *testing.T) {
	t.Parallel()
	bs := newBatchServer(t)
	bs.answer = func(_ int, _ []odataRequest, w http.ResponseWriter) bool {
		http.Error(w, "request entity too large", http.StatusRequestEntityTooLarge)
		return true
	}
	r := batchRemote(t, bs, 50)
	resps := writeAll(t, r, 1)
	resp := resps["r00"]
	require.Equal(t, http.StatusRequestEntityTooLarge, resp.status)
	require.Equal(t, outcomeFatal, resp.attempt.outcome)
	require.Contains(t, resp.err.Error(), "refuses even a batch holding only this write as too large")
	require.Equal(t, []int{1}, bs.sizes())
}

package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// batchTarget is the target config of the batch tests: writes in OData
// JSON batches of at most max.
func batchTarget(max int, more map[string]string) map[string]string {
	t := map[string]string{"batch_write": fmt.Sprintf("{path: /$batch, max_requests: %d}", max)}
	maps.Copy(t, more)
	return t
}

// isBatchPost tells a $batch POST in the simulator's log.
func isBatchPost(r remotesim.Request) bool {
	return r.Method == http.MethodPost && r.Path == "/$batch"
}

// requireBatchAuditMatchesRemote checks the audit of a run with batch
// writes against the simulator's log: every batch POST the simulator saw is
// a batch_requests row with the same status; every write it answered inside
// a batch is an attempts row of an answered batch with the same method and
// status; every request it answered on its own is an attempts row without
// a batch; and every batch that reached the remote's items has one attempts
// row per write it carried.
func (h *harness) requireBatchAuditMatchesRemote() {
	h.t.Helper()
	posts, items, singles := map[int]int{}, map[attemptKey]int{}, map[attemptKey]int{}
	for _, r := range h.sim.Requests() {
		switch {
		case isBatchPost(r):
			posts[r.Status]++
		case r.BatchItem != "":
			if r.Status != 0 {
				items[attemptKey{r.Method, r.Status}]++
			}
		case r.Status != 0 && r.Status != 499:
			singles[attemptKey{r.Method, r.Status}]++
		}
	}
	gotPosts := map[int]int{}
	rows, err := h.pool.Query(context.Background(), `SELECT coalesce(status_code, 0), count(*) FROM stagesync.batch_requests GROUP BY 1`)
	require.NoError(h.t, err)
	for rows.Next() {
		var st, n int
		require.NoError(h.t, rows.Scan(&st, &n))
		gotPosts[st] = n
	}
	require.NoError(h.t, rows.Err())
	require.Equal(h.t, posts, gotPosts, "batch_requests rows by status: got %v; want the simulator's batch POSTs %v", gotPosts, posts)

	byKey := func(sql string) map[attemptKey]int {
		out := map[attemptKey]int{}
		rows, err := h.pool.Query(context.Background(), sql)
		require.NoError(h.t, err)
		defer rows.Close()
		for rows.Next() {
			var k attemptKey
			var n int
			require.NoError(h.t, rows.Scan(&k.method, &k.status, &n))
			out[k] = n
		}
		require.NoError(h.t, rows.Err())
		return out
	}
	gotItems := byKey(`SELECT a.method, a.status_code, count(*) FROM stagesync.attempts a
		JOIN stagesync.batch_requests b ON b.id = a.batch_id
		WHERE b.outcome = 'answered' AND a.status_code IS NOT NULL GROUP BY 1, 2`)
	require.Equal(h.t, items, gotItems, "attempts rows of answered batches: got %v; want the simulator's batch items %v", gotItems, items)
	gotSingles := byKey(`SELECT method, status_code, count(*) FROM stagesync.attempts
		WHERE batch_id IS NULL AND status_code IS NOT NULL GROUP BY 1, 2`)
	require.Equal(h.t, singles, gotSingles, "attempts rows of single requests: got %v; want the simulator's %v", gotSingles, singles)

	n := h.count(`SELECT count(*) FROM stagesync.batch_requests b
		WHERE b.outcome IN ('answered', 'failed', 'unknown')
		  AND b.items <> (SELECT count(*) FROM stagesync.attempts a WHERE a.batch_id = b.id)`)
	require.Zero(h.t, n, "batches whose attempts rows are not one per write they carried: got %d; want 0", n)
	n = h.count(`SELECT count(*) FROM stagesync.attempts a WHERE a.batch_id IS NOT NULL
		AND NOT EXISTS (SELECT 1 FROM stagesync.batch_requests b WHERE b.id = a.batch_id)`)
	require.Zero(h.t, n, "attempts rows naming a batch that was not recorded: got %d; want 0", n)
}

// requireWrittenOnce checks that no resource was written by the API more
// than once.
func (h *harness) requireWrittenOnce(ids []string) {
	h.t.Helper()
	for _, id := range ids {
		v := h.apiVersions(id)
		require.LessOrEqual(h.t, len(v), 1, "API writes of %q: got %d (%v); want at most 1", id, len(v), v)
	}
}

// batchItemsByPost groups the simulator's batch items by their POST.
func (h *harness) batchItemsByPost() map[int64][]remotesim.Request {
	out := map[int64][]remotesim.Request{}
	for _, r := range h.sim.Requests() {
		if r.BatchItem != "" {
			out[r.Batch] = append(out[r.Batch], r)
		}
	}
	return out
}

// Writes travel in OData JSON batches, each standing alone: updates
// (coalesced per resource), creates and deletes, answered in a shuffled
// order, are matched to their own resource by id. Every change ends
// applied, the remote holds exactly the upstream's values, no write went
// out on its own, each resource was written once, every write has its
// attempts row naming its batch, and the audit matches the remote.
func TestBatchWritesCarryEachWriteAlone(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true, ShuffleBatchResponses: true})
	ids := resourceIDs("bw", 240)
	base := map[string]any{"status": "open", "owner": "seed"}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, batchTarget(50, nil)))

	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
		if i%4 == 0 {
			cs = append(cs, change{resource: id, fields: map[string]any{"owner": fmt.Sprintf("o%d", i)}})
		}
	}
	created := resourceIDs("bw-new", 5)
	for _, id := range created {
		cs = append(cs, change{resource: id, op: "create", fields: map[string]any{"status": "new", "owner": "crm"}})
	}
	deleted := resourceIDs("bw-gone", 5)
	h.seed(deleted, base)
	for _, id := range deleted {
		cs = append(cs, change{resource: id, op: "delete"})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(cs)}, counts, "status counts: got %v; want all %d applied", counts, len(cs))
	want := expected(base, ids, cs[:len(cs)-len(created)-len(deleted)])
	for _, id := range created {
		want[id] = map[string]any{"status": "new", "owner": "crm"}
	}
	h.requireRemote(want)
	for _, id := range deleted {
		_, _, ok := h.sim.Get(id)
		require.False(t, ok, "deleted resource %q exists: got true; want false", id)
	}
	h.requireWrittenOnce(append(append(slices.Clone(ids), created...), deleted...))

	writes := 0
	for _, r := range h.sim.Requests() {
		if r.Method == http.MethodPatch || r.Method == http.MethodPut || r.Method == http.MethodDelete {
			writes++
			require.NotEmpty(t, r.BatchItem, "%s %s went out on its own; want every write in a batch", r.Method, r.Path)
		}
	}
	require.Equal(t, len(ids)+len(created)+len(deleted), writes, "writes the remote saw: got %d; want one per resource", writes)
	st := h.sim.Stats()
	for post, items := range h.batchItemsByPost() {
		require.LessOrEqual(t, len(items), 50, "batch %d carried %d writes; want at most max_requests 50", post, len(items))
	}
	// 250 resources: at least 5 POSTs of 50; the batch lookups add 3.
	require.LessOrEqual(t, st.Requests, 20, "requests to the remote: got %d; want at most 20 for %d changes", st.Requests, len(cs))

	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE method <> 'GET' AND batch_id IS NULL`)
	require.Zero(t, n, "write attempts rows without their batch: got %d; want 0", n)
	n = h.count(`SELECT count(*) FROM stagesync.attempts WHERE method <> 'GET'`)
	require.Equal(t, writes, n, "write attempts rows: got %d; want one per write (%d)", n, writes)
	n = h.count(`SELECT count(*) FROM stagesync.attempts WHERE method = 'PUT' AND if_none_match = '*'`)
	require.Equal(t, len(created), n, "creates recorded with If-None-Match *: got %d; want %d", n, len(created))
	h.requireBatchAuditMatchesRemote()
}

// A write left out of the batch's answer has an unknown outcome: its
// resource is in doubt, never counted a success. Whether the remote had
// applied it or not, the doubt is resolved without writing the value a
// second time (the same request is sent again: applied now, or refused by
// its stale If-Match and found already there), and every change ends
// applied.
func TestBatchMissingAnswerEndsInDoubtAndIsResolvedWithoutASecondWrite(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true, ShuffleBatchResponses: true,
		BatchMissingRate: 0.3, BatchMissingAppliedRate: 0.5, Seed: 7})
	ids := resourceIDs("miss", 120)
	base := map[string]any{"status": "open"}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, batchTarget(40, map[string]string{"max_attempts": "30"})))
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	h.insert(cs...)
	h.waitDrained(90 * time.Second)

	counts := h.statusCounts()
	require.Equal(t, map[string]int{"applied": len(ids)}, counts, "status counts: got %v; want all applied", counts)
	h.requireRemote(expected(base, ids, cs))
	h.requireWrittenOnce(ids)

	missing, missingApplied := 0, 0
	for _, r := range h.sim.Requests() {
		switch r.Fault {
		case "missing":
			missing++
		case "missing-applied":
			missingApplied++
		}
	}
	require.Positive(t, missing, "writes left out unapplied: got 0; want some")
	require.Positive(t, missingApplied, "writes left out after being applied: got 0; want some")
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE outcome = 'unknown' AND batch_id IS NOT NULL`)
	require.Equal(t, missing+missingApplied, n, "unknown attempts rows: got %d; want one per write left out (%d)", n, missing+missingApplied)
	n = h.count(`SELECT count(*) FROM stagesync.resources WHERE in_doubt IS NOT NULL`)
	require.Zero(t, n, "resources still in doubt: got %d; want 0", n)
	h.requireBatchAuditMatchesRemote()
}

// batchFront sits in front of the simulator: before serving a $batch POST
// it calls before (which may answer it), and after it, after.
type batchFront struct {
	next   http.Handler
	mu     sync.Mutex
	posts  int
	before func(post int, w http.ResponseWriter) bool
	after  func(post int)
}

func newBatchFront(t *testing.T, next http.Handler) (*batchFront, string) {
	f := &batchFront{next: next}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func (f *batchFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/$batch" {
		f.next.ServeHTTP(w, r)
		return
	}
	f.mu.Lock()
	f.posts++
	n, before, after := f.posts, f.before, f.after
	f.mu.Unlock()
	if before != nil && before(n, w) {
		return
	}
	f.next.ServeHTTP(w, r)
	if after != nil {
		after(n)
	}
}

// storeETags applies one change to each resource, so the next changes are
// written with a stored ETag and snapshot and need no lookup.
func (h *harness) storeETags(ids []string) {
	h.t.Helper()
	var cs []change
	for _, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"phase": 1}})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)
	require.Equal(h.t, map[string]int{"applied": len(ids)}, h.statusCounts())
}

// Per write in one batch: a 412 (a person edited the resource) is fetched,
// merged and written again in a later batch; a 422 rejects only its own
// change; the others apply. Nothing is written twice.
func TestBatchItemConflictMergesAndRetriesInALaterBatchAnd422RejectsOnlyItsChange(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true, ShuffleBatchResponses: true})
	ids := resourceIDs("item", 30)
	h.seed(ids, map[string]any{"status": "open", "owner": "seed"})
	h.startProcessor(configYAML(nil, batchTarget(50, map[string]string{"merge": "{default: ours, fields: {owner: theirs}}"})))
	h.storeETags(ids)

	edited := ids[:5]
	for _, id := range edited {
		_, ok := h.sim.Edit(id, map[string]any{"owner": "person"}, "person")
		require.True(t, ok)
	}
	invalid := ids[5]
	before := len(h.sim.Requests())
	var cs []change
	for i, id := range ids {
		v := fmt.Sprintf("s%d", i)
		if id == invalid {
			v = "INVALID"
		}
		cs = append(cs, change{resource: id, fields: map[string]any{"status": v}})
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(60 * time.Second)

	rows := h.changes(changeIDs)
	for i, id := range ids {
		row := rows[changeIDs[i]]
		switch {
		case slices.Contains(edited, id):
			require.Equal(t, "merged", row.status, "change of edited %q: got %s (%s); want merged", id, row.status, row.lastError)
			got, _, _ := h.sim.Get(id)
			require.Equal(t, "person", got["owner"], "%q owner: got %v; want the person's edit kept", id, got["owner"])
			require.Equal(t, fmt.Sprintf("s%d", i), got["status"], "%q status: got %v; want ours", id, got["status"])
		case id == invalid:
			require.Equal(t, "rejected", row.status, "change with an invalid value: got %s; want rejected", row.status)
			require.Contains(t, row.lastError, "422")
			require.Contains(t, row.lastError, "INVALID")
		default:
			require.Equal(t, "applied", row.status, "change of %q: got %s (%s); want applied", id, row.status, row.lastError)
		}
	}

	// The 412s came in the first batch of this wave; their retries in a
	// later one, never on their own.
	firstBatch := map[string]int64{}
	retryBatch := map[string]int64{}
	for _, r := range h.sim.Requests()[before:] {
		if r.Method != http.MethodPatch {
			continue
		}
		require.NotEmpty(t, r.BatchItem, "PATCH of %q went out on its own; want it in a batch", r.ID)
		if _, ok := firstBatch[r.ID]; !ok {
			firstBatch[r.ID] = r.Batch
			if slices.Contains(edited, r.ID) {
				require.Equal(t, http.StatusPreconditionFailed, r.Status, "first write of edited %q", r.ID)
			}
			continue
		}
		retryBatch[r.ID] = r.Batch
	}
	require.Len(t, retryBatch, len(edited), "resources written again: got %v; want the %d edited ones", retryBatch, len(edited))
	for _, id := range edited {
		require.Greater(t, retryBatch[id], firstBatch[id], "retry of %q: batch %d; want one after its first batch %d", id, retryBatch[id], firstBatch[id])
	}
	for _, id := range ids {
		want := 2 // storeETags and this wave
		if id == invalid {
			want = 1
		}
		got := len(h.apiVersions(id))
		require.Equal(t, want, got, "API writes of %q: got %d; want %d", id, got, want)
	}
	h.requireBatchAuditMatchesRemote()
}

// A write answered 429 inside a batch pauses the whole target: nothing
// reaches the remote before its Retry-After has passed, the throttled
// writes are then sent again together (not a job, and a batch, each), and
// no change is charged an attempt for the 429.
func TestBatchItem429PausesTheTarget(t *testing.T) {
	t.Parallel()
	const retryAfter = time.Second
	h := newHarness(t, remotesim.Options{BatchWrites: true, RetryAfter: retryAfter, Seed: 3})
	front, frontURL := newBatchFront(t, h.sim)
	h.env = map[string]string{"FRONT_URL": frontURL}
	ids := resourceIDs("thr", 40)
	h.seed(ids, map[string]any{"status": "open"})
	h.startProcessor(configYAML(nil, batchTarget(50, map[string]string{"base_url": "${FRONT_URL}"})))
	h.storeETags(ids)

	var answered time.Time
	front.mu.Lock()
	first := front.posts + 1
	front.before = func(post int, _ http.ResponseWriter) bool {
		if post == first {
			h.sim.SetFaults(remotesim.Faults{RateLimitRate: 0.3})
		}
		return false
	}
	front.after = func(post int) {
		if post == first {
			h.sim.SetFaults(remotesim.Faults{})
			front.mu.Lock()
			answered = time.Now()
			front.mu.Unlock()
		}
	}
	front.mu.Unlock()
	before := len(h.sim.Requests())
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(60 * time.Second)

	front.mu.Lock()
	at := answered
	front.mu.Unlock()
	reqs := h.sim.Requests()[before:]
	throttled := map[string]bool{}
	var firstPost int64
	for _, r := range reqs {
		if r.BatchItem != "" && firstPost == 0 {
			firstPost = r.Batch
		}
		if r.Batch == firstPost && r.Status == http.StatusTooManyRequests {
			throttled[r.ID] = true
		}
	}
	require.NotEmpty(t, throttled, "writes answered 429 in the first batch: got none; want some")
	require.Less(t, len(throttled), len(ids), "writes answered 429: got all; want some")
	retries := map[int64]int{}
	for _, r := range reqs {
		if r.Batch == firstPost {
			continue
		}
		off := r.Start.Sub(at)
		require.GreaterOrEqual(t, off, retryAfter-50*time.Millisecond, "%s %s %s reached the remote %s after the 429s; want nothing before Retry-After %s",
			r.Method, r.Path, r.BatchItem, off.Round(time.Millisecond), retryAfter)
		if r.BatchItem != "" {
			require.True(t, throttled[r.ID], "%q written again; want only the throttled ones", r.ID)
			retries[r.Batch]++
		}
	}
	sum := 0
	for _, n := range retries {
		sum += n
	}
	require.Equal(t, len(throttled), sum, "throttled writes sent again: got %d; want %d", sum, len(throttled))
	require.LessOrEqual(t, len(retries), 2, "batches carrying the %d throttled writes again: got %d (%v); want them together", len(throttled), len(retries), retries)

	rows := h.changes(changeIDs)
	for id, row := range rows {
		require.Equal(t, "applied", row.status, "change %d", id)
		require.Equal(t, 1, row.attempts, "attempts of change %d: got %d; want 1, the write that applied it (a 429 is not an attempt)", id, row.attempts)
	}
	var reason string
	require.NoError(t, h.pool.QueryRow(context.Background(), `SELECT coalesce(pause_reason, '') FROM stagesync.targets WHERE name = $1`, target).Scan(&reason))
	require.Contains(t, reason, "429", "targets.pause_reason: got %q; want the 429", reason)
	h.requireBatchAuditMatchesRemote()
}

// A batch the remote refuses as a whole (500) applied nothing: its writes
// are retried, with backoff, together in one batch again; each change is
// charged the failed attempt (and the one that applied it).
func TestBatchWholeBatch500IsRetriedAsABatch(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true})
	front, frontURL := newBatchFront(t, h.sim)
	h.env = map[string]string{"FRONT_URL": frontURL}
	ids := resourceIDs("whole", 30)
	h.seed(ids, map[string]any{"status": "open"})
	h.startProcessor(configYAML(nil, batchTarget(50, map[string]string{"base_url": "${FRONT_URL}", "backoff": "{base: 200ms, max: 1s}"})))
	h.storeETags(ids)

	front.mu.Lock()
	first := front.posts + 1
	front.before = func(post int, _ http.ResponseWriter) bool {
		if post == first {
			h.sim.SetFaults(remotesim.Faults{BatchErrorRate: 1})
		}
		return false
	}
	front.after = func(post int) {
		if post == first {
			h.sim.SetFaults(remotesim.Faults{})
		}
	}
	front.mu.Unlock()
	before := len(h.sim.Requests())
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	changeIDs := h.insert(cs...)
	h.waitDrained(60 * time.Second)

	var posts []remotesim.Request
	for _, r := range h.sim.Requests()[before:] {
		if isBatchPost(r) {
			posts = append(posts, r)
		}
	}
	require.Len(t, posts, 2, "batch POSTs: got %d; want the refused one and its retry", len(posts))
	require.Equal(t, http.StatusInternalServerError, posts[0].Status)
	require.Equal(t, http.StatusOK, posts[1].Status)
	require.GreaterOrEqual(t, posts[1].Start.Sub(posts[0].End), 100*time.Millisecond, "retry %s after the 500; want a backoff (base 200ms, half of it at least)", posts[1].Start.Sub(posts[0].End))
	items := h.batchItemsByPost()[posts[1].Batch]
	require.Len(t, items, len(ids), "writes in the retried batch: got %d; want all %d together", len(items), len(ids))

	rows := h.changes(changeIDs)
	for id, row := range rows {
		require.Equal(t, "applied", row.status, "change %d", id)
		require.Equal(t, 2, row.attempts, "attempts of change %d: got %d; want 2 (the refused batch and the write that applied it)", id, row.attempts)
	}
	n := h.count(`SELECT count(*) FROM stagesync.attempts a JOIN stagesync.batch_requests b ON b.id = a.batch_id
		WHERE b.status_code = 500 AND b.outcome = 'failed' AND a.status_code = 500 AND a.outcome = 'retryable'`)
	require.Equal(t, len(ids), n, "attempts rows of the refused batch: got %d; want one per write", n)
	for _, id := range ids {
		got := len(h.apiVersions(id))
		require.Equal(t, 2, got, "API writes of %q: got %d; want 2 (storeETags and this wave)", id, got)
	}
	h.requireBatchAuditMatchesRemote()
}

// A 413 halves max_requests for the target and the same writes go again
// at once in halves; the target stays at the smaller size.
func TestBatch413HalvesTheBatchSize(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true, MaxBatchRequests: 12})
	ids := resourceIDs("big", 40)
	base := map[string]any{"status": "open", "phase": 1}
	h.seed(ids, map[string]any{"status": "open"})
	h.startProcessor(configYAML(nil, batchTarget(40, map[string]string{"batch_size": "40"})))
	h.storeETags(ids)

	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)
	require.Equal(t, map[string]int{"applied": 2 * len(ids)}, h.statusCounts())
	h.requireRemote(expected(base, ids, cs))

	tooLarge := h.count(`SELECT count(*) FROM stagesync.batch_requests WHERE status_code = 413 AND outcome = 'too_large'`)
	require.Positive(t, tooLarge, "batches refused 413: got 0; want some")
	n := h.count(`SELECT count(*) FROM stagesync.attempts WHERE status_code = 413`)
	require.Zero(t, n, "writes charged with a 413: got %d; want 0 (they went again in halves)", n)
	maxItems := h.count(`SELECT max(items) FROM stagesync.batch_requests WHERE outcome = 'answered'`)
	require.LessOrEqual(t, maxItems, 12, "largest answered batch: got %d; want at most the remote's 12", maxItems)

	// Remembered: the next wave goes in batches of at most 10 without a 413.
	last := h.count(`SELECT max(id) FROM stagesync.batch_requests`)
	cs = cs[:0]
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("t%d", i)}})
	}
	h.insert(cs...)
	h.waitDrained(60 * time.Second)
	n = h.count(`SELECT count(*) FROM stagesync.batch_requests WHERE id > $1 AND status_code = 413`, last)
	require.Zero(t, n, "413s after the size was halved: got %d; want 0", n)
	n = h.count(`SELECT max(items) FROM stagesync.batch_requests WHERE id > $1`, last)
	require.LessOrEqual(t, n, 10, "largest batch after the size was halved: got %d; want at most 10", n)
	h.requireBatchAuditMatchesRemote()
}

// A batch POST whose connection is reset may have reached the remote: each
// of its writes is in doubt (an unknown attempts row, never a success) and
// is resolved by sending the same request again; every change ends
// applied and no resource is written twice.
func TestBatchLostPostLeavesItsWritesInDoubt(t *testing.T) {
	t.Parallel()
	h := newHarness(t, remotesim.Options{BatchWrites: true, BatchResetRate: 0.4, Seed: 11})
	ids := resourceIDs("reset", 60)
	base := map[string]any{"status": "open"}
	h.seed(ids, base)
	h.startProcessor(configYAML(nil, batchTarget(20, map[string]string{"max_attempts": "30"})))
	var cs []change
	for i, id := range ids {
		cs = append(cs, change{resource: id, fields: map[string]any{"status": fmt.Sprintf("s%d", i)}})
	}
	h.insert(cs...)
	h.waitDrained(90 * time.Second)

	require.Equal(t, map[string]int{"applied": len(ids)}, h.statusCounts())
	h.requireRemote(expected(base, ids, cs))
	h.requireWrittenOnce(ids)
	resets := 0
	for _, r := range h.sim.Requests() {
		if isBatchPost(r) && r.Fault == "reset" {
			resets++
		}
	}
	require.Positive(t, resets, "batch POSTs reset: got 0; want some")
	n := h.count(`SELECT count(*) FROM stagesync.batch_requests WHERE outcome = 'unknown' AND status_code IS NULL`)
	require.Equal(t, resets, n, "batch_requests rows without an answer: got %d; want one per reset POST (%d)", n, resets)
	n = h.count(`SELECT count(*) FROM stagesync.attempts a JOIN stagesync.batch_requests b ON b.id = a.batch_id
		WHERE b.outcome = 'unknown' AND a.outcome <> 'unknown'`)
	require.Zero(t, n, "writes of reset POSTs recorded with a known outcome: got %d; want 0", n)
	n = h.count(`SELECT count(*) FROM stagesync.resources WHERE in_doubt IS NOT NULL`)
	require.Zero(t, n, "resources still in doubt: got %d; want 0", n)
	h.requireBatchAuditMatchesRemote()
}

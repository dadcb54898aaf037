package remotesim_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// item is one request of a $batch, in the wire format.
type item = map[string]any

// itemAnswer is one answer of a $batch, in the wire format.
type itemAnswer struct {
	ID      string            `json:"id"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	Body    json.RawMessage   `json:"body"`
}

// batch POSTs items to /$batch and decodes a 200 answer by item id.
func (b *testBundle) batch(t *testing.T, items ...item) (result, map[string]itemAnswer, []string) {
	t.Helper()
	raw, err := json.Marshal(map[string]any{"requests": items})
	require.NoError(t, err)
	res := b.do(t, http.MethodPost, "/$batch", string(raw), "Content-Type", "application/json")
	if res.status != http.StatusOK {
		return res, nil, nil
	}
	var env struct{ Responses []itemAnswer }
	require.NoError(t, json.Unmarshal([]byte(res.body), &env), "body %s", res.body)
	byID := make(map[string]itemAnswer, len(env.Responses))
	var order []string
	for _, a := range env.Responses {
		_, dup := byID[a.ID]
		require.False(t, dup, "answer id %q twice", a.ID)
		byID[a.ID] = a
		order = append(order, a.ID)
	}
	return res, byID, order
}

func patchItem(id, url, ifMatch, body string) item {
	return item{"id": id, "method": "PATCH", "url": url, "headers": map[string]string{"if-match": ifMatch}, "body": json.RawMessage(body)}
}

func TestBatchRunsEachItemLikeASingleRequest(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true})
	ea := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"})
	eb := b.sim.Put("b", map[string]any{"owner": "crm"})
	ed := b.sim.Put("d", map[string]any{"owner": "crm"})
	eg := b.sim.Put("g", map[string]any{"owner": "crm"})

	res, got, order := b.batch(t,
		patchItem("1", "items/a", ea, `{"status":"won"}`),
		item{"id": "2", "method": "patch", "url": "/items/b", "headers": map[string]string{"IF-MATCH": `"0-stale"`}, "body": item{"owner": "me"}},
		item{"id": "3", "method": "PATCH", "url": "items/b", "body": item{"owner": "me"}},
		item{"id": "4", "method": "PUT", "url": "http://elsewhere.example/items/c", "headers": map[string]string{"If-None-Match": "*", "Content-Type": "application/json"}, "body": item{"owner": "new"}},
		item{"id": "5", "method": "DELETE", "url": "/items/d", "headers": map[string]string{"If-Match": ed}},
		item{"id": "6", "method": "GET", "url": "items/g"},
		item{"id": "7", "method": "GET", "url": "items/g", "headers": map[string]string{"if-none-match": eg}},
		item{"id": "8", "method": "GET", "url": "items?ids=g,zz&fields=id,etag"},
		item{"id": "9", "method": "GET", "url": "items/zz"},
		item{"id": "10", "method": "POST", "url": "items/a"},
		patchItem("11", "items/b", eb, `{"owner":"INVALID"}`),
		patchItem("12", "items/b", eb, `[1]`),
		item{"id": "13", "method": "PATCH", "url": "$batch", "headers": map[string]string{"if-match": eb}, "body": item{}},
	)
	require.Equal(t, http.StatusOK, res.status, "body %s", res.body)
	require.Equal(t, "application/json", res.header.Get("Content-Type"))
	require.Equal(t, []string{"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13"}, order, "answers come in request order")

	_, ea2, _ := b.sim.Get("a")
	_, ec, _ := b.sim.Get("c")
	tests := []struct {
		id         string
		wantStatus int
		wantETag   string
		wantBody   string
	}{
		{"1", http.StatusOK, ea2, `{"id":"a","owner":"crm","status":"won"}`},
		{"2", http.StatusPreconditionFailed, eb, fmt.Sprintf(`{"error":"etag mismatch","etag":%q}`, eb)},
		{"3", http.StatusPreconditionRequired, "", `{"error":"If-Match required"}`},
		{"4", http.StatusCreated, ec, `{"id":"c","owner":"new"}`},
		{"5", http.StatusNoContent, "", ``},
		{"6", http.StatusOK, eg, `{"id":"g","owner":"crm"}`},
		{"7", http.StatusNotModified, eg, ``},
		{"8", http.StatusOK, "", fmt.Sprintf(`[{"id":"g","etag":%q}]`, eg)},
		{"9", http.StatusNotFound, "", `{"error":"not found"}`},
		{"10", http.StatusMethodNotAllowed, "", `{"error":"method not allowed"}`},
		{"11", http.StatusUnprocessableEntity, "", `{"error":"field owner: value INVALID is not allowed"}`},
		{"12", http.StatusBadRequest, "", `{"error":"body must be a JSON object"}`},
		{"13", http.StatusBadRequest, "", `{"error":"a $batch item cannot be another $batch"}`},
	}
	for _, tt := range tests {
		a := got[tt.id]
		require.Equal(t, tt.wantStatus, a.Status, "item %s status", tt.id)
		require.Equal(t, tt.wantETag, a.Headers["etag"], "item %s etag", tt.id)
		if tt.wantBody == "" {
			require.Empty(t, a.Body, "item %s body", tt.id)
			require.NotContains(t, a.Headers, "content-type", "item %s", tt.id)
		} else {
			require.JSONEq(t, tt.wantBody, string(a.Body), "item %s body", tt.id)
			require.Equal(t, "application/json", a.Headers["content-type"], "item %s", tt.id)
		}
	}

	require.Equal(t, []string{"a", "b", "c", "g"}, b.sim.IDs())
	fields, _, _ := b.sim.Get("b")
	require.Equal(t, map[string]any{"owner": "crm"}, fields, "no item changed b")
	h := b.sim.History("a")
	require.Len(t, h, 2)
	require.Equal(t, map[string]any{"status": "won"}, h[1].Written)
	require.Equal(t, "api", h[1].Writer)
}

func TestBatchLogsAndCountsEachItem(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true})
	ea := b.sim.Put("a", map[string]any{"owner": "crm"})
	b.sim.Put("b", map[string]any{"owner": "crm"})

	for range 2 {
		res, _, _ := b.batch(t,
			item{"id": "x", "method": "PATCH", "url": "items/a", "headers": map[string]string{"If-Match": ea, "Idempotency-Key": "k"}, "body": item{"owner": "me"}},
			patchItem("y", "items/b", `"0-stale"`, `{"owner":"me"}`),
		)
		require.Equal(t, http.StatusOK, res.status)
	}
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status)

	type entry struct {
		Method, Path, ID, BatchItem, IfMatch, Key string
		Batch                                     int64
		Status                                    int
		Committed                                 bool
	}
	var got []entry
	for _, r := range b.sim.Requests() {
		got = append(got, entry{r.Method, r.Path, r.ID, r.BatchItem, r.IfMatch, r.IdempotencyKey, r.Batch, r.Status, r.Committed})
	}
	want := []entry{
		{"POST", "/$batch", "", "", "", "", 1, 200, false},
		{"PATCH", "/items/a", "a", "x", ea, "k", 1, 200, true},
		{"PATCH", "/items/b", "b", "y", `"0-stale"`, "", 1, 412, false},
		{"POST", "/$batch", "", "", "", "", 2, 200, false},
		{"PATCH", "/items/a", "a", "x", ea, "k", 2, 412, false}, // no idempotency cache: the ETag is stale now
		{"PATCH", "/items/b", "b", "y", `"0-stale"`, "", 2, 412, false},
		{"GET", "/items/a", "a", "", "", "", 0, 200, false},
	}
	require.Equal(t, want, got)

	st := b.sim.Stats()
	require.Equal(t, 3, st.Requests, "HTTP requests: two POSTs and a GET")
	require.Equal(t, 2, st.BatchPosts)
	require.Equal(t, 4, st.BatchItems)
	require.Equal(t, 4, st.Patches)
	require.Equal(t, 1, st.Gets)
	require.Equal(t, 3, st.Conflicts)
}

func TestBatchSharesTheIdempotencyCacheWithSingleRequests(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, IdempotencyCache: true})
	e1 := b.sim.Put("a", map[string]any{"n": 0})

	single := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", e1, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusOK, single.status)

	k1 := item{"id": "r", "method": "PATCH", "url": "items/a", "headers": map[string]string{"if-match": e1, "idempotency-key": "k1"}, "body": item{"n": 1}}
	_, got, _ := b.batch(t, k1)
	require.Equal(t, http.StatusOK, got["r"].Status)
	require.Equal(t, single.header.Get("ETag"), got["r"].Headers["etag"])
	require.JSONEq(t, single.body, string(got["r"].Body))
	require.Len(t, b.sim.History("a"), 2, "the replay wrote nothing")
	require.True(t, b.sim.Requests()[2].Replayed)

	// And the other way round: an item's answer is replayed to a single request.
	e2 := single.header.Get("ETag")
	k2 := item{"id": "r", "method": "PATCH", "url": "/items/a", "headers": map[string]string{"if-match": e2, "idempotency-key": "k2"}, "body": item{"n": 2}}
	_, got, _ = b.batch(t, k2)
	require.Equal(t, http.StatusOK, got["r"].Status)
	again := b.do(t, http.MethodPatch, itemPath("a"), `{"n":2}`, "If-Match", e2, "Idempotency-Key", "k2")
	require.Equal(t, http.StatusOK, again.status)
	require.Equal(t, got["r"].Headers["etag"], again.header.Get("ETag"))
	require.Equal(t, 2, b.sim.Stats().Replays)
}

func TestBatchRefusesTheWholeBatch(t *testing.T) {
	t.Parallel()
	ok := patchItem("ok", "items/a", `"x"`, `{"n":1}`)
	tests := []struct {
		name       string
		body       string
		wantStatus int
		wantBody   string
	}{
		{"malformed", `{"requests":[`, 400, `{"error":"batch body must be a JSON object with a \"requests\" array"}`},
		{"not an object", `[]`, 400, `{"error":"batch body must be a JSON object with a \"requests\" array"}`},
		{"no requests", `{}`, 400, `{"error":"batch body must be a JSON object with a \"requests\" array"}`},
		{"trailing data", `{"requests":[]}{}`, 400, `{"error":"batch body must be a JSON object with a \"requests\" array"}`},
		{"header not a string", `{"requests":[{"id":"1","method":"GET","url":"items/a","headers":{"if-match":1}}]}`, 400, `{"error":"batch body must be a JSON object with a \"requests\" array"}`},
		{"missing id", mustBatch(ok, item{"method": "GET", "url": "items/a"}), 400, `{"error":"requests[1]: id required"}`},
		{"duplicate id", mustBatch(ok, ok), 400, `{"error":"request id \"ok\" appears more than once"}`},
		{"atomicityGroup", mustBatch(ok, item{"id": "g1", "atomicityGroup": "grp", "method": "GET", "url": "items/a"}), 400, `{"error":"request \"g1\": atomicityGroup is not supported: each request stands alone"}`},
		{"dependsOn", mustBatch(ok, item{"id": "d1", "dependsOn": []string{"ok"}, "method": "GET", "url": "items/a"}), 400, `{"error":"request \"d1\": dependsOn is not supported: each request stands alone"}`},
		{"missing method", mustBatch(item{"id": "m", "url": "items/a"}), 400, `{"error":"request \"m\": method required"}`},
		{"missing url", mustBatch(item{"id": "u", "method": "GET"}), 400, `{"error":"request \"u\": url required"}`},
		{"header twice", mustBatch(item{"id": "h", "method": "GET", "url": "items/a", "headers": map[string]string{"If-Match": `"1"`, "if-match": `"2"`}}), 400, `{"error":"request \"h\": header \"if-match\" given more than once"}`},
		{"more than MaxBatchRequests", mustBatch(ok, patchItem("2", "items/a", `"x"`, `{}`), patchItem("3", "items/a", `"x"`, `{}`), patchItem("4", "items/a", `"x"`, `{}`)), 413, `{"error":"too many requests in batch: 4 > 3"}`},
		{"body larger than MaxBatchRequests x MaxBodyBytes", mustBatch(patchItem("big", "items/a", `"x"`, `{"n":"`+strings.Repeat("x", 3*1024)+`"}`)), 413, `{"error":"batch body larger than 3072 bytes"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{BatchWrites: true, MaxBatchRequests: 3, MaxBodyBytes: 1024})
			etag := b.sim.Put("a", map[string]any{"n": 0})
			body := strings.ReplaceAll(tt.body, `"x"`, fmt.Sprintf("%q", etag))
			res := b.do(t, http.MethodPost, "/$batch", body)
			require.Equal(t, tt.wantStatus, res.status)
			require.JSONEq(t, tt.wantBody, res.body)
			require.Len(t, b.sim.History("a"), 1, "nothing applied")
			reqs := b.sim.Requests()
			require.Len(t, reqs, 1, "only the POST is logged")
			require.Equal(t, tt.wantStatus, reqs[0].Status)
			require.Equal(t, 0, b.sim.Stats().BatchItems)
		})
	}
}

// mustBatch encodes items as a $batch body.
func mustBatch(items ...item) string {
	raw, err := json.Marshal(map[string]any{"requests": items})
	if err != nil {
		panic(err)
	}
	return string(raw)
}

func TestBatchEndpoint(t *testing.T) {
	t.Parallel()

	t.Run("not served unless enabled", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{})
		require.Equal(t, http.StatusNotFound, b.do(t, http.MethodPost, "/$batch", `{"requests":[]}`).status)
	})
	t.Run("only POST", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{BatchWrites: true})
		res := b.do(t, http.MethodGet, "/$batch", "")
		require.Equal(t, http.StatusMethodNotAllowed, res.status)
		require.Equal(t, http.MethodPost, res.header.Get("Allow"))
	})
	t.Run("an empty batch is an empty answer", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{BatchWrites: true})
		res := b.do(t, http.MethodPost, "/$batch", `{"requests":[]}`)
		require.Equal(t, http.StatusOK, res.status)
		require.JSONEq(t, `{"responses":[]}`, res.body)
	})
	t.Run("urls are relative to the folder of BatchPath", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{BatchWrites: true, ItemPrefix: "/odata/v4/items", BatchPath: "odata/v4/$batch"})
		e := b.sim.Put("a b", map[string]any{"n": 0})
		res := b.do(t, http.MethodPost, "/odata/v4/$batch", mustBatch(
			item{"id": "rel", "method": "GET", "url": "items/a%20b"},
			item{"id": "abs", "method": "GET", "url": "/odata/v4/items/a%20b"},
			item{"id": "full", "method": "GET", "url": "https://remote.example/odata/v4/items/a%20b?x=1#frag"},
			item{"id": "old", "method": "GET", "url": "/items/a%20b"},
			item{"id": "dots", "method": "GET", "url": "items/../items/a%20b"},
		))
		require.Equal(t, http.StatusOK, res.status)
		want := fmt.Sprintf(`{"responses":[
			{"id":"rel","status":200,"headers":{"etag":%[1]q,"content-type":"application/json"},"body":{"id":"a b","n":0}},
			{"id":"abs","status":200,"headers":{"etag":%[1]q,"content-type":"application/json"},"body":{"id":"a b","n":0}},
			{"id":"full","status":200,"headers":{"etag":%[1]q,"content-type":"application/json"},"body":{"id":"a b","n":0}},
			{"id":"old","status":404,"headers":{"content-type":"application/json"},"body":{"error":"not found"}},
			{"id":"dots","status":404,"headers":{"content-type":"application/json"},"body":{"error":"not found"}}]}`, e)
		require.JSONEq(t, want, res.body)
		require.Equal(t, http.StatusNotFound, b.do(t, http.MethodPost, "/$batch", `{"requests":[]}`).status)
	})
}

func TestBatchItemFaults(t *testing.T) {
	t.Parallel()

	t.Run("errors and rate limits answer items, not the batch", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{BatchWrites: true, ErrorRate: 1, RetryAfter: 3 * time.Second})
		e := b.sim.Put("a", map[string]any{"n": 0})
		res, got, _ := b.batch(t, patchItem("1", "items/a", e, `{"n":1}`), patchItem("2", "items/a", e, `{"n":2}`))
		require.Equal(t, http.StatusOK, res.status, "the POST itself draws only the Batch… rates")
		require.Equal(t, itemAnswer{ID: "1", Status: 500, Headers: map[string]string{"content-type": "application/json"}, Body: json.RawMessage(`{"error":"internal error"}`)}, got["1"])
		require.Equal(t, itemAnswer{ID: "2", Status: 503, Headers: map[string]string{"retry-after": "3", "content-type": "application/json"}, Body: json.RawMessage(`{"error":"service unavailable"}`)}, got["2"])

		b.sim.SetFaults(remotesim.Faults{RateLimitRate: 1})
		_, got, _ = b.batch(t, patchItem("3", "items/a", e, `{"n":3}`))
		require.Equal(t, 429, got["3"].Status)
		require.Equal(t, "3", got["3"].Headers["retry-after"])

		require.Len(t, b.sim.History("a"), 1, "faulted items touch nothing")
		var faults []string
		for _, r := range b.sim.Requests() {
			faults = append(faults, r.BatchItem+":"+r.Fault)
		}
		require.Equal(t, []string{":", "1:error", "2:error", ":", "3:ratelimit"}, faults)
		st := b.sim.Stats()
		require.Equal(t, 3, st.Faults)
		require.Equal(t, 0, st.Patches)
	})
	t.Run("a committed item can go unanswered", func(t *testing.T) {
		t.Parallel()
		var rec commitRecorder
		b := setup(t, remotesim.Options{BatchWrites: true, DropAfterCommitRate: 1, Hooks: remotesim.Hooks{AfterCommitFunc: rec.hook}})
		e := b.sim.Put("a", map[string]any{"n": 0})
		_, got, order := b.batch(t, patchItem("lands", "items/a", e, `{"n":1}`), patchItem("stale", "items/a", e, `{"n":2}`))
		require.Equal(t, []string{"stale"}, order, "only the write that changed nothing is answered")
		require.Equal(t, http.StatusPreconditionFailed, got["stale"].Status)
		fields, _, _ := b.sim.Get("a")
		require.Equal(t, map[string]any{"n": float64(1)}, fields)

		reqs := b.sim.Requests()
		require.Len(t, reqs, 3)
		require.Equal(t, "drop-after-commit", reqs[1].Fault)
		require.True(t, reqs[1].Committed)
		require.Equal(t, 0, reqs[1].Status)
		require.Empty(t, reqs[2].Fault)
		require.Len(t, rec.get(), 1)
		require.Equal(t, 1, b.sim.Stats().DroppedAfterCommit)
	})
}

func TestBatchMissingResponses(t *testing.T) {
	t.Parallel()
	items := func(etags map[string]string) []item {
		var out []item
		for _, id := range []string{"a", "b", "c", "d"} {
			out = append(out, patchItem(id, "items/"+id, etags[id], `{"n":1}`))
		}
		return out
	}
	tests := []struct {
		name        string
		appliedRate float64
		wantApplied bool
		wantFault   string
	}{
		{"not applied", 0, false, "missing"},
		{"applied", 1, true, "missing-applied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{BatchWrites: true, BatchMissingRate: 1, BatchMissingAppliedRate: tt.appliedRate})
			etags := map[string]string{}
			for _, id := range []string{"a", "b", "c", "d"} {
				etags[id] = b.sim.Put(id, map[string]any{"n": 0})
			}
			res, _, _ := b.batch(t, items(etags)...)
			require.JSONEq(t, `{"responses":[]}`, res.body)
			for _, id := range []string{"a", "b", "c", "d"} {
				fields, _, _ := b.sim.Get(id)
				require.Equal(t, tt.wantApplied, fields["n"] == float64(1), "%s applied: got %v; want %v", id, fields["n"] == float64(1), tt.wantApplied)
			}
			for _, r := range b.sim.Requests()[1:] {
				require.Equal(t, tt.wantFault, r.Fault)
				require.Equal(t, tt.wantApplied, r.Committed)
				require.Equal(t, 0, r.Status)
			}
			st := b.sim.Stats()
			require.Equal(t, 4, st.Faults)
			require.Equal(t, 4, st.BatchItems)
		})
	}

	t.Run("some missing, deterministic under Seed", func(t *testing.T) {
		t.Parallel()
		run := func() ([]string, map[string]bool) {
			b := setup(t, remotesim.Options{BatchWrites: true, BatchMissingRate: 0.5, BatchMissingAppliedRate: 0.5, Seed: 11})
			etags := map[string]string{}
			for _, id := range []string{"a", "b", "c", "d"} {
				etags[id] = b.sim.Put(id, map[string]any{"n": 0})
			}
			var answered []string
			for range 5 {
				_, _, order := b.batch(t, items(etags)...)
				answered = append(answered, strings.Join(order, ","))
				for _, id := range []string{"a", "b", "c", "d"} {
					_, etags[id], _ = b.sim.Get(id)
				}
			}
			applied := map[string]bool{}
			for _, r := range b.sim.Requests() {
				if r.Fault != "" {
					applied[fmt.Sprint(r.Batch, r.BatchItem, r.Fault, r.Committed)] = true
				}
			}
			return answered, applied
		}
		a1, f1 := run()
		a2, f2 := run()
		require.Equal(t, a1, a2)
		require.Equal(t, f1, f2)
		joined := strings.Join(a1, "|")
		require.NotEqual(t, strings.Repeat("a,b,c,d|", 4)+"a,b,c,d", joined, "some answers are missing")
		var faults []string
		for k := range f1 {
			faults = append(faults, k)
		}
		require.True(t, slices.ContainsFunc(faults, func(s string) bool { return strings.HasSuffix(s, "missing-appliedtrue") }), "some missing items were applied: %v", faults)
		require.True(t, slices.ContainsFunc(faults, func(s string) bool { return strings.HasSuffix(s, "missingfalse") }), "some missing items were not: %v", faults)
	})
}

func TestBatchFaultsOfTheWholePost(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, BatchErrorRate: 1})
	e := b.sim.Put("a", map[string]any{"n": 0})
	one := mustBatch(patchItem("1", "items/a", e, `{"n":1}`))

	res := b.do(t, http.MethodPost, "/$batch", one)
	require.Equal(t, http.StatusInternalServerError, res.status)
	res = b.do(t, http.MethodPost, "/$batch", one)
	require.Equal(t, http.StatusServiceUnavailable, res.status)
	require.Equal(t, "1", res.header.Get("Retry-After"))
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status, "single requests do not draw the Batch… rates")

	b.sim.SetFaults(remotesim.Faults{BatchRateLimitRate: 1})
	res = b.do(t, http.MethodPost, "/$batch", one)
	require.Equal(t, http.StatusTooManyRequests, res.status)
	require.Equal(t, "1", res.header.Get("Retry-After"))

	b.sim.SetFaults(remotesim.Faults{BatchResetRate: 1})
	_, err := b.send(t.Context(), http.MethodPost, "/$batch", one)
	require.Error(t, err)

	require.Len(t, b.sim.History("a"), 1, "no item ran")
	var got []string
	for _, r := range b.sim.Requests() {
		got = append(got, fmt.Sprint(r.Method, " ", r.Batch, " ", r.Fault, " ", r.Status))
	}
	require.Equal(t, []string{"POST 1 error 500", "POST 2 error 503", "GET 0  200", "POST 3 ratelimit 429", "POST 4 reset 0"}, got)
	st := b.sim.Stats()
	require.Equal(t, 0, st.BatchPosts, "faulted POSTs never reached the batch logic")
	require.Equal(t, 0, st.BatchItems)
	require.Equal(t, 4, st.Faults)
	require.Equal(t, 5, st.Requests)
}

func TestBatchShuffledAnswers(t *testing.T) {
	t.Parallel()
	run := func() [][]string {
		b := setup(t, remotesim.Options{BatchWrites: true, ShuffleBatchResponses: true, Seed: 3})
		var items []item
		for i := range 8 {
			id := fmt.Sprint("r", i)
			items = append(items, patchItem(id, "items/"+id, b.sim.Put(id, nil), `{"n":1}`))
		}
		var orders [][]string
		for range 3 {
			_, got, order := b.batch(t, items...)
			require.Len(t, got, 8)
			orders = append(orders, order)
		}
		return orders
	}
	first := run()
	require.Equal(t, first, run(), "the same Seed shuffles the same way")
	sorted := []string{"r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"}
	shuffled := 0
	for _, o := range first {
		require.ElementsMatch(t, sorted, o)
		if !slices.Equal(sorted, o) {
			shuffled++
		}
	}
	require.Positive(t, shuffled, "orders: got %v; want some not in request order", first)
}

func TestBatchWaitsLatencyOncePerBatch(t *testing.T) {
	t.Parallel()
	const latency, n = 100 * time.Millisecond, 20
	b := setup(t, remotesim.Options{BatchWrites: true, Latency: latency})
	var items []item
	for i := range n {
		id := fmt.Sprint("r", i)
		items = append(items, patchItem(id, "items/"+id, b.sim.Put(id, nil), `{"n":1}`))
	}
	res, _, _ := b.batch(t, items...)
	require.Equal(t, http.StatusOK, res.status)

	reqs := b.sim.Requests()
	require.Len(t, reqs, 1+n)
	post := reqs[0]
	took := post.End.Sub(post.Start)
	require.GreaterOrEqual(t, took, latency, "got %v; want >= %v", took, latency)
	// Per-item latency would take n × latency = 2s; once per batch takes ~latency.
	require.Less(t, took, n*latency, "got %v; want well under %v", took, n*latency)
	for _, r := range reqs[1:] {
		require.False(t, r.Start.Before(post.Start.Add(latency)), "items run after the batch's latency")
	}
}

func TestBatchRunsAfterCommitPerItem(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true})
	e := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"})
	eb := b.sim.Put("b", map[string]any{"owner": "crm"})

	var mu sync.Mutex
	var seen []string
	b.sim.SetHooks(remotesim.Hooks{AfterCommitFunc: func(_ context.Context, c remotesim.Commit) {
		mu.Lock()
		seen = append(seen, fmt.Sprint(c.Request.Batch, c.Request.BatchItem, c.Status))
		mu.Unlock()
		for _, r := range b.sim.Requests() {
			if r.Method == http.MethodPost {
				t.Errorf("the batch POST finished before an item's hook: got %+v; want it in progress", r)
			}
		}
		if c.Request.ID == "a" {
			// A person edits a between the items of the batch.
			b.sim.Edit("a", map[string]any{"owner": "bob"}, "bob")
		}
	}})
	_, got, _ := b.batch(t,
		patchItem("first", "items/a", e, `{"status":"won"}`),
		patchItem("other", "items/b", eb, `{"owner":"me"}`),
	)
	require.Equal(t, http.StatusOK, got["first"].Status)
	require.Equal(t, b.sim.History("a")[1].ETag, got["first"].Headers["etag"])
	require.Equal(t, []string{"1first200", "1other200"}, seen)

	// The answered ETag is stale now: bob's edit is protected.
	_, got, _ = b.batch(t, patchItem("again", "items/a", got["first"].Headers["etag"], `{"owner":"crm"}`))
	require.Equal(t, http.StatusPreconditionFailed, got["again"].Status)
	fields, _, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"owner": "bob", "status": "won"}, fields)
}

func TestBatchItemsForOneResourceCountAsInFlightTogether(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true})
	e := b.sim.Put("a", nil)
	b.sim.Put("b", nil)
	_, _, _ = b.batch(t, patchItem("1", "items/a", e, `{}`), item{"id": "2", "method": "GET", "url": "items/b"})
	require.Equal(t, 1, b.sim.Stats().MaxInFlightPerResource)
	_, _, _ = b.batch(t, item{"id": "1", "method": "GET", "url": "items/a"}, item{"id": "2", "method": "GET", "url": "items/a"})
	require.Equal(t, 2, b.sim.Stats().MaxInFlightPerResource, "two items for one resource in one batch overlap")
}

func TestBatchConcurrentClients(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, IdempotencyCache: true, ShuffleBatchResponses: true, BatchMissingRate: 0.1, BatchMissingAppliedRate: 0.5})
	const clients, resources = 4, 10
	for c := range clients {
		for r := range resources {
			b.sim.Put(fmt.Sprintf("c%d-r%d", c, r), map[string]any{"n": 0})
		}
	}
	// Each client increments its own resources through batches until every one reaches 5,
	// re-reading ETags after a missing answer.
	var wg sync.WaitGroup
	for c := range clients {
		wg.Go(func() {
			for round := 0; round < 200; round++ {
				var items []item
				for r := range resources {
					id := fmt.Sprintf("c%d-r%d", c, r)
					fields, etag, _ := b.sim.Get(id)
					if n := fields["n"].(float64); n < 5 {
						items = append(items, patchItem(id, "items/"+id, etag, fmt.Sprintf(`{"n":%d}`, int(n)+1)))
					}
				}
				if len(items) == 0 {
					return
				}
				if _, err := b.send(t.Context(), http.MethodPost, "/$batch", mustBatch(items...)); err != nil {
					t.Error(err)
					return
				}
			}
			t.Errorf("client %d: not done after 200 rounds", c)
		})
	}
	wg.Wait()
	for c := range clients {
		for r := range resources {
			id := fmt.Sprintf("c%d-r%d", c, r)
			fields, _, _ := b.sim.Get(id)
			require.Equal(t, float64(5), fields["n"], id)
			require.Len(t, b.sim.History(id), 6, "%s: every increment written once", id)
		}
	}
	require.Equal(t, 1, b.sim.Stats().MaxInFlightPerResource)
}

package remotesim_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

func TestNoETag(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, Misbehavior: remotesim.Misbehavior{NoETag: true}})
	e := b.sim.Put("a", map[string]any{"owner": "crm"})

	res := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, http.StatusOK, res.status)
	require.NotContains(t, res.header, "Etag", "GET")

	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e)
	require.Equal(t, http.StatusOK, res.status, "the ETag is still enforced and accepted")
	require.NotContains(t, res.header, "Etag", "PATCH")
	_, e2, _ := b.sim.Get("a")

	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"x"}`, "If-Match", e)
	require.Equal(t, http.StatusPreconditionFailed, res.status)
	require.NotContains(t, res.header, "Etag", "412")
	require.JSONEq(t, fmt.Sprintf(`{"error":"etag mismatch","etag":%q}`, e2), res.body, "the conflict body still names it")

	res = b.do(t, http.MethodGet, "/items?ids=a&fields=id,etag", "")
	require.JSONEq(t, fmt.Sprintf(`[{"id":"a","etag":%q}]`, e2), res.body, "batch lookups still carry it")

	_, got, _ := b.batch(t, item{"id": "1", "method": "GET", "url": "items/a"})
	require.Equal(t, map[string]string{"content-type": "application/json"}, got["1"].Headers, "$batch item headers")

	t.Run("IDs limits it to those resources", func(t *testing.T) {
		b.sim.Put("other", nil)
		b.sim.SetMisbehavior(remotesim.Misbehavior{NoETag: true, IDs: []string{"a"}})
		require.NotContains(t, b.do(t, http.MethodGet, itemPath("a"), "").header, "Etag")
		require.NotEmpty(t, b.do(t, http.MethodGet, itemPath("other"), "").header.Get("ETag"))
		b.sim.SetMisbehavior(remotesim.Misbehavior{})
		require.NotEmpty(t, b.do(t, http.MethodGet, itemPath("a"), "").header.Get("ETag"), "behaves again")
	})
}

func TestStrictIfMatchRefusesWeakETags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name           string
		weak           bool
		conflictStatus int
		ifMatch        func(etag string) string
		wantStatus     int
	}{
		{"the weak ETag it served, echoed exactly", true, 0, func(e string) string { return e }, http.StatusPreconditionFailed},
		{"409 server still answers 412", true, http.StatusConflict, func(e string) string { return e }, http.StatusPreconditionFailed},
		{"weak form of a strong ETag", false, 0, func(e string) string { return "W/" + e }, http.StatusPreconditionFailed},
		{"strong ETag is accepted", false, 0, func(e string) string { return e }, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{WeakETags: tt.weak, StrictIfMatch: true, ConflictStatus: tt.conflictStatus, BatchWrites: true})
			e := b.sim.Put("a", map[string]any{"owner": "crm"})
			for _, method := range []string{http.MethodPatch, http.MethodPut} {
				res := b.do(t, method, itemPath("a"), `{"owner":"me"}`, "If-Match", tt.ifMatch(e))
				require.Equal(t, tt.wantStatus, res.status, method)
				if tt.wantStatus == http.StatusPreconditionFailed {
					require.JSONEq(t, fmt.Sprintf(`{"error":"weak entity tag in If-Match: If-Match compares strongly, so it never matches","etag":%q}`, e), res.body)
					require.Equal(t, e, res.header.Get("ETag"))
				} else {
					e = res.header.Get("ETag")
				}
			}
			_, got, _ := b.batch(t, item{"id": "d", "method": "DELETE", "url": "items/a", "headers": map[string]string{"if-match": tt.ifMatch(e)}})
			if tt.wantStatus == http.StatusPreconditionFailed {
				require.Equal(t, http.StatusPreconditionFailed, got["d"].Status, "$batch item")
				require.Len(t, b.sim.History("a"), 1, "nothing was ever written")
				require.Equal(t, 3, b.sim.Stats().Conflicts)
			} else {
				require.Equal(t, http.StatusNoContent, got["d"].Status)
			}
		})
	}
}

func TestHugeNumberField(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, Misbehavior: remotesim.Misbehavior{HugeNumberField: "amount"}})
	e := b.sim.Put("a", map[string]any{"owner": "crm"})

	res := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, http.StatusOK, res.status)
	require.Equal(t, `{"id":"a","owner":"crm","amount":1e200000}`, res.body)
	var m map[string]any
	require.Error(t, json.Unmarshal([]byte(res.body), &m), "beyond float64, so beyond what a plain decoder accepts")
	require.Equal(t, strconv.Itoa(len(res.body)), res.header.Get("Content-Length"))

	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e)
	require.Equal(t, http.StatusOK, res.status)
	require.Equal(t, `{"id":"a","owner":"me","amount":1e200000}`, res.body)

	fields, e2, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"owner": "me"}, fields, "state is unchanged")

	res = b.do(t, http.MethodGet, "/items?ids=a&fields=id,etag,amount", "")
	require.Equal(t, fmt.Sprintf(`[{"amount":1e200000,"etag":%q,"id":"a"}]`, e2), res.body)
	res = b.do(t, http.MethodGet, "/items?ids=a", "")
	require.Equal(t, fmt.Sprintf(`[{"amount":1e200000,"etag":%q,"id":"a","owner":"me"}]`, e2), res.body)
	res = b.do(t, http.MethodGet, "/items?ids=a&fields=id,etag", "")
	require.Equal(t, fmt.Sprintf(`[{"etag":%q,"id":"a"}]`, e2), res.body, "not asked for")

	res, _, _ = b.batch(t, item{"id": "1", "method": "GET", "url": "items/a"})
	require.Contains(t, res.body, `"body":{"id":"a","owner":"me","amount":1e200000}`)

	res = b.do(t, http.MethodPatch, itemPath("a"), `{}`)
	require.Equal(t, `{"error":"If-Match required"}`, res.body, "error bodies are no representation")

	t.Run("IDs limits it to those resources", func(t *testing.T) {
		eo := b.sim.Put("other", map[string]any{"amount": 1})
		b.sim.SetMisbehavior(remotesim.Misbehavior{HugeNumberField: "amount", IDs: []string{"a"}})
		require.Equal(t, `{"amount":1,"id":"other"}`, b.do(t, http.MethodGet, itemPath("other"), "").body)
		res := b.do(t, http.MethodGet, "/items?ids=a,other&fields=id,amount", "")
		require.Equal(t, `[{"amount":1e200000,"id":"a"},{"amount":1,"id":"other"}]`, res.body)
		require.NotEmpty(t, eo)
	})
}

func TestInvalidUTF8ETags(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{BatchWrites: true, Misbehavior: remotesim.Misbehavior{InvalidUTF8ETags: true}})
	e := b.sim.Put("a", map[string]any{"owner": "crm"})
	require.False(t, utf8.ValidString(e), "got %q; want invalid UTF-8", e)
	require.True(t, strings.HasSuffix(e, "\xff\xfe\""), "got %q", e)

	res := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, e, res.header.Get("ETag"), "sent byte for byte")

	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e)
	require.Equal(t, http.StatusOK, res.status, "echoing the bytes exactly matches")
	e2 := res.header.Get("ETag")
	require.False(t, utf8.ValidString(e2))
	require.Equal(t, b.sim.History("a")[1].ETag, e2)

	_, got, _ := b.batch(t, item{"id": "1", "method": "GET", "url": "items/a"})
	require.Equal(t, strings.Replace(e2, "\xff\xfe", "\uFFFD\uFFFD", 1), got["1"].Headers["etag"], "JSON carries U+FFFD instead")

	t.Run("IDs limits it to ETags issued for those resources", func(t *testing.T) {
		b.sim.SetMisbehavior(remotesim.Misbehavior{InvalidUTF8ETags: true, IDs: []string{"bad"}})
		require.True(t, utf8.ValidString(b.sim.Put("good", nil)))
		require.False(t, utf8.ValidString(b.sim.Put("bad", nil)))
	})
}

func TestEchoAuthorization(t *testing.T) {
	t.Parallel()
	const secret = "Bearer s3cr3t-t0ken"
	b := setup(t, remotesim.Options{BatchWrites: true, Misbehavior: remotesim.Misbehavior{EchoAuthorization: true}})
	e := b.sim.Put("a", map[string]any{"owner": "crm"})
	auth := []string{"Authorization", secret}

	res := b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, append([]string{"If-Match", `"0-stale"`}, auth...)...)
	require.Equal(t, http.StatusPreconditionFailed, res.status)
	require.JSONEq(t, fmt.Sprintf(`{"error":"etag mismatch","etag":%q,"authorization":%q}`, e, secret), res.body)

	res = b.do(t, http.MethodGet, itemPath("nope"), "", auth...)
	require.JSONEq(t, fmt.Sprintf(`{"error":"not found","authorization":%q}`, secret), res.body)

	res = b.do(t, http.MethodGet, itemPath("a"), "", auth...)
	require.Equal(t, http.StatusOK, res.status)
	require.NotContains(t, res.body, "s3cr3t", "only error bodies echo it")

	res = b.do(t, http.MethodGet, itemPath("nope"), "")
	require.JSONEq(t, `{"error":"not found"}`, res.body, "nothing to echo without the header")

	b.sim.SetFaults(remotesim.Faults{ErrorRate: 1})
	res = b.do(t, http.MethodGet, itemPath("a"), "", auth...)
	require.JSONEq(t, fmt.Sprintf(`{"error":"internal error","authorization":%q}`, secret), res.body, "injected faults too")
	b.sim.SetFaults(remotesim.Faults{})

	raw := mustBatch(patchItem("1", "items/a", `"0-stale"`, `{}`))
	res = b.do(t, http.MethodPost, "/$batch", raw, auth...)
	require.Equal(t, http.StatusOK, res.status)
	require.Contains(t, res.body, `"authorization":"Bearer s3cr3t-t0ken"`, "$batch item error bodies too")

	// The Sim itself keeps nothing.
	dump, err := json.Marshal([]any{b.sim.Requests(), b.sim.Stats(), b.sim.History("a")})
	require.NoError(t, err)
	require.NotContains(t, string(dump), "s3cr3t")
	for _, p := range []string{"/_sim/requests", "/_sim/state", "/_sim/stats", "/_sim/history?id=a"} {
		require.NotContains(t, b.do(t, http.MethodGet, p, "").body, "s3cr3t", p)
	}
}

func TestPadBodyBytes(t *testing.T) {
	t.Parallel()
	const size = 5 << 20
	b := setup(t, remotesim.Options{BatchWrites: true, Misbehavior: remotesim.Misbehavior{PadBodyBytes: size}})
	b.sim.Put("a", map[string]any{"owner": "crm"})

	check := func(res result, want map[string]any) {
		t.Helper()
		require.Equal(t, strconv.Itoa(size), res.header.Get("Content-Length"))
		require.Len(t, res.body, size)
		var got map[string]any
		require.NoError(t, json.Unmarshal([]byte(res.body), &got), "a padded body is still JSON")
		pad, _ := got["_pad"].(string)
		require.Equal(t, strings.Repeat("x", len(pad)), pad)
		delete(got, "_pad")
		require.Equal(t, want, got)
	}
	check(b.do(t, http.MethodGet, itemPath("a"), ""), map[string]any{"id": "a", "owner": "crm"})
	check(b.do(t, http.MethodGet, itemPath("nope"), ""), map[string]any{"error": "not found"})
	check(b.do(t, http.MethodPost, "/$batch", `{"requests":[]}`), map[string]any{"responses": []any{}})

	res := b.do(t, http.MethodGet, "/items?ids=a&fields=id", "")
	require.Equal(t, `[{"id":"a"}]`, res.body, "arrays are not padded")

	t.Run("exact sizes", func(t *testing.T) {
		// {"error":"not found"} is 21 bytes; the pad adds `,"_pad":""` (10) and its x's.
		for _, tt := range []struct {
			size int64
			want string
		}{
			{34, `{"error":"not found","_pad":"xxx"}`},
			{31, `{"error":"not found","_pad":""}`},
			{30, `{"error":"not found"}`}, // too small to pad: sent as it is
		} {
			b.sim.SetMisbehavior(remotesim.Misbehavior{PadBodyBytes: tt.size})
			res := b.do(t, http.MethodGet, itemPath("nope"), "")
			require.Equal(t, tt.want, res.body, "size %d", tt.size)
			require.Equal(t, strconv.Itoa(len(tt.want)), res.header.Get("Content-Length"))
		}
	})
}

// countingWriter is an http.ResponseWriter that counts the body and keeps nothing.
type countingWriter struct {
	header http.Header
	status int
	n      int64
	last   byte
}

func (w *countingWriter) Header() http.Header { return w.header }
func (w *countingWriter) WriteHeader(status int) {
	w.status = status
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	if len(p) > 0 {
		w.last = p[len(p)-1]
	}
	return len(p), nil
}

// TestPadBodyBytesStreamsWithoutHoldingTheBody measures the bytes allocated while serving a
// 256 MiB answer. It does not call t.Parallel: allocations by other tests running at the
// same time would count too.
func TestPadBodyBytesStreamsWithoutHoldingTheBody(t *testing.T) {
	const size = 256 << 20
	sim := remotesim.New(remotesim.Options{Seed: 1, RequestLogSize: -1, Misbehavior: remotesim.Misbehavior{PadBodyBytes: size}})
	sim.Put("a", map[string]any{"owner": "crm"})
	req := httptest.NewRequest(http.MethodGet, "/items/a", nil)

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	w := &countingWriter{header: http.Header{}}
	sim.ServeHTTP(w, req)
	runtime.ReadMemStats(&after)

	require.Equal(t, http.StatusOK, w.status)
	require.Equal(t, int64(size), w.n)
	require.Equal(t, byte('}'), w.last)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d bytes", allocated)
	require.Less(t, allocated, uint64(1<<20), "allocated %d bytes for a %d-byte answer; want < 1 MiB", allocated, size)
}

func TestSlowBody(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{SlowBodyBytesPerSec: 20}})
	e := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"}) // a 40-byte body: 2s

	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, b.srv.URL+itemPath("a"), nil)
	require.NoError(t, err)
	resp, err := b.srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	// The status and headers arrived while the handler is still sending the body.
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, e, resp.Header.Get("ETag"))
	require.Empty(t, b.sim.Requests(), "the request is still in progress")

	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.JSONEq(t, `{"id":"a","owner":"crm","status":"new"}`, string(body))
	require.Eventually(t, func() bool { return len(b.sim.Requests()) == 1 }, 10*time.Second, time.Millisecond)
}

func TestSlowBodyTricklesInChunks(t *testing.T) {
	t.Parallel()
	// 20 bytes/s sends one byte per 50ms tick: the first read returns a single byte.
	b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{SlowBodyBytesPerSec: 20}})
	b.sim.Put("a", map[string]any{"owner": "crm"})
	resp, err := b.srv.Client().Get(b.srv.URL + itemPath("a"))
	require.NoError(t, err)
	defer resp.Body.Close()
	first := make([]byte, 64)
	n, err := resp.Body.Read(first)
	require.NoError(t, err)
	require.Equal(t, "{", string(first[:n]))
}

func TestSlowBodyStopsWhenTheClientGoesAway(t *testing.T) {
	t.Parallel()
	// 1 MiB at 10 bytes/s would take more than a day.
	b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{SlowBodyBytesPerSec: 10, PadBodyBytes: 1 << 20}})
	b.sim.Put("a", nil)
	ctx, cancel := context.WithCancel(t.Context())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.srv.URL+itemPath("a"), nil)
	require.NoError(t, err)
	resp, err := b.srv.Client().Do(req)
	require.NoError(t, err)
	require.Equal(t, "1048576", resp.Header.Get("Content-Length"))
	r := bufio.NewReader(resp.Body)
	got, err := r.Peek(2)
	require.NoError(t, err)
	require.Equal(t, `{"`, string(got))
	cancel()
	resp.Body.Close()

	// The handler returns promptly instead of trickling for a day.
	require.Eventually(t, func() bool { return len(b.sim.Requests()) == 1 }, 10*time.Second, 5*time.Millisecond)
	require.Equal(t, http.StatusOK, b.sim.Requests()[0].Status)
}

func TestSetMisbehaviorPanicsOnInvalidValues(t *testing.T) {
	t.Parallel()
	sim := remotesim.New(remotesim.Options{})
	for _, m := range []remotesim.Misbehavior{{PadBodyBytes: -1}, {PadBodyBytes: 1<<30 + 1}, {SlowBodyBytesPerSec: -1}} {
		require.Panics(t, func() { sim.SetMisbehavior(m) }, "%+v", m)
		require.Panics(t, func() { remotesim.New(remotesim.Options{Misbehavior: m}) }, "%+v", m)
	}
}

func TestOddAnswerModes(t *testing.T) {
	t.Parallel()
	t.Run("OmitFromBatchLookup leaves the IDs out, or answers [] without IDs", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{IDs: []string{"a"}, OmitFromBatchLookup: true}})
		b.sim.Put("a", nil)
		eb := b.sim.Put("b", nil)
		res := b.do(t, http.MethodGet, "/items?ids=a,b&fields=id,etag", "")
		require.JSONEq(t, fmt.Sprintf(`[{"id":"b","etag":%q}]`, eb), res.body)
		require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status, "a GET still finds it")
		b.sim.SetMisbehavior(remotesim.Misbehavior{OmitFromBatchLookup: true})
		require.JSONEq(t, `[]`, b.do(t, http.MethodGet, "/items?ids=a,b", "").body)
	})
	t.Run("Status answers the chosen methods before touching state", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{Status: http.StatusUnauthorized, StatusMethods: []string{http.MethodPatch}}})
		e := b.sim.Put("a", map[string]any{"owner": "crm"})
		res := b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", e)
		require.Equal(t, http.StatusUnauthorized, res.status)
		require.JSONEq(t, `{"error":"Unauthorized"}`, res.body)
		require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status, "GET is not chosen")
		got, _, _ := b.sim.Get("a")
		require.Equal(t, map[string]any{"owner": "crm"}, got, "state untouched")
	})
	t.Run("HTMLBody and ETagEchoesAuthorization", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Misbehavior: remotesim.Misbehavior{HTMLBody: true, ETagEchoesAuthorization: true}})
		b.sim.Put("a", map[string]any{"owner": "crm"})
		res := b.do(t, http.MethodGet, itemPath("a"), "", "Authorization", "Bearer tok")
		require.Equal(t, http.StatusOK, res.status)
		require.Contains(t, res.header.Get("Content-Type"), "text/html")
		require.True(t, strings.HasPrefix(res.body, "<!DOCTYPE html>"), "body: %q", res.body)
		require.Equal(t, `"Bearer tok"`, res.header.Get("ETag"))
	})
}

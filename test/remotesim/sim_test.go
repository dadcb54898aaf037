package remotesim_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stagesync/stagesync/test/remotesim"
)

// testBundle is a Sim served over real HTTP.
type testBundle struct {
	sim *remotesim.Sim
	srv *httptest.Server
}

func setup(t *testing.T, opts remotesim.Options) *testBundle {
	t.Helper()
	if opts.Seed == 0 {
		opts.Seed = 1
	}
	sim := remotesim.New(opts)
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	return &testBundle{sim: sim, srv: srv}
}

// result is a response read in full.
type result struct {
	status int
	header http.Header
	body   string
}

// json decodes the body into a generic value.
func (r result) json(t *testing.T) any {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal([]byte(r.body), &v), "body %q", r.body)
	return v
}

// do sends one request and reads the response; headers alternate name, value.
func (b *testBundle) do(t *testing.T, method, path, body string, headers ...string) result {
	t.Helper()
	res, err := b.send(t.Context(), method, path, body, headers...)
	require.NoError(t, err)
	return res
}

// send is do for goroutines other than the test's: it reports errors instead of failing.
func (b *testBundle) send(ctx context.Context, method, path, body string, headers ...string) (result, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, b.srv.URL+path, rd)
	if err != nil {
		return result{}, err
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := b.srv.Client().Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return result{}, err
	}
	return result{status: resp.StatusCode, header: resp.Header, body: string(raw)}, nil
}

func itemPath(id string) string { return "/items/" + url.PathEscape(id) }

func TestGet(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a", map[string]any{"owner": "crm", "n": 1})

	res := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, http.StatusOK, res.status)
	require.Equal(t, "application/json", res.header.Get("Content-Type"))
	require.Equal(t, etag, res.header.Get("ETag"))
	require.JSONEq(t, `{"id":"a","owner":"crm","n":1}`, res.body)

	t.Run("If-None-Match stale is 200", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, itemPath("a"), "", "If-None-Match", `"0-stale"`)
		require.Equal(t, http.StatusOK, res.status)
	})
	t.Run("missing is 404", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, itemPath("nope"), "")
		require.Equal(t, http.StatusNotFound, res.status)
		require.JSONEq(t, `{"error":"not found"}`, res.body)
	})
}

func TestGetIfNoneMatch(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		weak        bool
		ifNoneMatch func(etag string) string
		wantStatus  int
	}{
		{"current ETag is 304", false, func(e string) string { return e }, http.StatusNotModified},
		{"star is 304", false, func(string) string { return "*" }, http.StatusNotModified},
		{"list holding the current ETag is 304", false, func(e string) string { return `"0-a", ` + e + `,"0-b"` }, http.StatusNotModified},
		{"weak form of a strong ETag is 304 (weak comparison)", false, func(e string) string { return "W/" + e }, http.StatusNotModified},
		{"weak ETag echoed is 304", true, func(e string) string { return e }, http.StatusNotModified},
		{"strong form of a weak ETag is 304 (weak comparison)", true, func(e string) string { return strings.TrimPrefix(e, "W/") }, http.StatusNotModified},
		{"stale ETag is 200", false, func(string) string { return `"0-stale"` }, http.StatusOK},
		{"list of stale ETags is 200", false, func(string) string { return `"0-a", W/"0-b"` }, http.StatusOK},
		{"unquoted is 200", false, func(e string) string { return strings.Trim(e, `"`) }, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{WeakETags: tt.weak})
			etag := b.sim.Put("a", map[string]any{"owner": "crm"})

			res := b.do(t, http.MethodGet, itemPath("a"), "", "If-None-Match", tt.ifNoneMatch(etag))
			require.Equal(t, tt.wantStatus, res.status)
			require.Equal(t, etag, res.header.Get("ETag"))
			st := b.sim.Stats()
			require.Equal(t, 1, st.Gets)
			if tt.wantStatus == http.StatusNotModified {
				require.Empty(t, res.body)
				require.Equal(t, 1, st.NotModified, "Stats.NotModified: got %d; want 1", st.NotModified)
			} else {
				require.JSONEq(t, `{"id":"a","owner":"crm"}`, res.body)
				require.Equal(t, 0, st.NotModified, "Stats.NotModified: got %d; want 0", st.NotModified)
			}
			reqs := b.sim.Requests()
			require.Len(t, reqs, 1)
			require.Equal(t, tt.wantStatus, reqs[0].Status)
		})
	}
}

func TestPatchWithoutIfMatchIs428(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a", map[string]any{"owner": "crm"})

	res := b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`)
	require.Equal(t, http.StatusPreconditionRequired, res.status)
	require.JSONEq(t, `{"error":"If-Match required"}`, res.body)

	fields, got, ok := b.sim.Get("a")
	require.True(t, ok)
	require.Equal(t, etag, got)
	require.Equal(t, map[string]any{"owner": "crm"}, fields)
	require.Equal(t, 1, b.sim.Stats().PreconditionRequired)
}

func TestStaleIfMatch(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name           string
		conflictStatus int
		wantStatus     int
	}{
		{"default is 412", 0, http.StatusPreconditionFailed},
		{"412", http.StatusPreconditionFailed, http.StatusPreconditionFailed},
		{"409", http.StatusConflict, http.StatusConflict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{ConflictStatus: tt.conflictStatus})
			old := b.sim.Put("a", map[string]any{"owner": "crm"})
			current, ok := b.sim.Edit("a", map[string]any{"status": "closed"}, "bob")
			require.True(t, ok)

			for _, method := range []string{http.MethodPatch, http.MethodPut, http.MethodDelete} {
				res := b.do(t, method, itemPath("a"), `{"owner":"me"}`, "If-Match", old)
				require.Equal(t, tt.wantStatus, res.status, method)
				require.Equal(t, current, res.header.Get("ETag"), method)
				require.JSONEq(t, fmt.Sprintf(`{"error":"etag mismatch","etag":%q}`, current), res.body, method)
			}

			fields, etag, ok := b.sim.Get("a")
			require.True(t, ok)
			require.Equal(t, current, etag)
			require.Equal(t, map[string]any{"owner": "crm", "status": "closed"}, fields)
			require.Equal(t, 3, b.sim.Stats().Conflicts)
		})
	}
}

func TestPatchMergesFields(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	old := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new", "note": "x"})

	res := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won","note":null,"amount":12.5,"id":"a"}`, "If-Match", old)
	require.Equal(t, http.StatusOK, res.status)
	etag := res.header.Get("ETag")
	require.NotEmpty(t, etag)
	require.NotEqual(t, old, etag)
	require.JSONEq(t, `{"id":"a","owner":"crm","status":"won","amount":12.5}`, res.body)

	fields, got, ok := b.sim.Get("a")
	require.True(t, ok)
	require.Equal(t, etag, got)
	require.Equal(t, map[string]any{"owner": "crm", "status": "won", "amount": 12.5}, fields)

	again := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, etag, again.header.Get("ETag"))
	require.JSONEq(t, res.body, again.body)
	require.Equal(t, 1, b.sim.Stats().Patches)
}

func TestWritesRejectBadBodies(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		method     string
		body       string
		wantStatus int
		wantBody   string
	}{
		{"array", http.MethodPatch, `[1]`, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"scalar", http.MethodPatch, `"x"`, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"null", http.MethodPut, `null`, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"malformed", http.MethodPatch, `{"a":`, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"trailing data", http.MethodPut, `{"a":1}{}`, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"empty", http.MethodPatch, ``, http.StatusBadRequest, `{"error":"body must be a JSON object"}`},
		{"another id", http.MethodPatch, `{"id":"b"}`, http.StatusUnprocessableEntity, `{"error":"id is read-only"}`},
		{"numeric id", http.MethodPut, `{"id":1}`, http.StatusUnprocessableEntity, `{"error":"id is read-only"}`},
		{"INVALID on PATCH", http.MethodPatch, `{"owner":"ok","status":"INVALID"}`, http.StatusUnprocessableEntity, `{"error":"field status: value INVALID is not allowed"}`},
		{"INVALID on PUT", http.MethodPut, `{"z":"INVALID","owner":"INVALID"}`, http.StatusUnprocessableEntity, `{"error":"field owner: value INVALID is not allowed"}`},
		{"too large", http.MethodPatch, `{"owner":"` + strings.Repeat("x", 100) + `"}`, http.StatusRequestEntityTooLarge, `{"error":"body too large"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, remotesim.Options{MaxBodyBytes: 64})
			etag := b.sim.Put("a", map[string]any{"owner": "crm"})

			res := b.do(t, tt.method, itemPath("a"), tt.body, "If-Match", etag)
			require.Equal(t, tt.wantStatus, res.status)
			require.JSONEq(t, tt.wantBody, res.body)

			_, got, ok := b.sim.Get("a")
			require.True(t, ok)
			require.Equal(t, etag, got)
			require.Len(t, b.sim.History("a"), 1)
		})
	}
}

func TestPatchMissingIs404(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	res := b.do(t, http.MethodPatch, itemPath("nope"), `{"a":1}`, "If-Match", `"1-x"`)
	require.Equal(t, http.StatusNotFound, res.status)
	require.JSONEq(t, `{"error":"not found"}`, res.body)
	require.Empty(t, b.sim.IDs())
}

func TestPutReplacesFields(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	old := b.sim.Put("a", map[string]any{"owner": "crm", "status": "new"})

	res := b.do(t, http.MethodPut, itemPath("a"), `{"status":"won","tags":["x"]}`)
	require.Equal(t, http.StatusPreconditionRequired, res.status)

	res = b.do(t, http.MethodPut, itemPath("a"), `{"status":"won","tags":["x"]}`, "If-Match", old)
	require.Equal(t, http.StatusOK, res.status)
	require.NotEqual(t, old, res.header.Get("ETag"))
	require.JSONEq(t, `{"id":"a","status":"won","tags":["x"]}`, res.body)

	fields, etag, ok := b.sim.Get("a")
	require.True(t, ok)
	require.Equal(t, res.header.Get("ETag"), etag)
	require.Equal(t, map[string]any{"status": "won", "tags": []any{"x"}}, fields)

	res = b.do(t, http.MethodPut, itemPath("missing"), `{}`, "If-Match", old)
	require.Equal(t, http.StatusNotFound, res.status)
	require.Equal(t, 3, b.sim.Stats().Puts)
}

func TestPutCreate(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})

	res := b.do(t, http.MethodPut, itemPath("new"), `{"owner":"me"}`, "If-None-Match", "*")
	require.Equal(t, http.StatusCreated, res.status)
	etag := res.header.Get("ETag")
	require.NotEmpty(t, etag)
	require.JSONEq(t, `{"id":"new","owner":"me"}`, res.body)

	res = b.do(t, http.MethodPut, itemPath("new"), `{"owner":"other"}`, "If-None-Match", "*")
	require.Equal(t, http.StatusPreconditionFailed, res.status)
	require.Equal(t, etag, res.header.Get("ETag"))
	require.JSONEq(t, fmt.Sprintf(`{"error":"resource exists","etag":%q}`, etag), res.body)

	fields, got, ok := b.sim.Get("new")
	require.True(t, ok)
	require.Equal(t, etag, got)
	require.Equal(t, map[string]any{"owner": "me"}, fields)

	st := b.sim.Stats()
	require.Equal(t, 1, st.Creates)
	require.Equal(t, 2, st.Puts)
	require.Equal(t, 1, st.Conflicts)
}

func TestDelete(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a", map[string]any{"owner": "crm"})

	res := b.do(t, http.MethodDelete, itemPath("a"), "")
	require.Equal(t, http.StatusPreconditionRequired, res.status)

	res = b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", etag)
	require.Equal(t, http.StatusNoContent, res.status)
	require.Empty(t, res.body)

	_, _, ok := b.sim.Get("a")
	require.False(t, ok)
	require.Empty(t, b.sim.IDs())
	require.Equal(t, http.StatusNotFound, b.do(t, http.MethodGet, itemPath("a"), "").status)
	require.Equal(t, http.StatusNotFound, b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", etag).status)

	h := b.sim.History("a")
	require.Len(t, h, 2)
	require.True(t, h[1].Deleted)
	require.Equal(t, "DELETE", h[1].Method)
	require.Equal(t, "api", h[1].Writer)
	require.Equal(t, 3, b.sim.Stats().Deletes) // 428, 204 and 404 all reached the handler
}

func TestBatchETags(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{ItemPrefix: "/assignments"})
	etags := map[string]string{}
	for _, id := range []string{"a", "b", "c", "x y"} {
		etags[id] = b.sim.Put(id, map[string]any{"owner": "crm"})
	}

	t.Run("requested order, unknown omitted", func(t *testing.T) {
		t.Parallel()
		q := url.Values{"ids": {"c,unknown,a,x y,c"}, "fields": {"id,etag"}}
		res := b.do(t, http.MethodGet, "/assignments?"+q.Encode(), "")
		require.Equal(t, http.StatusOK, res.status)
		require.Equal(t, "application/json", res.header.Get("Content-Type"))
		want := []any{
			map[string]any{"id": "c", "etag": etags["c"]},
			map[string]any{"id": "a", "etag": etags["a"]},
			map[string]any{"id": "x y", "etag": etags["x y"]},
		}
		require.Equal(t, want, res.json(t))
	})
	t.Run("fields=id,etag is exactly id and etag", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, "/assignments?ids=b&fields=id,etag", "")
		require.Equal(t, http.StatusOK, res.status)
		require.JSONEq(t, fmt.Sprintf(`[{"id":"b","etag":%q}]`, etags["b"]), res.body)
	})
	t.Run("nothing found is an empty array", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, "/assignments?ids=zz", "")
		require.Equal(t, http.StatusOK, res.status)
		require.JSONEq(t, `[]`, res.body)
	})
	t.Run("500 ids are allowed", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, "/assignments?ids="+manyIDs(500), "")
		require.Equal(t, http.StatusOK, res.status)
		require.Len(t, res.json(t), 3) // a, b, c
	})
	t.Run("501 ids are 400", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, "/assignments?ids="+manyIDs(501), "")
		require.Equal(t, http.StatusBadRequest, res.status)
		require.JSONEq(t, `{"error":"too many ids: 501 > 500"}`, res.body)
	})
	t.Run("no ids is 400", func(t *testing.T) {
		t.Parallel()
		res := b.do(t, http.MethodGet, "/assignments", "")
		require.Equal(t, http.StatusBadRequest, res.status)
		require.JSONEq(t, `{"error":"ids required"}`, res.body)
	})
}

func TestBatchETagsHonourFields(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{ItemPrefix: "/assignments"})
	ea := b.sim.Put("a", map[string]any{"owner": "crm", "region": "emea", "status": "new", "etag": "a field"})
	eb := b.sim.Put("b", map[string]any{"owner": "bob", "n": 1.5})
	whole := []any{
		map[string]any{"id": "a", "etag": ea, "owner": "crm", "region": "emea", "status": "new"},
		map[string]any{"id": "b", "etag": eb, "owner": "bob", "n": 1.5},
	}
	tests := []struct {
		name, query string
		want        any
	}{
		{"named fields, absent ones left out", "ids=a,b&fields=id,etag,owner,region", []any{
			map[string]any{"id": "a", "etag": ea, "owner": "crm", "region": "emea"},
			map[string]any{"id": "b", "etag": eb, "owner": "bob"},
		}},
		{"unknown fields are absent", "ids=a&fields=id,etag,nope", []any{map[string]any{"id": "a", "etag": ea}}},
		{"spaces around names", "ids=a&fields=etag,+owner+", []any{map[string]any{"etag": ea, "owner": "crm"}}},
		{"fields absent is the whole representation", "ids=a,b", whole},
		{"fields=* is the whole representation", "ids=a,b&fields=*", whole},
		{"* among names is the whole representation", "ids=a,b&fields=owner,*", whole},
		{"fields empty is the whole representation", "ids=a,b&fields=", whole},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			res := b.do(t, http.MethodGet, "/assignments?"+tt.query, "")
			require.Equal(t, http.StatusOK, res.status)
			require.Equal(t, tt.want, res.json(t), "got %s", res.body)
		})
	}
}

func TestBatchGetCountsOnce(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	b.sim.Put("a", nil)
	b.do(t, http.MethodGet, "/items?ids=a,b", "")
	st := b.sim.Stats()
	require.Equal(t, 1, st.BatchGets)
	require.Equal(t, 0, st.Gets)
	require.Equal(t, 1, st.Requests)
}

// manyIDs returns "a,b,c,id-3,…" with n ids, three of which exist.
func manyIDs(n int) string {
	ids := []string{"a", "b", "c"}
	for i := 3; i < n; i++ {
		ids = append(ids, "id-"+strconv.Itoa(i))
	}
	return strings.Join(ids, ",")
}

func TestIDsRoundTripExactly(t *testing.T) {
	t.Parallel()
	ids := []string{"a/b", "..", ".", "../b", "%2F", "a%2Fb", "with space", "what?x=1", "#frag", "a/../b", "ü/é", "%"}
	b := setup(t, remotesim.Options{})
	victims := map[string]string{}
	for _, id := range []string{"a", "b", "x=1"} {
		victims[id] = b.sim.Put(id, map[string]any{"victim": true})
	}

	for _, id := range ids {
		t.Run(id, func(t *testing.T) {
			t.Parallel()
			res := b.do(t, http.MethodPut, itemPath(id), `{"v":1}`, "If-None-Match", "*")
			require.Equal(t, http.StatusCreated, res.status)
			etag := res.header.Get("ETag")

			res = b.do(t, http.MethodGet, itemPath(id), "")
			require.Equal(t, http.StatusOK, res.status)
			require.Equal(t, map[string]any{"id": id, "v": float64(1)}, res.json(t))

			res = b.do(t, http.MethodPatch, itemPath(id), `{"v":2}`, "If-Match", etag)
			require.Equal(t, http.StatusOK, res.status)
			fields, _, ok := b.sim.Get(id)
			require.True(t, ok)
			require.Equal(t, map[string]any{"v": float64(2)}, fields)

			res = b.do(t, http.MethodGet, "/items?"+url.Values{"ids": {id}}.Encode(), "")
			require.Equal(t, http.StatusOK, res.status)
			require.Len(t, res.json(t), 1)
		})
	}
	t.Cleanup(func() {
		for id, etag := range victims {
			fields, got, ok := b.sim.Get(id)
			require.True(t, ok, id)
			require.Equal(t, etag, got, id)
			require.Equal(t, map[string]any{"victim": true}, fields, id)
		}
		require.Len(t, b.sim.IDs(), len(ids)+len(victims))
	})
}

func TestUnknownPaths(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	b.sim.Put("a", nil)
	b.sim.Put("b", nil)
	tests := []struct {
		name, method, path string
		wantStatus         int
	}{
		{"nested path", http.MethodGet, "/items/a/b", http.StatusNotFound},
		{"trailing slash", http.MethodGet, "/items/a/", http.StatusNotFound},
		{"empty id", http.MethodGet, "/items/", http.StatusNotFound},
		{"other collection", http.MethodGet, "/other/a", http.StatusNotFound},
		{"prefix lookalike", http.MethodGet, "/itemsa", http.StatusNotFound},
		{"root", http.MethodGet, "/", http.StatusNotFound},
		{"bad escape", http.MethodGet, "/items/%zz", http.StatusBadRequest}, // refused by net/http itself
		{"POST item", http.MethodPost, "/items/a", http.StatusMethodNotAllowed},
		{"POST collection", http.MethodPost, "/items", http.StatusMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req, err := http.NewRequestWithContext(t.Context(), tt.method, b.srv.URL, nil)
			require.NoError(t, err)
			req.URL.Opaque = tt.path // sent verbatim, without the client's cleaning or escaping
			resp, err := b.srv.Client().Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, tt.wantStatus, resp.StatusCode)
		})
	}
}

func TestWeakETags(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{WeakETags: true})
	etag := b.sim.Put("a", map[string]any{"owner": "crm"})
	require.True(t, strings.HasPrefix(etag, `W/"`), "got %s; want W/\"…\"", etag)

	res := b.do(t, http.MethodGet, itemPath("a"), "")
	require.Equal(t, etag, res.header.Get("ETag"))

	// Comparison is opaque: the strong form of a weak ETag is stale.
	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", strings.TrimPrefix(etag, "W/"))
	require.Equal(t, http.StatusPreconditionFailed, res.status)

	res = b.do(t, http.MethodPatch, itemPath("a"), `{"owner":"me"}`, "If-Match", etag)
	require.Equal(t, http.StatusOK, res.status)
	require.True(t, strings.HasPrefix(res.header.Get("ETag"), `W/"`))
	require.NotEqual(t, etag, res.header.Get("ETag"))
}

func TestETagsNeverRepeat(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	seen := map[string]bool{}
	for range 3 {
		for range 10 {
			etag := b.sim.Put("a", map[string]any{"same": "fields"})
			require.False(t, seen[etag], "ETag %s repeated", etag)
			seen[etag] = true
		}
		b.sim.Reset()
	}
}

func TestIdempotencyReplay(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{IdempotencyCache: true})
	etag := b.sim.Put("a", map[string]any{"n": 0})

	first := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusOK, first.status)
	newETag := first.header.Get("ETag")

	second := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag, "Idempotency-Key", "k1")
	require.Equal(t, first.status, second.status)
	require.Equal(t, newETag, second.header.Get("ETag"))
	require.Equal(t, first.body, second.body)

	_, got, ok := b.sim.Get("a")
	require.True(t, ok)
	require.Equal(t, newETag, got)
	require.Len(t, b.sim.History("a"), 2)

	st := b.sim.Stats()
	require.Equal(t, 1, st.Replays)
	require.Equal(t, 1, st.Patches)
	reqs := b.sim.Requests()
	require.Len(t, reqs, 2)
	require.False(t, reqs[0].Replayed)
	require.True(t, reqs[1].Replayed)
	require.Equal(t, "k1", reqs[1].IdempotencyKey)

	t.Run("another key is not replayed", func(t *testing.T) {
		res := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag, "Idempotency-Key", "k2")
		require.Equal(t, http.StatusPreconditionFailed, res.status)
	})
	t.Run("failures are not cached", func(t *testing.T) {
		res := b.do(t, http.MethodPatch, itemPath("a"), `{"n":2}`, "Idempotency-Key", "k3")
		require.Equal(t, http.StatusPreconditionRequired, res.status)
		res = b.do(t, http.MethodPatch, itemPath("a"), `{"n":2}`, "If-Match", newETag, "Idempotency-Key", "k3")
		require.Equal(t, http.StatusOK, res.status)
		require.Equal(t, 1, b.sim.Stats().Replays)
	})
	t.Run("DELETE is replayed", func(t *testing.T) {
		_, cur, _ := b.sim.Get("a")
		for range 2 {
			res := b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", cur, "Idempotency-Key", "k4")
			require.Equal(t, http.StatusNoContent, res.status)
		}
		require.Equal(t, 2, b.sim.Stats().Replays)
	})
}

func TestIdempotencyOffByDefault(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a", map[string]any{"n": 0})
	res := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusOK, res.status)
	res = b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag, "Idempotency-Key", "k1")
	require.Equal(t, http.StatusPreconditionFailed, res.status)
	require.Equal(t, 0, b.sim.Stats().Replays)
}

func TestFaults(t *testing.T) {
	t.Parallel()

	t.Run("errors alternate 500 and 503", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{ErrorRate: 1, RetryAfter: 1500 * time.Millisecond})
		etag := b.sim.Put("a", map[string]any{"n": 0})

		res := b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag)
		require.Equal(t, http.StatusInternalServerError, res.status)
		require.Empty(t, res.header.Get("Retry-After"))
		res = b.do(t, http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag)
		require.Equal(t, http.StatusServiceUnavailable, res.status)
		require.Equal(t, "2", res.header.Get("Retry-After"))

		_, got, _ := b.sim.Get("a")
		require.Equal(t, etag, got)
		st := b.sim.Stats()
		require.Equal(t, 2, st.Faults)
		require.Equal(t, 0, st.Patches)
		for _, r := range b.sim.Requests() {
			require.Equal(t, "error", r.Fault)
		}
	})
	t.Run("rate limit is 429 with Retry-After", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{RateLimitRate: 1})
		b.sim.Put("a", nil)
		res := b.do(t, http.MethodGet, itemPath("a"), "")
		require.Equal(t, http.StatusTooManyRequests, res.status)
		require.Equal(t, "1", res.header.Get("Retry-After"))
		require.Empty(t, res.header.Get("ETag"))
		reqs := b.sim.Requests()
		require.Len(t, reqs, 1)
		require.Equal(t, "ratelimit", reqs[0].Fault)
		require.Equal(t, http.StatusTooManyRequests, reqs[0].Status)
	})
	t.Run("reset gives the client an error", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{ResetRate: 1})
		etag := b.sim.Put("a", map[string]any{"n": 0})
		_, err := b.send(t.Context(), http.MethodPatch, itemPath("a"), `{"n":1}`, "If-Match", etag)
		require.Error(t, err)
		_, got, _ := b.sim.Get("a")
		require.Equal(t, etag, got)
		reqs := b.sim.Requests()
		require.NotEmpty(t, reqs)
		require.Equal(t, "reset", reqs[0].Fault)
		require.Equal(t, 0, reqs[0].Status)
	})
	t.Run("SetFaults changes rates at run time", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{})
		b.sim.Put("a", nil)
		require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status)
		b.sim.SetFaults(remotesim.Faults{RateLimitRate: 1})
		require.Equal(t, http.StatusTooManyRequests, b.do(t, http.MethodGet, itemPath("a"), "").status)
		b.sim.SetFaults(remotesim.Faults{})
		require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status)
	})
	t.Run("same seed, same faults", func(t *testing.T) {
		t.Parallel()
		statuses := func() []int {
			b := setup(t, remotesim.Options{ErrorRate: 0.3, RateLimitRate: 0.3, Seed: 42})
			b.sim.Put("a", nil)
			var got []int
			for range 30 {
				got = append(got, b.do(t, http.MethodGet, itemPath("a"), "").status)
			}
			return got
		}
		first := statuses()
		require.Equal(t, first, statuses())
		require.Contains(t, first, http.StatusOK)
		require.Contains(t, first, http.StatusTooManyRequests)
	})
}

func TestLatency(t *testing.T) {
	t.Parallel()
	const latency = 50 * time.Millisecond
	b := setup(t, remotesim.Options{Latency: latency})
	b.sim.Put("a", nil)
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, itemPath("a"), "").status)

	reqs := b.sim.Requests()
	require.Len(t, reqs, 1)
	got := reqs[0].End.Sub(reqs[0].Start)
	require.GreaterOrEqual(t, got, latency, "got %v; want >= %v", got, latency)
}

func TestLatencyHonoursClientCancellation(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{Latency: time.Hour})
	b.sim.Put("a", nil)

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := b.send(ctx, http.MethodGet, itemPath("a"), "")
		done <- err
	}()
	require.Eventually(t, func() bool { return b.sim.Stats().MaxInFlightPerResource == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)

	// The handler returns promptly instead of sleeping for an hour.
	require.Eventually(t, func() bool { return len(b.sim.Requests()) == 1 }, 5*time.Second, time.Millisecond)
	require.Equal(t, 499, b.sim.Requests()[0].Status)
	require.Equal(t, 0, b.sim.Stats().Gets)
}

func TestOtherUsers(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	for _, id := range []string{"a", "b", "c"} {
		b.sim.Put(id, map[string]any{"owner": "crm", "status": "new"})
	}

	stop := b.sim.StartOtherUsers(t.Context(), 1000, []string{"owner", "status"})
	require.Eventually(t, func() bool {
		return len(b.sim.History("a"))+len(b.sim.History("b"))+len(b.sim.History("c")) >= 3+10
	}, 10*time.Second, time.Millisecond)
	stop()
	stop() // a second stop is harmless

	edits := 0
	for _, id := range b.sim.IDs() {
		h := b.sim.History(id)
		require.Equal(t, "seed", h[0].Writer)
		for _, v := range h[1:] {
			require.Equal(t, "other-user", v.Writer)
			require.Equal(t, "PATCH", v.Method)
			changed := 0
			for _, f := range []string{"owner", "status"} {
				if s, _ := v.Fields[f].(string); strings.HasPrefix(s, "user-edit-") {
					changed++
				}
			}
			require.Positive(t, changed, "version %+v", v)
			edits++
		}
		fields, etag, _ := b.sim.Get(id)
		require.Equal(t, h[len(h)-1].ETag, etag)
		require.Equal(t, h[len(h)-1].Fields, fields)
	}
	require.GreaterOrEqual(t, edits, 10)

	// Stopped means stopped: at 1000 edits/s, 20ms would otherwise bring new versions.
	var before [][]remotesim.Version
	for _, id := range b.sim.IDs() {
		before = append(before, b.sim.History(id))
	}
	time.Sleep(20 * time.Millisecond)
	for i, id := range b.sim.IDs() {
		require.Equal(t, before[i], b.sim.History(id))
	}
	require.Equal(t, 0, b.sim.Stats().Requests) // edits are not API requests
}

func TestOtherUsersStopWhenContextEnds(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	b.sim.Put("a", nil)
	ctx, cancel := context.WithCancel(t.Context())
	stop := b.sim.StartOtherUsers(ctx, 1000, []string{"f"})
	cancel()
	stop()
	require.NotNil(t, b.sim.StartOtherUsers(t.Context(), 0, []string{"f"}))
}

func TestMaxInFlightPerResource(t *testing.T) {
	t.Parallel()

	t.Run("sequential requests never overlap", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Latency: 5 * time.Millisecond})
		etag := b.sim.Put("a", nil)
		for range 3 {
			res := b.do(t, http.MethodPatch, itemPath("a"), `{"x":1}`, "If-Match", etag)
			require.Equal(t, http.StatusOK, res.status)
			etag = res.header.Get("ETag")
			b.do(t, http.MethodGet, itemPath("a"), "")
		}
		require.Equal(t, 1, b.sim.Stats().MaxInFlightPerResource)
	})
	t.Run("concurrent requests to different resources count apart", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Latency: 50 * time.Millisecond})
		b.sim.Put("a", nil)
		b.sim.Put("b", nil)
		var wg sync.WaitGroup
		for _, id := range []string{"a", "b"} {
			wg.Go(func() { b.get(t, id) })
		}
		wg.Wait()
		require.Equal(t, 1, b.sim.Stats().MaxInFlightPerResource)
	})
	t.Run("two concurrent requests to one resource", func(t *testing.T) {
		t.Parallel()
		b := setup(t, remotesim.Options{Latency: 500 * time.Millisecond})
		b.sim.Put("a", nil)
		var wg sync.WaitGroup
		wg.Go(func() { b.get(t, "a") })
		// The second request starts while the first is certainly still sleeping.
		require.Eventually(t, func() bool { return b.sim.Stats().MaxInFlightPerResource == 1 }, 5*time.Second, time.Millisecond)
		wg.Go(func() { b.get(t, "a") })
		wg.Wait()
		require.Equal(t, 2, b.sim.Stats().MaxInFlightPerResource)
	})
}

func TestHistory(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	e1 := b.sim.Put("a", map[string]any{"owner": "crm"})
	res := b.do(t, http.MethodPatch, itemPath("a"), `{"status":"won"}`, "If-Match", e1)
	require.Equal(t, http.StatusOK, res.status)
	e2 := res.header.Get("ETag")
	e3, ok := b.sim.Edit("a", map[string]any{"owner": "bob", "status": nil}, "bob")
	require.True(t, ok)
	res = b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", e3)
	require.Equal(t, http.StatusNoContent, res.status)
	e5 := b.sim.Put("a", map[string]any{"owner": "again"})
	b.sim.Delete("a")

	_, ok = b.sim.Edit("a", map[string]any{"x": 1}, "bob")
	require.False(t, ok)

	type summary struct {
		ETag, Writer, Method string
		Fields               map[string]any
		Deleted              bool
	}
	var got []summary
	for _, v := range b.sim.History("a") {
		require.False(t, v.At.IsZero())
		got = append(got, summary{v.ETag, v.Writer, v.Method, v.Fields, v.Deleted})
	}
	want := []summary{
		{e1, "seed", "PUT", map[string]any{"owner": "crm"}, false},
		{e2, "api", "PATCH", map[string]any{"owner": "crm", "status": "won"}, false},
		{e3, "bob", "PATCH", map[string]any{"owner": "bob"}, false},
		{"", "api", "DELETE", nil, true},
		{e5, "seed", "PUT", map[string]any{"owner": "again"}, false},
		{"", "seed", "DELETE", nil, true},
	}
	require.Equal(t, want, got)
	require.Nil(t, b.sim.History("never"))

	// History hands out copies.
	h := b.sim.History("a")
	h[0].Fields["owner"] = "mutated"
	require.Equal(t, "crm", b.sim.History("a")[0].Fields["owner"])
}

func TestGetReturnsCopies(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	in := map[string]any{"nested": map[string]any{"k": "v"}}
	b.sim.Put("a", in)
	in["nested"].(map[string]any)["k"] = "changed by caller"

	fields, _, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"nested": map[string]any{"k": "v"}}, fields)
	fields["nested"].(map[string]any)["k"] = "changed again"
	again, _, _ := b.sim.Get("a")
	require.Equal(t, map[string]any{"nested": map[string]any{"k": "v"}}, again)
}

func TestAuthorizationIsNeverStored(t *testing.T) {
	t.Parallel()
	const secret = "Bearer s3cr3t-t0ken"
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a", nil)
	b.do(t, http.MethodPatch, itemPath("a"), `{"x":1}`, "If-Match", etag, "Authorization", secret)
	b.do(t, http.MethodGet, itemPath("a"), "")

	reqs := b.sim.Requests()
	require.Len(t, reqs, 2)
	require.Equal(t, "present", reqs[0].Authorization)
	require.Empty(t, reqs[1].Authorization)

	dump, err := json.Marshal([]any{reqs, b.sim.Stats(), b.sim.History("a")})
	require.NoError(t, err)
	require.NotContains(t, string(dump), "s3cr3t")
	for _, p := range []string{"/_sim/requests", "/_sim/state", "/_sim/stats", "/_sim/history?id=a"} {
		require.NotContains(t, b.do(t, http.MethodGet, p, "").body, "s3cr3t", p)
	}
}

func TestRequestLog(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{RequestLogSize: 3})
	etag := b.sim.Put("a b", nil)
	b.do(t, http.MethodGet, itemPath("a b"), "", "If-None-Match", etag)
	b.do(t, http.MethodPatch, itemPath("a b"), `{}`, "If-Match", etag, "Idempotency-Key", "k")
	b.do(t, http.MethodGet, "/items?ids=x", "")
	b.do(t, http.MethodGet, "/nowhere", "")

	reqs := b.sim.Requests()
	require.Len(t, reqs, 3, "the log keeps only the latest RequestLogSize")
	r := reqs[0]
	require.Equal(t, http.MethodPatch, r.Method)
	require.Equal(t, "/items/a%20b", r.Path)
	require.Equal(t, "a b", r.ID)
	require.Equal(t, etag, r.IfMatch)
	require.Equal(t, "k", r.IdempotencyKey)
	require.Equal(t, http.StatusOK, r.Status)
	require.False(t, r.End.Before(r.Start))
	require.Equal(t, "/items", reqs[1].Path)
	require.Equal(t, http.StatusNotFound, reqs[2].Status)
	require.Equal(t, 4, b.sim.Stats().Requests)
}

func TestRequestLogIsInArrivalOrder(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{Latency: 300 * time.Millisecond})
	b.sim.Put("slow", nil)
	b.sim.Put("fast", nil)

	var wg sync.WaitGroup
	wg.Go(func() { b.get(t, "slow") })
	require.Eventually(t, func() bool { return b.sim.Stats().MaxInFlightPerResource == 1 }, 5*time.Second, time.Millisecond)
	b.sim.SetFaults(remotesim.Faults{}) // the slow request keeps the latency it started with
	b.do(t, http.MethodGet, itemPath("fast"), "")

	reqs := b.sim.Requests()
	require.Len(t, reqs, 1, "a request in progress is not in the log yet")
	require.Equal(t, "fast", reqs[0].ID)

	wg.Wait()
	var ids []string
	for _, r := range b.sim.Requests() {
		ids = append(ids, r.ID)
	}
	require.Equal(t, []string{"slow", "fast"}, ids)
}

func TestRequestLogSurvivesResetMidRequest(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{Latency: 200 * time.Millisecond})
	b.sim.Put("a", nil)
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := b.send(t.Context(), http.MethodGet, itemPath("a"), ""); err != nil {
			t.Error(err)
		}
	})
	require.Eventually(t, func() bool { return b.sim.Stats().MaxInFlightPerResource == 1 }, 5*time.Second, time.Millisecond)
	b.sim.Reset()
	b.sim.SetFaults(remotesim.Faults{})
	b.sim.Put("b", nil)
	b.do(t, http.MethodGet, itemPath("b"), "")
	wg.Wait()

	reqs := b.sim.Requests()
	require.Len(t, reqs, 1, "the request that began before Reset must not overwrite a later entry")
	require.Equal(t, "b", reqs[0].ID)
}

func TestAdminEndpoints(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	etag := b.sim.Put("a/1", map[string]any{"owner": "crm"})
	b.do(t, http.MethodGet, itemPath("a/1"), "")

	res := b.do(t, http.MethodGet, "/_sim/state", "")
	require.Equal(t, http.StatusOK, res.status)
	require.Equal(t, map[string]any{"a/1": map[string]any{"etag": etag, "fields": map[string]any{"owner": "crm"}}}, res.json(t))

	res = b.do(t, http.MethodGet, "/_sim/stats", "")
	require.Equal(t, http.StatusOK, res.status)
	stats := res.json(t).(map[string]any)
	require.Equal(t, float64(1), stats["requests"])
	require.Equal(t, float64(1), stats["gets"])

	res = b.do(t, http.MethodGet, "/_sim/requests", "")
	require.Equal(t, http.StatusOK, res.status)
	var reqs []remotesim.Request
	require.NoError(t, json.Unmarshal([]byte(res.body), &reqs))
	require.Len(t, reqs, 1)
	require.Equal(t, "a/1", reqs[0].ID)

	res = b.do(t, http.MethodGet, "/_sim/requests?limit=0", "")
	require.JSONEq(t, `[]`, res.body)

	res = b.do(t, http.MethodGet, "/_sim/history?"+url.Values{"id": {"a/1"}}.Encode(), "")
	require.Equal(t, http.StatusOK, res.status)
	var versions []remotesim.Version
	require.NoError(t, json.Unmarshal([]byte(res.body), &versions))
	require.Len(t, versions, 1)
	require.Equal(t, etag, versions[0].ETag)

	require.JSONEq(t, `[]`, b.do(t, http.MethodGet, "/_sim/history?id=none", "").body)
	require.Equal(t, http.StatusBadRequest, b.do(t, http.MethodGet, "/_sim/history", "").status)
	require.Equal(t, http.StatusNotFound, b.do(t, http.MethodGet, "/_sim/nope", "").status)
	require.Equal(t, http.StatusMethodNotAllowed, b.do(t, http.MethodPost, "/_sim/state", "").status)

	// Admin requests bypass faults and are neither logged nor counted.
	b.sim.SetFaults(remotesim.Faults{ErrorRate: 1})
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, "/_sim/stats", "").status)
	require.Equal(t, 1, b.sim.Stats().Requests)
	require.Len(t, b.sim.Requests(), 1)
}

func TestReset(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{IdempotencyCache: true})
	etag := b.sim.Put("a", nil)
	b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", etag, "Idempotency-Key", "k")

	b.sim.Reset()
	require.Empty(t, b.sim.IDs())
	require.Nil(t, b.sim.History("a"))
	require.Empty(t, b.sim.Requests())
	require.Equal(t, remotesim.Stats{}, b.sim.Stats())

	// The idempotency cache is gone too: the same key now reaches state.
	res := b.do(t, http.MethodDelete, itemPath("a"), "", "If-Match", etag, "Idempotency-Key", "k")
	require.Equal(t, http.StatusNotFound, res.status)
}

func TestNewPanicsOnInvalidOptions(t *testing.T) {
	t.Parallel()
	for _, opts := range []remotesim.Options{
		{ConflictStatus: 400},
		{ErrorRate: 1.5},
		{RateLimitRate: -0.1},
		{ResetRate: 2},
		{Latency: -time.Second},
		{ItemPrefix: "/"},
		{ItemPrefix: "/_sim/x"},
	} {
		require.Panics(t, func() { remotesim.New(opts) }, "%+v", opts)
	}
	sim := remotesim.New(remotesim.Options{ItemPrefix: "things/"})
	require.Panics(t, func() { sim.SetFaults(remotesim.Faults{ErrorRate: 2}) })
}

func TestItemPrefixIsNormalised(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{ItemPrefix: "assignments/"})
	b.sim.Put("a", nil)
	require.Equal(t, http.StatusOK, b.do(t, http.MethodGet, "/assignments/a", "").status)
	require.Equal(t, http.StatusNotFound, b.do(t, http.MethodGet, "/items/a", "").status)
}

func TestConcurrentWritersKeepETagsConsistent(t *testing.T) {
	t.Parallel()
	b := setup(t, remotesim.Options{})
	b.sim.Put("a", map[string]any{"n": 0})

	// Each writer retries read-modify-write until it wins; If-Match must serialise them so
	// that no increment is lost.
	const writers, increments = 8, 10
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			for range increments {
				if err := b.increment(t.Context()); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	fields, _, _ := b.sim.Get("a")
	require.Equal(t, float64(writers*increments), fields["n"])
	st := b.sim.Stats()
	require.Equal(t, writers*increments, st.Patches-st.Conflicts)
	require.Equal(t, 1+writers*increments, len(b.sim.History("a")))
}

// increment adds 1 to field n of resource a, retrying on conflicts.
func (b *testBundle) increment(ctx context.Context) error {
	for {
		get, err := b.send(ctx, http.MethodGet, itemPath("a"), "")
		if err != nil {
			return err
		}
		var item struct{ N int }
		if err := json.Unmarshal([]byte(get.body), &item); err != nil {
			return fmt.Errorf("decode %q: %w", get.body, err)
		}
		res, err := b.send(ctx, http.MethodPatch, itemPath("a"), fmt.Sprintf(`{"n":%d}`, item.N+1), "If-Match", get.header.Get("ETag"))
		if err != nil {
			return err
		}
		switch res.status {
		case http.StatusOK:
			return nil
		case http.StatusPreconditionFailed:
		default:
			return fmt.Errorf("PATCH: got status %d; want 200 or 412", res.status)
		}
	}
}

// get GETs item id from a goroutine other than the test's.
func (b *testBundle) get(t *testing.T, id string) {
	res, err := b.send(t.Context(), http.MethodGet, itemPath(id), "")
	if err != nil {
		t.Error(err)
		return
	}
	if res.status != http.StatusOK {
		t.Errorf("GET %s: got status %d; want 200", id, res.status)
	}
}

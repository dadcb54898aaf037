package remotesim_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stagesync/stagesync/test/remotesim"
)

// BenchmarkServeGet measures the handler alone, without network, for a cached GET.
func BenchmarkServeGet(b *testing.B) {
	sim := remotesim.New(remotesim.Options{Seed: 1})
	sim.Put("a", map[string]any{"owner": "crm", "status": "new"})
	req := httptest.NewRequest(http.MethodGet, "/items/a", nil)
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		sim.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("got status %d; want 200", w.Code)
		}
	}
}

// BenchmarkServePatch measures the handler alone for a successful conditional PATCH.
func BenchmarkServePatch(b *testing.B) {
	sim := remotesim.New(remotesim.Options{Seed: 1})
	etag := sim.Put("a", map[string]any{"owner": "crm", "status": "new"})
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest(http.MethodPatch, "/items/a", strings.NewReader(`{"status":"assigned"}`))
		req.Header.Set("If-Match", etag)
		w := httptest.NewRecorder()
		sim.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("got status %d; want 200", w.Code)
		}
		etag = w.Header().Get("ETag")
	}
}

// BenchmarkHTTPGetParallel measures GETs over real HTTP from many clients.
func BenchmarkHTTPGetParallel(b *testing.B) {
	sim := remotesim.New(remotesim.Options{Seed: 1, RequestLogSize: 10_000})
	sim.Put("a", map[string]any{"owner": "crm"})
	srv := httptest.NewServer(sim)
	defer srv.Close()
	client := srv.Client()
	client.Transport.(*http.Transport).MaxIdleConnsPerHost = 64
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Get(srv.URL + "/items/a")
			if err != nil {
				b.Error(err)
				return
			}
			resp.Body.Close()
		}
	})
}

// BenchmarkServeBatch50 measures the handler alone for a $batch of 50 successful PATCHes,
// one per resource; ns/op divided by 50 is the cost of an item.
func BenchmarkServeBatch50(b *testing.B) {
	const n = 50
	sim := remotesim.New(remotesim.Options{Seed: 1, BatchWrites: true, RequestLogSize: 10_000})
	etags := make([]string, n)
	for i := range n {
		etags[i] = sim.Put(fmt.Sprint("r", i), map[string]any{"owner": "crm", "status": "new"})
	}
	b.ReportAllocs()
	for b.Loop() {
		var body strings.Builder
		body.WriteString(`{"requests":[`)
		for i := range n {
			if i > 0 {
				body.WriteByte(',')
			}
			fmt.Fprintf(&body, `{"id":"%d","method":"PATCH","url":"items/r%d","headers":{"if-match":%q},"body":{"status":"assigned"}}`, i, i, etags[i])
		}
		body.WriteString(`]}`)
		w := httptest.NewRecorder()
		sim.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/$batch", strings.NewReader(body.String())))
		if w.Code != http.StatusOK {
			b.Fatalf("got status %d; want 200", w.Code)
		}
		var answer struct {
			Responses []struct {
				ID      string
				Status  int
				Headers map[string]string
			}
		}
		if err := json.Unmarshal(w.Body.Bytes(), &answer); err != nil {
			b.Fatal(err)
		}
		for _, r := range answer.Responses {
			if r.Status != http.StatusOK {
				b.Fatalf("item %s: got status %d; want 200", r.ID, r.Status)
			}
			var i int
			fmt.Sscan(r.ID, &i)
			etags[i] = r.Headers["etag"]
		}
	}
}

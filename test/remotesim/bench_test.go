package remotesim_test

import (
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

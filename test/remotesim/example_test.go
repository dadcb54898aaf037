package remotesim_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/stagesync/stagesync/test/remotesim"
)

// A client must send the ETag it last saw; the simulator refuses writes without one and
// writes based on a stale one.
func Example() {
	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments", Seed: 1})
	etag := sim.Put("a-1", map[string]any{"owner": "crm", "status": "new"})

	srv := httptest.NewServer(sim)
	defer srv.Close()

	patch := func(ifMatch string) {
		req, err := http.NewRequest(http.MethodPatch, srv.URL+"/assignments/a-1", strings.NewReader(`{"status":"assigned"}`))
		if err != nil {
			panic(err)
		}
		req.Header.Set("If-Match", ifMatch)
		resp, err := srv.Client().Do(req)
		if err != nil {
			panic(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		fmt.Println(resp.StatusCode, string(body))
	}
	patch(etag)
	patch(etag) // the same ETag is stale now

	fields, _, _ := sim.Get("a-1")
	fmt.Println(fields["status"], sim.Stats().Conflicts)
	// Output:
	// 200 {"id":"a-1","owner":"crm","status":"assigned"}
	// 412 {"error":"etag mismatch","etag":"\"2-eb8f8efe\""}
	// assigned 1
}

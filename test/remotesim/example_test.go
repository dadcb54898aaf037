package remotesim_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
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

// With BatchWrites, one POST carries several writes in the OData 4.01 JSON batch format;
// each item is checked against its own If-Match and answered under its own id.
func Example_batch() {
	sim := remotesim.New(remotesim.Options{ItemPrefix: "/assignments", BatchWrites: true, Seed: 1})
	etag := sim.Put("a-1", map[string]any{"owner": "crm"})
	sim.Put("a-2", map[string]any{"owner": "crm"})

	srv := httptest.NewServer(sim)
	defer srv.Close()

	body := `{"requests": [
		{"id": "1", "method": "PATCH", "url": "assignments/a-1", "headers": {"if-match": ` + strconv.Quote(etag) + `}, "body": {"owner": "me"}},
		{"id": "2", "method": "PATCH", "url": "assignments/a-2", "headers": {"if-match": "\"0-stale\""}, "body": {"owner": "me"}}
	]}`
	resp, err := srv.Client().Post(srv.URL+"/$batch", "application/json", strings.NewReader(body))
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	var answer struct {
		Responses []struct {
			ID     string
			Status int
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
		panic(err)
	}
	for _, r := range answer.Responses {
		fmt.Println(r.ID, r.Status)
	}
	st := sim.Stats()
	fmt.Println(st.Requests, st.BatchItems, st.Conflicts)
	// Output:
	// 1 200
	// 2 412
	// 1 2 1
}

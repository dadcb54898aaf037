package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// startSimulate runs cmdSimulate with args on a free port until the test ends and returns
// its base URL.
func startSimulate(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := cmdSimulate(ctx, append([]string{"--listen", "127.0.0.1:0", "--seed", "1"}, args...), func(string) string { return "" }, pw)
		pw.Close()
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done, "simulate's exit")
	})
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go func() { _, _ = io.Copy(io.Discard, pr) }() // nothing else is printed; keep the pipe drained
	rest, ok := strings.CutPrefix(line, "simulate: listening on ")
	require.True(t, ok, "first line: got %q; want the listening address", line)
	return strings.Fields(rest)[0]
}

func TestSimulateServesBatchWithItsFlags(t *testing.T) {
	t.Parallel()
	base := startSimulate(t, "--item-prefix", "/odata/assignments", "--batch", "--batch-path", "/odata/$batch",
		"--seed-resources", "2", "--max-batch-requests", "2", "--batch-shuffle", "--strict-if-match")

	post := func(body string) (int, string) {
		resp, err := http.Post(base+"/odata/$batch", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(raw)
	}
	status, body := post(`{"requests":[{"id":"1","method":"GET","url":"assignments/r-0000"},{"id":"2","method":"PATCH","url":"assignments/r-0001","headers":{"if-match":"W/\"1-x\""},"body":{"owner":"me"}}]}`)
	require.Equal(t, http.StatusOK, status, body)
	require.Contains(t, body, `"id":"1","status":200`)
	require.Contains(t, body, `"id":"2","status":412`, "--strict-if-match refuses a weak If-Match")
	require.Contains(t, body, `weak entity tag`)

	status, body = post(`{"requests":[{"id":"1","method":"GET","url":"assignments/r-0000"},{"id":"2","method":"GET","url":"assignments/r-0000"},{"id":"3","method":"GET","url":"assignments/r-0000"}]}`)
	require.Equal(t, http.StatusRequestEntityTooLarge, status, "--max-batch-requests 2: %s", body)
}

func TestSimulateMisbehaveFlags(t *testing.T) {
	t.Parallel()
	base := startSimulate(t, "--seed-resources", "2", "--no-etag", "--huge-number-field", "amount", "--misbehave-ids", "r-0001")
	get := func(id string) (http.Header, string) {
		resp, err := http.Get(base + "/items/" + id)
		require.NoError(t, err)
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.Header, string(raw)
	}
	h, body := get("r-0001")
	require.Empty(t, h.Get("ETag"))
	require.Contains(t, body, `"amount":1e200000`)
	h, body = get("r-0000")
	require.NotEmpty(t, h.Get("ETag"), "--misbehave-ids spares the others")
	require.NotContains(t, body, "amount")
}

func TestSimulateRefusesBadFlags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args    []string
		wantErr string
	}{
		{[]string{"--drop-after-commit-rate", "2"}, "--drop-after-commit-rate: must be in [0,1], got 2"},
		{[]string{"--batch-missing-rate", "-1"}, "--batch-missing-rate: must be in [0,1], got -1"},
		{[]string{"--batch-path", "/items/$batch"}, `--batch-path: must start with / and be neither / nor under --item-prefix or /_sim, got "/items/$batch"`},
		{[]string{"--batch-path", "$batch"}, `--batch-path: must start with / and be neither / nor under --item-prefix or /_sim, got "$batch"`},
		{[]string{"--max-batch-requests", "0"}, "--max-batch-requests: must be at least 1, got 0"},
		{[]string{"--pad-body-bytes", "-5"}, "--pad-body-bytes: must be in [0,1073741824], got -5"},
		{[]string{"--slow-body-rate", "-1"}, "--slow-body-rate: must not be negative, got -1"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			t.Parallel()
			err := cmdSimulate(t.Context(), append([]string{"--listen", "127.0.0.1:0"}, tt.args...), func(string) string { return "" }, io.Discard)
			require.EqualError(t, err, tt.wantErr)
		})
	}
}

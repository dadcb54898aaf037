package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const sample = `goos: linux
pkg: github.com/stagesync/stagesync/test/e2e
cpu: AMD EPYC
BenchmarkSeedWorkload-2   	       1	 412000000 ns/op	         1.010 requests/change	         0.4120 s/workload
--- BENCH: BenchmarkSeedWorkload-2
    bench_test.go:60: settings: defaults
BenchmarkIdleLatency-2    	       1	3200000000 ns/op	         5.800 p50-ms	       300.0 p99-ms
PASS
ok  	github.com/stagesync/stagesync/test/e2e	12.0s
`

func TestReportFromBenchOutput(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	in := filepath.Join(dir, "bench.txt")
	out := filepath.Join(dir, "BENCHMARKS.md")
	require.NoError(t, os.WriteFile(in, []byte(sample), 0o600))
	require.NoError(t, run(in, out, "make bench", func(string) string { return "" }))
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	md := string(b)

	t.Run("a bar that holds says yes, with the settings logged", func(t *testing.T) {
		require.Contains(t, md, "| seed workload | 500 territory changes against a 20 ms remote in < 0.5 s with defaults | 0.412 s/workload | yes | `BenchmarkSeedWorkload` | defaults |")
	})
	t.Run("a bar that fails says no", func(t *testing.T) {
		require.Contains(t, md, "| 300 p99-ms | **no** | `BenchmarkIdleLatency` | not stated |")
	})
	t.Run("a bar without its benchmark says not measured", func(t *testing.T) {
		require.Contains(t, md, "| memory | peak RSS < 150 MB draining a 1M-change backlog | not measured |")
	})
	t.Run("every figure is listed under its package", func(t *testing.T) {
		i := strings.Index(md, "### `github.com/stagesync/stagesync/test/e2e`")
		require.Positive(t, i, "package heading missing:\n%s", md)
		require.Contains(t, md[i:], "| requests/change | 1.01 |")
		require.Contains(t, md[i:], "| ns/op | 412000000 |")
	})
}

func TestRunRefusesEmptyInput(t *testing.T) {
	t.Parallel()
	in := filepath.Join(t.TempDir(), "bench.txt")
	require.NoError(t, os.WriteFile(in, []byte("PASS\n"), 0o600))
	err := run(in, filepath.Join(t.TempDir(), "out.md"), "make bench", func(string) string { return "" })
	require.ErrorContains(t, err, "holds no benchmark results")
}

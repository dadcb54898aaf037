// Command benchreport turns the output of `go test -bench` into
// BENCHMARKS.md: SPEC §8's bars with the figure measured for each, every
// benchmark's figures and settings, the machine and the command, so a
// reader can trust and repeat them. `make bench` runs it.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

func main() {
	in := flag.String("in", "", "go test -bench output to read (required)")
	out := flag.String("out", "BENCHMARKS.md", "Markdown file to write")
	command := flag.String("command", "make bench", "the command that produced the input, for the report")
	flag.Parse()
	if err := run(*in, *out, *command, os.Getenv); err != nil {
		fmt.Fprintf(os.Stderr, "benchreport: %v\n", err)
		os.Exit(1)
	}
}

func run(in, out, command string, getenv func(string) string) error {
	if in == "" {
		return fmt.Errorf("-in is required")
	}
	f, err := os.Open(in)
	if err != nil {
		return fmt.Errorf("open benchmark output: %w", err)
	}
	defer f.Close()
	results, err := parse(f)
	if err != nil {
		return fmt.Errorf("parse %s: %w", in, err)
	}
	if len(results) == 0 {
		return fmt.Errorf("%s holds no benchmark results", in)
	}
	var b strings.Builder
	report(&b, results, machine(getenv), command)
	if err := os.WriteFile(out, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	return nil
}

// result is one benchmark line: its name (without the -GOMAXPROCS suffix),
// its metrics by unit, and the settings it logged.
type result struct {
	pkg      string
	name     string
	metrics  map[string]float64
	units    []string // in the order printed
	settings []string
}

var (
	benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)
	benchLog  = regexp.MustCompile(`^--- BENCH: (Benchmark\S+?)(?:-\d+)?$`)
	settingRE = regexp.MustCompile(`^\s+\S+\.go:\d+: settings: (.*)$`)
)

// parse reads go test -bench output. A benchmark's "settings: …" log lines
// follow its result under a "--- BENCH:" header.
func parse(r io.Reader) ([]*result, error) {
	var (
		out     []*result
		byName  = map[string]*result{}
		pkg     string
		logging *result
	)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if p, ok := strings.CutPrefix(line, "pkg: "); ok {
			pkg = p
			continue
		}
		if m := benchLog.FindStringSubmatch(line); m != nil {
			logging = byName[pkg+" "+m[1]]
			continue
		}
		if m := settingRE.FindStringSubmatch(line); m != nil && logging != nil {
			logging.settings = append(logging.settings, m[1])
			continue
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			if !strings.HasPrefix(line, " ") {
				logging = nil
			}
			continue
		}
		res := &result{pkg: pkg, name: m[1], metrics: map[string]float64{}}
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return nil, fmt.Errorf("benchmark %s: metric %q is not a number", m[1], fields[i])
			}
			res.metrics[fields[i+1]] = v
			res.units = append(res.units, fields[i+1])
		}
		out = append(out, res)
		byName[pkg+" "+res.name] = res
		logging = res
	}
	return out, sc.Err()
}

// bar is one of SPEC §8's bars and the benchmark metric that measures it.
type bar struct {
	area, text string
	bench      string // benchmark name, sub-benchmark included
	metric     string
	holds      func(v float64) bool
}

func below(limit float64) func(float64) bool   { return func(v float64) bool { return v < limit } }
func atMost(limit float64) func(float64) bool  { return func(v float64) bool { return v <= limit } }
func atLeast(limit float64) func(float64) bool { return func(v float64) bool { return v >= limit } }
func equalTo(limit float64) func(float64) bool { return func(v float64) bool { return v == limit } }
func within(lo, hi float64) func(float64) bool {
	return func(v float64) bool { return v >= lo && v <= hi }
}

// bars lists what SPEC §8 and §8.1 ask, in their order.
var bars = []bar{
	{"throughput", "≥ 5,000 changes/s end to end at zero remote latency", "BenchmarkThroughput/10000_changes_over_10000_resources", "changes/s", atLeast(5000)},
	{"API economy", "≤ 1.05 remote requests per change at 5% concurrent remote edits", "BenchmarkAPIEconomy/1_changes_per_resource", "requests/change", atMost(1.05)},
	{"seed workload", "500 territory changes against a 20 ms remote in < 0.5 s with defaults", "BenchmarkSeedWorkload", "s/workload", below(0.5)},
	{"latency", "insert → terminal p50 < 50 ms when idle", "BenchmarkIdleLatency", "p50-ms", below(50)},
	{"latency", "insert → terminal p99 < 250 ms when idle", "BenchmarkIdleLatency", "p99-ms", below(250)},
	{"memory", "peak RSS < 150 MB draining a 1M-change backlog", "BenchmarkBacklogMemory", "peak-RSS-MB", below(150)},
	{"against the alternatives", "≥ 10× faster than the seeds' GET→PATCH recipe with 8 workers", "BenchmarkAgainstSeedRecipe/one_change_per_account", "x-faster-than-recipe-8", atLeast(10)},
	{"against the alternatives", "≤ half the recipe's requests", "BenchmarkAgainstSeedRecipe/one_change_per_account", "requests-vs-recipe-8", atMost(0.5)},
	{"against the alternatives", "no upstream value lost", "BenchmarkAgainstSeedRecipe/one_change_per_account", "stagesync-lost", equalTo(0)},
	{"against the alternatives", "≥ 10× faster than the 8-worker recipe, where the remote offers $batch", "BenchmarkAgainstSeedRecipe/one_change_per_account,_batch_writes", "x-faster-than-recipe-8", atLeast(10)},
	{"against the alternatives", "≤ half the recipe's requests, where the remote offers $batch", "BenchmarkAgainstSeedRecipe/one_change_per_account,_batch_writes", "requests-vs-recipe-8", atMost(0.5)},
	{"batch writes", "≤ 0.05 requests per change with OData JSON $batch", "BenchmarkBatchWrites/one_change_per_resource/batch_writes", "requests/change", atMost(0.05)},
	{"batch writes", "≥ 10,000 changes/s at one change per resource with $batch", "BenchmarkBatchWrites/one_change_per_resource/batch_writes", "changes/s", atLeast(10000)},
	{"seed workload", "500 changes at 20 ms with $batch", "BenchmarkBatchWrites/seed_workload/batch_writes", "s/workload", below(0.5)},
	{"recovery", "a killed process's work finished by the other within 15 s", "BenchmarkRecoveryAfterKill", "recovery-s", within(0, 15)},
}

func report(w *strings.Builder, results []*result, m machineInfo, command string) {
	find := func(name string) *result {
		for _, r := range results {
			if r.name == name {
				return r
			}
		}
		return nil
	}
	fmt.Fprintf(w, "# Benchmarks\n\n")
	fmt.Fprintf(w, "Written by `%s` on %s at commit `%s`. Do not edit by hand: run `make bench` again.\n\n", command, m.date, m.commit)
	fmt.Fprintf(w, "| machine | |\n|---|---|\n")
	fmt.Fprintf(w, "| CPU | %s, %d cores (PostgreSQL, stagesync and the simulator share them) |\n", m.cpu, m.cores)
	fmt.Fprintf(w, "| memory | %s |\n| kernel | %s |\n| Go | %s |\n| PostgreSQL | %s, on the same machine |\n\n", m.memory, m.kernel, m.goVersion, m.postgres)
	fmt.Fprintf(w, "Each benchmark runs once per `make bench` (`-benchtime 1x`): figures from a shared 2-core machine vary by 10–30%% between runs.\n\n")

	fmt.Fprintf(w, "## SPEC §8 bars\n\n| area | bar | measured | holds | benchmark | settings |\n|---|---|---|---|---|---|\n")
	for _, br := range bars {
		r := find(br.bench)
		if r == nil {
			fmt.Fprintf(w, "| %s | %s | not measured | — | `%s` | |\n", br.area, br.text, br.bench)
			continue
		}
		v, ok := r.metrics[br.metric]
		if !ok {
			fmt.Fprintf(w, "| %s | %s | no `%s` figure | — | `%s` | %s |\n", br.area, br.text, br.metric, br.bench, settingsText(r))
			continue
		}
		verdict := "**no**"
		if br.holds(v) {
			verdict = "yes"
		}
		fmt.Fprintf(w, "| %s | %s | %s %s | %s | `%s` | %s |\n", br.area, br.text, format(v), br.metric, verdict, br.bench, settingsText(r))
	}

	fmt.Fprintf(w, "\n## Every figure\n")
	byPkg := map[string][]*result{}
	var pkgs []string
	for _, r := range results {
		if _, ok := byPkg[r.pkg]; !ok {
			pkgs = append(pkgs, r.pkg)
		}
		byPkg[r.pkg] = append(byPkg[r.pkg], r)
	}
	for _, p := range pkgs {
		fmt.Fprintf(w, "\n### `%s`\n", p)
		for _, r := range byPkg[p] {
			fmt.Fprintf(w, "\n**%s** — settings: %s\n\n| figure | value |\n|---|---|\n", r.name, settingsText(r))
			for _, u := range r.units {
				fmt.Fprintf(w, "| %s | %s |\n", u, format(r.metrics[u]))
			}
		}
	}
}

func settingsText(r *result) string {
	if len(r.settings) == 0 {
		return "not stated"
	}
	return strings.Join(slices.Compact(r.settings), "; ")
}

// format prints a figure with about three significant digits.
func format(v float64) string {
	switch {
	case v == float64(int64(v)) && v < 1e9:
		return strconv.FormatInt(int64(v), 10)
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'g', 3, 64)
	}
}

type machineInfo struct {
	date, commit, cpu, memory, kernel, goVersion, postgres string
	cores                                                  int
}

// machine describes where the figures come from; what can't be read is
// "unknown" rather than an error, so a report is still written.
func machine(getenv func(string) string) machineInfo {
	m := machineInfo{date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), cores: runtime.NumCPU(),
		goVersion: runtime.Version(), cpu: "unknown", memory: "unknown", kernel: runtime.GOOS, postgres: "unknown", commit: "unknown"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				m.cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				if kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64); err == nil {
					m.memory = fmt.Sprintf("%.0f GiB", kb/(1<<20))
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = "Linux " + strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.commit = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
			m.commit += " (with uncommitted changes)"
		}
	}
	if u := getenv("DATABASE_URL"); u != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(ctx, u); err == nil {
			var v string
			if conn.QueryRow(ctx, "SHOW server_version").Scan(&v) == nil {
				m.postgres = v
			}
			_ = conn.Close(ctx)
		}
	}
	return m
}

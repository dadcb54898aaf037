package main

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/stagesync/stagesync/test/remotesim"
)

// alertRulesFile holds the Prometheus alerting rules the README gives.
const alertRulesFile = "testdata/prometheus-rules.yml"

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert string `yaml:"alert"`
			Expr  string `yaml:"expr"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

var (
	metricName   = regexp.MustCompile(`\bstagesync_[a-z_]+\b`)
	matcherLabel = regexp.MustCompile(`(stagesync_[a-z_]+)\{([^}]*)\}`)
	labelName    = regexp.MustCompile(`([a-z_]+)\s*[=!]~?\s*"`)
	byClause     = regexp.MustCompile(`\bby\s*\(([^)]*)\)`)
)

// TestAlertRulesUseMetricsThatRunExports scrapes /metrics of a process that
// has applied a change and checks every metric the README's alerting rules
// use: it is exported, with every label the rule matches on or aggregates
// by.
func TestAlertRulesUseMetricsThatRunExports(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(alertRulesFile)
	require.NoError(t, err)
	var rules ruleFile
	require.NoError(t, yaml.Unmarshal(raw, &rules), "parse %s", alertRulesFile)
	require.Len(t, rules.Groups, 1)
	require.GreaterOrEqual(t, len(rules.Groups[0].Rules), 6, "rules in %s", alertRulesFile)

	dbURL, pool := testDatabase(t)
	sim, hs := newSim(t, remotesim.Options{})
	sim.Put("acct-1", map[string]any{"status": "open"})
	s := startServe(t, dbURL, pool, testConfig(t, hs.URL, ""))
	execSQL(t, pool, `INSERT INTO stagesync.changes (target, resource_id, fields) VALUES ('territory', 'acct-1', '{"status": "won"}')`)
	waitFor(t, 30*time.Second, "the change to be applied", func() bool {
		return countWhere(t, pool, `SELECT count(*) FROM stagesync.changes WHERE status = 'applied'`) == 1
	})
	var scrape string
	waitFor(t, 30*time.Second, "the monitor's gauges in /metrics", func() bool {
		_, scrape = s.get(t, "/metrics")
		return strings.Contains(scrape, "\nstagesync_conflict_ratio{")
	})
	// series returns the scraped series lines of a metric.
	series := func(name string) []string {
		var out []string
		for _, l := range strings.Split(scrape, "\n") {
			if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
				out = append(out, l)
			}
		}
		return out
	}
	hasLabel := func(name, label string) bool {
		return slices.ContainsFunc(series(name), func(l string) bool {
			return strings.Contains(l, "{"+label+`="`) || strings.Contains(l, ","+label+`="`)
		})
	}

	for _, r := range rules.Groups[0].Rules {
		names := metricName.FindAllString(r.Expr, -1)
		require.NotEmpty(t, names, "%s uses no stagesync metric", r.Alert)
		for _, n := range names {
			require.NotEmpty(t, series(n), "%s uses %s: got no such metric in /metrics; want it exported", r.Alert, n)
		}
		for _, m := range matcherLabel.FindAllStringSubmatch(r.Expr, -1) {
			for _, l := range labelName.FindAllStringSubmatch(m[2], -1) {
				require.True(t, hasLabel(m[1], l[1]), "%s matches %s on label %s: got no such label in /metrics", r.Alert, m[1], l[1])
			}
		}
		for _, by := range byClause.FindAllStringSubmatch(r.Expr, -1) {
			for _, l := range strings.Split(by[1], ",") {
				for _, n := range names {
					require.True(t, hasLabel(n, strings.TrimSpace(l)), "%s aggregates %s by %s: got no such label in /metrics", r.Alert, n, l)
				}
			}
		}
	}

	// Once the README carries the rules, they must be these.
	if readme, err := os.ReadFile("../../README.md"); err == nil && strings.Contains(string(readme), "StagesyncConflictRateHigh") {
		require.Contains(t, string(readme), string(raw), "the README's alerting rules differ from %s", alertRulesFile)
	}
}

// TestAlertRulesFireInPromtool runs promtool's rule tests
// (testdata/prometheus-rules_test.yml): the conflict-rate rule fires for a
// target above its threshold with enough requests, whatever the number of
// processes reporting it, and not for one with two requests; the others
// fire on a dead letter, a long pause and an unreachable database.
func TestAlertRulesFireInPromtool(t *testing.T) {
	t.Parallel()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool is not installed (Debian's prometheus package has it); skipping the rule tests")
	}
	out, err := exec.CommandContext(t.Context(), promtool, "test", "rules", "testdata/prometheus-rules_test.yml").CombinedOutput()
	require.NoError(t, err, "promtool test rules:\n%s", out)
}

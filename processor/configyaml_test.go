package processor

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func noEnv(string) string { return "" }

func TestParseConfigErrorsNameKeyPathLineAndNearestKey(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, yaml, want string }{
		{"typo in a target key", `
targets:
  territory:
    base_url: http://x.test
    item_path: /a/{id}
    merge: {default: ours, fields: {owner: theirs, region: manual}}
    batch_etag_paht: /a
`, "line 7: targets.territory.batch_etag_paht: unknown key (did you mean batch_etag_path?)"},
		{"typo at the top level", "listn: 127.0.0.1:1\n", "line 1: listn: unknown key (did you mean listen?)"},
		{"typo in a nested key", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    backoff: {base: 1s, maks: 2s}
`, "line 6: targets.t.backoff.maks: unknown key (did you mean max?)"},
		{"nothing near", `
dispatch:
  frobnicate: 3
`, "line 3: dispatch.frobnicate: unknown key (known keys: claim_batch, poll_interval, rescue_after, shutdown_grace)"},
		{"a word where a number goes", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    concurrency: lots
`, `line 6: targets.t.concurrency: must be a whole number, got "lots"`},
		{"a word where a rate goes", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    rate_limit: fast
`, `line 6: targets.t.rate_limit: must be a number, got "fast"`},
		{"a bad duration", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    timeout: soon
`, `line 6: targets.t.timeout: "soon" is not a duration like 500ms or 10s`},
		{"a fraction where a whole number goes", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    concurrency: 4.5
`, `line 6: targets.t.concurrency: must be a whole number, got "4.5"`},
		{"not a number where a rate goes", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    rate_limit: .nan
`, `line 6: targets.t.rate_limit: must be a finite number, got ".nan"`},
		{"an infinite rate", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    rate_limit: .inf
`, `line 6: targets.t.rate_limit: must be a finite number, got ".inf"`},
		{"an explicit 0 that would become the default", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    workers: 0
`, "line 6: targets.t.workers: must not be 0; leave the key out for the default"},
		{"an explicit 0s that would become the default", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    backoff: {base: 0s}
`, "line 6: targets.t.backoff.base: must not be 0; leave the key out for the default"},
		{"a bad indent names its own line", `
targets:
  t:
    base_url: http://x.test
   item_path: /a/{id}
`, "line 5: did not find expected key"},
		{"a tab names its own line", "targets:\n  t:\n    base_url: http://x.test\n\titem_path: /a/{id}\n",
			"line 4: found a tab character that violates indentation"},
		{"a list where targets go", "targets: [a, b]\n", "line 1: targets: must be a mapping (name: value), got a list"},
		{"a scalar where a list goes", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    conflict_statuses: 409
`, `line 6: targets.t.conflict_statuses: must be a list (like [a, b]), got "409"`},
		{"a bad list element", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    conflict_statuses: [409, x]
`, `line 6: targets.t.conflict_statuses[1]: must be a whole number, got "x"`},
		{"a key given twice", `
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    workers: 2
    workers: 3
`, "line 7: targets.t.workers: given twice (first on line 6)"},
		{"a target given twice", `
targets:
  t:
    base_url: http://x.test
  t:
    base_url: http://y.test
`, "line 5: targets.t: given twice (first on line 3)"},
		{"a syntax error", "targets:\n  t:\n    base_url: [\n", "line 3: did not find expected node content"},
		{"a validation error gets its line", `
targets:
  territory:
    base_url: http://x.test
    item_path: /a/{id}

    rate_limit: -1
`, "line 7: targets.territory.rate_limit: must be >= 0 (0 means unlimited)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseConfig([]byte(tt.yaml), noEnv)
			require.Error(t, err)
			require.Equal(t, tt.want, err.Error())
			for _, goWord := range []string{"processor.", "!!", "unmarshal", "float64", "int into", "struct"} {
				require.NotContains(t, err.Error(), goWord, "a Go word in a config error")
			}
		})
	}
}

func TestParseConfigLinesSurviveEnvExpansion(t *testing.T) {
	t.Parallel()
	// A multi-line value and a flow mapping before the mistake: lines are
	// those of the file as written.
	_, err := ParseConfig([]byte(`database_url: ${DB}
targets:
  t:
    base_url: http://x.test
    item_path: /a/{id}
    merge: {fields: {a: ours, b: theirs, c: manual}}
    wokers: 2
`), func(string) string { return "postgres://x\n\n\n/db" })
	require.EqualError(t, err, "line 7: targets.t.wokers: unknown key (did you mean workers?)")
}

// Every key of the structs is known, whoever added it: a transposed key
// gets the right suggestion.
func TestParseConfigSuggestsEveryTargetKey(t *testing.T) {
	t.Parallel()
	for key := range yamlFields(reflect.TypeFor[TargetConfig]()) {
		if len(key) < 4 {
			continue
		}
		typo := key[:1] + key[2:3] + key[1:2] + key[3:]
		doc := "targets:\n  t:\n    base_url: http://x.test\n    item_path: /a/{id}\n    " + typo + ": 1\n"
		_, err := ParseConfig([]byte(doc), noEnv)
		require.ErrorContains(t, err, "line 5: targets.t."+typo+": unknown key (did you mean "+key+"?)")
	}
}

func TestParseConfigAlert(t *testing.T) {
	t.Parallel()
	base := "targets:\n  t:\n    base_url: http://x.test\n    item_path: /a/{id}\n"
	cfg, err := ParseConfig([]byte(base), noEnv)
	require.NoError(t, err)
	require.Equal(t, AlertConfig{ConflictRate: 0.05, Window: Duration(15 * time.Minute)}, cfg.Targets["t"].Alert)
	require.Equal(t, map[string]any{"conflict_rate": 0.05, "window": "15m0s"}, cfg.Targets["t"].Settings()["alert"])

	cfg, err = ParseConfig([]byte(base+"    alert: {conflict_rate: 0.1, window: 1h}\n"), noEnv)
	require.NoError(t, err)
	require.Equal(t, AlertConfig{ConflictRate: 0.1, Window: Duration(time.Hour)}, cfg.Targets["t"].Alert)

	for extra, want := range map[string]string{
		"    alert: {conflict_rate: 5}\n":   "line 5: targets.t.alert.conflict_rate: must be a share of requests in (0, 1], like 0.05 for 5%, got 5",
		"    alert: {conflict_rate: -1}\n":  "line 5: targets.t.alert.conflict_rate: must be a share of requests in (0, 1]",
		"    alert: {window: 10s}\n":        "line 5: targets.t.alert.window: must be between 1m and 24h, got 10s",
		"    alert: {conflict_ratio: .1}\n": "line 5: targets.t.alert.conflict_ratio: unknown key (did you mean conflict_rate?)",
	} {
		_, err := ParseConfig([]byte(base+extra), noEnv)
		require.Error(t, err, extra)
		require.True(t, strings.HasPrefix(err.Error(), want), "got %q; want prefix %q", err.Error(), want)
	}
}

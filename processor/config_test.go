package processor

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseConfigAppliesDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := ParseConfig([]byte(`
targets:
  territory:
    base_url: https://api.example.test/
    item_path: /assignments/{id}
    auth: {env: TOKEN, prefix: "Bearer "}
`), func(k string) string { return map[string]string{"TOKEN": "s3cret"}[k] })
	require.NoError(t, err)
	tc := cfg.Targets["territory"]
	require.Equal(t, "territory", tc.Name)
	require.Equal(t, "https://api.example.test", tc.BaseURL)
	require.Equal(t, "PATCH", tc.UpdateMethod)
	require.Equal(t, []int{409, 412}, tc.ConflictStatuses)
	require.Equal(t, 128, tc.Concurrency)
	require.Equal(t, 8, tc.Workers)
	require.Equal(t, 10*time.Second, tc.Timeout.D())
	require.Equal(t, 10, tc.MaxAttempts)
	require.Equal(t, PolicyOurs, tc.Merge.Default)
	require.Equal(t, "Authorization", tc.Auth.Header)
	require.Equal(t, "s3cret", tc.authValue)
	require.Equal(t, "127.0.0.1:9090", cfg.Listen)
	settings, err := json.Marshal(tc.Settings())
	require.NoError(t, err)
	require.NotContains(t, string(settings), "s3cret", "settings go to the database: no secret")
	require.Contains(t, string(settings), `"env":"TOKEN"`)
}

func TestParseConfigErrorsNameTheKey(t *testing.T) {
	t.Parallel()
	base := "targets:\n  territory:\n    base_url: http://x.test\n    item_path: /a/{id}\n"
	tests := []struct{ name, extra, want string }{
		{"negative rate limit", "    rate_limit: -1\n", "targets.territory.rate_limit: must be >= 0"},
		{"bad method", "    update_method: POST\n", "targets.territory.update_method: must be PATCH or PUT"},
		{"bad policy", "    merge: {fields: {owner: mine}}\n", "targets.territory.merge.fields.owner: must be ours, theirs or manual"},
		{"bad default policy", "    merge: {default: both}\n", "targets.territory.merge.default"},
		{"bad timeout", "    timeout: soon\n", "is not a duration"},
		{"unknown key", "    retries: 3\n", "line 5: targets.territory.retries: unknown key"},
		{"conflict status 200", "    conflict_statuses: [200]\n", "targets.territory.conflict_statuses: 200 is not a conflict status"},
		{"auth env unset", "    auth: {env: NOPE}\n", "targets.territory.auth.env: environment variable NOPE is not set"},
		{"backoff max below base", "    backoff: {base: 2s, max: 1s}\n", "targets.territory.backoff.max: must be >= backoff.base"},
		{"concurrency zero after default", "    concurrency: -2\n", "targets.territory.concurrency: must be between 1 and 1024"},
		{"batch size too big", "    batch_size: 501\n", "targets.territory.batch_size: must be between 1 and 500"},
		{"credential in If-Match", "    auth: {env: NOPE, header: if-match}\n", "targets.territory.auth.header: must not be If-Match: stagesync sets that header itself"},
		{"credential in Idempotency-Key", "    auth: {env: NOPE, header: Idempotency-Key}\n", "targets.territory.auth.header: must not be Idempotency-Key"},
		{"no conflict status", "    conflict_statuses: []\n", "line 5: targets.territory.conflict_statuses: must not be an empty list; leave the key out for the default"},
		{"retention pause 0", "retention: {pause: 0s}\n", "line 5: retention.pause: must not be 0; leave the key out for the default"},
		{"retention batch 0", "retention: {batch_size: 0}\n", "line 5: retention.batch_size: must not be 0"},
		{"listen without a port", "listen: nope\n", "listen: must be host:port, like 127.0.0.1:9090, got \"nope\""},
		{"listen with a bad port", "listen: 127.0.0.1:http2\n", "listen: port must be a number from 0 to 65535, got \"http2\""},
		{"max_coalesce negative", "    max_coalesce: -1\n", "targets.territory.max_coalesce: must be between 1 and 10000, got -1"},
		{"max_coalesce too big", "    max_coalesce: 10001\n", "targets.territory.max_coalesce: must be between 1 and 10000, got 10001"},
		{"max_coalesce zero", "    max_coalesce: 0\n", "line 5: targets.territory.max_coalesce: must not be 0; leave the key out for the default"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseConfig([]byte(base+tt.extra), func(string) string { return "" })
			require.Error(t, err)
			require.Contains(t, err.Error(), tt.want)
		})
	}
	t.Run("item path without id", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte("targets:\n  t:\n    base_url: http://x.test\n    item_path: /a\n"), func(string) string { return "" })
		require.ErrorContains(t, err, "targets.t.item_path: must start with / and contain {id}")
	})
	t.Run("credential with a newline", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte(base+"    auth: {env: TOKEN}\n"), func(k string) string {
			return map[string]string{"TOKEN": "abc\r\nX-Evil: 1"}[k]
		})
		require.ErrorContains(t, err, "targets.territory.auth.env: environment variable TOKEN holds a control character")
		require.NotContains(t, err.Error(), "abc", "the credential must not be echoed")
	})
	t.Run("query in item path", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte("targets:\n  t:\n    base_url: http://x.test\n    item_path: /a/{id}?key=k\n"), func(string) string { return "" })
		require.ErrorContains(t, err, "targets.t.item_path: must not contain a query")
	})
	t.Run("credentials in base url", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte("targets:\n  t:\n    base_url: http://u:pw@x.test\n    item_path: /a/{id}\n"), func(string) string { return "" })
		require.ErrorContains(t, err, "targets.t.base_url: must not contain credentials")
		require.NotContains(t, err.Error(), "pw")
	})
	t.Run("no targets", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte("listen: 127.0.0.1:1\n"), func(string) string { return "" })
		require.ErrorContains(t, err, "targets: at least one target is required")
	})
	t.Run("unset variable in expansion", func(t *testing.T) {
		t.Parallel()
		_, err := ParseConfig([]byte(base+"    rate_limit: ${RATE}\n"), func(string) string { return "" })
		require.ErrorContains(t, err, "environment variables referenced but not set: RATE")
	})
}

func TestParseConfigExpandsEnvInValuesOnly(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"DBURL":  "postgres://u:p#w: x@db.test:5432/app?sslmode=require",
		"RATE":   "25",
		"PREFIX": "/v2",
	}
	cfg, err := ParseConfig([]byte(`
database_url: ${DBURL}
targets:
  territory:
    base_url: http://api.test${PREFIX}
    item_path: /a/{id}/$literal
    rate_limit: ${RATE}
`), func(k string) string { return env[k] })
	require.NoError(t, err)
	require.Equal(t, env["DBURL"], cfg.DatabaseURL, "a value with YAML syntax in it stays one value")
	require.Equal(t, 25.0, cfg.Targets["territory"].RateLimit, "an expanded number reads as a number")
	require.Equal(t, "http://api.test/v2", cfg.Targets["territory"].BaseURL)
	require.Equal(t, "/a/{id}/$literal", cfg.Targets["territory"].ItemPath, "only ${VAR} is expanded")
}

// A config error quotes the value it refuses; a value that came from the
// environment (a credential put in the wrong key) shows as its ${VAR}.
func TestConfigErrorsNeverShowValuesFromTheEnvironment(t *testing.T) {
	t.Parallel()
	const secret = "SECRETTOKEN-9f8e7d"
	getenv := func(name string) string {
		if name == "TOKEN" {
			return secret
		}
		return ""
	}
	for name, body := range map[string]string{
		"a value where a mapping belongs": "    auth: \"Bearer ${TOKEN}\"\n",
		"a value of the wrong kind":       "    timeout: ${TOKEN}\n",
		"a value the validation refuses":  "    update_method: ${TOKEN}\n",
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			raw := "targets:\n  crm:\n    base_url: http://127.0.0.1:1\n    item_path: /a/{id}\n" + body
			_, err := ParseConfig([]byte(raw), getenv)
			require.Error(t, err)
			require.NotContains(t, err.Error(), secret, "error: %v", err)
			require.Contains(t, err.Error(), "${TOKEN}", "error: %v", err)
		})
	}
}

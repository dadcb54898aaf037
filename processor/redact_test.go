package processor

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRedactCoversTheFormsAnEchoMayUse(t *testing.T) {
	t.Parallel()
	tc := &TargetConfig{authValue: `tok/en+"<x>`}
	tests := []struct{ name, in, want string }{
		{"as sent", `Authorization: Bearer tok/en+"<x>`, `Authorization: Bearer [redacted]`},
		{"query-escaped", `url=?t=tok%2Fen%2B%22%3Cx%3E`, `url=?t=[redacted]`},
		{"JSON-escaped", `{"auth":"tok/en+\"\u003cx\u003e"}`, `{"auth":"[redacted]"}`},
		{"JSON with / escaped (PHP)", `{"auth":"tok\/en+\"<x>"}`, `{"auth":"[redacted]"}`},
		{"JSON with + escaped (.NET), upper-case hex", `{"auth":"tok/en\u002B\"\u003Cx\u003E"}`, `{"auth":"[redacted]"}`},
		{"every character escaped", `"\u0074\u006f\u006b\u002f\u0065\u006e\u002b\u0022\u003c\u0078\u003e"`, `"[redacted]"`},
		{"query-escaped in lower case", `t=tok%2fen%2b%22%3cx%3e`, `t=[redacted]`},
		{"unrelated text", `nothing to see`, `nothing to see`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tt.want, tc.redact(tt.in))
		})
	}
}

func TestRedactBytesKeepsJSONValid(t *testing.T) {
	t.Parallel()
	tc := &TargetConfig{authValue: `abc"def`}
	raw, err := json.Marshal(map[string]any{"error": "denied", "authorization": `Bearer abc"def`})
	require.NoError(t, err)
	out := tc.redactBytes(raw)
	var m map[string]any
	require.NoError(t, json.Unmarshal(out, &m), "redacted body %s is not JSON", out)
	require.Equal(t, "Bearer [redacted]", m["authorization"])
}

func TestRedactLeavesShortOrMissingCredentialsAlone(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"", "abc"} {
		tc := &TargetConfig{authValue: v}
		require.Equal(t, "abc def", tc.redact("abc def"), "credential %q: ordinary text must survive", v)
	}
}

func TestSecretETagsAndRedactedFieldsAreFound(t *testing.T) {
	t.Parallel()
	tc := &TargetConfig{authValue: "tok-secret"}
	require.True(t, tc.secretETag(`"tok-secret"`), "an ETag holding the credential")
	require.True(t, tc.secretETag(`"v1-[redacted]"`), "an ETag read from a redacted body")
	require.False(t, tc.secretETag(`"v1"`), "an ordinary ETag")
	require.False(t, (&TargetConfig{}).secretETag(`"[redacted]"`), "no credential configured: nothing was redacted")

	snap := map[string]any{"a": "x", "b": map[string]any{"c": []any{"key [redacted]"}}, "d": "[redacted]"}
	require.Equal(t, "b", tc.redactedField(snap, nil), "the first field in key order holding the placeholder")
	require.Equal(t, "d", tc.redactedField(snap, map[string]any{"b": 1}), "a field set over is not sent from the snapshot")
	require.Empty(t, tc.redactedField(snap, map[string]any{"b": 1, "d": 2}))
	require.Empty(t, (&TargetConfig{}).redactedField(snap, nil), "no credential configured")
}

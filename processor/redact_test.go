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

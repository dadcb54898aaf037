package processor

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

func TestDecodeObjectKeepsLargeIntegersExact(t *testing.T) {
	t.Parallel()
	m, err := decodeObject([]byte(`{"account": 12345678901234567891, "ratio": 0.1}`))
	require.NoError(t, err)
	out, err := json.Marshal(m)
	require.NoError(t, err)
	require.JSONEq(t, `{"account": 12345678901234567891, "ratio": 0.1}`, string(out))
	require.Contains(t, string(out), "12345678901234567891", "got %s; want the integer digit for digit", out)

	_, err = decodeObject([]byte(`null`))
	require.ErrorContains(t, err, "got null")
	_, err = decodeObject([]byte(`[1]`))
	require.Error(t, err)
}

func TestJSONEqualComparesNumbersByValue(t *testing.T) {
	t.Parallel()
	n := func(s string) json.Number { return json.Number(s) }
	require.True(t, jsonEqual(n("1"), n("1.0")))
	require.True(t, jsonEqual(n("1e2"), float64(100)))
	require.True(t, jsonEqual(n("2"), 2))
	require.False(t, jsonEqual(n("12345678901234567891"), n("12345678901234567890")), "large integers must compare exactly")
	require.False(t, jsonEqual(n("1"), "1"), "a number is not a string")
	require.True(t, jsonEqual(map[string]any{"a": []any{n("1")}}, map[string]any{"a": []any{float64(1)}}))
}

func TestCleanTextIsStorableAndPrintable(t *testing.T) {
	t.Parallel()
	got := cleanText("bad \x1b[31mred\x1b[0m\x00 and \xe2\x82", 1000)
	require.True(t, utf8.ValidString(got))
	require.NotContains(t, got, "\x1b")
	require.NotContains(t, got, "\x00")

	long := strings.Repeat("é", 200) // 400 bytes
	cut := cleanText(long, 301)
	require.True(t, utf8.ValidString(cut), "cut inside a character: %q", cut)
	require.Equal(t, strings.Repeat("é", 150)+"…", cut)
}

func TestPgSafeReplacesNULInStrings(t *testing.T) {
	t.Parallel()
	v := map[string]any{"a\x00": "x\x00y", "list": []any{"\x00", json.Number("1")}}
	b, err := json.Marshal(pgSafe(v))
	require.NoError(t, err)
	require.NotContains(t, string(b), `\u0000`)
	require.JSONEq(t, `{"a\ufffd": "x\ufffdy", "list": ["\ufffd", 1]}`, string(b))
	require.Equal(t, "x\x00y", v["a\x00"], "the original must be left alone: it may be sent to the remote")
}

func TestNewSnapshotTrustsOnlyBodiesThatShowTheWrite(t *testing.T) {
	t.Parallel()
	patch := &applier{t: &TargetConfig{UpdateMethod: http.MethodPatch}}
	put := &applier{t: &TargetConfig{UpdateMethod: http.MethodPut}}
	base := resourceState{snapshot: map[string]any{"owner": "a", "status": "open"}}
	written := map[string]any{"status": "won"}

	full := response{body: map[string]any{"owner": "a", "status": "won", "updated": "now"}}
	snap, covers := patch.newSnapshot(full, base, written)
	require.Equal(t, full.body, snap, "a representation showing the write is the new base")
	require.Nil(t, covers, "a representation covers every field")

	couch := response{body: map[string]any{"ok": true, "id": "x", "rev": "2-b"}}
	snap, _ = put.newSnapshot(couch, base, written)
	require.Equal(t, map[string]any{"owner": "a", "status": "won"}, snap,
		"a PUT answered with a receipt: the base is the document sent")

	noBody := response{}
	snap, _ = patch.newSnapshot(noBody, base, written)
	require.Equal(t, map[string]any{"owner": "a", "status": "won"}, snap)
	snap, _ = patch.newSnapshot(noBody, resourceState{}, written)
	require.Nil(t, snap, "no old base and no representation: unknown, not partial")

	partial := resourceState{snapshot: map[string]any{"id": "x", "owner": "a"}, covers: map[string]bool{"id": true, "owner": true}}
	snap, covers = patch.newSnapshot(noBody, partial, written)
	require.Equal(t, map[string]any{"id": "x", "owner": "a", "status": "won"}, snap)
	require.Equal(t, map[string]bool{"id": true, "owner": true, "status": true}, covers, "a partial base stays partial, plus what was written")

	removed := map[string]any{"owner": nil}
	require.False(t, shows(map[string]any{"owner": "a"}, removed))
	require.True(t, shows(map[string]any{"status": "x"}, removed))
}

func TestNumericFitsPostgreSQLsRange(t *testing.T) {
	t.Parallel()
	for s, want := range map[string]bool{
		"1": true, "-12.5e3": true, "1e131071": true, "1.5e131071": true, "1e-16383": true,
		"1e131072": false, "1e200000": false, "1e-16384": false, "0e-20000": false, "1e99999999999": false,
	} {
		require.Equal(t, want, numericFits(s), "numericFits(%s)", s)
	}
	v := map[string]any{"huge": json.Number("1e200000"), "ok": json.Number("2")}
	b, err := json.Marshal(pgSafe(v))
	require.NoError(t, err)
	require.JSONEq(t, `{"huge": "1e200000", "ok": 2}`, string(b), "an out-of-range number is kept as its text")
}

func TestStoredETagKeepsRawBytes(t *testing.T) {
	t.Parallel()
	text, raw := storedETag(`"abc"`)
	require.Equal(t, `"abc"`, text)
	require.Nil(t, raw, "a valid ETag needs no raw copy")
	text, raw = storedETag("\"ab\xff\xfe\"")
	require.True(t, utf8.ValidString(text), "readable form: got %q", text)
	require.Equal(t, `"ab\xff\xfe"`, text)
	require.Equal(t, []byte("\"ab\xff\xfe\""), raw, "raw bytes: got %q", raw)
}

func TestStorableSnapshotLeavesOutWhatJSONBCannotHold(t *testing.T) {
	t.Parallel()
	snap := map[string]any{"id": "x", "owner": "a", "big": json.Number("1e200000"), "nul": "a\x00b"}
	out, covers := storableSnapshot(snap, nil)
	require.Equal(t, map[string]any{"id": "x", "owner": "a"}, out)
	require.Equal(t, map[string]bool{"id": true, "owner": true}, covers, "left-out fields have an unknown base")
	out, covers = storableSnapshot(map[string]any{"owner": "a"}, nil)
	require.Equal(t, map[string]any{"owner": "a"}, out)
	require.Nil(t, covers, "nothing left out: still the whole representation")
}

// A remote's text cannot reorder what an operator reads: bidi controls
// (an override that shows "gnp.exe" as "exe.png") are dropped.
func TestCleanTextDropsBidiControls(t *testing.T) {
	t.Parallel()
	got := cleanText("invoice \u202egnp.exe\u202c and \u2066isolated\u2069 \u200fmark", 1000)
	require.Equal(t, "invoice gnp.exe and isolated mark", got)
}

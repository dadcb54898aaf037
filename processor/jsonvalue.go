package processor

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"reflect"
	"strings"
	"unicode"
	"unicode/utf8"
)

// decodeObject decodes a JSON object keeping numbers as json.Number, so an
// integer beyond 2^53 (an account number, a snowflake id) is written back
// digit for digit instead of rounded through float64.
func decodeObject(raw []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode JSON object: %w", err)
	}
	if m == nil {
		return nil, fmt.Errorf("decode JSON object: got null")
	}
	return m, nil
}

// jsonEqual compares two decoded JSON values as JSON does: numbers by
// value (1, 1.0 and 1e0 are equal; large integers exactly).
func jsonEqual(a, b any) bool {
	return reflect.DeepEqual(normalize(a), normalize(b))
}

func normalize(v any) any {
	switch x := v.(type) {
	case json.Number:
		return canonicalNumber(x.String())
	case float64:
		return canonicalNumber(big.NewFloat(x).Text('g', -1))
	case int:
		return canonicalNumber(fmt.Sprint(x))
	case int64:
		return canonicalNumber(fmt.Sprint(x))
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = normalize(e)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = normalize(e)
		}
		return s
	default:
		return v
	}
}

// number is a canonical JSON number, distinct from a string of digits.
type number string

func canonicalNumber(s string) number {
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return number(s)
	}
	return number(r.RatString())
}

// pgSafe returns a copy of a decoded JSON value that PostgreSQL's jsonb
// accepts: U+0000 inside strings (legal JSON, refused by jsonb) becomes
// U+FFFD. Only audit rows and stored snapshots pass through it, never
// what is sent to the remote.
func pgSafe(v any) any {
	switch x := v.(type) {
	case string:
		return strings.ReplaceAll(x, "\x00", "\uFFFD")
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[strings.ReplaceAll(k, "\x00", "\uFFFD")] = pgSafe(e)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = pgSafe(e)
		}
		return s
	default:
		return v
	}
}

// cleanText makes remote-supplied text safe to store and print: valid
// UTF-8 (PostgreSQL refuses anything else), no control characters (no
// terminal escapes reach an operator's screen), at most max bytes, cut on a
// character boundary.
func cleanText(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

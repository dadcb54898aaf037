package processor

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/big"
	"reflect"
	"strconv"
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

// What PostgreSQL's jsonb can hold: numeric's range (digits before and
// after the decimal point) and a nesting depth well inside its stack.
const (
	maxNumericIntDigits  = 131072
	maxNumericFracDigits = 16383
	maxStoredDepth       = 64
)

// maxSnapshotBytes caps a stored snapshot (the merge base) and anything
// else stored whole from a remote's answer.
const maxSnapshotBytes = 256 << 10

// pgSafe returns a copy of a decoded JSON value that PostgreSQL's jsonb
// accepts: U+0000 inside strings (legal JSON, refused by jsonb) becomes
// U+FFFD, a number beyond numeric's range is kept as its text (a string),
// and nesting deeper than maxStoredDepth becomes a note. Only audit rows
// and durable intents pass through it, never what is sent to the remote.
func pgSafe(v any) any {
	return pgSafeAt(v, 0)
}

func pgSafeAt(v any, depth int) any {
	if depth > maxStoredDepth {
		return fmt.Sprintf("(nested deeper than %d levels: not stored)", maxStoredDepth)
	}
	switch x := v.(type) {
	case string:
		return strings.ReplaceAll(x, "\x00", "\uFFFD")
	case json.Number:
		if !numericFits(x.String()) {
			return x.String()
		}
		return x
	case float64:
		if math.IsInf(x, 0) || math.IsNaN(x) {
			return fmt.Sprint(x)
		}
		return x
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[strings.ReplaceAll(k, "\x00", "\uFFFD")] = pgSafeAt(e, depth+1)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = pgSafeAt(e, depth+1)
		}
		return s
	default:
		return v
	}
}

// storable reports whether jsonb holds v exactly as decoded: no U+0000, no
// number beyond numeric's range, no deeper nesting than maxStoredDepth.
func storable(v any, depth int) bool {
	if depth > maxStoredDepth {
		return false
	}
	switch x := v.(type) {
	case string:
		return !strings.Contains(x, "\x00")
	case json.Number:
		return numericFits(x.String())
	case map[string]any:
		for k, e := range x {
			if strings.Contains(k, "\x00") || !storable(e, depth+1) {
				return false
			}
		}
	case []any:
		for _, e := range x {
			if !storable(e, depth+1) {
				return false
			}
		}
	}
	return true
}

// numericFits reports whether a JSON number is within PostgreSQL numeric's
// range (what jsonb stores numbers as): at most 131072 digits before the
// decimal point and 16383 after, once the exponent is applied.
func numericFits(s string) bool {
	s = strings.TrimPrefix(s, "-")
	mant, exp, hasExp := strings.Cut(strings.ToLower(s), "e")
	intPart, frac, _ := strings.Cut(mant, ".")
	e := 0
	if hasExp {
		exp = strings.TrimPrefix(exp, "+")
		if len(strings.TrimLeft(strings.TrimPrefix(exp, "-"), "0")) > 7 {
			return false
		}
		n, err := strconv.Atoi(exp)
		if err != nil {
			return false
		}
		e = n
	}
	return len(intPart)+e <= maxNumericIntDigits && len(frac)-e <= maxNumericFracDigits
}

// storedETag splits an ETag into what the etag (or if_match) column shows
// and, when its bytes are not valid UTF-8 text PostgreSQL accepts, those
// exact bytes for the raw column: If-Match must send them back unchanged.
func storedETag(e string) (text string, raw []byte) {
	if utf8.ValidString(e) && !strings.ContainsRune(e, 0) {
		return e, nil
	}
	return escapeBytes(e), []byte(e)
}

// escapeBytes writes bytes that are not valid UTF-8 (and NUL) as \xNN.
func escapeBytes(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n <= 1 || r == 0 {
			fmt.Fprintf(&b, "\\x%02x", s[i])
			i++
			continue
		}
		b.WriteString(s[i : i+n])
		i += n
	}
	return b.String()
}

// cleanText makes remote-supplied text safe to store and print: valid
// UTF-8 (PostgreSQL refuses anything else), no control characters (no
// terminal escapes reach an operator's screen), at most max bytes, cut on a
// character boundary.
func cleanText(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		switch {
		case unicode.IsControl(r):
			return ' '
		case unicode.Is(unicode.Bidi_Control, r):
			// Bidi overrides (U+202E and kin) would reorder what an
			// operator reads around them: a remote's text must read as
			// it is stored.
			return -1
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

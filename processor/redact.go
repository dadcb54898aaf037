package processor

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
)

// redacted replaces a credential wherever stagesync would store, log or
// show it.
const redacted = "[redacted]"

// secretPattern matches the target's credential in every spelling a remote
// may echo it in: as sent, URL-escaped (%XX, + for a space), and
// JSON-escaped in any of JSON's ways, mixed freely (\/ for /, \u002B for
// +, \" and \\, upper or lower hex), since encoders differ (PHP escapes
// /, .NET escapes +). nil for no credential, or one under 4 bytes: that
// would blank out ordinary text, and nobody's credential is that short.
func (t *TargetConfig) secretPattern() *regexp.Regexp {
	v := t.authValue
	if len(v) < 4 {
		return nil
	}
	if re, ok := secretPatterns.Load(v); ok {
		return re.(*regexp.Regexp)
	}
	var b strings.Builder
	for _, r := range v {
		alts := []string{regexp.QuoteMeta(string(r))}
		if r < 0x10000 {
			alts = append(alts, `\\u`+anyCaseHex(fmt.Sprintf("%04x", r)))
		}
		for _, c := range []byte(string(r)) {
			alts = append(alts, "%"+anyCaseHex(fmt.Sprintf("%02x", c)))
		}
		switch r {
		case '/':
			alts = append(alts, `\\/`)
		case '"':
			alts = append(alts, `\\"`)
		case '\\':
			alts = append(alts, `\\\\`)
		case ' ':
			alts = append(alts, `\+`)
		}
		b.WriteString("(?:" + strings.Join(alts, "|") + ")")
	}
	re := regexp.MustCompile(b.String())
	secretPatterns.Store(v, re)
	return re
}

// secretPatterns caches secretPattern by credential.
var secretPatterns sync.Map

// anyCaseHex matches hex digits in either case: \u002b and \u002B alike.
func anyCaseHex(h string) string {
	var b strings.Builder
	for _, c := range h {
		if c >= 'a' && c <= 'f' {
			b.WriteString("[" + string(c) + strings.ToUpper(string(c)) + "]")
		} else {
			b.WriteRune(c)
		}
	}
	return b.String()
}

// redact replaces the target's credential in s. Remote answers pass
// through it where they enter the process (send), so an error page that
// echoes the Authorization header never reaches attempts or change rows,
// snapshots, merges, logs or the status page.
func (t *TargetConfig) redact(s string) string {
	if re := t.secretPattern(); re != nil {
		return re.ReplaceAllLiteralString(s, redacted)
	}
	return s
}

// redactBytes is redact for a response body, before it is decoded: the
// replacement is plain text, so a JSON string that held the credential
// stays a valid JSON string.
func (t *TargetConfig) redactBytes(b []byte) []byte {
	if re := t.secretPattern(); re != nil && re.Match(b) {
		return re.ReplaceAllLiteral(b, []byte(redacted))
	}
	return b
}

// secretETag reports whether an ETag holds the target's credential, as
// sent or already redacted (an ETag read from a redacted body). Such an
// ETag is never stored or sent back in If-Match: the stored form would be
// the placeholder, which matches nothing, and the real one is a secret.
func (t *TargetConfig) secretETag(etag string) bool {
	re := t.secretPattern()
	if re == nil || etag == "" {
		return false
	}
	return strings.Contains(etag, redacted) || re.MatchString(etag)
}

// redactedField names the first field of snap (in key order) that a
// document built from it would carry the [redacted] placeholder in, other
// than the fields set over it, or returns "". Only a target with a
// credential can have redacted anything.
func (t *TargetConfig) redactedField(snap, set map[string]any) string {
	if t.secretPattern() == nil {
		return ""
	}
	for _, k := range sortedKeys(snap) {
		if _, over := set[k]; over {
			continue
		}
		if strings.Contains(k, redacted) || holdsRedacted(snap[k]) {
			return k
		}
	}
	return ""
}

// holdsRedacted reports whether a decoded JSON value holds the placeholder.
func holdsRedacted(v any) bool {
	switch v := v.(type) {
	case string:
		return strings.Contains(v, redacted)
	case map[string]any:
		for k, e := range v {
			if strings.Contains(k, redacted) || holdsRedacted(e) {
				return true
			}
		}
	case []any:
		for _, e := range v {
			if holdsRedacted(e) {
				return true
			}
		}
	}
	return false
}

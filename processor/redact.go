package processor

import (
	"bytes"
	"encoding/json"
	"net/url"
	"strings"
)

// redacted replaces a credential wherever stagesync would store, log or
// show it.
const redacted = "[redacted]"

// secretForms are the spellings of the target's credential a remote may
// echo back: as sent, URL-escaped, and JSON-escaped. Values under 4 bytes
// are left alone: they would blank out ordinary text, and nobody's
// credential is that short.
func (t *TargetConfig) secretForms() []string {
	v := t.authValue
	if len(v) < 4 {
		return nil
	}
	forms := []string{v}
	add := func(f string) {
		if f != "" && !strings.Contains(f, redacted) {
			for _, have := range forms {
				if have == f {
					return
				}
			}
			forms = append(forms, f)
		}
	}
	add(url.QueryEscape(v))
	add(url.PathEscape(v))
	if b, err := json.Marshal(v); err == nil {
		add(string(b[1 : len(b)-1]))
	}
	return forms
}

// redact replaces the target's credential in s. Remote answers pass
// through it where they enter the process (send), so an error page that
// echoes the Authorization header never reaches attempts or change rows,
// snapshots, merges, logs or the status page.
func (t *TargetConfig) redact(s string) string {
	for _, f := range t.secretForms() {
		s = strings.ReplaceAll(s, f, redacted)
	}
	return s
}

// redactBytes is redact for a response body, before it is decoded: the
// replacement is plain text, so a JSON string that held the credential
// stays a valid JSON string.
func (t *TargetConfig) redactBytes(b []byte) []byte {
	for _, f := range t.secretForms() {
		if bytes.Contains(b, []byte(f)) {
			b = bytes.ReplaceAll(b, []byte(f), []byte(redacted))
		}
	}
	return b
}

// secretETag reports whether an ETag holds the target's credential, as
// sent or already redacted (an ETag read from a redacted body). Such an
// ETag is never stored or sent back in If-Match: the stored form would be
// the placeholder, which matches nothing, and the real one is a secret.
func (t *TargetConfig) secretETag(etag string) bool {
	forms := t.secretForms()
	if len(forms) == 0 || etag == "" {
		return false
	}
	if strings.Contains(etag, redacted) {
		return true
	}
	for _, f := range forms {
		if strings.Contains(etag, f) {
			return true
		}
	}
	return false
}

// redactedField names the first field of snap (in key order) that a
// document built from it would carry the [redacted] placeholder in, other
// than the fields set over it, or returns "". Only a target with a
// credential can have redacted anything.
func (t *TargetConfig) redactedField(snap, set map[string]any) string {
	if len(t.secretForms()) == 0 {
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

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

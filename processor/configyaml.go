package processor

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"
)

// The config's YAML errors name the key path and the line, and suggest the
// nearest known key, in the file's words rather than Go's: yaml's own
// messages name Go types ("field x not found in type processor.TargetConfig",
// "cannot unmarshal !!str into int"). The known keys come from the structs'
// yaml tags, so a key added to a struct is known here at once.

// checkYAML walks the document against Config's type and returns one error
// per unknown key or value of the wrong kind, in document order.
func checkYAML(doc *yaml.Node) []error {
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return nil // empty file: validation says what is missing
	}
	var errs []error
	checkNode(doc.Content[0], reflect.TypeFor[Config](), "", &errs)
	return errs
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

func checkNode(n *yaml.Node, t reflect.Type, path string, errs *[]error) {
	bad := func(n *yaml.Node, format string, args ...any) {
		key := path
		if key == "" {
			key = "(top level)"
		}
		*errs = append(*errs, fmt.Errorf("line %d: %s: %s", n.Line, key, fmt.Sprintf(format, args...)))
	}
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // an empty value keeps the default
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		if err := n.Decode(reflect.New(t).Interface()); err != nil {
			bad(n, "%s", strings.TrimPrefix(err.Error(), "yaml: "))
		}
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		checkNode(n, t.Elem(), path, errs)
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			bad(n, "must be a mapping of keys (key: value), got %s", describeNode(n))
			return
		}
		fields := yamlFields(t)
		seen := map[string]int{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Value == "<<" { // a merge key: its mapping holds keys of this struct
				checkNode(v, t, path, errs)
				continue
			}
			kp := joinPath(path, k.Value)
			if first, dup := seen[k.Value]; dup {
				*errs = append(*errs, fmt.Errorf("line %d: %s: given twice (first on line %d)", k.Line, kp, first))
				continue
			}
			seen[k.Value] = k.Line
			ft, ok := fields[k.Value]
			if !ok {
				*errs = append(*errs, fmt.Errorf("line %d: %s: unknown key%s", k.Line, kp, suggestKey(k.Value, fields)))
				continue
			}
			if ft.zeroIsDefault && isZeroScalar(v, ft.typ) {
				// An explicit 0 would silently turn into the default.
				*errs = append(*errs, fmt.Errorf("line %d: %s: must not be 0; leave the key out for the default", v.Line, kp))
				continue
			}
			if ft.zeroIsDefault && v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				*errs = append(*errs, fmt.Errorf("line %d: %s: must not be an empty list; leave the key out for the default", v.Line, kp))
				continue
			}
			checkNode(v, ft.typ, kp, errs)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			bad(n, "must be a mapping (name: value), got %s", describeNode(n))
			return
		}
		seen := map[string]int{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i]
			if first, dup := seen[k.Value]; dup {
				*errs = append(*errs, fmt.Errorf("line %d: %s: given twice (first on line %d)", k.Line, joinPath(path, k.Value), first))
				continue
			}
			seen[k.Value] = k.Line
			checkNode(n.Content[i+1], t.Elem(), joinPath(path, k.Value), errs)
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			bad(n, "must be a list (like [a, b]), got %s", describeNode(n))
			return
		}
		for i, c := range n.Content {
			checkNode(c, t.Elem(), path+"["+strconv.Itoa(i)+"]", errs)
		}
	case reflect.Interface:
	default:
		if n.Kind != yaml.ScalarNode {
			bad(n, "must be a single value, got %s", describeNode(n))
			return
		}
		if isIntKind(t.Kind()) && n.ShortTag() == "!!float" {
			// yaml.v3 would truncate 4.5 to 4 without a word.
			bad(n, "must be a whole number, got %q", n.Value)
			return
		}
		v := reflect.New(t)
		if err := n.Decode(v.Interface()); err != nil {
			switch {
			case isIntKind(t.Kind()):
				bad(n, "must be a whole number, got %q", n.Value)
			case t.Kind() == reflect.Float32 || t.Kind() == reflect.Float64:
				bad(n, "must be a number, got %q", n.Value)
			case t.Kind() == reflect.Bool:
				bad(n, "must be true or false, got %q", n.Value)
			default:
				bad(n, "cannot read %q here", n.Value)
			}
			return
		}
		if (t.Kind() == reflect.Float32 || t.Kind() == reflect.Float64) && !isFinite(v.Elem().Float()) {
			bad(n, "must be a finite number, got %q", n.Value)
		}
	}
}

func isIntKind(k reflect.Kind) bool {
	switch k {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}

func isFinite(f float64) bool { return !math.IsNaN(f) && !math.IsInf(f, 0) }

// isZeroScalar reports whether n is a scalar that decodes to t's zero
// value (0, 0.0, 0s).
func isZeroScalar(n *yaml.Node, t reflect.Type) bool {
	if n.Kind != yaml.ScalarNode || n.ShortTag() == "!!null" {
		return false
	}
	v := reflect.New(t)
	return n.Decode(v.Interface()) == nil && v.Elem().IsZero()
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return strconv.Quote(n.Value)
	}
}

var fieldCache sync.Map // reflect.Type → map[string]yamlField

// yamlField is one key of a struct: its type, and whether 0 stands for
// "use the default" (tag zero:"default"), so that an explicit 0 is refused.
type yamlField struct {
	typ           reflect.Type
	zeroIsDefault bool
}

// yamlFields maps a struct's YAML keys to their field types, inlined
// structs included; fields tagged "-" are not keys.
func yamlFields(t reflect.Type) map[string]yamlField {
	if m, ok := fieldCache.Load(t); ok {
		return m.(map[string]yamlField)
	}
	m := map[string]yamlField{}
	for f := range t.Fields() {
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if slices.Contains(strings.Split(opts, ","), "inline") {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				for k, v := range yamlFields(ft) {
					m[k] = v
				}
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name) // yaml.v3's default key
		}
		m[name] = yamlField{typ: f.Type, zeroIsDefault: f.Tag.Get("zero") == "default"}
	}
	fieldCache.Store(t, m)
	return m
}

// suggestKey proposes the known key nearest to an unknown one, or lists
// the known keys when none is near.
func suggestKey(key string, fields map[string]yamlField) string {
	known := make([]string, 0, len(fields))
	for k := range fields {
		known = append(known, k)
	}
	slices.Sort(known)
	best, bestD := "", 1<<30
	norm := func(s string) string { return strings.ReplaceAll(strings.ToLower(s), "-", "_") }
	for _, k := range known {
		d := editDistance(norm(key), k)
		if d < bestD {
			best, bestD = k, d
		}
	}
	if best != "" && (bestD <= 2 || bestD <= len(key)/3) {
		return " (did you mean " + best + "?)"
	}
	return " (known keys: " + strings.Join(known, ", ") + ")"
}

// editDistance is the optimal string alignment distance: insertions,
// deletions, substitutions and transpositions of adjacent bytes.
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}

// syntaxError restates a YAML parse error without the "yaml: " prefix; its
// line is the file's, since parsing is the first step.
func syntaxError(err error) error {
	return fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "yaml: "))
}

// syntaxErrorAt restates a YAML syntax error with the line where the
// document stops being valid. yaml.v3 names the line where the enclosing
// construct began (a bad indent on line 5 is reported on line 1), so the
// file's shortest prefix that fails the same way gives the line instead.
// Config files are small; past maxProbeLines yaml's own line is kept.
func syntaxErrorAt(raw []byte, err error) error {
	const maxProbeLines = 5000
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	m := typeErrorLine.FindStringSubmatch(msg)
	if m == nil {
		return errors.New(msg)
	}
	problem := strings.TrimPrefix(msg, m[0])
	lines := bytes.SplitAfter(raw, []byte("\n"))
	if len(lines) > maxProbeLines {
		return errors.New(msg)
	}
	for n := 1; n <= len(lines); n++ {
		var probe yaml.Node
		perr := yaml.Unmarshal(bytes.Join(lines[:n], nil), &probe)
		if perr == nil {
			continue
		}
		pm := strings.TrimPrefix(perr.Error(), "yaml: ")
		if pl := typeErrorLine.FindStringSubmatch(pm); pl != nil && strings.TrimPrefix(pm, pl[0]) == problem {
			return fmt.Errorf("line %d: %s", n, problem)
		}
	}
	return errors.New(msg)
}

var typeErrorLine = regexp.MustCompile(`^line (\d+): `)

// decodeError restates what yaml's decoder refused after checkYAML passed
// (it should not happen), without Go type names.
func decodeError(err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return syntaxError(err)
	}
	var errs []error
	for _, e := range te.Errors {
		if !strings.Contains(e, "unmarshal") {
			errs = append(errs, errors.New(e)) // yaml's own words, no Go type in them
			continue
		}
		if m := typeErrorLine.FindStringSubmatch(e); m != nil {
			errs = append(errs, fmt.Errorf("line %s: a value of the wrong kind", m[1]))
		} else {
			errs = append(errs, errors.New("a value of the wrong kind"))
		}
	}
	return errors.Join(errs...)
}

// withLines prefixes each "key.path: message" validation error with the
// line of that key in the document, when the path names one.
func withLines(doc *yaml.Node, err error) error {
	if err == nil || doc.Kind == 0 || len(doc.Content) == 0 {
		return err
	}
	var list []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		list = j.Unwrap()
	} else {
		list = []error{err}
	}
	out := make([]error, len(list))
	for i, e := range list {
		out[i] = e
		path, _, ok := strings.Cut(e.Error(), ": ")
		if !ok {
			continue
		}
		if line := lineOf(doc.Content[0], strings.Split(path, ".")); line > 0 {
			out[i] = fmt.Errorf("line %d: %w", line, e)
		}
	}
	return errors.Join(out...)
}

// lineOf returns the line of the key at path in a mapping, or 0.
func lineOf(n *yaml.Node, path []string) int {
	line := 0
	for _, key := range path {
		if n.Kind == yaml.AliasNode && n.Alias != nil {
			n = n.Alias
		}
		if n.Kind != yaml.MappingNode {
			return line
		}
		found := false
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == key {
				line, n, found = n.Content[i].Line, n.Content[i+1], true
				break
			}
		}
		if !found {
			return line
		}
	}
	return line
}

package processor

import (
	"errors"
	"fmt"
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
			checkNode(v, ft, kp, errs)
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
		if err := n.Decode(reflect.New(t).Interface()); err != nil {
			switch t.Kind() {
			case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
				reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
				bad(n, "must be a whole number, got %q", n.Value)
			case reflect.Float32, reflect.Float64:
				bad(n, "must be a number, got %q", n.Value)
			case reflect.Bool:
				bad(n, "must be true or false, got %q", n.Value)
			default:
				bad(n, "cannot read %q here", n.Value)
			}
		}
	}
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

var fieldCache sync.Map // reflect.Type → map[string]reflect.Type

// yamlFields maps a struct's YAML keys to their field types, inlined
// structs included; fields tagged "-" are not keys.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	if m, ok := fieldCache.Load(t); ok {
		return m.(map[string]reflect.Type)
	}
	m := map[string]reflect.Type{}
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
		m[name] = f.Type
	}
	fieldCache.Store(t, m)
	return m
}

// suggestKey proposes the known key nearest to an unknown one, or lists
// the known keys when none is near.
func suggestKey(key string, fields map[string]reflect.Type) string {
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

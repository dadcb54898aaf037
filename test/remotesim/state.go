package remotesim

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"time"
)

// Version is one state of a resource in its History.
type Version struct {
	// ETag is the ETag this version was served with; empty for a deletion.
	ETag string `json:"etag"`
	// Fields are the resource's fields (without "id"); nil for a deletion.
	Fields map[string]any `json:"fields"`
	// Written are the fields this write set, as sent: the PATCH body (a nil value removed
	// the field), the whole PUT body, the fields given to Put or Edit, or the one field
	// StartOtherUsers changed; nil for a deletion. Tests use it to check that a value was
	// written at most once and that no one's edit was reverted.
	Written map[string]any `json:"written"`
	// Writer is who made the change: "api" for HTTP requests, "seed" for Put and Delete,
	// the writer given to Edit ("other-user" for StartOtherUsers).
	Writer string `json:"writer"`
	// Method is the HTTP method or its equivalent: PATCH, PUT or DELETE.
	Method string `json:"method"`
	// At is when the version was written.
	At time.Time `json:"at"`
	// Deleted marks the removal of the resource.
	Deleted bool `json:"deleted"`
}

// resource is the current state of one item. Its fields map is never mutated after it is
// stored (every write stores a new map), so versions and readers may share it.
type resource struct {
	idx    int // position in Sim.ids
	fields map[string]any
	etag   string
	body   []byte // the GET body, encoded once per write
}

// Put creates or overwrites the resource id with fields (writer "seed") and returns its new
// ETag. Fields are stored as their JSON decoding, as if sent over HTTP, so numbers read
// back as float64; an "id" field is ignored because the id comes from the path. Put panics
// if fields cannot be encoded as JSON.
func (s *Sim) Put(id string, fields map[string]any) (etag string) {
	fields = normalize("Put", id, fields)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commitLocked(id, fields, fields, writerSeed, "PUT").ETag
}

// Get returns a copy of the current fields of resource id (without "id") and its ETag; ok is
// false if it does not exist.
func (s *Sim) Get(id string) (fields map[string]any, etag string, ok bool) {
	s.mu.Lock()
	res := s.resources[id]
	if res == nil {
		s.mu.Unlock()
		return nil, "", false
	}
	fields, etag = res.fields, res.etag
	s.mu.Unlock()
	// The stored map is immutable, so it is copied outside the lock.
	return deepCopyMap(fields), etag, true
}

// Edit is another user's change: it merges fields into resource id (a nil value removes the
// field), gives it a new ETag and records the version with writer. It returns the new ETag,
// or ok false if the resource does not exist. Edit panics if fields cannot be encoded as
// JSON.
func (s *Sim) Edit(id string, fields map[string]any, writer string) (etag string, ok bool) {
	fields = normalize("Edit", id, fields)
	s.mu.Lock()
	defer s.mu.Unlock()
	res := s.resources[id]
	if res == nil {
		return "", false
	}
	return s.commitLocked(id, merge(res.fields, fields), fields, writer, "PATCH").ETag, true
}

// Delete removes resource id, if it exists, recording a deleted version with writer "seed".
func (s *Sim) Delete(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.resources[id] != nil {
		s.deleteLocked(id, writerSeed)
	}
}

// IDs returns the ids of the existing resources, sorted.
func (s *Sim) IDs() []string {
	s.mu.Lock()
	ids := slices.Clone(s.ids)
	s.mu.Unlock()
	slices.Sort(ids)
	return ids
}

// History returns the versions of resource id in the order they were written, including
// deletions and versions from before a re-creation. Only the latest 10,000 versions per
// resource are kept.
func (s *Sim) History(id string) []Version {
	s.mu.Lock()
	versions := slices.Clone(s.history[id])
	s.mu.Unlock()
	for i := range versions {
		versions[i].Fields = deepCopyMap(versions[i].Fields)
		versions[i].Written = deepCopyMap(versions[i].Written)
	}
	return versions
}

// Reset clears resources, history, the request log, the idempotency cache and Stats. ETags
// issued after a Reset still never repeat earlier ones, nor do $batch numbers. Faults,
// Hooks and Misbehavior are kept.
func (s *Sim) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.resources)
	s.ids = nil
	clear(s.history)
	s.stats = Stats{}
	s.log.reset()
	s.idem.reset()
	// inflight is kept: requests in progress will still leave it.
}

// commitLocked stores fields as the new state of id, issues its ETag and records the
// version, which it returns; written is what the write itself set. Neither map may be
// mutated afterwards.
func (s *Sim) commitLocked(id string, fields, written map[string]any, writer, method string) Version {
	body := encodeItem(id, fields)
	s.etagSeq++
	etag := s.makeETag(s.etagSeq, body, s.mb.InvalidUTF8ETags && s.mb.appliesTo(id))
	res := s.resources[id]
	if res == nil {
		res = &resource{idx: len(s.ids)}
		s.resources[id] = res
		s.ids = append(s.ids, id)
	}
	res.fields, res.etag, res.body = fields, etag, body
	v := Version{ETag: etag, Fields: fields, Written: written, Writer: writer, Method: method, At: time.Now()}
	s.recordLocked(id, v)
	return v
}

// deleteLocked removes the existing resource id, records the deletion and returns it.
func (s *Sim) deleteLocked(id, writer string) Version {
	res := s.resources[id]
	last := len(s.ids) - 1
	moved := s.ids[last]
	s.ids[res.idx] = moved
	s.resources[moved].idx = res.idx
	s.ids = s.ids[:last]
	delete(s.resources, id)
	v := Version{Writer: writer, Method: "DELETE", At: time.Now(), Deleted: true}
	s.recordLocked(id, v)
	return v
}

func (s *Sim) recordLocked(id string, v Version) {
	h := s.history[id]
	if len(h) >= maxHistoryPerResource {
		h = h[1:]
	}
	s.history[id] = append(h, v)
}

// makeETag builds "<seq>-<hash of body>": the counter makes ETags unique forever, the hash
// makes them look like a real API's. invalidUTF8 appends the bytes 0xFF 0xFE inside the
// quotes (Misbehavior.InvalidUTF8ETags).
func (s *Sim) makeETag(seq uint64, body []byte, invalidUTF8 bool) string {
	h := fnv.New32a()
	_, _ = h.Write(body) // hash.Hash never returns an error
	b := make([]byte, 0, 32)
	if s.opts.WeakETags {
		b = append(b, 'W', '/')
	}
	b = append(b, '"')
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, '-')
	b = fmt.Appendf(b, "%08x", h.Sum32())
	if invalidUTF8 {
		b = append(b, 0xff, 0xfe)
	}
	b = append(b, '"')
	return string(b)
}

// encodeItem returns the GET body of a resource: its fields plus "id".
func encodeItem(id string, fields map[string]any) []byte {
	m := make(map[string]any, len(fields)+1)
	for k, v := range fields {
		m[k] = v
	}
	m["id"] = id
	body, err := json.Marshal(m)
	if err != nil {
		// Fields come from JSON decoding or normalize, so they always encode.
		panic(fmt.Sprintf("remotesim: encode resource %q: %v", id, err))
	}
	return body
}

// merge returns a new map: base with patch applied, a nil value removing its field.
func merge(base, patch map[string]any) map[string]any {
	out := make(map[string]any, len(base)+len(patch))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range patch {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

// normalize returns fields as an API client would send them: a deep copy through JSON,
// without "id".
func normalize(op, id string, fields map[string]any) map[string]any {
	b, err := json.Marshal(fields)
	if err != nil {
		panic(fmt.Sprintf("remotesim: %s %q: fields are not JSON: %v", op, id, err))
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		panic(fmt.Sprintf("remotesim: %s %q: fields do not round-trip through JSON: %v", op, id, err))
	}
	if out == nil {
		out = map[string]any{}
	}
	delete(out, "id")
	return out
}

// deepCopyMap copies a JSON-decoded object so callers may mutate it freely.
func deepCopyMap(m map[string]any) map[string]any {
	if m == nil {
		return nil
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = deepCopyValue(v)
	}
	return out
}

func deepCopyValue(v any) any {
	switch v := v.(type) {
	case map[string]any:
		return deepCopyMap(v)
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = deepCopyValue(e)
		}
		return out
	default:
		return v
	}
}

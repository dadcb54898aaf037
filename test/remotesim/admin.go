package remotesim

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// stateEntry is one resource in GET /_sim/state.
type stateEntry struct {
	ETag   string         `json:"etag"`
	Fields map[string]any `json:"fields"`
}

// serveAdmin serves the inspection endpoints, which bypass latency, faults, the request
// log and Stats:
//
//	GET /_sim/state            {"<id>": {"etag": "…", "fields": {…}}, …}
//	GET /_sim/requests?limit=N the request log (the latest N if limit is given)
//	GET /_sim/stats            Stats
//	GET /_sim/history?id=ID    the versions of one resource
func (s *Sim) serveAdmin(w http.ResponseWriter, r *http.Request, path string) {
	if r.Method != http.MethodGet {
		s.write(w, &response{status: http.StatusMethodNotAllowed, body: bodyMethodNotAllowed, allow: http.MethodGet})
		return
	}
	var v any
	switch path {
	case adminPrefix + "state":
		s.mu.Lock()
		state := make(map[string]stateEntry, len(s.resources))
		for id, res := range s.resources {
			state[id] = stateEntry{ETag: res.etag, Fields: res.fields} // immutable maps
		}
		s.mu.Unlock()
		v = state
	case adminPrefix + "requests":
		reqs := s.Requests()
		if l := r.URL.Query().Get("limit"); l != "" {
			n, err := strconv.Atoi(l)
			if err != nil || n < 0 {
				s.write(w, &response{status: http.StatusBadRequest, body: errorBody("limit must be a non-negative integer")})
				return
			}
			reqs = reqs[len(reqs)-min(n, len(reqs)):]
		}
		v = reqs
	case adminPrefix + "stats":
		v = s.Stats()
	case adminPrefix + "history":
		q := r.URL.Query()
		if !q.Has("id") {
			s.write(w, &response{status: http.StatusBadRequest, body: errorBody("id required")})
			return
		}
		h := s.History(q.Get("id"))
		if h == nil {
			h = []Version{}
		}
		v = h
	default:
		s.write(w, &response{status: http.StatusNotFound, body: bodyNotFound})
		return
	}
	body, err := json.Marshal(v)
	if err != nil {
		s.write(w, &response{status: http.StatusInternalServerError, body: errorBody(err.Error())})
		return
	}
	s.write(w, &response{status: http.StatusOK, body: body})
}

package remotesim

// idempotencyCache maps method+path+Idempotency-Key to the completed 2xx response, keeping
// the latest max keys.
type idempotencyCache struct {
	max     int
	entries map[string]response
	order   []string // ring of keys in insertion order, for eviction
	next    int
}

func (c *idempotencyCache) get(key string) (response, bool) {
	resp, ok := c.entries[key]
	return resp, ok
}

// put stores resp under key. Bodies are never mutated after they are built, so the cached
// slice can be shared.
func (c *idempotencyCache) put(key string, resp response) {
	if c.entries == nil {
		c.entries = make(map[string]response)
	}
	if _, ok := c.entries[key]; ok {
		// A concurrent duplicate also succeeded; the first answer stays the one replayed.
		return
	}
	c.entries[key] = resp
	if len(c.order) < c.max {
		c.order = append(c.order, key)
		return
	}
	delete(c.entries, c.order[c.next])
	c.order[c.next] = key
	c.next = (c.next + 1) % c.max
}

func (c *idempotencyCache) reset() {
	c.entries = nil
	c.order = nil
	c.next = 0
}

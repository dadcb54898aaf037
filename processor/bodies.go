package processor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"golang.org/x/sync/semaphore"
)

// bodyBudget bounds the bytes of response bodies being read and decoded at
// once across the whole process. The per-request cap (maxResponseBody)
// alone lets concurrency × cap bytes in at once, plus the copies that
// reading and decoding make: eight concurrent 100 MB answers took a
// process to 299 MB. Readers wait for their share instead.
//
// A reader never holds one reservation while waiting for another, so
// readers cannot block each other for good: a body of known length
// reserves it whole; one of unknown length reserves a first chunk and,
// only if more follows, gives it back and waits for the full cap.
// semaphore.Weighted serves waiters in order, so a large body is not
// starved by small ones.
type bodyBudget struct {
	sem   *semaphore.Weighted
	total int64

	mu   sync.Mutex
	held int64
	peak int64
}

// defaultBodyBudget is the whole process's allowance for response bodies
// in flight: room for 4 bodies at the per-request cap, or hundreds of
// ordinary ones at once.
const defaultBodyBudget = 4 * maxResponseBody

// processBodies is the budget every remote of the process shares.
var processBodies = newBodyBudget(defaultBodyBudget)

// bodyChunk is what a body of unknown length reserves first; most answers
// fit in it.
const bodyChunk = 64 << 10

func newBodyBudget(total int64) *bodyBudget {
	return &bodyBudget{sem: semaphore.NewWeighted(total), total: total}
}

// read reads a response body within the budget: whole when it is at most
// limit bytes (contentLength -1 when unknown), else only a prefix of
// bodyChunk bytes with truncated set — an answer over the cap is never
// decoded, so nothing more of it is worth holding. release must be called
// once the bytes (and what was decoded from them) are no longer needed in
// full.
func (b *bodyBudget) read(ctx context.Context, body io.Reader, contentLength, limit int64) (raw []byte, truncated bool, release func(), err error) {
	limit = min(limit, b.total)
	first := min(int64(bodyChunk), limit)
	if contentLength > limit {
		if err := b.acquire(ctx, first); err != nil {
			return nil, true, func() {}, err
		}
		raw, err = readUpTo(body, first, first)
		return raw, true, b.releaser(first), err
	}
	if contentLength >= 0 {
		if err := b.acquire(ctx, contentLength); err != nil {
			return nil, false, func() {}, err
		}
		raw, err = readUpTo(body, contentLength, contentLength)
		return raw, false, b.releaser(contentLength), err
	}
	if err := b.acquire(ctx, first); err != nil {
		return nil, false, func() {}, err
	}
	raw, err = readUpTo(body, first+1, first+1)
	if err != nil || int64(len(raw)) <= first {
		return raw, false, b.releaser(first), err
	}
	if first == limit {
		return raw[:first], true, b.releaser(first), nil
	}
	// More than a chunk: wait for the whole cap without holding the chunk.
	b.releaser(first)()
	if err := b.acquire(ctx, limit); err != nil {
		return nil, false, func() {}, err
	}
	rest, err := readUpTo(body, limit+1-int64(len(raw)), limit+1)
	raw = append(raw, rest...)
	if int64(len(raw)) > limit {
		return raw[:first], true, b.releaser(limit), err
	}
	return raw, false, b.releaser(limit), err
}

func (b *bodyBudget) acquire(ctx context.Context, n int64) error {
	if n <= 0 {
		return nil
	}
	if err := b.sem.Acquire(ctx, n); err != nil {
		return fmt.Errorf("wait for memory to read the response body: %w", err)
	}
	b.mu.Lock()
	b.held += n
	b.peak = max(b.peak, b.held)
	b.mu.Unlock()
	return nil
}

// releaser returns the release of an n-byte reservation, safe to call
// more than once.
func (b *bodyBudget) releaser(n int64) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			if n <= 0 {
				return
			}
			b.mu.Lock()
			b.held -= n
			b.mu.Unlock()
			b.sem.Release(n)
		})
	}
}

// peakHeld is the most bytes reserved at once since the start.
func (b *bodyBudget) peakHeld() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peak
}

// readUpTo reads until EOF or n bytes, whichever comes first, into a
// buffer sized for expect bytes (so a body of known length is read without
// the copies of a growing buffer).
func readUpTo(r io.Reader, n, expect int64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(max(min(expect, n), 512)))
	_, err := io.Copy(&buf, io.LimitReader(r, n))
	if err != nil && !errors.Is(err, io.EOF) {
		return buf.Bytes(), err
	}
	return buf.Bytes(), nil
}

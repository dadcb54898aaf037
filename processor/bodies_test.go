package processor

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Eight readers of bodies at the per-request cap share a budget of two
// caps: all of them finish, and the bytes reserved at once never exceed the
// budget.
func TestBodyBudgetBoundsBytesInFlightAcrossReaders(t *testing.T) {
	t.Parallel()
	const limit = 1 << 20
	b := newBodyBudget(2 * limit)
	body := bytes.Repeat([]byte("x"), limit) // bodies just within the cap
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			cl := int64(limit - i)
			if i%2 == 0 {
				cl = -1 // unknown length: chunk first, then the cap
			}
			raw, truncated, release, err := b.read(t.Context(), bytes.NewReader(body[:limit-i]), cl, limit)
			defer release()
			if err != nil {
				t.Errorf("reader %d: %v", i, err)
				return
			}
			if truncated || len(raw) != limit-i {
				t.Errorf("reader %d read %d bytes (truncated %v); want all %d", i, len(raw), truncated, limit-i)
			}
			time.Sleep(5 * time.Millisecond) // hold it while decoding
		})
	}
	wg.Wait()
	require.LessOrEqual(t, b.peakHeld(), int64(2*limit), "peak reserved: got %d; want ≤ %d", b.peakHeld(), 2*limit)
	require.Equal(t, int64(0), b.held, "reserved after every release: got %d; want 0", b.held)
}

func TestBodyBudgetReadsSmallBodiesWhole(t *testing.T) {
	t.Parallel()
	b := newBodyBudget(1 << 20)
	for _, cl := range []int64{-1, 11} {
		raw, truncated, release, err := b.read(t.Context(), strings.NewReader(`{"ok":true}`), cl, 8<<20)
		require.NoError(t, err)
		require.False(t, truncated)
		require.Equal(t, `{"ok":true}`, string(raw), "content length %d", cl)
		release()
		release() // twice is harmless
	}
	require.Equal(t, int64(0), b.held)
}

// A reader waiting for memory gives up when its request's context ends.
func TestBodyBudgetWaitEndsWithTheRequest(t *testing.T) {
	t.Parallel()
	b := newBodyBudget(100)
	_, _, hold, err := b.read(t.Context(), strings.NewReader(strings.Repeat("a", 100)), 100, 100)
	require.NoError(t, err)
	defer hold()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	_, _, release, err := b.read(ctx, io.MultiReader(strings.NewReader("b")), 1, 100)
	release()
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

// A body over the cap is cut to a prefix, known length or not, and says so:
// nothing beyond the prefix is held.
func TestBodyBudgetCutsAnswersOverTheCap(t *testing.T) {
	t.Parallel()
	b := newBodyBudget(4 << 20)
	big := bytes.Repeat([]byte("y"), 3<<20)
	for _, cl := range []int64{int64(len(big)), -1} {
		raw, truncated, release, err := b.read(t.Context(), bytes.NewReader(big), cl, 1<<20)
		release()
		require.NoError(t, err)
		require.True(t, truncated, "content length %d: truncated got false; want true", cl)
		require.Len(t, raw, bodyChunk, "content length %d: prefix length", cl)
	}
}

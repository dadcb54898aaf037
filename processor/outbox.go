package processor

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stagesync/stagesync/db"
)

// outbox writes a durable intent (a stagesync.outbox row) for every request
// of a job before it leaves, so that after any crash the next worker of the
// resource knows the remote may have seen it.
//
// It writes through the job's own connection, the session that holds the
// job's resource locks: if that session has ended (a terminated
// connection, a failover), the lock is gone and another job may be working
// the resource, and the write fails, so the request is never sent.
//
// Rows of the job's concurrent requests are group committed: one caller at
// a time writes every row queued so far in one statement while the others
// wait, and the next queued caller takes over for the rows that arrived
// meanwhile. No timer holds a row back: when requests are rare each
// commits alone at once, under load the commit in progress is the batching
// window.
type outbox struct {
	conn db.DBTX
	q    *db.Queries

	mu      sync.Mutex
	queue   []*intent
	writing bool
}

// maxOutboxBatch bounds the rows of one statement.
const maxOutboxBatch = 256

// outboxWriteTimeout bounds one group commit. A request whose intent can't
// be written within it is not sent.
const outboxWriteTimeout = 10 * time.Second

func newOutbox(conn db.DBTX) *outbox {
	return &outbox{conn: conn, q: db.New()}
}

// intent is one queued row and, once written, its fate.
type intent struct {
	target string
	req    request
	// signal is closed when the row was written (or refused), or receives
	// once when this caller is to write the queue.
	done chan struct{}
	lead chan struct{}
	id   int64
	err  error
}

// add makes req durable and returns its row id. An error means the request
// must not be sent. A nil outbox writes nothing.
func (o *outbox) add(ctx context.Context, target string, req request) (int64, error) {
	if o == nil {
		return 0, nil
	}
	in := &intent{target: target, req: req, done: make(chan struct{}), lead: make(chan struct{}, 1)}
	o.mu.Lock()
	o.queue = append(o.queue, in)
	if o.writing {
		o.mu.Unlock()
		// Wait for a writer to commit this row, or to hand over the
		// writing. Not for ctx: a row being committed must learn its fate,
		// or a request never sent would look in doubt.
		select {
		case <-in.done:
			return in.id, in.err
		case <-in.lead:
		}
		o.mu.Lock()
	}
	o.writing = true
	n := min(len(o.queue), maxOutboxBatch)
	batch := o.queue[:n:n]
	o.queue = o.queue[n:]
	o.mu.Unlock()

	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), outboxWriteTimeout)
	o.write(wctx, batch)
	cancel()

	o.mu.Lock()
	if len(o.queue) > 0 {
		o.queue[0].lead <- struct{}{}
	} else {
		o.writing = false
	}
	o.mu.Unlock()
	for _, b := range batch {
		if b != in {
			close(b.done)
		}
	}
	return in.id, in.err
}

// write inserts a batch, one statement per target; if a statement fails,
// its rows one by one, so a row PostgreSQL refuses costs only its own
// request.
func (o *outbox) write(ctx context.Context, batch []*intent) {
	byTarget := map[string][]*intent{}
	var targets []string
	for _, b := range batch {
		if _, ok := byTarget[b.target]; !ok {
			targets = append(targets, b.target)
		}
		byTarget[b.target] = append(byTarget[b.target], b)
	}
	for _, t := range targets {
		group := byTarget[t]
		err := o.insert(ctx, t, group)
		if err == nil {
			continue
		}
		if len(group) == 1 {
			group[0].err = err
			continue
		}
		for _, b := range group {
			if err := o.insert(ctx, t, []*intent{b}); err != nil {
				b.err = err
			}
		}
	}
}

// insert writes the rows of one target in one statement and sets each
// intent's id.
func (o *outbox) insert(ctx context.Context, target string, group []*intent) error {
	p := db.OutboxInsertParams{Target: target}
	for i, b := range group {
		r := b.req
		text, raw := storedETag(r.ifMatch)
		body := ""
		if r.body != nil {
			enc, err := json.Marshal(pgSafe(r.body))
			if err != nil {
				return fmt.Errorf("encode the body of %s %s for the outbox: %w", r.method, r.url, err)
			}
			body = string(enc)
		}
		p.Ords = append(p.Ords, int32(i))
		p.ResourceIDs = append(p.ResourceIDs, r.resourceID)
		p.ChangeIDs = append(p.ChangeIDs, int64Array(r.changeIDs))
		p.Methods = append(p.Methods, r.method)
		p.URLs = append(p.URLs, r.url)
		p.IfMatches = append(p.IfMatches, text)
		p.IfMatchRaws = append(p.IfMatchRaws, raw)
		// A conditional GET's If-None-Match is a stored ETag, whose bytes
		// may not be UTF-8; its readable form is enough here (a GET is
		// never sent again from its outbox row).
		inm, _ := storedETag(r.ifNoneMatch)
		p.IfNoneMatches = append(p.IfNoneMatches, inm)
		p.IdempotencyKeys = append(p.IdempotencyKeys, r.key)
		p.Bodies = append(p.Bodies, body)
		p.JobIDs = append(p.JobIDs, r.jobID)
	}
	rows, err := o.q.OutboxInsert(ctx, o.conn, p)
	if err != nil {
		return fmt.Errorf("write the outbox through the job's session (its resource locks may be lost): %w", err)
	}
	for _, r := range rows {
		group[r.Ord].id = r.ID
	}
	return nil
}

// int64Array is a PostgreSQL array literal of ids.
func int64Array(ids []int64) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(id, 10))
	}
	b.WriteByte('}')
	return b.String()
}

// leftover is an outbox row found when its resource was locked: a request
// that may have reached the remote, whose answer was never recorded.
type leftover struct {
	id      int64
	attempt attemptRecord
	write   *inDoubtWrite // nil for a GET
}

// leftoverFrom reads an outbox row.
func leftoverFrom(target string, r db.OutboxLeftoversRow) leftover {
	ifMatch := deref(r.IfMatch)
	if r.IfMatchRaw != nil {
		ifMatch = string(r.IfMatchRaw)
	}
	lo := leftover{id: r.ID, attempt: attemptRecord{
		resourceID: r.ResourceID, changeIDs: r.ChangeIDs, method: r.Method, url: r.URL, ifMatch: ifMatch,
		ifNoneMatch: deref(r.IfNoneMatch), outcome: outcomeUnknown, at: r.CreatedAt,
		errText: "the answer was never recorded (the process or its database session ended first); the request may have been applied",
	}}
	if r.Method != "GET" {
		w := &inDoubtWrite{
			Method: r.Method, URL: r.URL, IfNoneMatch: deref(r.IfNoneMatch), IdempotencyKey: deref(r.IdempotencyKey),
			ChangeIDs: r.ChangeIDs, At: r.CreatedAt,
		}
		w.setIfMatch(ifMatch)
		if len(r.Body) > 0 {
			if body, err := decodeObject(r.Body); err == nil {
				w.Body = body
			}
		}
		lo.write = w
	}
	return lo
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

package processor

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/stagesync/stagesync/db"
)

// liveness makes this process's life visible to the others through
// PostgreSQL: a stagesync.processes row, and the session-level advisory
// lock lock_key held on a dedicated connection for as long as the process
// lives. When the process dies, however it dies, PostgreSQL ends its
// sessions and releases the lock; every other process checks every
// rescueEvery (stagesync.rescue_dead_processes) and hands the dead one's
// running jobs back at once. No timer decides liveness, so a live job,
// however slow, is never taken from its process.
type liveness struct {
	clientID string
	lockKey  int64
	hostname string
	pid      int
	targets  []string

	q      *db.Queries
	config *pgx.ConnConfig
	logger *slog.Logger

	// conn is the locked connection; only start, hold and stop use it,
	// one after the other.
	conn *pgx.Conn
}

// Liveness timing. A dead process is noticed within rescueEvery of
// PostgreSQL ending its session (at once for kill -9 on a live host; see
// keepalive below for a host that vanishes), so its work resumes within
// about a second plus the time to fetch the handed-back jobs.
const (
	rescueEvery    = time.Second
	heartbeatEvery = 2 * time.Second
	// forgetAfter is how long a dead process's row stays after its last
	// heartbeat: long enough for a job fetch it sent just before dying
	// (which can commit after its lock is gone) to be seen and handed back.
	forgetAfter = 10 * time.Second
)

// newLiveness picks the River client ID and lock key of this process.
func newLiveness(cfg *pgx.ConnConfig, targets []string, logger *slog.Logger) (*liveness, error) {
	host, _ := os.Hostname()
	if host == "" {
		host = "unknown-host"
	}
	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		return nil, fmt.Errorf("pick a client id: %w", err)
	}
	// River's client ID: unique per process, at most 100 characters.
	h := strings.NewReplacer(".", "_", " ", "_").Replace(host)
	if len(h) > 60 {
		h = h[:60]
	}
	l := &liveness{
		clientID: fmt.Sprintf("%s_%d_%s", h, os.Getpid(), hex.EncodeToString(suffix)),
		hostname: host,
		pid:      os.Getpid(),
		targets:  targets,
		q:        db.New(),
		config:   cfg,
		logger:   logger,
	}
	var err error
	if l.lockKey, err = randomLockKey(); err != nil {
		return nil, err
	}
	return l, nil
}

// randomLockKey is a positive 63-bit key: collisions with another
// process's key or a resource lock's hash are as unlikely as they get, and
// a collision only makes start take another key.
func randomLockKey() (int64, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return 0, fmt.Errorf("pick a lock key: %w", err)
	}
	return int64(binary.BigEndian.Uint64(b[:]) >> 1), nil
}

// start connects, takes the lock and registers the process, in that order:
// a row no other process can see without its lock is never mistaken for a
// dead process's.
func (l *liveness) start(ctx context.Context) error {
	conn, err := l.connect(ctx)
	if err != nil {
		return err
	}
	l.conn = conn
	return nil
}

func (l *liveness) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg := l.config.Copy()
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	// Operators see whose connection this is in pg_stat_activity.
	cfg.RuntimeParams["application_name"] = truncate("stagesync liveness "+l.clientID, 63)
	// Server-side keepalives for this session: if the host vanishes
	// (power, network) rather than the process dying on a live host,
	// PostgreSQL notices within about 11s instead of the kernel's default
	// two hours, and releases the lock.
	cfg.RuntimeParams["tcp_keepalives_idle"] = "5"
	cfg.RuntimeParams["tcp_keepalives_interval"] = "2"
	cfg.RuntimeParams["tcp_keepalives_count"] = "3"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect the liveness connection: %w", err)
	}
	for try := 0; ; try++ {
		locked, err := l.q.ProcessLockTry(ctx, conn, l.lockKey)
		if err != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("take the liveness lock: %w", err)
		}
		if locked {
			break
		}
		if try == 3 {
			_ = conn.Close(context.WithoutCancel(ctx))
			return nil, errors.New("take the liveness lock: every key tried is held by another session")
		}
		if l.lockKey, err = randomLockKey(); err != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
			return nil, err
		}
	}
	if err := l.register(ctx, conn); err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	return conn, nil
}

func (l *liveness) register(ctx context.Context, conn *pgx.Conn) error {
	err := l.q.ProcessRegister(ctx, conn, db.ProcessRegisterParams{
		ClientID: l.clientID, LockKey: l.lockKey, Hostname: l.hostname, Pid: int32(l.pid), Targets: l.targets,
	})
	if err != nil {
		return fmt.Errorf("register process %s: %w", l.clientID, err)
	}
	return nil
}

// hold keeps the lock until ctx ends, with a heartbeat every
// heartbeatEvery that also proves the connection alive.
//
// If the connection drops, PostgreSQL releases the lock, and until it is
// re-taken the other processes count this one as dead: they hand its
// running jobs back (another process may start them while they still run
// here; the per-resource advisory locks its workers hold on their own
// connections keep the two from working one resource at once, and if
// those connections dropped too, the resource's next worker resolves any
// write in doubt), and forget its row after forgetAfter. hold reconnects
// with backoff, re-takes the lock and registers again; nothing else in the
// process stops meanwhile.
func (l *liveness) hold(ctx context.Context) {
	tick := time.NewTicker(heartbeatEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if l.conn != nil {
			n, err := l.q.ProcessHeartbeat(ctx, l.conn, db.ProcessHeartbeatParams{ClientID: l.clientID, LockKey: l.lockKey})
			switch {
			case err == nil && n == 1:
				continue
			case err == nil:
				// Forgotten by another process while our connection was
				// briefly gone; the lock is ours again, the row is not.
				if err = l.register(ctx, l.conn); err == nil {
					l.logger.WarnContext(ctx, "process row was forgotten by another process; registered again", "client_id", l.clientID)
					continue
				}
			}
			if ctx.Err() != nil {
				return
			}
			l.logger.WarnContext(ctx, "liveness connection lost; other processes count this one as dead until it is back", "client_id", l.clientID, "error", err)
			_ = l.conn.Close(context.WithoutCancel(ctx))
			l.conn = nil
		}
		l.reconnect(ctx)
	}
}

// reconnect retries until the lock is held again or ctx ends.
func (l *liveness) reconnect(ctx context.Context) {
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		conn, err := l.connect(ctx)
		if err == nil {
			l.conn = conn
			l.logger.InfoContext(ctx, "liveness lock taken again", "client_id", l.clientID)
			return
		}
		l.logger.DebugContext(ctx, "liveness reconnect failed", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(delay*2, 5*time.Second)
	}
}

// stop removes the process's row (its target_health rows go with it) and
// releases the lock. Called after River has stopped: jobs finishing their
// grace period still belong to a live process.
func (l *liveness) stop(ctx context.Context) {
	if l.conn == nil {
		return
	}
	if err := l.q.ProcessUnregister(ctx, l.conn, l.clientID); err != nil {
		l.logger.WarnContext(ctx, "unregister process failed; another process will forget it", "error", err)
	}
	if err := l.q.ProcessUnlock(ctx, l.conn, l.lockKey); err != nil {
		l.logger.DebugContext(ctx, "release liveness lock failed; closing the connection releases it", "error", err)
	}
	_ = l.conn.Close(ctx)
	l.conn = nil
}

// rescueDead hands back the running jobs of processes that died.
func (p *Processor) rescueDead(ctx context.Context) (dead bool, err error) {
	rows, err := p.q.ProcessesRescueDead(ctx, p.pool, db.ProcessesRescueDeadParams{
		Self: p.live.clientID, ForgetAfterSeconds: forgetAfter.Seconds(),
	})
	if err != nil {
		return false, fmt.Errorf("rescue jobs of dead processes: %w", err)
	}
	for _, r := range rows {
		if r.Jobs > 0 {
			p.metrics.observeRescued(int(r.Jobs))
			p.logger.WarnContext(ctx, "a process died; its running jobs were handed back", "dead_client_id", r.ClientID, "jobs", r.Jobs)
		}
		if r.Forgotten {
			p.logger.InfoContext(ctx, "dead process forgotten", "dead_client_id", r.ClientID)
		}
	}
	return len(rows) > 0, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

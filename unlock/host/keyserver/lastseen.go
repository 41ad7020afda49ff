package keyserver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// DefaultLastSeenInterval is how often LastSeen writes what it gathered.
const DefaultLastSeenInterval = 10 * time.Second

// LastSeen records when each host last got its keys, and from where,
// without a store write per request: a key request only updates a map
// in memory; Flush (every interval, from Run) writes every host seen
// since the last flush in one store.UpdateEach. A fleet booting at once
// then costs one write per interval (bbolt) or per host per interval
// (etcd), not one per request, and key serving keeps the throughput the
// bench measures.
type LastSeen struct {
	st  store.Store
	log ulog.Logger

	mu      sync.Mutex
	pending map[string]seen
}

type seen struct {
	at     time.Time
	source string
}

// NewLastSeen returns a recorder writing to st; failures go to log.
func NewLastSeen(st store.Store, log ulog.Logger) *LastSeen {
	return &LastSeen{st: st, log: log, pending: map[string]seen{}}
}

// Observe is an audit sink: a request answered with keys marks its
// host seen at the request's time from its remote address.
func (l *LastSeen) Observe(ev AuditEvent) {
	if ev.Outcome != OutcomeOK || ev.Host == "" {
		return
	}
	s := seen{at: ev.Time, source: addrOnly(ev.Remote)}
	l.mu.Lock()
	if cur, ok := l.pending[ev.Host]; !ok || s.at.After(cur.at) {
		l.pending[ev.Host] = s
	}
	l.mu.Unlock()
}

// Pending is how many hosts wait for the next flush.
func (l *LastSeen) Pending() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.pending)
}

// addrOnly drops the port of "ip:port": the source port changes with
// every connection and tells an operator nothing.
func addrOnly(remote string) string {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr().Unmap().String()
	}
	return remote
}

var errNotNewer = errors.New("recorded last-seen is newer")

// Flush writes every pending host in one store.UpdateEach (one
// transaction for bbolt). A host whose record already says it was seen
// later (another replica flushed first) is left alone; a host deleted
// meanwhile is dropped. If the write fails, the batch is kept for the
// next flush.
func (l *LastSeen) Flush(ctx context.Context) error {
	l.mu.Lock()
	batch := l.pending
	l.pending = make(map[string]seen, len(batch))
	l.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	ids := make([]string, 0, len(batch))
	for id := range batch {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	err := store.UpdateEach(ctx, l.st, ids, func(h *store.Host) error {
		s, ok := batch[h.ID]
		if !ok || !h.LastSeen.Before(s.at) {
			return errNotNewer
		}
		h.LastSeen, h.LastSource = s.at.UTC(), s.source
		return nil
	})
	if err == nil {
		return nil
	}
	l.mu.Lock()
	for id, s := range batch {
		if cur, ok := l.pending[id]; !ok || s.at.After(cur.at) {
			l.pending[id] = s
		}
	}
	l.mu.Unlock()
	return fmt.Errorf("last-seen of %d host(s): %w", len(batch), err)
}

// Run flushes every interval until ctx is done, then once more (bounded
// by final) so a clean stop loses nothing.
func (l *LastSeen) Run(ctx context.Context, interval, final time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			fctx, cancel := context.WithTimeout(ctx, interval)
			if err := l.Flush(fctx); err != nil {
				l.log.Printf("keyserver: %v (kept for the next flush)", err)
			}
			cancel()
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), final)
			if err := l.Flush(fctx); err != nil {
				l.log.Printf("keyserver: final flush: %v", err)
			}
			cancel()
			return
		}
	}
}

package keyserver

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
)

// Source is the unit the server charges an unauthenticated client by: an
// IPv4 address, or the /64 of an IPv6 address (one end site's subnet; a
// single machine there can pick any address in it).
type Source = netip.Prefix

// SourceOf returns the source of a remote address ("ip:port" or a bare
// IP). An unparsable address maps to the zero Source, which is then one
// shared source: it can only make things stricter.
func SourceOf(addr string) Source {
	ap, err := netip.ParseAddrPort(addr)
	var a netip.Addr
	if err == nil {
		a = ap.Addr()
	} else if a, err = netip.ParseAddr(addr); err != nil {
		return Source{}
	}
	a = a.Unmap().WithZone("")
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// SourceLimits bound what one source may hold of the listener.
type SourceLimits struct {
	// MaxConns is how many connections one source may have open at
	// once (<= 0: no limit). Without it one client holding idle or slow
	// connections would take every slot of the global cap.
	MaxConns int
	// Conns is the rate of new connections per source: each one costs a
	// handshake (a signature) before any request is seen. Off when
	// Conns.PerSecond <= 0.
	Conns Limit
}

// Default per-source connection limits: far above what one host needs (one
// connection per attempt), low enough that one source holds a small part
// of DefaultMaxConns and pays for its own handshakes. Raise them when
// many hosts reach the server through one NAT address.
var DefaultSourceLimits = SourceLimits{MaxConns: 32, Conns: Limit{PerSecond: 50, Burst: 100}}

// SourceListener returns ln refusing, right after accept and before any
// TLS, a connection whose source already has l.MaxConns open or has used
// its l.Conns rate. Refusals are counted and reported to log at most once
// every refusedLogEvery.
func SourceListener(ln net.Listener, l SourceLimits, log ulog.Logger) net.Listener {
	if l.MaxConns <= 0 && !l.Conns.on() {
		return ln
	}
	sl := &sourceListener{Listener: ln, limits: l, open: map[Source]int{}, log: log, now: time.Now}
	if l.Conns.on() {
		sl.rates = newKeyedLimiters[Source](l.Conns)
	}
	return sl
}

const refusedLogEvery = 10 * time.Second

type sourceListener struct {
	net.Listener
	limits SourceLimits
	rates  *keyedLimiters[Source]
	log    ulog.Logger
	now    func() time.Time

	mu       sync.Mutex
	open     map[Source]int
	refused  int
	loggedAt time.Time
}

func (l *sourceListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := SourceOf(c.RemoteAddr().String())
		if why := l.admit(src); why != "" {
			c.Close()
			l.noteRefused(src, why)
			continue
		}
		return &sourceConn{Conn: c, l: l, src: src}, nil
	}
}

// admit counts a new connection of src, or says why it is refused.
func (l *sourceListener) admit(src Source) string {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.limits.MaxConns > 0 && l.open[src] >= l.limits.MaxConns {
		return "open connections"
	}
	if l.rates != nil {
		if _, ok := l.rates.take(src, now); !ok {
			return "connection rate"
		}
	}
	l.open[src]++
	return ""
}

func (l *sourceListener) release(src Source) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[src]--; l.open[src] <= 0 {
		delete(l.open, src)
	}
}

func (l *sourceListener) noteRefused(src Source, why string) {
	now := l.now()
	l.mu.Lock()
	l.refused++
	if l.log == nil || now.Sub(l.loggedAt) < refusedLogEvery {
		l.mu.Unlock()
		return
	}
	n := l.refused
	l.refused, l.loggedAt = 0, now
	l.mu.Unlock()
	l.log.Printf("keyserver: refused %d connection(s) over the per-source limits (latest: %s, %s)", n, src, why)
}

// sourceConn gives its slot back once, however often it is closed.
type sourceConn struct {
	net.Conn
	l    *sourceListener
	src  Source
	once sync.Once
}

func (c *sourceConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.src) })
	return err
}

package keyserver

import (
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limit is a token bucket: PerSecond requests per second on average, up to
// Burst at once. PerSecond <= 0 turns the bucket off.
type Limit struct {
	PerSecond float64
	Burst     int
}

// Default admission limits: enough for a fleet booting at once (clients
// honour Retry-After), low enough per host to make token guessing slow.
var (
	DefaultGlobalLimit = Limit{PerSecond: 100, Burst: 200}
	DefaultHostLimit   = Limit{PerSecond: 1, Burst: 10}
)

// take spends one token of lim at now, or reports how long until one is
// available without spending anything.
func take(lim *rate.Limiter, now time.Time) (wait time.Duration, ok bool) {
	r := lim.ReserveN(now, 1)
	if !r.OK() {
		return time.Second, false
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d, false
	}
	return 0, true
}

// retryAfter renders a wait as whole seconds, at least 1, as Retry-After wants.
func retryAfter(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// hostLimiters is one bucket per host id. Ids come from the network, so
// the map is kept small: a full bucket behaves exactly like a new one, and
// is dropped when the map grows.
type hostLimiters struct {
	limit   Limit
	mu      sync.Mutex
	m       map[string]*rate.Limiter
	sweepAt int
}

const (
	hostLimiterSweep = 4096
	// Beyond this many hosts with non-full buckets (only reachable past a
	// high global limit), new hosts are refused rather than tracked.
	hostLimiterMax = 1 << 16
)

func newHostLimiters(l Limit) *hostLimiters {
	return &hostLimiters{limit: l, m: map[string]*rate.Limiter{}, sweepAt: hostLimiterSweep}
}

func (h *hostLimiters) take(host string, now time.Time) (time.Duration, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lim := h.m[host]
	if lim == nil {
		if len(h.m) >= h.sweepAt {
			for k, l := range h.m {
				if l.TokensAt(now) >= float64(h.limit.Burst) {
					delete(h.m, k)
				}
			}
			h.sweepAt = max(hostLimiterSweep, 2*len(h.m))
		}
		if len(h.m) >= hostLimiterMax {
			return time.Second, false
		}
		lim = rate.NewLimiter(rate.Limit(h.limit.PerSecond), h.limit.Burst) // starts full
		h.m[host] = lim
	}
	return take(lim, now)
}

func (h *hostLimiters) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.m)
}

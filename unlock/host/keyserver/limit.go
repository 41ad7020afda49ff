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

// Default admission limits (see "Admission" in the package documentation).
//
// DefaultGlobalLimit and DefaultHostLimit are spent only by requests whose
// token matched: enough for a fleet booting at once (clients honour
// Retry-After), and nobody without a token can spend them.
//
// DefaultSourceFailLimit is what one source address (IPv4 /32, IPv6 /64)
// may spend on requests that fail (no token, wrong token, unknown host,
// bad request): a host retrying a fixable failure backs off for a minute
// (DESIGN §5), so this only ever binds a client that is not one of ours.
// DefaultFailLimit is the global share of such failures: once it is spent,
// sources that failed recently are refused before any store work, and
// sources that did not (the booting fleet) are unaffected.
var (
	DefaultGlobalLimit     = Limit{PerSecond: 100, Burst: 200}
	DefaultHostLimit       = Limit{PerSecond: 1, Burst: 10}
	DefaultSourceFailLimit = Limit{PerSecond: 0.5, Burst: 10}
	DefaultFailLimit       = Limit{PerSecond: 50, Burst: 100}
)

func (l Limit) on() bool { return l.PerSecond > 0 }

func (l Limit) limiter() *rate.Limiter {
	return rate.NewLimiter(rate.Limit(l.PerSecond), max(l.Burst, 1)) // starts full
}

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

// untilOne is how long until lim holds a whole token (0: it does now).
func untilOne(lim *rate.Limiter, now time.Time) time.Duration {
	missing := 1 - lim.TokensAt(now)
	if missing <= 0 {
		return 0
	}
	if lim.Limit() <= 0 {
		return time.Second
	}
	return time.Duration(missing / float64(lim.Limit()) * float64(time.Second))
}

// retryAfter renders a wait as whole seconds, at least 1, as Retry-After wants.
func retryAfter(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// keyedLimiters is one bucket per key (host id, source address). Keys
// come from the network, so the map is kept small: a full bucket behaves
// exactly like a new one, and is dropped when the map grows.
type keyedLimiters[K comparable] struct {
	limit   Limit
	mu      sync.Mutex
	m       map[K]*rate.Limiter
	sweepAt int
}

const (
	limiterSweep = 4096
	// Beyond this many keys with non-full buckets, new keys are not
	// tracked (get reports false; callers treat that as "limited").
	limiterMax = 1 << 16
)

func newKeyedLimiters[K comparable](l Limit) *keyedLimiters[K] {
	return &keyedLimiters[K]{limit: l, m: map[K]*rate.Limiter{}, sweepAt: limiterSweep}
}

// getLocked returns k's bucket, making a full one if need be; false when
// the map is full of non-full buckets.
func (h *keyedLimiters[K]) getLocked(k K, now time.Time) (*rate.Limiter, bool) {
	lim := h.m[k]
	if lim != nil {
		return lim, true
	}
	if len(h.m) >= h.sweepAt {
		for key, l := range h.m {
			if l.TokensAt(now) >= float64(max(h.limit.Burst, 1)) {
				delete(h.m, key)
			}
		}
		h.sweepAt = max(limiterSweep, 2*len(h.m))
	}
	if len(h.m) >= limiterMax {
		return nil, false
	}
	lim = h.limit.limiter()
	h.m[k] = lim
	return lim, true
}

// take spends one token of k's bucket, or says how long to wait.
func (h *keyedLimiters[K]) take(k K, now time.Time) (time.Duration, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lim, ok := h.getLocked(k, now)
	if !ok {
		return time.Second, false
	}
	return take(lim, now)
}

// state reports, without spending, how long until k's bucket holds a
// token (0: now) and whether it is below full (k spent some recently).
// An untracked key (the map is full) counts as spent.
func (h *keyedLimiters[K]) state(k K, now time.Time) (wait time.Duration, spent bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lim := h.m[k]
	if lim == nil {
		if len(h.m) >= limiterMax {
			return 0, true
		}
		return 0, false
	}
	return untilOne(lim, now), lim.TokensAt(now) < float64(max(h.limit.Burst, 1))
}

func (h *keyedLimiters[K]) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.m)
}

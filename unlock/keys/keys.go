// Package keys is boot stage 5: it fetches the volume passphrases from the
// key servers over TLS trusted only through SPKI pins (DESIGN §5), retrying
// with capped, fully jittered exponential backoff until a server answers.
package keys

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// Logger receives one status line per failed attempt.
type Logger interface {
	Printf(format string, v ...any)
}

// Config is what the key stage needs.
type Config struct {
	// URLs are tried in order within a round; {host} is replaced by Host.
	URLs []string
	Pins []pin.Pin
	Host string
	// Token is sent as a bearer token when non-empty. It is a secret:
	// Fetch never logs it, and the caller wipes it.
	Token []byte
	// AttemptTimeout bounds one request to one server (default 10s).
	AttemptTimeout time.Duration
	// GiveUpAfter ends the retries with ErrGaveUp; 0 retries forever.
	GiveUpAfter time.Duration
	// Backoff between rounds; zero values take the defaults.
	Backoff Backoff

	// Now and Sleep are the clock, replaceable in tests.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
}

// Backoff is capped exponential backoff with full jitter: before round n
// the wait is uniform in [0, min(Cap, Base·2ⁿ)). Full jitter spreads a fleet
// that reboots at once (after a power event) over the whole window instead
// of letting it hammer the server in lockstep.
type Backoff struct {
	Base time.Duration // default 1s
	Cap  time.Duration // default 60s
	// Long is the wait after an answer an operator must fix (401, 403,
	// 404): retrying fast would not help and would flood the audit log.
	Long time.Duration // default Cap
}

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = time.Second
	}
	if b.Cap <= 0 {
		b.Cap = 60 * time.Second
	}
	if b.Long <= 0 {
		b.Long = b.Cap
	}
	return b
}

// delay is the jittered wait before the next round.
func (b Backoff) delay(round int) time.Duration {
	ceil := b.Cap
	if round < 30 {
		if d := b.Base << round; d > 0 && d < ceil {
			ceil = d
		}
	}
	return time.Duration(rand.Int64N(int64(ceil)) + 1)
}

// Keys are the fetched passphrases, current first.
type Keys struct {
	Keys   [][]byte
	Server string // host:port that answered
}

// Wipe zeroes the key material.
func (k *Keys) Wipe() {
	if k != nil {
		keyproto.Wipe(k.Keys)
	}
}

// maxRetryAfter bounds a server's Retry-After.
const maxRetryAfter = 10 * time.Minute

// ErrGaveUp is returned when GiveUpAfter passed without a key.
var ErrGaveUp = errors.New("gave up fetching the key")

// StatusError is an HTTP answer other than 200.
type StatusError struct {
	Code int
	// RetryAfter is the server's Retry-After, when it sent one.
	RetryAfter    time.Duration
	HasRetryAfter bool
}

func (e *StatusError) Error() string {
	switch e.Code {
	case 401:
		return "401 unauthorized (missing or wrong token)"
	case 403:
		return "403 forbidden (host revoked?)"
	case 404:
		return "404 unknown host"
	case 429:
		return "429 too many requests"
	case 503:
		return "503 service unavailable"
	}
	return fmt.Sprintf("HTTP status %d", e.Code)
}

// Fetch returns the keys from the first server that answers with a valid
// key list. It retries until ctx ends or GiveUpAfter passes.
func Fetch(ctx context.Context, cfg Config, log Logger) (*Keys, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("no key server URL configured")
	}
	if len(cfg.Pins) == 0 {
		return nil, errors.New("no pin configured")
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Sleep == nil {
		cfg.Sleep = sleep
	}
	bo := cfg.Backoff.withDefaults()
	targets := make([]*url.URL, len(cfg.URLs))
	for i, s := range cfg.URLs {
		u, err := expand(s, cfg.Host)
		if err != nil {
			return nil, err
		}
		targets[i] = u
	}
	start := cfg.Now()
	dialer := &net.Dialer{}
	for round := 0; ; round++ {
		var wait time.Duration
		for i, u := range targets {
			keys, err := attempt(ctx, u, cfg, dialer)
			if err == nil {
				return keys, nil
			}
			if ctx.Err() != nil {
				return nil, fmt.Errorf("%s: %w", u.Host, ctx.Err())
			}
			w := bo.delay(round)
			var se *StatusError
			if errors.As(err, &se) {
				switch {
				case se.HasRetryAfter:
					// Honoured, but bounded: a broken or hostile server
					// must not park the host for days.
					w = min(se.RetryAfter, maxRetryAfter)
				case se.Code == 401, se.Code == 403, se.Code == 404:
					w = bo.Long/2 + time.Duration(rand.Int64N(int64(bo.Long/2)+1))
				}
			}
			if w > wait {
				wait = w
			}
			next := "next server"
			if i == len(targets)-1 {
				next = fmt.Sprintf("retrying in %.1fs", wait.Seconds())
			}
			log.Printf("%s: %v; %s", u.Host, err, next)
		}
		if cfg.GiveUpAfter > 0 && cfg.Now().Add(wait).Sub(start) > cfg.GiveUpAfter {
			return nil, fmt.Errorf("%w after %s", ErrGaveUp, cfg.GiveUpAfter)
		}
		if err := cfg.Sleep(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// attempt performs one request to one server within AttemptTimeout.
func attempt(ctx context.Context, u *url.URL, cfg Config, dialer *net.Dialer) (*Keys, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.AttemptTimeout)
	defer cancel()
	tc := tlsConfig(cfg.Pins, u.Hostname(), cfg.Now)
	cur := u
	for redirects := 0; ; redirects++ {
		resp, err := get(ctx, cur, cfg.Token, tc, dialer)
		if err != nil {
			if ctx.Err() != nil || isTimeout(err) {
				return nil, fmt.Errorf("no answer within %s", cfg.AttemptTimeout)
			}
			return nil, err
		}
		switch {
		case resp.status == 200:
			ks, err := keyproto.Decode(resp.contentType, resp.body)
			clear(resp.body)
			if err != nil {
				return nil, err
			}
			return &Keys{Keys: ks, Server: cur.Host}, nil
		case resp.status >= 300 && resp.status < 400 && resp.location != "":
			next, err := cur.Parse(resp.location)
			if err != nil {
				return nil, fmt.Errorf("redirect: malformed Location")
			}
			// Same scheme, host and port only: the pin and the token
			// belong to this server.
			if next.Scheme != "https" || next.Host != cur.Host {
				return nil, fmt.Errorf("redirect to another host (%s) refused", next.Host)
			}
			if redirects >= 3 {
				return nil, fmt.Errorf("too many redirects")
			}
			cur = next
			continue
		case resp.status == 429 || resp.status == 503:
			se := &StatusError{Code: resp.status}
			se.RetryAfter, se.HasRetryAfter = parseRetryAfter(resp.retryAfter, cfg.Now())
			return nil, se
		default:
			return nil, &StatusError{Code: resp.status}
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// expand fills {host} into a URL template.
func expand(tmpl, host string) (*url.URL, error) {
	s := strings.ReplaceAll(tmpl, keyproto.HostPlaceholder, url.PathEscape(host))
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("key URL %q: %w", tmpl, err)
	}
	if u.Scheme != "https" || u.Hostname() == "" {
		return nil, fmt.Errorf("key URL %q: want https://host/...", tmpl)
	}
	return u, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

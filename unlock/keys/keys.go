// Package keys is boot stage 5: it fetches the volume passphrases from the
// key servers over TLS trusted only through SPKI pins (DESIGN §5), retrying
// with capped, fully jittered exponential backoff until a server answers.
//
// # Several servers: a staggered start
//
// The URLs are neither raced nor strictly tried in turn. A round starts
// with the first URL; the next one is started when the previous attempt
// has failed, or has gone unanswered for Stagger (1 s by default) — then
// both run and the first good answer wins, the others are cancelled. This
// is the compromise Happy Eyeballs (RFC 8305) makes, for the same reasons:
//
//   - Strictly in turn, a black-holed first server (one that accepts TCP
//     but never answers, or drops packets) costs attempt_timeout (10 s) on
//     every round before the second is asked; staggered, it costs 1 s.
//   - Raced, every boot of every host sends a request to every server:
//     twice the load and audit lines on a healthy fleet, and a fleet that
//     reboots at once spends the rate limits of all servers together. The
//     token goes only to servers that passed the pin check, so racing
//     would not leak it, but it would spread it (and its audit trail) to
//     every server on every boot for no benefit. Staggered, a healthy
//     first server is the only one asked.
//   - A refused connection or an error answer moves to the next URL at
//     once, so an outage that fails fast costs nothing.
//
// A round ends when every URL has failed. The wait before the next round
// is the longest any server asked for: the jittered backoff, a long
// backoff after 401/403/404, or the server's Retry-After (bounded by
// 10 min), so no server is asked again before it said it could be.
//
// Every failed attempt prints one line: the server, the cause and what
// happens next ("10.0.2.2:8443: connection refused; trying 10.0.2.2:8444",
// "...; retrying in 4.2s", "...; giving up").
package keys

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/retry"

	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
	"github.com/unlockrd/unlockrd/unlock/secret"
)

// Config is what the key stage needs.
type Config struct {
	// URLs in order of preference; {host} is replaced by Host. See the
	// package documentation for how several are used.
	URLs []string
	// Pins are SPKI pins of the server's own (leaf) key.
	Pins []pin.Pin
	// CAs are CA certificates (pin.ParseCAs) a leaf matching no pin
	// must verify up to; they are trusted as given here, never as a
	// server sends them.
	CAs  []*x509.Certificate
	Host string
	// Token is sent as a bearer token when non-empty. It is a secret:
	// Fetch never logs it, and the caller wipes it.
	Token []byte
	// AttemptTimeout bounds one request to one server (default 10s).
	AttemptTimeout time.Duration
	// GiveUpAfter ends the retries with ErrGaveUp; 0 retries forever.
	GiveUpAfter time.Duration
	// Since is when GiveUpAfter started counting (default: the call).
	// A caller that fetches again (no key opened a volume) passes the
	// time of its first fetch, so that give_up_after bounds them all.
	Since time.Time
	// Stagger is how long an attempt may go unanswered before the next
	// URL is tried beside it (default 1s).
	Stagger time.Duration
	// Backoff between rounds; zero values take the defaults.
	Backoff Backoff

	// LocalAddr, when set, is the source address of every connection.
	// The init leaves it unset; a fleet simulated on one machine (the
	// storm in qemu-tests) gives each host its own loopback address, as
	// the server's per-source limits expect of a real fleet.
	LocalAddr net.Addr

	// Now and Sleep are the clock, replaceable in tests.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
}

// Backoff is capped exponential backoff with full jitter: before round n
// the wait is uniform in (0, min(Cap, Base·2ⁿ)]. Full jitter spreads a
// fleet that reboots at once (after a power event) over the whole window
// instead of letting it hammer the server in lockstep.
type Backoff struct {
	Base time.Duration // default 1s
	Cap  time.Duration // default 60s
	// Long is the wait after an answer an operator must fix (401, 403,
	// 404): retrying fast would not help and would flood the audit log.
	// The wait is uniform in [Long/2, Long].
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

// delay is the jittered wait before the next round: the project's one
// backoff policy, with full jitter.
func (b Backoff) delay(round int) time.Duration {
	return retry.Backoff{Base: b.Base, Cap: b.Cap, Full: true}.Delay(round)
}

// long is the wait after 401/403/404.
func (b Backoff) long() time.Duration {
	return b.Long/2 + time.Duration(rand.Int64N(int64(b.Long/2)+1))
}

// Keys are the fetched passphrases, current first. They are owned by
// whoever received them from Fetch, who calls Wipe.
type Keys struct {
	Keys   []*secret.Buf
	Server string // host:port that answered
	// IDs are the keys' ids (empty strings for a raw answer), State the
	// host's lifecycle state the server sent (keyproto.StateNew, ...; ""
	// from servers that send none).
	IDs   []string
	State string
	// url is what answered: a confirmation goes there.
	url *url.URL
}

// Wipe zeroes the key material; safe on nil and twice.
func (k *Keys) Wipe() {
	if k != nil {
		secret.WipeAll(k.Keys)
	}
}

// maxRetryAfter bounds a server's Retry-After: a broken or hostile server
// must not park the host for days.
const maxRetryAfter = 10 * time.Minute

// maxRedirects bounds same-host redirects within one attempt.
const maxRedirects = 5

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
		return "404 unknown host (not enrolled?)"
	case 429:
		return "429 too many requests"
	case 503:
		return "503 service unavailable"
	}
	return fmt.Sprintf("HTTP status %d", e.Code)
}

// timeoutError is an attempt that ran out of time in one phase.
type timeoutError struct {
	phase   phase
	timeout time.Duration
}

func (e *timeoutError) Error() string {
	if e.phase == phaseAnswer {
		return "no answer within " + e.timeout.String()
	}
	return fmt.Sprintf("no %s within %s", e.phase, e.timeout)
}

// Fetch returns the keys from the first server that answers with a valid
// key list. It retries until ctx ends or GiveUpAfter passes.
func Fetch(ctx context.Context, cfg Config, log ulog.Logger) (*Keys, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("no key server URL configured")
	}
	if len(cfg.Pins) == 0 && len(cfg.CAs) == 0 {
		return nil, errors.New("no pin or CA certificate configured")
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 10 * time.Second
	}
	if cfg.Stagger <= 0 {
		cfg.Stagger = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Sleep == nil {
		cfg.Sleep = retry.Sleep
	}
	f := &fetcher{cfg: cfg, bo: cfg.Backoff.withDefaults(), log: log, dialer: &net.Dialer{LocalAddr: cfg.LocalAddr}}
	for _, s := range cfg.URLs {
		u, err := expand(s, cfg.Host)
		if err != nil {
			return nil, err
		}
		f.targets = append(f.targets, u)
	}
	f.start = cfg.Now()
	if !cfg.Since.IsZero() {
		f.start = cfg.Since
	}
	if cfg.GiveUpAfter > 0 {
		left := cfg.GiveUpAfter - cfg.Now().Sub(f.start)
		if left <= 0 {
			return nil, fmt.Errorf("%w after %s", ErrGaveUp, cfg.GiveUpAfter)
		}
		// Also ends an attempt in flight when the time is up.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, left, ErrGaveUp)
		defer cancel()
	}
	for round := 0; ; round++ {
		keys, wait, err := f.round(ctx, round)
		if keys != nil {
			return keys, nil
		}
		if err != nil {
			return nil, err
		}
		if err := cfg.Sleep(ctx, wait); err != nil {
			return nil, f.ctxErr(ctx, err)
		}
	}
}

// fetcher is one Fetch call's state.
type fetcher struct {
	cfg     Config
	bo      Backoff
	log     ulog.Logger
	dialer  *net.Dialer
	targets []*url.URL
	start   time.Time
}

// ctxErr turns the end of ctx into Fetch's error.
func (f *fetcher) ctxErr(ctx context.Context, err error) error {
	if errors.Is(context.Cause(ctx), ErrGaveUp) {
		return fmt.Errorf("%w after %s", ErrGaveUp, f.cfg.GiveUpAfter)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// result is one attempt's outcome.
type result struct {
	i    int
	keys *Keys
	err  error
}

// round tries every URL once, staggered (see the package documentation).
// It returns the keys, or the wait before the next round, or an error
// that ends the fetch.
func (f *fetcher) round(ctx context.Context, round int) (*Keys, time.Duration, error) {
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan result, len(f.targets))
	running := map[int]bool{}
	started := 0
	launch := func() {
		i := started
		started++
		running[i] = true
		go func() {
			k, err := attempt(rctx, f.targets[i], f.cfg, f.dialer)
			results <- result{i, k, err}
		}()
	}
	// drain cancels the attempts still running and waits for them, so
	// that keys a second server delivered too are wiped, not dropped.
	drain := func() {
		cancel()
		for len(running) > 0 {
			r := <-results
			delete(running, r.i)
			r.keys.Wipe()
		}
	}
	launch()
	stagger := time.NewTimer(f.cfg.Stagger)
	defer stagger.Stop()
	var wait time.Duration
	for {
		var staggerC <-chan time.Time
		if started < len(f.targets) {
			staggerC = stagger.C
		}
		select {
		case <-ctx.Done():
			drain()
			return nil, 0, f.ctxErr(ctx, ctx.Err())
		case <-staggerC:
			f.log.Printf("%s: no answer yet after %s; trying %s as well",
				f.targets[started-1].Host, f.cfg.Stagger, f.targets[started].Host)
			launch()
			stagger.Reset(f.cfg.Stagger)
		case r := <-results:
			delete(running, r.i)
			if r.err == nil {
				drain()
				return r.keys, 0, nil
			}
			if ctx.Err() != nil {
				drain()
				return nil, 0, f.ctxErr(ctx, r.err)
			}
			wait = max(wait, f.waitAfter(r.err, round))
			host := f.targets[r.i].Host
			switch {
			case started < len(f.targets):
				f.log.Printf("%s: %v; trying %s", host, r.err, f.targets[started].Host)
				launch()
				stagger.Reset(f.cfg.Stagger)
			case len(running) > 0:
				f.log.Printf("%s: %v; waiting for %s", host, r.err, f.hosts(running))
			case f.cfg.GiveUpAfter > 0 && f.cfg.Now().Add(wait).Sub(f.start) > f.cfg.GiveUpAfter:
				// The next round would start after the deadline.
				f.log.Printf("%s: %v; giving up", host, r.err)
				return nil, 0, fmt.Errorf("%w after %s", ErrGaveUp, f.cfg.GiveUpAfter)
			default:
				f.log.Printf("%s: %v; retrying in %s", host, r.err, fmtDur(wait))
				return nil, wait, nil
			}
		}
	}
}

// hosts names the servers whose attempts are still running, in URL order.
func (f *fetcher) hosts(running map[int]bool) string {
	var hs []string
	for i, u := range f.targets {
		if running[i] {
			hs = append(hs, u.Host)
		}
	}
	return strings.Join(hs, ", ")
}

// waitAfter is the wait a failure asks for before the next round.
func (f *fetcher) waitAfter(err error, round int) time.Duration {
	var se *StatusError
	if errors.As(err, &se) {
		switch {
		case se.HasRetryAfter:
			// At least what the server asked for, at least Base (a
			// "Retry-After: 0" must not make a tight loop), plus up to
			// 10% so that a fleet told the same number does not come
			// back in lockstep.
			w := max(min(se.RetryAfter, maxRetryAfter), f.bo.Base)
			return w + time.Duration(rand.Int64N(int64(w/10)+1))
		case se.Code == 401, se.Code == 403, se.Code == 404:
			return f.bo.long()
		}
	}
	return f.bo.delay(round)
}

// attempt performs one request to one server within AttemptTimeout,
// following redirects to the same host only.
func attempt(ctx context.Context, u *url.URL, cfg Config, dialer *net.Dialer) (*Keys, error) {
	actx, cancel := context.WithTimeout(ctx, cfg.AttemptTimeout)
	defer cancel()
	tc := tlsConfig(cfg.Pins, cfg.CAs, u.Hostname(), cfg.Now)
	cur := u
	seen := map[string]bool{u.String(): true}
	for redirects := 0; ; redirects++ {
		resp, err := get(actx, cur, cfg.Token, tc, dialer)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, describe(err, actx.Err() != nil, cfg.AttemptTimeout)
		}
		switch {
		case resp.status == 200:
			d, err := keyproto.DecodeResponse(resp.contentType, resp.body)
			resp.wipe()
			if err != nil {
				return nil, err
			}
			out := &Keys{Server: u.Host, IDs: d.IDs, State: d.State, url: cur}
			for _, k := range d.Keys {
				out.Keys = append(out.Keys, secret.From(k)) // owned (and wiped) by out
			}
			return out, nil
		case isRedirect(resp.status):
			if resp.location == "" {
				return nil, fmt.Errorf("%d redirect without a Location", resp.status)
			}
			next, err := cur.Parse(resp.location)
			if err != nil {
				return nil, fmt.Errorf("%d redirect: malformed Location", resp.status)
			}
			// Same scheme, host and port only: the pin and the token
			// belong to this server.
			if next.Scheme != "https" {
				return nil, fmt.Errorf("redirect to a %s: URL refused", next.Scheme)
			}
			if !strings.EqualFold(next.Host, cur.Host) {
				return nil, fmt.Errorf("redirect to another host (%s) refused", next.Host)
			}
			next.Fragment, next.RawFragment, next.User = "", "", nil
			if seen[next.String()] {
				return nil, fmt.Errorf("redirect loop (%s)", next.EscapedPath())
			}
			if redirects >= maxRedirects {
				return nil, fmt.Errorf("more than %d redirects", maxRedirects)
			}
			seen[next.String()] = true
			cur = next
		case resp.status == 429 || resp.status == 503:
			se := &StatusError{Code: resp.status}
			se.RetryAfter, se.HasRetryAfter = parseRetryAfter(resp.retryAfter, resp.date, cfg.Now())
			return nil, se
		default:
			return nil, &StatusError{Code: resp.status}
		}
	}
}

func isRedirect(code int) bool {
	switch code {
	case 301, 302, 303, 307, 308:
		return true
	}
	return false
}

// describe turns a request error into the cause a status line shows:
// which phase timed out, or the bare reason a connection failed (the
// line already names the server, so "dial tcp 10.0.2.2:8443: connect:"
// is noise).
func describe(err error, timedOut bool, timeout time.Duration) error {
	ph := phaseAnswer
	var pe *phaseError
	if errors.As(err, &pe) {
		ph = pe.phase
	}
	if timedOut || isTimeout(err) {
		return &timeoutError{phase: ph, timeout: timeout}
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return fmt.Errorf("cannot resolve %s: %s", dnsErr.Name, dnsErr.Err)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if ph == phaseConnect {
			return errno
		}
		return fmt.Errorf("%s: %w", ph, errno)
	}
	if ph == phaseHandshake && errors.Is(err, io.EOF) {
		return errors.New("TLS: connection closed during the handshake")
	}
	return err
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

// fmtDur prints a wait for a console line: "4.2s", "45.0s", "10m0s".
func fmtDur(d time.Duration) string {
	if d < time.Minute {
		return fmt.Sprintf("%.1fs", d.Seconds())
	}
	return d.Round(time.Second).String()
}

// ErrConfirmRefused is wrapped when the server answered a confirmation
// with an error status (409: it does not fit the host's record).
var ErrConfirmRefused = errors.New("confirmation refused")

// Confirm tells the server that answered ks what the host did with its
// keys (keyproto.Confirmation: provisioned or rotated, with the current
// key's id): one POST to its key URL + keyproto.ConfirmSuffix, with the
// same token and the same TLS trust as the fetch, within AttemptTimeout.
// It does not retry: the next boot confirms again, and the server
// accepts a repeat.
func Confirm(ctx context.Context, cfg Config, ks *Keys, c keyproto.Confirmation) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if ks == nil || ks.url == nil {
		return errors.New("confirm: no server answered")
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	u := *ks.url
	u.Path = strings.TrimSuffix(u.Path, "/") + keyproto.ConfirmSuffix
	u.RawPath = ""
	body, err := json.Marshal(c)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, cfg.AttemptTimeout)
	defer cancel()
	resp, err := do(actx, &u, cfg.Token, body, tlsConfig(cfg.Pins, cfg.CAs, u.Hostname(), cfg.Now), &net.Dialer{LocalAddr: cfg.LocalAddr})
	if err != nil {
		return fmt.Errorf("confirm to %s: %w", u.Host, describe(err, actx.Err() != nil, cfg.AttemptTimeout))
	}
	defer resp.wipe()
	if resp.status != 200 {
		// The reason is the server's, about ids and states: no secrets.
		reason := strings.TrimSpace(string(resp.body))
		if len(reason) > 200 {
			reason = reason[:200]
		}
		return fmt.Errorf("confirm to %s: %w: HTTP %d %s", u.Host, ErrConfirmRefused, resp.status, reason)
	}
	return nil
}

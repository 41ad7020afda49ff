package keyserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"golang.org/x/time/rate"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// KeysPath is the prefix of key URLs; the host id follows it.
const KeysPath = "/v1/keys/"

// HealthPath answers 200 while the store is readable under our master key.
const HealthPath = "/healthz"

type config struct {
	store        store.Store
	sealer       *Sealer
	now          func() time.Time
	logger       ulog.Logger
	audit        func(AuditEvent)
	global, host Limit
	sourceFail   Limit
	fail         Limit
	storeTimeout time.Duration
}

// Option configures New.
type Option func(*config)

// WithStore sets the host store (required).
func WithStore(s store.Store) Option { return func(c *config) { c.store = s } }

// WithSealer sets the master-key sealer the store's keys were sealed with (required).
func WithSealer(s *Sealer) Option { return func(c *config) { c.sealer = s } }

// WithClock replaces time.Now, for the rate limits and audit times.
func WithClock(now func() time.Time) Option { return func(c *config) { c.now = now } }

// WithLogger sets where internal failures are reported (default: log.Default()).
func WithLogger(l ulog.Logger) Option { return func(c *config) { c.logger = l } }

// WithAudit sets the audit sink, called once per request after the answer
// is written (default: JSONAudit(os.Stderr)). nil turns auditing off.
func WithAudit(fn func(AuditEvent)) Option { return func(c *config) { c.audit = fn } }

// WithGlobalLimit sets the bucket shared by all key requests.
func WithGlobalLimit(l Limit) Option { return func(c *config) { c.global = l } }

// WithHostLimit sets the bucket each host id gets.
func WithHostLimit(l Limit) Option { return func(c *config) { c.host = l } }

// WithSourceFailLimit sets the bucket of failed key requests each source
// address (see SourceOf) gets.
func WithSourceFailLimit(l Limit) Option { return func(c *config) { c.sourceFail = l } }

// WithFailLimit sets the bucket of failed key requests shared by all
// sources; once empty, sources with recent failures are refused.
func WithFailLimit(l Limit) Option { return func(c *config) { c.fail = l } }

// WithStoreTimeout bounds one store lookup (default 5s); a lookup that
// times out because the store is busy is answered 503 with Retry-After.
func WithStoreTimeout(d time.Duration) Option { return func(c *config) { c.storeTimeout = d } }

// Handler serves DESIGN §5 key requests and /healthz. Build it with New.
type Handler struct {
	c       config
	global  *rate.Limiter
	hosts   *keyedLimiters[string]
	fails   *rate.Limiter
	sources *keyedLimiters[Source]

	conns sync.Map // net.Conn -> *connInfo

	healthMu   sync.Mutex
	healthAt   time.Time
	healthErr  error
	healthOnce bool
}

// New returns a Handler; WithStore and WithSealer are required.
func New(opts ...Option) (*Handler, error) {
	c := config{
		now:          time.Now,
		logger:       log.Default(),
		audit:        JSONAudit(os.Stderr),
		global:       DefaultGlobalLimit,
		host:         DefaultHostLimit,
		sourceFail:   DefaultSourceFailLimit,
		fail:         DefaultFailLimit,
		storeTimeout: 5 * time.Second,
	}
	for _, o := range opts {
		o(&c)
	}
	if c.store == nil || c.sealer == nil {
		return nil, errors.New("keyserver.New: WithStore and WithSealer are required")
	}
	h := &Handler{c: c}
	if c.global.on() {
		h.global = c.global.limiter()
	}
	if c.host.on() {
		h.hosts = newKeyedLimiters[string](c.host)
	}
	if c.fail.on() {
		h.fails = c.fail.limiter()
	}
	if c.sourceFail.on() {
		h.sources = newKeyedLimiters[Source](c.sourceFail)
	}
	return h, nil
}

const maxAuditPath = 160

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := h.c.now()
	path := r.URL.EscapedPath()
	ev := AuditEvent{Time: start.UTC(), Remote: r.RemoteAddr, Method: r.Method, Path: path}
	if len(ev.Path) > maxAuditPath {
		ev.Path = ev.Path[:maxAuditPath] + "..."
	}
	hdr := w.Header()
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")

	if ci, ok := r.Context().Value(connKey{}).(*connInfo); ok {
		ci.pending.Store(false) // this request reached us: it gets its own line
	}

	switch {
	case strings.HasPrefix(path, KeysPath) && strings.HasSuffix(path, keyproto.ConfirmSuffix):
		// The one request with a body, bounded by the handler itself.
		h.confirm(w, r, &ev, strings.TrimSuffix(path[len(KeysPath):], keyproto.ConfirmSuffix))
	case r.ContentLength > 0 || (r.ContentLength < 0 && r.ProtoMajor == 1):
		// No request of ours has a body; one that does is not a key
		// client, and reading it would only cost us.
		h.fail(w, &ev, http.StatusRequestEntityTooLarge, OutcomeBadRequest, "request body not allowed")
	case path == HealthPath:
		h.health(w, r, &ev)
	case strings.HasPrefix(path, KeysPath):
		h.keys(w, r, &ev, path[len(KeysPath):])
	default:
		h.failed(SourceOf(r.RemoteAddr))
		h.fail(w, &ev, http.StatusNotFound, OutcomeNotFound, "not found: the key service answers GET "+KeysPath+"{host}, POST "+KeysPath+"{host}"+keyproto.ConfirmSuffix+" and "+HealthPath)
	}

	if h.c.audit != nil {
		ev.DurationMS = float64(h.c.now().Sub(start).Microseconds()) / 1000
		h.c.audit(ev)
	}
}

// fail answers status with reason as the body and records both. Reasons
// name what was wrong with the request, never what the store holds
// beyond what the status already tells.
func (h *Handler) fail(w http.ResponseWriter, ev *AuditEvent, status int, outcome, reason string) {
	ev.Status, ev.Outcome = status, outcome
	if status < 500 {
		ev.Reason = reason
	}
	http.Error(w, reason, status)
}

func (h *Handler) tooMany(w http.ResponseWriter, ev *AuditEvent, wait time.Duration, status int, outcome string) {
	secs := retryAfter(wait)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	reason := "too many requests"
	if status == http.StatusServiceUnavailable {
		reason = "store busy"
	}
	h.fail(w, ev, status, outcome, fmt.Sprintf("%s: retry after %ds", reason, secs))
}

// hostFromPath returns the host id from the escaped path segment after
// KeysPath. It must be exactly one segment; percent-escapes are decoded
// (a client may escape more than it needs to), and the result must be a
// valid host id, which rules out "/", "." and "..".
func hostFromPath(seg string) (string, error) {
	if seg == "" || strings.Contains(seg, "/") {
		return "", errors.New("want exactly one path segment after " + KeysPath)
	}
	id, err := url.PathUnescape(seg)
	if err != nil {
		return "", errors.New("bad percent-escape in host id")
	}
	if err := ValidHostID(id); err != nil {
		return "", err
	}
	return id, nil
}

// bearer extracts the token of an "Authorization: Bearer" header. The
// scheme is case-insensitive (RFC 9110 §11.1).
func bearer(r *http.Request) (string, bool) {
	v := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	if tok == "" || len(tok) > maxTokenLen {
		return "", false
	}
	return tok, true
}

// admit decides, before any store or crypto work, whether src may make a
// key request now: not once its own failure bucket is empty, nor, once
// the global failure budget is spent, if it failed recently. A source
// that has not failed (a host with its token) is never refused here, so
// no one without a token can keep it out.
func (h *Handler) admit(src Source, now time.Time) (time.Duration, bool) {
	if h.sources == nil {
		return 0, true
	}
	wait, spent := h.sources.state(src, now)
	if wait > 0 {
		return wait, false
	}
	if spent && h.fails != nil {
		if w := untilOne(h.fails, now); w > 0 {
			return w, false
		}
	}
	return 0, true
}

// failed charges a failed key request to its source and to the global
// failure budget.
func (h *Handler) failed(src Source) {
	now := h.c.now()
	if h.sources != nil {
		h.sources.take(src, now)
	}
	if h.fails != nil {
		h.fails.AllowN(now, 1)
	}
}

// authorize is what a key request and a confirmation share, in this
// order: admission of the source, the method, the host id, the token
// against the store, the state, then the host's and the global bucket.
// It answers the failures itself; ok means go on with the record.
func (h *Handler) authorize(w http.ResponseWriter, r *http.Request, ev *AuditEvent, seg, method string) (rec store.Host, ok bool) {
	src := SourceOf(r.RemoteAddr)
	if wait, ok := h.admit(src, h.c.now()); !ok {
		h.tooMany(w, ev, wait, http.StatusTooManyRequests, OutcomeRateLimited)
		return store.Host{}, false
	}
	if r.Method != method {
		h.failed(src)
		w.Header().Set("Allow", method)
		what := "key requests are GET"
		if method == http.MethodPost {
			what = "confirmations are POST"
		}
		h.fail(w, ev, http.StatusMethodNotAllowed, OutcomeMethodNotAllowed, "method not allowed: "+what)
		return store.Host{}, false
	}
	id, err := hostFromPath(seg)
	if err != nil {
		h.failed(src)
		h.fail(w, ev, http.StatusBadRequest, OutcomeBadHost, "bad host id: "+err.Error())
		return store.Host{}, false
	}
	ev.Host = id

	token, ok := bearer(r)
	if !ok {
		h.failed(src)
		w.Header().Set("WWW-Authenticate", `Bearer realm="unlockrd"`)
		h.fail(w, ev, http.StatusUnauthorized, OutcomeNoToken, "unauthorized: no bearer token (Authorization: Bearer TOKEN)")
		return store.Host{}, false
	}

	ctx, cancel := context.WithTimeout(r.Context(), h.c.storeTimeout)
	defer cancel()
	rec, err = h.c.store.Get(ctx, id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		h.failed(src)
		h.fail(w, ev, http.StatusNotFound, OutcomeUnknownHost, "unknown host")
		return store.Host{}, false
	case errors.Is(err, store.ErrBusy), errors.Is(err, context.DeadlineExceeded):
		// Not the client's doing: no charge.
		ev.Error = err.Error()
		h.tooMany(w, ev, time.Second, http.StatusServiceUnavailable, OutcomeBusy)
		return store.Host{}, false
	case err != nil:
		ev.Error = err.Error()
		h.c.logger.Printf("keyserver: host %q: store: %v", id, err)
		h.fail(w, ev, http.StatusInternalServerError, OutcomeError, "internal error")
		return store.Host{}, false
	}

	if !TokenMatches(rec.TokenHash, token) {
		h.failed(src)
		w.Header().Set("WWW-Authenticate", `Bearer realm="unlockrd", error="invalid_token"`)
		h.fail(w, ev, http.StatusUnauthorized, OutcomeBadToken, "unauthorized: token does not match")
		return store.Host{}, false
	}
	if !rec.Lifecycle().Serves() {
		h.failed(src)
		h.fail(w, ev, http.StatusForbidden, OutcomeRevoked, "host revoked")
		return store.Host{}, false
	}

	// The token matched: only now are the host's and the global bucket
	// charged, so a client without the token cannot spend what the host
	// needs. The host bucket comes first: one host hammering with its
	// own token spends its own bucket, not the fleet's.
	now := h.c.now()
	if h.hosts != nil {
		if wait, ok := h.hosts.take(id, now); !ok {
			h.tooMany(w, ev, wait, http.StatusTooManyRequests, OutcomeRateLimited)
			return store.Host{}, false
		}
	}
	if h.global != nil {
		if wait, ok := take(h.global, now); !ok {
			h.tooMany(w, ev, wait, http.StatusTooManyRequests, OutcomeRateLimited)
			return store.Host{}, false
		}
	}

	return rec, true
}

func (h *Handler) keys(w http.ResponseWriter, r *http.Request, ev *AuditEvent, seg string) {
	rec, ok := h.authorize(w, r, ev, seg, http.MethodGet)
	if !ok {
		return
	}
	id := rec.ID
	ids, keys, err := UnsealAll(h.c.sealer, rec)
	if err != nil {
		ev.Error = err.Error()
		h.c.logger.Printf("keyserver: host %q: %v", id, err)
		h.fail(w, ev, http.StatusInternalServerError, OutcomeError, "internal error")
		return
	}
	body, err := keyproto.AppendResponse(nil, string(rec.Lifecycle()), ids, keys)
	keyproto.Wipe(keys)
	if err != nil {
		ev.Error = err.Error()
		h.fail(w, ev, http.StatusInternalServerError, OutcomeError, "internal error")
		return
	}
	// Wiped once written; copies inside net/http's and crypto/tls's own
	// buffers are beyond our reach.
	defer clear(body)
	w.Header().Set("Content-Type", keyproto.ContentTypeJSON)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	w.Write(body)
	ev.Status, ev.Outcome, ev.KeyIDs = http.StatusOK, OutcomeOK, ids
}

// connKey finds a connection's connInfo in a request context.
type connKey struct{}

// connInfo follows one connection, to notice requests net/http rejects
// itself (malformed request line or headers, headers over MaxHeaderBytes,
// a request cut short or too slow) before any handler runs: they would
// otherwise leave no audit line.
type connInfo struct {
	pending atomic.Bool // bytes of a request were read, no handler ran yet
}

// ConnContext is the http.Server hook of the same name; NewHTTPServer
// installs it with ConnState.
func (h *Handler) ConnContext(ctx context.Context, c net.Conn) context.Context {
	ci := &connInfo{}
	h.conns.Store(c, ci)
	return context.WithValue(ctx, connKey{}, ci)
}

// ConnState is the http.Server hook of the same name: a connection that
// closes while a request on it never reached ServeHTTP yields one audit
// event (outcome bad_request, status 0: net/http answered 400 or 431 on
// its own, or the client stopped mid-request).
func (h *Handler) ConnState(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateActive:
		if v, ok := h.conns.Load(c); ok {
			v.(*connInfo).pending.Store(true)
		}
	case http.StateIdle:
		if v, ok := h.conns.Load(c); ok {
			v.(*connInfo).pending.Store(false)
		}
	case http.StateClosed, http.StateHijacked:
		v, ok := h.conns.LoadAndDelete(c)
		if !ok || !v.(*connInfo).pending.Load() || h.c.audit == nil {
			return
		}
		h.c.audit(AuditEvent{
			Time:    h.c.now().UTC(),
			Remote:  c.RemoteAddr().String(),
			Outcome: OutcomeBadRequest,
			Reason:  "request rejected by the HTTP layer: malformed, headers over the size limit, or incomplete",
		})
	}
}

// healthTTL caches the health check: probes are free for the caller, so
// they must not turn into one store open each.
const healthTTL = time.Second

func (h *Handler) health(w http.ResponseWriter, r *http.Request, ev *AuditEvent) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		h.fail(w, ev, http.StatusMethodNotAllowed, OutcomeMethodNotAllowed, "method not allowed: use GET or HEAD")
		return
	}
	err := h.checkHealth(r.Context())
	if err != nil {
		ev.Error = err.Error()
		h.fail(w, ev, http.StatusServiceUnavailable, OutcomeHealth, "unhealthy")
		return
	}
	ev.Status, ev.Outcome = http.StatusOK, OutcomeHealth
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write([]byte("ok\n"))
	}
}

func (h *Handler) checkHealth(ctx context.Context) error {
	h.healthMu.Lock()
	defer h.healthMu.Unlock()
	now := h.c.now()
	if d := now.Sub(h.healthAt); h.healthOnce && d >= 0 && d < healthTTL {
		return h.healthErr
	}
	ctx, cancel := context.WithTimeout(ctx, h.c.storeTimeout)
	defer cancel()
	id, err := h.c.store.MasterKeyID(ctx, "")
	if err == nil && id != "" && id != h.c.sealer.ID() {
		err = fmt.Errorf("store was sealed under master key %s, we hold %s", id, h.c.sealer.ID())
	}
	h.healthAt, h.healthErr, h.healthOnce = now, err, true
	return err
}

// confirm records a host's confirmation (keyproto.Confirmation): POST to
// its key URL + keyproto.ConfirmSuffix, authorized and limited exactly
// like a key request. 200 answers the state now, 409 a confirmation that
// does not fit the record (nothing changed).
func (h *Handler) confirm(w http.ResponseWriter, r *http.Request, ev *AuditEvent, seg string) {
	if r.ContentLength > keyproto.MaxConfirmBody {
		h.failed(SourceOf(r.RemoteAddr))
		h.fail(w, ev, http.StatusRequestEntityTooLarge, OutcomeBadRequest, fmt.Sprintf("confirmation body over %d bytes", keyproto.MaxConfirmBody))
		return
	}
	rec, ok := h.authorize(w, r, ev, seg, http.MethodPost)
	if !ok {
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, keyproto.MaxConfirmBody+1))
	var c keyproto.Confirmation
	switch {
	case err != nil:
		h.fail(w, ev, http.StatusBadRequest, OutcomeBadRequest, "confirmation body: read failed")
		return
	case len(body) > keyproto.MaxConfirmBody:
		h.fail(w, ev, http.StatusRequestEntityTooLarge, OutcomeBadRequest, fmt.Sprintf("confirmation body over %d bytes", keyproto.MaxConfirmBody))
		return
	case json.Unmarshal(body, &c) != nil:
		h.fail(w, ev, http.StatusBadRequest, OutcomeBadRequest, `confirmation body: want JSON {"event":"provisioned"|"rotated","key":"ID"}`)
		return
	}
	if err := c.Validate(); err != nil {
		h.fail(w, ev, http.StatusBadRequest, OutcomeBadRequest, err.Error())
		return
	}
	ev.Event, ev.KeyIDs = c.Event, []string{c.Key}
	ctx, cancel := context.WithTimeout(r.Context(), h.c.storeTimeout)
	defer cancel()
	a := Admin{Store: h.c.store, Sealer: h.c.sealer, Now: h.c.now}
	st, changed, err := a.Confirm(ctx, rec.ID, c)
	switch {
	case errors.Is(err, ErrConfirm):
		h.fail(w, ev, http.StatusConflict, OutcomeConflict, err.Error())
		return
	case errors.Is(err, store.ErrBusy), errors.Is(err, context.DeadlineExceeded):
		ev.Error = err.Error()
		h.tooMany(w, ev, time.Second, http.StatusServiceUnavailable, OutcomeBusy)
		return
	case err != nil:
		ev.Error = err.Error()
		h.c.logger.Printf("keyserver: host %q: confirm: %v", rec.ID, err)
		h.fail(w, ev, http.StatusInternalServerError, OutcomeError, "internal error")
		return
	}
	out, _ := json.Marshal(struct {
		State   string `json:"state"`
		Changed bool   `json:"changed"`
	}{string(st), changed})
	w.Header().Set("Content-Type", keyproto.ContentTypeJSON)
	w.WriteHeader(http.StatusOK)
	w.Write(out)
	ev.Status, ev.Outcome = http.StatusOK, OutcomeConfirmed
}

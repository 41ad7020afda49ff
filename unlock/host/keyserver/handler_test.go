package keyserver

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// fakeClock is a settable clock for the rate limits.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// harness is a handler over a memory store with one host, "db-1".
type harness struct {
	t       testing.TB
	store   store.Store
	admin   *Admin
	h       *Handler
	clock   *fakeClock
	token   string
	auditMu sync.Mutex
	events  []AuditEvent
	lines   bytes.Buffer // the same events as JSON lines
}

func newHarness(t testing.TB, opts ...Option) *harness {
	t.Helper()
	x := &harness{t: t, store: store.NewMemory(), clock: &fakeClock{t: time.Date(2026, 11, 3, 9, 0, 0, 0, time.UTC)}}
	sealer := testSealer(t, 1)
	x.admin = &Admin{Store: x.store, Sealer: sealer, Now: x.clock.Now}
	if _, err := x.store.MasterKeyID(context.Background(), sealer.ID()); err != nil {
		t.Fatal(err)
	}
	var err error
	if x.token, err = x.admin.AddHost(context.Background(), "db-1", nil); err != nil {
		t.Fatal(err)
	}
	jsonSink := JSONAudit(&x.lines)
	base := []Option{
		WithStore(x.store), WithSealer(sealer), WithClock(x.clock.Now),
		WithLogger(ulogtest.New(t)),
		WithAudit(func(ev AuditEvent) {
			x.auditMu.Lock()
			x.events = append(x.events, ev)
			x.auditMu.Unlock()
			jsonSink(ev)
		}),
	}
	if x.h, err = New(append(base, opts...)...); err != nil {
		t.Fatal(err)
	}
	return x
}

func (x *harness) do(method, path, token string) *httptest.ResponseRecorder {
	return x.doFrom("192.0.2.1:1234", method, path, token)
}

// doFrom is do from the client address remote ("ip:port").
func (x *harness) doFrom(remote, method, path, token string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, "https://keys.test"+path, nil)
	r.RemoteAddr = remote
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	w := httptest.NewRecorder()
	x.h.ServeHTTP(w, r)
	return w
}

func (x *harness) lastEvent() AuditEvent {
	x.auditMu.Lock()
	defer x.auditMu.Unlock()
	if len(x.events) == 0 {
		x.t.Fatal("no audit event")
	}
	return x.events[len(x.events)-1]
}

// served decodes a 200 answer into key ids and keys.
func served(t *testing.T, w *httptest.ResponseRecorder) ([]string, [][]byte) {
	t.Helper()
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	var r keyproto.Response
	if err := json.Unmarshal(w.Body.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	keys, err := keyproto.Decode(w.Header().Get("Content-Type"), w.Body.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, k := range r.Keys {
		ids = append(ids, k.ID)
	}
	return ids, keys
}

func TestServeKeys(t *testing.T) {
	x := newHarness(t)
	w := x.do("GET", "/v1/keys/db-1", x.token)
	ids, keys := served(t, w)
	wantIDs, wantKeys, err := x.admin.Keys(context.Background(), "db-1")
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(ids) != fmt.Sprint(wantIDs) || len(keys) != 1 || !bytes.Equal(keys[0], wantKeys[0]) || len(keys[0]) != KeySize {
		t.Fatalf("served %v %x, want %v %x", ids, keys, wantIDs, wantKeys)
	}
	if ct := w.Header().Get("Content-Type"); ct != keyproto.ContentTypeJSON {
		t.Fatalf("Content-Type %q", ct)
	}
	if w.Header().Get("Cache-Control") != "no-store" {
		t.Fatal("key response may be cached")
	}
	ev := x.lastEvent()
	if ev.Outcome != OutcomeOK || ev.Status != 200 || ev.Host != "db-1" || ev.Remote == "" || fmt.Sprint(ev.KeyIDs) != fmt.Sprint(wantIDs) {
		t.Fatalf("audit %+v", ev)
	}
	x.assertAuditClean(keys)
}

// assertAuditClean checks no secret reached the audit lines.
func (x *harness) assertAuditClean(keys [][]byte) {
	x.t.Helper()
	log := x.lines.String()
	secrets := []string{x.token}
	for _, k := range keys {
		secrets = append(secrets, base64.StdEncoding.EncodeToString(k), string(k))
	}
	for _, s := range secrets {
		if strings.Contains(log, s) {
			x.t.Fatalf("audit log holds a secret: %s", log)
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(log), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			x.t.Fatalf("audit line %q is not JSON: %v", line, err)
		}
	}
}

func TestAuthFailures(t *testing.T) {
	x := newHarness(t, WithHostLimit(Limit{}), WithSourceFailLimit(Limit{}))
	other, err := x.admin.AddHost(context.Background(), "db-2", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		auth    string
		status  int
		outcome string
	}{
		{"missing", "", 401, OutcomeNoToken},
		{"wrong", "Bearer AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", 401, OutcomeBadToken},
		{"other host's token", "Bearer " + other, 401, OutcomeBadToken},
		{"basic scheme", "Basic " + x.token, 401, OutcomeNoToken},
		{"empty bearer", "Bearer ", 401, OutcomeNoToken},
		{"huge", "Bearer " + strings.Repeat("a", 4096), 401, OutcomeNoToken},
		{"lower-case scheme", "bearer " + x.token, 200, OutcomeOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/v1/keys/db-1", nil)
			if tc.auth != "" {
				r.Header.Set("Authorization", tc.auth)
			}
			w := httptest.NewRecorder()
			x.h.ServeHTTP(w, r)
			if w.Code != tc.status {
				t.Fatalf("status %d, want %d", w.Code, tc.status)
			}
			if tc.status == 401 && !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer") {
				t.Fatal("401 without WWW-Authenticate")
			}
			if ev := x.lastEvent(); ev.Outcome != tc.outcome || ev.Status != tc.status || ev.Host != "db-1" {
				t.Fatalf("audit %+v", ev)
			}
		})
	}

	if err := x.admin.SetState(context.Background(), "db-1", store.Revoked); err != nil {
		t.Fatal(err)
	}
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 403 || x.lastEvent().Outcome != OutcomeRevoked {
		t.Fatalf("revoked host: %d %+v", w.Code, x.lastEvent())
	}
	// Without the right token, revocation is not disclosed.
	if w := x.do("GET", "/v1/keys/db-1", other); w.Code != 401 {
		t.Fatalf("revoked host, wrong token: %d", w.Code)
	}
	if err := x.admin.SetState(context.Background(), "db-1", store.Active); err != nil {
		t.Fatal(err)
	}
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("reinstated host: %d", w.Code)
	}

	// A new token replaces the old one at once.
	tok2, err := x.admin.NewToken(context.Background(), "db-1")
	if err != nil {
		t.Fatal(err)
	}
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 401 {
		t.Fatalf("old token after NewToken: %d", w.Code)
	}
	if w := x.do("GET", "/v1/keys/db-1", tok2); w.Code != 200 {
		t.Fatalf("new token: %d", w.Code)
	}
	x.assertAuditClean(nil)
	if strings.Contains(x.lines.String(), tok2) || strings.Contains(x.lines.String(), other) {
		t.Fatal("audit log holds a token")
	}
}

func TestRequestErrors(t *testing.T) {
	x := newHarness(t, WithHostLimit(Limit{}), WithSourceFailLimit(Limit{}))
	for _, tc := range []struct {
		method, path string
		status       int
		outcome      string
	}{
		{"GET", "/v1/keys/nope", 404, OutcomeUnknownHost},
		{"GET", "/v1/keys/", 400, OutcomeBadHost},
		{"GET", "/v1/keys/..", 400, OutcomeBadHost},
		{"GET", "/v1/keys/%2e%2e", 400, OutcomeBadHost},
		{"GET", "/v1/keys/a%2Fb", 400, OutcomeBadHost},
		{"GET", "/v1/keys/db-1/x", 400, OutcomeBadHost},
		{"GET", "/v1/keys/-db", 400, OutcomeBadHost},
		{"GET", "/v1/keys/" + strings.Repeat("a", 200), 400, OutcomeBadHost},
		{"POST", "/v1/keys/db-1", 405, OutcomeMethodNotAllowed},
		{"HEAD", "/v1/keys/db-1", 405, OutcomeMethodNotAllowed},
		{"DELETE", "/v1/keys/db-1", 405, OutcomeMethodNotAllowed},
		{"GET", "/", 404, OutcomeNotFound},
		{"GET", "/v1/keys", 404, OutcomeNotFound},
		{"GET", "/v2/keys/db-1", 404, OutcomeNotFound},
		{"POST", "/healthz", 405, OutcomeMethodNotAllowed},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			w := x.do(tc.method, tc.path, x.token)
			if w.Code != tc.status {
				t.Fatalf("status %d, want %d", w.Code, tc.status)
			}
			if tc.status == 405 && w.Header().Get("Allow") == "" {
				t.Fatal("405 without Allow")
			}
			if ev := x.lastEvent(); ev.Outcome != tc.outcome || ev.Status != tc.status {
				t.Fatalf("audit %+v", ev)
			}
		})
	}
	// Escaped but valid ids are accepted.
	if w := x.do("GET", "/v1/keys/db%2D1", x.token); w.Code != 200 {
		t.Fatalf("escaped id: %d", w.Code)
	}
	x.assertAuditClean(nil)
}

func TestRotation(t *testing.T) {
	x := newHarness(t)
	ctx := context.Background()
	ids0, keys0 := served(t, x.do("GET", "/v1/keys/db-1", x.token))

	x.clock.Add(40 * 24 * time.Hour)
	kid, err := x.admin.Rotate(ctx, "db-1")
	if err != nil {
		t.Fatal(err)
	}
	if kid != "2026-12" {
		t.Fatalf("new key id %q", kid)
	}
	if _, err := x.admin.Rotate(ctx, "db-1"); !errors.Is(err, ErrRotating) {
		t.Fatalf("second rotate: %v", err)
	}
	ids1, keys1 := served(t, x.do("GET", "/v1/keys/db-1", x.token))
	if fmt.Sprint(ids1) != "[2026-12 "+ids0[0]+"]" || !bytes.Equal(keys1[1], keys0[0]) || bytes.Equal(keys1[0], keys0[0]) {
		t.Fatalf("during rotation: %v", ids1)
	}

	dropped, err := x.admin.FinishRotation(ctx, "db-1")
	if err != nil || fmt.Sprint(dropped) != fmt.Sprint(ids0) {
		t.Fatalf("finish: %v %v", dropped, err)
	}
	ids2, keys2 := served(t, x.do("GET", "/v1/keys/db-1", x.token))
	if fmt.Sprint(ids2) != "[2026-12]" || !bytes.Equal(keys2[0], keys1[0]) {
		t.Fatalf("after finish: %v", ids2)
	}
	if dropped, err := x.admin.FinishRotation(ctx, "db-1"); err != nil || dropped != nil {
		t.Fatalf("finish without rotation: %v %v", dropped, err)
	}

	// Two rotations in a month get distinct ids.
	if kid, _ := x.admin.Rotate(ctx, "db-1"); kid != "2026-12.2" {
		t.Fatalf("same-month rotation id %q", kid)
	}
}

func TestGlobalRateLimit(t *testing.T) {
	x := newHarness(t, WithGlobalLimit(Limit{PerSecond: 0.5, Burst: 2}), WithHostLimit(Limit{}))
	// Requests without the token spend nothing of the global bucket.
	for range 5 {
		if w := x.doFrom("198.51.100.7:1", "GET", "/v1/keys/db-1", ""); w.Code != 401 {
			t.Fatalf("no token: %d", w.Code)
		}
	}
	for i := range 2 {
		if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
			t.Fatalf("request %d: %d", i, w.Code)
		}
	}
	w := x.do("GET", "/v1/keys/db-1", x.token)
	if w.Code != 429 || w.Header().Get("Retry-After") != "2" {
		t.Fatalf("3rd request: %d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
	if ev := x.lastEvent(); ev.Outcome != OutcomeRateLimited {
		t.Fatalf("audit %+v", ev)
	}
	// Unknown hosts are charged to their source, not to the global
	// bucket: they still get their 404.
	if w := x.do("GET", "/v1/keys/other", x.token); w.Code != 404 {
		t.Fatalf("other host: %d", w.Code)
	}
	// Health checks spend nothing either.
	if w := x.do("GET", "/healthz", ""); w.Code != 200 {
		t.Fatalf("healthz while limited: %d", w.Code)
	}
	x.clock.Add(2 * time.Second)
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("after refill: %d", w.Code)
	}
}

func TestHostRateLimit(t *testing.T) {
	x := newHarness(t, WithHostLimit(Limit{PerSecond: 0.1, Burst: 1}))
	if _, err := x.admin.AddHost(context.Background(), "db-2", nil); err != nil {
		t.Fatal(err)
	}
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatal(w.Code)
	}
	w := x.do("GET", "/v1/keys/db-1", x.token)
	if w.Code != 429 || w.Header().Get("Retry-After") != "10" {
		t.Fatalf("2nd request: %d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
	// A wrong token is not charged to the host's bucket (it is charged
	// to its source): it gets its 401, and the host's bucket is intact.
	if w := x.do("GET", "/v1/keys/db-2", "x"); w.Code != 401 {
		t.Fatalf("wrong token: %d", w.Code)
	}
	x.clock.Add(10 * time.Second)
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("after refill: %d", w.Code)
	}
}

// countingStore counts lookups: refused requests must not reach the store.
type countingStore struct {
	store.Store
	gets atomic.Int64
}

func (c *countingStore) Get(ctx context.Context, id string) (store.Host, error) {
	c.gets.Add(1)
	return c.Store.Get(ctx, id)
}

// TestNoOneWithoutTheTokenLocksAHostOut is the lock-out of issue 12: a
// client without the token asking for a host's URL as fast as it likes,
// with no token and with wrong ones, from one address and from many,
// must not keep the host (default limits) from its key.
func TestNoOneWithoutTheTokenLocksAHostOut(t *testing.T) {
	x := newHarness(t)
	for round := range 20 {
		for i := range 50 {
			attacker := fmt.Sprintf("203.0.113.%d:4000", i%3)
			if i%2 == 0 {
				x.doFrom(attacker, "GET", "/v1/keys/db-1", "")
			} else {
				x.doFrom(attacker, "GET", "/v1/keys/db-1", "wrong-token")
			}
		}
		// Hosts fetch far less often than their bucket allows.
		if round%5 == 0 {
			if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
				t.Fatalf("round %d: the host got %d: %s", round, w.Code, w.Body)
			}
		}
		x.clock.Add(time.Second)
	}
}

// TestSourceFailLimit: a source that keeps failing is refused before any
// store work; other sources are not affected, and it recovers.
func TestSourceFailLimit(t *testing.T) {
	x := newHarness(t, WithSourceFailLimit(Limit{PerSecond: 0.5, Burst: 3}), WithFailLimit(Limit{}))
	cs := &countingStore{Store: x.store}
	x.h.c.store = cs
	const bad = "203.0.113.9:555"
	for i := range 3 {
		if w := x.doFrom(bad, "GET", "/v1/keys/db-1", "wrong"); w.Code != 401 {
			t.Fatalf("failure %d: %d", i, w.Code)
		}
	}
	before := cs.gets.Load()
	w := x.doFrom(bad, "GET", "/v1/keys/db-1", "wrong")
	if w.Code != 429 || w.Header().Get("Retry-After") != "2" {
		t.Fatalf("4th failure: %d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
	// Even with the right token: the source is what is limited.
	if w := x.doFrom(bad, "GET", "/v1/keys/db-1", x.token); w.Code != 429 {
		t.Fatalf("limited source, right token: %d", w.Code)
	}
	if n := cs.gets.Load() - before; n != 0 {
		t.Fatalf("%d store lookups for refused requests", n)
	}
	// The same /64 is the same source; another address is not.
	x.doFrom("[2001:db8:1:2::1]:1", "GET", "/v1/keys/db-1", "")
	x.doFrom("[2001:db8:1:2::2]:1", "GET", "/v1/keys/db-1", "")
	x.doFrom("[2001:db8:1:2:ffff::3]:1", "GET", "/v1/keys/db-1", "")
	if w := x.doFrom("[2001:db8:1:2::4]:1", "GET", "/v1/keys/db-1", x.token); w.Code != 429 {
		t.Fatalf("same /64: %d", w.Code)
	}
	if w := x.doFrom("[2001:db8:1:3::1]:1", "GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("other /64: %d", w.Code)
	}
	if w := x.do("GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("other source: %d", w.Code)
	}
	x.clock.Add(2 * time.Second)
	if w := x.doFrom(bad, "GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("after refill: %d", w.Code)
	}
}

// TestFailBudgetSparesCleanSources: many failing sources spend the
// global failure budget; then a source with failures is refused although
// its own bucket has room, and a source without failures is served.
func TestFailBudgetSparesCleanSources(t *testing.T) {
	x := newHarness(t, WithSourceFailLimit(Limit{PerSecond: 0.1, Burst: 5}), WithFailLimit(Limit{PerSecond: 1, Burst: 4}))
	for i := range 4 {
		x.doFrom(fmt.Sprintf("203.0.113.%d:1", i), "GET", "/v1/keys/db-1", "")
	}
	w := x.doFrom("203.0.113.0:1", "GET", "/v1/keys/db-1", x.token)
	if w.Code != 429 || w.Header().Get("Retry-After") != "1" {
		t.Fatalf("failed source once the budget is spent: %d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
	if w := x.doFrom("198.51.100.1:1", "GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("clean source: %d", w.Code)
	}
	x.clock.Add(time.Second)
	if w := x.doFrom("203.0.113.0:1", "GET", "/v1/keys/db-1", x.token); w.Code != 200 {
		t.Fatalf("after refill: %d", w.Code)
	}
}

func TestSourceOf(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1:443":              "192.0.2.1/32",
		"[::ffff:192.0.2.1]:443":     "192.0.2.1/32",
		"[2001:db8:1:2:3:4:5:6]:443": "2001:db8:1:2::/64",
		"[fe80::1%eth0]:443":         "fe80::/64",
		"2001:db8::1":                "2001:db8::/64",
		"garbage":                    "invalid Prefix",
	} {
		if got := SourceOf(in).String(); got != want {
			t.Errorf("SourceOf(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestHostLimiterBounded(t *testing.T) {
	hl := newKeyedLimiters[string](Limit{PerSecond: 1, Burst: 2})
	now := time.Unix(0, 0)
	for i := range 3 * limiterSweep {
		hl.take(fmt.Sprint("h", i), now)
		now = now.Add(100 * time.Millisecond) // each bucket refills after 0.1s*10
	}
	if n := hl.len(); n > limiterSweep+1 {
		t.Fatalf("%d limiters kept", n)
	}
}

type busyStore struct{ store.Store }

func (busyStore) Get(ctx context.Context, id string) (store.Host, error) {
	return store.Host{}, fmt.Errorf("test: %w", store.ErrBusy)
}

func TestStoreBusy(t *testing.T) {
	x := newHarness(t)
	x.h.c.store = busyStore{x.store}
	w := x.do("GET", "/v1/keys/db-1", x.token)
	if w.Code != 503 || w.Header().Get("Retry-After") == "" {
		t.Fatalf("%d Retry-After %q", w.Code, w.Header().Get("Retry-After"))
	}
	if ev := x.lastEvent(); ev.Outcome != OutcomeBusy {
		t.Fatalf("audit %+v", ev)
	}
}

// A record whose keys no longer open (tampered, or copied from another
// host) is an internal error, never served, and named in the audit.
func TestTamperedRecord(t *testing.T) {
	x := newHarness(t)
	ctx := context.Background()
	tok2, _ := x.admin.AddHost(ctx, "db-2", nil)
	src, _ := x.store.Get(ctx, "db-1")
	if _, err := x.store.Update(ctx, "db-2", func(h *store.Host) error {
		h.Keys = src.Keys // db-1's sealed key moved to db-2
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	w := x.do("GET", "/v1/keys/db-2", tok2)
	if w.Code != 500 {
		t.Fatalf("moved key: %d", w.Code)
	}
	if ev := x.lastEvent(); ev.Outcome != OutcomeError || !strings.Contains(ev.Error, "db-2") {
		t.Fatalf("audit %+v", ev)
	}
	_, keys, _ := x.admin.Keys(ctx, "db-1")
	x.assertAuditClean(keys)
}

func TestHealth(t *testing.T) {
	x := newHarness(t)
	w := x.do("GET", "/healthz", "")
	if w.Code != 200 || w.Body.String() != "ok\n" {
		t.Fatalf("%d %q", w.Code, w.Body)
	}
	// A store sealed under another master key is unhealthy.
	other := store.NewMemory()
	other.MasterKeyID(context.Background(), testSealer(t, 2).ID())
	x.h.c.store = other
	x.clock.Add(2 * healthTTL)
	if w := x.do("GET", "/healthz", ""); w.Code != 503 {
		t.Fatalf("other store: %d", w.Code)
	}
}

func TestNewRequiresStoreAndSealer(t *testing.T) {
	if _, err := New(WithStore(store.NewMemory())); err == nil {
		t.Fatal("New without sealer succeeded")
	}
}

func FuzzHostFromPath(f *testing.F) {
	for _, s := range []string{"db-1", "", "..", "%2e", "a/b", "a%2Fb", "%", "x%00", "4c4c4544-0042"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, seg string) {
		id, err := hostFromPath(seg)
		if err != nil {
			return
		}
		if ValidHostID(id) != nil || id == "." || id == ".." || strings.ContainsAny(id, "/%\x00") {
			t.Fatalf("%q parsed to bad id %q", seg, id)
		}
	})
}

// FuzzServePath sends arbitrary paths through the whole handler: it must
// not panic, must answer one of the statuses DESIGN §5 allows, and may only
// serve keys for the exact host.
func FuzzServePath(f *testing.F) {
	for _, s := range []string{"/v1/keys/db-1", "/v1/keys/db%2d1", "/v1/keys/../keys/db-1", "/healthz", "//v1/keys/db-1", "/v1/keys/db-1?x=1"} {
		f.Add(s)
	}
	x := newHarness(f, WithGlobalLimit(Limit{}), WithHostLimit(Limit{}), WithAudit(nil),
		WithLogger(log.New(io.Discard, "", 0)))
	f.Fuzz(func(t *testing.T, path string) {
		r, err := http.NewRequest("GET", "https://keys.test/", nil)
		if err != nil {
			t.Skip()
		}
		r.URL.RawPath, r.URL.Path = "", ""
		u, err := r.URL.Parse(path)
		if err != nil {
			return
		}
		r.URL = u
		r.Header.Set("Authorization", "Bearer "+x.token)
		w := httptest.NewRecorder()
		x.h.ServeHTTP(w, r)
		switch w.Code {
		case 200:
			if p := u.EscapedPath(); p != HealthPath {
				if id, err := hostFromPath(strings.TrimPrefix(p, KeysPath)); err != nil || id != "db-1" {
					t.Fatalf("%q served keys", path)
				}
			}
		case 400, 404, 405:
		default:
			t.Fatalf("%q: status %d", path, w.Code)
		}
	})
}

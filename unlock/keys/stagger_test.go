package keys

import (
	"errors"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// statusLineRE is the one shape every status line has: the server, the
// cause, and what happens next.
var statusLineRE = regexp.MustCompile(`^(\S+): (.+); (trying \S+( as well)?|waiting for \S+(, \S+)*|retrying in ([0-9]+\.[0-9]s|[0-9]+m[0-9]+s|[0-9]+h[0-9]+m[0-9]+s)|giving up)$`)

// checkStatusLines holds every line Fetch logged to that shape, and keeps
// dialer noise ("dial tcp ...: connect:") out of them.
func checkStatusLines(t *testing.T, log *ulogtest.Logger) {
	t.Helper()
	for _, l := range log.Lines() {
		m := statusLineRE.FindStringSubmatch(l)
		if m == nil || strings.Contains(l, "\n") {
			t.Errorf("status line %q is not \"server: cause; next step\"", l)
			continue
		}
		if strings.Contains(m[2], "dial tcp") || strings.Contains(m[2], m[1]+": ") {
			t.Errorf("status line %q repeats the server in its cause", l)
		}
	}
}

// blackHole accepts TCP connections and never says a word: a server
// whose TLS stack hangs, or a firewall that accepts and drops. It reports
// on closed each time a client hangs up.
func blackHole(t *testing.T) string {
	addr, _ := blackHoleWatch(t)
	return addr
}

func blackHoleWatch(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var closed atomic.Int32
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
			go func() {
				io.Copy(io.Discard, c) // returns when the client hangs up
				closed.Add(1)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String(), &closed
}

// TestStaggeredStartPastABlackHole: the first server accepts TCP and
// never answers; the second is started after Stagger, answers, and the
// attempt to the first is cancelled (its connection closed) rather than
// left to run out its attempt timeout.
func TestStaggeredStartPastABlackHole(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	hole, closed := blackHoleWatch(t)
	k, err, log, waits := fetch(t, []string{"https://" + hole + "/{host}", urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.AttemptTimeout = time.Hour // only the stagger can get past the hole
		c.Stagger = 100 * time.Millisecond
	})
	if err != nil {
		t.Fatal(err)
	}
	k.Wipe()
	want := hole + ": no answer yet after 100ms; trying " + s.Listener.Addr().String() + " as well"
	if log.String() != want || len(waits) != 0 {
		t.Fatalf("log %q, waits %v; want %q and no wait", log, waits, want)
	}
	// Fetch has returned, so the client side is closed; the server side
	// notices in its own time.
	for deadline := time.Now().Add(time.Minute); closed.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if closed.Load() != 1 {
		t.Fatalf("the attempt to the black hole was not cancelled (%d connections closed)", closed.Load())
	}
}

// TestHealthyFirstServerIsTheOnlyOneAsked: with the first server
// answering, the second never sees a request.
func TestHealthyFirstServerIsTheOnlyOneAsked(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	a := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	b := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	for range 3 {
		k, err, _, _ := fetch(t, []string{urlOf(a), urlOf(b)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
			c.Stagger = time.Hour // a slow machine must not start b
		})
		if err != nil || k.Server != a.Listener.Addr().String() {
			t.Fatalf("k=%v err=%v", k, err)
		}
		k.Wipe()
	}
	if a.requests.Load() != 3 || b.requests.Load() != 0 {
		t.Fatalf("requests: first %d, second %d; want 3 and 0", a.requests.Load(), b.requests.Load())
	}
}

// TestRaceBothAnswer: both servers started (stagger ~0) and both answer;
// one answer is used, the other's keys are drained and wiped, not leaked.
func TestRaceBothAnswer(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	a := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	b := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	k, err, _, _ := fetch(t, []string{urlOf(a), urlOf(b)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.Stagger = time.Nanosecond
	})
	if err != nil {
		t.Fatal(err)
	}
	k.Wipe()
}

// TestRoundWaitIsTheLongestAskedFor: one server says Retry-After 20, the
// other is down; the next round waits for the first's 20 s, and each
// failure has its line.
func TestRoundWaitIsTheLongestAskedFor(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	busy := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "20")
		w.WriteHeader(429)
	})
	down := closedPort(t)
	_, err, log, waits := fetch(t, []string{urlOf(busy), "https://" + down + "/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.Stagger = time.Hour
	})
	if !errors.Is(err, errStop) || len(waits) != 1 || waits[0] < 20*time.Second || waits[0] > 22*time.Second {
		t.Fatalf("err=%v waits=%v", err, waits)
	}
	lines := log.Lines()
	if len(lines) != 2 || lines[0] != busy.Listener.Addr().String()+": 429 too many requests; trying "+down ||
		!strings.HasPrefix(lines[1], down+": connection refused; retrying in 2") {
		t.Fatalf("lines %q", lines)
	}
}

// TestWaitingForASlowerServer: the second server fails fast while the
// first is still out; the line says the first is still awaited.
func TestWaitingForASlowerServer(t *testing.T) {
	hole := blackHole(t)
	down := closedPort(t)
	_, err, log, _ := fetch(t, []string{"https://" + hole + "/{host}", "https://" + down + "/{host}"}, []pin.Pin{{}}, 1, func(c *Config) {
		c.Stagger = time.Nanosecond
		c.AttemptTimeout = 500 * time.Millisecond
	})
	if !errors.Is(err, errStop) {
		t.Fatal(err)
	}
	lines := log.Lines()
	if len(lines) != 3 || lines[1] != down+": connection refused; waiting for "+hole ||
		!strings.HasPrefix(lines[2], hole+": no TLS handshake within 500ms; retrying in ") {
		t.Fatalf("lines %q", lines)
	}
}

func TestRetryAfterZeroIsNoTightLoop(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "0")
		w.WriteHeader(503)
	})
	_, _, _, waits := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if len(waits) != 1 || waits[0] < time.Second {
		t.Fatalf("waits %v, want at least the 1s base", waits)
	}
}

func TestRetryAfterCapped(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "86400")
		w.WriteHeader(503)
	})
	_, _, log, waits := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if len(waits) != 1 || waits[0] < maxRetryAfter || waits[0] > maxRetryAfter*11/10 {
		t.Fatalf("waits %v, want about %s", waits, maxRetryAfter)
	}
	if !strings.Contains(log.String(), "retrying in 10m") && !strings.Contains(log.String(), "retrying in 11m") {
		t.Fatalf("log %s", log)
	}
}

// Test429WithoutRetryAfter: the ordinary jittered backoff applies.
func Test429WithoutRetryAfter(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(429) })
	_, _, log, waits := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 3, func(c *Config) {
		c.Backoff = Backoff{Base: time.Second, Cap: 60 * time.Second}
	})
	if len(waits) != 3 || !strings.Contains(log.String(), "429 too many requests; retrying in") {
		t.Fatalf("waits %v log %s", waits, log)
	}
	for i, w := range waits {
		if w <= 0 || w > time.Second<<i {
			t.Fatalf("wait %d = %s, want in (0, %s]", i, w, time.Second<<i)
		}
	}
}

func TestNotFoundLongBackoff(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	_, err, log, waits := fetch(t, []string{s.URL + "/v1/keys/{host}x"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "404 unknown host") || waits[0] < 30*time.Second {
		t.Fatalf("err=%v waits=%v log=%s", err, waits, log)
	}
}

func TestFmtDur(t *testing.T) {
	for d, want := range map[time.Duration]string{
		4200 * time.Millisecond: "4.2s",
		59 * time.Second:        "59.0s",
		90 * time.Second:        "1m30s",
		10 * time.Minute:        "10m0s",
		time.Millisecond:        "0.0s",
	} {
		if got := fmtDur(d); got != want {
			t.Errorf("fmtDur(%s) = %q, want %q", d, got, want)
		}
	}
}

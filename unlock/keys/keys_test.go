package keys

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// certKit makes real certificates for the tests.
type certKit struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func makeCert(t *testing.T, tmpl *x509.Certificate, parent *certKit, key *ecdsa.PrivateKey) *certKit {
	t.Helper()
	if key == nil {
		key = newKey(t)
	}
	signer, parentCert := key, tmpl
	if parent != nil {
		signer, parentCert = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parentCert, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &certKit{key: key, cert: c, der: der}
}

var serial int64

func template(cn string, ca bool, notBefore, notAfter time.Time) *x509.Certificate {
	serial++
	t := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
	}
	if ca {
		t.IsCA = true
		t.BasicConstraintsValid = true
		t.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	} else {
		t.KeyUsage = x509.KeyUsageDigitalSignature
		t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		t.DNSNames = []string{"localhost"}
	}
	return t
}

func validTemplate(cn string, ca bool) *x509.Certificate {
	return template(cn, ca, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
}

// server is a real TLS key server for one test.
type server struct {
	*httptest.Server
	requests atomic.Int32
}

func startServer(t *testing.T, chain []*certKit, h http.HandlerFunc) *server {
	t.Helper()
	s := &server{}
	hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		h(w, r)
	}))
	var certs [][]byte
	for _, c := range chain {
		certs = append(certs, c.der)
	}
	hs.Config.ErrorLog = stdlog.New(io.Discard, "", 0) // refused handshakes are the point
	hs.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: certs, PrivateKey: chain[0].key}}}
	hs.StartTLS()
	t.Cleanup(hs.Close)
	s.Server = hs
	return s
}

var testKey = []byte("correct horse battery staple \x00\x01\x02 key")

// testToken is the bearer token every test sends; like the key, it must
// never show up in logs or errors.
const testToken = "T0k3n-s3cr3t_value.9f8e7d6c"

func keyHandler(keys ...[]byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+testToken {
			w.WriteHeader(401)
			return
		}
		if r.URL.Path != "/v1/keys/host-1" {
			w.WriteHeader(404)
			return
		}
		ids := make([]string, len(keys))
		for i := range ids {
			ids[i] = fmt.Sprint(i)
		}
		b, _ := keyproto.Encode(ids, keys)
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	}
}

var errStop = errors.New("test: stop after one round")

// fetch runs Fetch for at most `rounds` rounds, recording the waits.
func fetch(t *testing.T, urls []string, pins []pin.Pin, rounds int, mod func(*Config)) (*Keys, error, *ulogtest.Logger, []time.Duration) {
	t.Helper()
	var waits []time.Duration
	cfg := Config{
		URLs:           urls,
		Pins:           pins,
		Host:           "host-1",
		Token:          []byte(testToken),
		AttemptTimeout: 5 * time.Second,
		Sleep: func(ctx context.Context, d time.Duration) error {
			waits = append(waits, d)
			if len(waits) >= rounds {
				return errStop
			}
			return nil
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	log := &ulogtest.Logger{}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	k, err := Fetch(ctx, cfg, log)
	checkNoSecret(t, log.String(), err)
	checkStatusLines(t, log)
	return k, err, log, waits
}

// checkNoSecret asserts no key byte sequence or token reaches logs or
// errors, in any encoding the code might plausibly use.
func checkNoSecret(t *testing.T, logs string, err error) {
	t.Helper()
	all := logs
	if err != nil {
		all += "\n" + err.Error()
	}
	for _, form := range []string{
		string(testKey), "correct horse", base64.StdEncoding.EncodeToString(testKey),
		hex.EncodeToString(testKey), fmt.Sprintf("%v", testKey), fmt.Sprintf("%q", testKey), fmt.Sprintf("%x", testKey),
		testToken, base64.StdEncoding.EncodeToString([]byte(testToken)), hex.EncodeToString([]byte(testToken)),
	} {
		if strings.Contains(all, form) {
			t.Fatalf("secret (%q) leaked into logs or error:\n%s", form, all)
		}
	}
}

func urlOf(s *server) string { return s.URL + "/v1/keys/{host}" }

func TestLeafPin(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey, []byte("old")))
	k, err, _, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(k.Keys) != 2 || !bytes.Equal(k.Keys[0].Bytes(), testKey) || string(k.Keys[1].Bytes()) != "old" {
		t.Fatalf("keys = %v", k.Keys)
	}
	// Hold the buffers the stage handed over: Wipe must zero them, not
	// merely drop them.
	held := [][]byte{k.Keys[0].Bytes(), k.Keys[1].Bytes()}
	k.Wipe()
	for i, b := range held {
		if !bytes.Equal(b, make([]byte, len(b))) {
			t.Errorf("Wipe left key %d readable: %q", i, b)
		}
	}
}

func TestWrongPinSendsNothing(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	other := makeCert(t, validTemplate("other", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(other.cert)}, 1, nil)
	if !errors.Is(err, errStop) {
		t.Fatalf("err = %v", err)
	}
	if n := s.requests.Load(); n != 0 {
		t.Fatalf("server saw %d HTTP requests despite the wrong pin", n)
	}
	if !strings.Contains(log.String(), "pin check failed") || !strings.Contains(log.String(), s.Listener.Addr().String()) {
		t.Fatalf("log does not name the refusal and the server: %s", log)
	}
}

func TestCAPinValidChain(t *testing.T) {
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	leaf := makeCert(t, validTemplate("leaf", false), ca, nil)
	s := startServer(t, []*certKit{leaf, ca}, keyHandler(testKey))
	k, err, _, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k.Keys[0].Bytes(), testKey) {
		t.Fatal("wrong key")
	}
}

func TestCAPinForgedLeafBesideRealCA(t *testing.T) {
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	evilCA := makeCert(t, validTemplate("ca", true), nil, nil)
	forged := makeCert(t, validTemplate("leaf", false), evilCA, nil)
	s := startServer(t, []*certKit{forged, ca}, keyHandler(testKey))
	_, err, log, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
	if !errors.Is(err, errStop) || s.requests.Load() != 0 {
		t.Fatalf("forged leaf accepted: err=%v requests=%d", err, s.requests.Load())
	}
	if !strings.Contains(log.String(), "does not verify up to a configured CA certificate") {
		t.Fatalf("log: %s", log)
	}
}

func TestCAPinWrongHostName(t *testing.T) {
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	tmpl := validTemplate("leaf", false)
	tmpl.IPAddresses = nil
	tmpl.DNSNames = []string{"keys.example.net"}
	leaf := makeCert(t, tmpl, ca, nil)
	s := startServer(t, []*certKit{leaf, ca}, keyHandler(testKey))
	_, err, _, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
	if !errors.Is(err, errStop) || s.requests.Load() != 0 {
		t.Fatalf("leaf for another host accepted under a CA pin: %v", err)
	}
}

func TestLeafPinExpiredAccepted(t *testing.T) {
	leaf := makeCert(t, template("leaf", false, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	if _, err, _, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil); err != nil {
		t.Fatalf("expired leaf with a leaf pin refused: %v", err)
	}
}

func TestCAPinExpiredLeafRefused(t *testing.T) {
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	leaf := makeCert(t, template("leaf", false, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)), ca, nil)
	s := startServer(t, []*certKit{leaf, ca}, keyHandler(testKey))
	if _, err, _, _ := fetchCA(t, []string{urlOf(s)}, ca, nil); !errors.Is(err, errStop) {
		t.Fatalf("expired leaf accepted under a CA pin: %v", err)
	}
}

func TestRedirectToOtherHostRefused(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	var s *server
	s = startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		// Same port, other host name: still another origin.
		_, port, _ := net.SplitHostPort(s.Listener.Addr().String())
		http.Redirect(w, r, "https://localhost:"+port+"/v1/keys/host-1", http.StatusFound)
	})
	_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "redirect to another host") {
		t.Fatalf("err=%v log=%s", err, log)
	}
	if n := s.requests.Load(); n != 1 {
		t.Fatalf("requests = %d, want 1 (the redirect was followed)", n)
	}
}

func TestRedirectSameHostFollowed(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	kh := keyHandler(testKey)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/old/host-1" {
			http.Redirect(w, r, "/v1/keys/host-1", http.StatusMovedPermanently)
			return
		}
		kh(w, r)
	})
	if _, err, _, _ := fetch(t, []string{s.URL + "/old/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil); err != nil {
		t.Fatal(err)
	}
}

func TestRetryAfterHonoured(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	var n atomic.Int32
	kh := keyHandler(testKey)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(503)
			return
		}
		kh(w, r)
	})
	k, err, log, waits := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 5, nil)
	if err != nil {
		t.Fatal(err)
	}
	// At least what the server asked for, plus at most 10% of jitter.
	if len(waits) != 1 || waits[0] < 7*time.Second || waits[0] > 7700*time.Millisecond {
		t.Fatalf("waits = %v, want one in [7s, 7.7s]", waits)
	}
	if !strings.Contains(log.String(), "503") || !strings.Contains(log.String(), "retrying in 7.") {
		t.Fatalf("log: %s", log)
	}
	k.Wipe()
}

func TestSlowServerTimesOut(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	release := make(chan struct{})
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		<-release
	})
	defer close(release)
	start := time.Now()
	_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.AttemptTimeout = 300 * time.Millisecond
	})
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "no answer within 300ms") {
		t.Fatalf("err=%v log=%s", err, log)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("attempt took %s despite a 300ms timeout", d)
	}
}

func TestOversizedBodyRefused(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprint("chunked=", chunked), func(t *testing.T) {
			s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/octet-stream")
				body := bytes.Repeat(testKey, keyproto.MaxBody/len(testKey)+2)
				if !chunked {
					w.Header().Set("Content-Length", fmt.Sprint(len(body)))
				}
				w.Write(body)
			})
			_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
			if !errors.Is(err, errStop) || !strings.Contains(log.String(), "exceeds") {
				t.Fatalf("err=%v log=%s", err, log)
			}
		})
	}
}

func TestRawBodyAccepted(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(testKey)
	})
	k, err, _, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
	if err != nil || len(k.Keys) != 1 || !bytes.Equal(k.Keys[0].Bytes(), testKey) {
		t.Fatalf("k=%v err=%v", k, err)
	}
}

func TestForbiddenLongBackoff(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(403)
	})
	_, err, log, waits := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.Backoff = Backoff{Base: time.Second, Cap: 60 * time.Second}
	})
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "403 forbidden") {
		t.Fatalf("err=%v log=%s", err, log)
	}
	if waits[0] < 30*time.Second || waits[0] > 60*time.Second {
		t.Fatalf("wait after 403 = %s, want a long backoff in [30s,60s]", waits[0])
	}
}

func TestUnauthorizedWithoutToken(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) { c.Token = nil })
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "401") {
		t.Fatalf("err=%v log=%s", err, log)
	}
}

func TestFailoverToSecondServer(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	down := closedPort(t)
	// A stagger far beyond the test: the second server is asked because
	// the first failed, not because it was slow.
	k, err, log, waits := fetch(t, []string{"https://" + down + "/v1/keys/{host}", urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.Stagger = time.Hour
	})
	if err != nil {
		t.Fatal(err)
	}
	want := down + ": connection refused; trying " + s.Listener.Addr().String()
	if len(waits) != 0 || log.String() != want {
		t.Fatalf("waits=%v log=%q, want %q", waits, log, want)
	}
	if k.Server != s.Listener.Addr().String() {
		t.Fatalf("answered by %s", k.Server)
	}
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestGiveUpAfter(t *testing.T) {
	down := closedPort(t)
	now := time.Unix(1e9, 0)
	_, err, log, waits := fetch(t, []string{"https://" + down + "/{host}"}, []pin.Pin{{}}, 1000, func(c *Config) {
		c.GiveUpAfter = 5 * time.Minute
		c.Now = func() time.Time { return now }
		sl := c.Sleep
		c.Sleep = func(ctx context.Context, d time.Duration) error {
			now = now.Add(d)
			return sl(ctx, d)
		}
	})
	if !errors.Is(err, ErrGaveUp) {
		t.Fatalf("err = %v, want ErrGaveUp", err)
	}
	var total time.Duration
	for _, w := range waits {
		total += w
	}
	if total > 5*time.Minute {
		t.Fatalf("slept %s in all, past give_up_after", total)
	}
	lines := log.Lines()
	if last := lines[len(lines)-1]; last != down+": connection refused; giving up" {
		t.Fatalf("last line %q, want it to say it gives up", last)
	}
	for _, l := range lines[:len(lines)-1] {
		if !strings.Contains(l, "; retrying in ") {
			t.Fatalf("line %q does not say when it retries", l)
		}
	}
}

// TestGiveUpAfterEndsAnAttemptInFlight: the deadline also cuts an attempt
// short (a black-holed server and a long attempt timeout).
func TestGiveUpAfterEndsAnAttemptInFlight(t *testing.T) {
	hole := blackHole(t)
	_, err, _, _ := fetch(t, []string{"https://" + hole + "/{host}"}, []pin.Pin{{}}, 1000, func(c *Config) {
		c.GiveUpAfter = 200 * time.Millisecond
		c.AttemptTimeout = time.Hour
	})
	if !errors.Is(err, ErrGaveUp) {
		t.Fatalf("err = %v, want ErrGaveUp", err)
	}
}

func TestBackoffFullJitterCapped(t *testing.T) {
	b := Backoff{Base: time.Second, Cap: 60 * time.Second}.withDefaults()
	for round := 0; round < 40; round++ {
		for i := 0; i < 200; i++ {
			d := b.delay(round)
			ceil := min(60*time.Second, time.Second<<min(round, 30))
			if d <= 0 || d > ceil {
				t.Fatalf("round %d: delay %s outside (0,%s]", round, d, ceil)
			}
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	date := func(t time.Time, layout string) string { return t.Format(layout) }
	for _, tc := range []struct {
		v, date string
		want    time.Duration
		ok      bool
	}{
		{"120", "", 2 * time.Minute, true},
		{" 0 ", "", 0, true},
		{"99999999999999", "", maxRetryAfter, true},
		{date(now.Add(90*time.Second), http.TimeFormat), "", 90 * time.Second, true},
		{date(now.Add(90*time.Second), time.RFC850), "", 90 * time.Second, true},
		{date(now.Add(90*time.Second), time.ANSIC), "", 90 * time.Second, true},
		{date(now.Add(-time.Hour), http.TimeFormat), "", 0, true},
		// The server's clock is what counts: our clock may be years off.
		{date(now.Add(30*time.Second+24*365*time.Hour), http.TimeFormat), date(now.Add(24*365*time.Hour), http.TimeFormat), 30 * time.Second, true},
		{"soon", "", 0, false},
		{"-5", "", 0, false},
		{"+5", "", 0, false},
		{"", "", 0, false},
	} {
		d, ok := parseRetryAfter(tc.v, tc.date, now)
		if ok != tc.ok || d != tc.want {
			t.Errorf("parseRetryAfter(%q, %q) = %s, %v; want %s, %v", tc.v, tc.date, d, ok, tc.want, tc.ok)
		}
	}
}

// TestGiveUpAfterCountsFromSince: a refetch shares the first fetch's
// deadline, so give_up_after bounds the whole key stage.
func TestGiveUpAfterCountsFromSince(t *testing.T) {
	down := closedPort(t)
	now := time.Unix(1e9, 0)
	_, err, _, waits := fetch(t, []string{"https://" + down + "/{host}"}, []pin.Pin{{}}, 1000, func(c *Config) {
		c.GiveUpAfter = 5 * time.Minute
		c.Since = now.Add(-4*time.Minute - 50*time.Second)
		c.Now = func() time.Time { return now }
		sl := c.Sleep
		c.Sleep = func(ctx context.Context, d time.Duration) error {
			now = now.Add(d)
			return sl(ctx, d)
		}
	})
	if !errors.Is(err, ErrGaveUp) {
		t.Fatalf("err = %v, want ErrGaveUp", err)
	}
	var total time.Duration
	for _, w := range waits {
		total += w
	}
	if total > 10*time.Second {
		t.Fatalf("slept %s in all: the deadline did not count from Since", total)
	}
	_, err, log, _ := fetch(t, []string{"https://" + down + "/{host}"}, []pin.Pin{{}}, 1000, func(c *Config) {
		c.GiveUpAfter = time.Minute
		c.Since = time.Now().Add(-2 * time.Minute)
	})
	if !errors.Is(err, ErrGaveUp) || len(log.Lines()) != 0 {
		t.Fatalf("past the deadline: err = %v, lines %q; want ErrGaveUp without an attempt", err, log.Lines())
	}
}

package keys

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// tlsProbe is a bare TLS server (no HTTP) that records, per connection,
// whether the handshake completed and every application byte it received.
type tlsProbe struct {
	addr string
	mu   sync.Mutex
	got  []probeConn
	sni  []string
}

type probeConn struct {
	handshakeErr error
	data         []byte
}

func startProbe(t *testing.T, leaf *certKit, maxVersion uint16, answer []byte) *tlsProbe {
	t.Helper()
	p := &tlsProbe{}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.der}, PrivateKey: leaf.key}},
		MaxVersion:   maxVersion,
		MinVersion:   min(maxVersion, tls.VersionTLS12),
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			p.mu.Lock()
			p.sni = append(p.sni, h.ServerName)
			p.mu.Unlock()
			return nil, nil
		},
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	p.addr = l.Addr().String()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Minute))
				tc := tls.Server(c, cfg)
				pc := probeConn{handshakeErr: tc.Handshake()}
				if pc.handshakeErr == nil {
					// Read what the client sends (until its request ends
					// or it closes), then answer.
					buf := make([]byte, 4096)
					for !bytes.Contains(pc.data, []byte("\r\n\r\n")) {
						n, err := tc.Read(buf)
						pc.data = append(pc.data, buf[:n]...)
						if err != nil {
							break
						}
					}
					tc.Write(answer)
				} else {
					// Anything that still arrives is recorded too.
					b, _ := io.ReadAll(c)
					pc.data = b
				}
				p.mu.Lock()
				p.got = append(p.got, pc)
				p.mu.Unlock()
			}()
		}
	}()
	return p
}

func (p *tlsProbe) conns() []probeConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]probeConn(nil), p.got...)
}

// waitConns waits until the probe has recorded n connections: the server
// side of a refused handshake may finish after the client gave up.
func (p *tlsProbe) waitConns(t *testing.T, n int) []probeConn {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if c := p.conns(); len(c) >= n {
			return c
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("probe saw %d connections, want %d", len(p.conns()), n)
	return nil
}

var okAnswer = []byte("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nkey!")

// TestNothingSentBeforePinCheck checks the claim that matters most, at the
// TLS level and for both versions: with a wrong pin the server's handshake
// never completes and not one application byte (no request, no token)
// reaches it; with the right pin (the control) the same server does get
// the request.
func TestNothingSentBeforePinCheck(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	other := makeCert(t, validTemplate("other", false), nil, nil)
	for _, v := range []struct {
		name string
		max  uint16
	}{{"TLS1.2", tls.VersionTLS12}, {"TLS1.3", tls.VersionTLS13}} {
		t.Run(v.name, func(t *testing.T) {
			p := startProbe(t, leaf, v.max, okAnswer)
			url := "https://" + p.addr + "/v1/keys/{host}"
			_, err, log, _ := fetch(t, []string{url}, []pin.Pin{pin.FromCert(other.cert)}, 1, nil)
			if !errors.Is(err, errStop) || !strings.Contains(log.String(), "pin check failed") {
				t.Fatalf("err=%v log=%s", err, log)
			}
			c := p.waitConns(t, 1)[0]
			if c.handshakeErr == nil {
				t.Fatalf("the server completed a handshake with a client whose pin did not match")
			}
			if len(c.data) != 0 {
				t.Fatalf("the server received %d bytes after the refused handshake", len(c.data))
			}

			k, err, _, _ := fetch(t, []string{url}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
			if err != nil || string(k.Keys[0].Bytes()) != "key!" {
				t.Fatalf("control with the right pin: %v", err)
			}
			c = p.waitConns(t, 2)[1]
			if c.handshakeErr != nil || !bytes.HasPrefix(c.data, []byte("GET /v1/keys/host-1 HTTP/1.1\r\n")) ||
				!bytes.Contains(c.data, []byte("Authorization: Bearer "+testToken+"\r\n")) {
				t.Fatalf("control: handshake %v, request %q", c.handshakeErr, c.data)
			}
		})
	}
}

// TestSNI: a DNS name goes out as SNI, an IP literal does not (RFC 6066).
func TestSNI(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	p := startProbe(t, leaf, 0, okAnswer)
	_, port, _ := net.SplitHostPort(p.addr)
	for _, host := range []string{"127.0.0.1", "localhost"} {
		if _, err, _, _ := fetch(t, []string{"https://" + net.JoinHostPort(host, port) + "/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil); err != nil {
			t.Fatalf("%s: %v", host, err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.sni) != 2 || p.sni[0] != "" || p.sni[1] != "localhost" {
		t.Fatalf("SNI sent = %q, want [\"\" \"localhost\"]", p.sni)
	}
}

func TestTLS10And11Refused(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		p := startProbe(t, leaf, v, okAnswer)
		_, err, log, _ := fetch(t, []string{"https://" + p.addr + "/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
		if !errors.Is(err, errStop) || !strings.Contains(log.String(), "TLS") {
			t.Fatalf("TLS version %x accepted: err=%v log=%s", v, err, log)
		}
		if c := p.waitConns(t, 1)[0]; c.handshakeErr == nil || len(c.data) != 0 {
			t.Fatalf("TLS version %x: handshake %v, %d bytes", v, c.handshakeErr, len(c.data))
		}
	}
}

// fetchCA fetches trusting ca's certificate as the image would carry it,
// with no pin.
func fetchCA(t *testing.T, urls []string, ca *certKit, mod func(*Config)) (*Keys, error, *ulogtest.Logger, []time.Duration) {
	t.Helper()
	return fetch(t, urls, nil, 1, func(c *Config) {
		c.CAs = []*x509.Certificate{ca.cert}
		if mod != nil {
			mod(c)
		}
	})
}

// caChain is root → intermediate → leaf.
type caChain struct {
	root, inter, leaf *certKit
}

func newCAChain(t *testing.T) caChain {
	root := makeCert(t, validTemplate("root", true), nil, nil)
	inter := makeCert(t, validTemplate("intermediate", true), root, nil)
	leaf := makeCert(t, validTemplate("leaf", false), inter, nil)
	return caChain{root, inter, leaf}
}

func TestCAPinIntermediateChain(t *testing.T) {
	c := newCAChain(t)
	evil := makeCert(t, validTemplate("leaf", false), makeCert(t, validTemplate("evil", true), nil, nil), nil)
	evilByOwnKey := makeCert(t, validTemplate("leaf", false), nil, nil)
	for _, tc := range []struct {
		name  string
		chain []*certKit
		pin   *certKit
		ok    bool
		why   string
	}{
		{"root pinned, full chain sent", []*certKit{c.leaf, c.inter, c.root}, c.root, true, ""},
		{"intermediate pinned, root not sent", []*certKit{c.leaf, c.inter}, c.inter, true, ""},
		{"intermediate pinned, full chain sent", []*certKit{c.leaf, c.inter, c.root}, c.inter, true, ""},
		// The image carries the root: the server need not send it.
		{"root trusted, not sent", []*certKit{c.leaf, c.inter}, c.root, true, ""},
		{"forged leaf beside the real chain", []*certKit{evil, c.inter, c.root}, c.root, false, "does not verify up to a configured CA certificate"},
		{"self-signed leaf beside the pinned intermediate", []*certKit{evilByOwnKey, c.inter}, c.inter, false, "does not verify up to a configured CA certificate"},
		{"chain in the wrong order", []*certKit{c.leaf, c.root, c.inter}, c.root, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, tc.chain, keyHandler(testKey))
			k, err, log, _ := fetchCA(t, []string{urlOf(s)}, tc.pin, nil)
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v\n%s", err, log)
				}
				k.Wipe()
				return
			}
			if !errors.Is(err, errStop) || s.requests.Load() != 0 || !strings.Contains(log.String(), tc.why) {
				t.Fatalf("err=%v requests=%d log=%s", err, s.requests.Load(), log)
			}
		})
	}
}

func TestCAPinKeyUsage(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ca, leaf func(*x509.Certificate)
		ok       bool
		why      string
	}{
		{"leaf may only encipher", nil, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }, false, "key usage does not allow digital signatures"},
		{"leaf without key usage", nil, func(c *x509.Certificate) { c.KeyUsage = 0 }, true, ""},
		{"leaf for client auth only", nil, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} }, false, "does not verify"},
		{"CA may not sign certificates", func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageDigitalSignature }, nil, false, "cannot sign this kind of certificate"},
		{"pinned issuer is not a CA", func(c *x509.Certificate) { c.IsCA = false }, nil, false, "cannot sign this kind of certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caT := validTemplate("ca", true)
			if tc.ca != nil {
				tc.ca(caT)
			}
			ca := makeCert(t, caT, nil, nil)
			leafT := validTemplate("leaf", false)
			if tc.leaf != nil {
				tc.leaf(leafT)
			}
			leaf := makeCert(t, leafT, ca, nil)
			s := startServer(t, []*certKit{leaf, ca}, keyHandler(testKey))
			k, err, log, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v\n%s", err, log)
				}
				k.Wipe()
				return
			}
			if !errors.Is(err, errStop) || s.requests.Load() != 0 || !strings.Contains(log.String(), tc.why) {
				t.Fatalf("err=%v requests=%d log=%s", err, s.requests.Load(), log)
			}
		})
	}
}

// TestCAPinWrongClockSaysSo: under a CA pin an expired leaf is refused
// and the line shows the clock, the usual culprit in an initramfs.
func TestCAPinWrongClockSaysSo(t *testing.T) {
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	leaf := makeCert(t, validTemplate("leaf", false), ca, nil)
	s := startServer(t, []*certKit{leaf, ca}, keyHandler(testKey))
	_, err, log, _ := fetchCA(t, []string{urlOf(s)}, ca, func(c *Config) {
		c.Now = func() time.Time { return time.Unix(0, 0) }
	})
	if !errors.Is(err, errStop) || !strings.Contains(log.String(), "the clock says 1970-01-01T00:00:00Z") {
		t.Fatalf("err=%v log=%s", err, log)
	}
}

// TestLeafPinAcceptsAnyNameAndClock: a leaf pin trusts the key, so
// neither the host name nor the clock matters.
func TestLeafPinAcceptsAnyNameAndClock(t *testing.T) {
	tmpl := validTemplate("leaf", false)
	tmpl.IPAddresses, tmpl.DNSNames = nil, []string{"elsewhere.example"}
	leaf := makeCert(t, tmpl, nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	k, err, _, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, func(c *Config) {
		c.Now = func() time.Time { return time.Unix(0, 0) }
	})
	if err != nil {
		t.Fatal(err)
	}
	k.Wipe()
}

// TestAnyPinMayMatch: several pins, the server's is the last.
func TestAnyPinMayMatch(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	pins := []pin.Pin{{1}, {2}, pin.FromCert(leaf.cert)}
	k, err, _, _ := fetch(t, []string{urlOf(s)}, pins, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	k.Wipe()
}

// TestCAServersCopyNotTrusted is issue 12's re-minted CA: a leaf the CA
// really issued, outside what the CA's own certificate allows (its name
// constraints, its validity), sent beside a copy of the CA re-made with
// the CA's key and without those limits (the attacker cannot sign it
// properly, and no one checks a root's signature). Only the image's copy
// of the CA counts, so the leaf is refused; a pin over the CA's key, the
// old way, is refused with a message saying what to configure.
func TestCAServersCopyNotTrusted(t *testing.T) {
	constrained := validTemplate("ca", true)
	constrained.PermittedIPRanges = []*net.IPNet{{IP: net.IPv4(10, 0, 0, 0), Mask: net.CIDRMask(8, 32)}}
	constrained.PermittedDNSDomains = []string{"corp.example"}
	expired := template("ca", true, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))
	for name, caT := range map[string]*x509.Certificate{"name constraints": constrained, "expired CA": expired} {
		t.Run(name, func(t *testing.T) {
			ca := makeCert(t, caT, nil, nil)
			leaf := makeCert(t, validTemplate("leaf", false), ca, nil) // 127.0.0.1, localhost
			remintT := validTemplate("ca", true)
			remintT.Subject = ca.cert.Subject
			remintT.SubjectKeyId = ca.cert.SubjectKeyId
			evil := newKey(t)
			remint := makeCert(t, remintT, &certKit{key: evil, cert: remintT}, ca.key)
			if !bytes.Equal(remint.cert.RawSubjectPublicKeyInfo, ca.cert.RawSubjectPublicKeyInfo) {
				t.Fatal("test setup: the copy does not carry the CA's key")
			}
			s := startServer(t, []*certKit{leaf, remint}, keyHandler(testKey))
			_, err, log, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
			if !errors.Is(err, errStop) || s.requests.Load() != 0 || !strings.Contains(log.String(), "does not verify up to a configured CA certificate") {
				t.Fatalf("leaf outside the CA's limits accepted (or refused for another reason): err=%v requests=%d log=%s", err, s.requests.Load(), log)
			}
			_, err, log, _ = fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(ca.cert)}, 1, nil)
			if !errors.Is(err, errStop) || s.requests.Load() != 0 || !strings.Contains(log.String(), "trusted only through its own certificate in the image") {
				t.Fatalf("CA key pin: err=%v requests=%d log=%s", err, s.requests.Load(), log)
			}
		})
	}
	// The control: within the CA's limits, the same setup is served.
	ca := makeCert(t, validTemplate("ca", true), nil, nil)
	leaf := makeCert(t, validTemplate("leaf", false), ca, nil)
	s := startServer(t, []*certKit{leaf}, keyHandler(testKey))
	k, err, log, _ := fetchCA(t, []string{urlOf(s)}, ca, nil)
	if err != nil {
		t.Fatalf("control: %v\n%s", err, log)
	}
	k.Wipe()
}

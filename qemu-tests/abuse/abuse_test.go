// Package abuse attacks the real unlockrd-keyserver binary from the
// outside, without any token, on loopback: each attack runs for a few
// seconds while a legitimate host with its token fetches its key with the
// boot client (unlock/keys), and the test asserts what issue 12 asks: the
// host gets its key on at least 90 % of its tries and the server's peak
// resident memory stays within 128 MiB.
//
// The attacker dials from its own loopback addresses (127.0.0.2 and up;
// the host uses 127.0.0.1), as attackers elsewhere on a network would:
// the server charges what an unauthenticated client costs to its source
// address.
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
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

const (
	attackFor   = 5 * time.Second
	minSuccess  = 0.90
	maxPeakRSS  = 128 << 20
	hostID      = "db-1"
	tryEvery    = 400 * time.Millisecond // the host's pace: within its own bucket (1/s, burst 10)
	attackerSrc = 8                      // attacker source addresses: 127.0.0.2 ...
	binEnv      = "UNLOCKRD_ABUSE_KEYSERVER"
)

// keyServerBin is the binary under attack, built in TestMain.
var keyServerBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("abuse: skipped in -short mode (runs the real key server under attack for about a minute)")
		os.Exit(0)
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if b := os.Getenv(binEnv); b != "" {
		keyServerBin = b
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "unlockrd-abuse-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	root, err := harness.ModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	keyServerBin = filepath.Join(dir, "unlockrd-keyserver")
	build := exec.Command("go", "build", "-trimpath", "-o", keyServerBin, "./cmd/unlockrd-keyserver")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build unlockrd-keyserver: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// target is a freshly started server with one enrolled host.
type target struct {
	ks    *harness.KeyServer
	pins  []pin.Pin
	token []byte
	key   []byte
}

func startTarget(t *testing.T, ctx context.Context) *target {
	t.Helper()
	data := filepath.Join(t.TempDir(), "keyserver")
	if _, err := harness.NewKeyServerData(ctx, keyServerBin, data); err != nil {
		t.Fatal(err)
	}
	tok, err := harness.AddHost(ctx, keyServerBin, data, hostID, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, err := harness.HostKey(ctx, keyServerBin, data, hostID)
	if err != nil {
		t.Fatal(err)
	}
	// Started as the README says; no log writer: audit lines are kept by
	// the harness (KeyServer.Logs) only.
	ks, err := harness.StartKeyServer(ctx, keyServerBin, data, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ks.Stop)
	p, err := pin.Parse(ks.Pin)
	if err != nil {
		t.Fatal(err)
	}
	return &target{ks: ks, pins: []pin.Pin{p}, token: []byte(tok), key: key}
}

// fetchOnce is one try of the boot client: one attempt, no retry.
func (tg *target) fetchOnce(ctx context.Context) error {
	stop := fmt.Errorf("one try only")
	log := &ulogtest.Logger{}
	k, err := keys.Fetch(ctx, keys.Config{
		URLs:  []string{"https://" + tg.ks.Addr + "/v1/keys/{host}"},
		Pins:  tg.pins,
		Host:  hostID,
		Token: bytes.Clone(tg.token),
		Sleep: func(context.Context, time.Duration) error { return stop },
	}, log)
	if err != nil {
		// The client's own line says what went wrong.
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(log.String()))
	}
	defer k.Wipe()
	if len(k.Keys) == 0 || !bytes.Equal(k.Keys[0].Bytes(), tg.key) {
		return fmt.Errorf("wrong key served")
	}
	return nil
}

// attacker is what an attack gets: a context that ends with the attack,
// the server's address and a way to dial from attacker sources.
type attacker struct {
	ctx  context.Context
	addr string
	n    atomic.Int64 // attempts made, for the report
	// conns left open by the attack, closed when it ends.
	mu    sync.Mutex
	conns []net.Conn
}

// dial connects from attacker source i (127.0.0.2 + i mod attackerSrc).
func (a *attacker) dial(i int) (net.Conn, error) {
	a.n.Add(1)
	src := net.IPv4(127, 0, 0, byte(2+i%attackerSrc))
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 5 * time.Second}
	c, err := d.DialContext(a.ctx, "tcp", a.addr)
	if err == nil {
		a.keep(c)
	}
	return c, err
}

func (a *attacker) keep(c net.Conn) {
	a.mu.Lock()
	a.conns = append(a.conns, c)
	a.mu.Unlock()
}

func (a *attacker) closeAll() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		c.Close()
	}
	a.conns = nil
}

// tlsDial makes a TLS connection from source i, offering protos.
func (a *attacker) tlsDial(i int, protos ...string) (*tls.Conn, error) {
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
func (a *attacker) workers(n int, f func(i int)) {
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
func (a *attacker) httpClient(i int) *http.Client {
	src := net.IPv4(127, 0, 0, byte(2+i%attackerSrc))
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

func (a *attacker) get(c *http.Client, path, token string) {
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

// attacks are issue 12's, and those it names besides.
var attacks = []struct {
	name string
	run  func(a *attacker)
}{
	{"h2-stream-flood", h2Flood},
	{"unauthenticated-host-url", unauthHostURL},
	{"many-host-ids", manyHostIDs},
	{"idle-keepalive", idleKeepAlive},
	{"slowloris-headers", slowloris},
	{"handshake-flood", handshakeFlood},
	{"garbage-tls", garbageTLS},
}

func TestAbuse(t *testing.T) {
	for _, at := range attacks {
		t.Run(at.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			tg := startTarget(t, ctx)
			if err := tg.fetchOnce(ctx); err != nil {
				t.Fatalf("control fetch before the attack: %v", err)
			}
			actx, stop := context.WithTimeout(ctx, attackFor)
			defer stop()
			a := &attacker{ctx: actx, addr: tg.ks.Addr}
			attackDone := make(chan struct{})
			go func() {
				defer close(attackDone)
				at.run(a)
			}()
			time.Sleep(500 * time.Millisecond) // let the attack take hold first
			tries, ok := 0, 0
			var firstErr error
			for actx.Err() == nil {
				t0 := time.Now()
				tries++
				if err := tg.fetchOnce(ctx); err == nil {
					ok++
				} else if firstErr == nil {
					firstErr = err
				}
				if d := tryEvery - time.Since(t0); d > 0 {
					select {
					case <-time.After(d):
					case <-actx.Done():
					}
				}
			}
			<-attackDone
			_, peak, err := harness.ProcMemory(tg.ks.PID())
			a.closeAll()
			if err != nil {
				t.Fatal(err)
			}
			rate := float64(ok) / float64(tries)
			line := fmt.Sprintf("abuse %-26s legitimate host: %3d/%-3d tries got the key (%5.1f %%), server peak RSS %5.1f MiB, %d attacker connections/requests",
				at.name, ok, tries, 100*rate, float64(peak)/(1<<20), a.n.Load())
			fmt.Println(line)
			t.Log(line)
			if firstErr != nil {
				t.Logf("first failed try: %v", firstErr)
			}
			if rate < minSuccess {
				t.Errorf("legitimate host got its key on %.1f %% of tries, want ≥ %.0f %%", 100*rate, 100*minSuccess)
			}
			if peak > maxPeakRSS {
				t.Errorf("server peak RSS %.1f MiB, want ≤ %d MiB", float64(peak)/(1<<20), maxPeakRSS>>20)
			}
			if strings.Contains(tg.ks.Logs(), string(tg.token)) {
				t.Error("the server's output holds the host's token")
			}
		})
	}
}

// h2Flood: issue 12's memory exhaustion. Connections offering h2 open
// streams of GET /healthz with ~7 KB of headers and a zero flow-control
// window, so no answer can be written and each handler waits; streams are
// reopened as fast as the server takes them. A server without h2 answers
// the preface as a malformed HTTP/1.1 request and closes.
func h2Flood(a *attacker) {
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
func unauthHostURL(a *attacker) {
	a.workers(16, func(i int) {
		c := a.httpClient(i)
		defer c.CloseIdleConnections()
		for a.ctx.Err() == nil {
			tok := ""
			if i%2 == 1 {
				tok = "guess-" + rand.Text()
			}
			a.get(c, "/v1/keys/"+hostID, tok)
		}
	})
}

// manyHostIDs: wrong tokens for ever new host ids, to spend the global
// budget and the server's per-host state.
func manyHostIDs(a *attacker) {
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
func idleKeepAlive(a *attacker) {
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
func slowloris(a *attacker) {
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
		io.WriteString(c, "GET /v1/keys/"+hostID+" HTTP/1.1\r\nHost: localhost\r\n")
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
func handshakeFlood(a *attacker) {
	a.workers(32, func(i int) {
		if c, err := a.tlsDial(i); err == nil {
			c.Close()
		}
	})
}

// garbageTLS: random bytes, records with absurd lengths and truncated
// handshakes, then the connection is held.
func garbageTLS(a *attacker) {
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

package keyserver

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

func openNew(t *testing.T, dir string) *Data {
	t.Helper()
	d, err := OpenData(context.Background(), dir, DataOptions{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestDataFolderLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	d := openNew(t, dir)
	if _, err := d.Admin().AddHost(context.Background(), "db-1", nil); err != nil {
		t.Fatal(err)
	}
	for name, mode := range map[string]os.FileMode{".": 0o700, MasterKeyFile: 0o600, DBFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v %v, want %v", name, fi.Mode().Perm(), err, mode)
		}
	}
	// Reopening finds the host, with the same master key.
	d2, err := OpenData(context.Background(), dir, DataOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n, probs, err := d2.Verify(context.Background())
	if err != nil || n != 1 || len(probs) != 0 {
		t.Fatalf("Verify: %d %v %v", n, probs, err)
	}
	// Admin commands need an existing folder: a typo must not make a new one.
	if _, err := OpenData(context.Background(), dir+"x", DataOptions{}); err == nil {
		t.Fatal("opened a missing folder")
	}
	if _, err := os.Stat(dir + "x"); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a missing folder was created")
	}
}

func TestWrongMasterKey(t *testing.T) {
	dir := t.TempDir()
	d := openNew(t, dir)
	if _, err := d.Admin().AddHost(context.Background(), "db-1", nil); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "other.key")
	if _, err := CreateMasterKey(other); err != nil {
		t.Fatal(err)
	}
	_, err := OpenData(context.Background(), dir, DataOptions{MasterKeyPath: other})
	if !errors.Is(err, ErrWrongMasterKey) || !strings.Contains(err.Error(), other) || !strings.Contains(err.Error(), DBFile) {
		t.Fatalf("got %v", err)
	}
	// A missing master key next to an existing data file is an error, not
	// a reason to make a new key.
	os.Remove(filepath.Join(dir, MasterKeyFile))
	_, err = OpenData(context.Background(), dir, DataOptions{Create: true})
	if err == nil || !strings.Contains(err.Error(), MasterKeyFile) {
		t.Fatalf("missing master key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, MasterKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a new master key was made for an existing data file")
	}
}

func TestCorruptDataFile(t *testing.T) {
	dir := t.TempDir()
	d := openNew(t, dir)
	if _, err := d.Admin().AddHost(context.Background(), "db-1", nil); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, DBFile)
	data, _ := os.ReadFile(p)
	for i := range 2 * 4096 { // both meta pages
		data[i] ^= 0x5a
	}
	os.WriteFile(p, data, 0o600)
	_, err := OpenData(context.Background(), dir, DataOptions{Create: true})
	if !errors.Is(err, store.ErrCorrupt) || !strings.Contains(err.Error(), p) {
		t.Fatalf("got %v", err)
	}
}

func TestTLSMaterial(t *testing.T) {
	dir := t.TempDir()
	if _, err := DataPin(dir); err == nil {
		t.Fatal("pin of a folder without a key")
	}
	c1, p1, err := LoadTLS(dir, []string{"keys.example", "10.0.2.2"}, true)
	if err != nil {
		t.Fatal(err)
	}
	leaf := c1.Leaf
	for _, name := range []string{"keys.example", "localhost", "10.0.2.2", "127.0.0.1", "::1"} {
		if err := leaf.VerifyHostname(name); err != nil {
			t.Errorf("certificate does not name %s: %v", name, err)
		}
	}
	if leaf.NotAfter.Year() != 9999 || leaf.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("NotAfter %v, %v", leaf.NotAfter, leaf.PublicKeyAlgorithm)
	}
	if fi, _ := os.Stat(filepath.Join(dir, TLSKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("tls.key mode %v", fi.Mode().Perm())
	}
	dp, err := DataPin(dir)
	if err != nil || dp != p1 {
		t.Fatalf("DataPin %v %v, want %v", dp, err, p1)
	}
	// Same names: same certificate. New name: new certificate, same pin.
	c2, p2, _ := LoadTLS(dir, []string{"keys.example"}, false)
	if !bytes.Equal(c2.Certificate[0], c1.Certificate[0]) || p2 != p1 {
		t.Fatal("certificate remade without need")
	}
	c3, p3, _ := LoadTLS(dir, []string{"keys-b.example"}, false)
	if bytes.Equal(c3.Certificate[0], c1.Certificate[0]) || p3 != p1 || c3.Leaf.VerifyHostname("keys-b.example") != nil {
		t.Fatal("certificate not remade for a new name, or pin changed")
	}
	if _, _, err := LoadTLS(t.TempDir(), nil, false); err == nil {
		t.Fatal("LoadTLS created a key with create=false")
	}
}

// TestServeOverTLS runs the handler in NewHTTPServer on a real socket and
// fetches with a client that trusts only the pin, as the boot code does.
func TestServeOverTLS(t *testing.T) {
	dir := t.TempDir()
	d := openNew(t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	token, err := d.Admin().AddHost(ctx, "db-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	cert, p, err := d.TLS(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(WithStore(d.Store), WithSealer(d.Sealer), WithAudit(nil))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewHTTPServer(h, cert, nil)
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, srv, ln, time.Second) }()

	c := PinnedClient(p)
	url := "https://" + ln.Addr().String() + KeysPath + "db-1"
	ids, keys, status, err := Fetch(ctx, c, url, token)
	if err != nil || status != 200 {
		t.Fatalf("fetch: %d %v", status, err)
	}
	_, want, _ := d.Admin().Keys(ctx, "db-1")
	if len(ids) != 1 || !bytes.Equal(keys[0], want[0]) {
		t.Fatalf("served %v", ids)
	}

	// A client pinning another key refuses the server.
	if _, _, _, err := Fetch(ctx, PinnedClient(pin.Pin{1}), url, token); err == nil {
		t.Fatal("wrong pin accepted")
	}
	// TLS 1.1 is refused.
	old := &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS11}
	if conn, err := tls.Dial("tcp", ln.Addr().String(), old); err == nil {
		conn.Close()
		t.Fatal("TLS 1.1 handshake succeeded")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestAdminWhileServing runs key requests and admin writes on the same
// bbolt file at once, as `serve` and `host add` do from two processes.
func TestAdminWhileServing(t *testing.T) {
	dir := t.TempDir()
	d := openNew(t, dir)
	ctx := context.Background()
	token, err := d.Admin().AddHost(ctx, "db-0", nil)
	if err != nil {
		t.Fatal(err)
	}
	x := &harness{t: t}
	h, err := New(WithStore(d.Store), WithSealer(d.Sealer), WithAudit(nil), WithGlobalLimit(Limit{}), WithHostLimit(Limit{}))
	if err != nil {
		t.Fatal(err)
	}
	x.h, x.token = h, token
	// A second opener, as an admin command in another process would be.
	d2, err := OpenData(ctx, dir, DataOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var served, failed atomic.Int64
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				if w := x.do("GET", "/v1/keys/db-0", token); w.Code == 200 {
					served.Add(1)
				} else {
					failed.Add(1)
					t.Errorf("during admin writes: %d %s", w.Code, w.Body)
				}
			}
		}()
	}
	for i := 1; i <= 20; i++ {
		if _, err := d2.Admin().AddHost(ctx, fmt.Sprint("db-", i), nil); err != nil {
			t.Errorf("add while serving: %v", err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if n, _, _ := d.Verify(ctx); n != 21 || served.Load() == 0 {
		t.Fatalf("%d hosts, %d served, %d failed", n, served.Load(), failed.Load())
	}
}

// The child side of TestKillDuringWrites: adds hosts forever, printing
// each name once AddHost returned (the acknowledgement).
func TestHelperAddHostsForever(t *testing.T) {
	dir := os.Getenv("UNLOCKRD_TEST_WRITER_DIR")
	if dir == "" {
		t.Skip("helper process")
	}
	d, err := OpenData(context.Background(), dir, DataOptions{Create: true})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	for i := 0; ; i++ {
		name := fmt.Sprintf("host-%s-%05d", os.Getenv("UNLOCKRD_TEST_WRITER_ROUND"), i)
		if _, err := d.Admin().AddHost(context.Background(), name, nil); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println(name)
	}
}

// TestKillDuringWrites kills -9 a process in the middle of adding hosts
// and checks the data file reopens with every acknowledged host.
func TestKillDuringWrites(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns a child process")
	}
	dir := t.TempDir()
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperAddHostsForever$", "-test.count=1")
		cmd.Env = append(os.Environ(), "UNLOCKRD_TEST_WRITER_DIR="+dir, fmt.Sprint("UNLOCKRD_TEST_WRITER_ROUND=", round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var acked []string
		sc := bufio.NewScanner(out)
		for len(acked) < 15+10*round && sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "error:") {
				t.Fatalf("child: %s", line)
			}
			acked = append(acked, line)
		}
		// Kill while it is still writing, then collect what it acknowledged
		// before dying.
		cmd.Process.Signal(syscall.SIGKILL)
		for sc.Scan() {
			if l := sc.Text(); strings.HasPrefix(l, "host-") {
				acked = append(acked, l)
			}
		}
		cmd.Wait()

		d, err := OpenData(context.Background(), dir, DataOptions{})
		if err != nil {
			t.Fatalf("round %d: reopen after kill -9: %v", round, err)
		}
		n, probs, err := d.Verify(context.Background())
		if err != nil || len(probs) != 0 {
			t.Fatalf("round %d: verify: %v %v", round, probs, err)
		}
		for _, name := range acked {
			if _, err := d.Store.Get(context.Background(), name); err != nil {
				t.Fatalf("round %d: acknowledged host lost: %v", round, err)
			}
		}
		t.Logf("round %d: %d acknowledged, %d present", round, len(acked), n)
	}
}

// BenchmarkServeKeysBolt measures a key request against the bbolt store,
// which opens the file for every request.
func BenchmarkServeKeysBolt(b *testing.B) {
	dir := b.TempDir()
	d, err := OpenData(context.Background(), dir, DataOptions{Create: true})
	if err != nil {
		b.Fatal(err)
	}
	token, _ := d.Admin().AddHost(context.Background(), "db-1", nil)
	for i := range 200 {
		d.Admin().AddHost(context.Background(), fmt.Sprint("other-", i), nil)
	}
	h, _ := New(WithStore(d.Store), WithSealer(d.Sealer), WithAudit(nil), WithGlobalLimit(Limit{}), WithHostLimit(Limit{}))
	x := &harness{t: b, h: h}
	b.ResetTimer()
	for range b.N {
		if w := x.do("GET", "/v1/keys/db-1", token); w.Code != 200 {
			b.Fatal(w.Code)
		}
	}
}

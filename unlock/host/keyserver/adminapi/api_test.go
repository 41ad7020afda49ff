package adminapi_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/adminapi"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/adminapi/admintest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// These tests run the real unlockrd-keyserver binary with its admin
// listener and attack it over real mutual TLS with certificates made here.

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// keyServerBin builds cmd/unlockrd-keyserver once per test process.
func keyServerBin(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			binErr = err
			return
		}
		root := filepath.Dir(strings.TrimSpace(string(out)))
		dir, err := os.MkdirTemp("", "adminapi-bin-")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "unlockrd-keyserver")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/unlockrd-keyserver")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// lockedBuf collects a process's stderr while tests read it.
type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type server struct {
	bin, data string
	admin     string // https://127.0.0.1:port
	keys      string // boot-facing https://127.0.0.1:port
	pin       pin.Pin
	stderr    *lockedBuf
}

// fixture is a running server with an admin CA, a good client, and
// clients it must refuse.
type fixture struct {
	*server
	ca, other                             *admintest.CA
	good, foreign, expired, tlsServerOnly *admintest.Client
}

func newFixture(t *testing.T, extra ...string) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{}
	var err error
	if f.ca, err = admintest.NewCA(filepath.Join(dir, "pki"), "admin-ca"); err != nil {
		t.Fatal(err)
	}
	if f.other, err = admintest.NewCA(filepath.Join(dir, "other"), "other-ca"); err != nil {
		t.Fatal(err)
	}
	if f.good, err = f.ca.Good("control-plane"); err != nil {
		t.Fatal(err)
	}
	if f.foreign, err = f.other.Good("intruder"); err != nil {
		t.Fatal(err)
	}
	if f.expired, err = f.ca.Issue("expired-client", time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if f.tlsServerOnly, err = f.ca.Issue("server-purpose", time.Now().Add(-time.Hour), time.Now().Add(time.Hour), x509.ExtKeyUsageServerAuth); err != nil {
		t.Fatal(err)
	}
	f.server = startServer(t, filepath.Join(dir, "data"), append([]string{"--admin-ca", f.ca.File}, extra...)...)
	return f
}

func startServer(t *testing.T, data string, extra ...string) *server {
	t.Helper()
	s := &server{bin: keyServerBin(t), data: data, stderr: &lockedBuf{}}
	args := append([]string{"serve", "--data", data, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(s.bin, args...)
	cmd.Env = append(os.Environ(), "UNLOCKRD_MASTER_KEY_FILE=")
	cmd.Stderr = s.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	deadline := time.After(time.Minute)
	for s.keys == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("server exited:\n%s", s.stderr)
			}
			k, v, _ := strings.Cut(l, ": ")
			switch k {
			case "admin":
				s.admin = "https://" + v
			case "pin":
				if s.pin, err = pin.Parse(v); err != nil {
					t.Fatal(err)
				}
			case "listen":
				s.keys = "https://" + v
			}
		case <-deadline:
			t.Fatalf("server did not start:\n%s", s.stderr)
		}
	}
	if s.admin == "" {
		t.Fatalf("server printed no admin address:\n%s", s.stderr)
	}
	return s
}

func (s *server) caFile() string { return filepath.Join(s.data, keyserver.TLSCertFile) }

// events returns the admin audit lines so far.
func (s *server) events(t *testing.T) []adminapi.Event {
	t.Helper()
	var evs []adminapi.Event
	for _, l := range strings.Split(s.stderr.String(), "\n") {
		var ev adminapi.Event
		if json.Unmarshal([]byte(l), &ev) == nil && ev.Kind == adminapi.EventKind {
			evs = append(evs, ev)
		}
	}
	return evs
}

// waitEvent waits for an audit line matching ok.
func (s *server) waitEvent(t *testing.T, what string, ok func(adminapi.Event) bool) adminapi.Event {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		for _, ev := range s.events(t) {
			if ok(ev) {
				return ev
			}
		}
	}
	t.Fatalf("no audit line for %s in:\n%s", what, s.stderr)
	return adminapi.Event{}
}

func (s *server) client(t *testing.T, c *admintest.Client) *adminapi.Client {
	t.Helper()
	cl, err := adminapi.NewClient(s.admin, c.CertFile, c.KeyFile, s.caFile())
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// rawClient is an http.Client presenting c (nil: no certificate).
func (s *server) rawClient(t *testing.T, c *admintest.Client, maxVersion uint16) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(s.caFile())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	tc := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS10, MaxVersion: maxVersion}
	if c != nil {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		// Always sent, as curl does: Go's default would send nothing when
		// the certificate is not from a CA the server names.
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
}

func TestRefusedAtHandshakeAndAudited(t *testing.T) {
	f := newFixture(t)
	cases := []struct {
		name   string
		client *admintest.Client
		max    uint16
		reason string
	}{
		{"no certificate", nil, 0, "no client certificate"},
		{"no certificate TLS 1.2", nil, tls.VersionTLS12, "no client certificate"},
		{"another CA", f.foreign, 0, "certificate signed by unknown authority"},
		{"another CA TLS 1.2", f.foreign, tls.VersionTLS12, "certificate signed by unknown authority"},
		{"expired", f.expired, 0, "expired"},
		{"server-auth only", f.tlsServerOnly, 0, "incompatible key usage"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hc := f.rawClient(t, c.client, c.max)
			resp, err := hc.Get(f.admin + adminapi.HostsPath)
			if err == nil {
				resp.Body.Close()
				t.Fatalf("answered %s: the handshake should have been refused", resp.Status)
			}
			t.Logf("client sees: %v", err)
			who := ""
			if c.client != nil {
				who = c.client.Subject
			}
			ev := f.waitEvent(t, c.name, func(ev adminapi.Event) bool {
				return ev.Outcome == adminapi.OutcomeRefused && ev.Who == who && strings.Contains(ev.Reason, c.reason)
			})
			if ev.Remote == "" || ev.Status != 0 {
				t.Errorf("refusal event %+v: want the remote address and no status", ev)
			}
		})
	}
	// An old TLS version fails the handshake before any certificate.
	resp, err := f.rawClient(t, f.good, tls.VersionTLS11).Get(f.admin + adminapi.HostsPath)
	if err == nil {
		resp.Body.Close()
		t.Fatal("TLS 1.1 answered")
	}
	f.waitEvent(t, "TLS 1.1", func(ev adminapi.Event) bool { return ev.Outcome == adminapi.OutcomeHandshake })
	// No call got through: nothing was listed.
	for _, ev := range f.events(t) {
		if ev.Action == "list" {
			t.Errorf("a refused client reached the handler: %+v", ev)
		}
	}
	// The good client gets through, over TLS 1.2 and 1.3, and is named.
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		resp, err := f.rawClient(t, f.good, v).Get(f.admin + adminapi.HostsPath)
		if err != nil {
			t.Fatalf("good client, TLS %x: %v", v, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("good client: %s", resp.Status)
		}
	}
	ev := f.waitEvent(t, "good list", func(ev adminapi.Event) bool {
		return ev.Action == "list" && ev.Who == f.good.Subject && ev.Outcome == "ok" && ev.Status == 200
	})
	if want := certSum(t, f.good.CertFile); ev.Cert != want {
		t.Errorf("audit cert = %q, want %q", ev.Cert, want)
	}
	// The boot-facing port takes no admin calls.
	resp, err = keyserver.PinnedClient(f.pin).Get(f.keys + adminapi.HostsPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("admin path on the key port: %s, want 404", resp.Status)
	}
}

func fetch(t *testing.T, s *server, host, token string) ([][]byte, int) {
	t.Helper()
	_, keys, status, err := keyserver.Fetch(context.Background(), keyserver.PinnedClient(s.pin), s.keys+keyserver.KeysPath+host, token)
	if err != nil {
		t.Fatal(err)
	}
	return keys, status
}

func wantStatus(t *testing.T, err error, status int, mentions ...string) {
	t.Helper()
	var ae *adminapi.Error
	if !errors.As(err, &ae) || ae.Status != status {
		t.Fatalf("err = %v, want an answer with status %d", err, status)
	}
	for _, m := range mentions {
		if !strings.Contains(ae.Error(), m) && ae.Field != m && ae.Host != m {
			t.Errorf("error %+v does not name %q", ae.ErrorBody, m)
		}
	}
}

func TestEveryEndpoint(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	c := f.client(t, f.good)

	// add, random key
	a, err := c.Add(ctx, "db-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.Host != "db-1" || len(a.Token) != 43 || a.KeyID == "" {
		t.Fatalf("add = %+v", a)
	}
	keys, st := fetch(t, f.server, "db-1", a.Token)
	if st != 200 || len(keys) != 1 || len(keys[0]) != keyserver.KeySize {
		t.Fatalf("key fetch after add: %d, %d keys", st, len(keys))
	}
	first := keys[0]
	// add, imported key
	imported := []byte("an existing passphrase of db-2's disk")
	b, err := c.Add(ctx, "db-2", imported)
	if err != nil {
		t.Fatal(err)
	}
	if keys, st := fetch(t, f.server, "db-2", b.Token); st != 200 || !bytes.Equal(keys[0], imported) {
		t.Fatalf("imported key not served: %d", st)
	}
	// add errors name the field and host
	_, err = c.Add(ctx, "db-1", nil)
	wantStatus(t, err, 409, "db-1")
	_, err = c.Add(ctx, "bad/host", nil)
	wantStatus(t, err, 400, "host")
	_, err = c.Add(ctx, "db-3", bytes.Repeat([]byte{1}, keyserver.MaxKeySize+1))
	wantStatus(t, err, 400, "key", "db-3")

	// get and list
	hi, err := c.Get(ctx, "db-1")
	if err != nil {
		t.Fatal(err)
	}
	// "new" once host states land (a random key has formatted nothing yet).
	if (hi.State != "active" && hi.State != "new") || len(hi.Keys) != 1 || hi.Keys[0] != a.KeyID || hi.Created.IsZero() {
		t.Fatalf("get = %+v", hi)
	}
	_, err = c.Get(ctx, "nope")
	wantStatus(t, err, 404, "nope")
	if !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a 404 is not store.ErrNotFound: %v", err)
	}
	list, err := c.List(ctx)
	if err != nil || len(list) != 2 || list[0].Host != "db-1" || list[1].Host != "db-2" {
		t.Fatalf("list = %+v, %v", list, err)
	}

	// rotate: new key first, old one second; a second rotate is refused
	kid, err := c.Rotate(ctx, "db-1")
	if err != nil {
		t.Fatal(err)
	}
	keys, _ = fetch(t, f.server, "db-1", a.Token)
	if len(keys) != 2 || !bytes.Equal(keys[1], first) || bytes.Equal(keys[0], first) {
		t.Fatalf("after rotate: %d keys, old key second = %v", len(keys), len(keys) == 2 && bytes.Equal(keys[1], first))
	}
	_, err = c.Rotate(ctx, "db-1")
	wantStatus(t, err, 409, "db-1")
	dropped, err := c.Finish(ctx, "db-1")
	if err != nil || len(dropped) != 1 || dropped[0] != a.KeyID {
		t.Fatalf("finish = %v, %v; want [%s]", dropped, err, a.KeyID)
	}
	if hi, _ := c.Get(ctx, "db-1"); len(hi.Keys) != 1 || hi.Keys[0] != kid {
		t.Fatalf("after finish: %+v, want only %s", hi, kid)
	}
	if dropped, err := c.Finish(ctx, "db-1"); err != nil || len(dropped) != 0 {
		t.Fatalf("finish without a rotation = %v, %v", dropped, err)
	}

	// revoke, reinstate
	if hi, err := c.SetState(ctx, "db-1", store.Revoked); err != nil || hi.State != "revoked" {
		t.Fatalf("revoke = %+v, %v", hi, err)
	}
	if _, st := fetch(t, f.server, "db-1", a.Token); st != http.StatusForbidden {
		t.Fatalf("revoked host fetched: %d", st)
	}
	if hi, err := c.SetState(ctx, "db-1", store.Active); err != nil || hi.State != "active" {
		t.Fatalf("reinstate = %+v, %v", hi, err)
	}
	if _, st := fetch(t, f.server, "db-1", a.Token); st != 200 {
		t.Fatalf("reinstated host: %d", st)
	}
	_, err = c.SetState(ctx, "nope", store.Revoked)
	wantStatus(t, err, 404, "nope")

	// token
	tok, err := c.NewToken(ctx, "db-1")
	if err != nil || tok == a.Token {
		t.Fatalf("token = %v", err)
	}
	if _, st := fetch(t, f.server, "db-1", a.Token); st != 401 {
		t.Fatalf("old token still works: %d", st)
	}
	if _, st := fetch(t, f.server, "db-1", tok); st != 200 {
		t.Fatalf("new token: %d", st)
	}

	// export is off by default, and the refusal is audited
	_, _, err = c.Export(ctx, "db-1")
	wantStatus(t, err, 403, "db-1", "--admin-allow-export")
	f.waitEvent(t, "export refused", func(ev adminapi.Event) bool {
		return ev.Action == "export" && ev.Outcome == adminapi.OutcomeForbidden && ev.Host == "db-1" && ev.Who == f.good.Subject
	})

	// bad requests: unknown action, wrong method, unknown field, bad
	// base64, body too big, headers too big
	hc := f.rawClient(t, f.good, 0)
	for _, r := range []struct {
		method, path, body string
		status             int
		field              string
	}{
		{"POST", "/v1/hosts/db-1/explode", "", 404, ""},
		{"GET", "/v1/hosts/db-1/rotate", "", 405, ""},
		{"DELETE", "/v1/hosts/db-1", "", 405, ""},
		{"POST", "/v1/hosts", `{"host":"x","colour":"red"}`, 400, "colour"},
		{"POST", "/v1/hosts", `{"host":"x"}{"host":"y"}`, 400, ""},
		{"POST", "/v1/hosts", ``, 400, ""},
		{"POST", "/v1/hosts", `{"host":7}`, 400, "host"},
		{"POST", "/v1/hosts", `{"host":"a b"}`, 400, "host"},
		{"POST", "/v1/hosts", `{"host":"x","key":"!!!"}`, 400, "key"},
		{"POST", "/v1/hosts", `{"host":"x","key":` + strings.Repeat(" ", adminapi.MaxBody) + `"a"}`, 413, ""},
		{"POST", "/v1/hosts/db-1/rotate", `{"force":true}`, 400, ""},
		{"GET", "/v1/other", "", 404, ""},
	} {
		req, _ := http.NewRequest(r.method, f.admin+r.path, strings.NewReader(r.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", r.method, r.path, err)
		}
		var eb adminapi.ErrorBody
		json.NewDecoder(resp.Body).Decode(&eb)
		resp.Body.Close()
		if resp.StatusCode != r.status || eb.Error == "" || eb.Field != r.field {
			t.Errorf("%s %s %.40q: %s %+v, want %d field %q", r.method, r.path, r.body, resp.Status, eb, r.status, r.field)
		}
	}
	req, _ := http.NewRequest("GET", f.admin+"/v1/hosts", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 2*adminapi.MaxHeaderBytes))
	if resp, err := hc.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("huge header: %s, want 431", resp.Status)
		}
	}
	f.waitEvent(t, "huge header", func(ev adminapi.Event) bool {
		return ev.Outcome == adminapi.OutcomeBadRequest && ev.Action == "connect" && ev.Who == f.good.Subject
	})

	// Every call was audited with who, what and how; no token or key
	// ever reached the audit.
	evs := f.events(t)
	for _, want := range []string{"add", "get", "list", "rotate", "finish", "revoke", "reinstate", "token", "export"} {
		found := false
		for _, ev := range evs {
			found = found || (ev.Action == want && ev.Who == f.good.Subject && ev.Status != 0)
		}
		if !found {
			t.Errorf("no audit line for %s", want)
		}
	}
	log := f.stderr.String()
	for _, secret := range []string{a.Token, b.Token, tok, base64.StdEncoding.EncodeToString(imported), string(imported), base64.StdEncoding.EncodeToString(first)} {
		if strings.Contains(log, secret) {
			t.Errorf("a secret reached the server's log")
		}
	}
}

func TestExportWhenAllowed(t *testing.T) {
	f := newFixture(t, "--admin-allow-export")
	ctx := context.Background()
	c := f.client(t, f.good)
	a, err := c.Add(ctx, "db-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rotate(ctx, "db-1"); err != nil {
		t.Fatal(err)
	}
	served, _ := fetch(t, f.server, "db-1", a.Token)
	ids, keys, err := c.Export(ctx, "db-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || !bytes.Equal(keys[0], served[0]) || !bytes.Equal(keys[1], served[1]) {
		t.Fatalf("export: %v, %d keys, not the served ones", ids, len(keys))
	}
	ev := f.waitEvent(t, "export", func(ev adminapi.Event) bool {
		return ev.Action == "export" && ev.Outcome == "ok"
	})
	if ev.Who != f.good.Subject || ev.Host != "db-1" || len(ev.KeyIDs) != 2 {
		t.Errorf("export audit = %+v", ev)
	}
	for _, k := range keys {
		if strings.Contains(f.stderr.String(), base64.StdEncoding.EncodeToString(k)) {
			t.Errorf("an exported key reached the server's log")
		}
	}
}

// run runs the binary; it returns stdout, stderr and the exit code.
func (s *server) run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(s.bin, args...)
	cmd.Env = append(os.Environ(), "UNLOCKRD_MASTER_KEY_FILE=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestCLIThroughAPI runs every host command once on the data folder and
// once through the admin API, on two hosts, and wants the same output
// (host name and token masked) and the same exit status.
func TestCLIThroughAPI(t *testing.T) {
	f := newFixture(t, "--admin-allow-export")
	local := []string{"--data", f.data}
	remote := []string{"--server", f.admin, "--cert", f.good.CertFile, "--key", f.good.KeyFile, "--ca", f.caFile()}
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte("an imported passphrase"), 0o600); err != nil {
		t.Fatal(err)
	}
	token := func(s string) bool { return len(s) == 43 && !strings.ContainsAny(s, " \t+/=") }
	mask := func(s, host string) string {
		s = strings.ReplaceAll(s, host, "HOST")
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if token(l) {
				l = "TOKEN"
			}
			out = append(out, l)
		}
		return strings.Join(out, "\n")
	}
	steps := [][]string{
		{"host", "add", "NAME"},
		{"host", "add", "NAME"}, // exists
		{"host", "add", "--key-file", keyFile, "NAME-imported"},
		{"host", "rotate", "NAME"},
		{"host", "rotate", "NAME"}, // rotation open
		{"host", "rotate", "--finish", "NAME"},
		{"host", "rotate", "--finish", "NAME"}, // none open
		{"host", "revoke", "NAME"},
		{"host", "reinstate", "NAME"},
		{"host", "token", "NAME"},
		{"host", "key", "NAME-imported"},
		{"host", "rotate", "NAME-missing"},
		{"host", "revoke", "bad/name"},
	}
	for _, st := range steps {
		var outs [2][3]string
		for i, mode := range [][]string{local, remote} {
			name := []string{"viadata", "viaapi"}[i]
			args := append([]string{}, st[:2]...)
			args = append(args, mode...)
			for _, a := range st[2:] {
				args = append(args, strings.ReplaceAll(a, "NAME", name))
			}
			o, e, code := f.run(t, args...)
			outs[i] = [3]string{mask(o, name), mask(e, name), fmt.Sprint(code)}
		}
		if outs[0] != outs[1] {
			t.Errorf("%v: local and remote differ:\nlocal:  %q\nremote: %q", st, outs[0], outs[1])
		} else {
			t.Logf("%v: exit %s, %q %q", st, outs[0][2], outs[0][0], outs[0][1])
		}
	}
	// Same store, same listing, whichever way it is read.
	for _, js := range [][]string{nil, {"--json"}} {
		lo, _, _ := f.run(t, append(append([]string{"host", "list"}, local...), js...)...)
		ro, re, _ := f.run(t, append(append([]string{"host", "list"}, remote...), js...)...)
		if lo != ro || !strings.Contains(lo, "viaapi-imported") {
			t.Errorf("host list %v: local\n%s\nremote\n%s%s", js, lo, ro, re)
		}
	}
	// The imported key comes back out, as enrolled.
	if o, _, _ := f.run(t, append(append([]string{"host", "key"}, remote...), "viaapi-imported")...); o != "an imported passphrase" {
		t.Errorf("host key through the API = %q", o)
	}
	// Refusals: wrong client certificate (exit 1, the TLS error shown),
	// --server with --data (usage).
	foreign := []string{"--server", f.admin, "--cert", f.foreign.CertFile, "--key", f.foreign.KeyFile, "--ca", f.caFile()}
	if _, e, code := f.run(t, append([]string{"host", "list"}, foreign...)...); code != 1 || !strings.Contains(e, "tls") {
		t.Errorf("foreign client: exit %d %s", code, e)
	}
	if _, e, code := f.run(t, append(append([]string{"host", "list"}, remote...), local...)...); code != 2 || !strings.Contains(e, "--server and --data") {
		t.Errorf("--server with --data: exit %d %s", code, e)
	}
	f.waitEvent(t, "the CLI's foreign client", func(ev adminapi.Event) bool {
		return ev.Outcome == adminapi.OutcomeRefused && ev.Who == f.foreign.Subject
	})
}

// TestSlowClientsCutOff: a connection that never completes a handshake,
// and a client with a good certificate that never finishes its headers,
// are closed by the admin listener's timeouts and audited.
func TestSlowClientsCutOff(t *testing.T) {
	f := newFixture(t)
	u := strings.TrimPrefix(f.admin, "https://")
	cert, err := tls.LoadX509KeyPair(f.good.CertFile, f.good.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		name string
		took time.Duration
		err  error
	}
	res := make(chan result, 2)
	// Plain TCP, no TLS at all.
	go func() {
		c, err := net.Dial("tcp", u)
		if err != nil {
			res <- result{"idle", 0, err}
			return
		}
		defer c.Close()
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(time.Minute))
		_, err = io.ReadAll(c)
		res <- result{"idle", time.Since(start), err}
	}()
	// TLS with the good certificate, headers never finished.
	go func() {
		c, err := tls.Dial("tcp", u, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
		if err != nil {
			res <- result{"slow headers", 0, err}
			return
		}
		defer c.Close()
		start := time.Now()
		io.WriteString(c, "GET /v1/hosts HTTP/1.1\r\nHost: x\r\nX-Slow: ")
		c.SetReadDeadline(time.Now().Add(time.Minute))
		_, err = io.ReadAll(c)
		res <- result{"slow headers", time.Since(start), err}
	}()
	for range 2 {
		r := <-res
		// Cut at ReadHeaderTimeout; well under the client's own minute.
		if r.err != nil || r.took < adminapi.ReadHeaderTimeout-time.Second || r.took > 3*adminapi.ReadHeaderTimeout {
			t.Errorf("%s: closed after %v (err %v), want about %v", r.name, r.took, r.err, adminapi.ReadHeaderTimeout)
		} else {
			t.Logf("%s: closed by the server after %v", r.name, r.took.Round(time.Millisecond))
		}
	}
	f.waitEvent(t, "idle connection", func(ev adminapi.Event) bool { return ev.Outcome == adminapi.OutcomeHandshake })
	f.waitEvent(t, "slow headers", func(ev adminapi.Event) bool {
		return ev.Outcome == adminapi.OutcomeBadRequest && ev.Action == "connect" && ev.Who == f.good.Subject
	})
}

// certSum is the audit's fingerprint of a PEM certificate file, computed
// with openssl (an outside oracle).
func certSum(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("openssl", "x509", "-in", file, "-noout", "-fingerprint", "-sha256").Output()
	if err != nil {
		t.Fatalf("openssl: %v", err)
	}
	_, hexs, _ := strings.Cut(strings.TrimSpace(string(out)), "=")
	hexs = strings.ToLower(strings.ReplaceAll(hexs, ":", ""))
	return hexs[:32]
}

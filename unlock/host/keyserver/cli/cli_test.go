package cli_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// binary builds cmd/unlockrd-keyserver once per test run: the end-to-end
// tests run the real program, as the QEMU tests and operators do.
func binary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	buildOnce.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			buildErr = err
			return
		}
		dir, err := os.MkdirTemp("", "unlockrd-keyserver-test-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "unlockrd-keyserver")
		cmd := exec.Command(goBin, "build", "-o", binPath, "github.com/unlockrd/unlockrd/cmd/unlockrd-keyserver")
		// As the Makefile builds it: with cgo, for PKCS#11 modules.
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

// run runs the binary to completion and returns stdout, stderr and the exit code.
func run(t *testing.T, stdin []byte, args ...string) (stdout []byte, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(binary(t), args...)
	cmd.Env = append(os.Environ(), keyserver.MasterKeyEnv+"=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.Bytes(), errb.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.Bytes(), errb.String(), 0
}

func mustRun(t *testing.T, stdin []byte, args ...string) []byte {
	t.Helper()
	out, errs, code := run(t, stdin, args...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s", args, code, errs)
	}
	return out
}

// server is a running `serve`.
type server struct {
	cmd  *exec.Cmd
	pin  pin.Pin
	addr string
	// metrics is the --metrics-listen address serve printed, if any.
	metrics string
	mu      sync.Mutex
	stderr  bytes.Buffer
	done    chan error
}

func (s *server) Stderr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.String()
}

type lockedWriter struct{ s *server }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	return w.s.stderr.Write(p)
}

func startServer(t *testing.T, args ...string) *server {
	t.Helper()
	s := &server{done: make(chan error, 1)}
	s.cmd = exec.Command(binary(t), append([]string{"serve"}, args...)...)
	s.cmd.Env = append(os.Environ(), keyserver.MasterKeyEnv+"=")
	s.cmd.Stderr = lockedWriter{s}
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.done
	})
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		io.Copy(io.Discard, out)
		s.done <- s.cmd.Wait()
	}()
	timeout := time.After(30 * time.Second)
	for s.addr == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("serve exited before listening: %s", s.Stderr())
			}
			if v, ok := strings.CutPrefix(l, "pin: "); ok {
				if s.pin, err = pin.Parse(v); err != nil {
					t.Fatal(err)
				}
			} else if v, ok := strings.CutPrefix(l, "listen: "); ok {
				s.addr = v
			} else if v, ok := strings.CutPrefix(l, "metrics: "); ok {
				s.metrics = v
			} else {
				t.Fatalf("unexpected stdout line %q", l)
			}
		case <-timeout:
			t.Fatalf("serve did not print its address: %s", s.Stderr())
		}
	}
	if s.pin == (pin.Pin{}) {
		t.Fatal("no pin line before the listen line")
	}
	return s
}

func (s *server) fetch(t *testing.T, host, token string) ([]string, [][]byte, int) {
	t.Helper()
	ids, keys, status, err := keyserver.Fetch(context.Background(), keyserver.PinnedClient(s.pin),
		"https://"+s.addr+keyserver.KeysPath+host, token)
	if err != nil {
		t.Fatalf("fetch %s: %v", host, err)
	}
	return ids, keys, status
}

func TestEndToEnd(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")

	// `host add` on a new folder creates it; the token is alone on stdout.
	out := mustRun(t, nil, "host", "add", "--data", data, "db-1")
	token := strings.TrimSuffix(string(out), "\n")
	if strings.ContainsAny(token, " \n\t") || len(token) != 43 {
		t.Fatalf("host add stdout %q is not a lone token", out)
	}
	// Flags may follow the name; an existing key may be enrolled.
	known := []byte("a known LUKS passphrase\x00\xff")
	out = mustRun(t, known, "host", "add", "db-2", "--data", data, "--key-file", "-")
	token2 := strings.TrimSpace(string(out))

	if _, errs, code := run(t, nil, "host", "add", "--data", data, "db-1"); code != 1 || !strings.Contains(errs, "already exists") {
		t.Fatalf("duplicate add: %d %s", code, errs)
	}
	if _, errs, code := run(t, nil, "host", "add", "--data", data, "../x"); code != 1 || !strings.Contains(errs, "invalid host id") {
		t.Fatalf("bad name: %d %s", code, errs)
	}
	if _, _, code := run(t, nil, "host", "frob", "--data", data, "x"); code != 2 {
		t.Fatalf("unknown subcommand exit %d", code)
	}

	s := startServer(t, "--data", data, "--listen", "127.0.0.1:0", "--san", "keys.test")
	if p := strings.TrimSpace(string(mustRun(t, nil, "pin", "--data", data))); p != s.pin.String() {
		t.Fatalf("pin command %q, serve printed %q", p, s.pin)
	}
	certPin := strings.TrimSpace(string(mustRun(t, nil, "pin", "--cert", filepath.Join(data, keyserver.TLSCertFile))))
	if certPin != s.pin.String() {
		t.Fatalf("pin --cert %q", certPin)
	}

	ids, keys, status := s.fetch(t, "db-1", token)
	if status != 200 || len(keys) != 1 {
		t.Fatalf("fetch db-1: %d %v", status, ids)
	}
	if raw := mustRun(t, nil, "host", "key", "--data", data, "db-1"); !bytes.Equal(raw, keys[0]) || len(raw) != keyserver.KeySize {
		t.Fatal("host key bytes differ from the served key")
	}
	if _, keys2, _ := s.fetch(t, "db-2", token2); !bytes.Equal(keys2[0], known) {
		t.Fatal("enrolled key not served as given")
	}

	// Admin commands change what the running server serves.
	newID := strings.TrimSpace(string(mustRun(t, nil, "host", "rotate", "--data", data, "db-1")))
	ids2, keys2, _ := s.fetch(t, "db-1", token)
	if len(ids2) != 2 || ids2[0] != newID || ids2[1] != ids[0] || !bytes.Equal(keys2[1], keys[0]) {
		t.Fatalf("during rotation: %v", ids2)
	}
	if raw := mustRun(t, nil, "host", "key", "--data", data, "db-1"); !bytes.Equal(raw, keys2[0]) {
		t.Fatal("host key is not the new current key")
	}
	if raw := mustRun(t, nil, "host", "key", "--data", data, "--id", ids[0], "db-1"); !bytes.Equal(raw, keys[0]) {
		t.Fatal("host key --id is not the old key")
	}
	if _, errs, code := run(t, nil, "host", "rotate", "--data", data, "db-1"); code != 1 || !strings.Contains(errs, "rotation in progress") {
		t.Fatalf("second rotate: %d %s", code, errs)
	}
	mustRun(t, nil, "host", "rotate", "--data", data, "--finish", "db-1")
	if ids3, keys3, _ := s.fetch(t, "db-1", token); len(ids3) != 1 || ids3[0] != newID || !bytes.Equal(keys3[0], keys2[0]) {
		t.Fatalf("after finish: %v", ids3)
	}

	mustRun(t, nil, "host", "revoke", "--data", data, "db-1")
	if _, _, st := s.fetch(t, "db-1", token); st != 403 {
		t.Fatalf("revoked: %d", st)
	}
	mustRun(t, nil, "host", "reinstate", "--data", data, "db-1")
	newTok := strings.TrimSpace(string(mustRun(t, nil, "host", "token", "--data", data, "db-1")))
	if _, _, st := s.fetch(t, "db-1", token); st != 401 {
		t.Fatalf("old token: %d", st)
	}
	if _, _, st := s.fetch(t, "db-1", newTok); st != 200 {
		t.Fatalf("new token: %d", st)
	}
	if _, _, st := s.fetch(t, "nope", token); st != 404 {
		t.Fatalf("unknown host: %d", st)
	}

	var list []struct {
		Host  string
		State string
		Keys  []string
	}
	if err := json.Unmarshal(mustRun(t, nil, "host", "list", "--data", data, "--json"), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Host != "db-1" || list[0].State != "active" || len(list[0].Keys) != 1 || list[1].Host != "db-2" {
		t.Fatalf("list: %+v", list)
	}
	if txt := string(mustRun(t, nil, "host", "list", "--data", data)); !strings.Contains(txt, "db-2") {
		t.Fatalf("list: %s", txt)
	}

	// SIGTERM stops it cleanly.
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("serve after SIGTERM: %v: %s", err, s.Stderr())
		}
		s.done <- nil // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("serve ignored SIGTERM")
	}

	// Audit: one JSON line per request, no secrets.
	logs := s.Stderr()
	secrets := []string{token, token2, newTok, base64.StdEncoding.EncodeToString(keys[0]),
		base64.StdEncoding.EncodeToString(keys2[0]), base64.StdEncoding.EncodeToString(known)}
	for _, sec := range secrets {
		if strings.Contains(logs, sec) {
			t.Fatalf("server log holds a secret:\n%s", logs)
		}
	}
	outcomes := map[string]int{}
	for _, l := range strings.Split(logs, "\n") {
		if strings.HasPrefix(l, "{") {
			var ev keyserver.AuditEvent
			if err := json.Unmarshal([]byte(l), &ev); err != nil {
				t.Fatalf("audit line %q: %v", l, err)
			}
			outcomes[ev.Outcome]++
		}
	}
	if outcomes["ok"] != 5 || outcomes["revoked"] != 1 || outcomes["bad_token"] != 1 || outcomes["unknown_host"] != 1 {
		t.Fatalf("audit outcomes %v\n%s", outcomes, logs)
	}
}

// `host key` refuses when the folder does not exist (a typo must not
// create a new, empty one).
func TestAdminNeedsExistingFolder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nope")
	_, errs, code := run(t, nil, "host", "list", "--data", dir)
	if code != 1 || !strings.Contains(errs, "hosts.db") {
		t.Fatalf("%d %s", code, errs)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Fatal("folder created")
	}
	if _, _, code := run(t, nil, "host", "list"); code != 2 {
		t.Fatalf("no --data: exit %d", code)
	}
}

func TestServeRefusesCorruptDataFile(t *testing.T) {
	data := t.TempDir()
	mustRun(t, nil, "host", "add", "--data", data, "db-1")
	db := filepath.Join(data, keyserver.DBFile)
	b, _ := os.ReadFile(db)
	copy(b, bytes.Repeat([]byte("garbage!"), 8192/8))
	os.WriteFile(db, b, 0o600)
	_, errs, code := run(t, nil, "serve", "--data", data, "--listen", "127.0.0.1:0")
	if code != 1 || !strings.Contains(errs, "refusing to start") || !strings.Contains(errs, db) ||
		!strings.Contains(errs, "corrupt") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}

func TestServeRefusesWrongMasterKey(t *testing.T) {
	data := t.TempDir()
	mustRun(t, nil, "host", "add", "--data", data, "db-1")
	other := filepath.Join(t.TempDir(), "other.key")
	if _, err := keyserver.CreateMasterKey(other); err != nil {
		t.Fatal(err)
	}
	_, errs, code := run(t, nil, "serve", "--data", data, "--listen", "127.0.0.1:0", "--master-key", other)
	if code != 1 || !strings.Contains(errs, "wrong master key") || !strings.Contains(errs, other) {
		t.Fatalf("exit %d: %s", code, errs)
	}
	// The environment variable works the same way.
	cmd := exec.Command(binary(t), "host", "list", "--data", data)
	cmd.Env = append(os.Environ(), keyserver.MasterKeyEnv+"="+other)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "wrong master key") {
		t.Fatalf("env master key: %v %s", err, out)
	}
}

// An operator-supplied certificate is served, and its pin printed.
func TestServeWithGivenCert(t *testing.T) {
	data, certDir := t.TempDir(), t.TempDir()
	token := strings.TrimSpace(string(mustRun(t, nil, "host", "add", "--data", data, "db-1")))
	// Make a certificate in another folder and hand it over as files.
	mustRun(t, nil, "init", "--data", certDir)
	s := startServer(t, "--data", data, "--listen", "127.0.0.1:0",
		"--cert", filepath.Join(certDir, keyserver.TLSCertFile), "--key", filepath.Join(certDir, keyserver.TLSKeyFile))
	want := strings.TrimSpace(string(mustRun(t, nil, "pin", "--data", certDir)))
	if s.pin.String() != want {
		t.Fatalf("served pin %s, cert pin %s", s.pin, want)
	}
	if _, _, st := s.fetch(t, "db-1", token); st != 200 {
		t.Fatalf("fetch: %d", st)
	}
}

func TestHostKeyInProcess(t *testing.T) {
	// Main runs in-process too; a non-file stdout is never a terminal, so
	// the terminal refusal does not apply.
	data := t.TempDir()
	mustRun(t, nil, "host", "add", "--data", data, "db-1")
	var out, errb bytes.Buffer
	if code := cliMain(t, []string{"host", "key", "--data", data, "db-1"}, &out, &errb); code != 0 || out.Len() != keyserver.KeySize {
		t.Fatalf("in-process host key: %d %q", code, errb.String())
	}
}

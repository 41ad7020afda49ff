package qemutests

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/adminapi"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/adminapi/admintest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/pkcs11key/softhsmtest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// The remote admin API drives a host's life (issue 13): enrolled, booted,
// rotated, booted on the new key alone, revoked and refused, every change
// made by a control-plane client over mutual TLS; no `host` command and no
// access to the data folder.

// masterKeyOption gives serve its master key (its flags), preparing what
// it needs under dir.
type masterKeyOption func(t *testing.T, ctx context.Context, dir string) []string

// softHSMMasterKey keeps the master key in a real SoftHSM2 token (Debian's
// softhsm2): serve creates the non-extractable token key on first start.
// The token folder is named to the server through SOFTHSM2_CONF, which the
// key server inherits from the test's environment.
func softHSMMasterKey(t *testing.T, _ context.Context, dir string) []string {
	t.Helper()
	tk, err := softhsmtest.New(filepath.Join(dir, "softhsm"), "qemu-admin-pin", "unlockrd")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(softhsmtest.ConfEnv, tk.Conf)
	uri, err := tk.PINFileURI(dir, "unlockrd", "unlockrd-master")
	if err != nil {
		t.Fatal(err)
	}
	return []string{"--master-key", uri}
}

// adminServer is a key server with its admin API and a client of it.
type adminServer struct {
	*harness.KeyServer
	admin  *adminapi.Client
	client *admintest.Client
}

// startAdminServer starts the key server on a new data folder in dir with
// the admin API on another loopback port, trusting client certificates
// of a CA made here, and key export on (rotation needs the new key on
// the disk).
func startAdminServer(t *testing.T, ctx context.Context, bins *harness.Bins, dir string, mk masterKeyOption) *adminServer {
	t.Helper()
	ca, err := admintest.NewCA(filepath.Join(dir, "pki"), "admin-ca")
	if err != nil {
		t.Fatal(err)
	}
	cl, err := ca.Good("control-plane")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminAddr := l.Addr().String()
	l.Close()
	data := filepath.Join(dir, "keyserver")
	// Last-seen times are written every second, so a boot shows in the
	// host's record while the test waits.
	args := append([]string{"--admin-listen", adminAddr, "--admin-ca", ca.File, "--admin-allow-export", "--last-seen-interval", "1s"}, mk(t, ctx, dir)...)
	ks, err := harness.StartKeyServer(ctx, bins.KeyServer, data, "", testLog{t}, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ks.Stop)
	if !strings.Contains(ks.Logs(), "admin: "+adminAddr) {
		t.Fatalf("serve did not report its admin listener %s:\n%s", adminAddr, ks.Logs())
	}
	c, err := adminapi.NewClient("https://"+adminAddr, cl.CertFile, cl.KeyFile, filepath.Join(data, keyserver.TLSCertFile))
	if err != nil {
		t.Fatal(err)
	}
	return &adminServer{KeyServer: ks, admin: c, client: cl}
}

// TestAdminAPIEnrolBootRotateBootRevoke runs with the master key in
// SoftHSM2 (issue 13); every other QEMU test uses a key file.
func TestAdminAPIEnrolBootRotateBootRevoke(t *testing.T) {
	testAdminAPILifecycle(t, softHSMMasterKey)
}

func testAdminAPILifecycle(t *testing.T, mk masterKeyOption) {
	ctx := t.Context()
	k := kernelcache.ForTestNamed(t, kernelcache.Default)
	bins, err := harness.Binaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s := &skeleton{dir: t.TempDir(), uuid: harness.RandomUUID(), kernel: k, bins: bins}
	srv := startAdminServer(t, ctx, bins, s.dir, mk)
	s.server, s.data = srv.KeyServer, srv.Data

	// Enrol: the token comes back once; the key is exported (audited) to
	// format the volumes.
	added, err := srv.admin.Add(ctx, s.uuid, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.token = added.Token
	_, keys, err := srv.admin.Export(ctx, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	s.key = keys[0]
	if s.fx, err = harness.NewFixture(ctx, s.dir, s.key); err != nil {
		t.Fatal(err)
	}
	img := s.image(t, ctx, harness.ImageConfig{})
	hostRE := regexp.QuoteMeta(s.uuid)

	boot := func(name string) {
		t.Helper()
		vm := harness.StartVM(t, s.vmOptions(img))
		vm.ExpectLine(`^unlockrd: key: 1 key\(s\) for host `+hostRE, stageTimeout)
		l := vm.ExpectLine(`^unlockrd: volumes: volume data: /dev/vda2 opened with key 1 of 1, keyslot [0-9]+ -> /dev/mapper/data`, stageTimeout)
		t.Logf("%s: %s", name, l)
		rep := vm.ExpectReport(bootTimeout)
		if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != s.fx.HelloSHA256() {
			t.Errorf("%s: data file %s = %+v, want sha256 %s", name, harness.HelloPath, f, s.fx.HelloSHA256())
		}
		vm.Wait(bootTimeout)
	}
	boot("boot 1 (enrolled)")
	// The boot confirmed its first key (the state leaves new) and was
	// seen, from QEMU's user network (the host's loopback), without any
	// admin call in between.
	waitHost(t, ctx, srv.admin, s.uuid, func(hi adminapi.HostInfo) bool {
		return hi.State == string(store.Active) && !hi.LastSeen.IsZero() && hi.LastSource == "127.0.0.1"
	})

	// Rotate: the new key is exported and added to the volumes, the old
	// slot killed, the rotation finished; the next boot has only the new key.
	kid, err := srv.admin.Rotate(ctx, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	ids, keys, err := srv.admin.Export(ctx, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || ids[0] != kid || !bytes.Equal(keys[1], s.key) || bytes.Equal(keys[0], s.key) {
		t.Fatalf("export during rotation: ids %v, want [%s, %s] with the old key second", ids, kid, added.KeyID)
	}
	newKey := keys[0]
	for _, vol := range []string{"data", "swap"} {
		if _, err := s.fx.Disk.AddKey(ctx, vol, newKey); err != nil {
			t.Fatal(err)
		}
		if err := s.fx.Disk.KillSlot(ctx, vol, 0); err != nil {
			t.Fatal(err)
		}
	}
	if dropped, err := srv.admin.Finish(ctx, s.uuid); err != nil || len(dropped) != 1 || dropped[0] != added.KeyID {
		t.Fatalf("finish = %v, %v; want [%s]", dropped, err, added.KeyID)
	}
	seen1, err := srv.admin.Get(ctx, s.uuid)
	if err != nil {
		t.Fatal(err)
	}
	boot("boot 2 (rotated)")
	waitHost(t, ctx, srv.admin, s.uuid, func(hi adminapi.HostInfo) bool {
		return hi.State == string(store.Active) && len(hi.Keys) == 1 && hi.Keys[0] == kid && hi.LastSeen.After(seen1.LastSeen)
	})

	// Revoke: the host is refused and its volumes are never touched.
	if hi, err := srv.admin.SetState(ctx, s.uuid, store.Revoked); err != nil || hi.State != string(store.Revoked) {
		t.Fatalf("revoke = %+v, %v", hi, err)
	}
	before := partitions(t, s.fx)
	vm := harness.StartVM(t, s.vmOptions(img))
	vm.ExpectLine(`^unlockrd: key: .*403 forbidden \(host revoked\?\)`, stageTimeout)
	if l, ok := vm.Find(`^unlockrd: volumes:`); ok {
		t.Fatalf("volumes unlocked for a revoked host: %s", l.Text)
	}
	if err := vm.Kill(); err != nil {
		t.Fatal(err)
	}
	assertUnchanged(t, before, s.fx)

	// Every change is in the audit, by the client certificate's subject.
	logs := srv.Logs()
	for _, action := range []string{"add", "export", "rotate", "finish", "revoke"} {
		if !regexp.MustCompile(`"kind":"admin".*"who":"` + regexp.QuoteMeta(srv.client.Subject) + `".*"action":"` + action + `","host":"` + hostRE + `".*"outcome":"ok"`).MatchString(logs) {
			t.Errorf("no audit line for %s by %s", action, srv.client.Subject)
		}
	}
	if strings.Contains(logs, s.token) {
		t.Errorf("the host's token reached the server's log")
	}
}

// waitHost polls the admin API until host id's record satisfies ok (the
// last-seen flush runs every second), failing the test after a minute.
func waitHost(t *testing.T, ctx context.Context, c *adminapi.Client, id string, ok func(adminapi.HostInfo) bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	var hi adminapi.HostInfo
	var err error
	for time.Now().Before(deadline) {
		if hi, err = c.Get(ctx, id); err == nil && ok(hi) {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("host %s never reached the expected record: last %+v, %v", id, hi, err)
}

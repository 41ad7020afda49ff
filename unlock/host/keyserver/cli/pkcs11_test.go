package cli_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/pkcs11key/softhsmtest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore/etcdtest"
)

// TestPKCS11Replicas: two servers on one etcd cluster, each with its own
// data folder and no master key file, share one SoftHSM2 token: the first
// `init` creates the token key, both serve the same sealed keys, and a
// server given another token key is refused as the wrong master key.
func TestPKCS11Replicas(t *testing.T) {
	tk, err := softhsmtest.New(t.TempDir(), "4321", "fleet")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(softhsmtest.ConfEnv, tk.Conf)
	uri, err := tk.PINFileURI(t.TempDir(), "fleet", "unlockrd-master")
	if err != nil {
		t.Fatal(err)
	}
	c := etcdtest.New(t, 1)
	etcd := etcdArgs(c, "/hsm/")
	dirA, dirB := t.TempDir(), t.TempDir()
	mustRun(t, nil, args([]string{"init", "--data", dirA, "--master-key", uri}, etcd)...)
	tok := strings.TrimSpace(string(mustRun(t, nil, args([]string{"host", "add", "--data", dirA, "--master-key", uri}, etcd, []string{"db-1"})...)))
	if _, err := os.Stat(filepath.Join(dirA, keyserver.MasterKeyFile)); err == nil {
		t.Fatal("a master key file was written beside a token key")
	}

	a := startServer(t, args([]string{"--data", dirA, "--listen", "127.0.0.1:0", "--master-key", uri}, etcd)...)
	// B names the PIN inline: it must not show up in its output.
	b := startServer(t, args([]string{"--data", dirB, "--listen", "127.0.0.1:0", "--master-key", tk.URI("fleet", "unlockrd-master")}, etcd)...)
	idsA, keysA, stA := a.fetch(t, "db-1", tok)
	idsB, keysB, stB := b.fetch(t, "db-1", tok)
	if stA != 200 || stB != 200 || idsA[0] != idsB[0] || !bytes.Equal(keysA[0], keysB[0]) {
		t.Fatalf("replicas disagree: %d %v / %d %v", stA, idsA, stB, idsB)
	}
	if raw := mustRun(t, nil, args([]string{"host", "key", "--data", dirB, "--master-key", uri}, etcd, []string{"db-1"})...); !bytes.Equal(raw, keysA[0]) {
		t.Fatal("host key through the token differs from the served key")
	}

	// Another key (on the same token) is another master key: refused.
	other := tk.URI("fleet", "other")
	mustRun(t, nil, "init", "--data", t.TempDir(), "--master-key", other) // a bolt folder makes it
	_, errs, code := run(t, nil, args([]string{"serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--master-key", other}, etcd)...)
	if code != 1 || !strings.Contains(errs, "wrong master key") || !strings.Contains(errs, "object=other") {
		t.Fatalf("other token key: exit %d: %s", code, errs)
	}
	// A missing token key is not made when the store holds hosts.
	_, errs, code = run(t, nil, args([]string{"serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--master-key", tk.URI("fleet", "absent")}, etcd)...)
	if code != 1 || !strings.Contains(errs, "object=absent") {
		t.Fatalf("absent token key: exit %d: %s", code, errs)
	}
	for what, out := range map[string]string{"replica B": b.Stderr(), "refusals": errs} {
		if strings.Contains(out, tk.PIN) {
			t.Fatalf("%s output shows the PIN:\n%s", what, out)
		}
	}
}

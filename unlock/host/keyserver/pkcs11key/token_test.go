//go:build cgo

package pkcs11key

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/pkcs11key/softhsmtest"
)

func tokens(t *testing.T, labels ...string) *softhsmtest.Tokens {
	t.Helper()
	tk, err := softhsmtest.New(t.TempDir(), "1234", labels...)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(softhsmtest.ConfEnv, tk.Conf)
	return tk
}

func mustParse(t *testing.T, s string) *URI {
	t.Helper()
	u, err := Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestMasterKeySoftHSM runs against a real SoftHSM2 token: the key is
// made once, never extractable, and derives the same master key on every
// open; other keys derive other master keys.
func TestMasterKeySoftHSM(t *testing.T) {
	tk := tokens(t, "fleet", "other")
	u := mustParse(t, tk.URI("fleet", "mk"))

	if _, _, err := MasterKey(u, false); err == nil || !strings.Contains(err.Error(), "object=mk") || !strings.Contains(err.Error(), "init --master-key") {
		t.Fatalf("absent key without create: %v", err)
	}
	k1, created, err := MasterKey(u, true)
	if err != nil || !created || len(k1) != MasterKeySize {
		t.Fatalf("create: %v created=%v len %d", err, created, len(k1))
	}
	k2, created, err := MasterKey(u, true)
	if err != nil || created || !bytes.Equal(k1, k2) {
		t.Fatalf("reopen: %v created=%v same=%v", err, created, bytes.Equal(k1, k2))
	}
	pf, err := tk.PINFileURI(t.TempDir(), "fleet", "mk")
	if err != nil {
		t.Fatal(err)
	}
	if k3, _, err := MasterKey(mustParse(t, pf), false); err != nil || !bytes.Equal(k1, k3) {
		t.Fatalf("pin-source: %v", err)
	}
	k4, _, err := MasterKey(mustParse(t, tk.URI("fleet", "mk2")), true)
	if err != nil || bytes.Equal(k1, k4) {
		t.Fatalf("second key on the token: %v, same master key %v", err, bytes.Equal(k1, k4))
	}
	k5, _, err := MasterKey(mustParse(t, tk.URI("other", "mk")), true)
	if err != nil || bytes.Equal(k1, k5) {
		t.Fatalf("same label on another token: %v, same master key %v", err, bytes.Equal(k1, k5))
	}

	// Oracle: OpenSC's pkcs11-tool sees the key as AES, sensitive and
	// never extractable.
	out, err := exec.Command("pkcs11-tool", "--module", softhsmtest.Module, "--token-label", "fleet",
		"--login", "--pin", tk.PIN, "--list-objects", "--type", "secrkey").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool: %v\n%s", err, out)
	}
	o := string(out)
	if !strings.Contains(o, "label:      mk\n") || !strings.Contains(o, "AES") || !strings.Contains(o, "never extractable") || !strings.Contains(o, "always sensitive") {
		t.Fatalf("pkcs11-tool does not list mk as a never-extractable AES key:\n%s", o)
	}
}

// TestMasterKeyErrors: each failure names the part of the URI at fault,
// and none shows the PIN.
func TestMasterKeyErrors(t *testing.T) {
	tk := tokens(t, "fleet")
	if _, _, err := MasterKey(mustParse(t, tk.URI("fleet", "mk")), true); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, uri, want string }{
		{"wrong PIN", strings.Replace(tk.URI("fleet", "mk"), "pin-value=1234", "pin-value=9999", 1), "wrong PIN (pin-value/pin-source)"},
		{"missing token", tk.URI("nope", "mk"), `token=nope: no such token in module ` + softhsmtest.Module + ` (it has tokens "fleet"`},
		{"missing object", tk.URI("fleet", "absent"), "object=absent: token \"fleet\" has no secret key with that label"},
		{"missing module", strings.Replace(tk.URI("fleet", "mk"), softhsmtest.Module, "/nonexistent/lib.so", 1), "module-path: stat /nonexistent/lib.so"},
		{"not a module", strings.Replace(tk.URI("fleet", "mk"), softhsmtest.Module, "/etc/passwd", 1), "module-path /etc/passwd: not a loadable PKCS#11 module"},
	} {
		_, _, err := MasterKey(mustParse(t, c.uri), false)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
		if err != nil && (strings.Contains(err.Error(), "1234") || strings.Contains(err.Error(), "9999")) {
			t.Errorf("%s: error shows the PIN: %v", c.name, err)
		}
	}
	// The token's user PIN still works after the wrong tries above.
	if _, _, err := MasterKey(mustParse(t, tk.URI("fleet", "mk")), false); err != nil {
		t.Fatal(err)
	}
	if os.Getenv(softhsmtest.ConfEnv) != tk.Conf {
		t.Fatal("SOFTHSM2_CONF not set")
	}
}

package mkcli_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2"
)

// checkKey is the key of the volumes made here; it must never be printed.
const checkKey = "correct horse battery staple 9f3a"

// luksFile makes a LUKS2 volume in a file with the real cryptsetup, small
// and fast to unseal (pbkdf2, 1000 iterations), and returns its path.
func luksFile(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	img := filepath.Join(dir, name)
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	kf := write(t, filepath.Join(dir, name+".key"), checkKey)
	cryptsetup(t, append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf,
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--luks2-metadata-size", "16k", "--luks2-keyslots-size", "2m"}, append(args, img)...)...)
	return img
}

func cryptsetup(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("cryptsetup", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// readOnly fails the test if running f changed the file at path.
func readOnly(t *testing.T, path string, f func()) {
	t.Helper()
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f()
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("%s changed: check must only read", path)
	}
}

func noSecret(t *testing.T, r result) {
	t.Helper()
	if strings.Contains(r.stdout+r.stderr, checkKey) || strings.Contains(r.stdout+r.stderr, "horse") {
		t.Errorf("the key appears in the output:\n%s%s", r.stdout, r.stderr)
	}
}

func TestCheckAccepted(t *testing.T) {
	dir := t.TempDir()
	img := luksFile(t, dir, "vol.img", "--sector-size", "512")
	// A second, preferred keyslot: the boot tries it first.
	key2 := write(t, filepath.Join(dir, "key2"), "a second key for slot one")
	cryptsetup(t, "luksAddKey", "--batch-mode", "--key-file", img+".key", "--pbkdf", "pbkdf2",
		"--pbkdf-force-iterations", "2000", "--hash", "sha512", "--key-slot", "1", img, key2)
	cryptsetup(t, "config", "--priority", "prefer", "--key-slot", "1", img)
	uuid := strings.TrimSpace(cryptsetup(t, "luksUUID", img))

	var r result
	readOnly(t, img, func() { r = mk(t, dir, nil, "check", img) })
	if r.code != 0 {
		t.Fatalf("check of a cryptsetup volume: %+v", r)
	}
	for _, want := range []string{
		img + ": accepted",
		"uuid      " + uuid,
		"segment   0: cipher aes-xts-plain64, sector size 512, data at offset",
		"1. keyslot 1: pbkdf2 sha512, 2000 iterations, 512-bit volume key, high priority",
		"2. keyslot 0: pbkdf2 sha256, 1000 iterations, 512-bit volume key",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, r.stdout)
		}
	}

	// The key opens its slot, with the boot's keyslot code.
	readOnly(t, img, func() { r = mk(t, dir, nil, "check", "--key-file", img+".key", img) })
	if r.code != 0 || !strings.Contains(r.stdout, "opens keyslot 0 (digest verified") {
		t.Errorf("check --key-file (slot 0's key): %+v", r)
	}
	noSecret(t, r)
	if r = mk(t, dir, nil, "check", img, "--key-file", key2); r.code != 0 || !strings.Contains(r.stdout, "opens keyslot 1 ") {
		t.Errorf("check --key-file (slot 1's key, flag after the file): %+v", r)
	}
	// --key-file - reads the key from stdin, as `host key` pipes it.
	cmd := exec.Command(bin, "check", "--key-file", "-", img)
	cmd.Stdin = strings.NewReader(checkKey)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "key file - opens keyslot 0 ") {
		t.Errorf("check --key-file - (key on stdin): %v\n%s", err, out)
	}
	noSecret(t, result{stdout: string(out)})
	wrong := write(t, filepath.Join(dir, "wrong"), checkKey+"!")
	readOnly(t, img, func() { r = mk(t, dir, nil, "check", "--key-file", wrong, img) })
	if r.code != 1 || !strings.Contains(r.stdout, "opens none of the 2 keyslot(s)") {
		t.Errorf("check --key-file with a wrong key: %+v", r)
	}
	noSecret(t, r)

	// --uuid checks as a UUID= reference would: case does not matter.
	if r = mk(t, dir, nil, "check", "--uuid", strings.ToUpper(uuid), img); r.code != 0 || !strings.Contains(r.stdout, "(matches UUID=") {
		t.Errorf("check --uuid (matching): %+v", r)
	}
	other := "0b7f5a0e-7d7c-4c55-8d43-3a3f7e0c1a2b"
	if r = mk(t, dir, nil, "check", "--uuid", other, img); r.code != 1 ||
		!strings.Contains(r.stdout, "refused") || !strings.Contains(r.stdout, "UUID is "+uuid+", configured "+other) {
		t.Errorf("check --uuid (other): %+v", r)
	}
}

func TestCheckRefused(t *testing.T) {
	dir := t.TempDir()
	good := luksFile(t, dir, "good.img")
	cbc := luksFile(t, dir, "cbc.img", "--cipher", "aes-cbc-plain64")
	blank := filepath.Join(dir, "blank.img")
	if err := os.WriteFile(blank, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// One byte of each header copy's JSON changed: both checksums fail.
	tamper := func(name string, offs ...int64) string {
		b, err := os.ReadFile(good)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range offs {
			b[o] ^= 0x20
		}
		return write(t, filepath.Join(dir, name), string(b))
	}
	const json0, json1 = 4096 + 64, 16<<10 + 4096 + 64
	both := tamper("both.img", json0, json1)
	if out, err := exec.Command("cryptsetup", "luksDump", both).CombinedOutput(); err == nil {
		t.Fatalf("oracle: cryptsetup luksDump accepts the tampered header:\n%s", out)
	}
	primary := tamper("primary.img", json0)
	// An interrupted first-boot format: only the marker is there.
	unfinished := filepath.Join(dir, "unfinished.img")
	uf, err := os.Create(unfinished)
	if err != nil {
		t.Fatal(err)
	}
	if err := uf.Truncate(17 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := luks2.BeginFormat(context.Background(), uf, 17<<20, luks2.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	uf.Close()

	for _, tc := range []struct {
		path string
		code int
		want []string
	}{
		{cbc, 1, []string{"refused, the boot would try no key on it", `segment 0 cipher "aes-cbc-plain64" is not on the allow-list`}},
		{both, 1, []string{"refused", "checksum", "checksum mismatch at offset 0; secondary copy: ", "checksum mismatch at offset 16384"}},
		{blank, 1, []string{"refused", "no LUKS magic"}},
		{filepath.Join(dir, "missing.img"), 1, []string{"refused", "no such file"}},
		{primary, 0, []string{"accepted", "primary copy damaged", "the boot uses the intact secondary copy"}},
		{unfinished, 1, []string{"refused", "an unfinished unlockrd format"}},
	} {
		var r result
		if _, err := os.Stat(tc.path); err == nil {
			readOnly(t, tc.path, func() { r = mk(t, dir, nil, "check", "--key-file", good+".key", tc.path) })
		} else {
			r = mk(t, dir, nil, "check", "--key-file", good+".key", tc.path)
		}
		if r.code != tc.code {
			t.Errorf("check %s: exit %d, want %d: %+v", filepath.Base(tc.path), r.code, tc.code, r)
		}
		for _, w := range tc.want {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("check %s: output lacks %q:\n%s", filepath.Base(tc.path), w, r.stdout)
			}
		}
		noSecret(t, r)
	}

	if r := mk(t, dir, nil, "check", blank); strings.Contains(r.stdout, "unfinished") {
		t.Errorf("a blank file is called an unfinished format:\n%s", r.stdout)
	}

	// Several volumes: every one is reported, one refusal fails the lot.
	r := mk(t, dir, nil, "check", good, cbc)
	if r.code != 1 || !strings.Contains(r.stdout, good+": accepted") || !strings.Contains(r.stdout, cbc+": refused") {
		t.Errorf("check of an accepted and a refused volume: %+v", r)
	}
	if r := mk(t, dir, nil, "check"); r.code != 2 || !strings.Contains(r.stderr, "usage: mkunlockrd check") {
		t.Errorf("check without a volume: %+v", r)
	}
	if r := mk(t, dir, nil, "check", "--key-file", filepath.Join(dir, "nokey"), good); r.code != 1 || !strings.Contains(r.stderr, "--key-file") {
		t.Errorf("check with a missing key file: %+v", r)
	}
}

// TestCheckBlockDevice checks a volume through a read-only loop device: a
// block device works like a file, and nothing reaches the backing file.
func TestCheckBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (loop devices)")
	}
	dir := t.TempDir()
	img := luksFile(t, dir, "vol.img")
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v\n%s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v\n%s", dev, err, out)
		}
	})
	readOnly(t, img, func() {
		r := mk(t, dir, nil, "check", "--key-file", img+".key", dev)
		if r.code != 0 || !strings.Contains(r.stdout, dev+": accepted") || !strings.Contains(r.stdout, "opens keyslot 0") {
			t.Errorf("check of a read-only loop device: %+v", r)
		}
		noSecret(t, r)
	})
}

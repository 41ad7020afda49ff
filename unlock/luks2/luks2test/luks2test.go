// Package luks2test makes real LUKS2 volume files with cryptsetup and edits
// their headers as an attacker would, for the tests of luks2, volumes and
// their callers. It does not import luks2, so luks2's own tests can use it.
package luks2test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// UUID is the LUKS UUID Format gives its volumes.
const UUID = "11111111-2222-3333-4444-555555555555"

// RequireCryptsetup fails the test when cryptsetup is missing: these tests
// use the real tool as their oracle, so they must not pass without it.
func RequireCryptsetup(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatalf("cryptsetup is required (make deps): %v", err)
	}
}

// Format makes a 4 MiB LUKS2 volume file with the real cryptsetup, one
// keyslot per key (pbkdf2 with minimal iterations: the keys are random),
// UUID and label "data", 16 KiB metadata.
func Format(t testing.TB, keys ...[]byte) string {
	t.Helper()
	RequireCryptsetup(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "vol.img")
	Sparse(t, img, 4<<20)
	FormatInto(t, img, keys...)
	return img
}

// FormatInto formats the existing file or device img as Format does.
func FormatInto(t testing.TB, img string, keys ...[]byte) {
	t.Helper()
	dir := t.TempDir()
	pbkdf := []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"}
	for i, k := range keys {
		kf := filepath.Join(dir, "key")
		if err := os.WriteFile(kf, k, 0o600); err != nil {
			t.Fatal(err)
		}
		var args []string
		if i == 0 {
			args = append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--cipher", "aes-xts-plain64",
				"--key-size", "512", "--uuid", UUID, "--label", "data",
				"--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", "--key-file", kf}, pbkdf...)
			args = append(args, img)
		} else {
			prev := filepath.Join(dir, "prev")
			if err := os.WriteFile(prev, keys[0], 0o600); err != nil {
				t.Fatal(err)
			}
			args = append([]string{"luksAddKey", "--batch-mode", "--key-file", prev}, pbkdf...)
			args = append(args, img, kf)
		}
		if out, err := exec.Command("cryptsetup", args...).CombinedOutput(); err != nil {
			t.Fatalf("cryptsetup %v: %v\n%s", args[0], err, out)
		}
	}
}

// FormatArgs makes an 8 MiB LUKS2 volume with extra luksFormat arguments
// (16 KiB metadata, 2 MiB keyslots area).
func FormatArgs(t testing.TB, pass []byte, args ...string) string {
	t.Helper()
	RequireCryptsetup(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "vol.img")
	kf := filepath.Join(dir, "key")
	if err := os.WriteFile(kf, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	Sparse(t, img, 8<<20)
	all := append([]string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf,
		"--luks2-metadata-size", "16k", "--luks2-keyslots-size", "2m"}, args...)
	if out, err := exec.Command("cryptsetup", append(all, img)...).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup %v: %v\n%s", all, err, out)
	}
	return img
}

// Sparse makes an empty file of size bytes.
func Sparse(t testing.TB, path string, size int64) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

// DumpVolumeKey asks cryptsetup for the volume key that passphrase opens:
// the oracle our unsealing must agree with.
func DumpVolumeKey(t testing.TB, img string, passphrase []byte) []byte {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "k")
	if err := os.WriteFile(kf, passphrase, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, img).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup luksDump --dump-volume-key: %v\n%s", err, out)
	}
	_, dump, ok := strings.Cut(string(out), "MK dump:")
	if !ok {
		t.Fatalf("no MK dump in:\n%s", out)
	}
	k, err := hex.DecodeString(strings.Join(strings.Fields(dump), ""))
	if err != nil {
		t.Fatalf("MK dump: %v", err)
	}
	return k
}

// EditJSON rewrites the JSON metadata of one header copy (0 primary, 1
// secondary) the way an attacker with write access would: edit, then
// recompute the checksum, which authenticates nothing.
func EditJSON(t testing.TB, path string, copyIdx int, edit func(m map[string]any)) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	size := int(binary.BigEndian.Uint64(b[8:16]))
	off := copyIdx * size
	hdr := b[off : off+size]
	js := hdr[4096:]
	js = js[:bytes.IndexByte(js, 0)]
	var m map[string]any
	if err := json.Unmarshal(js, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	nj, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	area := hdr[4096:]
	clear(area)
	copy(area, nj)
	clear(hdr[0x1c0 : 0x1c0+64])
	sum := sha256.Sum256(hdr)
	copy(hdr[0x1c0:], sum[:])
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// EditBoth applies edit to both header copies.
func EditBoth(t testing.TB, path string, edit func(m map[string]any)) {
	t.Helper()
	EditJSON(t, path, 0, edit)
	EditJSON(t, path, 1, edit)
}

// Seg0 is segment 0 of decoded JSON metadata.
func Seg0(m map[string]any) map[string]any {
	return m["segments"].(map[string]any)["0"].(map[string]any)
}

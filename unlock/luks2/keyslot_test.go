package luks2

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
	"github.com/unlockrd/unlockrd/unlock/secret"
)

func dumpVolumeKey(t *testing.T, img string, passphrase []byte) []byte {
	t.Helper()
	return luks2test.DumpVolumeKey(t, img, passphrase)
}

func formatArgs(t testing.TB, pass []byte, args ...string) string {
	t.Helper()
	return luks2test.FormatArgs(t, pass, args...)
}

func unsealFile(t *testing.T, img string, pass []byte) ([]byte, *Header, error) {
	t.Helper()
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if err := DefaultPolicy().Validate(h); err != nil {
		t.Fatalf("cryptsetup's header refused: %v", err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vk, _, _, err := FindKey(context.Background(), f, h, keyBufs(pass))
	return vk.Bytes(), h, err
}

// keyBufs wraps copies of keys as the key stage hands them over.
func keyBufs(keys ...[]byte) []*secret.Buf {
	var out []*secret.Buf
	for _, k := range keys {
		out = append(out, secret.From(bytes.Clone(k)))
	}
	return out
}

// TestUnsealAgreesWithCryptsetup unseals keyslots made with every KDF,
// anti-forensic hash and keyslot cipher we support, and compares the
// volume key with what cryptsetup recovers.
func TestUnsealAgreesWithCryptsetup(t *testing.T) {
	pass := []byte("correct horse battery staple")
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"pbkdf2-sha256", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"}},
		{"pbkdf2-sha512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha512"}},
		{"pbkdf2-sha1", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha1"}},
		{"argon2id", []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "4"}},
		{"argon2i", []string{"--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "2"}},
		{"aes-256 volume key, 256-bit keyslot key", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
			"--key-size", "256", "--keyslot-cipher", "aes-xts-plain64", "--keyslot-key-size", "256"}},
		{"keyslot aes-cbc-essiv", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
			"--keyslot-cipher", "aes-cbc-essiv:sha256", "--keyslot-key-size", "256"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := formatArgs(t, pass, tc.args...)
			vk, h, err := unsealFile(t, img, pass)
			if err != nil {
				t.Fatal(err)
			}
			if want := dumpVolumeKey(t, img, pass); !bytes.Equal(vk, want) {
				t.Fatalf("volume key (%d bytes) differs from cryptsetup's (%d bytes)", len(vk), len(want))
			}
			if _, _, err := unsealFile(t, img, []byte("wrong")); !errors.Is(err, ErrNoKey) {
				t.Fatalf("wrong passphrase: err = %v", err)
			}
			t.Logf("keyslot 0: %s, area %s", h.Keyslots[0].KDF.Type, h.Keyslots[0].Area.Encryption)
		})
	}
}

// TestDamagedPrimaryUnlocksFromSecondary is the case luks.go could not
// handle: the primary copy is garbage, the secondary is intact, and the
// volume must still open (with the volume key cryptsetup agrees on).
func TestDamagedPrimaryUnlocksFromSecondary(t *testing.T) {
	pass := []byte("k1")
	img := format(t, pass)
	want := dumpVolumeKey(t, img, pass)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 4096), 0); err != nil { // magic and all
		t.Fatal(err)
	}
	f.Close()
	vk, h, err := unsealFile(t, img, pass)
	if err != nil {
		t.Fatal(err)
	}
	if !h.Secondary || h.PrimaryErr == nil || !strings.Contains(h.PrimaryErr.Error(), "no LUKS magic") {
		t.Fatalf("header secondary=%v primaryErr=%v", h.Secondary, h.PrimaryErr)
	}
	if !bytes.Equal(vk, want) {
		t.Fatal("volume key from the secondary header differs from cryptsetup's")
	}
}

// TestAttackerEditsPrimaryOnly: a primary rewritten with a valid checksum
// is used (it is intact), so the edit is refused rather than silently
// bypassed by falling back to the secondary.
func TestAttackerEditsPrimaryOnly(t *testing.T) {
	img := format(t, []byte("k1"))
	editJSON(t, img, 0, func(m map[string]any) { seg0(m)["encryption"] = "cipher_null-ecb" })
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if h.Secondary {
		t.Fatal("fell back to the secondary although the primary checksums")
	}
	if err := DefaultPolicy().Validate(h); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "cipher_null") {
		t.Fatalf("err = %v", err)
	}
}

func TestHighPrioritySlotFirst(t *testing.T) {
	img := format(t, []byte("first"), []byte("second"))
	editBoth(t, img, func(m map[string]any) {
		m["keyslots"].(map[string]any)["1"].(map[string]any)["priority"] = 2
	})
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(img)
	defer f.Close()
	// Either key opens its own slot; "second" must be tried on slot 1
	// first and the high-priority slot is the one reported.
	vk, slot, ki, err := FindKey(context.Background(), f, h, keyBufs([]byte("nope"), []byte("second")))
	if err != nil {
		t.Fatal(err)
	}
	vk.Wipe()
	if slot != 1 || ki != 1 {
		t.Fatalf("slot %d key %d, want slot 1 key 1", slot, ki)
	}
}

func TestPBKDF2Vectors(t *testing.T) {
	// RFC 6070, SHA-1.
	got, err := pbkdf2Key(context.Background(), hashFunc("sha1"), []byte("password"), []byte("salt"), 4096, 20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(got.Bytes()) != "4b007901b765489abead49d926f721d065a429c1" {
		t.Fatalf("pbkdf2 = %x", got)
	}
	got, _ = pbkdf2Key(context.Background(), hashFunc("sha1"), []byte("passwordPASSWORDpassword"), []byte("saltSALTsaltSALTsaltSALTsaltSALTsalt"), 4096, 25, nil)
	if hex.EncodeToString(got.Bytes()) != "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038" {
		t.Fatalf("pbkdf2 = %x", got)
	}
}

// BenchmarkUnlockArgon2id unseals a cryptsetup-made argon2id keyslot.
// UNLOCKRD_BENCH_VOLUME and UNLOCKRD_BENCH_KEYFILE name a volume made
// elsewhere (the bench program compares against cryptsetup on the same
// one); otherwise it makes one as cryptsetup luksFormat does by default.
func BenchmarkUnlockArgon2id(b *testing.B) {
	img, kf := os.Getenv("UNLOCKRD_BENCH_VOLUME"), os.Getenv("UNLOCKRD_BENCH_KEYFILE")
	if img == "" {
		dir := b.TempDir()
		img, kf = filepath.Join(dir, "vol.img"), filepath.Join(dir, "key")
		os.WriteFile(kf, []byte("bench passphrase"), 0o600)
		os.WriteFile(img, nil, 0o600)
		os.Truncate(img, 20<<20)
		if out, err := exec.Command("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode",
			"--key-file", kf, img).CombinedOutput(); err != nil {
			b.Fatalf("cryptsetup: %v\n%s", err, out)
		}
	}
	pass, err := os.ReadFile(kf)
	if err != nil {
		b.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	h, err := ReadHeader(f)
	if err != nil {
		b.Fatal(err)
	}
	if err := DefaultPolicy().Validate(h); err != nil {
		b.Fatal(err)
	}
	k := h.Keyslots[0].KDF
	b.Logf("keyslot 0: %s time=%d memory=%dKiB lanes=%d", k.Type, k.Time, k.Memory, k.CPUs)
	b.ResetTimer()
	for b.Loop() {
		vk, _, _, err := FindKey(context.Background(), f, h, keyBufs(pass))
		if err != nil {
			b.Fatal(err)
		}
		vk.Wipe()
	}
}

// TestArgon2OutOfMemory: a keyslot whose argon2 needs more memory than the
// process can have is refused with an error naming the keyslot and the
// memory, not a crash (PID 1 on a small VM). The check runs in a child
// process of this test with its address space limited (RLIMIT_AS) to what
// it uses plus 256 MiB, on a cryptsetup-made argon2id keyslot whose memory
// cost was raised to 1 GiB.
func TestArgon2OutOfMemory(t *testing.T) {
	if img := os.Getenv("UNLOCKRD_OOM_VOLUME"); img != "" {
		oomChild(t, img)
		return
	}
	pass := []byte("oom")
	img := formatArgs(t, pass, "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "2")
	luks2test.EditBoth(t, img, func(m map[string]any) {
		m["keyslots"].(map[string]any)["0"].(map[string]any)["kdf"].(map[string]any)["memory"] = 1 << 20
	})
	cmd := exec.Command(os.Args[0], "-test.run=^TestArgon2OutOfMemory$", "-test.v")
	cmd.Env = append(os.Environ(), "UNLOCKRD_OOM_VOLUME="+img)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "keyslot 0: argon2id needs 1024 MiB of memory") {
		t.Fatalf("child's error does not name the keyslot and the memory:\n%s", out)
	}
	t.Logf("%s", bytes.TrimSpace(out))
}

func oomChild(t *testing.T, img string) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	var vmKiB uint64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmSize:"); ok {
			vmKiB, _ = strconv.ParseUint(strings.Fields(v)[0], 10, 64)
		}
	}
	if vmKiB == 0 {
		t.Fatal("no VmSize")
	}
	lim := &syscall.Rlimit{Cur: (vmKiB + 256<<10) << 10, Max: (vmKiB + 256<<10) << 10}
	if err := syscall.Setrlimit(syscall.RLIMIT_AS, lim); err != nil {
		t.Fatal(err)
	}
	_, _, err = unsealFile(t, img, []byte("oom"))
	if err == nil || !errors.Is(err, ErrNoKey) {
		t.Fatalf("unseal with 1 GiB argon2 under a 256 MiB headroom: %v", err)
	}
	t.Logf("refused: %v", err)
}

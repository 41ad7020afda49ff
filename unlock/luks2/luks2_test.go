package luks2

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
)

// The helpers of luks2test under the short names these tests use.
const testUUID = luks2test.UUID

func format(t *testing.T, keys ...[]byte) string { t.Helper(); return luks2test.Format(t, keys...) }

func editJSON(t *testing.T, path string, copyIdx int, edit func(m map[string]any)) {
	t.Helper()
	luks2test.EditJSON(t, path, copyIdx, edit)
}

func editBoth(t *testing.T, path string, edit func(m map[string]any)) {
	t.Helper()
	luks2test.EditBoth(t, path, edit)
}

func seg0(m map[string]any) map[string]any { return luks2test.Seg0(m) }

func readHeaderFile(t *testing.T, path string) (*Header, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return ReadHeader(f)
}

func TestValidHeaderAccepted(t *testing.T) {
	img := format(t, []byte("k1"))
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if h.UUID != testUUID || h.Label != "data" || h.Secondary {
		t.Fatalf("header = %+v", h)
	}
	p := DefaultPolicy()
	p.UUID = testUUID
	if err := p.Validate(h); err != nil {
		t.Fatal(err)
	}
	// Oracle: luksDump agrees on the cipher and offset.
	out, err := exec.Command("cryptsetup", "luksDump", img).CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "cipher: "+h.Segments[0].Encryption) {
		t.Fatalf("luksDump disagrees on the cipher %q:\n%s", h.Segments[0].Encryption, out)
	}
}

func TestValidationRefusals(t *testing.T) {
	for _, tc := range []struct {
		name   string
		edit   func(m map[string]any)
		policy func(*Policy)
		want   string
	}{
		{"cipher_null", func(m map[string]any) { seg0(m)["encryption"] = "cipher_null-ecb" }, nil, "not on the allow-list"},
		{"unknown cipher", func(m map[string]any) { seg0(m)["encryption"] = "rot13-ecb" }, nil, "not on the allow-list"},
		{"extra linear segment", func(m map[string]any) {
			m["segments"].(map[string]any)["1"] = map[string]any{"type": "linear", "offset": "2097152", "size": "dynamic"}
		}, nil, `type "linear"`},
		{"small key", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["key_size"] = 16
		}, nil, "128-bit key"},
		{"keyslot area cipher_null", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["area"].(map[string]any)["encryption"] = "cipher_null"
		}, nil, "area cipher"},
		{"cipher_null in capitals", func(m map[string]any) { seg0(m)["encryption"] = "CIPHER_NULL-ecb" }, nil, "not on the allow-list"},
		{"segment over the metadata", func(m map[string]any) { seg0(m)["offset"] = "4096" }, nil, "reach into the data segment"},
		{"segment wants dm-integrity", func(m map[string]any) {
			seg0(m)["integrity"] = map[string]any{"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"}
		}, nil, "dm-integrity"},
		{"odd sector size", func(m map[string]any) { seg0(m)["sector_size"] = 333 }, nil, "sector size 333"},
		{"unfinished reencryption", func(m map[string]any) {
			m["config"].(map[string]any)["requirements"] = map[string]any{"mandatory": []any{"online-reencrypt-v2"}}
		}, nil, "requires online-reencrypt-v2"},
		{"keyslot area over the data", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["area"].(map[string]any)["offset"] = "3145728"
		}, nil, "outside the keyslots area"},
		{"keyslot area cipher we cannot decrypt", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["area"].(map[string]any)["encryption"] = "twofish-xts-plain64"
		}, nil, "not supported for keyslots"},
		{"anti-forensic stripes", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["af"].(map[string]any)["stripes"] = 1
		}, nil, "anti-forensic"},
		{"argon2 memory bomb", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["kdf"] = map[string]any{"type": "argon2id", "time": 4, "memory": 64 << 20, "cpus": 4, "salt": "c2FsdHNhbHRzYWx0c2FsdA=="}
		}, nil, "out of bounds"},
		{"unknown KDF", func(m map[string]any) {
			ks := m["keyslots"].(map[string]any)["0"].(map[string]any)
			ks["kdf"].(map[string]any)["type"] = "scrypt"
		}, nil, `kdf type scrypt`},
		{"digest unlinked from every keyslot", func(m map[string]any) {
			m["digests"].(map[string]any)["0"].(map[string]any)["keyslots"] = []any{}
		}, nil, "keyslot 0 has no digest"},
		{"digest not covering the segment", func(m map[string]any) {
			m["digests"].(map[string]any)["0"].(map[string]any)["segments"] = []any{"7"}
		}, nil, `names "7", which does not exist`},
		{"all keyslots priority ignore", func(m map[string]any) {
			m["keyslots"].(map[string]any)["0"].(map[string]any)["priority"] = 0
		}, nil, "no usable keyslot"},
		{"number where a string is due", func(m map[string]any) { seg0(m)["offset"] = 16777216 }, nil, "offset is missing or not a string"},
		{"uuid mismatch", nil, func(p *Policy) { p.UUID = "99999999-2222-3333-4444-555555555555" }, "UUID is " + testUUID},
		// Review findings (issue 14): each passed before.
		{"pbkdf2 iterations 2^40", func(m map[string]any) { ks0(m)["kdf"].(map[string]any)["iterations"] = 1 << 40 }, nil, "kdf.iterations 1099511627776"},
		{"pbkdf2 iterations 2^30", func(m map[string]any) { ks0(m)["kdf"].(map[string]any)["iterations"] = 1 << 30 }, nil, "iterations (at most"},
		{"digest iterations 2^40", func(m map[string]any) { m["digests"].(map[string]any)["0"].(map[string]any)["iterations"] = 1 << 40 }, nil, "iterations (at most"},
		{"argon2 time 2^20", func(m map[string]any) {
			ks0(m)["kdf"] = map[string]any{"type": "argon2id", "time": 1 << 20, "memory": 1 << 20, "cpus": 1, "salt": "c2FsdHNhbHRzYWx0c2FsdA=="}
		}, nil, "time × memory"},
		{"keyslot id 1023", func(m map[string]any) {
			k := m["keyslots"].(map[string]any)
			k["1023"] = k["0"]
			delete(k, "0")
			m["digests"].(map[string]any)["0"].(map[string]any)["keyslots"] = []any{"1023"}
		}, nil, `keyslot id "1023"`},
		{"keyslot area size near 2^63", func(m map[string]any) {
			ks0(m)["area"].(map[string]any)["size"] = "9223372036854743040"
		}, nil, "outside the keyslots area"},
		// Issue 14 classes that cryptsetup refuses.
		{"keyslot without digest", func(m map[string]any) {
			m["digests"].(map[string]any)["0"].(map[string]any)["keyslots"] = []any{}
		}, nil, "has no digest"},
		{"digest naming a missing keyslot", func(m map[string]any) {
			m["digests"].(map[string]any)["0"].(map[string]any)["keyslots"] = []any{"0", "7"}
		}, nil, `names "7", which does not exist`},
		{"token naming a missing keyslot", func(m map[string]any) {
			m["tokens"].(map[string]any)["0"] = map[string]any{"type": "x", "keyslots": []any{"3"}}
		}, nil, `names "3", which does not exist`},
		{"token of the wrong shape", func(m map[string]any) { m["tokens"].(map[string]any)["0"] = "x" }, nil, "token 0 is not an object"},
		{"crypt segment without iv_tweak", func(m map[string]any) { delete(seg0(m), "iv_tweak") }, nil, "iv_tweak is missing"},
		{"segment flags not strings", func(m map[string]any) { seg0(m)["flags"] = []any{1} }, nil, "flags holds a non-string"},
		{"keyslots_size unaligned", func(m map[string]any) { m["config"].(map[string]any)["keyslots_size"] = "1048577" }, nil, "not a multiple of 4096"},
		{"keyslots_size reaching data", func(m map[string]any) { m["config"].(map[string]any)["keyslots_size"] = "4194304" }, nil, "reach into the data segment"},
		{"keyslots_size too small", func(m map[string]any) { m["config"].(map[string]any)["keyslots_size"] = "4096" }, nil, "outside the keyslots area"},
		{"json_size mismatch", func(m map[string]any) { m["config"].(map[string]any)["json_size"] = "8192" }, nil, "json_size 8192"},
		{"tokens section of the wrong type", func(m map[string]any) { m["tokens"] = []any{} }, nil, `"tokens" is missing or not an object`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := format(t, []byte("k1"))
			if tc.edit != nil {
				editBoth(t, img, tc.edit)
			}
			h, err := readHeaderFile(t, img)
			if err != nil {
				// A header our parser refuses outright is refused too.
				if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want a refusal containing %q", err, tc.want)
				}
				return
			}
			p := DefaultPolicy()
			if tc.policy != nil {
				tc.policy(&p)
			}
			err = p.Validate(h)
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want a refusal containing %q", err, tc.want)
			}
		})
	}
}

func ks0(m map[string]any) map[string]any {
	return m["keyslots"].(map[string]any)["0"].(map[string]any)
}

// TestValidateNoOverflow: Offset+Size used to wrap negative and pass as
// lying before the data segment.
func TestValidateNoOverflow(t *testing.T) {
	img := format(t, []byte("k1"))
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	h.Keyslots[0].Area.Size = 1<<63 - 1
	if err := DefaultPolicy().Validate(h); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "outside the keyslots area") {
		t.Fatalf("area of 2^63-1 bytes: err = %v", err)
	}
	seg := Segment{ID: 0, Offset: 1 << 62, Size: "9223372036854774784", SectorSize: 512}
	if n, err := seg.SizeBytes(1 << 40); err == nil {
		t.Fatalf("segment of %d bytes at 2^62 fits a 1 TiB device?", n)
	}
}

// TestUnboundKeyslotIgnored: a volume with `luksAddKey --unbound` opens;
// the unbound slot is never tried.
func TestUnboundKeyslotIgnored(t *testing.T) {
	img := format(t, []byte("k1"))
	kf := filepath.Join(t.TempDir(), "k")
	if err := os.WriteFile(kf, []byte("k1"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "luksAddKey", "--batch-mode", "--unbound", "--key-size", "512",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", kf, img, kf).CombinedOutput(); err != nil {
		t.Fatalf("luksAddKey --unbound: %v\n%s", err, out)
	}
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if err := DefaultPolicy().Validate(h); err != nil {
		t.Fatalf("unbound keyslot refused the volume: %v", err)
	}
	if len(h.Keyslots) != 2 || !h.Keyslots[1].Unbound || h.Keyslots[0].Unbound {
		t.Fatalf("keyslots = %+v, want slot 1 unbound", h.Keyslots)
	}
	if got := h.SlotOrder(); len(got) != 1 || got[0] != 0 {
		t.Fatalf("SlotOrder = %v, want [0]", got)
	}
}

func TestDamagedPrimaryUsesSecondary(t *testing.T) {
	img := format(t, []byte("k1"))
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xff}, 512), 4096); err != nil { // JSON area
		t.Fatal(err)
	}
	f.Close()
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if !h.Secondary || h.UUID != testUUID {
		t.Fatalf("header = %+v, want the secondary copy", h)
	}
	if err := DefaultPolicy().Validate(h); err != nil {
		t.Fatal(err)
	}
}

func TestBothCopiesDamagedRefused(t *testing.T) {
	img := format(t, []byte("k1"))
	b, _ := os.ReadFile(img)
	b[4096+10] ^= 0xff
	b[16384+4096+10] ^= 0xff
	os.WriteFile(img, b, 0o600)
	if _, err := readHeaderFile(t, img); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("err = %v", err)
	}
}

func TestNotLUKS(t *testing.T) {
	p := filepath.Join(t.TempDir(), "zero")
	os.WriteFile(p, make([]byte, 1<<20), 0o600)
	if _, err := readHeaderFile(t, p); !errors.Is(err, ErrRefused) {
		t.Fatalf("err = %v", err)
	}
}

func TestSecondKeyOpens(t *testing.T) {
	old := []byte("old-key-0123456789abcdef0123456789")
	img := format(t, old)
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The server lists [new, old] during a rotation; the volume knows old.
	vk, slot, ki, err := FindKey(context.Background(), f, h, keyBufs([]byte("new-key"), old))
	if err != nil {
		t.Fatal(err)
	}
	defer vk.Wipe()
	if ki != 1 || slot != 0 {
		t.Fatalf("opened with key %d slot %d, want key 1 slot 0", ki, slot)
	}
	// Oracle: the volume key cryptsetup itself recovers with "old".
	if want := dumpVolumeKey(t, img, old); !bytes.Equal(vk.Bytes(), want) {
		t.Fatalf("volume key differs from cryptsetup's")
	}
}

func TestNoKeyOpensLeavesDeviceUntouched(t *testing.T) {
	img := format(t, []byte("right"), []byte("also-right"))
	before, _ := os.ReadFile(img)
	h, err := readHeaderFile(t, img)
	if err != nil {
		t.Fatal(err)
	}
	if got := h.SlotOrder(); len(got) != 2 || got[0] != 0 || got[1] != 1 {
		t.Fatalf("slot order = %v", got)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = FindKey(context.Background(), f, h, keyBufs([]byte("wrong"), []byte("wronger")))
	f.Close()
	if !errors.Is(err, ErrNoKey) || !strings.Contains(err.Error(), "2 keys tried on 2 keyslots") {
		t.Fatalf("err = %v", err)
	}
	after, _ := os.ReadFile(img)
	if !bytes.Equal(before, after) {
		t.Fatal("the device changed although no key opened it")
	}
}

func TestSlotOrderPriority(t *testing.T) {
	h := &Header{Keyslots: []Keyslot{{ID: 0, Priority: 1}, {ID: 1, Priority: 0}, {ID: 2, Priority: 2}, {ID: 3, Priority: 1}}}
	if got := h.SlotOrder(); len(got) != 3 || got[0] != 2 || got[1] != 0 || got[2] != 3 {
		t.Fatalf("order = %v, want [2 0 3]", got)
	}
}

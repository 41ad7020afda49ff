package luks2

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
	"github.com/unlockrd/unlockrd/unlock/secret"
)

const fmtTestSize = 17 << 20 // room for the 16 MiB header area and 1 MiB of data

var (
	testPass = []byte("the machine's random key, as the server sends it")
	newPass  = []byte("the rotated key")
)

func buf(b []byte) *secret.Buf { return secret.From(bytes.Clone(b)) }

func testVK(seed int64) *secret.Buf {
	vk, err := NewVolumeKey(seededRand(seed))
	if err != nil {
		panic(err)
	}
	return vk
}

// opensOurs reports whether key opens img by our reader, validator and
// FindKey, and the volume key it opened.
func opensOurs(t *testing.T, img []byte, key []byte) (bool, []byte) {
	t.Helper()
	r := bytes.NewReader(img)
	h, err := ReadHeader(r)
	if err != nil {
		return false, nil
	}
	if err := DefaultPolicy().Validate(h); err != nil {
		t.Fatalf("our validator refuses a header our reader took: %v", err)
	}
	vk, _, _, err := FindKey(context.Background(), r, h, keyBufs(key))
	if err != nil {
		if !errors.Is(err, ErrNoKey) {
			t.Fatalf("FindKey: %v", err)
		}
		return false, nil
	}
	defer vk.Wipe()
	return true, bytes.Clone(vk.Bytes())
}

func formatMem(t *testing.T, size int64, vk *secret.Buf, opt FormatOptions) (*memDev, *Header) {
	t.Helper()
	d := newMemDev(make([]byte, size))
	h, err := Format(context.Background(), d, size, vk, buf(testPass), opt)
	if err != nil {
		t.Fatal(err)
	}
	return d, h
}

func dump(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("cryptsetup", "luksDump", path).CombinedOutput()
	if err != nil {
		t.Fatalf("luksDump: %v\n%s", err, out)
	}
	return string(out)
}

// TestFormatAcceptedByCryptsetup: what Format writes, cryptsetup takes as
// LUKS2, dumps with the layout Layout promised, opens with the passphrase
// (and refuses another), and dumps the same volume key; our reader,
// validator and FindKey agree.
func TestFormatAcceptedByCryptsetup(t *testing.T) {
	luks2test.RequireCryptsetup(t)
	for _, opt := range []FormatOptions{
		{},
		{SectorSize: 512, Label: "data", UUID: "0a9e5f2c-94d3-4b36-8d7a-8d0a0e7c0b01"},
		{SectorSize: 4096, TailReserve: 1 << 20},
	} {
		t.Run(fmtOpt(opt), func(t *testing.T) {
			size := int64(fmtTestSize + 2<<20)
			vk := testVK(1)
			d, h := formatMem(t, size, vk, opt)
			l, err := Layout(size, opt)
			if err != nil {
				t.Fatal(err)
			}
			off, n, err := h.DataOffset(size)
			if err != nil || off != l.Offset || n != l.Size {
				t.Fatalf("DataOffset = %d, %d, %v; Layout = %+v", off, n, err, l)
			}
			if opt.UUID != "" && h.UUID != opt.UUID || h.Label != opt.Label {
				t.Fatalf("UUID %q label %q", h.UUID, h.Label)
			}
			img := filepath.Join(t.TempDir(), "vol.img")
			writeSparse(t, img, d.b)
			if err := exec.Command("cryptsetup", "isLuks", "--type", "luks2", img).Run(); err != nil {
				t.Fatalf("isLuks: %v", err)
			}
			out := dump(t, img)
			ss := l.SectorSize
			length := "(whole device)"
			if !l.Dynamic {
				length = strings.TrimSpace(strings.Split(strings.Split(out, "length:")[1], "\n")[0])
				if !strings.HasPrefix(length, itoa(l.Size)+" ") {
					t.Errorf("luksDump length %q, want %d", length, l.Size)
				}
			}
			for _, want := range []string{
				"Version:       \t2", "Metadata area: \t16384 [bytes]", "Keyslots area: \t16744448 [bytes]",
				"offset: 16777216 [bytes]", "cipher: aes-xts-plain64", "sector: " + itoa(int64(ss)) + " [bytes]",
				"length: " + length, "Key:        512 bits", "PBKDF:      pbkdf2", "Iterations: 1000",
				"Area offset:32768 [bytes]", "Area length:258048 [bytes]", "UUID:          \t" + h.UUID,
			} {
				if !strings.Contains(out, want) {
					t.Errorf("luksDump lacks %q:\n%s", want, out)
				}
			}
			if got := luks2test.DumpVolumeKey(t, img, testPass); !bytes.Equal(got, vk.Bytes()) {
				t.Fatal("cryptsetup dumps another volume key")
			}
			o := newOracle(t)
			if r := o.opens(d.b, testPass, newPass); !r[""] || !r[string(testPass)] || r[string(newPass)] {
				t.Fatalf("cryptsetup: %v", r)
			}
			if ok, got := opensOurs(t, d.b, testPass); !ok || !bytes.Equal(got, vk.Bytes()) {
				t.Fatal("we do not open what we formatted")
			}
			if ok, _ := opensOurs(t, d.b, newPass); ok {
				t.Fatal("a wrong passphrase opens")
			}
			// Format touches nothing from the data segment on.
			if i := slices.IndexFunc(d.b[l.Offset:], func(c byte) bool { return c != 0 }); i >= 0 {
				t.Fatalf("Format wrote at %d, inside the data segment", l.Offset+int64(i))
			}
		})
	}
}

func fmtOpt(o FormatOptions) string {
	return "sector" + itoa(int64(o.SectorSize)) + "_tail" + itoa(o.TailReserve) + "_label" + o.Label
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// TestFormatLayoutIsCryptsetups: cryptsetup luksFormat with the same
// choices puts metadata, keyslots area, data and keyslot 0 exactly where
// Format does.
func TestFormatLayoutIsCryptsetups(t *testing.T) {
	luks2test.RequireCryptsetup(t)
	dir := t.TempDir()
	theirs := filepath.Join(dir, "theirs.img")
	luks2test.Sparse(t, theirs, fmtTestSize)
	kf := filepath.Join(dir, "k")
	if err := os.WriteFile(kf, testPass, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", kf,
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "4096", theirs).CombinedOutput(); err != nil {
		t.Fatalf("luksFormat: %v\n%s", err, out)
	}
	d, _ := formatMem(t, fmtTestSize, testVK(2), FormatOptions{})
	ours := filepath.Join(dir, "ours.img")
	writeSparse(t, ours, d.b)
	strip := regexp.MustCompile(`(?m)^(UUID|Epoch|\s+Salt|\s+Digest|\s+Iterations|\s{12}).*$`)
	a, b := strip.ReplaceAllString(dump(t, theirs), ""), strip.ReplaceAllString(dump(t, ours), "")
	if a != b {
		t.Fatalf("luksDump differs (salts, digests, UUID and epoch aside):\ncryptsetup:\n%s\nours:\n%s", a, b)
	}
}

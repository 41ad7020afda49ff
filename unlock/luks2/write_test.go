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

	"github.com/unlockrd/unlockrd/unlock/blank"
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
func opensOurs(t *testing.T, r img, key []byte) (bool, []byte) {
	t.Helper()
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
	d := newMemDev(nil, size)
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
			writeSparse(t, img, d.img())
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
			if r := o.opens(d.img(), testPass, newPass); !r[""] || !r[string(testPass)] || r[string(newPass)] {
				t.Fatalf("cryptsetup: %v", r)
			}
			if ok, got := opensOurs(t, d.img(), testPass); !ok || !bytes.Equal(got, vk.Bytes()) {
				t.Fatal("we do not open what we formatted")
			}
			if ok, _ := opensOurs(t, d.img(), newPass); ok {
				t.Fatal("a wrong passphrase opens")
			}
			// Format touches nothing from the data segment on.
			if int64(len(d.b)) > l.Offset {
				t.Fatalf("Format wrote up to %d, inside the data segment", len(d.b))
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
	writeSparse(t, ours, d.img())
	strip := regexp.MustCompile(`(?m)^(UUID|Epoch|\s+Salt|\s+Digest|\s+Iterations|\s{12}).*$`)
	a, b := strip.ReplaceAllString(dump(t, theirs), ""), strip.ReplaceAllString(dump(t, ours), "")
	if a != b {
		t.Fatalf("luksDump differs (salts, digests, UUID and epoch aside):\ncryptsetup:\n%s\nours:\n%s", a, b)
	}
}

// noSecrets fails when err's text holds any of the secrets.
func noSecrets(t *testing.T, err error, secrets ...[]byte) {
	t.Helper()
	if err == nil {
		return
	}
	for _, s := range secrets {
		if bytes.Contains([]byte(err.Error()), s) || strings.Contains(err.Error(), strconv.Quote(string(s))) {
			t.Fatalf("error reveals a secret: %v", err)
		}
	}
}

// formatState checks one state a Format can leave: a volume that opens
// with the passphrase and the volume key (we and cryptsetup agree), or a
// device that is blank or an unfinished format of ours (and cryptsetup
// sees no volume), which a new Format completes. It returns which.
func formatState(t *testing.T, o *oracle, name string, img img, vk *secret.Buf) string {
	t.Helper()
	size := img.size
	ok, got := opensOurs(t, img, testPass)
	r := o.opens(img, testPass)
	if ok {
		if !bytes.Equal(got, vk.Bytes()) {
			t.Fatalf("%s: opens to another volume key", name)
		}
		if !r[""] || !r[string(testPass)] {
			t.Fatalf("%s: we open it, cryptsetup does not (%v)", name, r)
		}
		return "volume"
	}
	if r[""] || r[string(testPass)] {
		t.Fatalf("%s: cryptsetup sees a volume (%v), we do not", name, r)
	}
	kind := "blank"
	if err := blank.Check(img, size); err != nil {
		if uerr := Unfinished(img, size, FormatOptions{}); uerr != nil {
			t.Fatalf("%s: neither a volume, nor blank (%v), nor an unfinished format (%v)", name, err, uerr)
		}
		kind = "unfinished"
	}
	d := newMemDev(img.b, size)
	if _, err := Format(context.Background(), d, size, vk, buf(testPass), FormatOptions{Rand: seededRand(99)}); err != nil {
		t.Fatalf("%s: formatting again: %v", name, err)
	}
	if ok, got := opensOurs(t, d.img(), testPass); !ok || !bytes.Equal(got, vk.Bytes()) {
		t.Fatalf("%s: formatted again, it does not open", name)
	}
	if r := o.opens(d.img(), testPass); !r[string(testPass)] {
		t.Fatalf("%s: formatted again, cryptsetup does not open it", name)
	}
	return kind
}

// TestFormatPowerCut cuts power at every write of a Format (and tears
// each write at every sector, from either end), and fails every write and
// every sync in turn: each state is blank, our unfinished format, or the
// complete volume, never anything else, and formatting again completes.
func TestFormatPowerCut(t *testing.T) {
	o := newOracle(t)
	var start []byte
	vk := testVK(4)
	d := newMemDev(start, fmtTestSize)
	if _, err := Format(context.Background(), d, fmtTestSize, vk, buf(testPass), FormatOptions{Rand: seededRand(5)}); err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	cs := cuts(start, d.ops)
	for _, c := range cs {
		counts[formatState(t, o, c.name, img{c.state, fmtTestSize}, vk)]++
	}
	nw, ns := d.writes(), len(d.ops)-d.writes()
	for i := 1; i <= nw+ns; i++ {
		f := newMemDev(start, fmtTestSize)
		name := "failing write " + itoa(int64(i))
		if i <= nw {
			f.failW = i
		} else {
			f.failS = i - nw
			name = "failing sync " + itoa(int64(i-nw))
		}
		_, err := Format(context.Background(), f, fmtTestSize, vk, buf(testPass), FormatOptions{Rand: seededRand(5)})
		if !errors.Is(err, errInjected) && !strings.Contains(fmtErr(err), errInjected.Error()) {
			t.Fatalf("%s: Format returned %v", name, err)
		}
		noSecrets(t, err, testPass, vk.Bytes())
		counts["failed I/O: "+formatState(t, o, name, f.img(), vk)]++
	}
	t.Logf("%d writes, %d syncs; %d power-cut states, %d failed-I/O runs: %v; %d cryptsetup runs", nw, ns, len(cs), nw+ns, counts, o.runs)
	if counts["unfinished"] == 0 || counts["volume"] == 0 || counts["blank"] == 0 {
		t.Fatalf("the cuts did not reach every kind of state: %v", counts)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// TestUnfinishedNeedsTheMarker: what Unfinished accepts is only our own
// interrupted work. A device whose first 32 KiB are zero but which holds
// data after them (an ISO 9660 image), a real volume whose both headers
// are damaged, and a marker beside a non-zero primary area are refused;
// the marker with keyslot material and data-segment writes (mkfs through
// the mapping before Format) is accepted, although blank refuses it.
func TestUnfinishedNeedsTheMarker(t *testing.T) {
	size := int64(fmtTestSize)
	opt := FormatOptions{}
	l, _ := Layout(size, opt)
	iso := make([]byte, 1<<20)
	copy(iso[32769:], "CD001")
	if err := Unfinished(img{iso, size}, size, opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("ISO 9660: %v", err)
	}
	d := newMemDev(nil, size)
	if _, err := BeginFormat(context.Background(), d, size, opt); err != nil {
		t.Fatal(err)
	}
	rnd := seededRand(8)
	for _, a := range []Area{l.Keyslot0, {Offset: l.Offset, Size: l.Size}} {
		b := make([]byte, a.Size)
		rnd.Read(b)
		d.b = put(d.b, b, a.Offset)
	}
	if err := blank.Check(d.img(), size); err == nil {
		t.Fatal("blank takes a device with the marker")
	}
	if err := Unfinished(d.img(), size, opt); err != nil {
		t.Fatalf("marker, keyslot material and data: %v", err)
	}
	bad := slices.Clone(d.b)
	bad[1024+0x38], bad[1024+0x39] = 0x53, 0xef // an ext4 magic in the primary area
	if err := Unfinished(img{bad, size}, size, opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("marker beside an ext4 magic: %v", err)
	}
	if _, err := Format(context.Background(), newMemDev(bad, size), size, testVK(1), buf(testPass), opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("Format over an ext4 magic: %v", err)
	}
	bad = slices.Clone(d.b)
	bad[600<<10] = 1
	if err := Unfinished(img{bad, size}, size, opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("non-zero byte in the first MiB after slot 0: %v", err)
	}
	// A real volume with both copies damaged.
	real, _ := os.ReadFile(luks2test.Format(t, testPass))
	real[0], real[16384+4096] = 0, '['
	if _, err := ReadHeader(img{real, size}); err == nil {
		t.Fatal("the damaged volume still reads")
	}
	if err := Unfinished(img{real, size}, size, opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("damaged real volume: %v", err)
	}
	// A complete volume is not unfinished.
	v, _ := formatMem(t, size, testVK(1), opt)
	if err := Unfinished(v.img(), size, opt); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("complete volume: %v", err)
	}
}

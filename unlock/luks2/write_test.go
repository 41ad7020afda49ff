package luks2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
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

// opensBoth says which of old and new open dev, by us and by cryptsetup,
// and fails when we disagree.
func opensBoth(t *testing.T, o *oracle, name string, dev img) (oldOK, newOK bool) {
	t.Helper()
	oldOK, _ = opensOurs(t, dev, testPass)
	newOK, _ = opensOurs(t, dev, newPass)
	r := o.opens(dev, testPass, newPass)
	if r[string(testPass)] != oldOK || r[string(newPass)] != newOK {
		t.Fatalf("%s: we open old %v new %v, cryptsetup old %v new %v", name, oldOK, newOK, r[string(testPass)], r[string(newPass)])
	}
	return oldOK, newOK
}

// startVolumes are the volumes a rotation starts from: one cryptsetup
// made (4 MiB, 1 MiB keyslots area) and one of ours, both opening with
// testPass only.
func startVolumes(t *testing.T) map[string]img {
	cs, err := os.ReadFile(luks2test.Format(t, testPass))
	if err != nil {
		t.Fatal(err)
	}
	ours, _ := formatMem(t, fmtTestSize, testVK(10), FormatOptions{Rand: seededRand(11)})
	return map[string]img{"cryptsetup-made": {cs, int64(len(cs))}, "ours": ours.img()}
}

func volumeKey(t *testing.T, dev img, pass []byte) (*secret.Buf, int, *Header) {
	t.Helper()
	h, err := ReadHeader(dev)
	if err != nil {
		t.Fatal(err)
	}
	vk, slot, _, err := FindKey(context.Background(), dev, h, keyBufs(pass))
	if err != nil {
		t.Fatal(err)
	}
	return vk, slot, h
}

// TestRotation adds a keyslot for a new key and removes the old one, on a
// cryptsetup-made volume and on ours: after the add both keys open it
// (cryptsetup and we agree, and cryptsetup's own luksAddKey would have
// put the keyslot at the same place); after the remove only the new key
// does, the old area no longer holds its key material, and cryptsetup's
// luksDump lists only the new keyslot.
func TestRotation(t *testing.T) {
	o := newOracle(t)
	for name, start := range startVolumes(t) {
		t.Run(name, func(t *testing.T) {
			d := newMemDev(start.b, start.size)
			vk, oldSlot, h := volumeKey(t, d.img(), testPass)
			defer vk.Wipe()
			id, h2, err := AddKeyslot(context.Background(), d, h, vk, buf(newPass), nil)
			if err != nil {
				t.Fatal(err)
			}
			if h2.SeqID != h.SeqID+1 || id == oldSlot {
				t.Fatalf("slot %d, sequence id %d after %d", id, h2.SeqID, h.SeqID)
			}
			if old, nw := opensBoth(t, o, "after add", d.img()); !old || !nw {
				t.Fatalf("after add: old %v new %v", old, nw)
			}
			// cryptsetup's luksAddKey on the same volume picks the same
			// id and area.
			path := filepath.Join(t.TempDir(), "theirs.img")
			writeSparse(t, path, start)
			kf, nf := filepath.Join(t.TempDir(), "old"), filepath.Join(t.TempDir(), "new")
			os.WriteFile(kf, testPass, 0o600)
			os.WriteFile(nf, newPass, 0o600)
			if out, err := exec.Command("cryptsetup", "luksAddKey", "--batch-mode", "--key-file", kf, "--pbkdf", "pbkdf2",
				"--pbkdf-force-iterations", "1000", path, nf).CombinedOutput(); err != nil {
				t.Fatalf("luksAddKey: %v\n%s", err, out)
			}
			theirs, err := readHeaderFile(t, path)
			if err != nil {
				t.Fatal(err)
			}
			ours, _ := h2.Keyslot(id)
			tk, ok := theirs.Keyslot(id)
			if !ok || tk.Area != ours.Area || tk.KDF.Iterations != ours.KDF.Iterations || tk.AF != ours.AF {
				t.Fatalf("our keyslot %d: %+v; cryptsetup's: %+v", id, ours, tk)
			}
			oldArea := slices.Clone(d.b[ks(h, oldSlot).Area.Offset:][:ks(h, oldSlot).Area.Size])
			h3, err := RemoveKeyslot(context.Background(), d, h2, oldSlot, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := h3.Keyslot(oldSlot); ok || h3.SeqID != h2.SeqID+1 {
				t.Fatalf("after remove: %+v", h3.Keyslots)
			}
			if old, nw := opensBoth(t, o, "after remove", d.img()); old || !nw {
				t.Fatalf("after remove: old %v new %v", old, nw)
			}
			wiped(t, d.img(), oldArea, ks(h, oldSlot).Area.Offset)
			p2 := filepath.Join(t.TempDir(), "after.img")
			writeSparse(t, p2, d.img())
			out := dump(t, p2)
			if strings.Contains(out, "\n  "+itoa(int64(oldSlot))+": luks2") || !strings.Contains(out, "\n  "+itoa(int64(id))+": luks2") {
				t.Fatalf("luksDump after rotation:\n%s", out)
			}
			if _, err := RemoveKeyslot(context.Background(), d, h3, id, nil); err == nil {
				t.Fatal("removed the last keyslot")
			}
		})
	}
}

func ks(h *Header, id int) Keyslot { k, _ := h.Keyslot(id); return k }

// wiped fails when any 512-byte sector of the old area is still on dev.
func wiped(t *testing.T, dev img, old []byte, off int64) {
	t.Helper()
	cur := make([]byte, len(old))
	dev.ReadAt(cur, off)
	for i := 0; i+512 <= len(old); i += 512 {
		if bytes.Equal(cur[i:i+512], old[i:i+512]) {
			t.Fatalf("sector %d of the removed keyslot's area is still there", i/512)
		}
	}
}

// TestRotationPowerCut cuts power at every write of an AddKeyslot and of
// a RemoveKeyslot (torn both ways, unsynced writes lost), and fails every
// write and sync: each state opens with the old key or the new one, we
// and cryptsetup agree on which, and running the step again completes it.
func TestRotationPowerCut(t *testing.T) {
	o := newOracle(t)
	for name, start := range startVolumes(t) {
		t.Run(name, func(t *testing.T) {
			vk, oldSlot, h := volumeKey(t, start, testPass)
			defer vk.Wipe()
			counts := map[string]int{}
			add := func(d *memDev) (*Header, error) {
				h, err := ReadHeader(d)
				if err != nil {
					return nil, err
				}
				_, nh, err := AddKeyslot(context.Background(), d, h, vk, buf(newPass), seededRand(20))
				return nh, err
			}
			remove := func(d *memDev) (*Header, error) {
				h, err := ReadHeader(d)
				if err != nil {
					return nil, err
				}
				return RemoveKeyslot(context.Background(), d, h, oldSlot, seededRand(21))
			}
			oldArea := slices.Clone(start.b[ks(h, oldSlot).Area.Offset:][:ks(h, oldSlot).Area.Size])
			for _, step := range []struct {
				name   string
				run    func(*memDev) (*Header, error)
				oldNow bool // the old key must open every state
				newNow bool // the new key must open every state
				done   func(*testing.T, string, img)
			}{
				{"add", add, true, false, func(t *testing.T, n string, dev img) {
					if old, nw := opensBoth(t, o, n+", added again", dev); !old || !nw {
						t.Fatalf("%s: added again: old %v new %v", n, old, nw)
					}
				}},
				{"remove", remove, false, true, func(t *testing.T, n string, dev img) {
					if old, nw := opensBoth(t, o, n+", removed again", dev); old || !nw {
						t.Fatalf("%s: removed again: old %v new %v", n, old, nw)
					}
					wiped(t, dev, oldArea, ks(h, oldSlot).Area.Offset)
				}},
			} {
				d := newMemDev(start.b, start.size)
				if step.name == "remove" {
					if _, err := add(d); err != nil {
						t.Fatal(err)
					}
					start = d.img()
					d = newMemDev(start.b, start.size)
					d.ops = nil
				}
				if _, err := step.run(d); err != nil {
					t.Fatal(err)
				}
				check := func(n string, state img) {
					old, nw := opensBoth(t, o, n, state)
					if step.oldNow && !old || step.newNow && !nw {
						t.Fatalf("%s: opens with old %v, new %v", n, old, nw)
					}
					counts[step.name+fmt.Sprintf(": old %v new %v", old, nw)]++
					again := newMemDev(state.b, state.size)
					if _, err := step.run(again); err != nil {
						t.Fatalf("%s: again: %v", n, err)
					}
					step.done(t, n, again.img())
				}
				cs := cuts(start.b, d.ops)
				for _, c := range cs {
					check(step.name+": "+c.name, img{c.state, start.size})
				}
				nw, ns := d.writes(), len(d.ops)-d.writes()
				for i := 1; i <= nw+ns; i++ {
					f := newMemDev(start.b, start.size)
					if i <= nw {
						f.failW = i
					} else {
						f.failS = i - nw
					}
					_, err := step.run(f)
					if !strings.Contains(fmtErr(err), errInjected.Error()) {
						t.Fatalf("%s: failing I/O %d: %v", step.name, i, err)
					}
					noSecrets(t, err, testPass, newPass, vk.Bytes())
					check(fmt.Sprintf("%s: failing I/O %d", step.name, i), f.img())
				}
				t.Logf("%s: %d writes, %d syncs, %d power-cut states, %d failed-I/O runs", step.name, nw, ns, len(cs), nw+ns)
			}
			t.Logf("states: %v; %d cryptsetup runs so far", counts, o.runs)
		})
	}
}

// setSeqID sets the sequence id of one header copy of the file and fixes
// its checksum.
func setSeqID(t *testing.T, path string, copyIdx int, seq uint64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off := copyIdx * fmtHdrSize
	hdr := b[off : off+fmtHdrSize]
	binary.BigEndian.PutUint64(hdr[16:], seq)
	clear(hdr[0x1c0 : 0x1c0+64])
	sum := sha256.Sum256(hdr)
	copy(hdr[0x1c0:], sum[:])
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReadHeaderHigherSeqID: with both copies intact and different, the
// one with the higher sequence id is used, by us as by cryptsetup (the
// oracle): a rotation cut between its two header writes leaves exactly
// that.
func TestReadHeaderHigherSeqID(t *testing.T) {
	o := newOracle(t)
	dropSlot0 := func(m map[string]any) {
		delete(m["keyslots"].(map[string]any), "0")
		d := m["digests"].(map[string]any)["0"].(map[string]any)
		d["keyslots"] = []any{"1"}
	}
	for _, tc := range []struct {
		name      string
		newer     int // copy with the higher sequence id
		wantOld   bool
		secondary bool
	}{
		{"secondary newer", 1, false, true},
		{"primary newer", 0, true, false},
		{"equal", -1, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := format(t, testPass, newPass)
			editJSON(t, path, 1, dropSlot0)
			h0, err := readHeaderFile(t, path)
			if err != nil {
				t.Fatal(err)
			}
			seq := h0.SeqID
			if tc.newer >= 0 {
				setSeqID(t, path, tc.newer, seq+1)
			}
			b, _ := os.ReadFile(path)
			dev := img{b, int64(len(b))}
			h, err := ReadHeader(dev)
			if err != nil {
				t.Fatal(err)
			}
			if h.Secondary != tc.secondary || (h.PrimaryErr != nil) != tc.secondary {
				t.Fatalf("Secondary %v (%v)", h.Secondary, h.PrimaryErr)
			}
			if old, nw := opensBoth(t, o, tc.name, dev); old != tc.wantOld || !nw {
				t.Fatalf("old %v new %v", old, nw)
			}
		})
	}
}

// TestWritersWipeEverything: Format and AddKeyslot leave no buffer, MAC
// or hash state from which the passphrase, the volume key or the area key
// could be read (as TestUnsealWipesEverything does for unsealing), and
// leave the caller's secrets as they were.
func TestWritersWipeEverything(t *testing.T) {
	vk := testVK(30)
	vkCopy := bytes.Clone(vk.Bytes())
	pass := buf(testPass)
	sc := &scratch{}
	d := newMemDev(nil, fmtTestSize)
	h, err := formatDev(context.Background(), d, fmtTestSize, vk, pass, FormatOptions{Rand: seededRand(31)}, sc)
	if err != nil {
		t.Fatal(err)
	}
	if len(sc.hashes) == 0 {
		t.Fatal("the anti-forensic split recorded no hash")
	}
	checkScratch(t, sc, map[string][]byte{"passphrase": testPass, "volume key": vkCopy}, sha256.New)
	sc = &scratch{}
	np := buf(newPass)
	if _, _, err := addKeyslot(context.Background(), d, h, vk, np, seededRand(32), sc); err != nil {
		t.Fatal(err)
	}
	checkScratch(t, sc, map[string][]byte{"passphrase": testPass, "new passphrase": newPass, "volume key": vkCopy}, sha256.New)
	if !bytes.Equal(vk.Bytes(), vkCopy) || !bytes.Equal(pass.Bytes(), testPass) || !bytes.Equal(np.Bytes(), newPass) {
		t.Fatal("a writer changed the caller's secrets")
	}
}

// TestWriteOrder pins LUKS2's update rules on the recorded writes: every
// write is followed by a sync; Format writes its marker, then keyslot 0's
// area, then the secondary's JSON area, its binary header, the primary;
// AddKeyslot writes the new area before the header (secondary first);
// RemoveKeyslot writes the header (secondary first) before wiping the
// area. The power-cut tests cannot see every one of these (a keyslot area
// written after the header that names it still leaves the old key
// working), so the order itself is checked.
func TestWriteOrder(t *testing.T) {
	type w struct{ off, n int64 }
	record := func(d *memDev) []w {
		var out []w
		for i, o := range d.ops {
			if o.data == nil {
				continue
			}
			if i+1 >= len(d.ops) || d.ops[i+1].data != nil {
				t.Fatalf("write %d (%d bytes at %d) is not followed by a sync", len(out)+1, len(o.data), o.off)
			}
			out = append(out, w{o.off, int64(len(o.data))})
		}
		return out
	}
	const hs = fmtHdrSize
	header := []w{{hs + 4096, hs - 4096}, {hs, 4096}, {0, hs}}
	d := newMemDev(nil, fmtTestSize)
	vk := testVK(40)
	h, err := Format(context.Background(), d, fmtTestSize, vk, buf(testPass), FormatOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a0 := ks(h, 0).Area
	if got, want := record(d), append([]w{{hs, 4096}, {a0.Offset, a0.Size}}, header...); !slices.Equal(got, want) {
		t.Fatalf("Format wrote %v, want %v", got, want)
	}
	d.ops = nil
	id, h2, err := AddKeyslot(context.Background(), d, h, vk, buf(newPass), nil)
	if err != nil {
		t.Fatal(err)
	}
	a1 := ks(h2, id).Area
	if a1.Offset != a0.Offset+a0.Size {
		t.Fatalf("keyslot %d area at %d, want right after keyslot 0's (%d)", id, a1.Offset, a0.Offset+a0.Size)
	}
	if got, want := record(d), append([]w{{a1.Offset, a1.Size}}, header...); !slices.Equal(got, want) {
		t.Fatalf("AddKeyslot wrote %v, want %v", got, want)
	}
	d.ops = nil
	if _, err := RemoveKeyslot(context.Background(), d, h2, 0, nil); err != nil {
		t.Fatal(err)
	}
	if got, want := record(d), append(slices.Clone(header), w{a0.Offset, a0.Size}); !slices.Equal(got, want) {
		t.Fatalf("RemoveKeyslot wrote %v, want %v", got, want)
	}
}

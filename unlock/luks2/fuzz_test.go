package luks2

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/secret"
)

// FuzzValidateHeader mutates the JSON metadata of real cryptsetup headers,
// re-seals it with a correct checksum (what an attacker does), and checks
// that parsing and validation never crash and that whatever passes
// validation really is what the policy promises. Run it for a while with
//
//	go test -run '^$' -fuzz FuzzValidateHeader -fuzztime 5m ./unlock/luks2
func FuzzValidateHeader(f *testing.F) {
	pass := []byte("fuzz")
	var base []byte
	for i, args := range [][]string{
		{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"},
		{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--sector-size", "4096"},
		{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--label", "x"},
	} {
		img := formatArgs(f, pass, args...)
		b, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		if i == 0 {
			base = b
		}
		js := b[luks2BinSize : 16<<10]
		f.Add(bytes.TrimRight(js, "\x00"), false)
		f.Add(bytes.TrimRight(js, "\x00"), true)
	}
	const hsize = 16 << 10
	f.Fuzz(func(t *testing.T, js []byte, secondary bool) {
		if len(js) > hsize-luks2BinSize-1 {
			return
		}
		// The JSON goes into one copy; the other is wiped, so a refused
		// copy is not hidden by falling back to an intact one (and only
		// the two 16 KiB copies are copied per input, never the image).
		head := slices.Clone(base[:2*hsize])
		img := overlay{head, base}
		hdr, other := head[:hsize], head[hsize:]
		if secondary {
			hdr, other = other, hdr
		}
		clear(other)
		area := hdr[luks2BinSize:]
		clear(area)
		copy(area, js)
		clear(hdr[0x1c0 : 0x1c0+64])
		sum := sha256.Sum256(hdr)
		copy(hdr[0x1c0:], sum[:])
		h, err := ReadHeader(img)
		if err != nil {
			return
		}
		if err := DefaultPolicy().Validate(h); err != nil {
			return
		}
		// Accepted: the promises of the policy must hold.
		if len(h.Segments) != 1 || h.Segments[0].Type != "crypt" || h.Segments[0].Integrity {
			t.Fatalf("accepted segments %+v", h.Segments)
		}
		c := h.Segments[0].Encryption
		if !slices.Contains(DefaultCiphers, c) || strings.Contains(strings.ToLower(c), "null") {
			t.Fatalf("accepted cipher %q", c)
		}
		if h.Segments[0].Offset < 2*h.Size {
			t.Fatalf("accepted segment offset %d inside the metadata", h.Segments[0].Offset)
		}
		if len(h.SlotOrder()) == 0 {
			t.Fatal("accepted without a usable keyslot")
		}
		for _, k := range h.Keyslots {
			if k.Unbound {
				if slices.Contains(h.SlotOrder(), k.ID) {
					t.Fatalf("unbound keyslot %d would be tried", k.ID)
				}
				continue // never tried, so not held to the policy
			}
			if k.KeySize < 32 || !slices.Contains(DefaultKeyslotCiphers, k.Area.Encryption) {
				t.Fatalf("accepted keyslot %+v", k)
			}
		}
		// Unsealing an accepted header must not crash either. Its costs
		// are cut to the minimum first: the KDF work is what the policy
		// bounds, not what the fuzzer explores, and a slot that takes
		// seconds would make the fuzzer useless. (The digest then never
		// matches: the wrong-key path is what runs.)
		for i := range h.Keyslots {
			kdf := &h.Keyslots[i].KDF
			kdf.Iterations = min(kdf.Iterations, 2)
			kdf.Time = min(kdf.Time, 1)
			kdf.Memory = min(kdf.Memory, 8*max(kdf.CPUs, 1))
		}
		for i := range h.Digests {
			h.Digests[i].Iterations = min(h.Digests[i].Iterations, 2)
		}
		for _, id := range h.SlotOrder() {
			vk, err := Unseal(context.Background(), img, h, id, secret.From(slices.Clone(pass)))
			if err == nil {
				vk.Wipe()
			}
		}
	})
}

// overlay reads head over base: the edited header copy over the real
// image, without copying megabytes per input.
type overlay struct{ head, base []byte }

func (o overlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := bytes.NewReader(o.base).ReadAt(p, off)
	if off < int64(len(o.head)) {
		copy(p, o.head[off:])
	}
	return n, err
}

// FuzzFormatRoundTrip formats devices of random sizes with random
// options: Format fails exactly when Layout does, and what it writes reads
// back, validates, opens with the passphrase to the volume key, and has
// the data segment Layout promised.
func FuzzFormatRoundTrip(f *testing.F) {
	f.Add(int64(17<<20), uint8(0), int64(0), "data", int64(1))
	f.Add(int64(16<<20+4096), uint8(3), int64(0), "", int64(2))
	f.Add(int64(1<<40+511), uint8(1), int64(1<<20), "a label of forty-seven bytes, the longest kept", int64(3))
	f.Add(int64(20<<20), uint8(2), int64(3<<20+512), "x", int64(4))
	f.Fuzz(func(t *testing.T, size int64, sector uint8, tail int64, label string, seed int64) {
		if size < 0 || size > 1<<50 || len(label) > 100 {
			return
		}
		opt := FormatOptions{SectorSize: []int{0, 512, 4096, 1024, 2048, 999}[int(sector)%6], TailReserve: tail, Label: label, Rand: seededRand(seed)}
		l, lerr := Layout(size, opt)
		vk := testVK(seed)
		d := newMemDev(nil, size)
		h, err := Format(context.Background(), d, size, vk, buf(testPass), opt)
		if lerr != nil || len(label) >= 48 || strings.IndexByte(label, 0) >= 0 {
			if err == nil {
				t.Fatalf("Layout refuses (%v) but Format formats", lerr)
			}
			return
		}
		if err != nil {
			t.Fatalf("Layout %+v, Format: %v", l, err)
		}
		got, err := ReadHeader(d)
		if err != nil {
			t.Fatal(err)
		}
		if err := DefaultPolicy().Validate(got); err != nil {
			t.Fatal(err)
		}
		if got.Label != label || got.UUID != h.UUID || got.SeqID != h.SeqID {
			t.Fatalf("read back %q %s %d, wrote %q %s %d", got.Label, got.UUID, got.SeqID, label, h.UUID, h.SeqID)
		}
		off, n, err := got.DataOffset(size)
		if err != nil || off != l.Offset || n != l.Size || got.Segments[0].SectorSize != l.SectorSize {
			t.Fatalf("segment %d+%d (%v), layout %+v", off, n, err, l)
		}
		key, _, _, err := FindKey(context.Background(), d, got, keyBufs(testPass))
		if err != nil || !bytes.Equal(key.Bytes(), vk.Bytes()) {
			t.Fatalf("FindKey: %v", err)
		}
	})
}

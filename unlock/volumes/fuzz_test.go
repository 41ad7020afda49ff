package volumes

import (
	"bytes"
	"crypto/sha256"
	"os"
	"slices"
	"strings"
	"testing"
)

// FuzzValidateHeader mutates the JSON metadata of real cryptsetup headers,
// re-seals it with a correct checksum (what an attacker does), and checks
// that parsing and validation never crash and that whatever passes
// validation really is what the policy promises. Run it for a while with
//
//	go test -run '^$' -fuzz FuzzValidateHeader -fuzztime 5m ./unlock/volumes
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
		f.Add(bytes.TrimRight(js, "\x00"))
	}
	f.Fuzz(func(t *testing.T, js []byte) {
		if len(js) > 16<<10-luks2BinSize-1 {
			return
		}
		hdr := slices.Clone(base[:16<<10])
		img := overlay{hdr, base}
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
		// Unsealing an accepted header must not crash either (cheap KDFs
		// only: an accepted argon2 may legitimately take seconds).
		for _, id := range h.SlotOrder() {
			k, _ := h.Keyslot(id)
			if k.KDF.Type != "pbkdf2" || k.KDF.Iterations > 5000 {
				continue
			}
			if d := h.digestFor(id); d == nil || d.Iterations > 5000 || len(d.Digest) > 64 {
				continue
			}
			vk, err := Unseal(img, h, id, pass)
			if err == nil {
				clear(vk)
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

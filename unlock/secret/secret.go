// Package secret is the one type for key material in the boot: fetched
// passphrases, derived keyslot keys and volume keys. A Buf owns its bytes;
// whoever holds a Buf and is done with it calls Wipe, so who wipes what is
// in the code, not in comments. A Buf never prints its contents: fmt shows
// only its length.
package secret

import (
	"fmt"
	"hash"
)

// Buf holds secret bytes. The zero value and nil are empty buffers.
type Buf struct {
	b []byte
}

// New returns a zeroed Buf of n bytes.
func New(n int) *Buf { return &Buf{b: make([]byte, n)} }

// From takes ownership of b: b is wiped with the Buf, and the caller keeps
// no other copy.
func From(b []byte) *Buf { return &Buf{b: b} }

// Bytes is the secret itself, valid until Wipe. Callers must not keep it or
// copy it into memory they do not wipe.
func (s *Buf) Bytes() []byte {
	if s == nil {
		return nil
	}
	return s.b
}

// Len is the length in bytes.
func (s *Buf) Len() int { return len(s.Bytes()) }

// Wipe zeroes the bytes (up to the capacity, so a shortened slice leaves
// nothing behind) and empties the Buf. It is safe on nil and twice.
func (s *Buf) Wipe() {
	if s == nil {
		return
	}
	clear(s.b[:cap(s.b)])
	s.b = nil
}

// WipeAll wipes every Buf of bs.
func WipeAll(bs []*Buf) {
	for _, b := range bs {
		b.Wipe()
	}
}

// String hides the contents.
func (s *Buf) String() string { return fmt.Sprintf("secret(%d bytes)", s.Len()) }

// GoString hides the contents from %#v too.
func (s *Buf) GoString() string { return s.String() }

// Format hides the contents from every verb (%x, %s, %q, %v ...).
func (s *Buf) Format(f fmt.State, _ rune) { fmt.Fprint(f, s.String()) }

// ScrubHash leaves h in its initial state with its block buffer zeroed: Reset
// alone restores the chaining value but leaves the last partial block
// (which held secret-derived input) in the buffer. Writing one block of
// zeros in two pieces makes the hash copy them through its buffer.
func ScrubHash(h hash.Hash) {
	var zero [256]byte
	bs := h.BlockSize()
	if bs > len(zero) || bs < 2 {
		h.Reset()
		return
	}
	h.Reset()
	h.Write(zero[:bs-1])
	h.Write(zero[:1])
	h.Reset()
}

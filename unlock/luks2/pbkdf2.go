package luks2

import (
	"context"
	"crypto/subtle"
	"encoding"
	"encoding/binary"
	"fmt"
	"hash"

	"github.com/unlockrd/unlockrd/unlock/secret"
)

// Our own HMAC and PBKDF2 (RFC 2104, RFC 8018), because crypto/hmac keeps
// the key XORed with ipad and opad, and then the hash states those pads
// lead to (each as good as the key for computing the MAC), in memory it
// never clears: after unsealing, the passphrase and the volume key (the
// password of the digest's PBKDF2) stay readable in freed heap. Here every
// pad, saved state and hash buffer is wiped once the MAC is done, and the
// iteration loop checks the context, so a deadline stops a slow keyslot.

// mac is HMAC over newHash with key; wipe clears everything it holds.
type mac struct {
	inner, outer hash.Hash
	// ipad and opad are key⊕pad; innerState and outerState the hash
	// states after absorbing them (used when the hash can marshal its
	// state, which saves two compressions per message). All are as
	// secret as the key.
	ipad, opad             []byte
	innerState, outerState []byte
}

type marshalable interface {
	encoding.BinaryMarshaler
	encoding.BinaryUnmarshaler
}

func newMAC(newHash func() hash.Hash, key []byte) *mac {
	m := &mac{inner: newHash(), outer: newHash()}
	bs := m.inner.BlockSize()
	m.ipad, m.opad = make([]byte, bs), make([]byte, bs)
	if len(key) > bs {
		m.outer.Write(key)
		m.outer.Sum(m.ipad[:0]) // Size() <= BlockSize(): no allocation
		secret.ScrubHash(m.outer)
	} else {
		copy(m.ipad, key)
	}
	copy(m.opad, m.ipad)
	for i := range m.ipad {
		m.ipad[i] ^= 0x36
		m.opad[i] ^= 0x5c
	}
	mi, iok := m.inner.(marshalable)
	mo, ook := m.outer.(marshalable)
	if iok && ook {
		m.inner.Write(m.ipad)
		m.outer.Write(m.opad)
		is, err1 := mi.MarshalBinary()
		os, err2 := mo.MarshalBinary()
		if err1 == nil && err2 == nil {
			m.innerState, m.outerState = is, os
			// The pads are no longer needed: only the states are kept.
			clear(m.ipad)
			clear(m.opad)
			m.ipad, m.opad = nil, nil
		} else {
			clear(is)
			clear(os)
		}
	}
	return m
}

// sum computes HMAC(key, a||b) into out[:0] (which needs Size() capacity
// to stay allocation-free).
func (m *mac) sum(out, a, b []byte) []byte {
	if m.innerState != nil {
		_ = m.inner.(marshalable).UnmarshalBinary(m.innerState)
	} else {
		m.inner.Reset()
		m.inner.Write(m.ipad)
	}
	m.inner.Write(a)
	m.inner.Write(b)
	out = m.inner.Sum(out[:0])
	if m.outerState != nil {
		_ = m.outer.(marshalable).UnmarshalBinary(m.outerState)
	} else {
		m.outer.Reset()
		m.outer.Write(m.opad)
	}
	m.outer.Write(out)
	return m.outer.Sum(out[:0])
}

func (m *mac) size() int { return m.outer.Size() }

// wipe clears the pads, the saved states and both hash states.
func (m *mac) wipe() {
	clear(m.ipad)
	clear(m.opad)
	clear(m.innerState)
	clear(m.outerState)
	secret.ScrubHash(m.inner)
	secret.ScrubHash(m.outer)
}

// pbkdf2Key is PBKDF2-HMAC over a []byte password. Every buffer it uses is
// wiped before it returns, the key it returns is the caller's to wipe; sc,
// when set, is told of every MAC so that a test can check them.
func pbkdf2Key(ctx context.Context, newHash func() hash.Hash, password, salt []byte, iter, keyLen int, sc *scratch) (*secret.Buf, error) {
	if newHash == nil || iter < 1 || keyLen < 1 || keyLen > 1<<20 {
		return nil, fmt.Errorf("pbkdf2 with %d iterations for %d bytes", iter, keyLen)
	}
	prf := newMAC(newHash, password)
	sc.keepMAC(prf)
	defer prf.wipe()
	hl := prf.size()
	out := secret.New((keyLen + hl - 1) / hl * hl)
	u := make([]byte, hl)
	defer clear(u)
	var cnt [4]byte
	for block := 1; (block-1)*hl < keyLen; block++ {
		binary.BigEndian.PutUint32(cnt[:], uint32(block))
		u = prf.sum(u, salt, cnt[:])
		t := out.Bytes()[(block-1)*hl : block*hl]
		copy(t, u)
		for n := 1; n < iter; n++ {
			if n%1024 == 0 {
				if err := ctx.Err(); err != nil {
					out.Wipe()
					return nil, fmt.Errorf("pbkdf2 stopped after %d of %d iterations: %w", n, iter, err)
				}
			}
			u = prf.sum(u, u, nil)
			subtle.XORBytes(t, t, u)
		}
	}
	if keyLen < out.Len() {
		k := secret.New(keyLen)
		copy(k.Bytes(), out.Bytes())
		out.Wipe()
		out = k
	}
	return out, nil
}

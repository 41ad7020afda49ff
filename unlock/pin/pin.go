// Package pin parses and computes SPKI pins in curl's --pinnedpubkey form
// ("sha256//<base64 of the SHA-256 of the DER SubjectPublicKeyInfo>").
//
// It is shared by the image builder (validation, `mkunlockrd pin`), the key
// server (printing its own pin) and the boot-time key fetcher (verification),
// so it must stay free of boot-only dependencies.
package pin

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// Prefix starts every pin; it names the hash, as curl does.
const Prefix = "sha256//"

// Pin is the SHA-256 digest of a certificate's SubjectPublicKeyInfo.
type Pin [sha256.Size]byte

// ErrMalformed is wrapped by every parse error.
var ErrMalformed = errors.New("malformed pin")

// Parse reads one pin in curl's "sha256//BASE64" form.
func Parse(s string) (Pin, error) {
	var p Pin
	if !strings.HasPrefix(s, Prefix) {
		return p, fmt.Errorf("%w %q: want %s<base64 sha256 of the public key>", ErrMalformed, s, Prefix)
	}
	b64 := strings.TrimPrefix(s, Prefix)
	raw, err := base64.StdEncoding.Strict().DecodeString(b64)
	if err != nil {
		return p, fmt.Errorf("%w %q: base64: %v", ErrMalformed, s, err)
	}
	if len(raw) != sha256.Size {
		return p, fmt.Errorf("%w %q: digest is %d bytes, want %d", ErrMalformed, s, len(raw), sha256.Size)
	}
	copy(p[:], raw)
	return p, nil
}

// ParseAll parses a list of pins; the error names the index of the bad one.
func ParseAll(ss []string) ([]Pin, error) {
	out := make([]Pin, 0, len(ss))
	for i, s := range ss {
		p, err := Parse(s)
		if err != nil {
			return nil, fmt.Errorf("[%d]: %w", i, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// String returns the pin in curl's form.
func (p Pin) String() string {
	return Prefix + base64.StdEncoding.EncodeToString(p[:])
}

// Equal compares in constant time; pins are public, but this keeps the
// comparison independent of where a forged key happens to differ.
func (p Pin) Equal(q Pin) bool {
	return subtle.ConstantTimeCompare(p[:], q[:]) == 1
}

// FromSPKI pins a DER-encoded SubjectPublicKeyInfo.
func FromSPKI(spki []byte) Pin {
	return Pin(sha256.Sum256(spki))
}

// FromCert pins a certificate's public key.
func FromCert(c *x509.Certificate) Pin {
	return FromSPKI(c.RawSubjectPublicKeyInfo)
}

// FromPEM pins the first certificate in a PEM bundle.
func FromPEM(data []byte) (Pin, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return Pin{}, errors.New("no CERTIFICATE block in PEM data")
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return Pin{}, fmt.Errorf("parse certificate: %w", err)
		}
		return FromCert(c), nil
	}
}

// Match reports whether p is among pins.
func Match(p Pin, pins []Pin) bool {
	ok := false
	for _, q := range pins {
		if p.Equal(q) {
			ok = true
		}
	}
	return ok
}

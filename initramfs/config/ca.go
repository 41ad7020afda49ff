package config

import (
	"crypto/x509"
	"fmt"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// CACerts is key.ca: CA certificates (PEM) the image carries, through which
// a server certificate matching no pin is trusted. The image carries the
// certificates themselves because only that copy's validity and name
// constraints can be believed (DESIGN §5); the copy a server sends is not
// signed by anyone the client trusts. Parsed once when the configuration
// is read; written back as the same PEM text.
type CACerts struct {
	pem   string
	certs []*x509.Certificate
}

// ParseCACerts reads one or more PEM certificates.
func ParseCACerts(s string) (CACerts, error) {
	if s == "" {
		return CACerts{}, nil
	}
	certs, err := pin.ParseCAs([]byte(s))
	if err != nil {
		return CACerts{}, err
	}
	return CACerts{pem: s, certs: certs}, nil
}

// Certs returns the parsed certificates (none when key.ca is not set).
func (c CACerts) Certs() []*x509.Certificate { return c.certs }

// IsZero reports whether key.ca is unset, for omitzero.
func (c CACerts) IsZero() bool { return c.pem == "" }

// MarshalText writes the PEM text as it was read.
func (c CACerts) MarshalText() ([]byte, error) { return []byte(c.pem), nil }

// UnmarshalText parses PEM text as ParseCACerts does.
func (c *CACerts) UnmarshalText(b []byte) error {
	v, err := ParseCACerts(string(b))
	if err != nil {
		return fmt.Errorf("CA certificates: %w", err)
	}
	*c = v
	return nil
}

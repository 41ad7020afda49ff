package pin

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// ErrNotCA is wrapped when a certificate given as a CA cannot issue
// certificates.
var ErrNotCA = errors.New("not a CA certificate")

// ParseCAs reads the CA certificates an image trusts to issue the key
// server's certificate (PEM, one or more CERTIFICATE blocks; other blocks
// are an error, so a private key pasted by mistake is not carried along).
//
// A CA is trusted through its whole certificate, carried in the image,
// not through a pin over its key: with only the key's hash, the client
// would have to take the CA's validity, name constraints and path length
// from the copy the server sends, and anyone holding a certificate the CA
// issued could send a copy re-made without them (the signature on a root
// is never checked). The error names the block by its index.
func ParseCAs(pemData []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for i := 0; ; i++ {
		var b *pem.Block
		b, pemData = pem.Decode(pemData)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("CA certificate [%d]: PEM block %q, want CERTIFICATE", i, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CA certificate [%d]: %w", i, err)
		}
		if !c.BasicConstraintsValid || !c.IsCA {
			return nil, fmt.Errorf("CA certificate [%d] (%s): %w: basic constraints do not say CA", i, c.Subject, ErrNotCA)
		}
		if c.KeyUsage != 0 && c.KeyUsage&x509.KeyUsageCertSign == 0 {
			return nil, fmt.Errorf("CA certificate [%d] (%s): %w: key usage does not allow signing certificates", i, c.Subject, ErrNotCA)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no CERTIFICATE block in the CA PEM data")
	}
	return out, nil
}

package keys

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// ErrPin is wrapped when the server's leaf matches no pin and does not
// verify up to a configured CA certificate.
var ErrPin = errors.New("pin check failed")

// verifyPinned returns a tls.Config.VerifyConnection callback. It runs
// inside the handshake, before the client's Finished message in TLS 1.2
// and 1.3, so a server that fails it never sees a request.
//
// A pin on the leaf's key accepts that key whatever the clock says: the
// initramfs clock may be wrong and the key itself is what was pinned.
// Otherwise the leaf must verify (signatures, validity, key usage, host
// name, and the CA's own validity, name constraints and path length) up to
// one of cas, the CA certificates the image carries. Certificates the
// server sends serve only as intermediates, which must verify up to one of
// cas too; a server's copy of a CA is never trusted, since nobody checks
// the signature on a root and a copy re-made without the CA's constraints
// would otherwise pass (see pin.ParseCAs).
func verifyPinned(pins []pin.Pin, cas []*x509.Certificate, serverName string, now func() time.Time) func(tls.ConnectionState) error {
	var roots *x509.CertPool
	if len(cas) > 0 {
		roots = x509.NewCertPool()
		for _, c := range cas {
			roots.AddCert(c)
		}
	}
	return func(cs tls.ConnectionState) error {
		certs := cs.PeerCertificates
		if len(certs) == 0 {
			return fmt.Errorf("%w: server sent no certificate", ErrPin)
		}
		leaf := certs[0]
		leafPin := pin.FromCert(leaf)
		if pin.Match(leafPin, pins) {
			return nil
		}
		if roots == nil {
			for _, c := range certs[1:] {
				if pin.Match(pin.FromCert(c), pins) {
					return fmt.Errorf("%w: a pin matches the key of the server's CA certificate %q, but a CA is trusted only through its own certificate in the image, not the server's copy (its key is %s)",
						ErrPin, c.Subject.String(), leafPin)
				}
			}
			return fmt.Errorf("%w: no certificate from the server matches a configured pin (its key is %s)", ErrPin, leafPin)
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		t := now()
		chains, err := leaf.Verify(x509.VerifyOptions{
			DNSName:       serverName,
			Roots:         roots,
			Intermediates: inter,
			CurrentTime:   t,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			var ce x509.CertificateInvalidError
			if errors.As(err, &ce) && ce.Reason == x509.Expired {
				// Under a CA validity counts, and the initramfs clock is
				// the usual suspect.
				return fmt.Errorf("%w: leaf (key %s) does not verify up to a configured CA certificate: %v (the clock says %s)",
					ErrPin, leafPin, err, t.UTC().Format(time.RFC3339))
			}
			return fmt.Errorf("%w: leaf (key %s) does not verify up to a configured CA certificate: %v", ErrPin, leafPin, err)
		}
		// crypto/x509 checks extended key usage and that every issuer
		// is a CA allowed to sign certificates (CheckSignatureFrom), but
		// not the leaf's key usage bits.
		var kuErr error
		for _, ch := range chains {
			if kuErr = checkLeafKeyUsage(ch[0]); kuErr == nil {
				return nil
			}
		}
		return fmt.Errorf("%w: %v", ErrPin, kuErr)
	}
}

// checkLeafKeyUsage: the leaf's key usage, when present, must allow
// digital signatures, since every suite we offer is ECDHE or TLS 1.3,
// where the server signs the handshake with that key.
func checkLeafKeyUsage(leaf *x509.Certificate) error {
	if leaf.KeyUsage != 0 && leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return errors.New("the leaf's key usage does not allow digital signatures")
	}
	return nil
}

// cipherSuites are the TLS 1.2 suites offered: forward-secret ECDHE with
// an AEAD only. (TLS 1.3 suites are not configurable and all qualify.)
var cipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// tlsConfig is the client configuration for one server: no system roots,
// TLS 1.2 or newer, verification done only by the pin callback, no
// session resumption (every connection is verified in full).
//
// ServerName is the URL's host. crypto/tls sends it as SNI only when it is
// a DNS name, never for an IP literal (RFC 6066 forbids that), and the
// CA-pin verification checks it against the leaf's DNS or IP names.
func tlsConfig(pins []pin.Pin, cas []*x509.Certificate, serverName string, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		CipherSuites: cipherSuites,
		ServerName:   serverName,
		// The standard verification would consult the system roots, which
		// an initramfs does not have and must not trust; VerifyConnection
		// does all of the checking instead, and runs on every handshake.
		InsecureSkipVerify: true,
		VerifyConnection:   verifyPinned(pins, cas, serverName, now),
		// No ClientSessionCache: no resumption, so no handshake skips
		// the certificate.
	}
}

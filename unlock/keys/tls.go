package keys

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// ErrPin is wrapped when the server's certificates match no pin.
var ErrPin = errors.New("pin check failed")

// verifyPinned returns a tls.Config.VerifyConnection callback. It runs
// inside the handshake, before the client's Finished message, so a server
// that fails it never sees a request.
//
// A pin on the leaf's key accepts that key whatever the clock says: the
// initramfs clock may be wrong and the key itself is what was pinned. A pin
// on an issuing certificate accepts a leaf only if the leaf verifies up to
// that very certificate (signatures, validity, key usage, host name), so
// presenting a pinned public CA beside a leaf of one's own does not pass.
func verifyPinned(pins []pin.Pin, serverName string, now func() time.Time) func(tls.ConnectionState) error {
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
		roots := x509.NewCertPool()
		inter := x509.NewCertPool()
		anchored := false
		for _, c := range certs[1:] {
			if pin.Match(pin.FromCert(c), pins) {
				roots.AddCert(c)
				anchored = true
			} else {
				inter.AddCert(c)
			}
		}
		if !anchored {
			return fmt.Errorf("%w: no certificate from the server matches a configured pin (leaf key is %s)", ErrPin, leafPin)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			DNSName:       serverName,
			Roots:         roots,
			Intermediates: inter,
			CurrentTime:   now(),
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			return fmt.Errorf("%w: leaf does not verify up to the pinned certificate: %v", ErrPin, err)
		}
		return nil
	}
}

// tlsConfig is the client configuration for one server: no system roots,
// TLS 1.2 or newer, verification done only by the pin callback.
func tlsConfig(pins []pin.Pin, serverName string, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// The standard verification would consult the system roots, which
		// an initramfs does not have and must not trust; VerifyConnection
		// does all of the checking instead.
		InsecureSkipVerify: true,
		VerifyConnection:   verifyPinned(pins, serverName, now),
	}
}

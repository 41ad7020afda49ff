package keyserver

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// DefaultSANs are always in a generated certificate, so local clients and
// tests can name the server however they reach it.
var DefaultSANs = []string{"localhost", "127.0.0.1", "::1"}

// certNotAfter is RFC 5280's "no well-defined expiration date": clients
// trust the key through its pin, and an expiring self-signed certificate
// would only turn into an outage at boot time.
var certNotAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

// GenerateKey returns a new ECDSA P-256 key, the TLS key type we create.
func GenerateKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// GenerateCert returns a self-signed server certificate for key (a new
// P-256 key if nil) naming sans (DNS names or IP addresses) and
// DefaultSANs. Its pin (PinOf) depends on the key only, so the certificate
// can be remade with other names without changing what clients trust.
func GenerateCert(key *ecdsa.PrivateKey, sans ...string) (tls.Certificate, error) {
	if key == nil {
		var err error
		if key, err = GenerateKey(); err != nil {
			return tls.Certificate{}, fmt.Errorf("generate TLS key: %w", err)
		}
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certificate serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "unlockrd-keyserver"},
		NotBefore:             time.Now().Add(-time.Hour).UTC(),
		NotAfter:              certNotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, s := range mergeSANs(sans) {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("parse new certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// mergeSANs returns DefaultSANs plus sans, without blanks or duplicates.
func mergeSANs(sans []string) []string {
	var out []string
	for _, s := range append(slices.Clone(DefaultSANs), sans...) {
		s = strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
		if s != "" && !slices.ContainsFunc(out, func(o string) bool { return strings.EqualFold(o, s) }) {
			out = append(out, s)
		}
	}
	return out
}

// PinOf returns the pin of a certificate's leaf public key.
func PinOf(c tls.Certificate) (pin.Pin, error) {
	if c.Leaf != nil {
		return pin.FromCert(c.Leaf), nil
	}
	if len(c.Certificate) == 0 {
		return pin.Pin{}, errors.New("empty certificate chain")
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		return pin.Pin{}, fmt.Errorf("parse leaf certificate: %w", err)
	}
	return pin.FromCert(leaf), nil
}

// keyPin pins a private key's public half.
func keyPin(key *ecdsa.PrivateKey) (pin.Pin, error) {
	spki, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return pin.Pin{}, err
	}
	return pin.FromSPKI(spki), nil
}

// covers reports whether leaf names every san.
func covers(leaf *x509.Certificate, sans []string) bool {
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
				return false
			}
		} else if !slices.ContainsFunc(leaf.DNSNames, func(d string) bool { return strings.EqualFold(d, s) }) {
			return false
		}
	}
	return true
}

// readPrivate reads a file holding a secret (a TLS private key), refusing
// one that group or others may read: whoever reads tls.key can pose as the
// server to every host pinning it and collect their tokens.
// Errors don't name the file: callers do.
func readPrivate(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("mode %04o lets group or others read it; chmod 600 it", fi.Mode().Perm())
	}
	return io.ReadAll(io.LimitReader(f, 1<<20))
}

// LoadKeyPair is tls.LoadX509KeyPair for `serve --cert F --key F`, with
// the key file held to the same rule as the folder's own tls.key.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	keyPEM, err := readPrivate(keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("TLS key %s: %w", keyFile, err)
	}
	defer clear(keyPEM)
	return tls.X509KeyPair(certPEM, keyPEM)
}

func readECKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := readPrivate(path)
	if err != nil {
		return nil, fmt.Errorf("TLS key %s: %w", path, err)
	}
	defer clear(data)
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("TLS key %s: no PRIVATE KEY PEM block", path)
	}
	defer clear(b.Bytes)
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("TLS key %s: %w", path, err)
	}
	ec, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("TLS key %s: %T, want ECDSA", path, k)
	}
	return ec, nil
}

// loadOrCreateKey returns the TLS key at path, creating it (0600, never
// replacing an existing file) if missing and create is set.
func loadOrCreateKey(path string, create bool) (key *ecdsa.PrivateKey, created bool, err error) {
	key, err = readECKey(path)
	if err == nil || !errors.Is(err, os.ErrNotExist) || !create {
		return key, false, err // readECKey names the file
	}
	if key, err = GenerateKey(); err != nil {
		return nil, false, fmt.Errorf("TLS key %s: %w", path, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, false, fmt.Errorf("TLS key %s: %w", path, err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	err = writeNew(path, data, 0o600)
	clear(der)
	clear(data)
	if errors.Is(err, os.ErrExist) {
		// Another process made it first; theirs is the one clients pin.
		key, err = readECKey(path)
		return key, false, err
	}
	if err != nil {
		return nil, false, fmt.Errorf("TLS key %s: %w", path, err)
	}
	return key, true, nil
}

// loadOrMakeCert returns the certificate at certPath if it is for key and
// names every san, otherwise makes a new one and stores it there. The
// certificate is public and derived from the key, so replacing it is safe.
func loadOrMakeCert(certPath string, key *ecdsa.PrivateKey, sans []string) (tls.Certificate, error) {
	want := mergeSANs(sans)
	if data, err := os.ReadFile(certPath); err == nil {
		if b, _ := pem.Decode(data); b != nil && b.Type == "CERTIFICATE" {
			if leaf, err := x509.ParseCertificate(b.Bytes); err == nil &&
				leaf.PublicKey != nil && key.PublicKey.Equal(leaf.PublicKey) &&
				covers(leaf, want) && time.Now().Before(leaf.NotAfter) {
				return tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}, nil
			}
		}
	}
	c, err := GenerateCert(key, want...)
	if err != nil {
		return c, err
	}
	pemData := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]})
	if err := replaceFile(certPath, pemData, 0o644); err != nil {
		return c, fmt.Errorf("TLS certificate %s: %w", certPath, err)
	}
	return c, nil
}

// replaceFile writes path atomically (temp file, sync, rename, dir sync).
func replaceFile(path string, data []byte, perm os.FileMode) error {
	return install(path, data, perm, os.Rename)
}

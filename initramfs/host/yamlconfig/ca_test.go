package yamlconfig

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/config"
)

func caPEM(t *testing.T) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

const caBase = `key:
  urls:
    - https://keys.example.net:8443/v1/keys/{host}
%s
root:
  device: PARTLABEL=root
`

func withCA(pemText string) string {
	var b strings.Builder
	b.WriteString("  ca: |\n")
	for _, l := range strings.Split(strings.TrimRight(pemText, "\n"), "\n") {
		b.WriteString("    " + l + "\n")
	}
	return strings.Replace(caBase, "%s\n", b.String(), 1)
}

// key.ca alone trusts the server (no pin needed); it survives the trip
// through the image's JSON as the same certificates.
func TestKeyCARoundTrip(t *testing.T) {
	ca := caPEM(t)
	c, err := Parse([]byte(withCA(ca)))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Key.CA.Certs()) != 1 || c.Key.CA.Certs()[0].Subject.CommonName != "test CA" {
		t.Fatalf("key.ca parsed to %d certificates", len(c.Key.CA.Certs()))
	}
	js, err := c.Embed()
	if err != nil {
		t.Fatal(err)
	}
	back, err := config.LoadEmbedded(js)
	if err != nil {
		t.Fatal(err)
	}
	if got := back.Key.CA.Certs(); len(got) != 1 || !got[0].Equal(c.Key.CA.Certs()[0]) {
		t.Fatalf("key.ca after the image's JSON: %d certificates", len(got))
	}
}

// Neither pins nor a CA: refused, naming the field; a malformed CA names
// key.ca.
func TestKeyCABadInput(t *testing.T) {
	if _, err := Parse([]byte(strings.Replace(caBase, "%s\n", "", 1))); err == nil || !strings.Contains(err.Error(), "key.pins") {
		t.Errorf("no pins, no CA: err = %v, want it to name key.pins", err)
	}
	bad := withCA("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	if _, err := Parse([]byte(bad)); err == nil || !strings.Contains(err.Error(), "key.ca") {
		t.Errorf("malformed CA: err = %v, want it to name key.ca", err)
	}
}

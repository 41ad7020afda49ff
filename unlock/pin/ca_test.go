package pin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

func certPEM(t *testing.T, ca bool, usage x509.KeyUsage) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		BasicConstraintsValid: true, IsCA: ca, KeyUsage: usage,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestParseCAs(t *testing.T) {
	a, b := certPEM(t, true, x509.KeyUsageCertSign), certPEM(t, true, 0)
	cas, err := ParseCAs(append(append([]byte("comment\n"), a...), b...))
	if err != nil || len(cas) != 2 {
		t.Fatalf("%d CAs, %v", len(cas), err)
	}
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"empty":       {nil, "no CERTIFICATE block"},
		"leaf":        {append(a, certPEM(t, false, x509.KeyUsageDigitalSignature)...), "CA certificate [1]"},
		"cannot sign": {certPEM(t, true, x509.KeyUsageDigitalSignature), "key usage"},
		"private key": {pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}), `"PRIVATE KEY"`},
		"bad DER":     {pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), "CA certificate [0]"},
	} {
		_, err := ParseCAs(tc.data)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
		if name == "leaf" && !errors.Is(err, ErrNotCA) {
			t.Errorf("leaf: %v does not wrap ErrNotCA", err)
		}
	}
}

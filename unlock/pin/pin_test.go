package pin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

const good = "sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="

func TestParse(t *testing.T) {
	p, err := Parse(good)
	if err != nil || p.String() != good {
		t.Fatalf("Parse(%q) = %v, %v", good, p, err)
	}
	for _, bad := range []string{
		"",
		"7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=",          // no prefix
		"sha1//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=",    // other hash
		"SHA256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=",  // curl's prefix is lower case
		"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y",   // padding missing
		"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Z=",  // non-canonical last character
		"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y= ", // trailing space
		"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRh",      // short
		"sha256//" + base64.StdEncoding.EncodeToString(make([]byte, 48)),
		"sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=;sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=",
		"sha256//-_Ipactk" + strings.Repeat("A", 35) + "=", // URL alphabet
	} {
		if _, err := Parse(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}

func TestParseAllNamesTheIndex(t *testing.T) {
	_, err := ParseAll([]string{good, "sha256//nope"})
	if err == nil || !strings.HasPrefix(err.Error(), "[1]: malformed pin") {
		t.Fatalf("err = %v", err)
	}
}

func TestFromCertAndPEM(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "x"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	spki, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	want := Pin(sha256.Sum256(spki)) // what `openssl pkey -pubout -outform der | sha256` gives
	if FromCert(c) != want || FromSPKI(spki) != want {
		t.Fatal("pin is not the SHA-256 of the DER SubjectPublicKeyInfo")
	}
	bundle := append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	if p, err := FromPEM(bundle); err != nil || p != want {
		t.Fatalf("FromPEM = %v, %v", p, err)
	}
	if _, err := FromPEM([]byte("nothing")); err == nil {
		t.Fatal("FromPEM accepted no certificate")
	}
}

func TestMatch(t *testing.T) {
	a, b := Pin{1}, Pin{2}
	if !Match(a, []Pin{b, a}) || Match(a, []Pin{b}) || Match(a, nil) {
		t.Fatal("Match")
	}
}

// FuzzParse: no panic; a pin that parses is in canonical form (it prints
// back exactly as given); an error wraps ErrMalformed.
func FuzzParse(f *testing.F) {
	f.Add(good)
	f.Add("sha256//")
	f.Add("sha256//AAAA")
	f.Add("sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y")
	f.Fuzz(func(t *testing.T, s string) {
		p, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if p.String() != s {
			t.Fatalf("Parse(%q) prints back as %q", s, p.String())
		}
		if q, err := Parse(p.String()); err != nil || q != p {
			t.Fatalf("round trip: %v", err)
		}
	})
}

func TestPinTextRoundTrip(t *testing.T) {
	const s = "sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="
	var p Pin
	if err := p.UnmarshalText([]byte(s)); err != nil {
		t.Fatal(err)
	}
	b, _ := p.MarshalText()
	if string(b) != s {
		t.Fatalf("round trip: %s", b)
	}
	if err := p.UnmarshalText([]byte("sha256//nope")); !errors.Is(err, ErrMalformed) {
		t.Fatalf("malformed pin: err = %v", err)
	}
}

package pkcs11key

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	u, err := Parse("pkcs11:token=my%20token;object=mk;id=%01%02;slot-id=7?module-path=/lib/x.so&pin-value=s3cret")
	if err != nil {
		t.Fatal(err)
	}
	if u.Token != "my token" || u.Object != "mk" || string(u.ID) != "\x01\x02" || *u.SlotID != 7 || u.ModulePath != "/lib/x.so" {
		t.Fatalf("parsed %+v", u)
	}
	if pin, _ := u.PIN(); pin != "s3cret" {
		t.Fatalf("pin %q", pin)
	}
	if s := u.String(); strings.Contains(s, "s3cret") || !strings.Contains(s, "pin-value=REDACTED") || !strings.Contains(s, "token=my%20token") {
		t.Fatalf("String() = %s", s)
	}
	for _, c := range []struct{ uri, want string }{
		{"token=a;object=b?module-path=/m&pin-value=1", `must start with "pkcs11:"`},
		{"pkcs11:object=b?module-path=/m&pin-value=1", "token=LABEL is required"},
		{"pkcs11:token=a?module-path=/m&pin-value=1", "object=LABEL is required"},
		{"pkcs11:token=a;object=b?pin-value=1", "module-path=/path/to/module.so is required"},
		{"pkcs11:token=a;object=b?module-path=/m", "pin-value or pin-source is required"},
		{"pkcs11:token=a;object=b?module-path=/m&pin-value=1&pin-source=/f", "exclude each other"},
		{"pkcs11:token=a;token=b;object=b?module-path=/m&pin-value=1", "token given twice"},
		{"pkcs11:token=a;object=b;colour=red?module-path=/m&pin-value=1", `unsupported path attribute "colour"`},
		{"pkcs11:token=a;object=b;type=private?module-path=/m&pin-value=1", "type=private"},
		{"pkcs11:token=a;object=b;slot-id=x?module-path=/m&pin-value=1", "slot-id"},
		{"pkcs11:token=a%zz;object=b?module-path=/m&pin-value=1", "token: bad percent-escape"},
		{"pkcs11:token=a;object=b?module-name=softhsm2&pin-value=1", "module-name is not supported"},
		{"pkcs11:token=a;object=b?module-path=/m&pin-value=s3cret&frob=1", `unsupported query attribute "frob"`},
	} {
		_, err := Parse(c.uri)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%q) = %v, want %q", c.uri, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Parse(%q) error shows the PIN: %v", c.uri, err)
		}
	}
}

func TestPINSource(t *testing.T) {
	u, err := Parse("pkcs11:token=a;object=b?module-path=/m&pin-source=file:/nonexistent/pin")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.PIN(); err == nil || !strings.Contains(err.Error(), "pin-source") {
		t.Fatalf("missing pin file: %v", err)
	}
}

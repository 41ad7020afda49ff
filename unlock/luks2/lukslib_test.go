package luks2

import (
	"bytes"
	"reflect"
	"testing"
	"unsafe"

	"github.com/anatol/luks.go"
)

// lukslibKey unseals with github.com/anatol/luks.go and returns the volume
// key it derived. luks.go keeps the key unexported; reading it is fine in a
// test, and is one of the reasons the boot path does its own unsealing
// (with luks.go it can never be wiped). The others: luks.go reads only the
// primary header, so a damaged primary with an intact secondary would not
// open, and its argon2 is about twice as slow as cryptsetup's.
func lukslibKey(t *testing.T, img string, slot int, pass []byte) ([]byte, error) {
	t.Helper()
	dev, err := luks.Open(img)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	v, err := dev.UnsealVolume(slot, pass)
	if err != nil {
		return nil, err
	}
	f := reflect.ValueOf(v).Elem().FieldByName("key")
	if !f.IsValid() {
		t.Fatal("luks.go Volume has no key field any more")
	}
	return bytes.Clone(*(*[]byte)(unsafe.Pointer(f.UnsafeAddr()))), nil
}

// TestUnsealAgreesWithLuksGo is a second, independent oracle beside
// cryptsetup: luks.go must derive the same volume key as our unsealing for
// every KDF it supports, and refuse the same wrong passphrase.
func TestUnsealAgreesWithLuksGo(t *testing.T) {
	pass := []byte("a passphrase for both implementations")
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"pbkdf2-sha256", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"}},
		{"pbkdf2-sha512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha512"}},
		{"argon2id", []string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192", "--pbkdf-parallel", "2"}},
		{"argon2i", []string{"--pbkdf", "argon2i", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "8192", "--pbkdf-parallel", "1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := formatArgs(t, pass, tc.args...)
			ours, h, err := unsealFile(t, img, pass)
			if err != nil {
				t.Fatal(err)
			}
			theirs, err := lukslibKey(t, img, h.SlotOrder()[0], pass)
			if err != nil {
				t.Fatalf("luks.go: %v", err)
			}
			if !bytes.Equal(ours, theirs) {
				t.Fatal("our volume key differs from luks.go's")
			}
			if _, err := lukslibKey(t, img, h.SlotOrder()[0], []byte("wrong")); err != luks.ErrPassphraseDoesNotMatch {
				t.Fatalf("luks.go accepted a wrong passphrase: %v", err)
			}
			if _, _, err := unsealFile(t, img, []byte("wrong")); err == nil {
				t.Fatal("we accepted a wrong passphrase")
			}
		})
	}
}
